"""The screened search on a GPU (issue #20, items 4 to 6): gpu_screen's kernels between the doc chunks and the pools
of topk.PoolTopK. Forced with TINY_KNN_PRODUCT=triton (backend.py); not the default on CUDA until it has passed on a
GPU (benchmarks/gpu_screen_check.py).

Per query batch, as the CPU's screened path (engine._search_screened) does: the query rows are prepared once
(16-bit values, the docs' kind, and factors); start thresholds are sampled (the same search over a strided sample of
the docs keeps a high rank), and rows whose final k-th score is not above theirs are searched again. Per doc chunk:
its rows are prepared, the whole batch is screened against them by each row's current threshold (its pool's k-th
best at the last cut) into a bounded survivor buffer, and one host synchronisation reads how many pairs survived and
the most any row got. That synchronisation lags a chunk: the screen of the next chunk is queued (into the other of
two survivor buffers) before the host waits for this chunk's counts, so the GPU never idles on the host; the next
chunk is then screened by thresholds one chunk stale, which only lets more pairs survive. The survivors are scored
exactly (tk_dot's order; tk_l2's for l2, negated, as the selection keeps -distance) and offered to the pools, the
excluded pairs as no doc. A buffer that overflowed is not read: the
chunk is screened again from a first piece that fits, the pools cut after it so that their thresholds rise.

float16 and bfloat16 docs arrive as they are (Plan.chunk_dtype: half the bytes read and copied), are prepared for the
screen as they are (float16's for the float16 screen: gpu_screen.screen_values_dtype), and are widened to float32 on
the device, exactly, for the exact scores; the query rows are prepared for the screen of the docs' values. Where the
plan keeps the docs resident (Plan.docs_resident), the first full pass keeps every chunk on the device, prepared, and
later passes (query batches, rows searched again) use them without reading the disk (ResidentDocs).

Every pair that can be among a row's k best is scored exactly, as the CPU scores it, and selected by (score, doc):
the answer is the CPU's, byte for byte. Under TRITON_INTERPRET=1 the kernels run on CPU tensors (--cpu): slowly,
but the same path end to end, which is how the tests check it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import gpu_screen
from .exclusions import Exclusions
from .metrics import normalize
from .plan import Plan, gpu_survivor_capacity
from .sources import Source, from_array
from .streaming import (
    ProgressCallback,
    host_chunks,
    on_device,
    read_pieces,
    sample_positions,
    scored,
    threshold_sample,
)
from .topk import PoolTopK

# Pairs a program of the re-scoring kernel takes: a warp's worth on a GPU; many under the interpreter, where each
# program costs a numpy call per step whatever its size.
RESCORE_BLOCK_PAIRS, INTERPRETED_BLOCK_PAIRS = 32, 4096


@dataclass(frozen=True)
class DeviceChunk:
    """Docs first_doc... as the screen takes them: their float32 rows on the device (the exact re-scoring's) and
    those rows prepared (gpu_screen.prepare_rows)."""

    first_doc: int
    rows: torch.Tensor
    prepared: gpu_screen.PreparedRows

    @property
    def count(self) -> int:
        return int(self.rows.shape[0])


@dataclass
class ResidentDocs:
    """The docs kept on the device across query batches (Plan.docs_resident): every chunk of the first full pass
    over them, and the strided sample for start thresholds. Empty until a pass completes."""

    chunks: list[DeviceChunk] = field(default_factory=list)
    complete: bool = False
    sample: tuple[torch.Tensor, int] | None = None


def search_screened(
    host_queries: torch.Tensor,
    rows: int,
    docs: Source,
    plan: Plan,
    on_docs_scored: ProgressCallback | None,
    excluded: Exclusions | None,
    resident: ResidentDocs | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact answer for `rows` query rows of host_queries (float32, cosine rows of unit length), leaving out the
    `excluded` pairs: (scores, indices) on the host, `plan.candidates` a row, as engine._search_screened's.
    `resident`: where the docs are kept on the device from one pass to the next (None: read every pass)."""
    device = torch.device(plan.device)
    queries = host_queries[:rows].to(device)
    start_thresholds = (
        _sampled_thresholds(queries, docs, plan, excluded, resident) if plan.threshold_sample_docs else None
    )
    running = _screen(queries, docs, plan, plan.candidates, on_docs_scored, start_thresholds, excluded, resident)
    scores, indices = running.result()
    uncertain = running.uncertain_rows()
    if uncertain.numel():  # the sampled threshold was too high for these rows: a fresh pass, without one
        again = excluded.rows(uncertain.numpy()) if excluded is not None else None
        redone = _screen(queries[uncertain.to(device)], docs, plan, plan.candidates, None, None, again, resident)
        scores[uncertain], indices[uncertain] = redone.result()
    if plan.metric == "l2":
        scores = 0 - scores  # the selection kept -distance, best first; 0 - x: no -0.0 for a distance of 0
    return scores, indices


def _sampled_thresholds(
    queries: torch.Tensor, docs: Source, plan: Plan, excluded: Exclusions | None, resident: ResidentDocs | None
) -> torch.Tensor:
    """Per query, an exact score that probably at least `candidates` docs reach (engine._sampled_thresholds)."""
    if resident is not None and resident.sample is not None:
        sample_docs, rank = resident.sample
    else:
        sample_docs, rank = threshold_sample(docs, plan)
        if resident is not None:
            resident.sample = sample_docs, rank
    in_sample = excluded.sampled(sample_positions(docs, plan).numpy()) if excluded is not None else None
    running = _screen(queries, from_array(sample_docs, "docs sample"), plan, rank, None, None, in_sample, None)
    return running.result()[0][:, -1]


def _screen(
    queries: torch.Tensor,
    docs: Source,
    plan: Plan,
    candidates: int,
    on_docs_scored: ProgressCallback | None,
    start_thresholds: torch.Tensor | None,
    excluded: Exclusions | None,
    resident: ResidentDocs | None,
) -> PoolTopK:
    """One pass over the docs for these query rows (on the device), keeping `candidates` a row, never offered the
    `excluded` pairs (docs numbered as `docs` numbers them)."""
    running = PoolTopK(queries.shape[0], candidates, queries.device, start_thresholds=start_thresholds)
    screening = _Screening(queries, running, plan.metric, excluded, docs.rows)
    for chunk in device_chunks(docs, plan, queries.device, resident):
        finished = screening.chunk(chunk)
        if finished is not None:
            scored(docs, finished.first_doc, finished.count, on_docs_scored)
    finished = screening.finish()
    if finished is not None:
        scored(docs, finished.first_doc, finished.count, on_docs_scored)
    return running


def device_chunks(
    docs: Source, plan: Plan, device: torch.device, resident: ResidentDocs | None = None
) -> Iterator[DeviceChunk]:
    """The docs' chunks on the device, widened to float32 and prepared: from `resident` once a pass has filled it,
    else read (in the plan's chunk dtype) and copied, and kept in `resident` if given. Each chunk's tensors are its
    own (on the CPU, where the host's buffer is the device's, a copy), so that a chunk can be held while the next
    ones are read."""
    if resident is not None and resident.complete:
        yield from resident.chunks
        return
    if plan.chunk_dtype != torch.float32 and plan.metric == "cosine":
        raise ValueError("cosine's docs are scaled to unit length in float32 on the host: chunk_dtype float32")
    l2 = plan.metric == "l2"

    def prepare(buffer: torch.Tensor, count: int, slot: int) -> tuple[Any, None, float]:
        if plan.metric == "cosine":
            normalize(buffer[:count])
        return buffer, None, 0.0

    cuda = device.type == "cuda"
    read = host_chunks(docs, plan, prepare, check=True, pinned=cuda, pieces=read_pieces(device), dtype=plan.chunk_dtype)
    kept: list[DeviceChunk] = []
    for first_doc, doc_count, doc_rows, _, _ in on_device(read, device):
        rows = doc_rows[:doc_count].to(torch.float32, copy=not cuda)  # exact widening of float16 and bfloat16
        prepared = gpu_screen.prepare_rows(doc_rows[:doc_count], query=False, l2=l2)  # in the docs' own dtype
        chunk = DeviceChunk(first_doc, rows, prepared)
        if resident is not None:
            kept.append(chunk)
        yield chunk
    if resident is not None:
        resident.chunks, resident.complete = kept, True


@dataclass(frozen=True)
class _Screened:
    """A chunk (docs lo..hi of it) screened into a survivor buffer: (found, overflowed, most a row got) on the
    device, not yet read."""

    chunk: DeviceChunk
    survivors: gpu_screen.Survivors
    lo: int
    hi: int
    counts: torch.Tensor


class _Screening:
    """The screen of one pass: its query rows, prepared; their pools; two survivor buffers, in turn; the excluded
    pairs, as sorted codes row * span + doc on the device."""

    def __init__(
        self, queries: torch.Tensor, running: PoolTopK, metric: str, excluded: Exclusions | None, span: int
    ) -> None:
        self.queries, self.running, self.metric = queries, running, metric
        self.l2 = metric == "l2"
        self.prepared: dict[torch.dtype, gpu_screen.PreparedRows] = {}
        rows, device = queries.shape[0], queries.device
        capacity = gpu_survivor_capacity(rows)
        self.buffers = [gpu_screen.Survivors.empty(capacity, device) for _ in range(2)]
        self.turn = 0
        self.pending: _Screened | None = None
        self.slots = torch.arange(capacity, device=device)
        self.span = span
        self.excluded_codes = None
        if excluded is not None and excluded.docs.size:
            owners = np.repeat(np.arange(rows, dtype=np.int64), excluded.count())
            self.excluded_codes = torch.from_numpy(owners * span + excluded.docs).to(device)  # ascending
        self.block_pairs = INTERPRETED_BLOCK_PAIRS if gpu_screen.interpreted() else RESCORE_BLOCK_PAIRS

    def chunk(self, chunk: DeviceChunk) -> DeviceChunk | None:
        """Queues the screen of a chunk into the free buffer by the current thresholds, then reads the counts of the
        chunk before it (the host's one synchronisation, which the GPU does not wait for) and offers its survivors'
        exact scores. Returns that chunk, now done (None for the first)."""
        if not chunk.count:
            return None
        survivors = self.buffers[self.turn]
        self.turn ^= 1
        done, self.pending = self.pending, self._launch(chunk, survivors, 0, chunk.count)
        if done is None:
            return None
        self._settle(done)
        return done.chunk

    def finish(self) -> DeviceChunk | None:
        """Offers the last chunk's survivors; returns that chunk (None if there is none)."""
        done, self.pending = self.pending, None
        if done is not None:
            self._settle(done)
        return None if done is None else done.chunk

    def _launch(self, chunk: DeviceChunk, survivors: gpu_screen.Survivors, lo: int, hi: int) -> _Screened:
        """Queues the screen of docs lo..hi of the chunk into `survivors`, and the count of what it finds."""
        rows = self.queries.shape[0]
        survivors.clear()
        gpu_screen.screen(self._queries_for(chunk.prepared), chunk.prepared.rows(lo, hi), self.running.thresholds,
                          survivors, metric=self.metric)  # fmt: skip
        found_rows = torch.where(self.slots < survivors.counts[0], survivors.pairs[:, 0].long(), rows)
        per_row = torch.zeros(rows + 1, dtype=torch.int64, device=found_rows.device)
        per_row.index_add_(0, found_rows, torch.ones_like(found_rows))
        counts = torch.cat([survivors.counts, per_row[:rows].max().reshape(1)])
        return _Screened(chunk, survivors, lo, hi, counts)

    def _queries_for(self, docs: gpu_screen.PreparedRows) -> gpu_screen.PreparedRows:
        """The query rows prepared for docs of these values (bfloat16, or float16 with their scales), once a pass:
        a pass's chunks share one dtype, but a pass from sampled thresholds (float32 docs) may precede it."""
        dtype = docs.values.dtype
        if dtype not in self.prepared:
            self.prepared[dtype] = gpu_screen.prepare_rows(self.queries, query=True, l2=self.l2, values=dtype)
        return self.prepared[dtype]

    def _settle(self, screened: _Screened) -> None:
        """Reads a screen's counts and offers its survivors. If they overflowed the buffer, a first piece that would
        fit at their density (halved) is screened again and offered on its own, the pools are cut (their thresholds
        rise: a pass's first docs keep every pair), and the rest is screened again; a piece of one doc always fits
        (the buffer holds a pair per row). The pieces use the same buffer: the other holds the next chunk's."""
        chunk, survivors, lo, hi = screened.chunk, screened.survivors, screened.lo, screened.hi
        found, overflowed, most = screened.counts.tolist()  # the one synchronisation of a chunk that fits
        while overflowed:
            piece = max(1, (hi - lo) * survivors.pairs.shape[0] // (2 * found))
            self._settle(self._launch(chunk, survivors, lo, lo + piece))
            self.running.cut()
            lo += piece
            if lo >= hi:
                return
            found, overflowed, most = self._launch(chunk, survivors, lo, hi).counts.tolist()
        self._offer(chunk, survivors, lo, hi, found, most)

    def _offer(
        self, chunk: DeviceChunk, survivors: gpu_screen.Survivors, lo: int, hi: int, found: int, most: int
    ) -> None:
        """The buffer's `found` pairs (docs lo..hi of the chunk), scored exactly and offered to the pools."""
        if not found:
            return
        pairs = survivors.pairs[:found]
        scores = gpu_screen.rescore(self.queries, chunk.rows[lo:hi], pairs, metric=self.metric,
                                    block_pairs=self.block_pairs)  # fmt: skip
        if self.l2:
            scores = -scores  # the selection keeps -distance, as the CPU's does
        query_rows, docs = pairs[:, 0].long(), pairs[:, 1].long() + (chunk.first_doc + lo)
        if self.excluded_codes is not None:
            codes = query_rows * self.span + docs
            at = torch.searchsorted(self.excluded_codes, codes).clamp(max=self.excluded_codes.numel() - 1)
            docs = torch.where(self.excluded_codes[at] == codes, -1, docs)  # no doc: it takes no place
        self.running.offer(query_rows, docs, scores, most=most)
