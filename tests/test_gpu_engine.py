"""The GPU's screened search (gpu_engine.py, TINY_KNN_PRODUCT=triton) against the CPU's screened one, byte for byte,
run by Triton's interpreter on CPU tensors; and the pools' offer of scattered survivors (topk.PoolTopK.offer)
against the reference selector, bit for bit.

As in test_gpu_screen.py, whatever runs the kernels runs in a process of its own that interprets them (Triton
decides when it is imported); the CPU's answers, the reference, are computed here. One test runs the command
itself, as a user would: `TRITON_INTERPRET=1 TINY_KNN_PRODUCT=triton tiny-knn Q D --cpu`."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from capabilities import needs_kernel, needs_triton
from runs import forced_product
from test_gpu_screen import interpreted  # noqa: F401  (the fixture: a process that interprets)

from tiny_knn import backend, cli, engine, gpu_engine, gpu_screen, search, topk
from tiny_knn.api import prepare
from tiny_knn.errors import InvalidInputError
from tiny_knn.exclusions import Exclusions, drop_excluded, exclusions_from_array
from tiny_knn.options import SearchOptions, plan_search
from tiny_knn.plan import gpu_pool_capacity
from tiny_knn.sources import from_array
from tiny_knn.topk import PoolTopK, SortMergeTopK

# ---- PoolTopK.offer: scattered exact scores, against SortMergeTopK


def tied_scores(rows: int, docs: int, seed: int) -> torch.Tensor:
    """Scores with many ties (few distinct values), -0.0 beside +0.0, and real docs scoring -inf."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(-6, 7, (rows, docs), generator=generator).float() / 4
    scores[scores == 0] = torch.where(torch.rand(int((scores == 0).sum()), generator=generator) < 0.5, -0.0, 0.0)
    scores[torch.rand(rows, docs, generator=generator) < 0.02] = float("-inf")
    return scores


def reference_top(
    scores: torch.Tensor, k: int, chunk: int, excluded: Exclusions | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SortMergeTopK over the chunks, the excluded pairs masked and then dropped (with room for them all)."""
    widest = 0 if excluded is None else excluded.widest()
    reference = SortMergeTopK(scores.shape[0], k + widest)
    for start in range(0, scores.shape[1], chunk):
        tile = scores[:, start : start + chunk].clone()
        if excluded is not None:
            rows, docs = excluded.block(0, scores.shape[0], start, start + tile.shape[1])
            tile[torch.from_numpy(rows), torch.from_numpy(docs)] = float("-inf")
        reference.add(tile, 0, start)
    best, indices = reference.result()
    if excluded is None:
        return best, indices
    return drop_excluded(best, indices, excluded, k, float("-inf"))


def offered(
    scores: torch.Tensor,
    k: int,
    chunk: int,
    excluded: Exclusions | None,
    keep: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    start_thresholds: torch.Tensor | None = None,
    tell_most: bool = True,
) -> PoolTopK:
    """Every chunk's pairs (those `keep` keeps of them, given the scores and the pool's thresholds) offered to a
    PoolTopK in a random order, excluded pairs as doc -1."""
    rows, docs = scores.shape
    pool = PoolTopK(rows, k, start_thresholds=start_thresholds)
    generator = torch.Generator().manual_seed(k)
    for start in range(0, docs, chunk):
        tile = scores[:, start : start + chunk]
        chosen = torch.ones_like(tile, dtype=torch.bool) if keep is None else keep(tile, pool.thresholds)
        row, column = torch.nonzero(chosen, as_tuple=True)
        order = torch.randperm(row.numel(), generator=generator)
        row, column = row[order], column[order]
        doc = column + start
        if excluded is not None:
            doc = torch.where(_excluded(excluded, row, doc), -1, doc)
        most = int(torch.bincount(row, minlength=rows).max()) if row.numel() and tell_most else None
        pool.offer(row, doc, tile[row, column], most=most)
    return pool


def _excluded(excluded: Exclusions, rows: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """Whether each (row, doc) is excluded."""
    return torch.tensor([int(doc) in set(excluded.docs[excluded.offsets[row] : excluded.offsets[row + 1]].tolist())
                         for row, doc in zip(rows.tolist(), docs.tolist(), strict=True)], dtype=torch.bool)  # fmt: skip


def assert_same(ours: tuple[torch.Tensor, torch.Tensor], theirs: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert torch.equal(ours[1], theirs[1]), (ours[1], theirs[1])
    assert torch.equal(ours[0].view(torch.int32), theirs[0].view(torch.int32))


@pytest.mark.parametrize(("rows", "docs", "k", "chunk"), [(7, 300, 5, 64), (5, 900, 40, 128), (3, 50, 60, 16)])
@pytest.mark.parametrize("tell_most", [True, False])
def test_offered_survivors_in_any_order_select_as_the_sort_does(rows, docs, k, chunk, tell_most) -> None:  # type: ignore[no-untyped-def]
    """Every pair offered, scattered: the k best by (score, doc), ties, -0.0 and -inf included; k above the docs
    (k=60 of 50) pads with -1 and -inf, as the sort does."""
    scores = tied_scores(rows, docs, k)
    pool = offered(scores, k, chunk, None, tell_most=tell_most)
    assert_same(pool.result(), reference_top(scores, k, chunk, None))
    assert pool.uncertain_rows().numel() == 0


def test_rows_offered_more_than_a_cut_pool_holds_take_them_in_turns() -> None:
    """A chunk of 3000 docs at once: more than the pool's room after a cut (its capacity less k), every row."""
    scores = tied_scores(4, 6000, 1)
    assert gpu_pool_capacity(8) - 8 < 3000
    assert_same(offered(scores, 8, 3000, None).result(), reference_top(scores, 8, 3000, None))


