from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

SaveTensor = Callable[..., str]


@pytest.fixture
def save(tmp_path) -> SaveTensor:  # type: ignore[no-untyped-def]
    """save(obj, name="x.pt") -> path: torch.save under tmp_path."""

    def _save(obj: object, name: str = "x.pt") -> str:
        path = os.path.join(tmp_path, name)
        torch.save(obj, path)
        assert os.path.getsize(path) > 0
        return path

    return _save


@pytest.fixture
def pair(save):  # type: ignore[no-untyped-def]
    """pair(queries, docs) -> (q_path, d_path)."""

    def _pair(queries: torch.Tensor, docs: torch.Tensor) -> tuple[str, str]:
        return save(queries, "queries.pt"), save(docs, "docs.pt")

    return _pair


@pytest.fixture(autouse=True)
def _kernel_product_wherever_it_runs(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The kernel's product wherever it runs (AVX-512), for any number of queries: the tests' small inputs, and
    CPUs where torch.mm is the faster (Intel), would otherwise take torch.mm (product.KERNEL_MIN_QUERIES,
    product.kernel_product_faster; test_product checks the real choice)."""
    from tiny_knn import product

    monkeypatch.setattr(product, "KERNEL_MIN_QUERIES", 1)
    monkeypatch.setattr(product, "kernel_product_faster", lambda: True)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test sees the same random data on every run: a failure is always reproducible."""
    torch.manual_seed(0)
