"""compute_topk end to end: the original contract, errors, and an independent oracle (FAISS)."""

from __future__ import annotations

import doctest
import inspect
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from oracle import assert_exact, faiss_search

import tiny_knn
from tiny_knn import (
    InputFileError,
    InvalidInputError,
    MemoryBudgetError,
    OutputError,
    TinyKnnError,
    TinyKnnWarning,
    compute_topk,
)

CONTRACT_KEYS = {"indices", "scores", "queries_path", "docs_path", "k", "batch_size", "dtype", "device"}


def test_contract(pair) -> None:  # type: ignore[no-untyped-def]
    queries, docs = torch.randn(12, 16), torch.randn(500, 16)
    q_path, d_path = pair(queries, docs)
    path = compute_topk(q_path=q_path, d_path=d_path, k=20, force_cpu=True, out_path=None)
    assert path == os.path.join(os.path.dirname(q_path), "top20_queries_x_docs.pt")
    result = torch.load(path)  # weights_only by default
    assert set(result) >= CONTRACT_KEYS
    assert result["indices"].shape == (12, 20) and result["indices"].dtype == torch.int64
    assert result["scores"].shape == (12, 20) and result["scores"].dtype == torch.float32
    assert (result["queries_path"], result["docs_path"], result["k"]) == (q_path, d_path, 20)
    assert result["dtype"] == "torch.float32" and result["device"] == "cpu"
    assert isinstance(result["batch_size"], int) and result["batch_size"] >= 1
    assert_exact(queries, docs, result["scores"], result["indices"])


def test_agrees_with_faiss_except_at_ties(pair, tmp_path) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(3)
    queries, docs = torch.randn(64, 48, generator=generator), torch.randn(5000, 48, generator=generator)
    path = compute_topk(*pair(queries, docs), k=100, force_cpu=True, out_path=str(tmp_path / "r.pt"))
    result = torch.load(path)
    faiss_scores, faiss_indices = faiss_search(queries, docs, 100)
    ours = result["indices"].numpy()
    differ = ours != faiss_indices
    # Where the indices differ, the scores must be tied (FAISS orders ties its own way).
    assert np.allclose(result["scores"].numpy()[differ], faiss_scores[differ], rtol=1e-5, atol=1e-5)
    assert differ.mean() < 0.01
    np.testing.assert_allclose(result["scores"].numpy(), faiss_scores, rtol=1e-5, atol=1e-5)


