"""Refining, on the path by search keys (a GPU, or the CPU without the compiled kernel; engine.py): turn each
query's candidates into its final answer. (The CPU's screened path scores exactly as it goes, and needs none.)

- `l2`: the search key q·d − ½‖d‖² cancels badly for near neighbours (a query's own row may lose to a
  doc a little farther away), so each candidate is re-scored exactly: (q − d) is exact in float64 for
  float32 inputs, and so are the squares, which leaves only a sum whose error is relative to the
  distance itself. Candidates are then ordered by (distance ascending, index ascending), and the row is
  *certified*: every doc left out had a key no higher than the last candidate's, so with a rigorous bound
  on the key's rounding error, none of them can be nearer than the k-th answer. Rows that fail are
  searched again with more candidates (see engine.py), and rows that still fail (data far from the
  origin, where the bound is loose) get `exact_search`: every doc's exact score, streamed.
- `exclude_self`: each query's own row (doc index == query index) is dropped by index, not by position,
  from k + 1 candidates; if it is not among them, the last one is dropped.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .exclusions import Exclusions, drop_excluded, mask_excluded
from .kernel import KERNEL
from .plan import REFINE_GATHER_BYTES
from .sources import ArraySource, FileSource, Source
from .topk import SortMergeTopK

UNIT_ROUNDOFF = 2.0**-24
LANES = 8  # partial sums of an exact score, as in _kernels/exact.c's tk_exact and tk_l2


def key_error_bound(query_norms: torch.Tensor, max_doc_norm: float, dim: int, metric: str = "l2") -> torch.Tensor:
    """Per query, a bound on |computed key − exact key| for every doc (float64).

    The dot product of dim float32 terms, in any order and with or without FMA, is within γ_dim·‖q‖‖d‖ of
    the exact value (Higham, Accuracy and Stability of Numerical Algorithms, §3.1). For l2, ½‖d‖² carries the
    same relative errors, and the subtraction one more rounding. Doubled for the rounding of the norms
    themselves.
    """
    gamma = (dim + 2) * UNIT_ROUNDOFF / (1 - (dim + 2) * UNIT_ROUNDOFF)
    q = query_norms.to(torch.float64)
    offset = 0.5 * max_doc_norm**2 if metric == "l2" else 0.0
    return 2 * gamma * (q * max_doc_norm + offset)


def refine(
    query_rows: torch.Tensor,
    docs: Source,
    keys: torch.Tensor,
    indices: torch.Tensor,
    max_doc_norm: float,
    keep: int,
    metric: str = "l2",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact scores for the candidates, best first, and the rows not certified.

    Args:
        query_rows: (rows, dim) float32 queries, as given (not rounded).
        keys, indices: (rows, c) search keys (best first) and doc indices of each row's c candidates.
        max_doc_norm: the largest ‖d‖ over all docs (an upper bound).
        keep: answers needed per row; the keep-th best candidate is the one certified.
        metric: "l2" (exact squared distances, nearest first) or "ip" (exact dot products, highest first).

    Returns:
        (scores float32 (rows, c), indices int64 (rows, c), uncertain rows int64 (n,)).
    """
    rows, candidates = indices.shape
    exact = torch.empty((rows, candidates), dtype=torch.float64)
    # The C kernel reads a float32 array's rows in place; otherwise candidates are gathered, a few rows at a time.
    in_place = _table(docs) is not None
    step = rows if in_place else max(1, REFINE_GATHER_BYTES // max(1, candidates * docs.dim * 4))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        exact[start:stop] = _exact_scores(query_rows[start:stop], docs, indices[start:stop], metric == "l2")
    # Rank by the float32 score that is returned, ties by ascending index (the one tie rule).
    nearest_first = metric == "l2"
    rounded = exact.to(torch.float32)
    by_index = torch.argsort(indices, dim=1, stable=True)
    by_score = torch.argsort(torch.gather(rounded, 1, by_index), dim=1, descending=not nearest_first, stable=True)
    order = torch.gather(by_index, 1, by_score)
    ordered = torch.gather(exact, 1, order)
    ordered_indices = torch.gather(indices, 1, order)
    if candidates >= docs.rows:
        return ordered.to(torch.float32), ordered_indices, torch.empty(0, dtype=torch.int64)
    # A doc left out had key <= the lowest candidate key, so its exact key is <= that + bound. Certified
    # when the keep-th answer is strictly better than anything a left-out doc can reach, with a float32 ulp
    # to spare so that no left-out doc can round to the same float32 score.
    query_wide = query_rows.to(torch.float64)
    query_sq = (query_wide * query_wide).sum(dim=1)
    bound = key_error_bound(query_sq.sqrt(), max_doc_norm, docs.dim, metric)
    ceiling = keys[:, -1].to(torch.float64) + bound
    kth = ordered[:, keep - 1]
    if nearest_first:  # exact key = (‖q‖² − distance) / 2
        certified = kth * (1 + 2.0**-22) < query_sq - 2 * ceiling
    else:
        certified = kth - kth.abs() * 2.0**-22 - 1e-30 > ceiling
    return ordered.to(torch.float32), ordered_indices, torch.nonzero(~certified).flatten()


def exact_search(
    query_rows: torch.Tensor, docs: Source, keep: int, metric: str = "l2", excluded: Exclusions | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `keep` best docs of each query row by exact score, streaming every doc: slow, but exact for any
    data and bounded in memory. Returns (scores float32, indices int64), best first; with `excluded`, less
    those pairs (padded with index -1, the worst score)."""
    rows, dim = query_rows.shape
    chunk = max(64, REFINE_GATHER_BYTES // (24 * dim * rows))
    running = SortMergeTopK(rows, keep)
    sign = -1.0 if metric == "l2" else 1.0  # the running top-k keeps the highest: nearest = highest −distance
    for start in range(0, docs.rows, chunk):
        count = min(chunk, docs.rows - start)
        window = torch.arange(start, start + count, dtype=torch.int64).expand(rows, count)
        exact = _exact_scores(query_rows, docs, window, metric == "l2").to(torch.float32)
        signed_tile = sign * exact + 0.0
        if excluded is not None:
            mask_excluded(signed_tile, excluded, 0, start)
        running.add(signed_tile, 0, start)
    signed, indices = running.result()
    if excluded is not None:
        signed, indices = drop_excluded(signed, indices, excluded, keep, float("-inf"))
    return sign * signed + 0.0, indices


def _exact_scores(query_rows: torch.Tensor, docs: Source, indices: torch.Tensor, squared: bool) -> torch.Tensor:
    """‖q − d‖² (squared) or q·d in float64 for each (query row, candidate index) pair, summed in LANES
    interleaved partial sums combined as a fixed tree (as the C kernel does), so every path gives the same
    bits."""
    table, positions = _row_table(docs, indices)
    queries = query_rows.to(torch.float32).contiguous()
    rows, candidates = indices.shape
    out = torch.empty((rows, candidates), dtype=torch.float64)
    if KERNEL is None:
        gathered = table.numpy()[positions.numpy()]  # (rows, c, dim)
        if squared:
            difference = np.subtract(gathered, queries.numpy()[:, None, :], dtype=np.float64)
            terms = difference * difference
        else:
            terms = np.multiply(gathered, queries.numpy()[:, None, :], dtype=np.float64)
        out.numpy()[...] = _lane_sums(terms)
        return out
    dim = queries.shape[1]

    def run(lo: int, hi: int) -> None:
        assert KERNEL is not None
        changed = KERNEL.tk_exact(
            table.data_ptr(),
            table.stride(0),
            queries.data_ptr() + lo * dim * 4,
            dim,
            dim,
            positions.data_ptr() + lo * candidates * 8,
            hi - lo,
            candidates,
            out.data_ptr() + lo * candidates * 8,
            int(squared),
        )
        if changed:  # the docs file shrank under its memory map (only a FileSource's table is mapped)
            assert isinstance(docs, FileSource)
            raise docs.changed()

    threads = max(1, min(torch.get_num_threads(), rows))
    step = -(-rows // threads)
    if threads == 1:
        run(0, rows)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda lo: run(lo, min(lo + step, rows)), range(0, rows, step)))
    return out


def _row_table(docs: Source, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 table with unit column stride, and each candidate's row in it: the docs themselves when
    the kernel can read them in place (no copy), else the candidates' rows gathered once each."""
    table = _table(docs)
    if table is not None:
        return table, indices.contiguous()
    unique, inverse = torch.unique(indices, return_inverse=True)
    gathered = torch.empty((unique.numel(), docs.dim), dtype=torch.float32)
    docs.read_rows(unique, gathered)
    return gathered, inverse.contiguous()


def _table(docs: Source) -> torch.Tensor | None:
    """The docs as one float32 table with contiguous rows that the C kernel reads in place: an array in memory,
    or a file's mapping (whose reads the kernel guards); None without the kernel or for other sources."""
    if KERNEL is None:
        return None
    if isinstance(docs, ArraySource) and docs.tensor.dtype == torch.float32 and docs.tensor.stride(1) == 1:
        return docs.tensor
    return docs.mapped() if isinstance(docs, FileSource) else None


def _lane_sums(terms: np.ndarray) -> np.ndarray:
    """Sums the last axis as the C kernel does: lane i % LANES, lanes in order, then a fixed tree."""
    dim = terms.shape[-1]
    padded = np.zeros((*terms.shape[:-1], -(-dim // LANES) * LANES), dtype=np.float64)
    padded[..., :dim] = terms
    acc = padded[..., :LANES].copy()
    for start in range(LANES, padded.shape[-1], LANES):
        acc += padded[..., start : start + LANES]
    a = acc
    total: np.ndarray = ((a[..., 0] + a[..., 1]) + (a[..., 2] + a[..., 3])) + (
        (a[..., 4] + a[..., 5]) + (a[..., 6] + a[..., 7])
    )
    return total


def drop_self(
    scores: torch.Tensor, indices: torch.Tensor, first_query: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Removes, from each row of k + 1 or more ordered candidates, the doc whose index is the query's own
    (row r of the block is query first_query + r), else the last candidate; returns k per row."""
    rows = indices.shape[0]
    own = torch.arange(first_query, first_query + rows, dtype=torch.int64)[:, None]
    is_own = indices[:, : k + 1] == own
    # Keep the first k entries that are not the query itself: a stable sort puts them first.
    order = torch.argsort(is_own.to(torch.int8), dim=1, stable=True)[:, :k]
    return torch.gather(scores[:, : k + 1], 1, order), torch.gather(indices[:, : k + 1], 1, order)
