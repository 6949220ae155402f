"""l2 re-scoring and certification, and self-exclusion, in isolation."""

from __future__ import annotations

import os

import pytest
import torch
from capabilities import needs_kernel
from oracle import assert_exact, brute_force

from tiny_knn import engine, refine
from tiny_knn.errors import InputChangedError
from tiny_knn.refine import _exact_scores
from tiny_knn.sources import from_array, open_source


def test_key_error_bound_holds() -> None:
    # The bound must exceed the observed error of the float32 key against the float64 one, for data with
    # a large common offset (where the error is largest relative to the distances).
    generator = torch.Generator().manual_seed(9)
    for offset, dim in ((0.0, 384), (50.0, 64), (1e3, 8)):
        queries = torch.randn(64, dim, generator=generator) + offset
        docs = torch.randn(2000, dim, generator=generator) + offset
        computed = queries @ docs.T - 0.5 * (docs * docs).sum(dim=1)
        exact = queries.double() @ docs.double().T - 0.5 * (docs.double() ** 2).sum(dim=1)
        bound = refine.key_error_bound(queries.double().norm(dim=1), float(docs.double().norm(dim=1).max()), dim)
        assert ((computed.double() - exact).abs() <= bound[:, None]).all()


def test_uncertified_rows_are_reported_and_exact_search_answers_them() -> None:
    generator = torch.Generator().manual_seed(3)
    queries, docs = torch.randn(20, 16, generator=generator), torch.randn(500, 16, generator=generator)
    source = from_array(docs, "docs")
    keys = queries @ docs.T - 0.5 * (docs * docs).sum(dim=1)
    top_keys, top_indices = keys.topk(12, dim=1)
    max_norm = float(docs.norm(dim=1).max())
    _, _, certified = refine.refine(queries, source, top_keys, top_indices, max_norm, keep=5)
    assert certified.numel() == 0  # a margin of 7 candidates is plenty for random data
    # A huge claimed doc norm makes the bound useless: no row can be certified.
    _, indices, uncertain = refine.refine(queries, source, top_keys, top_indices, 1e6, keep=5)
    assert torch.equal(uncertain, torch.arange(20))
    exact_distances, exact_indices = refine.exact_search(queries, source, 5)
    best, best_indices = brute_force(queries, docs, 5, "l2")
    assert torch.equal(exact_indices, best_indices) and torch.equal(exact_distances, best.float())
    assert torch.equal(indices[:, :5], best_indices)


def _by_keys(queries: torch.Tensor, docs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An l2 search on the path by search keys (as a GPU, or the CPU without the kernel, takes it)."""
    from tiny_knn.options import SearchOptions, plan_search

    query_source, doc_source = from_array(queries, "queries"), from_array(docs, "docs")
    plan = plan_search(query_source, doc_source, k, SearchOptions(force_cpu=True, metric="l2", selection="sort"))
    assert plan.refined
    scores, indices, _ = engine.search(query_source, doc_source, plan)
    return scores, indices


def test_every_fallback_gives_the_same_answer(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(8)
    queries, docs = torch.randn(30, 12, generator=generator), torch.randn(3000, 12, generator=generator)
    reference = _by_keys(queries, docs, 10)
    assert_exact(queries, docs, *reference, "l2")
    calls = {"widened": 0, "exact": 0}
    real_refine, real_exact = refine.refine, refine.exact_search

    def refuse_first(query_rows, docs, keys, indices, max_doc_norm, keep, *args):  # type: ignore[no-untyped-def]
        calls["widened"] += keys.shape[1] > 26
        distances, order, _ = real_refine(query_rows, docs, keys, indices, max_doc_norm, keep, *args)
        return distances, order, torch.arange(query_rows.shape[0])  # certify nothing, ever

    def exact(query_rows, docs, keep, *args):  # type: ignore[no-untyped-def]
        calls["exact"] += 1
        return real_exact(query_rows, docs, keep, *args)

    monkeypatch.setattr(engine, "refine", refuse_first)
    monkeypatch.setattr(engine, "exact_search", exact)
    scores, indices = _by_keys(queries, docs, 10)
    assert calls["widened"] >= 1 and calls["exact"] >= 1
    assert torch.equal(scores, reference[0]) and torch.equal(indices, reference[1])


def test_drop_self_by_index_not_by_position() -> None:
    scores = torch.tensor([[9.0, 8.0, 7.0], [9.0, 9.0, 1.0], [5.0, 4.0, 3.0]])
    indices = torch.tensor([[4, 0, 2], [3, 1, 6], [7, 8, 9]])
    kept_scores, kept = refine.drop_self(scores, indices, first_query=0, k=2)
    assert kept.tolist() == [[4, 2], [3, 6], [7, 8]]  # row 0 loses doc 0, row 1 doc 1, row 2 its last
    assert kept_scores.tolist() == [[9.0, 7.0], [9.0, 1.0], [5.0, 4.0]]
    assert not (kept == torch.arange(3)[:, None]).any()


@needs_kernel
@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("dim", [1, 7, 8, 13, 384])
def test_exact_scores_same_bits_from_kernel_numpy_and_gathered_rows(monkeypatch, dim, squared) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(dim)
    queries, docs = torch.randn(6, dim, generator=generator), torch.randn(400, dim, generator=generator) * 5
    indices = torch.randint(400, (6, 50), generator=generator)
    in_place = refine._exact_scores(queries, from_array(docs, "docs"), indices, squared)
    gathered = refine._exact_scores(queries, from_array(docs.double(), "docs"), indices, squared)  # not a float32 table
    monkeypatch.setattr(refine, "KERNEL", None)
    fallback = refine._exact_scores(queries, from_array(docs, "docs"), indices, squared)
    assert torch.equal(in_place, gathered) and torch.equal(in_place, fallback)
    if squared:
        exact = ((queries.double()[:, None, :] - docs.double()[indices]) ** 2).sum(dim=2)
    else:
        exact = (queries.double()[:, None, :] * docs.double()[indices]).sum(dim=2)
    # Error relative to the sum of the terms' magnitudes (a dot product may cancel; a distance cannot).
    magnitude = (queries.double()[:, None, :] - docs.double()[indices] if squared else
                 queries.double()[:, None, :] * docs.double()[indices]).abs().sum(dim=2)  # fmt: skip
    assert ((in_place - exact).abs() <= 1e-14 * magnitude ** (2 if squared else 1)).all()


@needs_kernel
def test_a_docs_file_cut_under_the_kernels_mapping_is_a_clean_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The C kernel re-scores candidates from the docs file's memory map; a file cut under it would raise SIGBUS
    on the next read, which the kernel catches (its guard) and reports as the file having changed."""
    torch.save(torch.randn(50_000, 64), tmp_path / "d.pt")
    docs = open_source(str(tmp_path / "d.pt"), "docs")
    queries, candidates = torch.randn(4, 64), torch.randint(0, 50_000, (4, 100))
    assert _exact_scores(queries, docs, candidates, squared=False).isfinite().all()
    assert docs.mapped() is not None  # mapped now, before the cut
    os.truncate(tmp_path / "d.pt", 8192)
    with pytest.raises(InputChangedError, match=r"changed while it was being read \(8192 bytes, was \d+\)"):
        _exact_scores(queries, docs, candidates, squared=False)
