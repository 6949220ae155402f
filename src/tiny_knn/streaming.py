"""Streaming the docs, for every search path (engine.py's, gpu_engine.py's, ranges.py's): chunks read ahead on a
thread (in parallel pieces for a GPU) into two buffers in turn, prepared there, and copied to a GPU on a side stream;
the strided sample of the docs that start thresholds come from; progress after each chunk (and the tests' pause).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from .plan import COL_ALIGN, Plan, round_up, threshold_sample_rank
from .sources import Source

ProgressCallback = Callable[[int], None]
Chunk = tuple[int, int, Any, torch.Tensor | None, float]
HostChunk = tuple[int, int, Any, torch.Tensor | None, float, "torch.cuda.Event | None"]
# prepare(padded rows, real rows, buffer number) -> (what the chunk is scored from, key offsets, largest |d|^2)
Prepare = Callable[[torch.Tensor, int, int], tuple[Any, torch.Tensor | None, float]]

# Threads that read each doc chunk for a GPU, in pieces (at most half the cores).
GPU_READ_THREADS = 8


def sample_positions(docs: Source, plan: Plan) -> torch.Tensor:
    """The rows of the strided sample of the docs, ascending."""
    sample = plan.threshold_sample_docs
    return torch.arange(sample, dtype=torch.int64) * docs.rows // sample


def threshold_sample(docs: Source, plan: Plan) -> tuple[torch.Tensor, int]:
    """The strided sample of the docs for starting thresholds (refusing NaN and Inf in it), and the rank within it
    whose score at least `candidates` docs probably beat."""
    sample = plan.threshold_sample_docs
    positions = sample_positions(docs, plan)
    sample_docs = torch.empty((sample, docs.dim), dtype=plan.compute_dtype)
    docs.read_rows(positions, sample_docs)
    with np.errstate(over="ignore", invalid="ignore"):
        if not np.isfinite(sample_docs.numpy().sum()):  # read_rows does not check
            bad = positions[~torch.isfinite(sample_docs).all(dim=1)]
            if bad.numel():  # name the first bad row in the file, which may lie before the sampled one
                refuse_non_finite(docs, 0, int(bad[0]) + 1, plan)
    return sample_docs, threshold_sample_rank(docs.rows, plan.candidates, sample, plan.sample_sigmas)


def scored(docs: Source, first_doc: int, doc_count: int, on_docs_scored: ProgressCallback | None) -> None:
    """After a chunk: progress, and the tests' pause."""
    if on_docs_scored is not None:
        on_docs_scored(doc_count)
    if first_doc == 0 and docs.role == "docs":
        _pause_for_tests()


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


def refuse_non_finite(docs: Source, first_doc: int, doc_count: int, plan: Plan) -> None:
    """Reads docs first_doc... again, checked: raises InvalidInputError naming the first row with NaN or Inf.
    Returns if there is none (finite docs whose keys overflowed float32)."""
    rows = torch.empty((min(doc_count, plan.doc_chunk_rows), docs.dim), dtype=plan.compute_dtype)
    for start in range(first_doc, first_doc + doc_count, rows.shape[0]):
        docs.read_into(start, min(start + rows.shape[0], first_doc + doc_count), rows, check=True)


def read_pieces(device: torch.device) -> int:
    """How many threads read each doc chunk: a GPU scores faster than one thread copies (and checks) from the page
    cache, so it reads in parallel pieces (at most half the cores)."""
    return max(1, min(GPU_READ_THREADS, (os.cpu_count() or 1) // 2)) if device.type == "cuda" else 1


def on_device(chunks: Iterator[HostChunk], device: torch.device) -> Iterator[Chunk]:
    """The host chunks (pinned, for a GPU) as (first_doc, doc_count, rows, key offsets, largest squared norm) on
    `device`: on a GPU each is copied on a side stream while the one before it is scored."""
    if device.type != "cuda":
        yield from ((start, count, rows, offsets, sq) for start, count, rows, offsets, sq, _ in chunks)
        return
    stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    uploaded: Chunk | None = None
    for start, count, rows, offsets, largest_sq, copied in chunks:
        with torch.cuda.stream(stream):
            device_rows = rows.to(device, non_blocking=True)
            device_offsets = None if offsets is None else offsets.pin_memory().to(device, non_blocking=True)
            assert copied is not None
            copied.record(stream)  # the reader waits for this before it refills the host buffer
        if uploaded is not None:
            yield uploaded  # scored while the next chunk is on its way
        torch.cuda.current_stream(device).wait_stream(stream)
        for tensor in (device_rows, device_offsets):
            if tensor is not None:
                tensor.record_stream(torch.cuda.current_stream(device))
        uploaded = (start, count, device_rows, device_offsets, largest_sq)
    if uploaded is not None:
        yield uploaded


def host_chunks(
    docs: Source,
    plan: Plan,
    prepare: Prepare,
    check: bool = True,
    pinned: bool = False,
    pieces: int = 1,
    dtype: torch.dtype | None = None,
) -> Iterator[HostChunk]:
    """The doc chunks in host memory, each read on a background thread (by `pieces` threads, each a share of
    the rows) while the one before is used, into two buffers in turn, and handed to `prepare` on the same thread
    (padded with zero rows to the alignment, with the buffer's number); `check`: refuse NaN and Inf (see
    Source.read_into). With `pinned`, the buffers are pinned and each chunk comes with a CUDA event: once recorded
    after the chunk's copy to the GPU, the reader waits for it before filling that buffer again. `dtype`: the
    buffers' (default the plan's compute dtype; the GPU screen's float16 or bfloat16 docs come as they are)."""
    chunk_rows = plan.doc_chunk_rows
    dtype = dtype or plan.compute_dtype
    buffers = [torch.zeros((chunk_rows, docs.dim), dtype=dtype, pin_memory=pinned) for _ in range(2)]
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
        _numpy(buffer[count:padded]).fill(0)
        operand, offsets, largest_sq = prepare(buffer[:padded], count, index % 2)
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


def _numpy(rows: torch.Tensor) -> np.ndarray:
    """The rows as numpy sees them (bfloat16's as int16 bits: numpy has no bfloat16)."""
    return (rows.view(torch.int16) if rows.dtype == torch.bfloat16 else rows).numpy()
