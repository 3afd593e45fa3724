"""Wire schema: round trips and the exact reason for every kind of bad message."""

from __future__ import annotations

import orjson
import pytest

from sitn.errors import EventDecodeError
from stream.events import (
    MAX_EVENT_BYTES,
    EmbeddingUpdate,
    InteractionEvent,
    decode_event,
    decode_update,
    encode_event,
    encode_update,
)

DOMAINS = ("movie", "book")
GOOD = {"schema_version": 1, "event_id": "e", "user_id": "u", "item_id": "i", "domain": "book", "timestamp": 1_400_000_000}


def test_round_trip_with_event_type() -> None:
    event = InteractionEvent("e", "u", "i", "movie", 1_400_000_000, event_type="click")
    assert decode_event(encode_event(event), DOMAINS) == event


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
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
    ],
)
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
