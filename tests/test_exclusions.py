"""Excluded pairs (exclusions.py): reading pairs and qrels files, and searches that never return an excluded pair,
compared with the same search's full ranking less those pairs (bit for bit) and a float64 brute force, on every
path (each estimator, by keys, a doc share)."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.capabilities import needs_kernel
from tests.oracle import exact_scores
from tiny_knn import compute_topk, engine, search
from tiny_knn.errors import InputFileError, InvalidInputError, OutputError
from tiny_knn.estimators import available
from tiny_knn.exclusions import Exclusions, drop_excluded, exclusions_from_array, read_exclusions
from tiny_knn.options import SearchOptions, plan_search
from tiny_knn.sources import RowRange, from_array


def _write(tmp_path, text: str, name: str = "pairs.txt") -> str:  # type: ignore[no-untyped-def]
    path = str(tmp_path / name)
    with open(path, "w") as stream:
        stream.write(text)
    return path


def _lists(excluded: Exclusions) -> list[list[int]]:
    return [
        excluded.docs[excluded.offsets[q] : excluded.offsets[q + 1]].tolist() for q in range(excluded.offsets.size - 1)
    ]


# ---- Reading.


def test_pairs_and_qrels_lines_are_held_per_query_sorted_without_repeats(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = _write(tmp_path, "2 5\n0 3\n\n2 1\n0 3 \n1 0 4 0\n")  # the last: qrels, relevance 0 still excluded
    excluded = read_exclusions(path, query_rows=4, doc_rows=6)
    assert _lists(excluded) == [[3], [4], [1, 5], []]
    assert excluded.offsets.dtype == excluded.docs.dtype == np.int64
    assert excluded.widest() == 2 and excluded.count().tolist() == [1, 1, 2, 0]
    # 16 bytes a pair at most (8 when each query excludes one): never Python objects
    assert excluded.offsets.nbytes + excluded.docs.nbytes <= 16 * 5 + 8


def test_ids_name_rows_when_given(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = _write(tmp_path, "q2 0 dB 1\nq0 0 dA 2\nq2 0 dA 1\n")
    excluded = read_exclusions(path, 3, 2, query_ids=["q0", "q1", "q2"], doc_ids=["dA", "dB"])
    assert _lists(excluded) == [[0], [], [0, 1]]


@pytest.mark.parametrize(
    ("text", "ids", "message"),
    [
        ("0 1\n1 2 3\n", False, "line 2 has 3 fields"),
        ("0 1\n\n5 0\n", False, "line 3: query row 5 is past the last of the 4 queries"),
        ("0 9\n", False, "line 1: doc row 9 is past the last of the 6 docs"),
        ("q0 1\n", False, "line 1: query 'q0' is not a row number (give --query-ids"),
        ("-1 1\n", False, "line 1: query '-1' is not a row number"),
        ("q0 dZ\n", True, "line 1: doc id 'dZ' is not in the doc ids file"),
    ],
)
def test_bad_lines_are_named(tmp_path, text: str, ids: bool, message: str) -> None:  # type: ignore[no-untyped-def]
    path = _write(tmp_path, text)
    names = {"query_ids": [f"q{i}" for i in range(4)], "doc_ids": [f"d{i}" for i in range(6)]} if ids else {}
    with pytest.raises(InvalidInputError) as caught:
        read_exclusions(path, 4, 6, **names)
    assert message in str(caught.value) and path in str(caught.value) and "\n" not in str(caught.value)


def test_a_missing_file_is_an_input_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputFileError, match="no such file"):
        read_exclusions(str(tmp_path / "absent.txt"), 2, 2)


def test_arrays_are_checked() -> None:
    assert _lists(exclusions_from_array(np.array([[1, 0], [1, 0]]), 2, 3)) == [[], [0]]
    assert _lists(exclusions_from_array(torch.empty((0, 2), dtype=torch.int64), 2, 3)) == [[], []]
    for bad, message in (
        (np.array([1, 2]), "shape"),
        (np.array([[0.5, 1.0]]), "float64"),
        (np.array([[0, 3]]), "doc row 3; expected 0..2"),
        (np.array([[-1, 0]]), "query row -1"),
    ):
        with pytest.raises(InvalidInputError, match=message):
            exclusions_from_array(bad, 2, 3)


def test_rows_shares_samples_and_masks() -> None:
    excluded = Exclusions.from_pairs(np.array([0, 0, 2, 2, 2]), np.array([1, 7, 3, 4, 9]), 3)
    assert _lists(excluded.rows(np.array([2, 0]), first_doc=3, doc_count=5)) == [[0, 1], [4]]
    assert _lists(excluded.sampled(np.array([0, 3, 6, 9]))) == [[], [], [1, 3]]
    indices = np.array([[7, -1, 1], [0, 1, 2], [9, 3, 5]])
    assert excluded.mask(indices).tolist() == [[True, False, True], [False] * 3, [True, True, False]]
    scores = torch.tensor([[3.0, 2.0, 1.0]] * 3)
    kept_scores, kept = drop_excluded(scores, torch.from_numpy(indices), excluded, 2, float("-inf"))
    assert kept.tolist() == [[-1, -1], [0, 1], [5, -1]]
    assert kept_scores.tolist() == [[2.0, float("-inf")], [3.0, 2.0], [1.0, float("-inf")]]


# ---- Searching: never an excluded pair, and otherwise the very answer without them.


def _reference(queries, docs, k, metric, pairs) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """The same search's full ranking (every doc, no exclusions), less the excluded pairs, first k, padded."""
    scores, indices = search(queries, docs, docs.shape[0], metric=metric, device="cpu")
    excluded = exclusions_from_array(pairs, queries.shape[0], docs.shape[0])
    worst = float("inf") if metric == "l2" else float("-inf")
    return drop_excluded(scores, indices, excluded, min(k, docs.shape[0]), worst)


