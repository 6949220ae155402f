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
def _own_estimator_cache(tmp_path_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Measured estimator choices (backend.py) go to a cache folder of the test session's own: tests neither
    read the user's verdicts nor leave theirs behind."""
    monkeypatch.setenv("TINY_KNN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "estimator-cache"))
    monkeypatch.delenv("TINY_KNN_PRODUCT", raising=False)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test sees the same random data on every run: a failure is always reproducible."""
    torch.manual_seed(0)


@pytest.fixture
def cuda() -> None:
    """Tests that need a GPU: skipped visibly without one; TINY_KNN_REQUIRE_CUDA=1 makes that a failure (a machine
    that should have one cannot pass by skipping)."""
    if not torch.cuda.is_available():
        if os.environ.get("TINY_KNN_REQUIRE_CUDA") == "1":
            pytest.fail("TINY_KNN_REQUIRE_CUDA=1 but no CUDA device is available")
        pytest.skip("no CUDA device (set TINY_KNN_REQUIRE_CUDA=1 to make this a failure)")
