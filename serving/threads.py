"""How many threads the numerical libraries of a serving process may start: the policy, in a module that
imports nothing numerical, so a process can apply it before numpy loads.

numpy's OpenBLAS starts a thread per core and spins them on every product; in a serving process next to
FAISS's OpenMP threads (and a writer thread) on a small machine the two pools fight for the cores. Measured
(bench/bench_serving_http.py, 2 cores, 63,937 items, V = 4, 500 updates/s through apply, load ~2): the
delta's (4,770 x 64) @ (64 x 4) product took 2.0 ms instead of 0.09 ms, and /recommend at 200 req/s had a
p99 of 7,403 ms while updates streamed; with one BLAS thread, 8.6 ms (idle 6.6 ms), and capacity 791 req/s
instead of 362. Serving processes (and every Ray actor of a pipeline: one compute thread each, like
torch_threads and faiss_threads) therefore start with these, unless the environment says otherwise. Read
when numpy loads: it must be in the environment before the process imports numpy.
"""

from __future__ import annotations

import os

SINGLE_THREAD_BLAS_ENV = {"OPENBLAS_NUM_THREADS": "1"}


def single_thread_blas_env() -> dict[str, str]:
    """``SINGLE_THREAD_BLAS_ENV``, each value overridden by the environment's own (an operator's choice wins)."""
    return {name: os.environ.get(name, value) for name, value in SINGLE_THREAD_BLAS_ENV.items()}