def _case(seed: int, queries: int, docs: int, dim: int, pairs: int, duplicates: bool = False):  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(seed)
    query_rows = torch.randn(queries, dim, generator=generator)
    doc_rows = torch.randn(docs, dim, generator=generator)
    if duplicates:
        doc_rows[1::3] = doc_rows[::3][: doc_rows[1::3].shape[0]]  # ties everywhere
    chosen = torch.randint(0, docs, (pairs,), generator=generator)
    owner = torch.randint(0, queries, (pairs,), generator=generator)
    return query_rows, doc_rows, torch.stack([owner, chosen], dim=1)


@needs_kernel
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("estimator", available())
def test_every_estimator_leaves_the_pairs_out(monkeypatch, metric: str, estimator: str) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TINY_KNN_PRODUCT", estimator)
    queries, docs, pairs = _case(1, 37, 700, 24, 900, duplicates=True)
    # Query 3 excludes its 12 best docs (more than k), so its threshold must come from the rest.
    best = torch.argsort(exact_scores(queries[3:4], docs, metric)[0], descending=metric != "l2")[:12]
    pairs = torch.cat([pairs, torch.stack([torch.full_like(best, 3), best], dim=1)])
    expected = _reference(queries, docs, 10, metric, pairs)
    for chunk_size in (None, 64):
        got = search(queries, docs, 10, metric=metric, device="cpu", exclude_pairs=pairs, chunk_size=chunk_size)
        assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])
    assert not set(got[1][3].tolist()) & set(best.tolist())


@needs_kernel
def test_sampled_thresholds_leave_the_pairs_out_too() -> None:
    """At k = 1000 of 8000 docs the screen starts from thresholds sampled from 1% of the docs: the sample must not
    count a query's excluded docs (here its 300 best), else its thresholds are too high and it is searched again."""
    queries, docs, pairs = _case(6, 16, 8000, 8, 2000)
    best = torch.argsort(queries[:4] @ docs.T, dim=1, descending=True)[:, :300]
    pairs = torch.cat([pairs, torch.stack([torch.arange(4).repeat_interleave(300), best.flatten()], dim=1)])
    plan = plan_search(from_array(queries, "q"), from_array(docs, "d"), 1000, SearchOptions(force_cpu=True))
    assert plan.threshold_sample_docs > 0
    got = search(queries, docs, 1000, device="cpu", exclude_pairs=pairs)
    expected = _reference(queries, docs, 1000, "ip", pairs)
    assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])


