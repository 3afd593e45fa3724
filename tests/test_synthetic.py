"""The seeded synthetic stream: determinism, the CSV format, growing users, each drift kind in the data,
the shared interest between domains and unique (user, item) pairs."""

from __future__ import annotations

import hashlib
import itertools
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from sitn.cli import main as sitn_main
from stream.dataset import load_events
from stream.synthetic import CSV_HEADER, EventChunk, SyntheticConfig, SyntheticStream, write_csv


def concat(stream: SyntheticStream) -> EventChunk:
    chunks = list(stream.chunks())
    fields = {
        name: np.concatenate([getattr(c, name) for c in chunks])
        for name in ("timestamp", "user", "is_target", "item", "cluster", "noise")
    }
    return EventChunk(start=0, domains=chunks[0].domains, **fields)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    config = SyntheticConfig(events=150_000, seed=11, drift="popularity", drift_at_fraction=0.5)
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    assert write_csv(a, config) == 150_000
    write_csv(b, config)
    write_csv(c, config.replace(seed=12))
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert a.read_text().count("\n") == 150_001


def test_csv_round_trips_through_load_events(tmp_path: Path) -> None:
    config = SyntheticConfig(events=3_000, n_users=50, source="video", target="game", events_per_second=2.0, seed=3)
    path = tmp_path / "synthetic.csv"
    write_csv(path, config)
    assert path.read_text().startswith(CSV_HEADER)
    loaded = load_events(path, "video", "game").events
    made = list(SyntheticStream(config).events())
    assert len(loaded) == len(made) == 3_000
    assert [(e.user_id, e.item_id, e.domain, e.timestamp) for e in loaded] == [
        (e.user_id, e.item_id, e.domain, e.timestamp) for e in made
    ]
    assert loaded[0].event_id == "synthetic:2" and made[0].event_id == "syn:0"
    assert made[-1].timestamp == 1_500_000_000 + 2_999 // 2  # two events per second of event time
    assert {e.domain for e in made} == {"video", "game"}
    assert made[0].item_id.startswith(made[0].domain)


def test_a_shorter_run_is_a_prefix_and_the_endless_stream_agrees() -> None:
    config = SyntheticConfig(events=70_000, seed=5, chunk_events=4_096)
    full = [(e.user_id, e.item_id, e.domain, e.timestamp) for e in SyntheticStream(config).events()]
    short = [(e.user_id, e.item_id) for e in SyntheticStream(config.replace(events=10_000)).events()]
    endless = SyntheticStream(config.replace(events=None)).events()
    assert short == [(u, i) for u, i, _, _ in full[:10_000]]
    assert [(e.user_id, e.item_id, e.domain, e.timestamp) for e in itertools.islice(endless, 70_000)] == full


def test_users_keep_arriving_and_items_follow_the_users_clusters() -> None:
    config = SyntheticConfig(events=100_000, n_users=1_000, new_user_share=0.02, noise=0.1, seed=1)
    stream = SyntheticStream(config)
    ev = concat(stream)
    first_seen = np.unique(ev.user, return_index=True)[1]  # (users,) index of each user's first event
    n_new = np.unique(ev.user[ev.user >= config.n_users]).size
    assert n_new == 2_056  # ~ 2% of 100k events
    assert ev.user.max() == config.n_users - 1 + n_new  # every new user is the next id
    late = np.sort(first_seen)[-500:]
    assert late.min() > 70_000  # new users are still appearing near the end
    primary, secondary = stream.user_clusters(ev.user)
    assert np.all((ev.cluster == primary) | (ev.cluster == secondary))
    clusters = np.where(ev.is_target, stream.item_clusters(True)[ev.item], stream.item_clusters(False)[ev.item])
    assert np.all(clusters[~ev.noise] == ev.cluster[~ev.noise])  # every non-noise item is from its cluster
    assert ev.noise.mean() == pytest.approx(0.1, abs=0.005)
    assert (ev.cluster == primary).mean() == pytest.approx(0.8 + 0.2 * np.mean(primary == secondary), abs=0.01)
    assert np.all(np.diff(ev.timestamp) >= 0)


