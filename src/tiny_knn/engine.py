"""Searching: the streaming loop. For each batch of queries, stream the docs in chunks, score each
(query block x doc chunk) tile with one matrix product, and offer the tile to the running top-k.

On the CPU, with the threshold selector, the selector's threads do the products too: each multiplies its own
query rows by the chunk, a block at a time, and scans the block's tile while it is still in cache.

A background thread reads the next doc chunk from disk (page cache) while the current one is scored.
Tiles are padded to the plan's alignment so that every score is computed by the same kind of product
whatever the block sizes (see plan.py). The engine knows nothing of file formats: a Source hands it rows.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from .metrics import prepare_docs, prepare_queries, round_to_bfloat16
from .plan import (
    COL_ALIGN,
    CPU_TILE_DOCS,
    REFINE_WIDENING,
    ROW_ALIGN,
    Plan,
    doc_tiles,
    fuse_products,
    round_up,
    threshold_sample_rank,
)
from .product import KernelProduct, Operand, ScreenedDocs, ScreenedProduct, TorchProduct, make_product
from .refine import drop_self, exact_search, refine
from .sources import Source, from_array
from .store import MemoryStore, Store
from .topk import RunningTopK, ThresholdTopK, make_running_topk

ProgressCallback = Callable[[int], None]

# Threads that read each doc chunk for a GPU, in pieces (at most half the cores).
GPU_READ_THREADS = 8


def search(
    queries: Source,
    docs: Source,
    plan: Plan,
    on_docs_scored: ProgressCallback | None = None,
    store: Store | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Plan]:
    """Runs the plan. Returns (scores float32 (Q, k), indices int64 (Q, k), the plan actually used).

    Each finished query batch is handed to `store` (default: kept in memory); the search starts after the
    rows the store already holds, which is how a checkpoint resumes. On CUDA, running out of device
    memory halves the blocks and retries the current batch; the returned plan says which blocks were used.
    """
    store = store if store is not None else MemoryStore(queries.rows, plan.k)
    with _full_float32_products():
        plan = _search_batches(queries, docs, plan, on_docs_scored, store)
    return store.scores, store.indices, plan


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
    queries: Source, docs: Source, plan: Plan, on_docs_scored: ProgressCallback | None, store: Store
) -> Plan:
    for batch_start in range(store.done_rows, queries.rows, plan.query_batch_rows):
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
        store.save(batch_start, batch_scores, batch_indices)
        del batch_scores, batch_indices  # not alive while the next batch runs: memory is one batch's
    return plan


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
    prepare_queries(host_queries[:rows], plan.metric)
    multiplied = _multiplied_queries(host_queries, plan)
    query_rows = multiplied.to(device)
    product = make_product(query_rows, plan.product)  # the queries packed once, for the sample and the pass
    start_thresholds = (
        _sampled_thresholds(query_rows, rows, docs, plan, product) if plan.threshold_sample_docs else None
    )
    running, largest_sq = _search_rows(
        query_rows, rows, docs, plan, plan.candidates, on_docs_scored, start_thresholds, product=product
    )
    scores, indices = running.result()
    uncertain = running.uncertain_rows()
    if uncertain.numel():
        # The sampled estimate was too high for these rows, or fewer than k docs scored above -inf (products
        # that overflow): search them again from scratch.
        scores[uncertain], indices[uncertain] = _search_again(multiplied, uncertain, docs, plan, plan.candidates)
    if plan.refined:
        scores, indices = _refine(host_queries[:rows], multiplied, docs, plan, scores, indices, largest_sq)
    if docs.first_row:
        indices += docs.first_row  # a share of the docs: global doc numbers from here on
    if plan.exclude_self:
        return drop_self(scores, indices, queries.first_row + batch_start, plan.k)
    return scores[:, : plan.k], indices[:, : plan.k]


def _search_again(
    host_queries: torch.Tensor, rows: torch.Tensor, docs: Source, plan: Plan, candidates: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh pass over the docs for the given rows of host_queries, keeping `candidates` per row. Rows the
    threshold selector cannot finish (fewer than `candidates` docs score above -inf) take the sort selector."""
    scores, indices, short = _search_once(host_queries, rows, docs, plan, candidates, plan.selection)
    if short.numel():
        scores[short], indices[short], _ = _search_once(host_queries, rows[short], docs, plan, candidates, "sort")
    return scores, indices