def test_excluded_pairs_offered_as_no_doc_take_no_place() -> None:
    """Doc -1 (an excluded pair) is never selected, even where a row is left with fewer than k docs, nor pushes out
    a real doc scoring -inf."""
    scores = tied_scores(6, 200, 2)
    generator = torch.Generator().manual_seed(3)
    pairs = [(row, doc) for row in range(6) for doc in torch.randperm(200, generator=generator)[:30].tolist()]
    pairs += [(5, doc) for doc in range(200) if (5, doc) not in pairs[-30:]]  # row 5: no doc left at all
    excluded = exclusions_from_array(np.array(pairs), 6, 200)
    assert_same(offered(scores, 20, 64, excluded).result(), reference_top(scores, 20, 64, excluded))


def test_only_what_the_thresholds_keep_is_offered_and_start_thresholds_are_certified() -> None:
    """Offered only the pairs at or above each row's threshold (as the screen keeps them), from start thresholds:
    rows whose k-th best is above its start threshold are the sort's answer; the others are uncertain."""
    scores = tied_scores(9, 800, 4)
    reference = reference_top(scores, 12, 100, None)
    start = reference[0][:, -1].clone()
    start[:3] = float("-inf")  # none: certain
    start[3:6] = torch.nextafter(start[3:6], torch.tensor(float("-inf")))  # just below the k-th: certain
    # rows 6..8: at the k-th best itself (ties below it may be lost): uncertain
    pool = offered(scores, 12, 100, None, keep=lambda tile, thresholds: ~(tile < thresholds[:, None]),
                   start_thresholds=start)  # fmt: skip
    ours = pool.result()
    assert pool.uncertain_rows().tolist() == [6, 7, 8]
    assert_same((ours[0][:6], ours[1][:6]), (reference[0][:6], reference[1][:6]))


def test_the_pools_answer_leaves_in_slices_of_rows(monkeypatch) -> None:
    """PoolTopK.result takes and copies out a few rows at a time (here 3 of 10): the same answer, and no topk over
    more rows than a slice."""
    scores = tied_scores(10, 500, 6)
    pool = offered(scores, 17, 128, None)
    sizes: list[int] = []
    original = torch.topk

    def counted(keys, *args, **kwargs):  # type: ignore[no-untyped-def]
        sizes.append(keys.shape[0])
        return original(keys, *args, **kwargs)

    monkeypatch.setattr(topk, "gpu_result_slice_rows", lambda k: 3)
    monkeypatch.setattr(topk.torch, "topk", counted)
    ours = pool.result()
    monkeypatch.setattr(topk.torch, "topk", original)
    assert sizes == [3, 3, 3, 1]
    assert_same(ours, reference_top(scores, 17, 128, None))


