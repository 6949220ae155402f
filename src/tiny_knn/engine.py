"""Searching: the streaming loop. For each batch of queries, stream the docs in chunks and offer every (query,
doc) pair of each chunk to the running top-k, by one of three paths (chosen by the plan, `Plan.estimator`):

- screened (the CPU, with the compiled kernel): an estimator (estimators.py) estimates every pair within a proven
  bound, and only the pairs the bound cannot rule out are scored exactly (tiny-knn's one definition of a score,
  _kernels/tk.h) and selected, on the selector's threads, each its own query rows. The answer is that of scoring
  every pair exactly: the same bits whatever the estimator, threads, batches or chunks.
- by search keys (a GPU; the CPU without the kernel; --precision bf16-unsafe): one matrix product per (query
  block x doc chunk) tile, whose values are the keys selected; for l2 the candidates are then re-scored exactly
  and certified (refine.py).
- the GPU's screen (TINY_KNN_PRODUCT=triton, gpu_engine.py): the screened path's design in Triton kernels, with
  the same answer, bit for bit.

Excluded pairs (exclusions.py) are never offered to the screened path's selection; on the path by keys their
products are set to -inf before the selection sees them, so they take no place from another doc. A query left
with fewer than k docs is padded with index -1 (score -inf; +inf for l2).

A background thread (streaming.py) reads the next doc chunk from disk (page cache) while the current one is scored,
and on the screened path prepares it for the estimator. The engine knows nothing of file formats: a Source hands it
rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from . import gpu_engine
from .estimators import Estimator, Operand, make_estimator
from .exclusions import Exclusions, drop_excluded, mask_excluded
from .kernel import KERNEL
from .metrics import normalize, prepare_docs, round_to_bfloat16
from .plan import (
    COL_ALIGN,
    REFINE_WIDENING,
    ROW_ALIGN,
    Plan,
    doc_tiles,
    round_up,
)
from .refine import drop_self, exact_search, refine
from .sources import Source, from_array
from .store import MemoryStore, Store
from .streaming import (
    Chunk,
    ProgressCallback,
    host_chunks,
    on_device,
    read_pieces,
    refuse_non_finite,
    sample_positions,
    scored,
    threshold_sample,
)
from .topk import RunningTopK, SortMergeTopK, ThresholdTopK, make_running_topk


def search(
    queries: Source,
    docs: Source,
    plan: Plan,
    on_docs_scored: ProgressCallback | None = None,
    store: Store | None = None,
    excluded: Exclusions | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Plan]:
    """Runs the plan. Returns (scores float32 (Q, k), indices int64 (Q, k), the plan actually used).

    `excluded`: pairs left out, by the whole query file's rows and doc file's rows.

    Each finished query batch is handed to `store` (default: kept in memory); the search starts after the
    rows the store already holds, which is how a checkpoint resumes. Running out of device memory retries the
    current batch with a smaller plan (Plan.halved: blocks, chunks or the query batch); the returned plan says
    which sizes were used last.
    """
    store = store if store is not None else MemoryStore(queries.rows, plan.k)
    with matmul_precision("medium" if plan.estimator == "torch-bf16" else "highest"):
        plan = _search_batches(queries, docs, plan, on_docs_scored, store, excluded)
    return store.scores, store.indices, plan


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """torch's float32 matmul precision for the duration, whatever the caller had set globally: "highest" (no
    TF32, no bfloat16) for products whose values are keys or float32 estimates; "medium" for the torch-bf16
    estimator (bfloat16 products, summed in float32), whose bound covers it."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _search_batches(
    queries: Source,
    docs: Source,
    plan: Plan,
    on_docs_scored: ProgressCallback | None,
    store: Store,
    excluded: Exclusions | None,
) -> Plan:
    batch_start = store.done_rows
    resident = gpu_engine.ResidentDocs() if plan.docs_resident else None  # the GPU screen's docs, kept
    while batch_start < queries.rows:
        batch_stop = min(batch_start + plan.query_batch_rows, queries.rows)
        try:
            found = _search_batch(queries, docs, batch_start, batch_stop, plan, on_docs_scored, excluded, resident)
        except torch.cuda.OutOfMemoryError:
            found = None  # handled below, once the exception no longer holds the batch's tensors
        if found is None:
            # The batches saved are kept; this one is searched again by a smaller plan (Plan.halved: resident docs
            # given up first, then the query batch too, where its pools are what filled the device)
            resident = None
            _release_device_memory()
            plan = plan.halved()
            resident = gpu_engine.ResidentDocs() if plan.docs_resident else None
            continue
        store.save(batch_start, *found)
        del found  # not alive while the next batch runs: memory is one batch's
        batch_start = batch_stop
    return plan