def _search_once(
    host_queries: torch.Tensor, rows: torch.Tensor, docs: Source, plan: Plan, candidates: int, selection: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass for the given rows with the given selector: scores, indices and the rows left uncertain."""
    redo_queries = torch.zeros((round_up(rows.numel(), ROW_ALIGN), host_queries.shape[1]), dtype=plan.compute_dtype)
    redo_queries[: rows.numel()] = host_queries[rows]
    device = torch.device(plan.device)
    running, _ = _search_rows(redo_queries.to(device), rows.numel(), docs, plan, candidates, None, None, selection)
    scores, indices = running.result()
    return scores, indices, running.uncertain_rows()


def _multiplied_queries(host_queries: torch.Tensor, plan: Plan) -> torch.Tensor:
    """The query rows as the matrix product sees them: rounded to bfloat16 in reduced precision."""
    if plan.precision == "fp32":
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact scores for every row, best first, certified (refine.py). Rows that fail are searched again
    with four times the candidates; rows that fail again get the exact streamed search."""
    keep = plan.k + int(plan.exclude_self)
    max_doc_norm = largest_sq**0.5
    metric = "l2" if plan.metric == "l2" else "ip"
    scores, indices, uncertain = refine(query_rows, docs, keys, indices, max_doc_norm, keep, metric, plan.precision)
    scores, indices = scores[:, :keep], indices[:, :keep]
    wide = min(docs.rows, REFINE_WIDENING * plan.candidates)
    group = max(1, plan.query_batch_rows // REFINE_WIDENING)  # the batch's memory for selection state, no more
    failed = []
    for rows in torch.split(uncertain, group) if uncertain.numel() else ():
        wide_keys, wide_indices = _search_again(multiplied, rows, docs, plan, wide)
        redone, redone_indices, still = refine(
            query_rows[rows], docs, wide_keys, wide_indices, max_doc_norm, keep, metric, plan.precision
        )
        scores[rows], indices[rows] = redone[:, :keep], redone_indices[:, :keep]
        failed.append(rows[still])
    uncertain = torch.cat(failed) if failed else uncertain
    if uncertain.numel():
        scores[uncertain], indices[uncertain] = exact_search(query_rows[uncertain], docs, keep, metric)
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
    product: TorchProduct | None = None,
) -> tuple[RunningTopK, float]:
    """One pass over the docs for `rows` queries (query_rows is zero-padded to the alignment), keeping
    `candidates` per row, with `product` (the plan's for query_rows; made here if not given). Also returns
    the largest squared doc norm seen, where refinement needs it (else 0)."""
    device = query_rows.device
    running = make_running_topk(rows, candidates, device, docs.rows, selection or plan.selection, start_thresholds)
    product = product or make_product(query_rows, plan.product)
    # Products and selection together, on the selector's threads, when each thread has rows enough; the
    # screen always (only its fused pass screens: otherwise every pair would be scored exactly).
    fused = isinstance(running, ThresholdTopK) and (
        fuse_products(rows, running.threads) or isinstance(product, ScreenedProduct)
    )
    # A plan for the threshold selector counts tiles at most CPU_TILE_DOCS wide (rows searched again with the
    # sort selector included); a plan for the sort selector, a whole chunk at once.
    width = CPU_TILE_DOCS if plan.selection == "threshold" and device.type == "cpu" else plan.doc_chunk_rows
    tile_storage = (
        None
        if fused
        else torch.empty(
            round_up(min(rows, plan.query_block_rows), ROW_ALIGN) * min(width, plan.doc_chunk_rows),
            dtype=torch.float32,
            device=device,
        )
    )
    largest_sq = 0.0
    watched = _watched_row(query_rows, rows) if _checked_through_scores(plan, device) else None
    split_threads = torch.get_num_threads()  # one product per tile on this thread: split it over the cores
    for first_doc, doc_count, operand, offsets, chunk_largest_sq in _doc_chunks(
        docs, plan, device, watched is None, product
    ):
        padded_docs = round_up(doc_count, COL_ALIGN)
        largest_sq = max(largest_sq, chunk_largest_sq)
        non_finite: list[bool] = []
        score = functools.partial(_score_rows, product, operand, offsets, watched, non_finite)
        if fused and isinstance(product, (KernelProduct, ScreenedProduct)) and offsets is None:
            assert isinstance(running, ThresholdTopK)
            # Scored and selected in one pass, no tile written; a NaN or Inf among the scores is flagged (it
            # matters where the docs go unchecked: otherwise it is an overflow, kept as on the other paths)
            if isinstance(product, ScreenedProduct):
                assert isinstance(operand, ScreenedDocs)
                flagged = running.add_screened(product, operand, first_doc, doc_count)
            else:
                assert isinstance(operand, torch.Tensor)
                flagged = running.add_packed(product.packed_queries, product.dim, operand, first_doc, doc_count)
            if flagged and watched is not None:
                non_finite.append(True)
        elif fused:
            assert isinstance(running, ThresholdTopK)
            running.add_products(score, first_doc, doc_count, padded_docs, plan.query_block_rows, CPU_TILE_DOCS)
        else:
            assert tile_storage is not None
            for block_start in range(0, rows, plan.query_block_rows):
                block_rows = min(plan.query_block_rows, rows - block_start)
                padded_rows = round_up(block_rows, ROW_ALIGN)
                for doc_lo, doc_hi, real in doc_tiles(doc_count, padded_docs, width):
                    tile = tile_storage[: padded_rows * (doc_hi - doc_lo)].view(padded_rows, doc_hi - doc_lo)
                    score(block_start, block_start + padded_rows, doc_lo, doc_hi, tile, threads=split_threads)
                    running.add(tile[:block_rows, :real], block_start, first_doc + doc_lo)
        if non_finite:
            _refuse_non_finite(docs, first_doc, doc_count, plan)
        if on_docs_scored is not None:
            on_docs_scored(doc_count)
        if first_doc == 0 and docs.role == "docs":
            _pause_for_tests()
    return running, largest_sq


def _pause_for_tests() -> None:
    """Test-only: with TINY_KNN_TEST_PAUSE=PATH, every pass over the docs stops after its first chunk, creates
    PATH and waits until PATH is deleted, so that a test can act at a known point of a real search (cut an
    input, start a second run, fill the disk) without racing the search on a slow machine."""
    path = os.environ.get("TINY_KNN_TEST_PAUSE")
    if not path:
        return
    with open(path, "w"):
        pass
    while os.path.exists(path):
        time.sleep(0.01)


def _score(
    product: TorchProduct,
    lo: int,
    hi: int,
    operand: Operand,
    doc_lo: int,
    doc_hi: int,
    offsets: torch.Tensor | None,
    out: torch.Tensor,
    threads: int = 1,
) -> None:
    """Search keys of (padded) query rows lo..hi against the chunk's (padded) docs doc_lo..doc_hi, into `out`,
    the product on up to `threads` threads."""
    product.score(lo, hi, operand, doc_lo, doc_hi, out, threads)
    if offsets is not None:
        out.sub_(offsets)


def _score_rows(
    product: TorchProduct,
    operand: Operand,
    offsets: torch.Tensor | None,
    watched: int | None,
    non_finite: list[bool],
    lo: int,
    hi: int,
    doc_lo: int,
    doc_hi: int,
    out: torch.Tensor,
    threads: int = 1,
) -> None:
    """Search keys of (padded) query rows lo..hi against the chunk's docs doc_lo..doc_hi, into `out` (see
    topk.ScoreRows), the product on up to `threads` threads; the keys of query row `watched`, if among them,
    are watched for NaN or Inf."""
    doc_offsets = None if offsets is None else offsets[doc_lo:doc_hi]
    _score(product, lo, hi, operand, doc_lo, doc_hi, doc_offsets, out, threads)
    if watched is not None and lo <= watched < hi:
        _watch(out[watched - lo], non_finite)


def _checked_through_scores(plan: Plan, device: torch.device) -> bool:
    """Whether docs may go unchecked for NaN and Inf as they are read, their scores being watched instead.

    So on the CPU in float32 (one numpy pass per chunk saved): a NaN or Inf anywhere in a doc makes its
    score with a query whose values are all non-zero non-finite (see _watched_row). Not on a GPU (watching
    would synchronise every chunk; the reader's threads check cheaply there), nor in bfloat16, whose
    rounding could turn some NaN bit patterns into zeros before the product.
    """
    return device.type == "cpu" and plan.precision == "fp32"


def _watched_row(query_rows: torch.Tensor, rows: int) -> int | None:
    """The first query with no zero value, or None. Its score with a doc holding NaN or Inf is NaN or Inf
    whatever the BLAS: every product q_i * d_i is taken (some BLAS skip zero factors, and with them 0 * Inf)."""
    full = torch.nonzero((query_rows[:rows] != 0).all(dim=1)).flatten()
    return int(full[0]) if full.numel() else None


def _watch(scores: torch.Tensor, non_finite: list[bool]) -> None:
    """Notes in `non_finite` whether a row of keys holds NaN or Inf (numpy: cheap, and outside torch's pool)."""
    if not np.isfinite(scores.numpy()).all():
        non_finite.append(True)


def _refuse_non_finite(docs: Source, first_doc: int, doc_count: int, plan: Plan) -> None:
    """Reads docs first_doc... again, checked: raises InvalidInputError naming the first row with NaN or Inf.
    Returns if there is none (finite docs whose keys overflowed float32)."""
    rows = torch.empty((min(doc_count, plan.doc_chunk_rows), docs.dim), dtype=plan.compute_dtype)
    for start in range(first_doc, first_doc + doc_count, rows.shape[0]):
        docs.read_into(start, min(start + rows.shape[0], first_doc + doc_count), rows, check=True)


def _sampled_thresholds(
    query_rows: torch.Tensor, rows: int, docs: Source, plan: Plan, product: TorchProduct
) -> torch.Tensor:
    """Per query, a key that probably at least `candidates` docs beat: a high rank within a strided sample,
    found by the same search as the real one, over the sampled docs.

    Only an estimate: the selector certifies each row afterwards (see ThresholdTopK).
    """
    sample = plan.threshold_sample_docs
    positions = torch.arange(sample, dtype=torch.int64) * docs.rows // sample
    sample_docs = torch.empty((sample, docs.dim), dtype=plan.compute_dtype)
    docs.read_rows(positions, sample_docs)
    with np.errstate(over="ignore", invalid="ignore"):
        if not np.isfinite(sample_docs.numpy().sum()):  # read_rows does not check
            bad = positions[~torch.isfinite(sample_docs).all(dim=1)]
            if bad.numel():  # name the first bad row in the file, which may lie before the sampled one
                _refuse_non_finite(docs, 0, int(bad[0]) + 1, plan)
    rank = threshold_sample_rank(docs.rows, plan.candidates, sample)
    sampled = from_array(sample_docs, "docs sample")
    running, _ = _search_rows(query_rows, rows, sampled, plan, rank, None, None, product=product)
    return running.result()[0][:, -1]


def _prepared_offsets(
    rows: torch.Tensor, count: int, plan: Plan, device: torch.device
) -> tuple[torch.Tensor | None, float]:
    """Applies the metric and precision to freshly read doc rows (the first `count`); returns their key
    offsets, padded with zeros to the length of `rows`, on `device`, and their largest squared norm."""
    offsets, largest_sq = prepare_docs(rows[:count], plan.metric, plan.precision)
    if offsets is None:
        return None, largest_sq
    padded = torch.zeros(rows.shape[0], dtype=torch.float32)
    padded[:count] = offsets
    return padded.to(device), largest_sq


Chunk = tuple[int, int, Operand, torch.Tensor | None, float]


def _doc_chunks(
    docs: Source, plan: Plan, device: torch.device, check: bool = True, product: TorchProduct | None = None
) -> Iterator[Chunk]:
    """Yields (first_doc, doc_count, operand, key offsets, largest squared norm) with the next chunk already
    being read on another thread (and, on a GPU, already being copied to it on a side stream).

    The operand is what `product` scores (on the CPU prepared on the reader thread; on a GPU, and without a
    product, the rows): doc_count rows followed by zero rows up to the alignment. On the CPU it is reused two
    chunks later, so the caller must be done with it before asking for the next-but-one. `check=False`:
    NaN and Inf are not refused here (the caller watches the scores).
    """
    cuda = device.type == "cuda"
    # A GPU scores faster than one thread copies (and checks) from the page cache: read in parallel pieces.
    pieces = max(1, min(GPU_READ_THREADS, (os.cpu_count() or 1) // 2)) if cuda else 1
    prepare = None if cuda or product is None else product.prepare
    chunks = _host_chunks(docs, plan, pinned=cuda, pieces=pieces, check=check, prepare=prepare)
    if not cuda:
        yield from ((start, count, rows, offsets, sq) for start, count, rows, offsets, sq, _ in chunks)
        return
    stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    uploaded: Chunk | None = None
    for start, count, rows, offsets, largest_sq, copied in chunks:
        assert isinstance(rows, torch.Tensor)  # no product prepares a GPU's chunks
        with torch.cuda.stream(stream):
            on_device = rows.to(device, non_blocking=True)
            device_offsets = None if offsets is None else offsets.pin_memory().to(device, non_blocking=True)
            assert copied is not None
            copied.record(stream)  # the reader waits for this before it refills the host buffer
        if uploaded is not None:
            yield uploaded  # scored while the next chunk is on its way
        torch.cuda.current_stream(device).wait_stream(stream)
        for tensor in (on_device, device_offsets):
            if tensor is not None:
                tensor.record_stream(torch.cuda.current_stream(device))
        uploaded = (start, count, on_device, device_offsets, largest_sq)
    if uploaded is not None:
        yield uploaded


HostChunk = tuple[int, int, Operand, torch.Tensor | None, float, "torch.cuda.Event | None"]


def _host_chunks(
    docs: Source,
    plan: Plan,
    pinned: bool,
    pieces: int = 1,
    check: bool = True,
    prepare: Callable[[torch.Tensor, int], Operand] | None = None,
) -> Iterator[HostChunk]:
    """The doc chunks in host memory, each read on a background thread (by `pieces` threads, each a share of
    the rows) while the one before is used, into two buffers in turn; `check`: refuse NaN and Inf (see
    Source.read_into). With `prepare` (a product's), each chunk's padded rows are handed to it on the same
    thread, with the buffer's number, and what it returns comes in place of the rows. With `pinned`, the
    buffers are pinned and each chunk comes with a CUDA event: once recorded after the chunk's copy to the
    GPU, the reader waits for it before filling that buffer again."""
    chunk_rows = plan.doc_chunk_rows
    buffers = [torch.zeros((chunk_rows, docs.dim), dtype=plan.compute_dtype, pin_memory=pinned) for _ in range(2)]
    copied = [torch.cuda.Event() if pinned else None for _ in range(2)]  # type: ignore[no-untyped-call]
    starts = range(0, docs.rows, chunk_rows)

    piece_readers = ThreadPoolExecutor(pieces, thread_name_prefix="tiny-knn-read-piece") if pieces > 1 else None

    def read_piece(start: int, lo: int, hi: int, buffer: torch.Tensor) -> None:
        docs.read_into(start + lo, start + hi, buffer[lo:], check)

    def read(index: int) -> HostChunk:
        start = starts[index]
        count = min(chunk_rows, docs.rows - start)
        buffer, event = buffers[index % 2], copied[index % 2]
        if event is not None:
            event.synchronize()  # returns at once if never recorded
        if piece_readers is None:
            docs.read_into(start, start + count, buffer, check)
        else:
            step = -(-count // pieces)
            ranges = [(lo, min(lo + step, count)) for lo in range(0, count, step)]
            for done in [piece_readers.submit(read_piece, start, lo, hi, buffer) for lo, hi in ranges]:
                done.result()  # in order: the first bad row named is the first in the file
        padded = round_up(count, COL_ALIGN)
        buffer[count:padded].numpy().fill(0)
        offsets, largest_sq = _prepared_offsets(buffer[:padded], count, plan, torch.device("cpu"))
        operand = buffer if prepare is None else prepare(buffer[:padded], index % 2)
        return start, count, operand, offsets, largest_sq, event

    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiny-knn-read") as reader:
            pending: Future[HostChunk] = reader.submit(read, 0)
            for index in range(len(starts)):
                chunk = pending.result()
                if index + 1 < len(starts):
                    # The other buffer was last used by the previous chunk, whose tiles are fully scored (or,
                    # on a GPU, whose copy the reader waits for).
                    pending = reader.submit(read, index + 1)
                yield chunk
    finally:
        if piece_readers is not None:
            piece_readers.shutdown()
