"""Range search: every (query, doc) pair within a radius, handed to a sink as it is found (range_output.py writes
them to disk, dedup.py joins them into groups). The CPU's screened path (engine.py) runs unchanged with a fixed
threshold: the radius.

A pair is in range iff its exact score (tiny-knn's one definition, _kernels/tk.h) is >= float32(T) for ip and
cosine, or its squared distance is <= float32(T) for l2. The selector keeps scores strictly above its threshold,
so each row's threshold is the float32 just below the bound: nextafter(T, -inf), or for l2 (whose selection keeps
-distance) nextafter(-T, -inf). The screen rules out only pairs whose exact score is provably at or below it, so
no pair in range is ever missed, and every pair offered is scored exactly.

Without a cap (`--k` not given) each row's pool holds a whole chunk's docs and more (RangeSelector), so a chunk can
never fill it: nothing is ever compacted, the threshold never moves, and the kernels' starting-threshold seeds never
run (they need a chunk of at least k docs). After each chunk the pools are drained and emptied. With a cap the
selection is top-k's own (ThresholdTopK), started at the radius: each row keeps its k best pairs in range.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from .backend import available_bytes, default_budget_bytes, resolve
from .engine import matmul_precision
from .errors import InvalidInputError, MemoryBudgetError, TinyKnnWarning
from .estimators import Estimator, Operand, make_estimator
from .exclusions import Exclusions
from .kernel import KERNEL
from .metrics import check_metric, normalize
from .options import SearchOptions
from .plan import (
    COL_ALIGN,
    CPU_DOC_CHUNK_ROWS,
    CPU_THREAD_BLOCK_ROWS,
    CPU_TILE_DOCS,
    ROW_ALIGN,
    Plan,
    format_bytes,
    parse_size,
    round_up,
    selection_state_bytes,
)
from .sources import RowRange, Source, check_compatible
from .streaming import host_chunks, refuse_non_finite, scored
from .topk import MAX_KERNEL_DOCS, RunningTopK, ThresholdTopK

# An uncapped pool's room past a chunk of docs: the kernels' k is the padded chunk and RANGE_K_MARGIN (more docs
# than a chunk brings, so no seed runs), and the capacity RANGE_CAPACITY_MARGIN more (tk_screen_scan needs
# capacity >= k + 128; the AVX-512 append compacts only with fewer than 32 slots free).
RANGE_K_MARGIN = 64
RANGE_CAPACITY_MARGIN = 128
# Bytes per pair held in memory before the batch's pairs spill to disk: the pair (query, doc: int64; score:
# float32), the sort that orders them by query, its gathered copies, and a drained group's share.
HELD_PAIR_BYTES = 64
HELD_BUDGET_SHARE = 1 / 8  # of the budget, for pairs held
MIN_HELD_PAIRS, MAX_HELD_PAIRS = 4096, 1 << 24
# Rows and docs of the sample that --dry-run estimates the pair count from.
ESTIMATE_QUERY_ROWS, ESTIMATE_DOC_ROWS = 256, 8192


class PairSink(Protocol):
    """Where a range search puts its pairs: a batch of query rows at a time, in order.

    add() gets global query rows, global doc rows and scores (distances for l2), sorted by (query, doc) within
    the call; a query's calls within a batch come in ascending doc order."""

    @property
    def done_rows(self) -> int:
        """The queries already finished, after which the search starts (a resumed run)."""

    def begin_batch(self, start: int, stop: int) -> None: ...

    def add(self, queries: np.ndarray, docs: np.ndarray, scores: np.ndarray) -> None: ...

    def end_batch(self) -> None: ...


