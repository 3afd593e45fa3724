"""Property-based fuzzing of the event wire decoder (``stream.events.decode_event``).

Three properties, each checked against thousands of generated inputs:

1. Any bytes at all (and JSON-shaped bytes, which reach deeper into the decoder) decode to a valid
   :class:`InteractionEvent` or raise :class:`EventDecodeError` with a known, non-empty ``reason`` and a
   non-empty detail. No other exception ever escapes: a bad message is data, not a crash.
2. ``encode_event`` then ``decode_event`` gives back the same event for every valid event (unicode ids of
   1..256 characters, timestamps at both edges of the allowed range, with and without ``event_type``),
   or ``oversize`` when the encoded event is longer than ``MAX_EVENT_BYTES``.
3. JSON objects whose fields are each missing, valid, or of a random type, plus random extra fields, are
   accepted or rejected exactly as :func:`reference_decode` -- a slow, obviously-correct reading of the
   schema written independently of the decoder -- says, with the same reason.

Fuzzing volume (``EXAMPLES`` below, fixed seed via ``derandomize``): 4,000 raw byte strings + 1,000 JSON
values (each decoded twice, intact and corrupted) + 2,000 round trips + 3,000 schema objects = 10,000
generated inputs per run; the module takes about 25 s on the shared 2-core machine. ``pytest
--hypothesis-show-statistics`` shows how the schema objects split between acceptance and each reason.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stream.errors import EventDecodeError
from stream.events import (
    EVENT_SCHEMA_VERSION,
    MAX_EVENT_BYTES,
    MAX_ID_CHARS,
    MAX_TIMESTAMP_S,
    MIN_TIMESTAMP_S,
    InteractionEvent,
    decode_event,
    encode_event,
)

DOMAINS = ("movie", "book")
REASONS = frozenset(
    {
        "empty",
        "oversize",
        "bad_json",
        "wrong_type",
        "bad_schema_version",
        "missing_field",
        "bad_value",
        "unknown_domain",
        "bad_timestamp",
    }
)
EXAMPLES = {"raw_bytes": 4000, "json_values": 1000, "round_trip": 2000, "schema": 3000}
FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def decode_or_reason(raw: bytes | None) -> InteractionEvent | str:
    """The decoded event, or the reason of the ``EventDecodeError``; any other exception propagates."""
    try:
        return decode_event(raw, DOMAINS)
    except EventDecodeError as exc:
        assert exc.reason in REASONS, exc.reason
        assert exc.detail, f"empty detail for reason {exc.reason!r}"
        assert str(exc) == f"{exc.reason}: {exc.detail}"
        return exc.reason


def assert_valid_event(event: InteractionEvent) -> None:
    for name in ("event_id", "user_id", "item_id"):
        value = getattr(event, name)
        assert isinstance(value, str) and 1 <= len(value) <= MAX_ID_CHARS, (name, value)
    assert event.domain in DOMAINS
    assert type(event.timestamp) is int and MIN_TIMESTAMP_S <= event.timestamp < MAX_TIMESTAMP_S
    assert event.event_type is None or isinstance(event.event_type, str)
    assert event.schema_version == EVENT_SCHEMA_VERSION


# --- 1. any bytes ------------------------------------------------------------------------------------

# JSON values of every type, nested; floats include huge and tiny magnitudes (orjson refuses NaN/inf).
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=12,
)


def _json_bytes(value: Any) -> bytes:
    # orjson refuses integers beyond 64 bits; the stdlib-style text form is what a foreign producer sends.
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return repr(value).encode()


@settings(FUZZ, max_examples=EXAMPLES["raw_bytes"])
@given(
    raw=st.binary(max_size=64)
    | st.sampled_from([b"", b"{}", b"[]", b"null", b"\x00", b"{" * 2000, b"[" * 4096, b'"\xff"']),
    pad_to=st.none() | st.integers(MAX_EVENT_BYTES - 2, MAX_EVENT_BYTES + 2),
)
def test_any_bytes_decode_or_raise_event_decode_error(raw: bytes, pad_to: int | None) -> None:
    if pad_to is not None:  # near the size limit; drawing 4 KiB of random bytes is slow, repeating is not
        raw = (raw or b" ") * (pad_to // max(len(raw), 1) + 1)
        raw = raw[:pad_to]
    result = decode_or_reason(raw)
    if isinstance(result, InteractionEvent):
        assert_valid_event(result)
    elif len(raw) > MAX_EVENT_BYTES:
        assert result == "oversize"


@settings(FUZZ, max_examples=EXAMPLES["json_values"])
@given(value=json_values, noise=st.binary(max_size=3), where=st.integers(min_value=0))
def test_json_values_and_corrupted_json_decode_or_raise(value: Any, noise: bytes, where: int) -> None:
    raw = _json_bytes(value)
    result = decode_or_reason(raw)
    if not isinstance(value, dict):
        assert result in ("wrong_type", "bad_json"), result  # bad_json: the >64-bit integer text form
    else:
        assert not isinstance(result, InteractionEvent) or result.event_id == value["event_id"]
    cut = where % (len(raw) + 1)
    corrupted = raw[:cut] + noise + raw[cut:]  # a byte flip or insertion anywhere in the message
    result = decode_or_reason(corrupted)
    if isinstance(result, InteractionEvent):
        assert_valid_event(result)


def test_none_and_oversize_have_their_reasons() -> None:
    assert decode_or_reason(None) == "empty"
    assert decode_or_reason(b" " * (MAX_EVENT_BYTES + 1)) == "oversize"
    assert decode_or_reason(b"[" * MAX_EVENT_BYTES) == "bad_json"  # deeper than orjson's recursion limit


# --- 2. round trips ----------------------------------------------------------------------------------

# Every code point except surrogates (which UTF-8, and so JSON over the wire, cannot carry).
ids = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=MAX_ID_CHARS)
timestamps = st.sampled_from([MIN_TIMESTAMP_S, MIN_TIMESTAMP_S + 1, MAX_TIMESTAMP_S - 1]) | st.integers(
    MIN_TIMESTAMP_S, MAX_TIMESTAMP_S - 1
)
events = st.builds(
    InteractionEvent,
    event_id=ids,
    user_id=ids,
    item_id=ids,
    domain=st.sampled_from(DOMAINS),
    timestamp=timestamps,
    event_type=st.none() | st.text(max_size=40),
)


@settings(FUZZ, max_examples=EXAMPLES["round_trip"])
@given(event=events)
def test_encode_then_decode_round_trips(event: InteractionEvent) -> None:
    raw = encode_event(event)
    if len(raw) <= MAX_EVENT_BYTES:
        assert decode_event(raw, DOMAINS) == event
    else:  # e.g. three 256-character ids of 4-byte characters: 3 KiB of UTF-8 plus the rest
        assert decode_or_reason(raw) == "oversize"


def test_round_trip_at_the_edges() -> None:
    longest = "\U0010fffd" * MAX_ID_CHARS  # 256 characters, 1 KiB of UTF-8: still fits once
    for timestamp in (MIN_TIMESTAMP_S, MAX_TIMESTAMP_S - 1):
        event = InteractionEvent("é", longest, '\x00\n\r"\\', "movie", timestamp, event_type="")
        assert decode_event(encode_event(event), DOMAINS) == event
    assert decode_or_reason(orjson.dumps({**_good(), "timestamp": MAX_TIMESTAMP_S})) == "bad_timestamp"
    assert decode_or_reason(orjson.dumps({**_good(), "timestamp": MIN_TIMESTAMP_S - 1})) == "bad_timestamp"
    assert decode_or_reason(orjson.dumps({**_good(), "user_id": "x" * (MAX_ID_CHARS + 1)})) == "bad_value"


# --- 3. the schema, field by field -------------------------------------------------------------------


def _good() -> dict[str, Any]:
    return {
        "schema_version": EVENT_SCHEMA_VERSION,
        "event_id": "e1",
        "user_id": "u1",
        "item_id": "i1",
        "domain": "book",
        "timestamp": 1_400_000_000,
    }


def reference_decode(payload: dict[str, Any]) -> str | None:
    """The schema, read slowly: the reason ``payload`` must be rejected with, or None if it is valid.

    Fields are checked in the documented order: schema_version, the three ids, domain, timestamp,
    event_type. Unknown fields are ignored (a newer producer may add some).
    """
    version = payload.get("schema_version", EVENT_SCHEMA_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version != EVENT_SCHEMA_VERSION:
        return "bad_schema_version"
    for name in ("event_id", "user_id", "item_id", "domain"):
        if name not in payload:
            return "missing_field"
        if not isinstance(payload[name], str):
            return "wrong_type"
        if not 1 <= len(payload[name]) <= MAX_ID_CHARS:
            return "bad_value"
    if payload["domain"] not in DOMAINS:
        return "unknown_domain"
    if "timestamp" not in payload:
        return "missing_field"
    timestamp = payload["timestamp"]
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        return "wrong_type"
    if timestamp < MIN_TIMESTAMP_S or timestamp >= MAX_TIMESTAMP_S:
        return "bad_timestamp"
    event_type = payload.get("event_type")
    if event_type is not None and not isinstance(event_type, str):
        return "wrong_type"
    return None


MISSING = object()
int64 = st.integers(-(2**63), 2**63 - 1)  # what orjson.dumps can write; 2**64 - 1 too, as unsigned
any_type = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
    | st.lists(int64, max_size=2)
    | st.dictionaries(st.text(max_size=3), int64, max_size=2)
)
# Short ids plus the two lengths at the bound: drawing 256-character ids here would dominate the run time.
short_ids = st.text(min_size=1, max_size=8) | st.sampled_from(["x" * MAX_ID_CHARS, "ü" * (MAX_ID_CHARS + 1)])
field_values = {
    "schema_version": st.just(MISSING)
    | st.just(EVENT_SCHEMA_VERSION)
    | st.sampled_from([0, 2, 1.0, "1"])
    | any_type,
    "event_id": st.just(MISSING) | short_ids | any_type,
    "user_id": st.just(MISSING) | short_ids | any_type,
    "item_id": st.just(MISSING) | short_ids | any_type,
    "domain": st.just(MISSING) | st.sampled_from([*DOMAINS, "music", "Book", ""]) | any_type,
    "timestamp": st.just(MISSING)
    | timestamps
    | st.sampled_from([MIN_TIMESTAMP_S - 1, MAX_TIMESTAMP_S, float(MIN_TIMESTAMP_S), 0, -1])
    | any_type,
    "event_type": st.just(MISSING) | st.none() | st.text(max_size=10) | any_type,
}


extra_fields = st.dictionaries(
    st.text(max_size=8).filter(lambda k: k not in field_values), any_type, max_size=3
)
keep_good = st.sampled_from([True, True, True, False])


@st.composite
def payloads(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly-valid objects with random wrong, missing and extra fields.

    Each field keeps its good value 3 times in 4 (``st.just(good) | values`` would be flattened into one
    choice among many), so every check of the schema is reached, acceptance included.
    """
    payload = {}
    good = _good()
    for name, values in field_values.items():
        value = good.get(name, MISSING) if draw(keep_good) else draw(values)
        if value is not MISSING:
            payload[name] = value
    return {**payload, **draw(extra_fields)}