def test_domain_mix_drift_moves_the_target_share_at_the_injection_point() -> None:
    config = SyntheticConfig(events=200_000, target_share=0.3, drift="domain_mix", drift_at_event=120_000,
                             drift_target_share=0.7, seed=2)
    ev = concat(SyntheticStream(config))
    before, after = ev.is_target[:120_000], ev.is_target[120_000:]
    assert int(before.sum()) == 35_880 and int(after.sum()) == 56_095
    assert before.mean() == pytest.approx(0.3, abs=0.005)
    assert after.mean() == pytest.approx(0.7, abs=0.005)
    plain = concat(SyntheticStream(config.replace(drift=None, drift_at_event=None)))
    assert np.array_equal(plain.is_target[:120_000], before)  # nothing changes before the drift


def test_interest_swap_moves_every_users_items_to_another_cluster() -> None:
    config = SyntheticConfig(events=100_000, drift="interest_swap", drift_at_fraction=0.5, noise=0.0, seed=4)
    stream = SyntheticStream(config)
    ev = concat(stream)
    assert sorted(stream.swap.tolist()) == list(range(config.n_clusters))
    assert np.all(stream.swap != np.arange(config.n_clusters))  # no cluster keeps its items
    primary, secondary = stream.user_clusters(ev.user)
    own = (ev.cluster == primary) | (ev.cluster == secondary)
    assert own[:50_000].all()
    swapped_back = np.argsort(stream.swap)[ev.cluster[50_000:]]  # undo the swap
    assert np.all((swapped_back == primary[50_000:]) | (swapped_back == secondary[50_000:]))
    assert own[50_000:].mean() == pytest.approx(0.06738, abs=1e-5)  # only where swap[c] is the other interest
    # The marginal distributions do not move: the swap is invisible without a model of users.
    assert ev.is_target[:50_000].mean() == pytest.approx(ev.is_target[50_000:].mean(), abs=0.01)


def test_popularity_drift_redraws_the_most_popular_items() -> None:
    config = SyntheticConfig(events=200_000, drift="popularity", drift_at_event=100_000, seed=6)
    stream = SyntheticStream(config)
    ev = concat(stream)
    movie = ~ev.is_target

    def top(part: slice) -> set[int]:
        items, counts = np.unique(ev.item[part][movie[part]], return_counts=True)
        return set(items[np.argsort(-counts, kind="stable")[:20]].tolist())

    assert len(top(slice(0, 50_000)) & top(slice(50_000, 100_000))) == 19  # stationary: the 20th is a near-tie
    assert len(top(slice(0, 100_000)) & top(slice(100_000, 200_000))) == 1  # drifted: a new top 20
    clusters = stream.item_clusters(False)
    assert np.all(clusters[ev.item[movie & ~ev.noise]] == ev.cluster[movie & ~ev.noise])  # membership kept


def test_memory_stays_flat_on_an_endless_stream() -> None:
    chunks = SyntheticStream(SyntheticConfig(events=None, new_user_share=0.05, seed=9)).chunks()
    for chunk in itertools.islice(chunks, 3):
        del chunk
    tracemalloc.start()
    try:
        for chunk in itertools.islice(chunks, 30):  # ~2M events
            del chunk
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40 * 1024 * 1024  # a few chunks' arrays, never the whole stream


