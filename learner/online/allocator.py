"""The learner process's C heap: freed transient buffers handed back to the OS after each batch (issue 12).

The learner allocates large transient buffers every step and every publish (PyTorch activations of a
512 x 50 x 64 batch, the (B, N items) score matrices of ``learner.online.trainer`` and ``learner.online.prequential``,
the query vectors of every touched user, a publish's item matrix, the checkpoint payload), interleaved
with small long-lived objects (histories, co-occurrence counts). glibc serves buffers of at least
``M_MMAP_THRESHOLD`` bytes with their own ``mmap``, but that threshold is dynamic: each time such a chunk
is freed it rises to the chunk's size (up to 32 MiB on 64-bit), and from then on those buffers are carved
from the heap. As the item count N grows, each step needs slightly larger buffers than the holes left by
the last, so the heap keeps growing and its free pages are never given back.

Measured in-process on issue 12's synthetic stream (``bench/bench_memory.py --trainer``: 5,000 users,
500k items, ``sitn run`` defaults, batches of 2,000 events): resident memory grew about 10 MiB per 1,000
events (1,553 MiB after 60,000 events); :func:`trim_free_memory` after each batch, as ``learner.online.actor``
does, holds it to about 2.3 MiB per 1,000 events (1,106 MiB), what the live structures grow by, at the same
CPU time (47 s for both). :func:`pin_mmap_threshold` (a fixed 128 KiB threshold) bounds it too (1,154 MiB)
but costs about 30 % more CPU: an ``mmap`` and fresh zeroed pages for every buffer of 128 KiB or more; a
fixed 4 MiB threshold does not help (1,529 MiB). The bench compares the three (``--malloc``).

Nothing else changes: the same allocations, the same results. Off glibc (macOS, musl) both do nothing.
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


def trim_free_memory() -> bool:
    """Give the free pages of every malloc arena back to the OS (glibc ``malloc_trim(0)``); True when some
    memory was released, False when none was or off glibc. It walks the free chunks: about 20 ms per
    2,000-event batch in ``bench/bench_memory.py --trainer`` (0.68 s over 60,000 events, 49 s of CPU).

    >>> isinstance(trim_free_memory(), bool)
    True
    """
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    return bool(malloc_trim(0))
