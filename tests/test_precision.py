"""--precision: "exact" is the default and the only exact mode (fp32 and bf16, older names, now mean it, with a
warning); "bf16-unsafe" returns bfloat16 products as they are."""

from __future__ import annotations

import pytest
import torch

from tiny_knn import InvalidInputError, TinyKnnWarning, search
from tiny_knn.metrics import round_to_bfloat16


def test_rounding_matches_torch_bfloat16() -> None:
    values = torch.randn(10_000) * torch.logspace(-20, 20, 10_000)
    rounded = values.clone()
    round_to_bfloat16(rounded.numpy())
    assert torch.equal(rounded, values.to(torch.bfloat16).to(torch.float32))


@pytest.mark.parametrize("old", ["fp32", "bf16"])
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_the_older_names_mean_exact_and_say_so(old, metric) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(3)
    queries, docs = torch.randn(20, 32, generator=generator), torch.randn(800, 32, generator=generator)
    exact = search(queries, docs, 5, metric=metric, device="cpu")
    with pytest.warns(TinyKnnWarning, match=f"precision '{old}' is now 'exact'"):
        scores, indices = search(queries, docs, 5, metric=metric, precision=old, device="cpu")
    assert torch.equal(scores, exact[0]) and torch.equal(indices, exact[1])


def test_unsafe_bfloat16_is_what_it_says_and_refused_where_not_built() -> None:
    generator = torch.Generator().manual_seed(6)
    queries, docs = torch.randn(20, 32, generator=generator), torch.randn(800, 32, generator=generator)
    scores, _ = search(queries, docs, 5, precision="bf16-unsafe", device="cpu")
    exact, _ = search(queries, docs, 5, device="cpu")
    assert torch.allclose(scores, exact, atol=0.2) and not torch.equal(scores, exact)  # close, not exact
    with pytest.raises(InvalidInputError, match="precision bf16-unsafe with metric l2 is not supported"):
        search(queries, docs, 5, precision="bf16-unsafe", metric="l2", device="cpu")
    with pytest.raises(InvalidInputError, match="expected one of exact, bf16-unsafe"):
        search(queries, docs, 5, precision="fp8", device="cpu")
