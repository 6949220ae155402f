"""Recall: how many of a run's neighbours are the exact ones, for any result file (tiny-knn's, or an .ivecs or
bigann file from another tool) against an exact one, the ground truth. Both are read a block of rows at a time.

Two figures, each the mean over the queries of the share of the run's first K neighbours that count:
- by ids (strict): those among the ground truth's first K docs. A run that returns another doc of a tied
  score loses it.
- by scores (ann-benchmarks' rule), where both files carry scores: those whose score is within SCORE_TOLERANCE
  of the ground truth's K-th score (at least it minus 1e-3 for similarities, at most it plus 1e-3 for
  distances). The run's scores are taken as the run reports them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InvalidInputError
from .options import whole
from .results import StoredResult, open_result

SCORE_TOLERANCE = 1e-3
# Neighbours of each file read at a time.
_BLOCK_VALUES = 1 << 22
_ROW_SPACING = 2**33  # more than any doc number of either file (< 2**32): row r's ids, moved to their own range


@dataclass(frozen=True)
class Recall:
    """Recall@k of a run against the ground truth (see the module docstring)."""

    k: int
    queries: int
    by_ids: float
    by_scores: float | None  # None where a file carries no scores

    def describe(self) -> str:
        """One line: 'recall@10: 0.987500 by ids, 0.991250 by scores (...); 400 queries'."""
        scores = (
            f"{self.by_scores:.6f} by scores (within {SCORE_TOLERANCE:g} of the {_ordinal(self.k)} exact score, "
            "ann-benchmarks' rule)"
            if self.by_scores is not None
            else "by scores: not measured (a file has no scores)"
        )
        return f"recall@{self.k}: {self.by_ids:.6f} by ids, {scores}; {self.queries} queries"


def recall_at_k(run: str | os.PathLike[str], truth: str | os.PathLike[str], k: int | None = None) -> Recall:
    """The recall@k of the result file `run` against the exact result `truth`.

    Args:
        run: any result tiny-knn reads: pt, an npy folder, parquet written without ids, .ivecs (with its .fvecs
            of scores beside it, if any) or a bigann ground-truth file.
        truth: the exact neighbours of the same queries, in any of the same formats.
        k: how many neighbours count (default: the run's k); both files must hold at least that many.

    Returns:
        A Recall: by ids, and by scores where both files carry them.

    Raises:
        InputFileError: a file is missing or unreadable.
        InvalidInputError: a file is not a result, the files hold different numbers of queries, or fewer than
            k neighbours each.

    Example:
        >>> import os, tempfile, torch
        >>> from tiny_knn import recall_at_k
        >>> folder = tempfile.mkdtemp()
        >>> for name, indices in (("run.pt", [[0, 1], [2, 3]]), ("truth.pt", [[0, 5], [3, 2]])):
        ...     torch.save({"indices": torch.tensor(indices), "scores": torch.tensor([[2.0, 1.0]] * 2)},
        ...                os.path.join(folder, name))
        >>> print(recall_at_k(os.path.join(folder, "run.pt"), os.path.join(folder, "truth.pt")).by_ids)
        0.75
    """
    found, exact = open_result(os.fspath(run), "run"), open_result(os.fspath(truth), "ground truth")
    k = found.k if k is None else whole(k)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInputError(f"k={k!r}: expected a whole number >= 1")
    for stored in (found, exact):
        if stored.k < k:
            raise InvalidInputError(
                f"{stored.label()}: {stored.k} neighbours per query, expected at least k={k}; pass a smaller --k"
            )
    if found.rows != exact.rows:
        raise InvalidInputError(
            f"{found.label()}: {found.rows} queries, expected {exact.rows} like the ground truth '{exact.path}'"
        )
    block_rows = max(1, _BLOCK_VALUES // max(found.k, exact.k))
    with_scores = found.has_scores and exact.has_scores
    by_ids = by_scores = 0
    higher_is_better: bool | None = None
    for (run_ids, run_scores), (true_ids, true_scores) in zip(
        found.blocks(block_rows), exact.blocks(block_rows), strict=True
    ):
        by_ids += _shared_ids(run_ids[:, :k].numpy(), true_ids[:, :k].numpy())
        if with_scores and run_scores is not None and true_scores is not None:
            if higher_is_better is None:
                higher_is_better = _similarities(exact, true_scores)
            kth = true_scores[:, k - 1 : k].double()
            shown = run_scores[:, :k].double()
            within = shown >= kth - SCORE_TOLERANCE if higher_is_better else shown <= kth + SCORE_TOLERANCE
            by_scores += int(within.sum())
    total = found.rows * k
    return Recall(k, found.rows, by_ids / total, by_scores / total if with_scores else None)


def _shared_ids(run: np.ndarray, truth: np.ndarray) -> int:
    """How many distinct non-negative ids of each row of `run` are in the same row of `truth`, summed."""
    rows = np.arange(run.shape[0], dtype=np.int64)[:, None] * _ROW_SPACING
    returned = np.unique((run + rows)[run >= 0])
    return int(np.isin(returned, truth + rows).sum())


def _similarities(truth: StoredResult, scores: torch.Tensor) -> bool:
    """Whether higher scores are better in the ground truth: its metric where it records one, else the order of
    its scores (best first, so falling for similarities, rising for distances)."""
    metric = truth.meta.get("metric")
    if metric is not None:
        return bool(metric != "l2")
    steps = scores[:, 1:] - scores[:, :-1]
    if bool((steps <= 0).all()):
        return True
    if bool((steps >= 0).all()):
        return False
    raise InvalidInputError(
        f"{truth.label()}: its scores neither fall nor rise along each row; expected them best first"
    )


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"
