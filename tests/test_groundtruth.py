"""Ground truth for ANN benchmarks: the ivecs/fvecs pair and big-ann-benchmarks' binary file hold the .pt
result's neighbours and scores, read back here by numpy alone, as benchmark tools read them."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tiny_knn import OutputError, compute_topk, merge_results
from tiny_knn import groundtruth as ground_truth
from tiny_knn.cli import main

K = 7


@pytest.fixture
def inputs(tmp_path):  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(2)
    torch.save(torch.randn(23, 6, generator=generator), tmp_path / "q.pt")
    torch.save(torch.randn(300, 6, generator=generator), tmp_path / "d.pt")
    return tmp_path


def read_vecs(path: str, dtype: str) -> np.ndarray:
    """An .ivecs / .fvecs file as numpy reads it: rows of an int32 count, then that many values."""
    raw = np.fromfile(path, dtype=dtype)
    count = int(raw[:1].view("<i4")[0])
    rows = raw.reshape(-1, count + 1)
    assert (rows[:, :1].view("<i4") == count).all(), "every row declares the same count"
    return rows[:, 1:]


def read_bigann(path: str) -> tuple[np.ndarray, np.ndarray]:
    """big-ann-benchmarks' ground truth, as its own reader does: n, k, then n*k uint32 ids, n*k float32 scores."""
    rows, k = np.fromfile(path, dtype="<i4", count=2)
    ids = np.fromfile(path, dtype="<u4", count=rows * k, offset=8).reshape(rows, k)
    scores = np.fromfile(path, dtype="<f4", count=rows * k, offset=8 + rows * k * 4).reshape(rows, k)
    assert os.path.getsize(path) == 8 + rows * k * 8
    return ids, scores


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_ivecs_and_bigann_hold_the_result(inputs, metric) -> None:  # type: ignore[no-untyped-def]
    search = {"k": K, "force_cpu": True, "metric": metric}
    reference = torch.load(compute_topk(inputs / "q.pt", inputs / "d.pt", out_path=inputs / "r.pt", **search))
    ivecs = compute_topk(inputs / "q.pt", inputs / "d.pt", out_path=inputs / "gt.ivecs", **search)
    assert sorted(name for name in os.listdir(inputs) if name.startswith("gt")) == ["gt.fvecs", "gt.ivecs"]
    assert np.array_equal(read_vecs(ivecs, "<i4"), reference["indices"].numpy())
    assert np.array_equal(read_vecs(str(inputs / "gt.fvecs"), "<f4"), reference["scores"].numpy())
    bigann = compute_topk(inputs / "q.pt", inputs / "d.pt", out_path=inputs / "gt", output_format="bigann", **search)
    ids, scores = read_bigann(bigann)
    assert np.array_equal(ids, reference["indices"].numpy()) and np.array_equal(scores, reference["scores"].numpy())
    # As they are, best first: similarities fall along a row, distances rise.
    steps = np.diff(scores, axis=1)
    assert (steps <= 0).all() if metric == "ip" else (steps >= 0).all()


def test_default_names_and_the_command_line(inputs, capsys) -> None:  # type: ignore[no-untyped-def]
    for fmt, name in (("ivecs", f"top{K}_q_x_d.ivecs"), ("bigann", f"top{K}_q_x_d.bin")):
        assert (
            main([str(inputs / "q.pt"), str(inputs / "d.pt"), "--k", str(K), "--cpu", "--quiet", "--format", fmt]) == 0
        )
        assert capsys.readouterr().out == f"{inputs / name}\n"
    assert (inputs / f"top{K}_q_x_d.fvecs").exists()


def test_the_scores_file_never_replaces_an_input(inputs) -> None:  # type: ignore[no-untyped-def]
    docs = torch.load(inputs / "d.pt").numpy()
    header = np.full((docs.shape[0], 1), docs.shape[1], dtype="<i4").view("<f4")
    np.concatenate([header, docs], axis=1).tofile(inputs / "base.fvecs")  # SIFT's layout: base.fvecs beside
    before = (inputs / "base.fvecs").read_bytes()
    with pytest.raises(OutputError, match=r"scores file '.*base.fvecs' is the docs file .* \(an input\)"):
        compute_topk(inputs / "q.pt", inputs / "base.fvecs", k=K, force_cpu=True, out_path=inputs / "base.ivecs")
    assert (inputs / "base.fvecs").read_bytes() == before and not (inputs / "base.ivecs").exists()


def test_too_many_docs_for_the_format_is_refused_before_the_search(inputs, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(ground_truth.ID_LIMITS, "bigann", 299)
    with pytest.raises(OutputError, match="numbers docs with uint32, at most 299 docs; these are 300"):
        compute_topk(inputs / "q.pt", inputs / "d.pt", k=K, force_cpu=True, out_path=inputs / "gt.bin",
                     output_format="bigann")  # fmt: skip
    assert sorted(os.listdir(inputs)) == ["d.pt", "q.pt"]


def test_a_merge_writes_ground_truth_too(inputs) -> None:  # type: ignore[no-untyped-def]
    """Ground truth of a corpus searched in slices (a Slurm array), merged straight into big-ann's format."""
    docs = torch.load(inputs / "d.pt")
    parts = []
    for index, (lo, hi) in enumerate(((0, 120), (120, 300))):
        torch.save(docs[lo:hi].clone(), inputs / f"d{index}.pt")
        parts.append(compute_topk(inputs / "q.pt", inputs / f"d{index}.pt", k=K, force_cpu=True,
                                  out_path=inputs / f"part{index}.pt"))  # fmt: skip
    whole = compute_topk(inputs / "q.pt", inputs / "d.pt", k=K, force_cpu=True, out_path=inputs / "whole.bin",
                         output_format="bigann")  # fmt: skip
    merged = merge_results(parts, inputs / "merged.bin", output_format="bigann")
    assert (inputs / "merged.bin").read_bytes() == (inputs / "whole.bin").read_bytes()
    assert read_bigann(merged)[0].shape == read_bigann(whole)[0].shape == (23, K)