def test_default_output_is_byte_identical_to_before_shared_interest(tmp_path: Path) -> None:
    # The SHA-256 of this file as the generator wrote it before shared_interest and unique_pairs existed:
    # the new hash keys are drawn after the old ones, so no seeded file changes.
    path = tmp_path / "default.csv"
    write_csv(path, SyntheticConfig(events=100_000, seed=0))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == (
        "ebd8b119508b599afdc17c7e426e629b4a26e09622de03df375ae46a7353e455"
    )
    explicit = tmp_path / "explicit.csv"
    write_csv(explicit, SyntheticConfig(events=100_000, seed=0, shared_interest=1.0, unique_pairs=False))
    assert explicit.read_bytes() == path.read_bytes()


@pytest.mark.parametrize(
    ("strength", "sharing", "same_primary", "same_both"),
    [(0.0, 0, 617, 34), (0.5, 5_007, 5_305, 5_022), (1.0, 10_000, 10_000, 10_000)],
)
def test_shared_interest_is_the_share_of_users_with_the_same_clusters_in_both_domains(
    strength: float, sharing: int, same_primary: int, same_both: int
) -> None:
    stream = SyntheticStream(SyntheticConfig(shared_interest=strength, seed=0))
    users = np.arange(10_000)
    source_primary, source_secondary = stream.user_clusters(users)
    target_primary, target_secondary = stream.user_clusters(users, target=True)
    shares = stream.shares_interest(users)
    assert int(shares.sum()) == sharing  # ~ strength x 10,000
    assert int((source_primary == target_primary).sum()) == same_primary  # sharing + chance (1/16) of the rest
    assert int(((source_primary == target_primary) & (source_secondary == target_secondary)).sum()) == same_both
    assert np.array_equal(source_primary[shares], target_primary[shares])
    assert np.array_equal(source_secondary[shares], target_secondary[shares])
    assert np.array_equal(stream.user_clusters(users, target=False)[0], source_primary)
    per_user = stream.user_clusters(users, target=users % 2 == 1)[0]  # a flag per user
    assert np.array_equal(per_user, np.where(users % 2 == 1, target_primary, source_primary))


def test_shared_interest_moves_only_the_target_events_to_the_target_clusters() -> None:
    config = SyntheticConfig(events=60_000, n_users=2_000, noise=0.1, seed=8)
    shared = concat(SyntheticStream(config))
    stream = SyntheticStream(config.replace(shared_interest=0.0))
    apart = concat(stream)
    source = ~apart.is_target
    assert np.array_equal(apart.is_target, shared.is_target) and np.array_equal(apart.user, shared.user)
    assert np.array_equal(apart.item[source], shared.item[source])  # the source side does not move
    target_primary, target_secondary = stream.user_clusters(apart.user, target=True)
    drawn = ~apart.noise
    assert np.all((apart.cluster == target_primary) | (apart.cluster == target_secondary) | source)
    assert np.all(stream.item_clusters(True)[apart.item[apart.is_target & drawn]]
                  == apart.cluster[apart.is_target & drawn])
    source_primary, _ = stream.user_clusters(apart.user)
    # At strength 0 a target event comes from the user's source primary cluster only by chance.
    from_source_primary = (apart.cluster == source_primary)[apart.is_target & drawn].mean()
    assert from_source_primary == pytest.approx(0.0599, abs=1e-4)  # ~ 1 / n_clusters
    assert (shared.cluster == source_primary)[shared.is_target & drawn].mean() == pytest.approx(0.8167, abs=1e-4)


