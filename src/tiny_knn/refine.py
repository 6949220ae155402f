"""Refining: turn each query's candidates into its final answer.

- `l2`: the search key q·d − ½‖d‖² cancels badly for near neighbours (a query's own row may lose to a
  doc a little farther away), so each candidate is re-scored exactly: (q − d) is exact in float64 for
  float32 inputs, and so are the squares, which leaves only a sum whose error is relative to the
  distance itself. Candidates are then ordered by (distance ascending, index ascending), and the row is
  *certified*: every doc left out had a key no higher than the last candidate's, so with a rigorous bound
  on the key's rounding error, none of them can be nearer than the k-th answer. Rows that fail are
  searched again with more candidates (see engine.py), and rows that still fail (data far from the
  origin, where the bound is loose) get `exact_l2_search`: every doc's exact distance, streamed.
- `exclude_self`: each query's own row (doc index == query index) is dropped by index, not by position,
  from k + 1 candidates; if it is not among them, the last one is dropped.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .kernel import KERNEL
from .plan import REFINE_GATHER_BYTES
from .sources import ArraySource, Source
from .topk import SortMergeTopK

UNIT_ROUNDOFF_FLOAT32 = 2.0**-24
LANES = 8  # partial sums of an exact distance, as in _select.c's tk_l2_exact


def key_error_bound(query_norms: torch.Tensor, max_doc_norm: float, dim: int) -> torch.Tensor:
    """Per query, a bound on |computed key − exact key| for every doc (float64).

    The dot product of dim float32 terms, in any order and with or without FMA, is within γ_dim·‖q‖‖d‖ of
    the exact value (Higham, Accuracy and Stability of Numerical Algorithms, §3.1); ½‖d‖² is within
    γ_dim·½‖d‖²; the subtraction adds one more rounding. Doubled for the rounding of the norms themselves.
    """
    gamma = (dim + 2) * UNIT_ROUNDOFF_FLOAT32 / (1 - (dim + 2) * UNIT_ROUNDOFF_FLOAT32)
    q = query_norms.to(torch.float64)
    return 2 * gamma * (q * max_doc_norm + 0.5 * max_doc_norm**2)


def refine_l2(
    query_rows: torch.Tensor,
    docs: Source,
    keys: torch.Tensor,
    indices: torch.Tensor,
    max_doc_norm: float,
    keep: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact distances for the candidates, ordered nearest first, and the rows not certified.

    Args:
        query_rows: (rows, dim) float32 queries.
        keys, indices: (rows, c) search keys (best first) and doc indices of each row's c candidates.
        max_doc_norm: the largest ‖d‖ over all docs (an upper bound).
        keep: answers needed per row; the keep-th nearest candidate is the one certified.

    Returns:
        (distances float32 (rows, c), indices int64 (rows, c), uncertain rows int64 (n,)).
    """
    rows, candidates = indices.shape
    distances = torch.empty((rows, candidates), dtype=torch.float64)
    # The C kernel reads a float32 array's rows in place; otherwise candidates are gathered, a few rows at a time.
    in_place = KERNEL is not None and _is_table(docs)
    step = rows if in_place else max(1, REFINE_GATHER_BYTES // max(1, candidates * docs.dim * 4))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        distances[start:stop] = _exact_distances(query_rows[start:stop], docs, indices[start:stop])
    # Rank by the float32 distance that is returned, ties by ascending index (the one tie rule).
    rounded = distances.to(torch.float32)
    by_index = torch.argsort(indices, dim=1, stable=True)
    by_distance = torch.argsort(torch.gather(rounded, 1, by_index), dim=1, stable=True)
    order = torch.gather(by_index, 1, by_distance)
    ordered_distances = torch.gather(distances, 1, order)
    ordered_indices = torch.gather(indices, 1, order)
    if candidates >= docs.rows:
        return ordered_distances.to(torch.float32), ordered_indices, torch.empty(0, dtype=torch.int64)
    # A doc left out had key <= the lowest candidate key, so exact key <= that + bound, and its exact
    # distance ‖q‖² − 2·key >= the floor below. Strictly nearer than the floor: certified, with a float32
    # ulp to spare so that no left-out doc can round to the same float32 distance.
    query_wide = query_rows.to(torch.float64)
    query_sq = (query_wide * query_wide).sum(dim=1)
    bound = key_error_bound(query_sq.sqrt(), max_doc_norm, docs.dim)
    floor = query_sq - 2 * (keys[:, -1].to(torch.float64) + bound)
    kth = ordered_distances[:, keep - 1]
    uncertain = torch.nonzero(~(kth * (1 + 2.0**-22) < floor)).flatten()
    return ordered_distances.to(torch.float32), ordered_indices, uncertain


def exact_l2_search(query_rows: torch.Tensor, docs: Source, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `keep` nearest docs of each query row by exact distance, streaming every doc: slow, but exact for
    any data and bounded in memory. Returns (distances float32, indices int64), nearest first."""
    rows, dim = query_rows.shape
    chunk = max(64, REFINE_GATHER_BYTES // (24 * dim * rows))
    running = SortMergeTopK(rows, keep)
    for start in range(0, docs.rows, chunk):
        count = min(chunk, docs.rows - start)
        window = torch.arange(start, start + count, dtype=torch.int64).expand(rows, count)
        exact = _exact_distances(query_rows, docs, window).to(torch.float32)
        running.add(0 - exact, 0, start)  # nearest first = highest key first
    negated, indices = running.result()
    return 0 - negated, indices


def _exact_distances(query_rows: torch.Tensor, docs: Source, indices: torch.Tensor) -> torch.Tensor:
    """‖q − d‖² in float64 for each (query row, candidate index) pair, summed in LANES interleaved partial
    sums combined as a fixed tree (as the C kernel does), so every path gives the same bits."""
    table, positions = _row_table(docs, indices)
    queries = query_rows.to(torch.float32).contiguous()
    rows, candidates = indices.shape
    out = torch.empty((rows, candidates), dtype=torch.float64)
    if KERNEL is None:
        gathered = table.numpy()[positions.numpy()]  # (rows, c, dim)
        difference = np.subtract(gathered, queries.numpy()[:, None, :], dtype=np.float64)
        out.numpy()[...] = _lane_sums(difference * difference)
        return out
    dim = queries.shape[1]

    def run(lo: int, hi: int) -> None:
        KERNEL.tk_l2_exact(
            table.data_ptr(),
            table.stride(0),
            queries.data_ptr() + lo * dim * 4,
            dim,
            dim,
            positions.data_ptr() + lo * candidates * 8,
            hi - lo,
            candidates,
            out.data_ptr() + lo * candidates * 8,
        )

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
    they are one float32 array (no copy), else the candidates' rows gathered once each."""
    if _is_table(docs):
        return docs.tensor, indices.contiguous()  # type: ignore[attr-defined]
    unique, inverse = torch.unique(indices, return_inverse=True)
    gathered = torch.empty((unique.numel(), docs.dim), dtype=torch.float32)
    docs.read_rows(unique, gathered)
    return gathered, inverse.contiguous()


def _is_table(docs: Source) -> bool:
    """True when the docs are one float32 array with contiguous rows, which the kernel can read in place."""
    return isinstance(docs, ArraySource) and docs.tensor.dtype == torch.float32 and docs.tensor.stride(1) == 1


def _lane_sums(squares: np.ndarray) -> np.ndarray:
    """Sums the last axis as the C kernel does: lane i % LANES, lanes in order, then a fixed tree."""
    dim = squares.shape[-1]
    padded = np.zeros((*squares.shape[:-1], -(-dim // LANES) * LANES), dtype=np.float64)
    padded[..., :dim] = squares
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
