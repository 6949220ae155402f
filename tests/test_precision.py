"""Certified reduced precision, on the CPU with bfloat16 emulated: products of rows rounded to bfloat16
find candidates, every answer is re-scored exactly and certified, so the answer is exact whatever the
rounding did. (On a GPU the same logic will sit behind tensor-core products; that awaits a GPU.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import assert_exact

from tiny_knn import InvalidInputError, engine, refine, search
from tiny_knn.metrics import round_to_bfloat16


def test_rounding_matches_torch_bfloat16() -> None:
    values = torch.randn(10_000) * torch.logspace(-20, 20, 10_000)
    rounded = values.clone()
    round_to_bfloat16(rounded.numpy())
    assert torch.equal(rounded, values.to(torch.bfloat16).to(torch.float32))


@pytest.mark.parametrize("offset", [0.0, 3.0, 100.0])
def test_the_bfloat16_key_error_bound_holds(offset) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(int(offset))
    queries = torch.randn(64, 96, generator=generator) + offset
    docs = torch.randn(3000, 96, generator=generator) + offset
    rounded_q, rounded_d = queries.clone(), docs.clone()
    round_to_bfloat16(rounded_q.numpy())
    round_to_bfloat16(rounded_d.numpy())
    max_norm = float(docs.double().norm(dim=1).max())
    for metric in ("ip", "l2"):
        keys = rounded_q @ rounded_d.T
        exact = queries.double() @ docs.double().T
        if metric == "l2":
            keys = keys - 0.5 * (rounded_d * rounded_d).sum(dim=1)
            exact = exact - 0.5 * (docs.double() ** 2).sum(dim=1)
        bound = refine.key_error_bound(queries.double().norm(dim=1), max_norm, 96, metric, "bf16")
        error = (keys.double() - exact).abs()
        assert (error <= bound[:, None]).all()
        assert error.max() > 1e-3 * bound.max()  # the bound is not absurdly loose for real data


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("k", [1, 10, 300])
def test_certified_bfloat16_is_exact(metric, k) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(k)
    queries, docs = torch.randn(40, 64, generator=generator), torch.randn(2500, 64, generator=generator)
    docs[100:110] = docs[7]  # exact ties
    scores, indices = search(queries, docs, k, metric=metric, precision="bf16", device="cpu", chunk_size=512)
    assert_exact(queries, docs, scores, indices, metric)
    # Scores are the exact value rounded once to float32: the same as the float64 brute force's, rounded.
    exact = queries.double() @ docs.double().T if metric == "ip" else torch.cdist(queries.double(), docs.double()) ** 2
    assert np.allclose(scores.numpy(), exact.gather(1, indices).float().numpy(), rtol=1e-6, atol=1e-6)


def test_certified_bfloat16_does_not_depend_on_the_plan() -> None:
    generator = torch.Generator().manual_seed(2)
    queries, docs = torch.randn(33, 24, generator=generator), torch.randn(1500, 24, generator=generator)
    reference = search(queries, docs, 20, precision="bf16", device="cpu")
    for batch, chunk in ((1, 64), (7, 300), (33, 1500)):
        scores, indices = search(queries, docs, 20, precision="bf16", device="cpu", batch_size=batch, chunk_size=chunk)
        assert torch.equal(scores, reference[0]) and torch.equal(indices, reference[1])


def test_when_nothing_can_be_certified_the_answer_is_still_exact(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(4)
    queries, docs = torch.randn(12, 16, generator=generator), torch.randn(900, 16, generator=generator)
    reference = search(queries, docs, 5, precision="bf16", device="cpu")
    monkeypatch.setattr(refine, "key_error_bound", lambda *args: torch.full((args[0].shape[0],), 1e9))
    streamed = []
    real_exact = engine.exact_search
    monkeypatch.setattr(engine, "exact_search", lambda *a: streamed.append(1) or real_exact(*a))
    scores, indices = search(queries, docs, 5, precision="bf16", device="cpu")
    assert streamed and torch.equal(scores, reference[0]) and torch.equal(indices, reference[1])


def test_unsafe_bfloat16_is_what_it_says_and_refused_where_not_built() -> None:
    generator = torch.Generator().manual_seed(6)
    queries, docs = torch.randn(20, 32, generator=generator), torch.randn(800, 32, generator=generator)
    scores, _ = search(queries, docs, 5, precision="bf16-unsafe", device="cpu")
    exact, _ = search(queries, docs, 5, device="cpu")
    assert torch.allclose(scores, exact, atol=0.2) and not torch.equal(scores, exact)  # close, not exact
    with pytest.raises(InvalidInputError, match="precision bf16 with metric cosine is not supported yet"):
        search(queries, docs, 5, precision="bf16", metric="cosine", device="cpu")
    with pytest.raises(InvalidInputError, match="expected one of exact, fp32, bf16, bf16-unsafe"):
        search(queries, docs, 5, precision="fp8", device="cpu")
