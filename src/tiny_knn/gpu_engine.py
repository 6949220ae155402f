"""The screened search on a GPU (issue #20, items 4 to 6): gpu_screen's kernels between the doc chunks and the pools
of topk.PoolTopK. Forced with TINY_KNN_PRODUCT=triton (backend.py); not the default on CUDA until it has passed on a
GPU (benchmarks/gpu_screen_check.py).

Per query batch, as the CPU's screened path (engine._search_screened) does: the query rows are prepared once
(bfloat16 values and their bound's factors); start thresholds are sampled (the same search over a strided sample of
the docs keeps a high rank), and rows whose final k-th score is not above theirs are searched again. Per doc chunk:
its rows are prepared, the whole batch is screened against them by each row's current threshold (its pool's k-th
best at the last cut) into a bounded survivor buffer, and one host synchronisation reads how many pairs survived and
the most any row got. Those pairs are scored exactly (tk_dot's order; tk_l2's for l2, negated, as the selection
keeps -distance) and offered to the pools, the excluded pairs as no doc. A buffer that overflowed is not read: the
chunk is screened again from a first piece that fits, the pools cut after it so that their thresholds rise.

Every pair that can be among a row's k best is scored exactly, as the CPU scores it, and selected by (score, doc):
the answer is the CPU's, byte for byte. Under TRITON_INTERPRET=1 the kernels run on CPU tensors (--cpu): slowly,
but the same path end to end, which is how the tests check it.
"""

from __future__ import annotations

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


