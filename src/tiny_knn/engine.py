"""Searching: the streaming loop. For each batch of queries, stream the docs in chunks, score each
(query block x doc chunk) tile with one matrix product, and offer the tile to the running top-k.

A background thread reads the next doc chunk from disk (page cache) while the current one is scored.
Tiles are padded to the plan's alignment so that every score is computed by the same kind of product
whatever the block sizes (see plan.py). The engine knows nothing of file formats: a Source hands it rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .plan import COL_ALIGN, ROW_ALIGN, Plan, round_up, threshold_sample_rank
from .sources import Source
from .topk import RunningTopK, make_running_topk

ProgressCallback = Callable[[int], None]


def search(
    queries: Source, docs: Source, plan: Plan, on_docs_scored: ProgressCallback | None = None
) -> tuple[torch.Tensor, torch.Tensor, Plan]:
    """Runs the plan. Returns (scores float32 (Q, k), indices int64 (Q, k), the plan actually used).

    On CUDA, running out of device memory halves the blocks and retries the current batch; the returned
    plan says which blocks were used in the end.
    """
    with _full_float32_products():
        return _search_batches(queries, docs, plan, on_docs_scored)


@contextlib.contextmanager
def _full_float32_products() -> Iterator[None]:
    """Exact float32 matrix products for the duration: TF32 off, whatever the caller had set globally."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _search_batches(
    queries: Source, docs: Source, plan: Plan, on_docs_scored: ProgressCallback | None
) -> tuple[torch.Tensor, torch.Tensor, Plan]:
    scores = torch.empty((queries.rows, plan.k), dtype=torch.float32)
    indices = torch.empty((queries.rows, plan.k), dtype=torch.int64)
    for batch_start in range(0, queries.rows, plan.query_batch_rows):
        batch_stop = min(batch_start + plan.query_batch_rows, queries.rows)
        while True:
            try:
                batch_scores, batch_indices = _search_batch(
                    queries, docs, batch_start, batch_stop, plan, on_docs_scored
                )
                break
            except torch.cuda.OutOfMemoryError:
                if plan.device != "cuda":
                    raise
                torch.cuda.empty_cache()
                plan = plan.halved()
        scores[batch_start:batch_stop] = batch_scores
        indices[batch_start:batch_stop] = batch_indices
    return scores, indices, plan


def _search_batch(
    queries: Source,
    docs: Source,
    batch_start: int,
    batch_stop: int,
    plan: Plan,
    on_docs_scored: ProgressCallback | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    device = torch.device(plan.device)
    rows = batch_stop - batch_start
    # Zero rows pad the last block up to the alignment; their scores are never offered.
    host_queries = torch.zeros((round_up(rows, ROW_ALIGN), queries.dim), dtype=plan.compute_dtype)
    queries.read_into(batch_start, batch_stop, host_queries)
    query_rows = host_queries.to(device)
    start_thresholds = _sampled_thresholds(query_rows, rows, docs, plan) if plan.threshold_sample_docs else None
    running = _search_rows(query_rows, rows, docs, plan, on_docs_scored, start_thresholds)
    scores, indices = running.result()
    uncertain = running.uncertain_rows()
    if uncertain.numel():
        # The sampled estimate was too high for these rows: search them again from scratch.
        redo_queries = torch.zeros((round_up(uncertain.numel(), ROW_ALIGN), queries.dim), dtype=plan.compute_dtype)
        redo_queries[: uncertain.numel()] = host_queries[uncertain]
        redo = _search_rows(redo_queries.to(device), uncertain.numel(), docs, plan, None, None)
        scores[uncertain], indices[uncertain] = redo.result()
    return scores, indices


def _search_rows(
    query_rows: torch.Tensor,
    rows: int,
    docs: Source,
    plan: Plan,
    on_docs_scored: ProgressCallback | None,
    start_thresholds: torch.Tensor | None,
) -> RunningTopK:
    """One pass over the docs for `rows` queries (query_rows is zero-padded to the alignment)."""
    device = query_rows.device
    running = make_running_topk(rows, plan.k, device, docs.rows, plan.selection, start_thresholds)
    tile_storage = torch.empty(plan.query_block_rows * plan.doc_chunk_rows, dtype=torch.float32, device=device)
    for first_doc, doc_count, chunk in _doc_chunks(docs, plan, device):
        padded_docs = round_up(doc_count, COL_ALIGN)
        doc_rows_t = chunk[:padded_docs].T
        for block_start in range(0, rows, plan.query_block_rows):
            block_rows = min(plan.query_block_rows, rows - block_start)
            padded_rows = round_up(block_rows, ROW_ALIGN)
            tile = tile_storage[: padded_rows * padded_docs].view(padded_rows, padded_docs)
            torch.mm(query_rows[block_start : block_start + padded_rows], doc_rows_t, out=tile)
            running.add(tile[:block_rows, :doc_count], block_start, first_doc)
        if on_docs_scored is not None:
            on_docs_scored(doc_count)
    return running


def _sampled_thresholds(query_rows: torch.Tensor, rows: int, docs: Source, plan: Plan) -> torch.Tensor:
    """Per query, a score that probably at least k docs beat: a high rank within a strided doc sample.

    Only an estimate: the selector certifies each row afterwards (see ThresholdTopK).
    """
    sample = plan.threshold_sample_docs
    positions = torch.arange(sample, dtype=torch.int64) * docs.rows // sample
    sample_docs = torch.zeros((sample, docs.dim), dtype=plan.compute_dtype)
    docs.read_rows(positions, sample_docs)
    sample_docs_t = sample_docs.to(query_rows.device).T
    rank = threshold_sample_rank(docs.rows, plan.k, sample)
    thresholds = torch.empty(rows, dtype=torch.float32)
    for block_start in range(0, rows, plan.query_block_rows):
        block_rows = min(plan.query_block_rows, rows - block_start)
        padded_rows = round_up(block_rows, ROW_ALIGN)
        scores = query_rows[block_start : block_start + padded_rows] @ sample_docs_t
        thresholds[block_start : block_start + block_rows] = scores[:block_rows].topk(rank, dim=1).values[:, -1].cpu()
    return thresholds


def _doc_chunks(docs: Source, plan: Plan, device: torch.device) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yields (first_doc, doc_count, chunk) with the next chunk already being read on another thread.

    `chunk` holds doc_count rows followed by zero rows up to the alignment; it is reused two chunks later,
    so the caller must be done with it before asking for the next-but-one.
    """
    chunk_rows = plan.doc_chunk_rows
    pin = device.type == "cuda"
    buffers = [torch.zeros((chunk_rows, docs.dim), dtype=plan.compute_dtype, pin_memory=pin) for _ in range(2)]
    starts = range(0, docs.rows, chunk_rows)

    def read(index: int) -> tuple[int, int, torch.Tensor]:
        start = starts[index]
        count = min(chunk_rows, docs.rows - start)
        buffer = buffers[index % 2]
        docs.read_into(start, start + count, buffer)
        buffer[count : round_up(count, COL_ALIGN)].numpy().fill(0)
        return start, count, buffer

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiny-knn-read") as reader:
        pending: Future[tuple[int, int, torch.Tensor]] = reader.submit(read, 0)
        for index in range(len(starts)):
            start, count, buffer = pending.result()
            if index + 1 < len(starts):
                # The other buffer was last used by the previous chunk, whose tiles are fully scored.
                pending = reader.submit(read, index + 1)
            yield start, count, buffer if device.type == "cpu" else buffer.to(device)
