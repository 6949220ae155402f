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


def prepare_docs(rows: torch.Tensor, metric: str, precision: str = "fp32") -> tuple[torch.Tensor | None, float]:
    """Makes freshly read float32 CPU doc rows ready to multiply; returns their key offsets, if any, and
    the largest squared norm among them (0.0 when no refinement needs it).

    `cosine` scales each row to unit length in place; `l2` returns ½‖row‖² (float32), which the engine
    subtracts from each doc's column of products. In reduced precision the rows are then rounded to
    bfloat16 values in place (the offsets too are taken from the rounded rows: the key is the product of
    rounded rows). Row by row and in numpy (single-threaded, so it can run on the read-ahead thread), hence
    the same bits whatever chunk a row arrives in.
    """
    values = rows.numpy()
    if metric == "cosine":
        _normalize(values)
    largest = 0.0
    if metric == "l2" or precision != "fp32":
        squares = np.einsum("ij,ij->i", values, values)
        largest = float(squares.max()) if squares.size else 0.0
    if precision != "fp32":
        round_to_bfloat16(values)
    if metric == "l2":
        squares = np.einsum("ij,ij->i", values, values) if precision != "fp32" else squares
        return torch.from_numpy(squares * np.float32(0.5)), largest
    return None, largest


def round_to_bfloat16(values: np.ndarray) -> None:
    """Rounds float32 values in place to the nearest bfloat16 (ties to even), kept as float32: what a
    tensor core multiplies. Finite inputs only (rows are checked when read, before rounding)."""
    bits = values.view(np.uint32)
    bits += np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    bits &= np.uint32(0xFFFF0000)


def _normalize(values: np.ndarray) -> None:
    with np.errstate(over="ignore", invalid="ignore"):  # a NaN or Inf row stays non-finite and is refused later
        norms = np.sqrt(np.einsum("ij,ij->i", values, values))
        norms[norms == 0] = 1
        values /= norms[:, None]


def higher_is_better(metric: str) -> bool:
    """True for similarities (ip, cosine), False for distances (l2)."""
    return metric != "l2"