def _release_device_memory() -> None:
    """Hands the allocator's cached blocks back to the GPU, after running out of its memory."""
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.empty_cache()


def _search_batch(
    queries: Source,
    docs: Source,
    batch_start: int,
    batch_stop: int,
    plan: Plan,
    on_docs_scored: ProgressCallback | None,
    excluded: Exclusions | None,
    resident: gpu_engine.ResidentDocs | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = batch_stop - batch_start
    # Zero rows pad the last block up to the alignment; their scores are never offered.
    host_queries = torch.zeros((round_up(rows, ROW_ALIGN), queries.dim), dtype=plan.compute_dtype)
    queries.read_into(batch_start, batch_stop, host_queries)
    if plan.metric == "cosine":
        normalize(host_queries[:rows])
    if excluded is not None:  # this batch's, by the docs' own rows (a share's from 0)
        batch_rows = np.arange(batch_start, batch_stop, dtype=np.int64) + queries.first_row
        excluded = excluded.rows(batch_rows, docs.first_row, docs.rows)
    if plan.estimator == "triton":
        scores, indices = gpu_engine.search_screened(host_queries, rows, docs, plan, on_docs_scored, excluded, resident)
    elif plan.estimator is not None:
        scores, indices = _search_screened(host_queries, rows, docs, plan, on_docs_scored, excluded)
    else:
        scores, indices = _search_by_keys(host_queries, rows, docs, plan, on_docs_scored, excluded)
    if docs.first_row:
        indices[indices >= 0] += docs.first_row  # a share of the docs: global doc numbers from here on
    if plan.exclude_self:
        return drop_self(scores, indices, queries.first_row + batch_start, plan.k)
    return scores[:, : plan.k], indices[:, : plan.k]


# ---- The screened path.


def _search_screened(
    host_queries: torch.Tensor,
    rows: int,
    docs: Source,
    plan: Plan,
    on_docs_scored: ProgressCallback | None,
    excluded: Exclusions | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact answer for `rows` query rows (host_queries, zero-padded), with the plan's estimator, leaving out
    the `excluded` pairs."""
    assert plan.estimator is not None
    estimator = make_estimator(plan.estimator, plan.metric, docs.dim, plan.query_block_rows, plan.tile_docs)
    queries = estimator.prepare(host_queries, query=True)
    start_thresholds = (
        _sampled_thresholds(queries, rows, docs, plan, estimator, excluded) if plan.threshold_sample_docs else None
    )
    running = _screen(queries, rows, docs, plan, estimator, plan.candidates, on_docs_scored, start_thresholds, excluded)
    scores, indices = running.result()
    uncertain = running.uncertain_rows()
    if uncertain.numel():
        # The sampled estimate was too high for these rows, or fewer than k docs scored above -inf (or were left
        # after the exclusions): search them again from scratch.
        scores[uncertain], indices[uncertain] = _screen_again(host_queries, uncertain, docs, plan, estimator, excluded)
    if plan.metric == "l2":
        scores = 0 - scores  # the selection kept -distance, best first; 0 - x: no -0.0 for a distance of 0
    return scores, indices


def _screen(
    queries: Operand,
    rows: int,
    docs: Source,
    plan: Plan,
    estimator: Estimator,
    candidates: int,
    on_docs_scored: ProgressCallback | None,
    start_thresholds: torch.Tensor | None,
    excluded: Exclusions | None,
) -> ThresholdTopK:
    """One pass over the docs for `rows` query rows, keeping `candidates` per row, never offered the `excluded`
    pairs. Docs are read unchecked: a NaN or Inf in a doc makes its estimates NaN or its factors infinite, so the
    screen scores its pairs exactly, and an exact score that is not finite sends the chunk to be read again,
    checked, to name the row."""
    running = ThresholdTopK(rows, candidates, start_thresholds=start_thresholds, excluded=excluded)

    def prepare(buffer: torch.Tensor, count: int, slot: int) -> tuple[Any, None, float]:
        if plan.metric == "cosine":
            normalize(buffer[:count])
        return estimator.prepare(buffer, query=False, slot=slot), None, 0.0

    for first_doc, doc_count, operand, _, _, _ in host_chunks(docs, plan, prepare, check=False):
        if running.add_chunk(estimator, queries, operand, first_doc, doc_count):
            refuse_non_finite(docs, first_doc, doc_count, plan)
        scored(docs, first_doc, doc_count, on_docs_scored)
    return running


def _screen_again(
    host_queries: torch.Tensor,
    rows: torch.Tensor,
    docs: Source,
    plan: Plan,
    estimator: Estimator,
    excluded: Exclusions | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh pass for the given rows of host_queries; rows it cannot finish either (fewer than `candidates`
    docs score above -inf, or are left after the exclusions) get every exact score, sorted."""
    subset = torch.zeros((round_up(rows.numel(), ROW_ALIGN), host_queries.shape[1]), dtype=plan.compute_dtype)
    subset[: rows.numel()] = host_queries[rows]
    excluded = excluded.rows(rows.numpy()) if excluded is not None else None
    running = _screen(estimator.prepare(subset, query=True), rows.numel(), docs, plan, estimator, plan.candidates,
                      None, None, excluded)  # fmt: skip
    scores, indices = running.result()
    short = running.uncertain_rows()
    if short.numel():
        excluded = excluded.rows(short.numpy()) if excluded is not None else None
        scores[short], indices[short] = _every_exact_score(subset[short], docs, plan, excluded)
    return scores, indices


def _every_exact_score(
    query_rows: torch.Tensor, docs: Source, plan: Plan, excluded: Exclusions | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best `candidates` of every exact score (tk_dot, or -tk_l2) of the rows, by the sort selector, less the
    excluded pairs (index -1, score -inf where fewer are left): for rows so odd that fewer than k docs score above
    -inf, or are left at all."""
    assert KERNEL is not None
    running = SortMergeTopK(query_rows.shape[0], plan.candidates)
    rows = torch.empty((plan.doc_chunk_rows, docs.dim), dtype=torch.float32)
    for start in range(0, docs.rows, plan.doc_chunk_rows):
        count = min(plan.doc_chunk_rows, docs.rows - start)
        docs.read_into(start, start + count, rows)
        if plan.metric == "cosine":
            normalize(rows[:count])
        scores = torch.empty((query_rows.shape[0], count), dtype=torch.float32)
        KERNEL.tk_exact_tile(
            -1, int(plan.metric == "l2"), query_rows.data_ptr(), query_rows.stride(0), query_rows.shape[0],
            rows.data_ptr(), rows.stride(0), count, docs.dim, scores.data_ptr(), scores.stride(0),
        )  # fmt: skip
        if plan.metric == "l2":
            scores = -scores
        if excluded is not None:
            mask_excluded(scores, excluded, 0, start)
        running.add(scores, 0, start)
    if excluded is None:
        return running.result()
    return drop_excluded(*running.result(), excluded, plan.candidates, float("-inf"))


def _sampled_thresholds(
    queries: Operand, rows: int, docs: Source, plan: Plan, estimator: Estimator, excluded: Exclusions | None
) -> torch.Tensor:
    """Per query, an exact score that probably at least `candidates` docs reach: a high rank within a strided
    sample, found by the same search as the real one, over the sampled docs (less the excluded pairs).

    Only an estimate: the selector certifies each row afterwards (see ThresholdTopK).
    """
    sample_docs, rank = threshold_sample(docs, plan)
    if excluded is not None:
        excluded = excluded.sampled(sample_positions(docs, plan).numpy())
    running = _screen(queries, rows, from_array(sample_docs, "docs sample"), plan, estimator, rank, None, None,
                      excluded)  # fmt: skip
    return running.result()[0][:, -1]


# ---- The path by search keys.


def _search_by_keys(
    host_queries: torch.Tensor,
    rows: int,
    docs: Source,
    plan: Plan,
    on_docs_scored: ProgressCallback | None,
    excluded: Exclusions | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    device = torch.device(plan.device)
    multiplied = _multiplied_queries(host_queries, plan)
    query_rows = multiplied.to(device)
    start_thresholds = None
    if plan.threshold_sample_docs:
        sample_docs, rank = threshold_sample(docs, plan)
        in_sample = excluded.sampled(sample_positions(docs, plan).numpy()) if excluded is not None else None
        sample_source = from_array(sample_docs, "docs sample")
        sampled, _ = _search_rows(query_rows, rows, sample_source, plan, rank, None, None, excluded=in_sample)
        start_thresholds = sampled.result()[0][:, -1]
    running, largest_sq = _search_rows(
        query_rows, rows, docs, plan, plan.candidates, on_docs_scored, start_thresholds, excluded=excluded
    )
    scores, indices = running.result()
    uncertain = running.uncertain_rows()
    if uncertain.numel():
        # The sampled estimate was too high for these rows, or fewer than k docs scored above -inf (products
        # that overflow, or docs left after the exclusions): search them again from scratch.
        scores[uncertain], indices[uncertain] = _search_again(
            multiplied, uncertain, docs, plan, plan.candidates, excluded
        )
    if excluded is not None:  # excluded docs, -inf, fill the places of rows with too few others: padding
        scores, indices = drop_excluded(scores, indices, excluded, plan.candidates, float("-inf"))
    if plan.refined:
        scores, indices = _refine(host_queries[:rows], multiplied, docs, plan, scores, indices, largest_sq, excluded)
    return scores, indices


def _search_again(
    host_queries: torch.Tensor,
    rows: torch.Tensor,
    docs: Source,
    plan: Plan,
    candidates: int,
    excluded: Exclusions | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh pass over the docs for the given rows of host_queries, keeping `candidates` per row. Rows the
    threshold selector cannot finish (fewer than `candidates` docs score above -inf) take the sort selector."""
    excluded = excluded.rows(rows.numpy()) if excluded is not None else None
    scores, indices, short = _search_once(host_queries, rows, docs, plan, candidates, plan.selection, excluded)
    if short.numel():
        excluded = excluded.rows(short.numpy()) if excluded is not None else None
        scores[short], indices[short], _ = _search_once(
            host_queries, rows[short], docs, plan, candidates, "sort", excluded
        )
    return scores, indices


def _search_once(
    host_queries: torch.Tensor,
    rows: torch.Tensor,
    docs: Source,
    plan: Plan,
    candidates: int,
    selection: str,
    excluded: Exclusions | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass for the given rows with the given selector: scores, indices and the rows left uncertain."""
    redo_queries = torch.zeros((round_up(rows.numel(), ROW_ALIGN), host_queries.shape[1]), dtype=plan.compute_dtype)
    redo_queries[: rows.numel()] = host_queries[rows]
    device = torch.device(plan.device)
    running, _ = _search_rows(
        redo_queries.to(device), rows.numel(), docs, plan, candidates, None, None, selection, excluded
    )
    scores, indices = running.result()
    return scores, indices, running.uncertain_rows()


def _multiplied_queries(host_queries: torch.Tensor, plan: Plan) -> torch.Tensor:
    """The query rows as the matrix product sees them: rounded to bfloat16 with --precision bf16-unsafe."""
    if plan.precision != "bf16-unsafe":
        return host_queries
    rounded = host_queries.clone()
    round_to_bfloat16(rounded.numpy())
    return rounded


def _refine(
    query_rows: torch.Tensor,
    multiplied: torch.Tensor,
    docs: Source,
    plan: Plan,
    keys: torch.Tensor,
    indices: torch.Tensor,
    largest_sq: float,
    excluded: Exclusions | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact l2 distances for every row, nearest first, certified (refine.py). Rows that fail are searched again
    with four times the candidates; rows that fail again, and rows whose candidates the exclusions left short
    (padding: index -1), get the exact streamed search."""
    keep = plan.k + int(plan.exclude_self)
    max_doc_norm = largest_sq**0.5
    short = torch.nonzero((indices < 0).any(dim=1)).flatten()
    scores, indices, uncertain = refine(query_rows, docs, keys, indices.clamp(min=0), max_doc_norm, keep)
    scores, indices = scores[:, :keep], indices[:, :keep]
    if short.numel():
        uncertain = uncertain[~torch.isin(uncertain, short)]
    wide = min(docs.rows, REFINE_WIDENING * plan.candidates)
    group = max(1, plan.query_batch_rows // REFINE_WIDENING)  # the batch's memory for selection state, no more
    failed = [short]
    for rows in torch.split(uncertain, group) if uncertain.numel() else ():
        wide_keys, wide_indices = _search_again(multiplied, rows, docs, plan, wide, excluded)
        if excluded is not None:
            wide_keys, wide_indices = drop_excluded(wide_keys, wide_indices, excluded.rows(rows.numpy()), wide,
                                                    float("-inf"))  # fmt: skip
            failed.append(rows[(wide_indices < 0).any(dim=1)])
        redone, redone_indices, still = refine(
            query_rows[rows], docs, wide_keys, wide_indices.clamp(min=0), max_doc_norm, keep
        )
        scores[rows], indices[rows] = redone[:, :keep], redone_indices[:, :keep]
        failed.append(rows[still])
    uncertain = torch.unique(torch.cat(failed))
    if uncertain.numel():
        excluded = excluded.rows(uncertain.numpy()) if excluded is not None else None
        scores[uncertain], indices[uncertain] = exact_search(query_rows[uncertain], docs, keep, "l2", excluded)
    return scores, indices


def _search_rows(
    query_rows: torch.Tensor,
    rows: int,
    docs: Source,
    plan: Plan,
    candidates: int,
    on_docs_scored: ProgressCallback | None,
    start_thresholds: torch.Tensor | None,
    selection: str | None = None,
    excluded: Exclusions | None = None,
) -> tuple[RunningTopK, float]:
    """One pass over the docs for `rows` queries (query_rows is zero-padded to the alignment), keeping
    `candidates` per row by their keys: torch.mm's products (less half the doc's squared norm for l2), the
    `excluded` pairs' set to -inf. Also returns the largest squared doc norm seen, where refinement needs it
    (else 0)."""
    device = query_rows.device
    running = make_running_topk(rows, candidates, device, docs.rows, selection or plan.selection, start_thresholds)
    # The threshold selector scans tiles at most tile_docs wide (they stay in cache); the others a whole chunk.
    width = plan.tile_docs if plan.selection == "threshold" and device.type == "cpu" else plan.doc_chunk_rows
    tile_storage = torch.empty(
        round_up(min(rows, plan.query_block_rows), ROW_ALIGN) * min(width, plan.doc_chunk_rows),
        dtype=torch.float32,
        device=device,
    )
    largest_sq = 0.0
    for first_doc, doc_count, doc_rows, offsets, chunk_largest_sq in _doc_chunks(docs, plan, device):
        padded_docs = round_up(doc_count, COL_ALIGN)
        largest_sq = max(largest_sq, chunk_largest_sq)
        for block_start in range(0, rows, plan.query_block_rows):
            block_rows = min(plan.query_block_rows, rows - block_start)
            padded_rows = round_up(block_rows, ROW_ALIGN)
            for doc_lo, doc_hi, real in doc_tiles(doc_count, padded_docs, width):
                tile = tile_storage[: padded_rows * (doc_hi - doc_lo)].view(padded_rows, doc_hi - doc_lo)
                torch.mm(query_rows[block_start : block_start + padded_rows], doc_rows[doc_lo:doc_hi].T, out=tile)
                if offsets is not None:
                    tile.sub_(offsets[doc_lo:doc_hi])
                if excluded is not None:
                    mask_excluded(tile[:block_rows, :real], excluded, block_start, first_doc + doc_lo)
                running.add(tile[:block_rows, :real], block_start, first_doc + doc_lo)
        scored(docs, first_doc, doc_count, on_docs_scored)
    return running, largest_sq


def _doc_chunks(docs: Source, plan: Plan, device: torch.device) -> Iterator[Chunk]:
    """For the path by keys: yields (first_doc, doc_count, rows, key offsets, largest squared norm), the rows
    prepared for the metric and precision (prepare_docs) and followed by zero rows up to the alignment, with the
    next chunk already being read on another thread (and, on a GPU, already being copied to it on a side stream).
    On the CPU the rows are reused two chunks later, so the caller must be done with them before asking for the
    next-but-one."""
    cuda = device.type == "cuda"

    def prepare(buffer: torch.Tensor, count: int, slot: int) -> tuple[Any, torch.Tensor | None, float]:
        offsets, largest_sq = prepare_docs(buffer[:count], plan.metric, plan.precision)
        if offsets is None:
            return buffer, None, largest_sq
        padded = torch.zeros(buffer.shape[0], dtype=torch.float32)
        padded[:count] = offsets
        return buffer, padded, largest_sq

    yield from on_device(host_chunks(docs, plan, prepare, check=True, pinned=cuda, pieces=read_pieces(device)), device)
