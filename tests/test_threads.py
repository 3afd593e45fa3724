"""The one-BLAS-thread policy of serving processes and pipeline actors (``serving.threads``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving.threads import SINGLE_THREAD_BLAS_ENV, single_thread_blas_env

REPO = Path(__file__).resolve().parents[1]


def test_the_policy_is_one_thread_unless_the_operator_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    assert single_thread_blas_env() == {"OPENBLAS_NUM_THREADS": "1"} == SINGLE_THREAD_BLAS_ENV
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    assert single_thread_blas_env() == {"OPENBLAS_NUM_THREADS": "4"}


def test_the_policy_module_loads_before_numpy() -> None:
    """It only works if it is applied before numpy loads OpenBLAS: importing it must not load numpy."""
    code = "import sys, serving.threads; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_pipeline_actors_start_with_one_blas_thread(ray_cluster: dict[str, object]) -> None:
    import ray

    @ray.remote(num_cpus=0)
    def blas_env() -> str | None:
        return os.environ.get("OPENBLAS_NUM_THREADS")

    expected = os.environ.get("OPENBLAS_NUM_THREADS", "1")  # the test process's own choice wins, as for operators
    assert ray.get(blas_env.remote(), timeout=60) == expected
