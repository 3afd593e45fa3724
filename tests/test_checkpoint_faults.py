"""Checkpoint faults: a real writer SIGKILLed mid-save, and corrupt or incompatible checkpoints.

``tests/test_checkpoint_store.py`` covers the store's contract with a toy pickle format (round trip,
pruning, a same-size edit, truncation seen by ``verify``, a bad manifest version, a hand-made temp
file). This module adds what only a real process and the real file format show:

* A child process (``python -c``) saves a 32 MiB checkpoint through the real ``CheckpointStore`` and
  ``learner.core.checkpoint.save_checkpoint`` and is SIGKILLed at seven points: at 10 %, 50 % and 90 % of the
  payload written (the parent polls the temp file's size), and just before each of the three renames
  and the directory fsync (an audit hook in the child SIGKILLs itself when ``os.replace``/``os.open``
  is about to run, so the point is exact). Afterwards a new store loads the previous good checkpoint
  (or the new one, once its manifest is in place), refuses nothing, and removes exactly the leftovers.
* The newest checkpoint flipped, truncated, torn inside, replaced by junk, of another checkpoint
  version, with an unknown config field, or trained with another config is refused with a message
  naming the file and what is wrong, and the previous good checkpoint is what loads.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from learner.core.checkpoint import load_checkpoint, save_checkpoint
from learner.core.config import SITNConfig
from learner.core.learner import SITNLearner
from learner.online.checkpoint_store import CheckpointStore, same_config

REPO = Path(__file__).resolve().parents[1]
BLOB_FLOATS = 8 << 20  # 8 Mi float32 = 32 MiB: a write long enough to be caught part-way
CHILD_TIMEOUT_S = 120.0

# The child: save step 2 into ``directory``; SIGKILL itself just before the operation named in argv[2]
# ("-": never). Audit hooks run before the operation they announce, so the kill point is exact.
CHILD = """
import os, signal, sys
from pathlib import Path
import torch
from learner.core.checkpoint import load_checkpoint, save_checkpoint
from learner.online.checkpoint_store import CheckpointStore

directory, kill_before, blob_floats = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])

def save_blob(blob, path, extra):  # as save_blob below; not imported, to keep the child's start short
    save_checkpoint(path, {"blob": blob, "extra": extra})

def load_blob(path):
    state = load_checkpoint(path)
    return state["blob"], state["extra"]

def kill_at(event, args):
    if event == "os.rename" and Path(args[1]).name == kill_before:
        os.kill(os.getpid(), signal.SIGKILL)
    if event == "open" and kill_before == "directory fsync" and Path(args[0]) == directory:
        os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(kill_at)
