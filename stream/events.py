"""Wire schemas: interaction events and embedding updates, versioned, JSON-encoded with orjson.

The embedding-updates topic carries each published :class:`EmbeddingBatch` as records
(:func:`encode_batch`): one per item vector (key ``item:<item_id>``), one per user's query vectors (key
``user:<user_id>``), then one :class:`VersionRecord` (key ``version:<version>``) that closes the version and
carries what is not a vector: the consumed (user, target item) pairs since the previous version (serving's
exclusions, popularity counts and co-occurrence are all counted from them), the ranker to answer with and
the fused weight. Consumed pairs beyond what fits one record (``MAX_CONSUMED_RECORD_BYTES``, well under
Kafka's 1 MB message limit) go ahead of it in :class:`ConsumedRecord` s (key ``consumed:<version>:<n>``). A
reader applies a version when its version record arrives, with the records of that version read before it.

This is the one module that producers and consumers of either message import. It needs no PyTorch,
so ``serving/`` can import it.

>>> event = InteractionEvent(event_id="e1", user_id="u1", item_id="i9", domain="book", timestamp=1_400_000_000)
>>> decode_event(encode_event(event), domains=("movie", "book")) == event
True
>>> decode_event(b'{"schema_version": 1}', domains=("movie", "book"))
Traceback (most recent call last):
...
stream.errors.EventDecodeError: missing_field: 'event_id' is required
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import orjson

from stream.errors import EventDecodeError

EVENT_SCHEMA_VERSION = 1
# 2: a version record closes each published version (consumed pairs, ranker); 1 carried vectors only.
UPDATE_SCHEMA_VERSION = 2
MAX_CONSUMED_RECORD_BYTES = 256 * 1024  # consumed pairs per record, counted as the ids' UTF-8 bytes + 8
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


_REQUIRED_KEYS = frozenset(("event_id", "user_id", "item_id", "domain", "timestamp"))
_REQUIRED = operator.itemgetter("event_id", "user_id", "item_id", "domain", "timestamp")
# The setters of InteractionEvent's slots, by field: an event built through them is the one the constructor
# builds (tests/test_events.py), without the frozen dataclass's object.__setattr__ per field (1.7 us an
# event against 1.0 us).
_SET = {f.name: InteractionEvent.__dict__[f.name].__set__ for f in fields(InteractionEvent)}
assert len(_SET) == 7, "decode_events sets each field of InteractionEvent"


def decode_events(
    raws: Iterable[bytes | None], domains: Collection[str]
) -> tuple[list[InteractionEvent], list[tuple[int, EventDecodeError]]]:
    """Decode many wire messages: the valid events in order, and ``(index, error)`` of the invalid ones.

    The same outcome as :func:`decode_event` on each message, in one pass. A message that passes the
    checks below (each one of :func:`decode_event`'s, none skipped) is built into its event directly;
    any other goes through :func:`decode_event`, which names the reason.

    >>> good = encode_event(InteractionEvent("e1", "u1", "i9", "book", 1_400_000_000))
    >>> events, errors = decode_events([good, b"{", None, good], domains=("movie", "book"))
    >>> [e.event_id for e in events], [(i, e.reason) for i, e in errors]
    (['e1', 'e1'], [(1, 'bad_json'), (2, 'empty')])
    """
    events: list[InteractionEvent] = []
    errors: list[tuple[int, EventDecodeError]] = []
    append = events.append
    loads = orjson.loads
    new = object.__new__
    required = _REQUIRED
    s_event_id, s_user_id, s_item_id, s_domain = _SET["event_id"], _SET["user_id"], _SET["item_id"], _SET["domain"]
    s_timestamp, s_event_type, s_schema_version = _SET["timestamp"], _SET["event_type"], _SET["schema_version"]
    for i, raw in enumerate(raws):
        if raw is not None and len(raw) <= MAX_EVENT_BYTES:
            try:
                payload = loads(raw)
            except orjson.JSONDecodeError:
                payload = None
            if type(payload) is dict and payload.keys() >= _REQUIRED_KEYS:
                event_id, user_id, item_id, domain, timestamp = required(payload)
                version = payload.get("schema_version", EVENT_SCHEMA_VERSION)
                event_type = payload.get("event_type")
                if (
                    type(version) is int and version == EVENT_SCHEMA_VERSION
                    and type(event_id) is str and 0 < len(event_id) <= MAX_ID_CHARS
                    and type(user_id) is str and 0 < len(user_id) <= MAX_ID_CHARS
                    and type(item_id) is str and 0 < len(item_id) <= MAX_ID_CHARS
                    and type(domain) is str and 0 < len(domain) <= MAX_ID_CHARS and domain in domains
                    and type(timestamp) is int and MIN_TIMESTAMP_S <= timestamp < MAX_TIMESTAMP_S
                    and (event_type is None or type(event_type) is str)
                ):
                    event = new(InteractionEvent)
                    s_event_id(event, event_id)
                    s_user_id(event, user_id)
                    s_item_id(event, item_id)
                    s_domain(event, domain)
                    s_timestamp(event, timestamp)
                    s_event_type(event, event_type)
                    s_schema_version(event, EVENT_SCHEMA_VERSION)
                    append(event)
                    continue
        try:
            append(decode_event(raw, domains))
        except EventDecodeError as exc:
            errors.append((i, exc))
    return events, errors


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


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """Closes published version ``version`` on the updates topic: what serving needs besides vectors.

    ``consumed``: the last (user_id, target item_id) pairs of the version, in the order learnt (the ones
    before them in :class:`ConsumedRecord` s), ``consumed_total`` of them in all; ``served_by``,
    ``fused_weight`` and ``fused_weight_cold`` as in :class:`EmbeddingBatch`; ``items`` and ``users``: how many vector records the
    version sent (before this record; fewer survive once the topic is compacted).
    """

    version: int
    full: bool
    consumed: tuple[tuple[str, str], ...]
    consumed_total: int
    served_by: str
    fused_weight: float
    items: int
    users: int
    created_at_s: float
    schema_version: int = UPDATE_SCHEMA_VERSION
    fused_weight_cold: float | None = None  # as in EmbeddingBatch (absent in records written before it: None)


@dataclass(frozen=True, slots=True)
class ConsumedRecord:
    """Consumed (user_id, target item_id) pairs of version ``version`` that precede its version record's."""

    version: int
    consumed: tuple[tuple[str, str], ...]
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


def _encode_vector(kind: str, key: str, version: int, views: int, vector: np.ndarray) -> bytes:
    """``encode_update`` of a float32 vector without a Python float per element: orjson writes each float32
    as its shortest decimal form, which reads back (as a float, then float32) to the same bits, in about a
    fifth of the time and 60 % of the bytes of the float64 expansion (1,000 records of 64 floats:
    20 -> 4 microseconds and 1,313 -> 760 bytes a record).

    >>> v = np.array([0.1, -2.5e-8, 3.0], np.float32)
    >>> raw = _encode_vector("item", "i1", 7, 1, v)
    >>> raw
    b'{"schema_version":2,"kind":"item","key":"i1","version":7,"views":1,"vector":[0.1,-2.5e-8,3.0]}'
    >>> bool((np.array(decode_update(raw).vector, np.float32) == v).all())
    True
    """
    return orjson.dumps(
        {"schema_version": UPDATE_SCHEMA_VERSION, "kind": kind, "key": key, "version": version, "views": views,
         "vector": vector},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def encode_version_record(record: VersionRecord) -> bytes:
    return orjson.dumps(
        {
            "schema_version": record.schema_version,
            "kind": "version",
            "version": record.version,
            "full": record.full,
            "consumed": [list(pair) for pair in record.consumed],
            "consumed_total": record.consumed_total,
            "served_by": record.served_by,
            "fused_weight": record.fused_weight,
            "fused_weight_cold": record.fused_weight_cold,
            "items": record.items,
            "users": record.users,
            "created_at_s": record.created_at_s,
        }
    )


def encode_consumed_record(record: ConsumedRecord) -> bytes:
    return orjson.dumps(
        {
            "schema_version": record.schema_version,
            "kind": "consumed",
            "version": record.version,
            "consumed": [list(pair) for pair in record.consumed],
        }
    )


UpdateRecord = EmbeddingUpdate | ConsumedRecord | VersionRecord


def decode_update_record(raw: bytes) -> UpdateRecord:
    """Decode one record of the updates topic; raise :class:`EventDecodeError` naming the reason.

    A record of another schema version is refused (``bad_schema_version``): its fields cannot be trusted
    to mean what this reader thinks.

    >>> decode_update_record(b'{"schema_version": 1, "kind": "item"}')
    Traceback (most recent call last):
    ...
    stream.errors.EventDecodeError: bad_schema_version: got 1, supported: 2
    """
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EventDecodeError("bad_json", str(exc)) from None
    if not isinstance(payload, dict):
        raise EventDecodeError("wrong_type", f"record must be a JSON object, got {type(payload).__name__}")
    schema_version = payload.get("schema_version")
    if type(schema_version) is not int or schema_version != UPDATE_SCHEMA_VERSION:
        raise EventDecodeError("bad_schema_version", f"got {schema_version!r}, supported: {UPDATE_SCHEMA_VERSION}")
    kind = payload.get("kind")
    if kind not in ("item", "user", "version", "consumed"):
        raise EventDecodeError("bad_value", f"'kind' must be 'item', 'user', 'consumed' or 'version', got {kind!r}")
    try:
        if kind in ("version", "consumed"):
            consumed = tuple((str(u), str(i)) for u, i in payload["consumed"])
            if kind == "consumed":
                return ConsumedRecord(int(payload["version"]), consumed, schema_version)
            return VersionRecord(
                version=int(payload["version"]),
                full=bool(payload["full"]),
                consumed=consumed,
                consumed_total=int(payload["consumed_total"]),
                served_by=str(payload["served_by"]),
                fused_weight=float(payload["fused_weight"]),
                fused_weight_cold=None if payload.get("fused_weight_cold") is None
                else float(payload["fused_weight_cold"]),
                items=int(payload["items"]),
                users=int(payload["users"]),
                created_at_s=float(payload["created_at_s"]),
                schema_version=schema_version,
            )
        return EmbeddingUpdate(
            kind=kind,
            key=str(payload["key"]),
            version=int(payload["version"]),
            views=int(payload["views"]),
            vector=tuple(float(x) for x in payload["vector"]),
            schema_version=schema_version,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise EventDecodeError("bad_update", f"{type(exc).__name__}: {exc}") from None


def decode_update(raw: bytes) -> EmbeddingUpdate:
    """Decode one vector record (``kind`` item or user) of the updates topic."""
    record = decode_update_record(raw)
    if not isinstance(record, EmbeddingUpdate):
        raise EventDecodeError("bad_value", f"expected an item or user record, got a {type(record).__name__}")
    return record


@dataclass(frozen=True)
class ServingBase:
    """The consumed state serving holds once it has applied every version before a full one: what a replica
    that missed versions (a new one, a replacement) starts from before it applies the full version itself.
    The learner keeps it (``learner.online.publisher``); in-cluster only, like ``event_ingest_wall_s``: a
    ``sitn serve`` replica reads every version from the updates topic and builds the same state itself.
    """

    consumed: list[tuple[str, str]]  # (user_id, item_id), as stream.consumed.ConsumedItems.export orders them
    popularity: list[tuple[str, int]]  # (item_id, count): each target item's consumptions


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
    # When each event this version is the first to reflect arrived at the learner (one entry per event): the
    # freshness histograms observe now minus each. In-cluster only: the updates topic does not carry it.
    event_ingest_wall_s: list[float] = field(default_factory=list)
    consumed: list[tuple[str, str]] = field(default_factory=list)  # (user_id, target item_id) since the last batch
    # The ranker /recommend must use from this version on (learner.online.gate.RankerFallback): "model", "fused" (the
    # model's scores fused with item co-occurrence, serving.fused), or a baseline serving computes itself
    # ("popularity", "cooccurrence") while the learnt rankers rank significantly worse.
    served_by: str = "model"
    fused_weight: float = 1.0  # w of the fused score z(model) + w * z(cooc), from this version on
    # w for a user with no target history (co-occurrence then holds only the popularity tie-break); None: fused_weight
    fused_weight_cold: float | None = None
    # A full version's consumed state before its own pairs (ServingBase): a replica that has not applied the
    # version just before this one replaces its consumed sets, popularity and co-occurrence with it first.
    base: ServingBase | None = None


def encode_batch(batch: EmbeddingBatch) -> list[tuple[bytes, bytes]]:
    """The (key, value) records of one published version on the updates topic, in the order to send them:
    its item vectors, its users' query vectors, the consumed pairs that do not fit the version record, then
    the version record that closes it.

    Vectors keep their float32 values exactly (each float32's shortest decimal form, which a reader casting
    to float32 gets back bit for bit), so a reader applies bit-identical vectors.

    >>> b = EmbeddingBatch(3, False, ["i1"], np.ones((1, 2), np.float32), ["u1"],
    ...                    np.zeros((1, 1, 2), np.float32), [], 0.0, consumed=[("u1", "i1")])
    >>> [k for k, _ in encode_batch(b)]
    [b'item:i1', b'user:u1', b'version:3']
    """
    records = []
    items = np.ascontiguousarray(batch.item_vectors, dtype=np.float32)  # (I, D)
    for item_id, vec in zip(batch.item_ids, items, strict=True):  # vec: (D,)
        records.append((f"item:{item_id}".encode(), _encode_vector("item", item_id, batch.version, 1, vec)))
    users = np.ascontiguousarray(batch.user_vectors, dtype=np.float32)  # (U, V, D)
    for user_id, views in zip(batch.user_ids, users, strict=True):  # views: (V, D)
        records.append((f"user:{user_id}".encode(),
                        _encode_vector("user", user_id, batch.version, int(views.shape[0]), views.reshape(-1))))
    chunks: list[list[tuple[str, str]]] = [[]]
    size = 0
    for user_id, item_id in batch.consumed:
        pair_bytes = len(user_id.encode()) + len(item_id.encode()) + 8  # ["u","i"], plus a comma
        if chunks[-1] and size + pair_bytes > MAX_CONSUMED_RECORD_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append((user_id, item_id))
        size += pair_bytes
    for n, chunk in enumerate(chunks[:-1]):
        records.append((f"consumed:{batch.version}:{n}".encode(),
                        encode_consumed_record(ConsumedRecord(batch.version, tuple(chunk)))))
    closing = VersionRecord(
        version=batch.version,
        full=batch.full,
        consumed=tuple(chunks[-1]),
        consumed_total=len(batch.consumed),
        served_by=batch.served_by,
        fused_weight=float(batch.fused_weight),
        fused_weight_cold=None if batch.fused_weight_cold is None else float(batch.fused_weight_cold),
        items=len(batch.item_ids),
        users=len(batch.user_ids),
        created_at_s=float(batch.created_at_s),
    )
    records.append((f"version:{batch.version}".encode(), encode_version_record(closing)))
    return records
