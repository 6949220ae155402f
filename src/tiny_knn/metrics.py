"""Metrics: what a score is, and which scores are best.

- `ip` (the default, the contract): the dot product q·d, highest first.
- `cosine`: the dot product of the rows scaled to unit length as they are read (the inputs are never
  rewritten), highest first: x / sqrtf(tk_dot(x, x)), see normalize. An all-zero row stays zero and scores 0
  against everything.
- `l2`: the squared Euclidean distance ‖q − d‖², smallest first (FAISS's `IndexFlatL2` convention).

Every score is exact (tiny-knn's one definition: _kernels/tk.h): on the CPU each metric is screened by an
estimator and scored exactly (engine.py). On the path by search keys (a GPU, or the CPU without the compiled
kernel), every metric is searched as a key that is highest for the best docs, computed by the same matrix
product: for `l2` the key is q·d − ½‖d‖², which orders docs as −½‖q − d‖² does (‖q‖² is the same for every
doc of a query). That key cancels badly for near neighbours, so the candidates it finds are re-scored exactly
(see refine.py) before anything is returned.
"""

from __future__ import annotations

import numpy as np
import torch

from .kernel import KERNEL

METRICS = ("ip", "cosine", "l2")
DEFAULT_METRIC = "ip"


def check_metric(metric: str) -> str:
    """Returns `metric` if known, else raises ValueError naming the known ones."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
    return metric


def normalize(rows: torch.Tensor) -> None:
    """Scales float32 CPU rows to unit length in place, for cosine: x / sqrtf(tk_dot(x, x)) with the compiled
    kernel (tiny-knn's one definition, the same bits on every CPU), else with numpy. An all-zero row stays zero."""
    if KERNEL is not None and rows.dtype == torch.float32 and rows.stride(1) == 1:
        KERNEL.tk_normalize(rows.data_ptr(), rows.stride(0), rows.shape[0], rows.shape[1])
        return
    values = rows.numpy()
    with np.errstate(over="ignore", invalid="ignore"):  # a NaN or Inf row stays non-finite and is refused later
        norms = np.sqrt(np.einsum("ij,ij->i", values, values))
        norms[norms == 0] = 1
        values /= norms[:, None]


def prepare_docs(rows: torch.Tensor, metric: str, precision: str = "exact") -> tuple[torch.Tensor | None, float]:
    """Makes freshly read float32 CPU doc rows ready to multiply by search keys; returns their key offsets, if any,
    and the largest squared norm among them (0.0 when no refinement needs it).

    `cosine` scales each row to unit length in place; `l2` returns ½‖row‖² (float32), which the engine
    subtracts from each doc's column of products. With --precision bf16-unsafe the rows are then rounded to
    bfloat16 values in place (the offsets too are taken from the rounded rows: the key is the product of
    rounded rows). Row by row (single-threaded, so it can run on the read-ahead thread), hence the same bits
    whatever chunk a row arrives in.
    """
    values = rows.numpy()
    if metric == "cosine":
        normalize(rows)
    largest = 0.0
    if metric == "l2":
        squares = np.einsum("ij,ij->i", values, values)
        largest = float(squares.max()) if squares.size else 0.0
    if precision == "bf16-unsafe":
        round_to_bfloat16(values)
    if metric == "l2":
        return torch.from_numpy(squares * np.float32(0.5)), largest
    return None, largest


def round_to_bfloat16(values: np.ndarray) -> None:
    """Rounds float32 values in place to the nearest bfloat16 (ties to even), kept as float32: what a
    tensor core multiplies. Finite inputs only (rows are checked when read, before rounding)."""
    bits = values.view(np.uint32)
    bits += np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    bits &= np.uint32(0xFFFF0000)


def higher_is_better(metric: str) -> bool:
    """True for similarities (ip, cosine), False for distances (l2)."""
    return metric != "l2"
