"""Range search (ranges.py, range_output.py): every pair within the radius, against a reference built from every
exact score (tiny-knn's one definition, tk_exact_tile) thresholded at float32(T), with pairs at, just inside and
just outside it, for each metric and estimator; the selection's pools are never compacted; the streamed outputs
(parquet, npy CSR), their spills and merges, resumption after SIGKILL, and the data-safety rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.capabilities import needs_kernel
from tests.runs import forced_product, kill_in_batch
from tiny_knn import InvalidInputError, OutputError, compute_topk, range_search, ranges
from tiny_knn.cli import main
from tiny_knn.estimators import available, make_estimator
from tiny_knn.kernel import KERNEL
from tiny_knn.metrics import normalize
from tiny_knn.options import SearchOptions
from tiny_knn.range_output import RangeCheckpoint
from tiny_knn.ranges import RangeSelector, plan_ranges
from tiny_knn.sources import from_array

pytestmark = needs_kernel
METRICS = ("ip", "cosine", "l2")
ESTIMATORS = available()


def every_exact_score(queries: torch.Tensor, docs: torch.Tensor, metric: str) -> np.ndarray:
    """Every exact score (tk_dot of the rows, unit rows for cosine; tk_l2 for l2), by the kernel's reference."""
    assert KERNEL is not None
    q, d = queries.float().contiguous().clone(), docs.float().contiguous().clone()
    if metric == "cosine":
        normalize(q)
        normalize(d)
    out = torch.empty(q.shape[0], d.shape[0])
    done = KERNEL.tk_exact_tile(
        -1, int(metric == "l2"), q.data_ptr(), q.stride(0), q.shape[0], d.data_ptr(), d.stride(0), d.shape[0],
        q.shape[1], out.data_ptr(), out.stride(0),
    )  # fmt: skip
    assert done == 0
    return out.numpy()


def reference(
    queries: torch.Tensor,
    docs: torch.Tensor,
    threshold: float,
    metric: str,
    cap: int | None = None,
    excluded: set[tuple[int, int]] = frozenset(),  # type: ignore[assignment]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs whose exact score is >= float32(threshold) (<= for l2), at most `cap` per query (the best, ties
    to the lower doc), each query's in ascending doc order, less `excluded`: (offsets, indices, scores)."""
    scores = every_exact_score(queries, docs, metric)
    bound = np.float32(threshold)
    offsets, indices, values = [0], [], []
    for row in range(scores.shape[0]):
        inside = scores[row] <= bound if metric == "l2" else scores[row] >= bound
        found = [doc for doc in np.flatnonzero(inside).tolist() if (row, doc) not in excluded]
        if cap is not None and len(found) > cap:
            sign = 1.0 if metric == "l2" else -1.0
            found = sorted(sorted(found, key=lambda doc: (sign * float(scores[row, doc]), doc))[:cap])
        indices += found
        values += scores[row, found].tolist()
        offsets.append(len(indices))
    return np.array(offsets, np.int64), np.array(indices, np.int64), np.array(values, np.float32)


def assert_same(got: tuple[torch.Tensor, ...], expected: tuple[np.ndarray, ...]) -> None:
    offsets, indices, scores = (tensor.numpy() for tensor in got)
    assert offsets.dtype == indices.dtype == np.int64 and scores.dtype == np.float32
    assert np.array_equal(offsets, expected[0]), "pairs per query differ"
    assert np.array_equal(indices, expected[1]), "docs differ"
    assert np.array_equal(scores.view(np.uint32), expected[2].view(np.uint32)), "scores differ (bits)"


def at_inside_outside(score: np.float32, metric: str) -> dict[str, float]:
    """Thresholds that put a pair scoring `score` exactly at the radius, just inside it and just outside it."""
    up, down = np.nextafter(score, np.float32(np.inf)), np.nextafter(score, np.float32(-np.inf))
    inward, outward = (up, down) if metric == "l2" else (down, up)
    return {"at": float(score), "inside": float(inward), "outside": float(outward)}


# ---- Against the exact reference.


