"""Checkpoint files: atomic write (temp file + fsync + os.replace) with a sha256 of the payload.

Layout: 8-byte magic ``SITNCKP1``, 32-byte sha256 of the payload, then the payload (``torch.save`` of
a dict). A torn or edited file fails the checksum and raises :class:`stream.errors.CheckpointError`
instead of loading garbage. Checkpoints are trusted files written by this project (they are unpickled).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from stream.errors import CheckpointError

MAGIC = b"SITNCKP1"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: readers see the old file or the complete new one."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # A view of the buffer, not getvalue()'s copy: the payload is held once (tens to hundreds of MB).
    with buffer.getbuffer() as payload, tmp.open("wb") as fh:
        fh.write(MAGIC)
        fh.write(hashlib.sha256(payload).digest())
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with path.open("rb") as fh:  # header and payload read apart: slicing one read would copy the payload
        header = fh.read(len(MAGIC) + 32)
        payload = fh.read()
    if header[: len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{path}: not a SITN checkpoint (magic {header[:8]!r}, expected {MAGIC!r})")
    digest = header[len(MAGIC) :]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path}: checksum mismatch (torn write or corrupted file)")
    state = torch.load(io.BytesIO(payload), weights_only=False)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: payload is {type(state).__name__}, expected dict")
    return state
