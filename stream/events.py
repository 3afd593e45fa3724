"""Wire schemas: interaction events and embedding updates, versioned, JSON-encoded with orjson.

This is the one module that producers and consumers of either message import. It needs no PyTorch,
so ``serving/`` can import it.

>>> event = InteractionEvent(event_id="e1", user_id="u1", item_id="i9", domain="book", timestamp=1_400_000_000)
>>> decode_event(encode_event(event), domains=("movie", "book")) == event
True
>>> decode_event(b'{"schema_version": 1}', domains=("movie", "book"))
Traceback (most recent call last):
...
sitn.errors.EventDecodeError: missing_field: 'event_id' is required
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from sitn.errors import EventDecodeError

EVENT_SCHEMA_VERSION = 1
UPDATE_SCHEMA_VERSION = 1
MAX_EVENT_BYTES = 4096
MAX_ID_CHARS = 256
# Event time must fall in [1990-01-01, 2100-01-01): the shipped data starts in 1997.
MIN_TIMESTAMP_S = 631_152_000
MAX_TIMESTAMP_S = 4_102_444_800


@dataclass(frozen=True, slots=True)
class InteractionEvent:
    """One user-item interaction. ``timestamp`` is event time in unix seconds."""

    event_id: str
    user_id: str
    item_id: str
    domain: str
    timestamp: int
    event_type: str | None = None
    schema_version: int = EVENT_SCHEMA_VERSION


def event_to_dict(event: InteractionEvent) -> dict[str, Any]:
    out: dict[str, Any] = {
        "schema_version": event.schema_version,
        "event_id": event.event_id,
        "user_id": event.user_id,
        "item_id": event.item_id,
        "domain": event.domain,
        "timestamp": event.timestamp,
    }
    if event.event_type is not None:
        out["event_type"] = event.event_type
    return out


def encode_event(event: InteractionEvent) -> bytes:
    return orjson.dumps(event_to_dict(event))


def _require_str(payload: dict[str, Any], field: str) -> str:
    if field not in payload:
        raise EventDecodeError("missing_field", f"{field!r} is required")
    value = payload[field]
    if not isinstance(value, str):
        raise EventDecodeError("wrong_type", f"{field!r} must be a string, got {type(value).__name__}")
    if not value or len(value) > MAX_ID_CHARS:
        raise EventDecodeError("bad_value", f"{field!r} must have 1..{MAX_ID_CHARS} characters, got {len(value)}")
    return value


def decode_event(raw: bytes | None, domains: Collection[str]) -> InteractionEvent:
    """Decode and validate one wire message; raise :class:`EventDecodeError` naming the reason."""
    if raw is None:
        raise EventDecodeError("empty", "message has no value")
    if len(raw) > MAX_EVENT_BYTES:
        raise EventDecodeError("oversize", f"{len(raw)} bytes, at most {MAX_EVENT_BYTES} allowed")
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EventDecodeError("bad_json", str(exc)) from None
    if not isinstance(payload, dict):
        raise EventDecodeError("wrong_type", f"message must be a JSON object, got {type(payload).__name__}")
    version = payload.get("schema_version", EVENT_SCHEMA_VERSION)
    if type(version) is not int or version != EVENT_SCHEMA_VERSION:
        raise EventDecodeError("bad_schema_version", f"got {version!r}, supported: {EVENT_SCHEMA_VERSION}")
    event_id = _require_str(payload, "event_id")
    user_id = _require_str(payload, "user_id")
    item_id = _require_str(payload, "item_id")
    domain = _require_str(payload, "domain")
    if domain not in domains:
        raise EventDecodeError("unknown_domain", f"got {domain!r}, allowed: {sorted(domains)}")
    if "timestamp" not in payload:
        raise EventDecodeError("missing_field", "'timestamp' is required")
    timestamp = payload["timestamp"]
    if type(timestamp) is not int:
        raise EventDecodeError("wrong_type", f"'timestamp' must be an integer, got {type(timestamp).__name__}")
    if not MIN_TIMESTAMP_S <= timestamp < MAX_TIMESTAMP_S:
        raise EventDecodeError(
            "bad_timestamp", f"got {timestamp}, allowed [{MIN_TIMESTAMP_S}, {MAX_TIMESTAMP_S}) unix seconds"
        )
    event_type = payload.get("event_type")
    if event_type is not None and not isinstance(event_type, str):
        raise EventDecodeError("wrong_type", f"'event_type' must be a string, got {type(event_type).__name__}")
    return InteractionEvent(event_id, user_id, item_id, domain, timestamp, event_type)


@dataclass(frozen=True, slots=True)
class EmbeddingUpdate:
    """One published vector: a target item (``kind='item'``, V=1) or a user's V query vectors.

    ``vector`` is a flat list of ``views * dim`` floats, views major.
    """

    kind: str  # "item" | "user"
    key: str  # item_id or user_id
    version: int
    views: int
    vector: tuple[float, ...]
    schema_version: int = UPDATE_SCHEMA_VERSION


def encode_update(update: EmbeddingUpdate) -> bytes:
    return orjson.dumps(
        {
            "schema_version": update.schema_version,
            "kind": update.kind,
            "key": update.key,
            "version": update.version,
            "views": update.views,
            "vector": list(update.vector),
        }
    )


def decode_update(raw: bytes) -> EmbeddingUpdate:
    try:
        payload = orjson.loads(raw)
        kind = payload["kind"]
        if kind not in ("item", "user"):
            raise EventDecodeError("bad_value", f"'kind' must be 'item' or 'user', got {kind!r}")
        return EmbeddingUpdate(
            kind=kind,
            key=str(payload["key"]),
            version=int(payload["version"]),
            views=int(payload["views"]),
            vector=tuple(float(x) for x in payload["vector"]),
            schema_version=int(payload.get("schema_version", UPDATE_SCHEMA_VERSION)),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, EventDecodeError):
            raise
        raise EventDecodeError("bad_update", f"{type(exc).__name__}: {exc}") from None


@dataclass(frozen=True)
class EmbeddingBatch:
    """One published version, the in-cluster form of many :class:`EmbeddingUpdate` s.

    ``item_vectors`` is (N, D); ``user_vectors`` is (U, V, D). ``full`` marks a complete snapshot of all
    items and users (a new serving replica can start from it); otherwise it is a delta.
    """

    version: int
    full: bool
    item_ids: list[str]
    item_vectors: np.ndarray
    user_ids: list[str]
    user_vectors: np.ndarray
    popularity: list[str]  # target item ids, most popular first (the fallback path)
    created_at_s: float  # wall clock when the batch was built
    ingest_wall_s: dict[str, float] = field(default_factory=dict)  # user_id -> when its oldest unpublished event arrived
    consumed: list[tuple[str, str]] = field(default_factory=list)  # (user_id, target item_id) since the last batch
    # The ranker /recommend must use from this version on (learner.gate.RankerFallback): "model", "fused" (the
    # model's scores fused with item co-occurrence, serving.fused), or a baseline serving computes itself
    # ("popularity", "cooccurrence") while the learnt rankers rank significantly worse.
    served_by: str = "model"
    fused_weight: float = 1.0  # w of the fused score z(model) + w * z(cooc), from this version on
