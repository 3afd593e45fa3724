"""The target-item index: FAISS inner product, upserts by item id, reads that never wait on writes.

Layout. A published :class:`IndexSnapshot` is immutable: a *base* FAISS index built off to the side,
plus a small exact *delta* (a numpy matrix) holding items added or re-published since the base was
built, plus a mask of base rows that the delta supersedes. Each write batch builds a new snapshot
(copying only the delta and the mask) and swaps one reference; a reader takes the reference once
and searches it, so it never sees a half-built index and never takes a lock. When the delta reaches
``merge_threshold_rows`` it is folded into a freshly built base, off to the side: with
``background_merge`` (serving's default) in a thread of its own while writes go on, so neither a reader
nor a writer ever waits for a build; without it, inside the write that crossed the threshold.

Chosen base: ``HNSW32`` with ``efSearch=128`` (the ``sitn serve`` default, see serving/settings.py).
bench/bench_index.py on 63,937 clustered vectors of dim 64, one FAISS thread: recall@10 0.998 at
p50 0.20 ms per view; on weakly clustered data it degrades most gracefully of the ANN candidates
(0.91 vs IVF1024/nprobe=64 at 0.64), and it has no trained quantizer to go stale as the online
learner moves the embeddings. ``Flat`` is exact but costs 1.5 ms per view (6 ms for V=4 views), too
slow for 200 requests/s on one core; it stays the class default for small catalogues and tests. The
price of HNSW is build time (7 s for 64k items on one thread), paid off to the side at each merge.

Re-measured for issue 13 (2026-11-29, a 2-core machine shared with other jobs, load 3-6): on the shipped
catalogue's size, 39,412 items, an exact ``Flat`` base costs p50 0.65 ms a request of one view and 2.8 ms
of four (bench_index.py, the over-fetch serving uses), HNSW32/efSearch=128 0.20 ms and 1.0 ms at recall@10
0.998; through HTTP (bench_serving_http.py, V=1, interleaved runs) ``Flat`` served 580-719 req/s against
HNSW's 1,264. So HNSW stays the serving default. The search is most of a request's CPU: at V=4 on 63,937
items the FAISS call takes 605-862 us of service.recommend's 808-1,048 us (thread CPU), and the model path
serves ~620 req/s where the popularity path, which does not search, serves ~3,900 on the same machine.
``efSearch`` is the capacity lever, with recall beside it (39,412 items): 64 gives recall@10 0.996 at
0.08 / 0.36 ms (V=1 / V=4) and 790 req/s at V=4 on 63,937 items; 32 gives 0.993 at 0.06 / 0.21 ms and
960 req/s.

Search is exact for an exact base (``"Flat"``): the base is over-fetched and re-searched with a
larger ``k`` until every view has ``k`` usable rows, so stale and excluded rows never starve a result.

>>> index = ItemIndex(dim=2)
>>> index.upsert(["a", "b", "c"], np.array([[1, 0], [0, 1], [0.5, 0.5]], dtype=np.float32), version=1)
3
>>> index.search(np.array([[1, 0]], dtype=np.float32), k=2)
[('a', 1.0), ('c', 0.5)]
>>> index.upsert(["b"], np.array([[2, 0]], dtype=np.float32), version=2)
1
>>> index.search(np.array([[1, 0]], dtype=np.float32), k=2, exclude={"a"})
[('b', 2.0), ('c', 0.5)]
>>> index.version, index.size
(2, 3)
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import faiss
import numpy as np

logger = logging.getLogger(__name__)

ScoredItems = list[tuple[str, float]]
MIN_TRAIN_ROWS_PER_LIST = 39  # FAISS's own minimum of training points per IVF list


def set_faiss_threads(threads: int) -> None:
    """Set FAISS's OpenMP thread count *for the calling thread*: OpenMP keeps it per thread, so a
    value set in the main thread does not reach uvicorn's event-loop thread or a writer thread.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if faiss.omp_get_max_threads() != threads:
        faiss.omp_set_num_threads(threads)