@needs_kernel
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_a_query_that_loses_every_doc_is_padded(metric: str) -> None:
    queries, docs, _ = _case(2, 9, 40, 8, 0)
    everything = torch.stack([torch.full((40,), 4), torch.arange(40)], dim=1)
    most = torch.stack([torch.full((36,), 6), torch.arange(36)], dim=1)  # 4 docs left for k = 10
    pairs = torch.cat([everything, most])
    scores, indices = search(queries, docs, 10, metric=metric, device="cpu", exclude_pairs=pairs)
    worst = float("inf") if metric == "l2" else float("-inf")
    assert indices[4].tolist() == [-1] * 10 and scores[4].tolist() == [worst] * 10
    assert sorted(indices[6, :4].tolist()) == [36, 37, 38, 39] and indices[6, 4:].tolist() == [-1] * 6
    expected = _reference(queries, docs, 10, metric, pairs)
    assert torch.equal(indices, expected[1]) and torch.equal(scores, expected[0])


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("selection", ["sort", pytest.param("threshold", marks=needs_kernel)])
def test_the_path_by_keys_masks_the_pairs_before_selecting(metric: str, selection: str) -> None:
    """The path by keys (a GPU's, the CPU's without the kernel) sets the pairs' products to -inf before any
    selector sees them; l2's re-scoring and its fallbacks leave them out too. Query 5 excludes its 30 best docs,
    query 6 all but 4 (padded), query 7 every doc. (The Triton pool selector awaits a GPU: tests/test_cuda.py.)"""
    queries, docs, pairs = _case(3, 21, 500, 16, 300)
    best = torch.argsort(exact_scores(queries[5:6], docs, metric)[0], descending=metric != "l2")[:30]
    pairs = torch.cat([
        pairs,
        torch.stack([torch.full((30,), 5), best], dim=1),
        torch.stack([torch.full((496,), 6), torch.arange(496)], dim=1),
        torch.stack([torch.full((500,), 7), torch.arange(500)], dim=1),
    ])  # fmt: skip
    excluded = exclusions_from_array(pairs, 21, 500)
    query_source, doc_source = from_array(queries, "queries"), from_array(docs, "docs")
    plan = plan_search(query_source, doc_source, 10, SearchOptions(force_cpu=True, metric=metric, selection="sort"))
    plan = replace(plan, selection=selection)  # the threshold selector by keys, as bf16-unsafe takes it
    assert plan.estimator is None and plan.candidates < 10 + 30
    scores, indices, _ = engine.search(query_source, doc_source, plan, excluded=excluded)
    expected = _reference(queries, docs, 10, metric, pairs)
    assert torch.equal(indices, expected[1])
    assert indices[7].tolist() == [-1] * 10 and indices[6, 4:].tolist() == [-1] * 6
    # the products' own scores on the path by keys (ip, cosine); l2's are exact
    torch.testing.assert_close(scores, expected[0], rtol=1e-5, atol=1e-4)
    if metric == "l2":
        assert torch.equal(scores, expected[0])


