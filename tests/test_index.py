"""The item index: exactness against a brute-force loop, upserts, atomic swaps under concurrent reads."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from serving.index import IndexSnapshot, ItemIndex, best_view_scores, merge_by_max

TOL = 1e-5


def brute_force(
    vectors: dict[str, np.ndarray], queries: np.ndarray, k: int, exclude: set[str]
) -> list[tuple[str, float]]:
    """The obviously correct reference: score every item against every view, keep each item's max."""
    best: dict[str, float] = {}
    for item_id, vector in vectors.items():
        if item_id in exclude:
            continue
        for query in queries:
            score = float(sum(float(a) * float(b) for a, b in zip(query, vector, strict=True)))
            best[item_id] = max(best.get(item_id, -np.inf), score)
    return sorted(best.items(), key=lambda pair: (-pair[1], pair[0]))[:k]


def assert_same(found: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    assert [i for i, _ in found] == [i for i, _ in expected]
    np.testing.assert_allclose([s for _, s in found], [s for _, s in expected], atol=TOL)


def per_view_reference(
    snap: IndexSnapshot, queries: np.ndarray, k: int, exclude: set[str]
) -> list[tuple[str, float]]:
    """The documented search, one view at a time in plain loops: each view searches the base alone and keeps
    its first k rows that are not stale and not excluded (fetching more until it has k or has seen every row);
    every delta row not excluded counts with its best view; each item scores its best, best first, equal
    scores by item id."""
    per_view = []
    if snap.base is not None:
        n_total = snap.base.ntotal
        for query in queries:
            fetch = min(n_total, k + len(exclude) + min(snap.n_stale, k))
            while True:
                scores, rows = snap.base.search(query[None, :], fetch)
                kept = [(snap.base_item_ids[row], float(score)) for score, row in zip(scores[0], rows[0], strict=True)
                        if row >= 0 and not snap.base_stale[row] and snap.base_item_ids[row] not in exclude][:k]
                if len(kept) == k or fetch >= n_total:
                    break
                fetch = min(n_total, fetch * 2)
            per_view.append(kept)
    delta = []
    for item_id, vector in zip(snap.delta_item_ids, snap.delta_vectors, strict=True):
        if item_id not in exclude:
            delta.append((item_id, float(max(float(np.dot(query, vector)) for query in queries))))
    per_view.append(delta)
    best: dict[str, float] = {}
    for results in per_view:
        for item_id, score in results:
            best[item_id] = max(score, best.get(item_id, -np.inf))
    return sorted(best.items(), key=lambda pair: (-pair[1], pair[0]))[:k]


@pytest.mark.parametrize(("factory", "search_params"), [("Flat", None), ("HNSW8", {"efSearch": 16})])
def test_search_returns_exactly_the_per_view_reference(factory: str, search_params: dict[str, int] | None) -> None:
    """Items, order, scores and exclusions as the plain per-view loop, over a base with stale rows and a
    delta, 1-4 views, k up to past the catalogue, and integer vectors whose many equal scores test the
    item-id order of ties. HNSW is approximate: the reference searches the same graph one view at a time.
    Scores agree to float32 rounding (the reference sums the delta's products in another order)."""
    rng = np.random.default_rng(11)
    ids = [f"i{n:03d}" for n in range(200)]
    checks = 0
    for trial in range(4):
        integer = trial % 2 == 1
        index = ItemIndex(dim=4, factory=factory, search_params=search_params, merge_threshold_rows=60)
        for version in range(1, 8):
            chosen = [ids[j] for j in rng.choice(len(ids), size=int(rng.integers(5, 80)), replace=False)]
            shape = (len(chosen), 4)
            vectors = rng.integers(-2, 3, size=shape) if integer else rng.standard_normal(shape)
            index.upsert(chosen, vectors.astype(np.float32), version)
            snap = index.snapshot
            for _ in range(6):
                views, k = int(rng.integers(1, 5)), int(rng.integers(1, 60))
                queries = (rng.integers(-2, 3, size=(views, 4)) if integer else rng.standard_normal((views, 4)))
                queries = queries.astype(np.float32)
                exclude = set(rng.choice([*ids, "not-an-item"], size=int(rng.integers(0, 40)), replace=False).tolist())
                if integer and snap.delta_item_ids:  # ties at the delta's cut-off: its pick among them is free
                    k = snap.size
                found = index.search(queries, k, exclude)
                expected = per_view_reference(snap, queries, k, exclude)
                assert [i for i, _ in found] == [i for i, _ in expected]
                if integer:  # integer products are exact in float32, whatever the order of summation
                    assert found == expected
                np.testing.assert_allclose([s for _, s in found], [s for _, s in expected], rtol=0, atol=TOL)
                assert not exclude & {item_id for item_id, _ in found}
                checks += 1
    assert checks == 4 * 7 * 6


@pytest.mark.parametrize("factory", ["Flat", "HNSW8"])
def test_a_view_whose_first_rows_are_all_stale_fetches_more(factory: str) -> None:
    """Item j scores 20 - j on e0; the best 8 are re-published with negative scores (their base rows go stale),
    so k = 2 first fetches k + min(stale, k) = 4 stale rows and must search again."""
    index = ItemIndex(dim=2, factory=factory, merge_threshold_rows=1000)
    ids = [f"i{j:02d}" for j in range(20)]
    vectors = np.array([[20.0 - j, 0.0] for j in range(20)], dtype=np.float32)
    index.upsert(ids, vectors, version=1)
    index.replace_all(ids, vectors, np.ones(20, dtype=np.int64))  # the base holds all 20
    index.upsert(ids[:8], -vectors[:8], version=2)
    assert (index.snapshot.n_stale, len(index.snapshot.delta_item_ids)) == (8, 8)
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    assert index.search(query, 2) == [("i08", 12.0), ("i09", 11.0)]
    assert index.search(query, 2, exclude={"i08"}) == [("i09", 11.0), ("i10", 10.0)]


def test_best_view_scores_equal_the_row_max() -> None:
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((50, 8)).astype(np.float32)
    for views in (1, 2, 5):
        queries = rng.standard_normal((views, 8)).astype(np.float32)
        expected = (vectors @ queries.T).max(axis=1)
        found = best_view_scores(vectors, queries)
        assert found.dtype == np.float32
        assert found.tolist() == expected.tolist()  # exact: the same products, the same maxima


def test_exact_top_k_on_ten_vectors_matches_brute_force() -> None:
    rng = np.random.default_rng(7)
    vectors = {f"i{n}": rng.standard_normal(4).astype(np.float32) for n in range(10)}
    index = ItemIndex(dim=4)
    assert index.upsert(list(vectors), np.stack(list(vectors.values())), version=1) == 10
    queries = rng.standard_normal((3, 4)).astype(np.float32)  # 3 views
    for k in (1, 3, 10):
        for exclude in (set(), {"i0", "i5"}):
            assert_same(index.search(queries, k, exclude), brute_force(vectors, queries, k, exclude))
    assert len(index.search(queries, 10, {"i1"})) == 9  # fewer items than k: all that remain


@pytest.mark.parametrize("background_merge", [False, True])
@pytest.mark.parametrize("merge_threshold_rows", [1, 5, 1000])
def test_upserts_through_delta_and_rebuilds_stay_exact(merge_threshold_rows: int, background_merge: bool) -> None:
    """Exact after every write, whether or not a background build has been swapped in yet."""
    rng = np.random.default_rng(3)
    index = ItemIndex(dim=3, merge_threshold_rows=merge_threshold_rows, background_merge=background_merge)
    reference: dict[str, np.ndarray] = {}
    for version in range(1, 30):
        item_ids = [f"i{n}" for n in rng.choice(40, size=4, replace=False)]
        vectors = rng.standard_normal((4, 3)).astype(np.float32)
        index.upsert(item_ids, vectors, version)
        reference.update(zip(item_ids, vectors, strict=True))
        queries = rng.standard_normal((2, 3)).astype(np.float32)
        exclude = set(rng.choice(sorted(reference), size=2, replace=False).tolist())
        assert_same(index.search(queries, 5, exclude), brute_force(reference, queries, 5, exclude))
        assert index.size == len(reference)
        assert index.version == version
    assert index.wait_for_merge(timeout_s=30)
    queries = rng.standard_normal((2, 3)).astype(np.float32)
    assert_same(index.search(queries, 5), brute_force(reference, queries, 5, set()))
    assert index.size == len(reference)
    if merge_threshold_rows < 1000:
        assert index.merges >= 1 and index.snapshot.base is not None


def _gated_build(index: ItemIndex, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make ``index``'s base builds wait for ``release``; ``started`` is set when a build begins."""
    started, release = threading.Event(), threading.Event()
    build = index._build_base

    def gated(base_vectors: np.ndarray) -> object:
        started.set()
        assert release.wait(timeout=30)
        return build(base_vectors)

    monkeypatch.setattr(index, "_build_base", gated)
    return started, release


def test_background_merge_never_blocks_writes_and_keeps_what_was_written_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a base builds, writes land in the delta; the swap keeps those rows' newest vectors in the delta
    and marks their base rows stale, so no write made during the build is lost or rolled back."""
    index = ItemIndex(dim=2, merge_threshold_rows=4, background_merge=True)
    started, release = _gated_build(index, monkeypatch)
    reference = {f"i{n}": np.array([float(n), 1.0], np.float32) for n in range(6)}
    index.upsert(list(reference), np.stack(list(reference.values())), version=1)  # crosses the threshold
    assert started.wait(timeout=30) and index.merging
    # The build is stuck: writes must still land at once, re-publishing base items and adding new ones.
    for version, (item_id, vector) in enumerate([("i0", [100.0, 0.0]), ("i9", [50.0, 0.0]), ("i0", [-5.0, 0.0])],
                                                 start=2):
        assert index.upsert([item_id], np.array([vector], np.float32), version) == 1
        reference[item_id] = np.array(vector, np.float32)
    assert index.merges == 0 and index.snapshot.base is None  # nothing swapped yet: all of it is delta
    query = np.array([[1.0, 0.0]], np.float32)
    assert_same(index.search(query, 7), brute_force(reference, query, 7, set()))
    release.set()
    assert index.wait_for_merge(timeout_s=30) and not index.merging
    snap = index.snapshot
    assert index.merges == 1 and snap.base is not None and snap.base.ntotal == 6  # the rows as of the start
    assert set(snap.delta_item_ids) == {"i0", "i9"}  # written during the build
    assert snap.n_stale == 1 and snap.base_stale[snap.base_item_ids.index("i0")]
    assert (index.version, index.size) == (4, 7)
    assert_same(index.search(query, 7), brute_force(reference, query, 7, set()))
    assert index.search(query, 1) == [("i9", 50.0)]  # i0's newest vector (-5) wins over its base row (100)


def test_background_builds_keep_to_their_duty_cycle_while_the_delta_stays_exact() -> None:
    """After a build of b seconds the next waits b * (1 - duty) / duty: writes over the threshold meanwhile go
    to the delta (searched exactly) and the first write after the cooldown starts the next build."""
    index = ItemIndex(dim=2, merge_threshold_rows=4, background_merge=True, merge_max_duty=0.25)
    now = [1000.0]
    index._monotonic = lambda: now[0]  # the cooldown's clock, stepped by hand
    reference = {f"i{n}": np.array([float(n), 1.0], np.float32) for n in range(4)}
    index.upsert(list(reference), np.stack(list(reference.values())), version=1)  # at the threshold: a build
    assert index.wait_for_merge(timeout_s=30) and index.merges == 1
    build_s = index.last_merge_build_s
    cooldown_s = build_s * 3  # (1 - 0.25) / 0.25
    assert index._next_merge_at == pytest.approx(1000.0 + cooldown_s)
    query = np.array([[1.0, 0.5]], np.float32)
    for version, n in enumerate(range(10, 16), start=2):  # 6 rows: past the threshold, inside the cooldown
        reference[f"i{n}"] = np.array([float(n), -1.0], np.float32)
        index.upsert([f"i{n}"], reference[f"i{n}"][None], version)
        assert not index.merging
    assert index.merges == 1 and len(index.snapshot.delta_item_ids) == 6
    assert_same(index.search(query, 8), brute_force(reference, query, 8, set()))
    now[0] += cooldown_s + 1e-6  # past it: the next write starts a build
    reference["i0"] = np.array([-3.0, 0.0], np.float32)
    index.upsert(["i0"], reference["i0"][None], version=20)
    assert index.wait_for_merge(timeout_s=30) and index.merges == 2
    assert index.snapshot.base is not None and index.snapshot.base.ntotal == 10
    assert_same(index.search(query, 10), brute_force(reference, query, 10, set()))
    with pytest.raises(ValueError, match="merge_max_duty"):
        ItemIndex(dim=2, merge_max_duty=0.0)


def test_replace_all_during_a_background_merge_throws_the_build_away(monkeypatch: pytest.MonkeyPatch) -> None:
    index = ItemIndex(dim=2, merge_threshold_rows=2, background_merge=True)
    started, release = _gated_build(index, monkeypatch)
    index.upsert(["a", "b", "c"], np.eye(3, 2, dtype=np.float32), version=1)
    assert started.wait(timeout=30)
    stale_build = index._merge_thread
    assert stale_build is not None
    monkeypatch.setattr(index, "_build_base", ItemIndex._build_base.__get__(index))  # the restore builds at once
    index.replace_all(["z"], np.array([[1.0, 0.0]], np.float32), np.array([7]))
    release.set()
    stale_build.join(timeout=30)  # the discarded build finished and tried to swap
    assert not stale_build.is_alive()
    assert index.snapshot.base_item_ids == ("z",) and index.size == 1 and index.version == 7


def test_older_version_is_ignored_and_duplicate_keeps_newest() -> None:
    index = ItemIndex(dim=2)
    index.upsert(["a"], np.array([[1.0, 0.0]]), version=5)
    assert index.upsert(["a"], np.array([[9.0, 0.0]]), version=4) == 0
    assert index.search(np.array([[1.0, 0.0]]), k=1) == [("a", 1.0)]
    assert index.upsert(["b", "b"], np.array([[2.0, 0.0], [3.0, 0.0]]), version=[7, 6]) == 1
    assert index.search(np.array([[1.0, 0.0]]), k=1) == [("b", 2.0)]
    assert index.version == 7


def test_version_and_age_follow_the_published_snapshot() -> None:
    now = [1000.0]
    index = ItemIndex(dim=2, clock=lambda: now[0])
    assert (index.version, index.size, index.age_s()) == (0, 0, 0.0)
    index.upsert(["a"], np.array([[1.0, 0.0]]), version=3)
    now[0] = 1012.5
    assert index.age_s() == pytest.approx(12.5, abs=1e-9)
    index.upsert(["a"], np.array([[1.0, 0.0]]), version=4)
    assert (index.version, index.age_s()) == (4, 0.0)


def test_bad_shapes_name_what_was_received() -> None:
    index = ItemIndex(dim=2)
    with pytest.raises(ValueError, match=r"vectors must have shape \(1, 2\), got \(1, 3\)"):
        index.upsert(["a"], np.zeros((1, 3)), version=1)
    with pytest.raises(ValueError, match=r"queries must have shape \(V, 2\), got \(4,\)"):
        index.search(np.zeros(4), k=1)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        index.search(np.zeros((1, 2)), k=0)


def test_ivf_factory_trains_and_small_catalogue_falls_back_to_flat() -> None:
    rng = np.random.default_rng(0)
    small = ItemIndex(dim=8, factory="IVF16,Flat", search_params={"nprobe": 16}, merge_threshold_rows=1)
    small.upsert([f"i{n}" for n in range(100)], rng.standard_normal((100, 8)), version=1)
    assert type(small.snapshot.base).__name__ == "IndexFlatIP"  # 100 < 39 * 16
    vectors = rng.standard_normal((16 * 39, 8)).astype(np.float32)
    large = ItemIndex(dim=8, factory="IVF16,Flat", search_params={"nprobe": 16}, merge_threshold_rows=1)
    large.upsert([f"i{n}" for n in range(len(vectors))], vectors, version=1)
    assert type(large.snapshot.base).__name__ == "IndexIVFFlat"
    reference = {f"i{n}": v for n, v in enumerate(vectors)}
    queries = rng.standard_normal((2, 8)).astype(np.float32)
    assert_same(large.search(queries, 5), brute_force(reference, queries, 5, set()))  # nprobe = nlist: exact


@pytest.mark.parametrize("background_merge", [False, True])
def test_reader_never_sees_a_half_built_index_while_writer_swaps(background_merge: bool) -> None:
    """Every item of version v has vector v * e0, so a consistent snapshot scores all items alike."""
    n_items, k, dim = 50, 10, 4
    item_ids = [f"i{n}" for n in range(n_items)]
    # batches of 25 force rebuilds and deltas
    index = ItemIndex(dim=dim, merge_threshold_rows=20, background_merge=background_merge)

    def vectors_for(version: int, count: int) -> np.ndarray:
        out = np.zeros((count, dim), dtype=np.float32)
        out[:, 0] = version
        return out

    index.upsert(item_ids, vectors_for(1, n_items), version=1)
    stop = threading.Event()
    reads: list[int] = []
    errors: list[BaseException] = []
    query = np.array([[1.0, 0.0, 0.0, 0.0]], dtype=np.float32)

    def reader() -> None:
        try:
            while not stop.is_set():
                snap = index.snapshot
                assert snap.size == n_items, snap.size
                results = index.search(query, k)
                assert len(results) == k, results
                assert len({item_id for item_id, _ in results}) == k
                reads.append(len(results))
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    thread = threading.Thread(target=reader)
    thread.start()
    version = 1
    while version < 200 or (len(reads) < 300 and version < 100_000):  # overlap many reads with swaps
        version += 1
        half = slice(0, 25) if version % 2 else slice(25, 50)
        index.upsert(item_ids[half], vectors_for(version, 25), version)
        if stop.is_set():
            break
    stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert errors == []
    assert len(reads) >= 300
    newest = item_ids[:25] if version % 2 else item_ids[25:]
    older = item_ids[25:] if version % 2 else item_ids[:25]
    # k = all items: which of several tied items fill the last places of a shorter list is the index's choice.
    expected = [(i, float(version)) for i in sorted(newest)] + [
        (i, float(version - 1)) for i in sorted(older)
    ]
    assert index.search(query, n_items) == expected
    assert index.wait_for_merge(timeout_s=30)
    assert index.search(query, n_items) == expected


def test_merge_by_max_takes_each_items_best_view() -> None:
    merged = merge_by_max([[("a", 0.1), ("b", 0.9)], [("a", 0.95)], []], k=5)
    assert merged == [("a", 0.95), ("b", 0.9)]
    ties = merge_by_max([[("d", 0.5), ("c", 0.7), ("b", 0.5)], [("a", 0.5), ("c", 0.2)]], k=3)
    assert ties == [("c", 0.7), ("a", 0.5), ("b", 0.5)]  # equal scores by item id; the k-th tie cut off


def test_faiss_threads_are_set_in_the_thread_that_searches() -> None:
    """OpenMP keeps the thread count per thread: a server thread must get the setting too."""
    import faiss

    index = ItemIndex(dim=2, faiss_threads=3)
    index.upsert(["a"], np.array([[1.0, 0.0]]), version=1)
    seen: list[int] = []

    def search_in_new_thread() -> None:
        before = faiss.omp_get_max_threads()
        index.search(np.array([[1.0, 0.0]]), k=1)
        seen.extend([before, faiss.omp_get_max_threads()])

    thread = threading.Thread(target=search_in_new_thread)
    thread.start()
    thread.join(timeout=10)
    assert seen[1] == 3
    assert seen[0] != 3  # the thread's own default differs, so the check above is meaningful