def merge_by_max(per_view: Sequence[ScoredItems], k: int) -> ScoredItems:
    """Merge per-view results: an item's score is its best view's score; ties break by item id.

    >>> merge_by_max([[("a", 0.9), ("b", 0.5)], [("b", 0.8), ("c", 0.7)]], k=3)
    [('a', 0.9), ('b', 0.8), ('c', 0.7)]
    """
    best: dict[str, float] = {}
    for results in per_view:
        for item_id, score in results:
            if score > best.get(item_id, -math.inf):
                best[item_id] = score
    merged = sorted(best.items())  # by item id (unique), then a stable sort by score, best first
    merged.sort(key=_score, reverse=True)  # reverse keeps equal scores in item-id order
    return merged[:k]


def _score(pair: tuple[str, float]) -> float:
    return pair[1]


def best_view_scores(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Each row's best inner product over the views: ``(vectors @ queries.T).max(axis=1)``, (N,) float32.

    The same values, computed as an elementwise maximum of the V columns: numpy's ``max`` along a short last
    axis costs 60-95 ns a row (2,000 rows at V = 4: 114-191 us of CPU, more than the product's ~50 us;
    39,412 rows: 2.4-3.1 ms), the column maxima a few ns a row.

    >>> best_view_scores(np.array([[1.0, 0.0], [0.0, 2.0]], np.float32), np.array([[1, 0], [0, 1]], np.float32))
    array([1., 2.], dtype=float32)
    """
    scores = vectors @ queries.T  # (N, V)
    if scores.shape[1] == 1:
        return scores[:, 0]
    best = scores[:, 0].copy()
    for view in range(1, scores.shape[1]):
        np.maximum(best, scores[:, view], out=best)
    return best


@dataclass(frozen=True, slots=True)
class IndexSnapshot:
    """One published, immutable state of the index. Readers hold it for the length of one search."""

    base: faiss.Index | None  # searched read-only; None while no base was built
    base_item_ids: tuple[str, ...]  # row -> item_id
    base_vectors: np.ndarray  # (N_base, D) float32, what the base was built from
    base_stale: np.ndarray  # (N_base,) bool, True where the delta holds a newer vector
    n_stale: int
    delta_item_ids: tuple[str, ...]
    delta_vectors: np.ndarray  # (N_delta, D) float32
    version: int  # highest item version applied
    updated_at_unix_s: float  # when this snapshot was published

    @property
    def size(self) -> int:
        return len(self.base_item_ids) - self.n_stale + len(self.delta_item_ids)


class ItemIndex:
    """Upsertable inner-product index of target items (see the module docstring for the layout).

    Args:
        dim: vector dimension D.
        factory: a FAISS ``index_factory`` string for the base, e.g. ``"Flat"``, ``"HNSW32"``,
            ``"IVF256,Flat"``; metric is always inner product.
        search_params: FAISS ``ParameterSpace`` settings applied to every new base, e.g.
            ``{"efSearch": 64}`` or ``{"nprobe": 16}``.
        merge_threshold_rows: fold the delta into a new base once it holds this many rows.
        background_merge: build that base in a thread of its own while writes go on landing in the delta
            (see :meth:`upsert`), so a write never waits for a build; False builds it inside the write that
            crossed the threshold (deterministic: tests, tools).
        merge_max_duty: with ``background_merge``, the largest share of one core the builds may take: after
            a build of ``b`` seconds the next one starts no sooner than ``b * (1 - duty) / duty`` seconds
            later (0.25: three times the build), while the delta, searched exactly, takes the writes. 1
            builds back to back, as fast as the writes come.
        faiss_threads: OpenMP threads FAISS uses in each thread that searches or builds (1 suits
            single queries and leaves cores to the server); None leaves FAISS's default.
        clock: wall clock in unix seconds (injectable for tests).
    """

    def __init__(
        self,
        dim: int,
        factory: str = "Flat",
        search_params: Mapping[str, int] | None = None,
        merge_threshold_rows: int = 4096,
        faiss_threads: int | None = 1,
        clock: Callable[[], float] = time.time,
        background_merge: bool = False,
        merge_max_duty: float = 1.0,
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not 0 < merge_max_duty <= 1:
            raise ValueError(f"merge_max_duty must be in (0, 1], got {merge_max_duty}")
        if merge_threshold_rows < 1:
            raise ValueError(f"merge_threshold_rows must be >= 1, got {merge_threshold_rows}")
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)  # fail fast on a bad string
        self.dim = dim
        self.factory = factory
        self.search_params = dict(search_params or {})
        self.merge_threshold_rows = merge_threshold_rows
        self.faiss_threads = faiss_threads
        self._clock = clock
        self._write_lock = threading.Lock()  # writers only; readers never take it
        self._versions: dict[str, int] = {}  # item_id -> version, writer-side bookkeeping
        self._base_row: dict[str, int] = {}
        self._delta_row: dict[str, int] = {}
        self.background_merge = background_merge
        self._merge_thread: threading.Thread | None = None  # the running background build, if any
        self._merge_generation = 0  # bumped by replace_all: a build started before it is thrown away
        self._written_since_merge: set[str] = set()  # items upserted since the running build took its rows
        self.merges = 0  # bases swapped in (both modes)
        self.last_merge_build_s = 0.0  # how long the last base took to build
        self.merge_max_duty = merge_max_duty
        self._monotonic: Callable[[], float] = time.monotonic  # the merge cooldown's clock (tests replace it)
        self._next_merge_at = -math.inf  # monotonic seconds: no background build starts before it
        empty = np.zeros((0, dim), dtype=np.float32)
        self._snapshot = IndexSnapshot(None, (), empty, np.zeros(0, bool), 0, (), empty, 0, clock())

    # --- reads -------------------------------------------------------------------------------

    @property
    def snapshot(self) -> IndexSnapshot:
        return self._snapshot

    @property
    def version(self) -> int:
        return self._snapshot.version

    @property
    def size(self) -> int:
        return self._snapshot.size

    def age_s(self) -> float:
        """Seconds since the current snapshot was published."""
        return max(0.0, self._clock() - self._snapshot.updated_at_unix_s)

    def search(self, queries: np.ndarray, k: int, exclude: Collection[str] = ()) -> ScoredItems:
        """Top ``k`` items for the union of ``queries`` (V, D), merged by max score, minus ``exclude``: each
        view's first ``k`` usable rows of the base (one FAISS call for all views) and the delta's best rows by
        their best view, merged by :func:`merge_by_max`."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (V, {self.dim}), got {queries.shape}")
        if self.faiss_threads is not None:
            set_faiss_threads(self.faiss_threads)
        snap = self._snapshot  # one atomic read; everything below uses this immutable state
        per_view = self._search_base(snap, queries, k, exclude)
        delta = self._search_delta(snap, queries, k, exclude)
        if delta:
            per_view.append(delta)
        return merge_by_max(per_view, k)

    @staticmethod
    def _search_base(
        snap: IndexSnapshot, queries: np.ndarray, k: int, exclude: Collection[str]
    ) -> list[ScoredItems]:
        """Each view's first ``k`` usable base rows (not stale, not excluded) in FAISS order, as ``(item_id,
        score)``; all views in one FAISS call. A view left short re-searches with twice the ``fetch``."""
        if snap.base is None or snap.base.ntotal == 0:
            return []
        n_total = snap.base.ntotal
        fetch = min(n_total, k + len(exclude) + min(snap.n_stale, k))
        item_ids = snap.base_item_ids
        stale = snap.base_stale if snap.n_stale else None
        while True:
            scores, rows = snap.base.search(queries, fetch)  # (V, fetch) each, best first per view
            per_view: list[ScoredItems] = []
            short = False
            for view_scores, view_rows in zip(scores.tolist(), rows.tolist(), strict=True):
                kept: ScoredItems = []
                for score, row in zip(view_scores, view_rows, strict=True):
                    if row < 0 or (stale is not None and stale[row]):
                        continue
                    item_id = item_ids[row]
                    if item_id in exclude:
                        continue
                    kept.append((item_id, score))
                    if len(kept) == k:
                        break
                else:
                    short = True
                per_view.append(kept)
            if not short or fetch >= n_total:
                return per_view
            fetch = min(n_total, fetch * 2)

    @staticmethod
    def _search_delta(
        snap: IndexSnapshot, queries: np.ndarray, k: int, exclude: Collection[str]
    ) -> ScoredItems:
        """The delta's ``k + len(exclude)`` best rows by their best view, minus ``exclude``."""
        n_delta = len(snap.delta_item_ids)
        if n_delta == 0:
            return []
        best = best_view_scores(snap.delta_vectors, queries)  # (N_delta,)
        keep = min(n_delta, k + len(exclude))
        rows = np.argpartition(-best, keep - 1)[:keep] if keep < n_delta else np.arange(n_delta)
        item_ids = snap.delta_item_ids
        return [(item_ids[row], score) for row, score in zip(rows.tolist(), best[rows].tolist(), strict=True)
                if item_ids[row] not in exclude]  # fmt: skip

    # --- writes ------------------------------------------------------------------------------

    def upsert(self, item_ids: Sequence[str], vectors: np.ndarray, version: int | Sequence[int]) -> int:
        """Insert or replace items; return how many were applied.

        ``version`` is one version for the batch or one per item. An item whose stored version is
        newer than its update's is kept (the update is stale and ignored).
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(item_ids), self.dim):
            raise ValueError(f"vectors must have shape ({len(item_ids)}, {self.dim}), got {vectors.shape}")
        versions = [version] * len(item_ids) if isinstance(version, int) else [int(v) for v in version]
        if len(versions) != len(item_ids):
            raise ValueError(f"expected {len(item_ids)} versions, got {len(versions)}")
        with self._write_lock:
            latest: dict[str, int] = {}  # item_id -> row in `vectors`; the newest (then last) wins
            for row, item_id in enumerate(item_ids):
                if self._versions.get(item_id, -1) <= versions[row]:
                    self._versions[item_id] = versions[row]
                    latest[item_id] = row
            if not latest:
                return 0
            snap = self._snapshot
            new_version = max(snap.version, *(versions[row] for row in latest.values()))
            n_delta_after = len(snap.delta_item_ids) + sum(1 for i in latest if i not in self._delta_row)
            if n_delta_after >= self.merge_threshold_rows and not self.background_merge:
                self._rebuild(snap, latest, vectors, new_version)
                return len(latest)
            self._publish_delta(snap, latest, vectors, new_version)
            if self._merge_thread is not None:
                self._written_since_merge.update(latest)
            elif n_delta_after >= self.merge_threshold_rows and self._monotonic() >= self._next_merge_at:
                self._start_merge()  # (in its cooldown, the delta takes the writes; a later write starts it)
            return len(latest)

    # --- background merges ---------------------------------------------------------------------
    #
    # With ``background_merge``, a write that takes the delta to the threshold publishes it like any other
    # and starts a build thread over the live rows *as of then*. Writes go on landing in the delta meanwhile
    # (it grows past the threshold; the search scans it exactly, so nothing is lost, only a little speed), and
    # every item written is noted. When the base is built, one swap under the write lock publishes it with
    # the noted items' base rows marked stale and their newest vectors as the new delta: readers see either
    # the old snapshot or the new one, each complete. FAISS releases the GIL while it builds, so searches in
    # other threads go on at their usual latency (measured: a 40,000 x 64 HNSW32 build took 5 s on one core
    # while a flat search in another thread kept its p50 of 1.1-1.3 ms).

    def _start_merge(self) -> None:
        """Start building a base over the current live rows in a thread (the write lock is held)."""
        item_ids, base_vectors = self._live_items(self._snapshot)
        self._written_since_merge = set()
        thread = threading.Thread(
            target=self._merge_in_background, args=(self._merge_generation, item_ids, base_vectors),
            name="index-merge", daemon=True,
        )  # fmt: skip
        thread.start()  # before it is shared: wait_for_merge may join it at once (it swaps under this lock)
        self._merge_thread = thread

    def _merge_in_background(self, generation: int, item_ids: tuple[str, ...], base_vectors: np.ndarray) -> None:
        started_s = time.perf_counter()
        try:
            base = self._build_base(base_vectors)
        except Exception:  # the delta still serves every item; the next write over the threshold retries
            logger.exception("index background merge failed items=%d", len(item_ids))
            with self._write_lock:
                if generation == self._merge_generation:
                    self._merge_thread = None
            return
        build_s = time.perf_counter() - started_s
        with self._write_lock:
            if generation != self._merge_generation:  # replace_all swapped everything in the meantime
                return
            snap = self._snapshot
            written = [item_id for item_id in snap.delta_item_ids if item_id in self._written_since_merge]
            self._base_row = {item_id: row for row, item_id in enumerate(item_ids)}
            stale = np.zeros(len(item_ids), bool)
            for item_id in written:
                base_row = self._base_row.get(item_id)
                if base_row is not None:
                    stale[base_row] = True
            delta_vectors = snap.delta_vectors[[self._delta_row[item_id] for item_id in written]]  # (N', D)
            self._delta_row = {item_id: row for row, item_id in enumerate(written)}
            self._snapshot = IndexSnapshot(
                base, item_ids, base_vectors, stale, int(stale.sum()), tuple(written),
                delta_vectors.reshape(len(written), self.dim), snap.version, self._clock(),
            )  # fmt: skip
            self._merge_thread = None
            self.merges += 1
            self.last_merge_build_s = build_s
            cooldown_s = build_s * (1 - self.merge_max_duty) / self.merge_max_duty
            self._next_merge_at = self._monotonic() + cooldown_s
            logger.info(
                "index base merged in the background factory=%s items=%d kept_in_delta=%d version=%d build_s=%.3f "
                "next_build_after_s=%.1f", self.factory, len(item_ids), len(written), snap.version, build_s, cooldown_s,
            )  # fmt: skip
            if len(written) >= self.merge_threshold_rows and cooldown_s == 0:  # written faster than it builds
                self._start_merge()

    def wait_for_merge(self, timeout_s: float | None = None) -> bool:
        """Wait until no background build runs (tests, tools, a clean shutdown); False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            thread = self._merge_thread
            if thread is None:
                return True
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(remaining)
            if thread.is_alive():
                return False

    @property
    def merging(self) -> bool:
        """Whether a background build is running."""
        return self._merge_thread is not None

    def _publish_delta(
        self, snap: IndexSnapshot, latest: dict[str, int], vectors: np.ndarray, version: int
    ) -> None:
        stale = snap.base_stale.copy()
        delta_ids = list(snap.delta_item_ids)
        new_ids = [item_id for item_id in latest if item_id not in self._delta_row]
        delta_vectors = np.empty((len(delta_ids) + len(new_ids), self.dim), dtype=np.float32)
        delta_vectors[: len(delta_ids)] = snap.delta_vectors
        for item_id in new_ids:
            self._delta_row[item_id] = len(delta_ids)
            delta_ids.append(item_id)
        for item_id, row in latest.items():
            delta_vectors[self._delta_row[item_id]] = vectors[row]
            base_row = self._base_row.get(item_id)
            if base_row is not None:
                stale[base_row] = True
        self._snapshot = IndexSnapshot(
            snap.base, snap.base_item_ids, snap.base_vectors, stale, int(stale.sum()),
            tuple(delta_ids), delta_vectors, version, self._clock(),
        )  # fmt: skip

    def _rebuild(
        self, snap: IndexSnapshot, latest: dict[str, int], vectors: np.ndarray, version: int
    ) -> None:
        """Fold base, delta and this batch into a new base, built off to the side, then swap."""
        item_ids, base_vectors = self._live_items(snap, latest, vectors)
        started_s = time.perf_counter()
        base = self._build_base(base_vectors)
        self._base_row = {item_id: row for row, item_id in enumerate(item_ids)}
        self._delta_row = {}
        empty = np.zeros((0, self.dim), dtype=np.float32)
        self._snapshot = IndexSnapshot(
            base, item_ids, base_vectors, np.zeros(len(item_ids), bool), 0, (), empty, version, self._clock()
        )
        self.merges += 1
        self.last_merge_build_s = time.perf_counter() - started_s
        logger.info(
            "index base rebuilt factory=%s items=%d version=%d build_s=%.3f",
            self.factory, len(item_ids), version, self.last_merge_build_s,
        )  # fmt: skip

    def _live_items(
        self, snap: IndexSnapshot, latest: Mapping[str, int] | None = None, vectors: np.ndarray | None = None
    ) -> tuple[tuple[str, ...], np.ndarray]:
        """Every live item of ``snap`` (base rows the delta does not supersede, then the delta), then
        ``latest`` (item_id -> row of ``vectors``) on top: ``(item_ids, vectors (N, D) float32)``."""
        merged: dict[str, np.ndarray] = {}
        for row, item_id in enumerate(snap.base_item_ids):
            if not snap.base_stale[row]:
                merged[item_id] = snap.base_vectors[row]
        for row, item_id in enumerate(snap.delta_item_ids):
            merged[item_id] = snap.delta_vectors[row]
        if latest is not None and vectors is not None:
            for item_id, row in latest.items():
                merged[item_id] = vectors[row]
        if not merged:
            return (), np.zeros((0, self.dim), dtype=np.float32)
        return tuple(merged), np.stack(list(merged.values())).astype(np.float32, copy=False)  # (N, D)

    def _build_base(self, base_vectors: np.ndarray) -> faiss.Index:
        """A new base over ``base_vectors`` (N, D); IVF is retrained every time, so it follows drift.

        An IVF factory with fewer than ``MIN_TRAIN_ROWS_PER_LIST * nlist`` items falls back to an exact
        flat index: too few points to train the lists, and a small catalogue is fast to scan anyway.
        """
        if self.faiss_threads is not None:
            set_faiss_threads(self.faiss_threads)
        base = faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.try_extract_index_ivf(base)
        nlist = 0 if ivf is None else int(ivf.nlist)
        fall_back = len(base_vectors) < MIN_TRAIN_ROWS_PER_LIST * nlist
        if fall_back:
            logger.info(
                "index factory=%s nlist=%d items=%d: too few to train, using an exact flat base",
                self.factory, nlist, len(base_vectors),
            )  # fmt: skip
            base = faiss.IndexFlatIP(self.dim)
        if not base.is_trained:
            base.train(base_vectors)
        base.add(base_vectors)
        if not fall_back:
            params = faiss.ParameterSpace()
            for name, value in self.search_params.items():
                params.set_index_parameter(base, name, value)
        return base

    def replace_all(self, item_ids: Sequence[str], vectors: np.ndarray, versions: np.ndarray) -> None:
        """Replace every item (e.g. from a snapshot): build a new base off to the side, then swap."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(item_ids), self.dim) or len(versions) != len(item_ids):
            raise ValueError(
                f"expected vectors ({len(item_ids)}, {self.dim}) and {len(item_ids)} versions, "
                f"got {vectors.shape} and {len(versions)}"
            )
        if len(set(item_ids)) != len(item_ids):
            raise ValueError("item_ids must be unique")
        with self._write_lock:
            self._merge_generation += 1  # a background build still running belongs to the state replaced here
            self._merge_thread = None
            self._versions = {item_id: int(v) for item_id, v in zip(item_ids, versions, strict=True)}
            version = max(self._versions.values(), default=0)
            empty = np.zeros((0, self.dim), dtype=np.float32)
            self._base_row, self._delta_row = {}, {}
            blank = IndexSnapshot(None, (), empty, np.zeros(0, bool), 0, (), empty, version, self._clock())
            if item_ids:
                self._rebuild(blank, {item_id: row for row, item_id in enumerate(item_ids)}, vectors, version)
            else:
                self._snapshot = blank

    def export(self) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
        """All live items as ``(item_ids, vectors (N, D) float32, versions (N,) int64)``."""
        with self._write_lock:
            snap = self._snapshot
            live = [(item_id, snap.base_vectors[row]) for row, item_id in enumerate(snap.base_item_ids)
                    if not snap.base_stale[row]]  # fmt: skip
            live.extend(zip(snap.delta_item_ids, snap.delta_vectors, strict=True))
            item_ids = tuple(item_id for item_id, _ in live)
            vectors = np.stack([v for _, v in live]) if live else np.zeros((0, self.dim), np.float32)
            versions = np.array([self._versions[item_id] for item_id in item_ids], dtype=np.int64)
        return item_ids, vectors.astype(np.float32, copy=False), versions
