"""A directory of learner checkpoints: atomic, checksummed, newest-good-wins.

Layout: ``ckpt-<step:012d>.pt`` (the learner's own checkpoint file) plus ``ckpt-<step:012d>.json``, a
manifest with its size and sha256 written *after* the checkpoint file is complete. Both are written to
a temporary name, fsynced and moved into place with ``os.replace``, so a process killed mid-write
leaves at worst a stray ``.tmp`` file, never a half-written checkpoint under a real name. Loading walks
from the newest manifest down: a checkpoint whose bytes do not match its manifest, that fails to load,
or that ``accept_fn`` rejects (e.g. :func:`same_config`: it was trained with another config) is refused
with a :class:`CheckpointError` naming the file and what is wrong, and the previous good one is used.

What a kill at each point of :meth:`CheckpointStore.save` leaves (``tests/test_checkpoint_faults.py``
SIGKILLs a real writer at each), and what :meth:`CheckpointStore.load_latest` then does:

1. while the payload is written: ``.ckpt-N.pt.tmp.tmp-<pid>`` (partial) -> removed, previous loads;
2. before it is renamed: ``ckpt-N.pt.tmp`` (complete, no manifest) -> removed, previous loads;
3. before the manifest is in place: ``ckpt-N.pt`` without ``ckpt-N.json`` (unverifiable) -> removed,
   previous loads; the learner redoes those steps, and their offsets were never committed;
4. after the manifest is in place: ``ckpt-N`` is complete and loads.

A directory has one writer: the learner, which calls ``load_latest`` at start-up before it saves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from learner.core.checkpoint import write_checkpoint
from stream.errors import CheckpointError

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class StagedCheckpoint:
    """A checkpoint read out of the learner but not yet durable (``CheckpointStore.stage``): ``payload`` is
    its encoded bytes, a snapshot that later training does not change; None when a custom ``save_fn``
    has already written the temporary file."""

    step: int
    payload: bytes | None


class CheckpointStore:
    """Saves and loads learner checkpoints in ``directory``, keeping the newest ``keep``.

    ``save_fn(learner, path, extra)`` writes one checkpoint file (default: ``learner.encode(extra)``, written
    by ``learner.core.checkpoint.write_checkpoint``, so ``stage`` and ``commit`` can run apart); ``load_fn(path)`` returns
    ``(learner, extra)`` or raises. Both default to the SITNLearner contract. ``accept_fn(learner,
    extra)`` raises ``ValueError`` saying why a checkpoint that loaded cannot be used by this job.
    ``refused`` lists ``(manifest, reason)`` of every checkpoint refused; ``removed`` the leftovers of
    interrupted saves that ``load_latest`` deleted.
    """

    def __init__(
        self,
        directory: Path,
        keep: int = 3,
        save_fn: Callable[[Any, Path, dict[str, Any]], None] | None = None,
        load_fn: Callable[[Path], tuple[Any, dict[str, Any]]] | None = None,
        accept_fn: Callable[[Any, dict[str, Any]], None] | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._save_fn = save_fn
        self._load_fn = load_fn or _default_load
        self._accept_fn = accept_fn
        self.refused: list[tuple[Path, str]] = []
        self.removed: list[Path] = []

    def manifests(self) -> list[Path]:
        """Manifests, newest first."""
        return sorted(self.directory.glob("ckpt-*.json"), reverse=True)

    def save(self, learner: Any, step: int, extra: dict[str, Any]) -> Path:
        """Write a checkpoint of ``learner`` at ``step`` and return its file: ``commit(stage(...))``."""
        return self.commit(self.stage(learner, step, extra))

    def stage(self, learner: Any, step: int, extra: dict[str, Any]) -> StagedCheckpoint:
        """Read the checkpoint out of ``learner`` (the part that must not overlap training): its encoded
        bytes (``learner.encode``), or, with a custom ``save_fn``, its temporary file. ``commit`` finishes it,
        on this thread or another, while the learner trains on."""
        if self._save_fn is not None:
            self._save_fn(learner, self._paths(step)[1], extra)
            return StagedCheckpoint(step, None)
        return StagedCheckpoint(step, learner.encode(extra))

    def commit(self, staged: StagedCheckpoint) -> Path:
        """Make a staged checkpoint durable: file, fsync, rename, manifest, prune (points 1-4 above)."""
        final, tmp = self._paths(staged.step)
        stem = final.stem
        step = staged.step
        if staged.payload is not None:
            write_checkpoint(tmp, staged.payload)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "file": final.name,
            "step": step,
            "size_bytes": final.stat().st_size,
            "sha256": sha256_file(final),
        }
        tmp_manifest = self.directory / f"{stem}.json.tmp"
        with tmp_manifest.open("w") as fh:
            json.dump(manifest, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_manifest, self.directory / f"{stem}.json")
        _fsync_dir(self.directory)
        self._prune()
        return final

    def _paths(self, step: int) -> tuple[Path, Path]:
        """The final and the temporary path of the checkpoint of ``step``."""
        stem = f"ckpt-{step:012d}"
        return self.directory / f"{stem}.pt", self.directory / f"{stem}.pt.tmp"

    def _prune(self) -> None:
        for manifest in self.manifests()[self.keep :]:
            manifest.with_suffix(".pt").unlink(missing_ok=True)
            manifest.unlink(missing_ok=True)

    def verify(self, manifest_path: Path) -> Path:
        """Return the checkpoint file of a manifest, or raise CheckpointError saying what is wrong."""
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from None
        if manifest.get("manifest_version") != MANIFEST_VERSION:
            raise CheckpointError(
                f"{manifest_path}: manifest version {manifest.get('manifest_version')!r}, supported {MANIFEST_VERSION}"
            )
        path = self.directory / manifest["file"]
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint file missing")
        size = path.stat().st_size
        if size != manifest["size_bytes"]:
            raise CheckpointError(f"{path}: size {size} bytes, manifest says {manifest['size_bytes']}")
        digest = sha256_file(path)
        if digest != manifest["sha256"]:
            raise CheckpointError(f"{path}: sha256 {digest[:12]}… does not match manifest {manifest['sha256'][:12]}…")
        return path

    def remove_stale_files(self) -> list[Path]:
        """Delete what interrupted saves left: temp files, and checkpoint files that have no manifest."""
        manifested = {m.with_suffix(".pt") for m in self.manifests()}
        stale = [
            *self.directory.glob("ckpt-*.tmp"),  # ckpt-N.pt.tmp, ckpt-N.json.tmp
            *self.directory.glob(".ckpt-*.tmp-*"),  # save_checkpoint's own temp file inside a save_fn
            *(p for p in self.directory.glob("ckpt-*.pt") if p not in manifested),
        ]
        for path in sorted(stale):
            log.warning("removing leftover of an interrupted checkpoint save path=%s size_bytes=%d",
                        path, path.stat().st_size)  # fmt: skip
            path.unlink(missing_ok=True)
            self.removed.append(path)
        return stale

    def load_latest(self) -> tuple[Any, dict[str, Any]] | None:
        """The newest checkpoint that verifies, loads and is accepted, or None if there is none.

        First removes the leftovers of interrupted saves (see the module docstring).
        """
        self.remove_stale_files()
        for manifest in self.manifests():
            try:
                path = self.verify(manifest)
                try:
                    loaded = self._load_fn(path)
                except CheckpointError as exc:
                    message = str(exc)  # e.g. the learner's "checkpoint version 2, expected 1"
                    raise CheckpointError(message if str(path) in message else f"{path}: {message}") from exc
                except Exception as exc:
                    raise CheckpointError(f"{path}: failed to load ({type(exc).__name__}: {exc})") from exc
                if self._accept_fn is not None:
                    try:
                        self._accept_fn(*loaded)
                    except ValueError as exc:
                        raise CheckpointError(f"{path}: {exc}") from exc
                return loaded
            except CheckpointError as exc:
                log.error("refusing checkpoint: %s; trying the previous one", exc)
                self.refused.append((manifest, str(exc)))
                self._set_aside(manifest)
        return None

    def _set_aside(self, manifest: Path) -> None:
        """Rename a refused checkpoint (manifest and file) to ``refused-<name>``: kept for inspection, never
        tried or counted again. Left as ``ckpt-*``, it would outrank the checkpoints of the run that starts
        without it (names order by step, and that run counts its steps from its own start), so retention
        would delete each new checkpoint as soon as it was written."""
        for path in (manifest.with_suffix(".pt"), manifest):
            if path.exists():
                aside = path.with_name(f"refused-{path.name}")
                os.replace(path, aside)
                log.warning("set aside refused checkpoint path=%s", aside)
        _fsync_dir(self.directory)


def same_config(expected: Mapping[str, Any]) -> Callable[[Any, dict[str, Any]], None]:
    """An ``accept_fn`` that refuses a learner whose ``config.to_dict()`` differs from ``expected``.

    >>> from types import SimpleNamespace
    >>> learner = SimpleNamespace(config=SimpleNamespace(to_dict=lambda: {"dim": 32, "lr": 0.01}))
    >>> same_config({"dim": 64, "lr": 0.01})(learner, {})
    Traceback (most recent call last):
    ...
    ValueError: trained with another config: dim is 32 in the checkpoint, 64 in this job
    """

    def accept(learner: Any, extra: dict[str, Any]) -> None:
        found = learner.config.to_dict()
        diffs = [
            f"{name} is {found.get(name, '(absent)')!r} in the checkpoint, {expected.get(name, '(absent)')!r} in this job"
            for name in sorted(set(found) | set(expected))
            if found.get(name) != expected.get(name)
        ]
        if diffs:
            raise ValueError(f"trained with another config: {'; '.join(diffs)}")

    return accept


def _default_load(path: Path) -> tuple[Any, dict[str, Any]]:
    from learner.core.learner import SITNLearner

    learner = SITNLearner.load(path)
    return learner, dict(learner.extra)