def test_k_larger_than_docs_is_clamped_with_a_warning(pair, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.warns(TinyKnnWarning, match="k=50 is more than the 7 docs"):
        path = compute_topk(*pair(torch.randn(3, 4), torch.randn(7, 4)), k=50, force_cpu=True)
    result = torch.load(path)
    assert result["k"] == 7 and result["indices"].shape == (3, 7)
    assert os.path.basename(path) == "top7_queries_x_docs.pt"


def test_a_missing_kernel_is_said_unless_turned_off(pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from tiny_knn import options

    paths = pair(torch.randn(3, 4), torch.randn(7, 4))
    monkeypatch.setattr(options, "kernel_available", lambda: False)
    with pytest.warns(TinyKnnWarning, match="compiled kernel is missing .* with a C compiler present"):
        compute_topk(*paths, k=2, force_cpu=True)
    monkeypatch.setenv("TINY_KNN_NO_KERNEL", "1")  # asked for: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error", TinyKnnWarning)
        compute_topk(*paths, k=2, force_cpu=True)


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_bad_k(pair, k) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInputError, match="expected a whole number >= 1"):
        compute_topk(*pair(torch.randn(3, 4), torch.randn(7, 4)), k=k, force_cpu=True)


def test_error_classes_are_also_builtins(pair, tmp_path) -> None:  # type: ignore[no-untyped-def]
    q_path, d_path = pair(torch.randn(3, 4), torch.randn(7, 4))
    with pytest.raises(InputFileError) as missing:
        compute_topk(str(tmp_path / "nope.pt"), d_path, k=1)
    assert isinstance(missing.value, OSError) and isinstance(missing.value, TinyKnnError)
    with pytest.raises(OutputError) as unwritable:
        compute_topk(q_path, d_path, k=1, out_path=str(tmp_path / "no" / "dir.pt"))
    assert isinstance(unwritable.value, OSError)
    with pytest.raises(MemoryBudgetError) as budget:
        compute_topk(q_path, d_path, k=1, max_memory=100)
    assert isinstance(budget.value, ValueError)


def test_nan_in_docs_fails_cleanly_without_output(save, tmp_path) -> None:  # type: ignore[no-untyped-def]
    docs = torch.randn(3000, 4)
    docs[2500, 1] = float("nan")
    q_path, d_path = save(torch.randn(3, 4), "q.pt"), save(docs, "d.pt")
    with pytest.raises(InvalidInputError, match="row 2500"):
        compute_topk(q_path, d_path, k=5, force_cpu=True, chunk_size=256, out_path=str(tmp_path / "r.pt"))
    assert sorted(os.listdir(tmp_path)) == ["d.pt", "q.pt"]


def test_docstrings_run() -> None:
    for module in (tiny_knn, tiny_knn.api, tiny_knn.plan, tiny_knn.merge, tiny_knn.recall):
        failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert tried > 0 and failures == 0, module.__name__


def test_public_api_is_small() -> None:
    assert set(tiny_knn.__all__) == {
        "compute_topk",
        "range_search",
        "TinyKnnError",
        "InvalidInputError",
        "InputFileError",
        "OutputError",
        "MemoryBudgetError",
        "TinyKnnWarning",
        "__version__",
        "search",
        "Embeddings",
        "merge_results",
        "recall_at_k",
    }


def test_result_records_metric_precision_and_ids(pair, tmp_path) -> None:  # type: ignore[no-untyped-def]
    queries, docs = torch.randn(3, 4), torch.randn(6, 4)
    q_path, d_path = pair(queries, docs)
    (tmp_path / "q.txt").write_text("a\nb\nc\n")
    with pytest.warns(TinyKnnWarning, match="returning k=6"):
        path = compute_topk(q_path, d_path, k=9, force_cpu=True, metric="cosine", query_ids=str(tmp_path / "q.txt"))
    result = torch.load(path)
    recorded = (result["metric"], result["precision"], result["k"], result["exclude_self"])
    assert recorded == ("cosine", "exact", 6, False)  # the precision asked for, not the plan's spelling
    assert result["query_ids"] == ["a", "b", "c"] and "doc_ids" not in result
    assert_exact(queries, docs, result["scores"], result["indices"], "cosine")


def test_result_records_what_a_merge_needs(pair, tmp_path) -> None:  # type: ignore[no-untyped-def]
    queries = torch.randn(3, 4)
    q_path, d_path = pair(queries, torch.randn(6, 4))
    with pytest.warns(TinyKnnWarning, match="returning k=6"):
        result = torch.load(compute_topk(q_path, d_path, k=9, force_cpu=True, out_path=tmp_path / "r.pt"))
    assert (result["format_version"], result["requested_k"], result["k"], result["doc_count"]) == (1, 9, 6, 6)
    # The queries' fingerprint is their content's: the same under another name and in another folder.
    (tmp_path / "elsewhere").mkdir()
    copy = tmp_path / "elsewhere" / "copy.pt"
    shutil.copyfile(q_path, copy)
    again = torch.load(compute_topk(copy, d_path, k=2, force_cpu=True, out_path=tmp_path / "again.pt"))
    assert again["queries_fingerprint"] == result["queries_fingerprint"]
    torch.save(queries + 1, copy)
    other = torch.load(compute_topk(copy, d_path, k=2, force_cpu=True, out_path=tmp_path / "other.pt"))
    assert other["queries_fingerprint"] != result["queries_fingerprint"]


def test_search_in_memory_takes_tensors_arrays_and_paths(pair) -> None:  # type: ignore[no-untyped-def]
    queries, docs = torch.randn(7, 5), torch.randn(300, 5)
    reference = tiny_knn.search(queries, docs, 4, device="cpu")
    assert_exact(queries, docs, *reference)
    q_path, d_path = pair(queries, docs)
    for q, d in ((queries.numpy(), docs.numpy()), (q_path, d_path), (queries.double().numpy(), docs.double())):
        scores, indices = tiny_knn.search(q, d, 4, device="cpu")
        assert torch.equal(scores, reference[0]) and torch.equal(indices, reference[1])


@pytest.mark.parametrize(
    ("queries", "options", "message"),
    [
        ([[1.0, 2.0]], {}, "got a list, expected a tensor, a numpy array or a path"),
        (torch.zeros(2, 2, 2), {}, r"in-memory queries: shape \(2, 2, 2\), expected 2-D"),
        (torch.zeros(2, 3, dtype=torch.int64), {}, "dtype int64, expected float32"),
        (np.zeros((2, 3), dtype=np.int32), {}, "dtype int32, expected float32"),
        (torch.zeros(2, 3), {"exclude_self": True}, "2 queries and 9 docs; expected the same rows"),
        (torch.zeros(2, 3), {"device": "tpu"}, "device='tpu': expected 'cpu' or 'cuda'"),
        (torch.zeros(2, 3), {"metric": "dot"}, "expected one of ip, cosine, l2"),
    ],
)
def test_search_refuses_bad_arguments(queries, options, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInputError, match=message):
        tiny_knn.search(queries, torch.zeros(9, 3), 2, **options)


def test_the_installed_version_is_the_package_version() -> None:
    from importlib.metadata import version

    import tiny_knn

    assert version("tiny-knn") == tiny_knn.__version__


def test_the_options_object_fits_compute_topk() -> None:
    # The CLI hands compute_topk its SearchOptions by name, and the old TinyKnnWarning import still works.
    from tiny_knn.api import TinyKnnWarning as moved
    from tiny_knn.options import SearchOptions

    keywords = SearchOptions().compute_topk_keywords()
    assert set(keywords) < set(inspect.signature(compute_topk).parameters)
    assert "selection" not in keywords and "results_on_disk" not in keywords
    assert moved is TinyKnnWarning


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no GPU")
def test_asking_for_cuda_without_a_gpu_is_an_error_not_a_cpu_run() -> None:
    with pytest.raises(InvalidInputError, match=r"device='cuda': this torch finds no CUDA GPU"):
        tiny_knn.search(torch.randn(3, 8), torch.randn(10, 8), k=2, device="cuda")


def test_k_may_be_any_whole_number_type(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """numpy's integers and 0-d integer tensors are whole numbers too (k often comes out of an array); a bool or a
    float is not."""
    generator = torch.Generator().manual_seed(2)
    queries, docs = torch.randn(4, 8, generator=generator), torch.randn(30, 8, generator=generator)
    expected = tiny_knn.search(queries, docs, 3, device="cpu")
    for k in (np.int64(3), np.uint8(3), torch.tensor(3)):
        found = tiny_knn.search(queries, docs, k, device="cpu")  # type: ignore[arg-type]
        assert torch.equal(found[1], expected[1]) and torch.equal(found[0], expected[0])
        assert tiny_knn.range_search(queries, docs, -100.0, k=k)[0].tolist() == [0, 3, 6, 9, 12]  # type: ignore[arg-type]
    torch.save(queries, tmp_path / "q.pt")
    torch.save(docs, tmp_path / "d.pt")
    path = tiny_knn.compute_topk(tmp_path / "q.pt", tmp_path / "d.pt", k=np.int64(3), force_cpu=True)  # type: ignore[arg-type]
    saved = torch.load(path)
    assert torch.equal(saved["indices"], expected[1]) and type(saved["k"]) is int and type(saved["requested_k"]) is int
    assert tiny_knn.recall_at_k(path, path, k=np.int32(2)).by_ids == 1.0  # type: ignore[arg-type]
    for bad in (True, 3.0, np.float32(3)):
        with pytest.raises(InvalidInputError, match="expected a whole number >= 1"):
            tiny_knn.search(queries, docs, bad, device="cpu")  # type: ignore[arg-type]
