"""Independent references for tiny-knn's answers: a float64 brute force and faiss-cpu."""

from __future__ import annotations

import numpy as np
import torch


def exact_scores(queries: torch.Tensor, docs: torch.Tensor, metric: str = "ip") -> torch.Tensor:
    """Every (query, doc) score in float64: dot product, cosine, or squared Euclidean distance."""
    q, d = queries.double(), docs.double()
    if metric == "cosine":
        q = q / q.norm(dim=1, keepdim=True).clamp(min=1e-300)
        d = d / d.norm(dim=1, keepdim=True).clamp(min=1e-300)
    if metric == "l2":
        return ((q[:, None, :] - d[None, :, :]) ** 2).sum(dim=2)
    return q @ d.T


def brute_force(
    queries: torch.Tensor, docs: torch.Tensor, k: int, metric: str = "ip"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 top-k with the tie rule (best score first: highest, or nearest for l2; then ascending index)."""
    exact = exact_scores(queries, docs, metric)
    scores, indices = torch.sort(exact, dim=1, descending=metric != "l2", stable=True)
    return scores[:, :k], indices[:, :k]


def assert_exact(
    queries: torch.Tensor, docs: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor, metric: str = "ip"
) -> None:
    """Every score within 1e-5 of the float64 top-k, and every returned index a doc whose float64 score is
    that top-k's (so indices agree except at genuine ties).

    The tolerance is 1e-5 for unit vectors and scales with |q| * max|d| otherwise: float32 rounding error
    grows with the operands' norms, not with the score (which cancellation can make small).
    """
    k = scores.shape[1]
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64
    assert indices.shape == scores.shape == (queries.shape[0], k)
    best, _ = brute_force(queries, docs, k, metric)
    if metric == "ip":
        scale = queries.double().norm(dim=1, keepdim=True) * docs.double().norm(dim=1).max()
        tolerance = 1e-5 * scale.clamp(min=1.0)
    elif metric == "cosine":
        tolerance = torch.tensor(1e-5)
    else:  # l2 is re-scored exactly: float32 rounding of the true distance
        tolerance = 1e-6 * best.abs() + 1e-30
    assert ((scores.double() - best).abs() <= tolerance).all(), "scores differ from the float64 top-k"
    exact_of_returned = exact_scores(queries, docs, metric).gather(1, indices)
    assert ((exact_of_returned - best).abs() <= tolerance).all(), "a returned doc is not in the float64 top-k"
    for row in indices:
        assert row.unique().numel() == k, "a doc is returned twice for one query"


def faiss_search(
    queries: torch.Tensor, docs: torch.Tensor, k: int, metric: str = "ip"
) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's answer: IndexFlatIP (on normalised copies for cosine) or IndexFlatL2."""
    import faiss

    q, d = queries.float().numpy().copy(), docs.float().numpy().copy()
    if metric == "cosine":
        faiss.normalize_L2(q)
        faiss.normalize_L2(d)
    index = faiss.IndexFlatL2(d.shape[1]) if metric == "l2" else faiss.IndexFlatIP(d.shape[1])
    index.add(d)
    scores, indices = index.search(q, k)
    return scores, indices
