"""Checkpoint directory: atomic saves, checksum refusal, fallback to the previous good checkpoint."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from learner.online.checkpoint_store import CheckpointStore
from stream.errors import CheckpointError


class Toy:
    def __init__(self, weights: list[float]) -> None:
        self.weights = weights


def save(obj: Any, path: Path, extra: dict[str, Any]) -> None:
    path.write_bytes(pickle.dumps((obj.weights, extra)))


def load(path: Path) -> tuple[Any, dict[str, Any]]:
    weights, extra = pickle.loads(path.read_bytes())
    return Toy(weights), extra


def store(tmp_path: Path, keep: int = 3) -> CheckpointStore:
    return CheckpointStore(tmp_path, keep=keep, save_fn=save, load_fn=load)


def test_round_trip_and_pruning(tmp_path: Path) -> None:
    s = store(tmp_path, keep=2)
    for step in (10, 20, 30):
        s.save(Toy([float(step)]), step, {"offsets": {"p0": step * 2}})
    assert [m.name for m in s.manifests()] == ["ckpt-000000000030.json", "ckpt-000000000020.json"]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["ckpt-000000000020.pt", "ckpt-000000000030.pt"]
    loaded = s.load_latest()
    assert loaded is not None
    toy, extra = loaded
    assert toy.weights == [30.0] and extra == {"offsets": {"p0": 60}}


def test_corrupt_newest_falls_back_to_previous(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.save(Toy([1.0]), 1, {})
    newest = s.save(Toy([2.0]), 2, {})
    newest.write_bytes(newest.read_bytes()[:-3] + b"xyz")  # same size, different bytes
    loaded = s.load_latest()
    assert loaded is not None and loaded[0].weights == [1.0]
    assert len(s.refused) == 1
    assert "ckpt-000000000002.pt: sha256" in s.refused[0][1] and "does not match manifest" in s.refused[0][1]


def test_truncated_and_missing_are_refused_with_names(tmp_path: Path) -> None:
    s = store(tmp_path)
    path = s.save(Toy([1.0]), 1, {})
    path.write_bytes(path.read_bytes()[:5])
    with pytest.raises(CheckpointError, match=r"ckpt-000000000001.pt: size 5 bytes, manifest says \d+"):
        s.verify(s.manifests()[0])
    path.unlink()
    with pytest.raises(CheckpointError, match=r"ckpt-000000000001\.pt: checkpoint file missing"):
        s.verify(s.manifests()[0])
    assert s.load_latest() is None


def test_incompatible_manifest_and_unloadable_file(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.save(Toy([1.0]), 1, {})
    s.save(Toy([2.0]), 2, {})
    manifest = s.manifests()[0]
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "manifest_version": 99}))
    loaded = s.load_latest()
    assert loaded is not None and loaded[0].weights == [1.0]
    assert "manifest version 99, supported 1" in s.refused[0][1]


def test_half_written_temp_file_is_ignored(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.save(Toy([1.0]), 1, {})
    (tmp_path / "ckpt-000000000002.pt.tmp").write_bytes(b"partial")  # a kill mid-write leaves this
    loaded = s.load_latest()
    assert loaded is not None and loaded[0].weights == [1.0]
    assert s.refused == []


def test_refused_checkpoints_are_set_aside_so_a_fresh_run_keeps_its_own(tmp_path: Path) -> None:
    # a run of three checkpoints that this job refuses (another config, say): every one is refused ...
    old = store(tmp_path)
    for step in (200, 400, 600):
        old.save(Toy([float(step)]), step, {})
    refusing = CheckpointStore(tmp_path, save_fn=save, load_fn=load, accept_fn=_refuse)
    assert refusing.load_latest() is None
    assert [m.name for m, _ in refusing.refused] == [f"ckpt-000000000{s}.json" for s in (600, 400, 200)]
    # ... kept beside the directory's checkpoints under another name, never tried again ...
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"refused-ckpt-000000000{s}.{ext}" for s in (200, 400, 600) for ext in ("json", "pt"))
    assert refusing.manifests() == [] and refusing.load_latest() is None and len(refusing.refused) == 3
    # ... so the run that starts over keeps its checkpoints, although their steps are lower
    refusing.save(Toy([1.0]), 100, {})
    assert [m.name for m in refusing.manifests()] == ["ckpt-000000000100.json"]
    loaded = store(tmp_path).load_latest()
    assert loaded is not None and loaded[0].weights == [1.0]


def _refuse(learner: Any, extra: dict[str, Any]) -> None:
    raise ValueError("trained with another config")