def test_l2_fallbacks_by_keys_leave_the_pairs_out(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Rows never certified are searched again with more candidates, then streamed exactly: both leave the
    pairs out."""
    from tiny_knn import refine

    real_refine = refine.refine

    def refuse(query_rows, docs, keys, indices, max_doc_norm, keep, *args):  # type: ignore[no-untyped-def]
        distances, order, _ = real_refine(query_rows, docs, keys, indices, max_doc_norm, keep, *args)
        return distances, order, torch.arange(query_rows.shape[0])

    queries, docs, pairs = _case(9, 13, 400, 8, 600)
    pairs = torch.cat([pairs, torch.stack([torch.full((396,), 2), torch.arange(396)], dim=1)])
    excluded = exclusions_from_array(pairs, 13, 400)
    query_source, doc_source = from_array(queries, "queries"), from_array(docs, "docs")
    plan = plan_search(query_source, doc_source, 10, SearchOptions(force_cpu=True, metric="l2", selection="sort"))
    monkeypatch.setattr(engine, "refine", refuse)
    scores, indices, _ = engine.search(query_source, doc_source, plan, excluded=excluded)
    expected = _reference(queries, docs, 10, "l2", pairs)
    assert torch.equal(indices, expected[1]) and torch.equal(scores, expected[0])


@needs_kernel
def test_a_share_of_the_docs_numbers_its_pairs_from_its_first_doc() -> None:
    """torchrun's docs sharding: a rank's docs are a share (RowRange) whose doc 0 is global doc 200."""
    queries, docs, pairs = _case(8, 21, 500, 16, 3000)
    excluded = exclusions_from_array(pairs, 21, 500)
    share = RowRange(from_array(docs, "docs"), 200, 500)
    plan = plan_search(from_array(queries, "queries"), share, 10, SearchOptions(force_cpu=True))
    _, indices, _ = engine.search(from_array(queries, "queries"), share, plan, excluded=excluded)
    kept = excluded.rows(np.arange(21), 200, 300)
    expected = drop_excluded(*search(queries, docs[200:], 300, device="cpu"), kept, 10, float("-inf"))[1]
    assert torch.equal(indices, torch.where(expected >= 0, expected + 200, expected))


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(
    queries=st.integers(1, 20),
    docs=st.integers(2, 150),
    k=st.integers(1, 40),
    pairs=st.integers(0, 400),
    metric=st.sampled_from(["ip", "cosine", "l2"]),
    seed=st.integers(0, 2**16),
)
def test_property_exclusions_match_the_full_ranking_less_the_pairs(  # type: ignore[no-untyped-def]
    queries, docs, k, pairs, metric, seed
) -> None:
    query_rows, doc_rows, chosen = _case(seed, queries, docs, 6, pairs, duplicates=seed % 2 == 0)
    k = min(k, docs)
    scores, indices = search(query_rows, doc_rows, k, metric=metric, device="cpu", exclude_pairs=chosen)
    expected = _reference(query_rows, doc_rows, k, metric, chosen)
    assert torch.equal(indices, expected[1]) and torch.equal(scores, expected[0])
    # and against float64: each returned doc's score is the brute force's, to float32's rounding
    exact = exact_scores(query_rows, doc_rows, metric)
    real = indices >= 0
    picked = torch.gather(exact, 1, indices.clamp(min=0))[real].float()
    torch.testing.assert_close(scores[real], picked, rtol=1e-4, atol=1e-4)


# ---- End to end: the file, ids, the CLI, the result and a resumed run.


@needs_kernel
def test_compute_topk_and_the_cli_take_a_qrels_file_by_ids(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from tiny_knn.cli import main

    queries, docs, _ = _case(4, 12, 80, 8, 0)
    torch.save(queries, tmp_path / "q.pt")
    torch.save(docs, tmp_path / "d.pt")
    _write(tmp_path, "".join(f"query{i}\n" for i in range(12)), "q.ids")
    _write(tmp_path, "".join(f"doc{i}\n" for i in range(80)), "d.ids")
    full, _ = search(queries, docs, 80, device="cpu")
    top = search(queries, docs, 80, device="cpu")[1]
    # Each query's own best two docs are its positives.
    qrels = "".join(f"query{q} 0 doc{int(top[q, r])} 1\n" for q in range(12) for r in range(2))
    pairs = _write(tmp_path, qrels, "qrels.txt")
    out = str(tmp_path / "out.pt")
    files = [str(tmp_path / "q.pt"), str(tmp_path / "d.pt")]
    ids = ["--query-ids", str(tmp_path / "q.ids"), "--doc-ids", str(tmp_path / "d.ids")]
    code = main([*files, "--k", "5", "--cpu", "--quiet", "--output-path", out, *ids, "--exclude-pairs", pairs])
    assert code == 0 and capsys.readouterr().out.strip() == out
    result = torch.load(out)
    assert torch.equal(result["indices"], top[:, 2:7]) and result["exclude_pairs"] == pairs
    assert torch.equal(result["scores"], full[:, 2:7])
    # --dry-run reads and counts them
    assert main([*files, "--cpu", "--dry-run", *ids, "--exclude-pairs", pairs]) == 0
    assert "excluded: 24 pairs, at most 2 for one query" in capsys.readouterr().out
    # a bad line: one line on stderr, exit 2, nothing written
    bad = _write(tmp_path, "query1 0 doc1 1\nquery2 0 nodoc 1\n", "bad.txt")
    code = main([str(tmp_path / "q.pt"), str(tmp_path / "d.pt"), "--cpu", "--quiet", "--output-path",
                 str(tmp_path / "bad.pt"), "--doc-ids", str(tmp_path / "d.ids"), "--exclude-pairs", bad])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "line 1: query 'query1' is not a row number" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "bad.pt")


@needs_kernel
def test_trec_and_parquet_leave_the_padding_out(tmp_path) -> None:  # type: ignore[no-untyped-def]
    queries, docs, _ = _case(7, 3, 5, 4, 0)
    torch.save(queries, tmp_path / "q.pt")
    torch.save(docs, tmp_path / "d.pt")
    _write(tmp_path, "".join(f"d{i}\n" for i in range(5)), "d.ids")
    pairs = _write(tmp_path, "1 d0\n1 d1\n1 d2\n1 d3\n")  # query 1 keeps one doc of k = 3
    run = compute_topk(str(tmp_path / "q.pt"), str(tmp_path / "d.pt"), k=3, force_cpu=True, exclude_pairs=pairs,
                       out_path=str(tmp_path / "out.trec"), doc_ids=str(tmp_path / "d.ids"))  # fmt: skip
    with open(run) as stream:
        lines = [line.split() for line in stream]
    assert [line[0] for line in lines] == ["0", "0", "0", "1", "2", "2", "2"]
    assert lines[3][2] == "d4" and lines[3][3] == "1"
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return
    table = pq.read_table(compute_topk(str(tmp_path / "q.pt"), str(tmp_path / "d.pt"), k=3, force_cpu=True,
                                       exclude_pairs=pairs, out_path=str(tmp_path / "out.parquet"),
                                       doc_ids=str(tmp_path / "d.ids")))  # fmt: skip
    assert table.column("query").to_pylist() == [0, 0, 0, 1, 2, 2, 2] and table.column("doc").to_pylist()[3] == "d4"


def test_the_pairs_file_is_an_input_the_output_never_replaces(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.save(torch.randn(4, 3), tmp_path / "q.pt")
    pairs = _write(tmp_path, "0 1\n")
    with pytest.raises(OutputError, match=r"is the exclude-pairs file .* \(an input\)"):
        compute_topk(str(tmp_path / "q.pt"), str(tmp_path / "q.pt"), k=2, force_cpu=True, out_path=pairs,
                     output_format="trec", exclude_pairs=pairs)  # fmt: skip
    with open(pairs) as stream:
        assert stream.read() == "0 1\n"


@needs_kernel
def test_a_resumed_run_must_have_the_same_pairs(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from tests.test_checkpoint import Stop, interrupt_after

    queries, docs, _ = _case(5, 40, 60, 4, 0)
    torch.save(queries, tmp_path / "q.pt")
    torch.save(docs, tmp_path / "d.pt")
    pairs = _write(tmp_path, "0 1\n3 4\n")
    out = str(tmp_path / "out.pt")
    inputs = (str(tmp_path / "q.pt"), str(tmp_path / "d.pt"))
    keywords = {"k": 3, "force_cpu": True, "out_path": out, "batch_size": 8, "exclude_pairs": pairs}
    with monkeypatch.context() as patch:
        interrupt_after(patch, 2)
        with pytest.raises(Stop):
            compute_topk(*inputs, **keywords)
    assert os.path.isdir(out + ".checkpoint")
    _write(tmp_path, "0 1\n3 5\n")  # the pairs changed: the checkpoint is not this run's
    os.utime(pairs, ns=(1, 1))
    with pytest.raises(InvalidInputError, match="the ids or exclude-pairs files differ"):
        compute_topk(*inputs, **keywords)
    _write(tmp_path, "0 1\n3 4\n")
    compute_topk(*inputs, **{**keywords, "restart": True})
    resumed = torch.load(out)
    assert 4 not in resumed["indices"][3].tolist() and 1 not in resumed["indices"][0].tolist()
