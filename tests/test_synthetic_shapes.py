"""The generator's other shapes: the timestamp column in every form the readers accept (read back with
``--time-unit auto`` to the same events), per-user ordinal positions, and a fixed population with a given
number of events per user."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sitn.cli import main as sitn_main
from stream.dataset import load_events
from stream.synthetic import SyntheticConfig, per_user_positions, write_csv

CONFIG = SyntheticConfig(events=3_000, n_users=40, n_source_items=300, n_target_items=100, target_share=0.2,
                         events_per_second=0.5, seed=4, chunk_events=1_024)


def read(path: Path) -> list[tuple[str, str, str, int]]:
    return [(e.user_id, e.item_id, e.domain, e.timestamp) for e in load_events(path, "movie", "book",
                                                                                 time_unit="auto").events]


@pytest.mark.parametrize("unit", ["ms", "iso"])
def test_clock_forms_read_back_to_the_seconds_file(tmp_path: Path, unit: str) -> None:
    write_csv(tmp_path / "s.csv", CONFIG)
    assert write_csv(tmp_path / f"{unit}.csv", CONFIG, time_unit=unit) == 3_000
    log = load_events(tmp_path / f"{unit}.csv", "movie", "book", time_unit="auto")
    assert log.time is not None and (log.time.unit, log.time.fitting) == (unit, 3_000)
    assert read(tmp_path / f"{unit}.csv") == read(tmp_path / "s.csv")


def test_ordinal_positions_number_each_users_events_from_zero(tmp_path: Path) -> None:
    path = tmp_path / "ordinal.csv"
    write_csv(path, CONFIG, time_unit="ordinal")  # three chunks: positions carry over from chunk to chunk
    rows = [line.split(",") for line in path.read_text().splitlines()[1:]]
    seen: dict[str, int] = {}
    for position, user, _item, _domain in rows:
        assert int(position) == seen.get(user, 0), f"{user}: position {position} after {seen.get(user)}"
        seen[user] = int(position) + 1
    assert sum(seen.values()) == 3_000
    # Read back with auto: detected as ordinal, and every user's events in the order of the seconds file.
    write_csv(tmp_path / "s.csv", CONFIG)
    by_user_s: dict[str, list[str]] = {}
    for user, item, _d, _t in read(tmp_path / "s.csv"):
        by_user_s.setdefault(user, []).append(item)
    by_user_ordinal: dict[str, list[str]] = {}
    for user, item, _d, _t in read(path):
        by_user_ordinal.setdefault(user, []).append(item)
    assert by_user_ordinal == by_user_s


def test_per_user_positions_match_a_plain_loop() -> None:
    rng = np.random.default_rng(0)
    counts = np.zeros(3, dtype=np.int64)
    expected: dict[int, int] = {}
    for _ in range(5):
        user = rng.integers(0, 7, size=50)
        positions, counts = per_user_positions(user, counts)
        for u, p in zip(user.tolist(), positions.tolist(), strict=True):
            assert p == expected.get(u, 0)
            expected[u] = p + 1
    assert counts.tolist() == [expected.get(u, 0) for u in range(len(counts))]


def test_events_per_user_makes_a_fixed_population(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "big.csv"
    assert sitn_main(["generate", "--output", str(out), "--users", "20", "--events-per-user", "60",
                      "--source-items", "5000", "--target-items", "1000", "--target-share", "0.2",
                      "--time-unit", "ordinal", "--seed", "2"]) == 0
    assert "wrote 1,200 events (movie -> book, seed 2, no drift), ordinal timestamps to" in capsys.readouterr().out
    expected = tmp_path / "lib.csv"
    write_csv(expected, SyntheticConfig(events=1_200, n_users=20, new_user_share=0.0, n_source_items=5_000,
                                        n_target_items=1_000, target_share=0.2, seed=2), time_unit="ordinal")
    assert out.read_bytes() == expected.read_bytes()
    users = {line.split(",")[1] for line in out.read_text().splitlines()[1:]}
    assert users == {f"u{u}" for u in range(20)}  # nobody new arrives
    with pytest.raises(SystemExit, match=r"give --events or --events-per-user, not both; got 100 and 60"):
        sitn_main(["generate", "--output", str(out), "--events", "100", "--events-per-user", "60"])
    with pytest.raises(SystemExit, match=r"--events-per-user needs --new-user-share 0 \(a fixed population\), got 0.1"):
        sitn_main(["generate", "--output", str(out), "--events-per-user", "60", "--new-user-share", "0.1"])
    with pytest.raises(ValueError, match=r"time_unit must be one of \('s', 'ms', 'iso', 'ordinal'\), got 'auto'"):
        write_csv(expected, CONFIG, time_unit="auto")
