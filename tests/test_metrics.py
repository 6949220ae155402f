"""cosine and l2 against the float64 oracle and FAISS; self-search; independence from the plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import assert_exact, exact_scores, faiss_search

from tiny_knn import metrics, search
from tiny_knn.metrics import normalize, prepare_docs


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_agrees_with_faiss_except_at_ties(metric) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(7)
    queries, docs = torch.randn(40, 32, generator=generator), torch.randn(4000, 32, generator=generator) * 3
    scores, indices = search(queries, docs, 50, metric=metric, device="cpu", chunk_size=512)
    assert_exact(queries, docs, scores, indices, metric)
    faiss_scores, faiss_indices = faiss_search(queries, docs, 50, metric)
    differ = indices.numpy() != faiss_indices
    exact = exact_scores(queries, docs, metric)
    # Where the indices differ, the two docs' exact scores are tied (to FAISS's float32 resolution).
    ours_exact = exact.gather(1, indices)[torch.from_numpy(differ)]
    theirs_exact = exact.gather(1, torch.from_numpy(faiss_indices))[torch.from_numpy(differ)]
    assert torch.allclose(ours_exact, theirs_exact, rtol=1e-5, atol=1e-5)
    assert differ.mean() < 0.01
    assert np.allclose(scores.numpy(), faiss_scores, rtol=1e-4, atol=1e-4)


def test_cosine_ignores_norms_and_keeps_zero_rows_at_zero() -> None:
    docs = torch.tensor([[3.0, 0.0], [0.0, 0.1], [0.0, 0.0], [-5.0, 5.0]])
    scores, indices = search(torch.tensor([[10.0, 0.0], [0.0, 0.0]]), docs, 4, metric="cosine", device="cpu")
    assert indices[0].tolist() == [0, 1, 2, 3]
    assert scores[0, :3].tolist() == [1.0, 0.0, 0.0] and scores[0, 3] == pytest.approx(-(0.5**0.5))
    assert scores[1].tolist() == [0.0] * 4 and indices[1].tolist() == [0, 1, 2, 3]  # all tied: by index


def test_cosine_never_rewrites_the_inputs() -> None:
    queries, docs = torch.randn(5, 8) * 7, torch.randn(100, 8) * 3
    before = queries.clone(), docs.clone()
    search(queries, docs, 3, metric="cosine", device="cpu")
    assert torch.equal(queries, before[0]) and torch.equal(docs, before[1])


def test_l2_puts_the_query_itself_first_where_the_expansion_cancels() -> None:
    # Points far from the origin and close together: ‖q‖² + ‖d‖² − 2q·d loses every significant digit (on
    # 2,000 such points in 64 dims, FAISS's IndexFlatL2 returned the query itself first for 1 in 2,000).
    generator = torch.Generator().manual_seed(2)
    points = torch.randn(600, 48, generator=generator) * 1e-3 + 100.0
    distances, indices = search(points, points, 4, metric="l2", device="cpu")
    assert torch.equal(indices[:, 0], torch.arange(600))
    assert (distances[:, 0] == 0).all() and (distances[:, 1] > 0).all()
    assert_exact(points, points, distances, indices, "l2")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    metric=st.sampled_from(["ip", "cosine", "l2"]),
    rows=st.integers(2, 60),
    dim=st.integers(1, 9),
    k=st.integers(1, 12),
    duplicates=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_exclude_self_never_returns_the_query_itself(metric, rows, dim, k, duplicates, seed) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(seed)
    points = torch.randn(rows, dim, generator=generator)
    for _ in range(duplicates):  # copies of other rows, so the query ties with another row
        source, target = torch.randint(rows, (2,), generator=generator).tolist()
        points[target] = points[source]
    with pytest.warns(UserWarning) if k > rows - 1 else _nothing():
        _, indices = search(points, points, k, metric=metric, exclude_self=True, device="cpu", chunk_size=64)
    assert not (indices == torch.arange(rows)[:, None]).any()
    # The answer is the float64 top-k among the other rows.
    exact = exact_scores(points, points, metric)
    exact.fill_diagonal_(float("inf") if metric == "l2" else float("-inf"))
    best = torch.sort(exact, dim=1, descending=metric != "l2", stable=True).values[:, : indices.shape[1]]
    assert torch.allclose(exact.gather(1, indices), best, rtol=1e-5, atol=1e-5)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize(("batch", "chunk"), [(1, 64), (7, 100), (33, 1000)])
def test_identical_whatever_the_plan(metric, batch, chunk) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(4)
    queries, docs = torch.randn(45, 20, generator=generator), torch.randn(2100, 20, generator=generator)
    reference = search(queries, docs, 30, metric=metric, device="cpu")
    scores, indices = search(queries, docs, 30, metric=metric, device="cpu", batch_size=batch, chunk_size=chunk)
    assert torch.equal(scores, reference[0]) and torch.equal(indices, reference[1])


def test_prepare_is_row_by_row() -> None:
    rows = torch.randn(300, 16)
    whole, parts = rows.clone(), rows.clone()
    offsets, _ = prepare_docs(whole, "l2")
    parted = torch.cat([prepare_docs(parts[i : i + 7], "l2")[0] for i in range(0, 300, 7)])  # type: ignore[misc]
    assert offsets is not None and torch.equal(offsets, parted)
    normalize(whole)
    for i in range(0, 300, 7):
        normalize(parts[i : i + 7])
    assert torch.equal(whole, parts)
    assert torch.allclose(whole.norm(dim=1), torch.ones(300))


def test_unknown_metric() -> None:
    with pytest.raises(ValueError, match="expected one of ip, cosine, l2"):
        metrics.check_metric("dot")
