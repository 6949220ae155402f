"""Metrics: what a score is, and which scores are best.

- `ip` (the default, the contract): the dot product q·d, highest first.
- `cosine`: the dot product of the rows scaled to unit length as they are read (the inputs are never
  rewritten), highest first. An all-zero row stays zero and scores 0 against everything.
- `l2`: the squared Euclidean distance ‖q − d‖², smallest first (FAISS's `IndexFlatL2` convention).

Every metric is searched as a key that is highest for the best docs, computed by the same matrix product:
for `l2` the key is q·d − ½‖d‖², which orders docs as −½‖q − d‖² does (‖q‖² is the same for every doc of a
query). That key cancels badly for near neighbours, so the candidates it finds are re-scored exactly
(see refine.py) before anything is returned.
"""

from __future__ import annotations

import numpy as np
import torch

METRICS = ("ip", "cosine", "l2")
DEFAULT_METRIC = "ip"


def check_metric(metric: str) -> str:
    """Returns `metric` if known, else raises ValueError naming the known ones."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
    return metric


def prepare_queries(rows: torch.Tensor, metric: str) -> None:
    """Makes freshly read float32 CPU query rows ready to multiply, in place (cosine: unit length)."""
    if metric == "cosine":
        _normalize(rows.numpy())


def prepare_docs(rows: torch.Tensor, metric: str) -> torch.Tensor | None:
    """Makes freshly read float32 CPU doc rows ready to multiply; returns their key offsets, if any.

    `cosine` scales each row to unit length in place; `l2` returns ½‖row‖² (float32), which the engine
    subtracts from each doc's column of products. Row by row and in numpy (single-threaded, so it can run on
    the read-ahead thread), hence the same bits whatever chunk a row arrives in.
    """
    if metric == "cosine":
        _normalize(rows.numpy())
    elif metric == "l2":
        values = rows.numpy()
        return torch.from_numpy(np.einsum("ij,ij->i", values, values) * np.float32(0.5))
    return None


def _normalize(values: np.ndarray) -> None:
    norms = np.sqrt(np.einsum("ij,ij->i", values, values))
    norms[norms == 0] = 1
    values /= norms[:, None]


def higher_is_better(metric: str) -> bool:
    """True for similarities (ip, cosine), False for distances (l2)."""
    return metric != "l2"