# ---- The search under Triton's interpreter, against the CPU's


def duplicated_rows(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """40 queries x 700 docs x 24 dims with ties: docs repeated (one of them 12 times, in several chunks), and
    queries that are docs."""
    generator = torch.Generator().manual_seed(seed)
    queries, docs = torch.randn(40, 24, generator=generator), torch.randn(700, 24, generator=generator)
    docs[100:112] = docs[5]
    docs[650:655] = docs[5]
    docs[300:310] = docs[301]
    queries[3], queries[17], queries[30] = docs[5], docs[301], docs[650] * 3
    return queries, docs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The files: queries, docs, and a file of excluded pairs (rows 3 and 17 lose their tied docs)."""
    folder = tmp_path_factory.mktemp("gpu-engine")
    queries, docs = duplicated_rows(0)
    paths = {"queries": str(folder / "q.pt"), "docs": str(folder / "d.pt"), "pairs": str(folder / "pairs.txt")}
    torch.save(queries, paths["queries"])
    torch.save(docs, paths["docs"])
    pairs = [(3, doc) for doc in (5, *range(100, 106), 652)] + [(17, doc) for doc in range(300, 310)]
    pairs += [(row, (row * 37) % 700) for row in range(40)]
    with open(paths["pairs"], "w") as stream:
        stream.writelines(f"{row} {doc}\n" for row, doc in pairs)
    return paths


def run_command(argv: list[str], triton: bool) -> int:
    """cli.main(argv), by the Triton path or the CPU's default."""
    with forced_product("triton") if triton else contextlib.nullcontext():
        return cli.main(argv)


def same_files(ours: str, theirs: str) -> None:
    mine, reference = torch.load(ours, weights_only=True), torch.load(theirs, weights_only=True)
    assert mine["device"] == reference["device"] == "cpu"
    assert torch.equal(mine["indices"], reference["indices"]), (mine["indices"] != reference["indices"]).nonzero()
    assert torch.equal(mine["scores"].view(torch.int32), reference["scores"].view(torch.int32))


def search_arguments(inputs: dict[str, str], out: str, metric: str, k: int, extra: list[str]) -> list[str]:
    return [inputs["queries"], inputs["docs"], "--cpu", "--k", str(k), "--metric", metric, "--quiet",
            "--output-path", out, *extra]  # fmt: skip


@needs_kernel
@needs_triton
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_the_triton_path_answers_the_cpus_answer_byte_for_byte(interpreted, inputs, tmp_path, metric) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """ip, cosine and l2 with ties: k=10 in chunks of 128 docs and in one chunk (whose survivors overflow the buffer:
    it is screened again in pieces); k=300, more than a chunk brings, from sampled start thresholds; and with
    excluded pairs (rows left with their tied docs excluded)."""
    cases = [
        (10, ["--chunk-size", "128"]),
        (10, []),
        (300, ["--chunk-size", "128", "--batch-size", "16"]),
        (25, ["--chunk-size", "192", "--exclude-pairs", inputs["pairs"]]),
    ]
    for number, (k, extra) in enumerate(cases):
        theirs, ours = str(tmp_path / f"cpu{number}.pt"), str(tmp_path / f"triton{number}.pt")
        assert run_command(search_arguments(inputs, theirs, metric, k, extra), triton=False) == 0
        assert interpreted(run_command, search_arguments(inputs, ours, metric, k, extra), True) == 0
        same_files(ours, theirs)


def run_recording_screens(argv: list[str]) -> tuple[int, set[torch.dtype]]:
    """run_command(argv) by the Triton path, and the dtypes of the docs' values that its screens read."""
    seen: set[torch.dtype] = set()
    screen = gpu_screen.screen

    def recorded(queries, docs, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        seen.add(docs.values.dtype)
        screen(queries, docs, *args, **kwargs)

    gpu_screen.screen = recorded
    try:
        return run_command(argv, True), seen
    finally:
        gpu_screen.screen = screen


@needs_kernel
@needs_triton
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_a_float16_docs_file_by_the_triton_path_answers_the_cpus_answer_byte_for_byte(  # type: ignore[no-untyped-def]
    interpreted,  # noqa: F811
    inputs,
    half_precision_inputs,
    tmp_path,
    metric,
) -> None:
    """The docs as a float16 file, with their ties (repeated docs, queries that are docs), by the command: ip and l2
    through the float16 screen (docs as they are), cosine through the bfloat16 screen (its docs are scaled on the
    host in float32); k=10 in chunks of 128, k=300 from sampled thresholds, and excluded pairs."""
    paths = {**inputs, "docs": half_precision_inputs["torch.float16"]["docs"]}
    cases = [
        (10, ["--chunk-size", "128"]),
        (300, ["--chunk-size", "128", "--batch-size", "16"]),
        (25, ["--chunk-size", "192", "--exclude-pairs", inputs["pairs"]]),
    ]
    for number, (k, extra) in enumerate(cases):
        theirs, ours = str(tmp_path / f"cpu{number}.pt"), str(tmp_path / f"triton{number}.pt")
        assert run_command(search_arguments(paths, theirs, metric, k, extra), triton=False) == 0
        code, screens = interpreted(run_recording_screens, search_arguments(paths, ours, metric, k, extra))
        assert code == 0
        assert torch.float16 in screens if metric != "cosine" else screens == {torch.bfloat16}, screens
        same_files(ours, theirs)


def check_dry_run(inputs: dict[str, str], capture: str) -> tuple[int, str]:
    with open(capture, "w") as stream, contextlib.redirect_stdout(stream):
        code = run_command([inputs["queries"], inputs["docs"], "--cpu", "--k", "10", "--dry-run"], True)
    with open(capture) as stream:
        return code, stream.read()


@needs_triton
def test_dry_run_names_the_triton_path(interpreted, inputs, tmp_path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    code, text = interpreted(check_dry_run, inputs, str(tmp_path / "plan.txt"))
    assert code == 0
    assert "screened by the Triton path" in text and "forced by TINY_KNN_PRODUCT; on the CPU, by Triton's " in text


def hard_case() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """duplicated_rows, the first docs the queries themselves (ties with them), and excluded pairs."""
    queries, docs = duplicated_rows(1)
    docs[:40] = queries
    pairs = np.array([(row, (row * 11) % 700) for row in range(40)] + [(3, 5), (3, 100), (3, 101)])
    return queries, docs, pairs


def check_hard_cases(metric: str) -> dict[str, Any]:
    """The search with a small survivor buffer (8 pairs a row: most chunks are screened in many pieces), and
    with start thresholds far too high (every row searched again): the answers, and how often each happened."""
    queries, docs, pairs = hard_case()
    counts = {"pieces": 0, "passes": 0}
    piece, screen, capacity = gpu_engine._Screening._launch, gpu_engine._screen, gpu_engine.gpu_survivor_capacity

    def counted_piece(self, chunk, survivors, lo, hi) -> Any:  # type: ignore[no-untyped-def]
        counts["pieces"] += hi - lo < chunk.count  # a piece of a chunk, after an overflow
        return piece(self, chunk, survivors, lo, hi)

    def counted_screen(*args) -> Any:  # type: ignore[no-untyped-def]
        counts["passes"] += 1
        return screen(*args)

    gpu_engine._Screening._launch = counted_piece  # type: ignore[method-assign]
    gpu_engine._screen = counted_screen
    answers = {}
    try:
        with forced_product("triton"):
            gpu_engine.gpu_survivor_capacity = lambda rows: 8 * rows
            answers["small buffer"] = search(queries, docs, k=30, metric=metric, exclude_pairs=pairs, chunk_size=256)
            gpu_engine.gpu_survivor_capacity = capacity
            pieces, counts["pieces"] = counts["pieces"], 0
            q_source, d_source = from_array(queries, "queries"), from_array(docs, "docs")
            plan = plan_search(q_source, d_source, 300, SearchOptions(force_cpu=True, metric=metric, chunk_size=128))
            assert plan.threshold_sample_docs > 0 and plan.estimator == "triton"
            excluded = exclusions_from_array(pairs, 40, 700)
            counts["passes"] = 0
            scores, indices, _ = engine.search(q_source, d_source, replace(plan, sample_sigmas=-100.0),
                                               excluded=excluded)  # fmt: skip
            answers["redone"] = (scores, indices)
    finally:
        gpu_engine._Screening._launch, gpu_engine._screen = piece, screen  # type: ignore[method-assign]
        gpu_engine.gpu_survivor_capacity = capacity
    return {"answers": answers, "pieces": pieces, "passes": counts["passes"]}


@needs_kernel
@needs_triton
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_overflowing_buffers_and_start_thresholds_too_high_still_give_the_cpus_answer(interpreted, metric) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    result = interpreted(check_hard_cases, metric)
    assert result["pieces"] > 10, result["pieces"]  # screened again in pieces
    assert result["passes"] == 3  # the sample, the search, and the search again of every row
    queries, docs, pairs = hard_case()
    assert_same(result["answers"]["small buffer"], search(queries, docs, k=30, metric=metric, exclude_pairs=pairs))
    assert_same(result["answers"]["redone"], search(queries, docs, k=300, metric=metric, exclude_pairs=pairs))


@needs_kernel
@needs_triton
def test_the_command_runs_the_triton_path_under_the_interpreter(inputs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`TRITON_INTERPRET=1 TINY_KNN_PRODUCT=triton tiny-knn Q D --cpu ...`, a process of its own, as a user runs it."""
    theirs, ours = str(tmp_path / "cpu.pt"), str(tmp_path / "triton.pt")
    arguments = search_arguments(inputs, theirs, "cosine", 20, ["--exclude-pairs", inputs["pairs"]])
    assert cli.main(arguments) == 0
    environment = {**os.environ, "TRITON_INTERPRET": "1", "TINY_KNN_PRODUCT": "triton"}
    arguments[arguments.index(theirs)] = ours
    done = subprocess.run([sys.executable, "-m", "tiny_knn", *arguments], env=environment, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    same_files(ours, theirs)


# ---- Forced where it cannot run: an error, never a fallback; never chosen unforced


@needs_triton
def test_forced_triton_without_the_interpreter_on_the_cpu_is_one_line_error(inputs, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    if gpu_screen.interpreted():
        pytest.skip("this process interprets Triton's kernels (TRITON_INTERPRET=1): the Triton path runs here")
    monkeypatch.setenv("TINY_KNN_PRODUCT", "triton")
    assert cli.main([inputs["queries"], inputs["docs"], "--cpu", "--k", "5", "--dry-run"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "TINY_KNN_PRODUCT=triton" in error and "TRITON_INTERPRET=1" in error


def test_forced_triton_switched_off_is_an_error(inputs, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TINY_KNN_PRODUCT", "triton")
    monkeypatch.setenv("TINY_KNN_NO_TRITON", "1")
    with pytest.raises(InvalidInputError, match="TINY_KNN_PRODUCT=triton: needs Triton"):
        prepare(inputs["queries"], inputs["docs"], 5, SearchOptions(force_cpu=True))


def test_cuda_keeps_the_path_by_keys_unless_triton_is_forced(inputs, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The Triton path has not run on a GPU: a CUDA search takes today's path unless it is forced."""
    monkeypatch.setattr(backend.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backend, "default_selection", lambda device, docs: "pool")
    queries, docs = from_array(torch.zeros(4, 8), "queries"), from_array(torch.zeros(9, 8), "docs")
    chosen = backend.resolve(queries, docs, 3, force_cpu=False, metric="ip", precision="exact")
    assert (chosen.device, chosen.estimator, chosen.selection) == ("cuda", None, "pool")
    monkeypatch.setenv("TINY_KNN_PRODUCT", "torch")
    assert backend.resolve(queries, docs, 3, force_cpu=False, metric="ip", precision="exact").estimator is None


# ---- On a GPU (skipped visibly without one; TINY_KNN_REQUIRE_CUDA=1 makes that a failure)


@needs_kernel
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_cuda_triton_path_answers_the_cpus_answer_byte_for_byte(cuda, tmp_path, monkeypatch, metric) -> None:  # type: ignore[no-untyped-def]
    """On a GPU: tensor cores' estimates, the GPU's exact scores and the pools give the CPU's bytes, ties and
    excluded pairs included; k=10 (a first chunk that overflows the buffer) and k=300 (sampled thresholds)."""
    generator = torch.Generator().manual_seed(7)
    queries, docs = torch.randn(300, 96, generator=generator), torch.randn(20000, 96, generator=generator)
    docs[1000:1010], docs[15000:15005] = docs[3], docs[3]
    queries[:5] = docs[3]
    pairs = np.array([(0, 3), (0, 1000), (1, 1001), *((row, (row * 61) % 20000) for row in range(300))])
    for k, chunk in ((10, None), (300, 4096)):
        options = dict(metric=metric, chunk_size=chunk, exclude_pairs=pairs)
        reference = search(queries, docs, k, device="cpu", **options)
        monkeypatch.setenv("TINY_KNN_PRODUCT", "triton")
        assert_same(search(queries, docs, k, device="cuda", **options), reference)
        monkeypatch.delenv("TINY_KNN_PRODUCT")


# ---- The engine around the screen: resident docs, the lagged synchronisation, half-precision docs as they are


def check_engine_around_the_screen(paths: dict[str, str], metric: str, k: int, batch: int) -> dict[str, Any]:
    """Searches by the Triton path, with the docs resident and without: the answers, how many times the docs file
    was read (Source.read_into: the sample comes by read_rows) and in which dtype, and the order in which chunks
    were screened and their counts read."""
    results: dict[str, Any] = {"reads": {}, "dtypes": set(), "order": [], "screens": set()}
    launch, settle = gpu_engine._Screening._launch, gpu_engine._Screening._settle

    def logged_launch(self, chunk, survivors, lo, hi) -> Any:  # type: ignore[no-untyped-def]
        results["order"].append(("screen", chunk.first_doc))
        results["screens"].add((self._queries_for(chunk.prepared).values.dtype, chunk.prepared.values.dtype))
        return launch(self, chunk, survivors, lo, hi)

    def logged_settle(self, screened) -> None:  # type: ignore[no-untyped-def]
        results["order"].append(("read", screened.chunk.first_doc))
        settle(self, screened)

    gpu_engine._Screening._launch, gpu_engine._Screening._settle = logged_launch, logged_settle  # type: ignore[method-assign]
    try:
        with forced_product("triton"):
            options = SearchOptions(force_cpu=True, metric=metric, batch_size=batch, chunk_size=128)
            queries, docs, plan = prepare(paths["queries"], paths["docs"], k, options)
        results["plan"] = plan
        for resident in (True, False):
            reads = []
            original = docs.read_into

            def counted(start, stop, out, check=True, original=original, reads=reads):  # type: ignore[no-untyped-def]
                reads.append(stop - start)
                results["dtypes"].add(out.dtype)
                original(start, stop, out, check)

            docs.read_into = counted  # type: ignore[method-assign]
            scores, indices, _ = engine.search(queries, docs, replace(plan, docs_resident=resident))
            docs.read_into = original  # type: ignore[method-assign]
            results["reads"][resident] = reads
            results[resident] = (scores, indices)
            if resident:
                results["order"], first_pass = [], list(results["order"])
        results["order"] = first_pass
    finally:
        gpu_engine._Screening._launch, gpu_engine._Screening._settle = launch, settle  # type: ignore[method-assign]
    return results


def cpu_answer(paths: dict[str, str], metric: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    queries, docs, plan = prepare(paths["queries"], paths["docs"], k, SearchOptions(force_cpu=True, metric=metric))
    scores, indices, _ = engine.search(queries, docs, plan)
    return scores, indices


@needs_kernel
@needs_triton
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_docs_kept_resident_are_read_once_for_every_batch(interpreted, inputs, metric) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """Three query batches (16 rows each; k=150 from sampled thresholds): with the docs resident the file (and the
    sample) is read once, without it once a batch; the answers are the CPU's, byte for byte."""
    result = interpreted(check_engine_around_the_screen, inputs, metric, 150, 16)
    plan = result["plan"]
    assert plan.docs_resident and plan.doc_passes == 3 and plan.threshold_sample_docs
    once = 700 + plan.threshold_sample_docs  # every doc, and the sample (read_rows reads through read_into)
    assert sum(result["reads"][True]) == once and sum(result["reads"][False]) == 3 * once
    reference = cpu_answer(inputs, metric, 150)
    assert_same(result[True], reference)
    assert_same(result[False], reference)


@needs_kernel
@needs_triton
def test_the_host_reads_a_chunks_counts_after_the_next_chunks_screen_is_queued(interpreted, inputs) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """One synchronisation a chunk, lagged: chunk n+1 is screened (by thresholds one chunk stale) before the host
    reads chunk n's counts; every chunk is read once (no overflow here: k=5, a buffer of 128 pairs a row)."""
    result = interpreted(check_engine_around_the_screen, inputs, "ip", 5, 40)
    chunks = list(range(0, 700, 128))
    expected = [("screen", 0)]
    for before, chunk in itertools.pairwise(chunks):
        expected += [("screen", chunk), ("read", before)]
    assert result["order"] == [*expected, ("read", chunks[-1])]
    assert_same(result[True], cpu_answer(inputs, "ip", 5))


@pytest.fixture(scope="module")
def half_precision_inputs(inputs, tmp_path_factory) -> dict[str, dict[str, str]]:  # type: ignore[no-untyped-def]
    """The docs of `inputs` as float16 and as bfloat16 files."""
    folder = tmp_path_factory.mktemp("half-docs")
    docs = torch.load(inputs["docs"], weights_only=True)
    paths = {}
    for dtype in (torch.float16, torch.bfloat16):
        path = str(folder / f"d-{dtype}.pt".replace("torch.", ""))
        torch.save(docs.to(dtype), path)
        paths[str(dtype)] = {"queries": inputs["queries"], "docs": path}
    return paths


@needs_kernel
@needs_triton
@pytest.mark.parametrize("dtype", ["torch.float16", "torch.bfloat16"])
@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_half_precision_docs_travel_as_they_are(interpreted, half_precision_inputs, dtype, metric) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """float16 and bfloat16 docs are read into host buffers of their own dtype (half the bytes of float32) and
    screened as they are (ip, l2: float16's by the float16 screen, the queries prepared to match); cosine's are
    scaled on the host in float32, and screened in bfloat16. The answers are the CPU's."""
    paths = half_precision_inputs[dtype]
    result = interpreted(check_engine_around_the_screen, paths, metric, 12, 16)
    expected = torch.float32 if metric == "cosine" else getattr(torch, dtype.removeprefix("torch."))
    assert result["plan"].chunk_dtype == expected and result["dtypes"] == {expected}
    screened = torch.float16 if expected == torch.float16 else torch.bfloat16
    assert (screened, screened) in result["screens"]  # (queries, docs); a sample's float32 docs: bfloat16
    assert result["screens"] <= {(screened, screened), (torch.bfloat16, torch.bfloat16)}, result["screens"]
    reference = cpu_answer(paths, metric, 12)
    assert_same(result[True], reference)
    assert_same(result[False], reference)


def check_out_of_memory(paths: dict[str, str]) -> dict[str, Any]:
    """The Triton path in batches of 16 with the docs resident, every batch over 8 rows running out of device
    memory: the plan used at the end, and the answer."""
    screened = gpu_engine.search_screened

    def too_big(host_queries, rows, *args) -> Any:  # type: ignore[no-untyped-def]
        if rows > 8:
            raise torch.cuda.OutOfMemoryError("simulated: the pools do not fit")
        return screened(host_queries, rows, *args)

    gpu_engine.search_screened = too_big
    try:
        with forced_product("triton"):
            options = SearchOptions(force_cpu=True, metric="l2", batch_size=16, chunk_size=128)
            queries, docs, plan = prepare(paths["queries"], paths["docs"], 150, options)
        scores, indices, used = engine.search(queries, docs, plan)
    finally:
        gpu_engine.search_screened = screened
    return {"planned": plan, "used": used, "answer": (scores, indices)}


@needs_kernel
@needs_triton
def test_out_of_memory_gives_up_resident_docs_then_halves_the_query_batch(interpreted, inputs) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """Running out of memory while a batch of more than 8 rows is searched: the batch is retried without resident
    docs, then in smaller plans, until it is 8 rows; the answer is the CPU's, byte for byte."""
    result = interpreted(check_out_of_memory, inputs)
    planned, used = result["planned"], result["used"]
    assert planned.docs_resident and planned.query_batch_rows == 16
    assert not used.docs_resident and used.query_batch_rows == 8  # (the order of the halvings: test_plan.py)
    assert_same(result["answer"], cpu_answer(inputs, "l2", 150))
