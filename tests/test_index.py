"""The item index: exactness against a brute-force loop, upserts, atomic swaps under concurrent reads."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from serving.index import ItemIndex, merge_by_max

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


@pytest.mark.parametrize("merge_threshold_rows", [1, 5, 1000])
def test_upserts_through_delta_and_rebuilds_stay_exact(merge_threshold_rows: int) -> None:
    rng = np.random.default_rng(3)
    index = ItemIndex(dim=3, merge_threshold_rows=merge_threshold_rows)
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


def test_reader_never_sees_a_half_built_index_while_writer_swaps() -> None:
    """Every item of version v has vector v * e0, so a consistent snapshot scores all items alike."""
    n_items, k, dim = 50, 10, 4
    item_ids = [f"i{n}" for n in range(n_items)]
    index = ItemIndex(dim=dim, merge_threshold_rows=20)  # batches of 25 force rebuilds and deltas

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


def test_merge_by_max_takes_each_items_best_view() -> None:
    merged = merge_by_max([[("a", 0.1), ("b", 0.9)], [("a", 0.95)], []], k=5)
    assert merged == [("a", 0.95), ("b", 0.9)]


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
