"""A serving replica must not need PyTorch: importing every serving module leaves torch unloaded."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

MODULES = ["serving.api", "serving.service", "serving.index", "serving.store", "serving.update_consumer"]


def test_serving_imports_without_torch() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in MODULES)
        + "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        + "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