def test_unique_pairs_keeps_the_first_of_every_user_item_pair() -> None:
    config = SyntheticConfig(events=50_000, n_users=1_000, seed=4, chunk_events=8_192)
    every = concat(SyntheticStream(config))
    unique = concat(SyntheticStream(config.replace(unique_pairs=True)))
    pair = every.user * 10_000 + np.where(every.is_target, 5_000 + every.item, every.item)
    first = np.sort(np.unique(pair, return_index=True)[1])  # index of each pair's first event
    assert len(unique) == len(first) == 42_322
    for name in ("timestamp", "user", "is_target", "item", "cluster", "noise"):
        assert np.array_equal(getattr(unique, name), getattr(every, name)[first]), name
    events = list(SyntheticStream(config.replace(unique_pairs=True)).events())
    assert [e.event_id for e in events[-2:]] == ["syn:42320", "syn:42321"]  # numbered consecutively
    assert len({(e.user_id, e.item_id) for e in events}) == len(events)
    short = list(SyntheticStream(config.replace(events=20_000, unique_pairs=True)).events())
    assert short == events[:len(short)]  # still a prefix of the longer run


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"drift": "seasonal", "drift_at_event": 1},
         "drift must be one of ('interest_swap', 'domain_mix', 'popularity') or None, got 'seasonal'"),
        ({"drift": "popularity"}, "drift='popularity' needs drift_at_event or drift_at_fraction"),
        ({"drift_at_event": 1, "drift_at_fraction": 0.5},
         "give drift_at_event or drift_at_fraction, not both; got 1 and 0.5"),
        ({"events": None, "drift": "popularity", "drift_at_fraction": 0.5},
         "events must be set when drift_at_fraction is given (an endless stream has none), got None"),
        ({"target_share": 1.5}, "target_share must be in [0, 1], got 1.5"),
        ({"n_clusters": 9_000}, "n_clusters must be at most the smaller catalogue (5000 items), got 9000"),
        ({"target": "movie"}, "target must be a non-empty domain name other than source='movie', got 'movie'"),
        ({"events_per_second": 0}, "events_per_second must be > 0, got 0"),
        ({"shared_interest": -0.1}, "shared_interest must be in [0, 1], got -0.1"),
        ({"unique_pairs": "yes"}, "unique_pairs must be a bool, got 'yes'"),
    ],
)
def test_config_rejects_bad_values(changes: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SyntheticConfig(**changes)
    assert str(info.value) == message


def test_write_csv_refuses_an_endless_stream(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"events is None \(an endless stream\)"):
        write_csv(tmp_path / "x.csv", SyntheticConfig(events=None))


def test_cli_writes_the_same_file_as_the_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SITN_GENERATE_CLUSTERS", "8")  # read from the environment; flags win
    monkeypatch.setenv("SITN_GENERATE_SEED", "99")
    out = tmp_path / "cli.csv"
    code = sitn_main(["generate", "--output", str(out), "--events", "5000", "--seed", "3", "--drift", "domain_mix",
                      "--drift-at", "0.5"])
    assert code == 0
    expected = tmp_path / "lib.csv"
    write_csv(expected, SyntheticConfig(events=5_000, seed=3, n_clusters=8, drift="domain_mix", drift_at_fraction=0.5))
    assert out.read_bytes() == expected.read_bytes()
    assert "wrote 5,000 events (movie -> book, seed 3, drift=domain_mix from event 2500)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"sitn generate: --drift: expected one of"):
        sitn_main(["generate", "--output", str(out), "--drift", "weekly"])


def test_cli_passes_shared_interest_and_unique_pairs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SITN_GENERATE_UNIQUE_PAIRS", "yes")
    out = tmp_path / "cli.csv"
    assert sitn_main(["generate", "--output", str(out), "--events", "4000", "--users", "100",
                      "--shared-interest", "0.25"]) == 0
    expected = tmp_path / "lib.csv"
    rows = write_csv(expected, SyntheticConfig(events=4_000, n_users=100, shared_interest=0.25, unique_pairs=True))
    assert rows < 4_000  # repeats were dropped
    assert out.read_bytes() == expected.read_bytes()
    with pytest.raises(SystemExit, match=r"sitn generate: --unique-pairs: expected boolean, got 'maybe'"):
        sitn_main(["generate", "--output", str(out), "--unique-pairs", "maybe"])
    with pytest.raises(SystemExit, match=r"sitn generate: shared_interest must be in \[0, 1\], got 2.0"):
        sitn_main(["generate", "--output", str(out), "--shared-interest", "2"])