@settings(FUZZ, max_examples=EXAMPLES["schema"])
@given(payload=payloads())
def test_objects_are_accepted_or_rejected_exactly_per_the_schema(payload: dict[str, Any]) -> None:
    raw = orjson.dumps(payload)
    expected = "oversize" if len(raw) > MAX_EVENT_BYTES else reference_decode(payload)
    result = decode_or_reason(raw)
    event(f"expected={expected or 'accepted'}")
    if expected is None:
        assert result == InteractionEvent(
            payload["event_id"],
            payload["user_id"],
            payload["item_id"],
            payload["domain"],
            payload["timestamp"],
            payload.get("event_type"),
        )
    else:
        assert result == expected, (payload, result)


def test_reference_agrees_on_hand_picked_cases() -> None:
    """The oracle itself, on cases whose answer is obvious (so a wrong oracle cannot pass silently)."""
    good = _good()
    assert reference_decode(good) is None
    assert reference_decode({**good, "extra": [1, 2]}) is None
    assert reference_decode({**good, "timestamp": True}) == "wrong_type"
    assert reference_decode({**good, "schema_version": True}) == "bad_schema_version"
    assert reference_decode({**good, "timestamp": math.pi}) == "wrong_type"
    assert reference_decode({k: v for k, v in good.items() if k != "schema_version"}) is None
