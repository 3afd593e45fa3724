"""The JSON record a benchmark writes beside its printed table (``--json PATH``), so runs compare run over run.

One record per run::

    {"bench": "bench_index", "started_at_utc": "...", "finished_at_utc": "...", "wall_s": 12.3,
     "commit": {"hash": "a1baf92", "dirty": true},
     "argv": ["--items", "2000"], "config": {"items": 2000, "events": "path/as/string", ...},
     "machine": {"cpu_count": 2, "load_avg_start": [1.2, 1.0, 0.9], "load_avg_end": [...],
                 "python": "3.11.9", "platform": "...", "packages": {"numpy": "2.4.6", "faiss-cpu": ..., ...}},
     "figures": {...}}

``figures`` is the bench's own nested dict of exactly the numbers its table prints (medians, spread,
per-run values, counts, with quality next to speed); the bench prints its table from that same dict.
Package versions come from the installed distributions' metadata (``importlib.metadata``), so recording
them imports nothing: a bench that does not use torch does not pay for importing it. NaN and infinities
become ``null`` (strict JSON has no NaN). The file is written atomically (a temporary file beside it,
then a rename), so a reader never sees half a record.

Use::

    record = BenchRecord("bench_index", args)   # at start: time, load average, argv, configuration
    ...                                         # run, fill ``figures``, print the table from it
    record.write(args.json, figures)            # at the end: load average again, then the file

>>> import argparse, json, tempfile
>>> args = argparse.Namespace(items=10, events=Path("data/events.csv"), views=(1, 4))
>>> record = BenchRecord("bench_example", args, argv=["--items", "10"])
>>> with tempfile.TemporaryDirectory() as tmp:
...     written = record.write(Path(tmp) / "run.json", {"recall_at_10": np.float64(0.5), "p50_ms": [1.0, float("nan")]})
...     on_disk = json.loads((Path(tmp) / "run.json").read_text())
>>> on_disk == written
True
>>> on_disk["bench"], on_disk["argv"], on_disk["config"]
('bench_example', ['--items', '10'], {'items': 10, 'events': 'data/events.csv', 'views': [1, 4]})
>>> on_disk["figures"]
{'recall_at_10': 0.5, 'p50_ms': [1.0, None]}
>>> sorted(on_disk["machine"])
['cpu_count', 'load_avg_end', 'load_avg_start', 'packages', 'platform', 'python']
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Distributions whose versions move benchmark figures; read from metadata, never imported here.
PACKAGES = ("numpy", "faiss-cpu", "torch", "ray", "kafka-python", "fastapi", "uvicorn")


def jsonable(value: Any, where: str = "record") -> Any:
    """``value`` as plain JSON types: Paths as strings, numpy scalars and arrays as numbers and lists,
    tuples and sets as lists, dataclasses as dicts, NaN and infinities as None.

    Anything else raises ``TypeError`` naming where it was found, rather than being written as its repr.

    >>> jsonable({"path": Path("a/b"), "x": np.float32(1.5), "n": float("nan"), "ks": (1, np.int64(2))})
    {'path': 'a/b', 'x': 1.5, 'n': None, 'ks': [1, 2]}
    >>> jsonable({"f": print})
    Traceback (most recent call last):
    ...
    TypeError: record.f: expected JSON-able data (numbers, strings, paths, lists, dicts, numpy values), got builtin_function_or_method
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist(), where)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value) if isinstance(value, set | frozenset) else value
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(items)]
    raise TypeError(
        f"{where}: expected JSON-able data (numbers, strings, paths, lists, dicts, numpy values), "
        f"got {type(value).__name__}"
    )


def git_commit(repo: Path = REPO) -> dict[str, Any]:
    """``{"hash": short hash of HEAD, "dirty": tracked files differ from it}``; both None outside a git
    checkout (a source archive) or without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                              text=True, check=True, timeout=30).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {"hash": None, "dirty": None}
    return {"hash": head, "dirty": bool(status.strip())}


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None when not installed), from metadata: nothing imported."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _load_avg() -> list[float]:
    """The 1, 5 and 15-minute load averages, rounded to 0.01."""
    return [round(x, 2) for x in os.getloadavg()]


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class BenchRecord:
    """One run of a benchmark: built at its start (time, load average, argv, configuration), written at its
    end with the figures (``write``)."""

    def __init__(self, bench: str, args: argparse.Namespace, argv: Sequence[str] | None = None) -> None:
        """``bench``: the script's name (``"bench_index"``); ``args``: its parsed options, recorded as the
        configuration (a bench adds what it derives, e.g. the model config, to its figures); ``argv``: the
        command line, default ``sys.argv[1:]``."""
        if not bench:
            raise ValueError("bench must name the benchmark, got an empty string")
        self.bench = bench
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.config = jsonable(vars(args), "config")
        self.started_at_utc = _utc_now()
        self.load_avg_start = _load_avg()
        self._started_s = time.monotonic()

    def record(self, figures: Mapping[str, Any]) -> dict[str, Any]:
        """The whole record, as plain JSON types, with the load average now as ``load_avg_end``."""
        return {
            "bench": self.bench,
            "started_at_utc": self.started_at_utc,
            "finished_at_utc": _utc_now(),
            "wall_s": round(time.monotonic() - self._started_s, 3),
            "commit": git_commit(),
            "argv": self.argv,
            "config": self.config,
            "machine": {
                "cpu_count": os.cpu_count(),
                "load_avg_start": self.load_avg_start,
                "load_avg_end": _load_avg(),
                "python": platform.python_version(),
                "platform": platform.platform(),
                "packages": package_versions(),
            },
            "figures": jsonable(figures, "figures"),
        }

    def write(self, path: Path, figures: Mapping[str, Any]) -> dict[str, Any]:
        """Write the record to ``path`` atomically (a temporary file in the same directory, then a rename);
        return it. The directory is created if missing."""
        out = self.record(figures)
        text = json.dumps(out, indent=2, allow_nan=False) + "\n"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return out


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """The ``--json PATH`` option every bench takes."""
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the figures, configuration, commit and load average here as JSON")