@dataclass(frozen=True)
class RangePlan:
    """A range search: the screened search's plan (engine.py's Plan: blocks, chunk, estimator, threads) and the
    radius."""

    search: Plan
    bound: float  # float32(T): scores >= bound are in range (ip, cosine); distances <= bound (l2)
    cap: int | None  # at most this many pairs per query, the best ones (--k given), or None: all
    held_pairs: int  # pairs a batch holds in memory before they spill to disk
    triangle: bool = False  # a self search of each row against the rows after it only (dedup)

    @property
    def selection_threshold(self) -> float:
        """The selector's strict threshold: the float32 just below the bound in the selection's order."""
        return selection_threshold(self.bound, self.search.metric)

    def doc_reads(self) -> int:
        """Doc rows read in all, over every batch (for the progress bar)."""
        return sum(self.docs_for(start) for start in range(0, self.search.queries, self.search.query_batch_rows))

    def docs_for(self, batch_start: int) -> int:
        """Docs a batch starting at batch_start is searched against."""
        return self.search.docs - batch_start if self.triangle else self.search.docs

    def describe(self) -> list[str]:
        search = self.search
        relation = "distance <=" if search.metric == "l2" else "score >="
        passes = search.doc_passes
        return [
            f"range search: every pair with {relation} {np.float32(self.bound)} (float32), metric {search.metric}"
            + (f", at most {self.cap} per query (the best)" if self.cap else "")
            + (", each row against the rows after it" if self.triangle else "")
            + (", excluding each query's own row" if search.exclude_self else ""),
            f"{search.queries} queries x {search.docs} docs x {search.dim} dims, on the CPU",
            f"query batch {search.query_batch_rows} rows (docs read {'once' if passes == 1 else f'{passes} times'}),"
            f" matrix-product block {search.query_block_rows} rows per thread, doc chunk {search.doc_chunk_rows} rows",
            f"scores: exact (tiny-knn's one definition), screened by the {search.estimator} estimator"
            + (f" ({search.estimator_choice})" if search.estimator_choice else ""),
            f"pairs: streamed to disk as found, at most {self.held_pairs} held in memory",
            f"memory: about {format_bytes(search.peak_bytes)} of a {format_bytes(search.budget_bytes)} budget",
        ]


def score_bound(threshold: float, metric: str) -> float:
    """float32(threshold), checked: a finite number (a distance >= 0 for l2).

    Raises:
        InvalidInputError: not a number, not finite once rounded to float32, or a negative distance.
    """
    what = "max_distance" if metric == "l2" else "min_score"
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)):
        raise InvalidInputError(f"{what}={threshold!r}: expected a number")
    with np.errstate(over="ignore"):
        bound = np.float32(threshold)
    if not np.isfinite(bound):
        raise InvalidInputError(f"{what}={threshold!r}: expected a finite number (float32 rounds it to {bound})")
    if metric == "l2" and bound < 0:
        raise InvalidInputError(f"{what}={threshold!r}: expected a squared distance >= 0")
    return float(bound)


def selection_threshold(bound: float, metric: str) -> float:
    """The selector's strict threshold for a bound: nextafter(bound, -inf), or nextafter(-bound, -inf) for l2 (the
    selection keeps -distance). `score > it` is then exactly `score >= bound` (`distance <= bound`)."""
    key = np.float32(-bound if metric == "l2" else bound)
    return float(np.nextafter(key, np.float32(-np.inf)))


def in_range(scores: np.ndarray, bound: float, metric: str) -> np.ndarray:
    """Which exact scores (distances for l2) are within the radius."""
    return scores <= np.float32(bound) if metric == "l2" else scores >= np.float32(bound)


