"""Wire schema: round trips and the exact reason for every kind of bad message."""

from __future__ import annotations

import dataclasses

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.errors import EventDecodeError
from stream.events import (
    MAX_EVENT_BYTES,
    MAX_ID_CHARS,
    MAX_TIMESTAMP_S,
    MIN_TIMESTAMP_S,
    EmbeddingUpdate,
    InteractionEvent,
    VersionRecord,
    decode_event,
    decode_events,
    decode_update,
    decode_update_record,
    encode_event,
    encode_update,
    encode_version_record,
)
from tests.test_fuzz_events import FUZZ, _json_bytes, json_values, payloads

DOMAINS = ("movie", "book")
GOOD = {"schema_version": 1, "event_id": "e", "user_id": "u", "item_id": "i", "domain": "book", "timestamp": 1_400_000_000}


def test_round_trip_with_event_type() -> None:
    event = InteractionEvent("e", "u", "i", "movie", 1_400_000_000, event_type="click")
    assert decode_event(encode_event(event), DOMAINS) == event


BAD = [
        (b"{not json", "bad_json"),
        (b"[1, 2]", "wrong_type"),
        (orjson.dumps({**GOOD, "user_id": 7}), "wrong_type"),
        (orjson.dumps({k: v for k, v in GOOD.items() if k != "item_id"}), "missing_field"),
        (orjson.dumps({k: v for k, v in GOOD.items() if k != "timestamp"}), "missing_field"),
        (orjson.dumps({**GOOD, "domain": "music"}), "unknown_domain"),
        (orjson.dumps({**GOOD, "timestamp": "2014"}), "wrong_type"),
        (orjson.dumps({**GOOD, "timestamp": True}), "wrong_type"),
        (orjson.dumps({**GOOD, "timestamp": 5}), "bad_timestamp"),
        (orjson.dumps({**GOOD, "schema_version": 2}), "bad_schema_version"),
        (orjson.dumps({**GOOD, "user_id": ""}), "bad_value"),
        (orjson.dumps({**GOOD, "event_type": 3}), "wrong_type"),
        (b"x" * (MAX_EVENT_BYTES + 1), "oversize"),
        (None, "empty"),
]


@pytest.mark.parametrize(("raw", "reason"), BAD)
def test_bad_messages_have_reasons(raw: bytes | None, reason: str) -> None:
    with pytest.raises(EventDecodeError) as err:
        decode_event(raw, DOMAINS)
    assert err.value.reason == reason


def test_update_round_trip_and_error() -> None:
    update = EmbeddingUpdate("user", "u1", 3, 2, (0.5, -1.0, 0.25, 2.0))
    assert decode_update(encode_update(update)) == update
    with pytest.raises(EventDecodeError) as err:
        decode_update(b'{"schema_version": 2, "kind": "song"}')
    assert err.value.reason == "bad_value"
    with pytest.raises(EventDecodeError) as err:
        decode_update(b'{"kind": "item"}')
    assert err.value.reason == "bad_schema_version"



def test_version_records_carry_both_fused_weights_and_older_ones_read_as_one() -> None:
    record = VersionRecord(version=4, full=False, consumed=(("u", "b"),), consumed_total=1, served_by="fused",
                           fused_weight=2.0, items=1, users=1, created_at_s=5.0, fused_weight_cold=0.0)
    assert decode_update_record(encode_version_record(record)) == record
    payload = orjson.loads(encode_version_record(record))
    del payload["fused_weight_cold"]  # written before the cold weight existed: serving uses fused_weight for all
    assert decode_update_record(orjson.dumps(payload)) == dataclasses.replace(record, fused_weight_cold=None)


# --- decode_events: decode_event on each message, in one pass --------------------------------------------


def _one_by_one(raws: list[bytes | None]) -> tuple[list[InteractionEvent], list[tuple[int, str, str]]]:
    events, errors = [], []
    for i, raw in enumerate(raws):
        try:
            events.append(decode_event(raw, DOMAINS))
        except EventDecodeError as exc:
            errors.append((i, exc.reason, exc.detail))
    return events, errors


def _batched(raws: list[bytes | None]) -> tuple[list[InteractionEvent], list[tuple[int, str, str]]]:
    events, errors = decode_events(raws, DOMAINS)
    return events, [(i, exc.reason, exc.detail) for i, exc in errors]


EDGES = [
    {**GOOD, "event_id": "e" * MAX_ID_CHARS},  # accepted
    {**GOOD, "event_id": "e" * (MAX_ID_CHARS + 1)},
    {**GOOD, "domain": ""},
    {**GOOD, "domain": ["book"]},
    {**GOOD, "timestamp": MIN_TIMESTAMP_S},  # accepted
    {**GOOD, "timestamp": MIN_TIMESTAMP_S - 1},
    {**GOOD, "timestamp": MAX_TIMESTAMP_S - 1},  # accepted
    {**GOOD, "timestamp": MAX_TIMESTAMP_S},
    {**GOOD, "timestamp": 1_400_000_000.0},
    {**GOOD, "schema_version": True},
    {**GOOD, "schema_version": 1.0},
    {k: v for k, v in GOOD.items() if k != "schema_version"},  # accepted: version 1 by default
    {**GOOD, "schema_version": None},
    {**GOOD, "event_type": None},  # accepted
    {**GOOD, "event_type": "click", "extra": [1, 2]},  # accepted
    {**GOOD, "event_type": ["click"]},
]
ACCEPTED_EDGES = 6


def test_decode_events_agrees_with_decode_event_at_the_edges() -> None:
    raws = [raw for raw, _ in BAD] + [orjson.dumps(p) for p in EDGES] + [b'{"event_id": "a", "event_id": 3}']
    raws += [encode_event(InteractionEvent("e", "u", "i", "movie", 1_400_000_000, "view"))]
    events, errors = _batched(raws)
    assert (events, errors) == _one_by_one(raws)
    assert [reason for _, reason, _ in errors[: len(BAD)]] == [reason for _, reason in BAD]
    assert len(events) == ACCEPTED_EDGES + 1


@settings(FUZZ, max_examples=1500)
@given(raws=st.lists(
    payloads().map(orjson.dumps) | json_values.map(_json_bytes) | st.binary(max_size=48) | st.none(), max_size=12
))
def test_decode_events_agrees_with_decode_event_on_any_messages(raws: list[bytes | None]) -> None:
    assert _batched(raws) == _one_by_one(raws)


def test_decoded_events_are_ordinary_frozen_events() -> None:
    """Events built through the slots (decode_events) are the constructor's: equal, same hash, frozen."""
    event = InteractionEvent("e", "u", "i", "book", 1_400_000_000, "click")
    [decoded], errors = decode_events([encode_event(event)], DOMAINS)
    assert errors == [] and type(decoded) is InteractionEvent
    assert decoded == event and hash(decoded) == hash(event) and repr(decoded) == repr(event)
    assert dataclasses.astuple(decoded) == ("e", "u", "i", "book", 1_400_000_000, "click", 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        decoded.user_id = "v"  # type: ignore[misc]