def search_screened(
    host_queries: torch.Tensor,
    rows: int,
    docs: Source,
    plan: Plan,
    on_docs_scored: ProgressCallback | None,
    excluded: Exclusions | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact answer for `rows` query rows of host_queries (float32, cosine rows of unit length), leaving out the
    `excluded` pairs: (scores, indices) on the host, `plan.candidates` a row, as engine._search_screened's."""
    device = torch.device(plan.device)
    queries = host_queries[:rows].to(device)
    start_thresholds = _sampled_thresholds(queries, docs, plan, excluded) if plan.threshold_sample_docs else None
    running = _screen(queries, docs, plan, plan.candidates, on_docs_scored, start_thresholds, excluded)
    scores, indices = running.result()
    uncertain = running.uncertain_rows()
    if uncertain.numel():  # the sampled threshold was too high for these rows: a fresh pass, without one
        again = excluded.rows(uncertain.numpy()) if excluded is not None else None
        redone = _screen(queries[uncertain.to(device)], docs, plan, plan.candidates, None, None, again)
        scores[uncertain], indices[uncertain] = redone.result()
    if plan.metric == "l2":
        scores = 0 - scores  # the selection kept -distance, best first; 0 - x: no -0.0 for a distance of 0
    return scores, indices


def _sampled_thresholds(queries: torch.Tensor, docs: Source, plan: Plan, excluded: Exclusions | None) -> torch.Tensor:
    """Per query, an exact score that probably at least `candidates` docs reach (engine._sampled_thresholds)."""
    sample_docs, rank = threshold_sample(docs, plan)
    in_sample = excluded.sampled(sample_positions(docs, plan).numpy()) if excluded is not None else None
    running = _screen(queries, from_array(sample_docs, "docs sample"), plan, rank, None, None, in_sample)
    return running.result()[0][:, -1]


def _screen(
    queries: torch.Tensor,
    docs: Source,
    plan: Plan,
    candidates: int,
    on_docs_scored: ProgressCallback | None,
    start_thresholds: torch.Tensor | None,
    excluded: Exclusions | None,
) -> PoolTopK:
    """One pass over the docs for these query rows (on the device), keeping `candidates` a row, never offered the
    `excluded` pairs (docs numbered as `docs` numbers them)."""
    device = queries.device
    running = PoolTopK(queries.shape[0], candidates, device, start_thresholds=start_thresholds)
    screening = _Screening(queries, running, plan.metric, excluded, docs.rows)

    def prepare(buffer: torch.Tensor, count: int, slot: int) -> tuple[Any, None, float]:
        if plan.metric == "cosine":
            normalize(buffer[:count])
        return buffer, None, 0.0

    chunks = host_chunks(docs, plan, prepare, check=True, pinned=device.type == "cuda", pieces=read_pieces(device))
    for first_doc, doc_count, doc_rows, _, _ in on_device(chunks, device):
        screening.chunk(doc_rows[:doc_count], first_doc)
        scored(docs, first_doc, doc_count, on_docs_scored)
    return running


class _Screening:
    """The screen of one pass: its query rows, prepared; their pools; the survivor buffer; the excluded pairs, as
    sorted codes row * span + doc on the device."""

    def __init__(
        self, queries: torch.Tensor, running: PoolTopK, metric: str, excluded: Exclusions | None, span: int
    ) -> None:
        self.queries, self.running, self.metric = queries, running, metric
        self.l2 = metric == "l2"
        self.prepared = gpu_screen.prepare_rows(queries, query=True, l2=self.l2)
        rows, device = queries.shape[0], queries.device
        self.survivors = gpu_screen.Survivors.empty(gpu_survivor_capacity(rows), device)
        self.slots = torch.arange(self.survivors.pairs.shape[0], device=device)
        self.span = span
        self.excluded_codes = None
        if excluded is not None and excluded.docs.size:
            owners = np.repeat(np.arange(rows, dtype=np.int64), excluded.count())
            self.excluded_codes = torch.from_numpy(owners * span + excluded.docs).to(device)  # ascending
        self.block_pairs = INTERPRETED_BLOCK_PAIRS if gpu_screen.interpreted() else RESCORE_BLOCK_PAIRS

    def chunk(self, doc_rows: torch.Tensor, first_doc: int) -> None:
        """Screens every row against a chunk of docs (float32 rows on the device, numbered first_doc...) and offers
        the survivors' exact scores."""
        if doc_rows.shape[0]:
            prepared = gpu_screen.prepare_rows(doc_rows, query=False, l2=self.l2)
            self._piece(doc_rows, prepared, first_doc, 0, doc_rows.shape[0])

    def _piece(
        self, doc_rows: torch.Tensor, prepared: gpu_screen.PreparedRows, first_doc: int, lo: int, hi: int
    ) -> None:
        """Docs lo..hi of the chunk: screened, then re-scored and offered. If the survivors overflow the buffer, a
        first piece that would fit at their density (halved) is done on its own, the pools are cut (their
        thresholds rise: a pass's first docs keep every pair), and the rest is screened again; a piece of one doc
        always fits (the buffer holds a pair per row)."""
        survivors, rows, capacity = self.survivors, self.queries.shape[0], self.survivors.pairs.shape[0]
        while lo < hi:
            survivors.clear()
            gpu_screen.screen(self.prepared, prepared.rows(lo, hi), self.running.thresholds, survivors,
                              metric=self.metric)  # fmt: skip
            found_rows = torch.where(self.slots < survivors.counts[0], survivors.pairs[:, 0].long(), rows)
            per_row = torch.zeros(rows + 1, dtype=torch.int64, device=found_rows.device)
            per_row.index_add_(0, found_rows, torch.ones_like(found_rows))
            # The one synchronisation: survivors found, overflowed, and the most of them one row got
            found, overflowed, most = torch.cat([survivors.counts, per_row[:rows].max().reshape(1)]).tolist()
            if not overflowed:
                self._offer(doc_rows, first_doc, lo, hi, found, most)
                return
            piece = max(1, (hi - lo) * capacity // (2 * found))
            self._piece(doc_rows, prepared, first_doc, lo, lo + piece)
            self.running.cut()
            lo += piece

    def _offer(self, doc_rows: torch.Tensor, first_doc: int, lo: int, hi: int, found: int, most: int) -> None:
        """The buffer's `found` pairs (docs lo..hi of the chunk), scored exactly and offered to the pools."""
        if not found:
            return
        pairs = self.survivors.pairs[:found]
        scores = gpu_screen.rescore(self.queries, doc_rows[lo:hi], pairs, metric=self.metric,
                                    block_pairs=self.block_pairs)  # fmt: skip
        if self.l2:
            scores = -scores  # the selection keeps -distance, as the CPU's does
        query_rows, docs = pairs[:, 0].long(), pairs[:, 1].long() + (first_doc + lo)
        if self.excluded_codes is not None:
            codes = query_rows * self.span + docs
            at = torch.searchsorted(self.excluded_codes, codes).clamp(max=self.excluded_codes.numel() - 1)
            docs = torch.where(self.excluded_codes[at] == codes, -1, docs)  # no doc: it takes no place
        self.running.offer(query_rows, docs, scores, most=most)