def plan_ranges(
    queries: Source,
    docs: Source,
    threshold: float,
    options: SearchOptions,
    cap: int | None = None,
    triangle: bool = False,
) -> RangePlan:
    """Checks a range search's inputs and options, then plans it on the CPU (where CUDA is available too: the
    screen is the CPU's).

    Raises:
        InvalidInputError: a bad option, incompatible inputs, or no compiled kernel here.
        MemoryBudgetError: the budget is too small for even one query at a time.
    """
    try:
        metric = check_metric(options.metric)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None
    bound = score_bound(threshold, metric)
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise InvalidInputError(f"k={cap!r}: expected a whole number >= 1")
    if options.precision not in ("exact", "fp32", "bf16"):
        raise InvalidInputError(f"precision {options.precision!r}: a range search is exact; leave --precision out")
    max_memory = options.max_memory
    if isinstance(max_memory, str):
        try:
            max_memory = parse_size(max_memory)
        except ValueError as exc:
            raise InvalidInputError(f"max_memory: {exc}") from None
    for name, value in (("batch_size", options.batch_size), ("chunk_size", options.chunk_size),
                        ("max_memory", max_memory)):  # fmt: skip
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidInputError(f"{name}={value!r}: expected a whole number >= 1")
    check_compatible(queries, docs)
    if options.exclude_self and queries.rows != docs.rows:
        raise InvalidInputError(
            f"exclude_self: {queries.rows} queries and {docs.rows} docs; expected the same rows (query i is doc i)"
        )
    if KERNEL is None:
        raise InvalidInputError(
            "range search runs on the CPU with tiny-knn's compiled kernel, which is not built here "
            "(reinstall tiny-knn with a C compiler present)"
        )
    if docs.rows >= MAX_KERNEL_DOCS:
        raise InvalidInputError(f"{docs.label()}: {docs.rows} rows; a range search takes fewer than 2**32 docs")
    backend = resolve(queries, docs, cap or 10, force_cpu=True, metric=metric, precision="exact")
    if backend.estimator == "triton":
        raise InvalidInputError("TINY_KNN_PRODUCT=triton: range search runs on the CPU's estimators only; unset it")
    assert backend.estimator is not None
    budget = max_memory if max_memory is not None else default_budget_bytes("cpu")
    there = available_bytes("cpu")
    if budget > there:
        warnings.warn(
            f"the memory budget ({format_bytes(budget)}) is more than the {format_bytes(there)} of RAM available; "
            "the run may swap or be killed",
            TinyKnnWarning,
            stacklevel=3,
        )
    cap = None if cap is None else min(cap, docs.rows)
    held = int(min(MAX_HELD_PAIRS, max(MIN_HELD_PAIRS, budget * HELD_BUDGET_SHARE // HELD_PAIR_BYTES)))
    try:
        sizes = _sizes(queries.rows, docs.rows, queries.dim, budget, backend.threads, cap, held, options)
    except ValueError as exc:
        raise MemoryBudgetError(str(exc)) from None
    batch, block, chunk, peak = sizes
    search = Plan(
        device="cpu",
        compute_dtype=torch.float32,
        k=cap or 0,
        queries=queries.rows,
        docs=docs.rows,
        dim=queries.dim,
        query_batch_rows=batch,
        query_block_rows=block,
        doc_chunk_rows=chunk,
        selection="threshold",
        threshold_sample_docs=0,
        budget_bytes=budget,
        peak_bytes=peak,
        metric=metric,
        exclude_self=options.exclude_self,
        search_k=cap or 0,
        estimator=backend.estimator,
        estimator_choice=backend.choice,
        threads=backend.threads,
    )
    return RangePlan(search, bound, cap, held, triangle)


def _sizes(
    queries: int, docs: int, dim: int, budget: int, threads: int, cap: int | None, held: int, options: SearchOptions
) -> tuple[int, int, int, int]:
    """(batch rows, block rows per thread, chunk rows, peak bytes) that fit the budget, with as many query rows
    per pass over the docs as it allows. The selection's state per row is a capped pool (top-k's, and its k
    pairs at the end of the batch) or an uncapped one, a chunk's docs and a margin."""
    chunk = round_up(options.chunk_size, COL_ALIGN) if options.chunk_size else CPU_DOC_CHUNK_ROWS
    chunk = min(chunk, round_up(docs, COL_ALIGN))
    block = min(CPU_THREAD_BLOCK_ROWS, round_up(-(-queries // threads), ROW_ALIGN))

    def cost(batch: int, block: int, chunk: int) -> int:
        if cap is None:
            state = (chunk + RANGE_K_MARGIN + RANGE_CAPACITY_MARGIN) * 8 + 8
        else:
            state = selection_state_bytes(cap, "threshold") + cap * (8 + 8 + 4)
        state += 24  # the batch's excluded pairs (its own row, where asked) and the row's count
        resident_queries = 2 * round_up(batch, ROW_ALIGN) * dim * 4  # the rows and the estimator's form
        doc_buffers = 2 * 2 * chunk * dim * 4  # two buffers, each with the estimator's form
        tiles = threads * block * min(chunk, CPU_TILE_DOCS) * 4
        return resident_queries + batch * state + doc_buffers + tiles + held * HELD_PAIR_BYTES

    while True:
        if options.batch_size:
            batch = min(options.batch_size, queries)
            break
        fixed = cost(0, block, chunk)
        per_row = -(-(cost(ROW_ALIGN, block, chunk) - fixed) // ROW_ALIGN)  # query rows are held in aligned blocks
        batch = min(queries, max(0, (budget - fixed) // per_row))
        while batch >= 1 and cost(batch, block, chunk) > budget:
            batch -= 1
        if batch >= 1:
            break
        if block <= ROW_ALIGN and (options.chunk_size or chunk <= COL_ALIGN):
            raise ValueError(
                f"memory budget {format_bytes(budget)} is too small for a range search: even one query at a time "
                f"needs about {format_bytes(cost(1, ROW_ALIGN, chunk))}; raise --max-memory"
            )
        block = max(ROW_ALIGN, round_up(block // 2, ROW_ALIGN))
        if not options.chunk_size:
            chunk = max(COL_ALIGN, round_up(chunk // 2, COL_ALIGN))
    block = min(block, round_up(-(-batch // threads), ROW_ALIGN))
    return batch, block, chunk, cost(batch, block, chunk)


# ---- Selection.


class RangeSelector(ThresholdTopK):
    """ThresholdTopK's state (what the kernels take: thresholds, pools, capacity, fills, k) with a fixed threshold
    and pools larger than a chunk (see the module docstring), drained after each chunk."""

    def __init__(self, rows: int, chunk_docs: int, threshold: float, threads: int, excluded: Exclusions | None) -> None:
        k = round_up(chunk_docs, COL_ALIGN) + RANGE_K_MARGIN
        RunningTopK.__init__(self, rows, k)
        assert KERNEL is not None
        # ThresholdTopK's attributes, sized here: its own pools would hold 2k keys, twice what a chunk needs
        self._lib = KERNEL
        self.capacity = k + RANGE_CAPACITY_MARGIN
        self._pools = torch.empty((rows, self.capacity), dtype=torch.int64)
        self._fills = torch.zeros(rows, dtype=torch.int32)
        self._thresholds = torch.full((rows,), threshold, dtype=torch.float32)
        self._start_thresholds = None
        self._uncertain = torch.empty(0, dtype=torch.int64)
        self._excluded = excluded
        self._threads = max(1, threads)
        self._executor = (
            ThreadPoolExecutor(self._threads, initializer=torch.set_num_threads, initargs=(1,))
            if self._threads > 1
            else None
        )
        self._scratch = []

    def drain(self, group_pairs: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Every pair the pools hold, as (rows, docs, scores) sorted by (row, doc), about group_pairs at a time;
        then empties the pools."""
        yield from _pool_pairs(self._pools, self._fills.numpy().astype(np.int64), group_pairs)
        self._fills.zero_()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()


class CappedSelector(ThresholdTopK):
    """Top-k's selector started at the radius: each row keeps its k best pairs in range (all of them where fewer
    are: such a row's pool was never compacted, so it holds every pair above the threshold)."""

    def __init__(self, rows: int, k: int, threshold: float, threads: int, excluded: Exclusions | None) -> None:
        start = torch.full((rows,), threshold, dtype=torch.float32)
        super().__init__(rows, k, threads=threads, start_thresholds=start, excluded=excluded)

    def pairs(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Each row's pairs in range (its k best where it has more), sorted by (row, doc)."""
        self._lib.tk_select_best(self._pools.data_ptr(), self.capacity, self._fills.data_ptr(), self.rows, self.k)
        counts = np.minimum(self._fills.numpy().astype(np.int64), self.k)
        yield from _pool_pairs(self._pools, counts, max(1, int(counts.sum())))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()


def _pool_pairs(
    pools: torch.Tensor, counts: np.ndarray, group_pairs: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The first counts[r] keys of each row's pool, decoded: (rows, docs, scores), sorted by (row, doc), in groups
    of whole rows of about group_pairs pairs (a row's pairs are never split)."""
    assert KERNEL is not None
    keys = pools.numpy().view(np.uint64)
    ends = np.cumsum(counts)
    total = int(ends[-1]) if ends.size else 0
    lo = 0
    while lo < counts.size:
        before = int(ends[lo - 1]) if lo else 0
        if before == total:
            break
        hi = min(counts.size, max(lo + 1, int(np.searchsorted(ends, before + group_pairs, side="right"))))
        row_counts = counts[lo:hi]
        pairs = int(row_counts.sum())
        if pairs:
            rows = np.repeat(np.arange(lo, hi, dtype=np.int64), row_counts)
            within = np.arange(pairs, dtype=np.int64) - np.repeat(np.cumsum(row_counts) - row_counts, row_counts)
            picked = np.ascontiguousarray(keys[rows, within])
            scores = np.empty(pairs, dtype=np.float32)
            docs = np.empty(pairs, dtype=np.int64)
            KERNEL.tk_decode(picked.ctypes.data, pairs, scores.ctypes.data, docs.ctypes.data)
            del picked, within
            # The screens append a row's keys in doc order; a capped pool's selection moved them
            order_key = rows * MAX_KERNEL_DOCS + docs
            if pairs > 1 and not bool((order_key[1:] > order_key[:-1]).all()):
                order = np.argsort(order_key, kind="stable")
                rows, docs, scores = rows[order], docs[order], scores[order]
            yield rows, docs, scores
        lo = hi


# ---- The search.


def search_ranges(
    queries: Source,
    docs: Source,
    plan: RangePlan,
    sink: PairSink,
    on_docs_scored: Callable[[int], None] | None = None,
    excluded: Exclusions | None = None,
) -> None:
    """Runs a range search batch by batch from sink.done_rows, handing every pair in range to `sink`.

    `excluded`: pairs never returned, by the whole query file's rows and doc file's rows.
    """
    search = plan.search
    assert search.estimator is not None
    with matmul_precision("medium" if search.estimator == "torch-bf16" else "highest"):
        for batch_start in range(sink.done_rows, queries.rows, search.query_batch_rows):
            batch_stop = min(batch_start + search.query_batch_rows, queries.rows)
            sink.begin_batch(batch_start, batch_stop)
            _range_batch(queries, docs, batch_start, batch_stop, plan, sink, on_docs_scored, excluded)
            sink.end_batch()


def _range_batch(
    queries: Source,
    docs: Source,
    batch_start: int,
    batch_stop: int,
    plan: RangePlan,
    sink: PairSink,
    on_docs_scored: Callable[[int], None] | None,
    excluded: Exclusions | None,
) -> None:
    search = plan.search
    assert search.estimator is not None
    rows = batch_stop - batch_start
    host_queries = torch.zeros((round_up(rows, ROW_ALIGN), queries.dim), dtype=torch.float32)
    queries.read_into(batch_start, batch_stop, host_queries)
    if search.metric == "cosine":
        normalize(host_queries[:rows])
    # A self search of each row against the rows after it reads the docs from the batch's first row on; the
    # pairs at or below the diagonal of the batch's own block are dropped as they are drained.
    doc_offset = batch_start if plan.triangle else 0
    doc_view = RowRange(docs, batch_start, docs.rows) if plan.triangle else docs
    batch_excluded = _batch_exclusions(excluded, batch_start, batch_stop, docs.rows, search.exclude_self)
    estimator = make_estimator(search.estimator, search.metric, docs.dim, search.query_block_rows, search.tile_docs)
    operand = estimator.prepare(host_queries, query=True)
    threshold = plan.selection_threshold
    selector: RangeSelector | CappedSelector
    if plan.cap is None:
        selector = RangeSelector(rows, search.doc_chunk_rows, threshold, search.threads, batch_excluded)
    else:
        selector = CappedSelector(rows, plan.cap, threshold, search.threads, batch_excluded)
    group = max(1, plan.held_pairs // 4)

    def emit(local_rows: np.ndarray, local_docs: np.ndarray, scores: np.ndarray) -> None:
        query_rows, doc_rows = local_rows + batch_start, local_docs + doc_offset
        if search.metric == "l2":
            scores = np.float32(0) - scores  # the selection kept -distance; 0 - x: no -0.0 for a distance of 0
        if plan.triangle:
            after = doc_rows > query_rows
            query_rows, doc_rows, scores = query_rows[after], doc_rows[after], scores[after]
        if query_rows.size:
            sink.add(query_rows, doc_rows, scores)

    try:
        for first_doc, doc_count, doc_operand in _chunks(doc_view, search, estimator):
            if selector.add_chunk(estimator, operand, doc_operand, first_doc, doc_count):
                refuse_non_finite(doc_view, first_doc, doc_count, search)
            if isinstance(selector, RangeSelector):
                for found in selector.drain(group):
                    emit(*found)
            scored(doc_view, first_doc, doc_count, on_docs_scored)
        if isinstance(selector, CappedSelector):
            for found in selector.pairs():
                emit(*found)
    finally:
        selector.close()


def _chunks(docs: Source, search: Plan, estimator: Estimator) -> Iterator[tuple[int, int, Operand]]:
    """The doc chunks, read ahead and prepared for the estimator (cosine rows scaled to unit length)."""

    def prepare(buffer: torch.Tensor, count: int, slot: int) -> tuple[Any, None, float]:
        if search.metric == "cosine":
            normalize(buffer[:count])
        return estimator.prepare(buffer, query=False, slot=slot), None, 0.0

    for first_doc, doc_count, operand, _, _, _ in host_chunks(docs, search, prepare, check=False):
        yield first_doc, doc_count, operand


def _batch_exclusions(
    excluded: Exclusions | None, batch_start: int, batch_stop: int, doc_rows: int, exclude_self: bool
) -> Exclusions | None:
    """The batch's excluded pairs (its rows from 0): the given ones, and each query's own row where asked."""
    rows = batch_stop - batch_start
    batch_rows = np.arange(batch_start, batch_stop, dtype=np.int64)
    if excluded is None and not exclude_self:
        return None
    owners, pair_docs = [], []
    if excluded is not None:
        mine = excluded.rows(batch_rows, 0, doc_rows)
        owners.append(np.repeat(np.arange(rows, dtype=np.int64), mine.count()))
        pair_docs.append(mine.docs)
    if exclude_self:
        owners.append(np.arange(rows, dtype=np.int64))
        pair_docs.append(batch_rows)
    return Exclusions.from_pairs(np.concatenate(owners), np.concatenate(pair_docs), rows)


def run_ranges(
    queries: Source,
    docs: Source,
    plan: RangePlan,
    sink: PairSink,
    progress: bool,
    excluded: Exclusions | None = None,
    found_before: int = 0,
) -> None:
    """search_ranges, with a progress bar on stderr counting docs scored and the pairs found so far
    (`found_before`: those a resumed run already holds)."""
    if not progress:
        search_ranges(queries, docs, plan, sink, excluded=excluded)
        return
    search = plan.search
    starts = range(sink.done_rows, queries.rows, search.query_batch_rows)
    total = sum(plan.docs_for(start) for start in starts)
    counting = _CountingSink(sink, found_before)
    with tqdm(total=total, unit="docs", unit_scale=True, desc="tiny-knn", dynamic_ncols=True) as bar:

        def scored(count: int) -> None:
            bar.set_postfix_str(f"{counting.pairs:,} pairs", refresh=False)
            bar.update(count)

        search_ranges(queries, docs, plan, counting, on_docs_scored=scored, excluded=excluded)


class _CountingSink:
    """A sink that counts the pairs it passes on."""

    def __init__(self, sink: PairSink, found_before: int) -> None:
        self._sink = sink
        self.pairs = found_before

    @property
    def done_rows(self) -> int:
        return self._sink.done_rows

    def begin_batch(self, start: int, stop: int) -> None:
        self._sink.begin_batch(start, stop)

    def add(self, queries: np.ndarray, docs: np.ndarray, scores: np.ndarray) -> None:
        self.pairs += queries.size
        self._sink.add(queries, docs, scores)

    def end_batch(self) -> None:
        self._sink.end_batch()


# ---- Estimating the pair count.


def estimate_pairs(queries: Source, docs: Source, plan: RangePlan) -> tuple[int, str]:
    """About how many pairs the search will find, from every exact score of a strided sample of the queries by a
    strided sample of the docs, scaled up (rough where pairs are rare or clustered). Returns (the estimate, how
    it was made, in words)."""
    assert KERNEL is not None
    search = plan.search
    query_positions = _strided(queries.rows, ESTIMATE_QUERY_ROWS)
    doc_positions = _strided(docs.rows, ESTIMATE_DOC_ROWS)
    sample_queries = torch.empty((query_positions.numel(), queries.dim), dtype=torch.float32)
    sample_docs = torch.empty((doc_positions.numel(), docs.dim), dtype=torch.float32)
    queries.read_rows(query_positions, sample_queries)
    docs.read_rows(doc_positions, sample_docs)
    if search.metric == "cosine":
        normalize(sample_queries)
        normalize(sample_docs)
    scores = torch.empty((sample_queries.shape[0], sample_docs.shape[0]), dtype=torch.float32)
    done = KERNEL.tk_exact_tile(
        -1, int(search.metric == "l2"), sample_queries.data_ptr(), sample_queries.stride(0), sample_queries.shape[0],
        sample_docs.data_ptr(), sample_docs.stride(0), sample_docs.shape[0], docs.dim, scores.data_ptr(),
        scores.stride(0),
    )  # fmt: skip
    assert done == 0
    hit = in_range(scores.numpy(), plan.bound, search.metric)
    query_at, doc_at = query_positions.numpy()[:, None], doc_positions.numpy()[None, :]
    counted = np.ones(hit.shape, dtype=bool)
    if plan.triangle:
        counted = doc_at > query_at
        population = queries.rows * (queries.rows - 1) // 2
    else:
        if search.exclude_self:
            counted = doc_at != query_at
        population = queries.rows * (docs.rows - int(search.exclude_self))
    sampled, found = int(counted.sum()), int((hit & counted).sum())
    estimate = round(found / sampled * population) if sampled else 0
    if plan.cap is not None:
        estimate = min(estimate, plan.cap * queries.rows)
    spread = f" (+/- {round(math.sqrt(found) / sampled * population):,})" if found else ""
    return estimate, f"about {estimate:,} pairs{spread}: {found:,} in range among {sampled:,} sampled pairs"


def _strided(rows: int, wanted: int) -> torch.Tensor:
    count = min(rows, wanted)
    return torch.arange(count, dtype=torch.int64) * rows // count


def describe_source_reads(queries: Source, docs: Source, plan: RangePlan) -> str:
    """What the search reads, for --dry-run."""
    doc_bytes = docs.nbytes * plan.doc_reads() // max(1, docs.rows)
    return (
        f"reads: queries {format_bytes(queries.nbytes)} once, docs {format_bytes(docs.nbytes)} "
        f"x {plan.search.doc_passes} pass(es) = {format_bytes(doc_bytes)}"
    )
