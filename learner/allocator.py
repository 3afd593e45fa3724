"""The learner process's C heap: a fixed glibc mmap threshold, so freed large buffers go back to the OS.

glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes (128 KiB at start) with its own
``mmap`` and unmaps it when it is freed. But by default the threshold is *dynamic*: each time such a chunk
is freed, the threshold rises to its size (up to 32 MiB on 64-bit), and from then on buffers up to that
size are carved from the heap instead. The learner allocates many such transient buffers every step and
every publish (PyTorch activations of a 512 x 50 x 64 batch, the (B, N items) score matrices of
``learner.trainer`` and ``learner.prequential``, the query vectors of every touched user, a publish's item
matrix, the checkpoint payload), interleaved with small long-lived objects (histories, co-occurrence
counts); the heap then grows with holes the OS never gets back. Measured in-process on issue 12's
synthetic stream (``bench/bench_memory.py --trainer``: 5,000 users, 500k items, ``sitn run`` defaults),
resident memory grew by about 10 MiB per 1,000 events with the dynamic threshold, of which
``malloc_trim`` released about three quarters, i.e. memory free inside the process. Pinning the
threshold (:func:`pin_mmap_threshold`, called once at the learner's start-up, like its torch thread
count) keeps those buffers out of the heap: about 2.9 MiB per 1,000 events then, what the live structures
grow by (1,154 MiB against 1,591 MiB after 60,000 events). The price: an ``mmap`` and fresh zeroed pages
for each buffer of 128 KiB or more.

Nothing else changes: the same allocations, the same results. Off glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
DEFAULT_MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value; setting it also turns the dynamic rise off


def pin_mmap_threshold(threshold_bytes: int = DEFAULT_MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold_bytes`` for this process; False where there is no glibc
    ``mallopt`` or it refused the value (glibc allows up to 32 MiB on 64-bit).

    >>> pin_mmap_threshold(0)
    Traceback (most recent call last):
    ...
    ValueError: threshold_bytes must be an int >= 1, got 0
    """
    if isinstance(threshold_bytes, bool) or not isinstance(threshold_bytes, int) or threshold_bytes < 1:
        raise ValueError(f"threshold_bytes must be an int >= 1, got {threshold_bytes!r}")
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.info("no glibc mallopt: mmap threshold left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes))
    log.info("malloc mmap threshold pinned=%s threshold_bytes=%d", done, threshold_bytes)
    return done
