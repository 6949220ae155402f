"""Independent references for tiny-knn's answers: a float64 brute force and faiss-cpu."""

from __future__ import annotations

import numpy as np
import torch


def brute_force(queries: torch.Tensor, docs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 top-k with the tie rule (descending score, then ascending index)."""
    exact = queries.double() @ docs.double().T
    scores, indices = torch.sort(exact, dim=1, descending=True, stable=True)
    return scores[:, :k], indices[:, :k]


def assert_exact(queries: torch.Tensor, docs: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor) -> None:
    """Every score within 1e-5 of the float64 top-k, and every returned index a doc whose float64 score is
    that top-k's (so indices agree except at genuine ties).

    The tolerance is 1e-5 for unit vectors and scales with |q| * max|d| otherwise: float32 rounding error
    grows with the operands' norms, not with the score (which cancellation can make small).
    """
    k = scores.shape[1]
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64
    assert indices.shape == scores.shape == (queries.shape[0], k)
    best, _ = brute_force(queries, docs, k)
    scale = queries.double().norm(dim=1, keepdim=True) * docs.double().norm(dim=1).max()
    tolerance = 1e-5 * scale.clamp(min=1.0)
    assert ((scores.double() - best).abs() <= tolerance).all(), "scores differ from the float64 top-k"
    exact_of_returned = (queries.double() @ docs.double().T).gather(1, indices)
    assert ((exact_of_returned - best).abs() <= tolerance).all(), "a returned doc is not in the float64 top-k"
    for row in indices:
        assert row.unique().numel() == k, "a doc is returned twice for one query"


def faiss_search(queries: torch.Tensor, docs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(docs.shape[1])
    index.add(docs.float().numpy())
    scores, indices = index.search(queries.float().numpy(), k)
    return scores, indices