@settings(max_examples=40, deadline=None)
@given(
    metric=st.sampled_from(METRICS),
    estimator=st.sampled_from(ESTIMATORS),
    shape=st.tuples(st.integers(1, 40), st.integers(1, 300), st.integers(1, 40)),
    grid=st.booleans(),
    position=st.sampled_from(["at", "inside", "outside"]),
    pick=st.floats(0, 1),
    blocks=st.sampled_from([(None, None), (7, 64), (16, 128)]),
    seed=st.integers(0, 2**16),
)
def test_range_search_is_every_exact_score_thresholded(  # type: ignore[no-untyped-def]
    metric, estimator, shape, grid, position, pick, blocks, seed
) -> None:
    rows, doc_rows, dim = shape
    generator = torch.Generator().manual_seed(seed)
    queries, docs = torch.randn(rows, dim, generator=generator), torch.randn(doc_rows, dim, generator=generator)
    if grid:  # small integers: many exactly equal scores, many pairs exactly at the radius
        queries, docs = queries.mul(2).round(), docs.mul(2).round()
    scores = every_exact_score(queries, docs, metric)
    chosen = np.sort(scores.ravel())[int(pick * (scores.size - 1))]
    threshold = at_inside_outside(chosen, metric)[position]
    if metric == "l2" and threshold < 0:
        threshold = 0.0
    batch_size, chunk_size = blocks
    with forced_product(estimator):
        got = range_search(queries, docs, threshold, metric=metric, batch_size=batch_size, chunk_size=chunk_size)
    assert_same(got, reference(queries, docs, threshold, metric))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_pairs_at_just_inside_and_just_outside_the_radius(metric: str, estimator: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Docs built so that three pairs score exactly float32(T), one float32 step inside and one step outside
    (among 2,000 other docs), with T given as a double that rounds to float32(T): only the first two are in."""
    monkeypatch.setenv("TINY_KNN_PRODUCT", estimator)
    generator = torch.Generator().manual_seed(5)
    dim = 24
    queries = torch.randn(3, dim, generator=generator)
    docs = torch.randn(2000, dim, generator=generator) * 0.1
    # Copies of a query row give a known exact score: the same for every copy, whatever the chunk
    docs[100] = docs[700] = docs[1500] = queries[1] * 0.5
    scores = every_exact_score(queries, docs, metric)
    bound = scores[1, 100]
    assert scores[1, 700] == bound == scores[1, 1500]
    step = np.float32(np.inf) if metric == "l2" else np.float32(-np.inf)
    # A double just off float32(T): rounding to float32 first gives float32(T) itself
    threshold = float(bound) * (1 + 2**-40)
    assert np.float32(threshold) == bound and threshold != float(bound)
    expected = reference(queries, docs, threshold, metric)
    got = range_search(queries, docs, threshold, metric=metric, chunk_size=640)
    assert_same(got, expected)
    row = got[1][int(got[0][1]) : int(got[0][2])].tolist()
    assert {100, 700, 1500} <= set(row)
    # One float32 step past the pairs' score: they drop out, exactly
    beyond = float(np.nextafter(bound, -step))
    got = range_search(queries, docs, beyond, metric=metric, chunk_size=640)
    assert not {100, 700, 1500} & set(got[1][int(got[0][1]) : int(got[0][2])].tolist())
    assert_same(got, reference(queries, docs, beyond, metric))
    # One step the other way: still in
    within = float(np.nextafter(bound, step))
    assert_same(range_search(queries, docs, within, metric=metric), reference(queries, docs, within, metric))


@pytest.mark.parametrize("metric", METRICS)
def test_a_cap_keeps_each_querys_best_k_in_range(metric: str) -> None:
    generator = torch.Generator().manual_seed(2)
    queries = torch.randn(30, 16, generator=generator).round()
    docs = torch.randn(900, 16, generator=generator).round()  # ties everywhere: the lower doc wins them
    scores = every_exact_score(queries, docs, metric)
    threshold = float(np.quantile(scores, 0.02 if metric == "l2" else 0.98))
    for cap in (1, 5, 40):
        expected = reference(queries, docs, threshold, metric, cap=cap)
        for chunk_size in (None, 64):
            assert_same(range_search(queries, docs, threshold, metric=metric, k=cap, chunk_size=chunk_size), expected)


@pytest.mark.parametrize("metric", METRICS)
def test_exclusions_leave_pairs_out(metric: str) -> None:
    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(200, 8, generator=generator)
    rows[50:60] = rows[40]  # duplicates: each other's neighbours, not dropped by exclude_self
    threshold = 40.0 if metric == "l2" else (0.5 if metric == "cosine" else 4.0)
    pairs = np.stack([np.arange(0, 200, 3), np.arange(0, 200, 3)[::-1]], axis=1)
    excluded = {(q, q) for q in range(200)} | {(int(q), int(d)) for q, d in pairs}
    expected = reference(rows, rows, threshold, metric, excluded=excluded)
    got = range_search(rows, rows, threshold, metric=metric, exclude_self=True, exclude_pairs=pairs, batch_size=33)
    assert_same(got, expected)
    capped = range_search(rows, rows, threshold, metric=metric, exclude_self=True, k=3)
    assert_same(capped, reference(rows, rows, threshold, metric, cap=3, excluded={(q, q) for q in range(200)}))


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("metric", METRICS)
def test_a_chunk_never_fills_a_pool(estimator: str, metric: str) -> None:
    """Every pair of a chunk in range (the threshold below every score): the pools take the whole chunk without a
    compaction, and the threshold is never moved (no seed, no compaction)."""
    generator = torch.Generator().manual_seed(4)
    queries, docs = torch.randn(48, 40, generator=generator), torch.randn(1000, 40, generator=generator)
    if metric == "cosine":
        normalize(queries)
        normalize(docs)
    chunk = torch.zeros(1024, 40)
    chunk[:1000] = docs
    threshold = ranges.selection_threshold(1e30 if metric == "l2" else -1e30, metric)
    estimator_object = make_estimator(estimator, metric, 40, 1024, 1024)
    query_operand = estimator_object.prepare(queries, query=True)
    selector = RangeSelector(48, 1000, threshold, 2, None)
    try:
        selector.add_chunk(estimator_object, query_operand, estimator_object.prepare(chunk, query=False), 0, 1000)
        assert selector._fills.tolist() == [1000] * 48
        assert (selector._thresholds == np.float32(threshold)).all()
        found = list(selector.drain(10_000))
    finally:
        selector.close()
    rows = np.concatenate([piece[0] for piece in found])
    docs_found = np.concatenate([piece[1] for piece in found])
    assert np.array_equal(rows, np.repeat(np.arange(48), 1000)) and np.array_equal(
        docs_found, np.tile(np.arange(1000), 48)
    )
    assert selector._fills.tolist() == [0] * 48


def test_the_threshold_is_checked() -> None:
    rows = torch.randn(4, 3)
    for threshold, metric, message in (
        (float("nan"), "ip", "expected a finite number"),
        (1e39, "ip", "expected a finite number"),
        (-1.0, "l2", "a squared distance >= 0"),
        ("1", "ip", "expected a number"),
    ):
        with pytest.raises(InvalidInputError, match=message):
            range_search(rows, rows, threshold, metric=metric)  # type: ignore[arg-type]


def test_the_plan_fits_the_budget_and_holds_few_pairs() -> None:
    queries, docs = from_array(torch.randn(50_000, 64), "queries"), from_array(torch.randn(200_000, 64), "docs")
    for budget in (32 * 10**6, 2**30):
        plan = plan_ranges(queries, docs, 0.5, SearchOptions(max_memory=budget))
        assert plan.search.peak_bytes <= budget and plan.held_pairs * ranges.HELD_PAIR_BYTES <= budget // 4
        assert plan.search.query_batch_rows >= 1 and plan.search.estimator in ESTIMATORS
    described = "\n".join(plan.describe())
    assert "score >= 0.5" in described and "streamed to disk" in described


# ---- The command: streamed outputs, spills, resumption, safety.


@pytest.fixture
def corpus(tmp_path):  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(9)
    queries = torch.randn(120, 16, generator=generator)
    docs = torch.randn(3000, 16, generator=generator)
    docs[::7] = docs[1::7][: docs[::7].shape[0]]  # duplicates
    np.save(tmp_path / "q.npy", queries.numpy())
    np.save(tmp_path / "d.npy", docs.numpy())
    return tmp_path, queries, docs


def read_parquet(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    table = pq.read_table(path)
    assert table.column_names == ["query", "doc", "score"]
    return tuple(table.column(name).to_numpy() for name in table.column_names)  # type: ignore[return-value]


def as_rows(offsets: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(offsets.size - 1), np.diff(offsets))


@pytest.mark.parametrize("metric", METRICS)
def test_parquet_and_npy_outputs_hold_the_pairs_spilled_or_not(corpus, metric, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    folder, queries, docs = corpus
    option = "--max-distance" if metric == "l2" else "--min-score"
    threshold = {"ip": "5.0", "cosine": "0.6", "l2": "14"}[metric]
    expected = reference(queries, docs, float(threshold), metric)
    assert expected[1].size > 2000
    common = [str(folder / "q.npy"), str(folder / "d.npy"), option, threshold, "--metric", metric, "--quiet"]
    merged: list[int] = []  # runs merged per batch
    merge = RangeCheckpoint._merge_runs
    monkeypatch.setattr(
        RangeCheckpoint, "_merge_runs", lambda self, last: merged.append(len(self._runs)) or merge(self, last)
    )
    for held in (None, 200):  # a batch's pairs spilled to disk every 200, then merged
        if held is not None:
            monkeypatch.setattr(ranges, "MIN_HELD_PAIRS", held)
            monkeypatch.setattr(ranges, "HELD_BUDGET_SHARE", 0)
        out = folder / f"pairs-{held}.parquet"
        assert main([*common, "--batch-size", "50", "--chunk-size", "640", "--output-path", str(out)]) == 0
        got_queries, got_docs, got_scores = read_parquet(out)
        assert np.array_equal(got_queries, as_rows(expected[0])) and np.array_equal(got_docs, expected[1])
        assert np.array_equal(got_scores.view(np.uint32), expected[2].view(np.uint32))
        meta = json.loads(pq.read_schema(out).metadata[b"tiny_knn"])
        assert (
            meta["kind"] == "range"
            and meta["pairs"] == expected[1].size
            and meta["threshold"] == float(np.float32(threshold))
        )
        npy = folder / f"pairs-{held}"
        assert main([*common, "--batch-size", "50", "--output-path", str(npy)]) == 0
        assert sorted(os.listdir(npy)) == ["indices.npy", "meta.json", "offsets.npy", "scores.npy"]
        assert np.array_equal(np.load(npy / "offsets.npy"), expected[0])
        assert np.array_equal(np.load(npy / "indices.npy"), expected[1])
        assert np.array_equal(np.load(npy / "scores.npy"), expected[2])
        assert not any(name.endswith((".checkpoint", ".lock", ".tmp")) for name in os.listdir(folder))
        assert bool(merged) == (held is not None) and (held is None or max(merged) >= 2)
    assert capsys.readouterr().out.splitlines()[-1] == str(npy)


def test_ids_a_cap_and_no_pairs(corpus, capsys) -> None:  # type: ignore[no-untyped-def]
    folder, queries, docs = corpus
    (folder / "qids.txt").write_text("".join(f"q{i}\n" for i in range(120)))
    (folder / "dids.txt").write_text("".join(f"d{i}\n" for i in range(3000)))
    out = folder / "capped.parquet"
    argv = [str(folder / "q.npy"), str(folder / "d.npy"), "--min-score", "4", "--k", "2", "--quiet"]
    assert main([*argv, "--query-ids", str(folder / "qids.txt"), "--doc-ids", str(folder / "dids.txt"),
                 "--output-path", str(out)]) == 0  # fmt: skip
    expected = reference(queries, docs, 4.0, "ip", cap=2)
    got_queries, got_docs, _ = read_parquet(out)
    assert got_queries.tolist() == [f"q{i}" for i in as_rows(expected[0])]
    assert got_docs.tolist() == [f"d{i}" for i in expected[1]]
    empty = folder / "none.parquet"
    assert main([str(folder / "q.npy"), str(folder / "d.npy"), "--min-score", "1e6", "--quiet", "--output-path",
                 str(empty)]) == 0  # fmt: skip
    assert pq.read_table(empty).num_rows == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--min-score", "1", "--output-path", "out.pt"], "a .pt result's arrays are fixed-shape"),
        (["--min-score", "1", "--format", "trec"], "format 'trec': a range search writes parquet or an npy folder"),
        (["--min-score", "1", "--metric", "l2"], "with --metric l2 give --max-distance"),
        (["--max-distance", "1"], "--max-distance is a squared distance for --metric l2"),
        (["--min-score", "1", "--max-distance", "1", "--metric", "l2"], "not both"),
        (["--min-score", "inf"], "expected a finite number"),
        (["--min-score", "1", "--precision", "bf16-unsafe"], "a range search is exact"),
    ],
)
def test_bad_range_options_are_one_line(corpus, extra, message, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    folder, _, _ = corpus
    monkeypatch.chdir(folder)
    assert main(["q.npy", "d.npy", "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(folder)) == ["d.npy", "q.npy"]


def test_folders_of_one_kind_are_never_replaced_by_another(corpus, capsys) -> None:  # type: ignore[no-untyped-def]
    folder, _, _ = corpus
    q, d = str(folder / "q.npy"), str(folder / "d.npy")
    compute_topk(q, d, k=3, force_cpu=True, out_path=str(folder / "topk"), output_format="npy")
    assert main([q, d, "--min-score", "5", "--quiet", "--output-path", str(folder / "topk")]) == 2
    assert "holds a tiny-knn topk result, not a range one" in capsys.readouterr().err
    assert main([q, d, "--min-score", "5", "--quiet", "--output-path", str(folder / "csr")]) == 0
    with pytest.raises(OutputError, match="holds a tiny-knn range result, not a topk one"):
        compute_topk(q, d, k=3, force_cpu=True, out_path=str(folder / "csr"), output_format="npy")
    assert main([q, d, "--min-score", "6", "--quiet", "--output-path", str(folder / "csr")]) == 0  # its own kind
    assert json.loads((folder / "csr" / "meta.json").read_text())["threshold"] == 6.0


def test_a_checkpoint_of_another_run_is_refused(corpus, capsys) -> None:  # type: ignore[no-untyped-def]
    folder, _, _ = corpus
    checkpoint = folder / "out.parquet.checkpoint"
    checkpoint.mkdir()
    (checkpoint / "manifest.json").write_text(json.dumps({"fingerprint": {}, "done_rows": 1}))
    (checkpoint / "scores.npy").write_bytes(b"")
    argv = [str(folder / "q.npy"), str(folder / "d.npy"), "--min-score", "5", "--quiet", "--output-path",
            str(folder / "out.parquet")]  # fmt: skip
    assert main(argv) == 2
    assert "belongs to another run (a top-k search)" in capsys.readouterr().err
    (checkpoint / "notes.txt").write_text("mine")
    assert main([*argv, "--restart"]) == 2
    assert "holds files tiny-knn did not write" in capsys.readouterr().err and checkpoint.exists()
    (checkpoint / "notes.txt").unlink()
    assert main([*argv, "--restart"]) == 0 and not checkpoint.exists()


def test_a_resumed_checkpoint_drops_what_its_manifest_does_not_count_and_refuses_damage(tmp_path) -> None:  # type: ignore[no-untyped-def]
    target = str(tmp_path / "out.parquet")
    mark = {"inputs": "these"}

    def batch(store: RangeCheckpoint, start: int, stop: int) -> None:
        store.begin_batch(start, stop)
        store.add(np.arange(start, stop), np.arange(start, stop) * 2, np.ones(stop - start, np.float32))
        store.end_batch()

    store = RangeCheckpoint.open(target, lambda: mark, 10, held_pairs=100, restart=False)
    batch(store, 0, 4)
    folder = Path(store.folder)
    # A killed batch's leftovers: a spilled run, and a segment finished but not yet counted
    (folder / "run-000000000004-000000.docs.npy").write_bytes(b"x")
    (folder / "segment-000000000004.docs.npy").write_bytes(b"x")
    store = RangeCheckpoint.open(target, lambda: mark, 10, held_pairs=100, restart=False)
    assert store.done_rows == 4 and store.pairs == 4
    assert sorted(os.listdir(folder)) == ["manifest.json"] + [f"segment-000000000000.{name}.npy"
                                                              for name in ("counts", "docs", "scores")]  # fmt: skip
    with pytest.raises(InvalidInputError, match="belongs to another run"):
        RangeCheckpoint.open(target, lambda: {"inputs": "others"}, 10, held_pairs=100, restart=False)
    docs = folder / "segment-000000000000.docs.npy"
    docs.write_bytes(docs.read_bytes()[:-8])  # cut
    with pytest.raises(OutputError, match=r"damaged .*docs.npy is .* bytes"):
        RangeCheckpoint.open(target, lambda: mark, 10, held_pairs=100, restart=False)
    assert RangeCheckpoint.open(target, lambda: mark, 10, held_pairs=100, restart=True).done_rows == 0


def test_a_nan_in_the_docs_is_one_line_and_leaves_nothing(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    docs = np.random.default_rng(1).standard_normal((5000, 8)).astype(np.float32)
    docs[4321, 3] = np.nan
    np.save(tmp_path / "d.npy", docs)
    np.save(tmp_path / "q.npy", docs[:40])
    argv = [str(tmp_path / "q.npy"), str(tmp_path / "d.npy"), "--min-score", "2", "--batch-size", "10", "--output-path",
            str(tmp_path / "out.parquet")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "row 4321" in err and "NaN" in err and "deleted the checkpoint" in err
    assert sorted(os.listdir(tmp_path)) == ["d.npy", "q.npy"]


def test_dry_run_estimates_the_pairs(corpus, capsys) -> None:  # type: ignore[no-untyped-def]
    folder, queries, docs = corpus
    assert main([str(folder / "q.npy"), str(folder / "d.npy"), "--min-score", "5", "--dry-run", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "range search: every pair with score >= 5.0" in out and "pairs: about" in out
    estimate = int(out.split("pairs: about ")[1].split()[0].replace(",", ""))
    actual = reference(queries, docs, 5.0, "ip")[1].size
    assert 0.5 * actual <= estimate <= 2 * actual  # the whole of these small inputs is nearly the sample


def test_help_lists_range_mode_and_dedup(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--min-score" in text and "--max-distance" in text and "tiny-knn dedup --help" in text


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_pairs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Killed (SIGKILL) while paused at a batch's first chunk, after some batches were saved: the same command
    resumes and writes exactly what an uninterrupted run writes."""
    generator = torch.Generator().manual_seed(8)
    np.save(tmp_path / "q.npy", torch.randn(200, 16, generator=generator).numpy())
    np.save(tmp_path / "d.npy", torch.randn(20_000, 16, generator=generator).numpy())

    def command(out: str) -> list[str]:
        return [sys.executable, "-m", "tiny_knn", str(tmp_path / "q.npy"), str(tmp_path / "d.npy"), "--min-score",
                "6", "--batch-size", "20", "--quiet", "--output-path", str(tmp_path / out)]  # fmt: skip

    subprocess.run(command("reference"), check=True, capture_output=True)
    kill_in_batch(command("out"), tmp_path / "pause", saved_batches=3)
    manifest = json.loads((tmp_path / "out.checkpoint" / "manifest.json").read_text())
    assert manifest["done_rows"] == 60 and len(manifest["segments"]) == 3
    done = subprocess.run([arg for arg in command("out") if arg != "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr and "pairs" in done.stderr  # the bar counts the pairs found
    for name in ("offsets.npy", "indices.npy", "scores.npy"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    assert not (tmp_path / "out.checkpoint").exists()


# ---- Memory: the pairs stream to disk.


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_millions_of_pairs_stream_in_bounded_memory(tmp_path, fmt: str) -> None:  # type: ignore[no-untyped-def]
    """64 queries x 250,000 x 128 docs (128 MB) with about 4 M pairs in range (64 MB of pairs as int64 docs and
    float32 scores, more as parquet): under a 32 MB budget the anonymous memory stays within test_memory's bound
    (a quarter of the docs file above a tiny search's)."""
    from tests.test_memory import ALLOWED_SHARE, BUDGET, DIM, ROWS, peak_rss_anon

    data = np.random.default_rng(0).standard_normal((ROWS, DIM), dtype=np.float32)
    np.save(tmp_path / "queries.npy", data[:64])
    np.save(tmp_path / "tiny.npy", data[:100])
    np.save(tmp_path / "docs.npy", data)
    target = tmp_path / ("out.parquet" if fmt == "parquet" else "out")

    def command(docs: str) -> list[str]:
        return [sys.executable, "-m", "tiny_knn", str(tmp_path / "queries.npy"), str(tmp_path / docs), "--min-score",
                "3.5", "--max-memory", BUDGET, "--quiet", "--format", fmt, "--output-path", str(target)]  # fmt: skip

    baseline = peak_rss_anon(command("tiny.npy"))
    peak = peak_rss_anon(command("docs.npy"))
    pairs = np.load(target / "indices.npy", mmap_mode="r").size if fmt == "npy" else pq.read_metadata(target).num_rows
    assert pairs > 3_000_000
    assert peak - baseline < ALLOWED_SHARE * ROWS * DIM * 4, (
        f"{fmt}: peak RssAnon {peak / 2**20:.0f} MiB, {(peak - baseline) / 2**20:.0f} MiB above a tiny search's "
        f"for {pairs} pairs"
    )