store = CheckpointStore(directory, keep=3, save_fn=save_blob, load_fn=load_blob)
store.save(torch.full((blob_floats,), 2.0), 2, {"step": 2})
"""


def save_blob(blob: torch.Tensor, path: Path, extra: dict[str, Any]) -> None:
    save_checkpoint(path, {"blob": blob, "extra": extra})


def load_blob(path: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    state = load_checkpoint(path)
    return state["blob"], state["extra"]


def blob_store(directory: Path) -> CheckpointStore:
    return CheckpointStore(directory, keep=3, save_fn=save_blob, load_fn=load_blob)


def start_child(directory: Path, kill_before: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), kill_before, str(BLOB_FLOATS)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stderr=subprocess.PIPE,
    )


def kill_when_payload_reaches(child: subprocess.Popen[bytes], directory: Path, size_bytes: int) -> int:
    """SIGKILL ``child`` once its payload temp file has ``size_bytes``; return the size seen at the kill."""
    temp = directory / f".ckpt-000000000002.pt.tmp.tmp-{child.pid}"  # save_checkpoint's temp name
    deadline_s = time.monotonic() + CHILD_TIMEOUT_S
    while time.monotonic() < deadline_s:
        try:
            seen = temp.stat().st_size
        except FileNotFoundError:
            seen = -1
        if seen >= size_bytes:
            child.kill()
            return seen
        if child.poll() is not None:
            pytest.fail(f"the child exited ({child.returncode}) before writing {size_bytes} bytes to {temp}")
        time.sleep(0.0002)
    child.kill()
    pytest.fail(f"{temp} did not reach {size_bytes} bytes within {CHILD_TIMEOUT_S} s")


@pytest.fixture
def good_step_1(tmp_path: Path) -> int:
    """A directory holding one good checkpoint (step 1); returns its file size in bytes."""
    blob_store(tmp_path).save(torch.full((BLOB_FLOATS,), 1.0), 1, {"step": 1})
    return (tmp_path / "ckpt-000000000001.pt").stat().st_size


STEP1 = {"ckpt-000000000001.pt", "ckpt-000000000001.json"}
STEP2 = {"ckpt-000000000002.pt", "ckpt-000000000002.json"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kill_point", "leftovers"),
    [
        ("10% of payload", {".ckpt-000000000002.pt.tmp.tmp-{pid}"}),
        ("50% of payload", {".ckpt-000000000002.pt.tmp.tmp-{pid}"}),
        ("90% of payload", {".ckpt-000000000002.pt.tmp.tmp-{pid}"}),
        ("ckpt-000000000002.pt.tmp", {".ckpt-000000000002.pt.tmp.tmp-{pid}"}),  # payload complete
        ("ckpt-000000000002.pt", {"ckpt-000000000002.pt.tmp"}),  # file complete, not yet in place
        ("ckpt-000000000002.json", {"ckpt-000000000002.pt", "ckpt-000000000002.json.tmp"}),  # no manifest
        ("directory fsync", set()),  # the manifest is in place: step 2 is complete
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_sigkill_during_save_never_exposes_a_half_written_checkpoint(
    tmp_path: Path, good_step_1: int, kill_point: str, leftovers: set[str]
) -> None:
    if kill_point.endswith("of payload"):
        child = start_child(tmp_path, "-")
        fraction = int(kill_point.split("%")[0]) / 100
        seen = kill_when_payload_reaches(child, tmp_path, int(good_step_1 * fraction))
        assert good_step_1 * fraction <= seen <= good_step_1
    else:
        child = start_child(tmp_path, kill_point)
    _, stderr = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == -signal.SIGKILL, stderr.decode()[-2000:]

    expected_leftovers = {name.format(pid=child.pid) for name in leftovers}
    complete = STEP1 | (STEP2 if kill_point == "directory fsync" else set())
    assert {p.name for p in tmp_path.iterdir()} == complete | expected_leftovers

    store = blob_store(tmp_path)
    loaded = store.load_latest()
    assert loaded is not None
    blob, extra = loaded
    step = 2 if kill_point == "directory fsync" else 1
    assert extra == {"step": step} and blob.shape == (BLOB_FLOATS,)
    assert torch.equal(blob[:: 1 << 16], torch.full((BLOB_FLOATS >> 16,), float(step)))
    assert store.refused == []  # nothing half-written ever sits under a real name
    assert {p.name for p in store.removed} == expected_leftovers
    assert {p.name for p in tmp_path.iterdir()} == complete


@pytest.mark.slow
def test_a_save_after_a_killed_save_completes_and_is_loaded(tmp_path: Path, good_step_1: int) -> None:
    child = start_child(tmp_path, "-")
    kill_when_payload_reaches(child, tmp_path, good_step_1 // 2)
    child.communicate(timeout=CHILD_TIMEOUT_S)
    assert blob_store(tmp_path).load_latest() is not None  # the restart: cleans up, loads step 1
    again = start_child(tmp_path, "-")
    _, stderr = again.communicate(timeout=CHILD_TIMEOUT_S)
    assert again.returncode == 0, stderr.decode()[-2000:]
    store = blob_store(tmp_path)
    loaded = store.load_latest()
    assert loaded is not None and loaded[1] == {"step": 2}
    assert store.refused == [] and store.removed == []
    assert {p.name for p in tmp_path.iterdir()} == STEP1 | STEP2


# --- corrupt and incompatible checkpoints of the real learner -----------------------------------------

CONFIG = SITNConfig(dim=8, max_len=4, n_views=2, cluster_counts=(2,), view_hidden=8, proj_dim=8,
                    n_item_clusters=2, n_sampled_negatives=4, initial_item_capacity=16)  # fmt: skip


def _rewrite_manifest(manifest: Path) -> None:
    """Make the manifest agree with the file's current bytes (as if the file was damaged before it)."""
    data = json.loads(manifest.read_text())
    checkpoint = manifest.with_suffix(".pt")
    body = checkpoint.read_bytes()
    manifest.write_text(json.dumps({**data, "size_bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}))


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _tear_payload(path: Path) -> None:
    """Damage the payload and then the manifest too: only the file's own sha256 can tell."""
    _flip_middle_byte(path)
    _rewrite_manifest(path.with_suffix(".json"))


def _junk(path: Path) -> None:
    path.write_bytes(b"not a checkpoint at all")
    _rewrite_manifest(path.with_suffix(".json"))


def _state_saver(change: dict[str, Any]) -> Any:
    def save(learner: SITNLearner, path: Path, extra: dict[str, Any]) -> None:
        learner.extra = dict(extra)
        state = learner.state_dict()
        save_checkpoint(path, {**state, **{k: v(state) if callable(v) else v for k, v in change.items()}})

    return save


def _other_config_saver(learner: SITNLearner, path: Path, extra: dict[str, Any]) -> None:
    """A good checkpoint of a learner built with another config (what a changed deployment finds)."""
    other = SITNLearner(CONFIG.replace(dim=16, proj_dim=16), learner.source, learner.target)
    other.save(path, extra=extra)


CORRUPTIONS = {
    "flipped byte": (_flip_middle_byte, None, r"ckpt-000000000002\.pt: sha256 \w+… does not match manifest \w+…"),
    "truncated": (
        lambda p: p.write_bytes(p.read_bytes()[:-1000]),
        None,
        r"ckpt-000000000002\.pt: size \d+ bytes, manifest says \d+",
    ),
    "torn manifest": (
        lambda p: p.with_suffix(".json").write_text('{"manifest_version": 1, "fi'),
        None,
        r"ckpt-000000000002\.json: unreadable manifest \(",
    ),
    "torn payload": (_tear_payload, None, r"ckpt-000000000002\.pt: checksum mismatch \(torn write or corrupted file\)"),
    "junk": (_junk, None, r"ckpt-000000000002\.pt: not a SITN checkpoint \(magic b'not a ch'"),
    "checkpoint version": (
        None,
        _state_saver({"version": 2}),
        r"ckpt-000000000002\.pt: checkpoint version 2, expected 1$",
    ),
    "unknown config field": (
        None,
        _state_saver({"config": lambda state: {**state["config"], "n_experts": 4}}),
        r"ckpt-000000000002\.pt: failed to load \(ValueError: unknown SITNConfig field\(s\) \['n_experts'\]",
    ),
    "another config": (
        None,
        _other_config_saver,
        r"ckpt-000000000002\.pt: trained with another config: "
        r"dim is 16 in the checkpoint, 8 in this job; proj_dim is 16 in the checkpoint, 8 in this job$",
    ),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_bad_newest_checkpoint_is_refused_by_name_and_the_previous_one_loads(tmp_path: Path, kind: str) -> None:
    damage, saver, reason = CORRUPTIONS[kind]
    learner = SITNLearner(CONFIG, "movie", "book")
    store = CheckpointStore(tmp_path, accept_fn=same_config(CONFIG.to_dict()))
    store.save(learner, 1, {"offsets": {"0": 10}})
    learner.step = 2
    newest = CheckpointStore(tmp_path, save_fn=saver).save(learner, 2, {"offsets": {"0": 20}})
    if damage is not None:
        damage(newest)

    loaded = store.load_latest()

    assert loaded is not None
    restored, extra = loaded
    assert restored.step == 0 and extra == {"offsets": {"0": 10}} and restored.config == CONFIG
    assert len(store.refused) == 1, store.refused
    manifest, message = store.refused[0]
    assert manifest.name == "ckpt-000000000002.json"
    assert message.startswith(str(tmp_path)), message  # names the file by its full path
    assert re.search(reason, message), message


def test_a_checkpoint_written_by_torch_save_still_loads(tmp_path: Path) -> None:
    """Files written before the pickle payload (magic SITNCKP1, a ``torch.save`` payload) load alike."""
    from learner.core import checkpoint

    state = {"blob": torch.arange(5.0), "extra": {"offsets": {"0": 3}}}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    path = tmp_path / "old.pt"
    path.write_bytes(checkpoint.MAGIC_TORCH + hashlib.sha256(payload).digest() + payload)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["blob"], state["blob"]) and loaded["extra"] == state["extra"]
    save_checkpoint(tmp_path / "new.pt", state)
    assert (tmp_path / "new.pt").read_bytes()[:8] == checkpoint.MAGIC == b"SITNCKP2"
    assert torch.equal(load_checkpoint(tmp_path / "new.pt")["blob"], state["blob"])


@pytest.mark.parametrize("fmt", ["pickle", "torch.save"])
def test_a_checkpoint_naming_the_modules_before_the_regrouping_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """Issue 10 moved ``learner.<module>`` to ``learner.{core,online,offline}.<module>``: a checkpoint written
    before names a class by its old path, and loads as the class at its new one (both file formats)."""
    from learner.core import checkpoint
    from learner.online import drift

    alarm = drift.DriftAlarm("loss", "adwin", 7, "step", 0.5, 0.002, 1.0)
    state = {"blob": torch.arange(3.0), "extra": {"alarm": alarm}}
    with monkeypatch.context() as old_paths:  # pickled as the code before the move named the class
        old_paths.setitem(sys.modules, "learner.drift", drift)
        old_paths.setattr(drift.DriftAlarm, "__module__", "learner.drift")
        if fmt == "pickle":
            magic, payload = checkpoint.MAGIC, checkpoint.encode_checkpoint(state)
        else:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            magic, payload = checkpoint.MAGIC_TORCH, buffer.getvalue()
    assert b"learner.drift" in payload and b"learner.online" not in payload
    assert "learner.drift" not in sys.modules
    path = tmp_path / "old.pt"
    path.write_bytes(magic + hashlib.sha256(payload).digest() + payload)
    loaded = load_checkpoint(path)
    assert type(loaded["extra"]["alarm"]) is drift.DriftAlarm and loaded["extra"]["alarm"] == alarm
    assert torch.equal(loaded["blob"], state["blob"])
    assert checkpoint.MOVED_MODULES["learner.drift"] == "learner.online.drift"
    for old, new in checkpoint.MOVED_MODULES.items():  # every old path is gone, every new one a module
        assert not (REPO / f"{old.replace('.', '/')}.py").exists() and (REPO / f"{new.replace('.', '/')}.py").is_file()
