"""The selectors must agree bit for bit, ties included, whatever the tiles. (The screen that feeds the threshold
selector from an estimator is tested in test_estimators.py.)"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
from capabilities import needs_kernel
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny_knn import gpu_survivors
from tiny_knn.plan import pool_capacity
from tiny_knn.topk import (
    PackedTopK,
    PoolTopK,
    SortMergeTopK,
    ThresholdTopK,
    make_running_topk,
)

pytestmark = needs_kernel


def offer(selectors, tiles, row_splits=(0,)):  # type: ignore[no-untyped-def]
    first_doc = 0
    for tile in tiles:
        for selector in selectors:
            bounds = [*row_splits, tile.shape[0]]
            for lo, hi in itertools.pairwise(bounds):
                selector.add(tile[lo:hi], lo, first_doc)
        first_doc += tile.shape[1]
    return [selector.result() for selector in selectors]


@pytest.mark.parametrize(("k", "cols", "tiles"), [(1, 5, 30), (5, 64, 20), (300, 64, 20), (50, 1000, 8), (7, 3, 50)])
def test_threshold_equals_sort_merge_on_tied_and_random_tiles(k: int, cols: int, tiles: int) -> None:
    generator = torch.Generator().manual_seed(k * 1000 + cols)
    rows = 37
    stream = []
    for index in range(tiles):
        if index % 2:
            stream.append(torch.randint(-3, 4, (rows, cols), generator=generator).float() * 0.5)  # heavy ties
        else:
            stream.append(torch.randn(rows, cols, generator=generator))
    (fast_scores, fast_indices), (ref_scores, ref_indices) = offer(
        [ThresholdTopK(rows, k), SortMergeTopK(rows, k)], stream, row_splits=(0, 20)
    )
    assert torch.equal(fast_scores, ref_scores)
    assert torch.equal(fast_indices, ref_indices)


def test_ties_go_to_the_smaller_index_and_negative_zero_equals_zero() -> None:
    tile = torch.tensor([[0.0, -0.0, 1.0, -0.0, 0.0, 1.0]])
    for selector in (ThresholdTopK(1, 4), SortMergeTopK(1, 4)):
        selector.add(tile[:, :3], 0, 0)
        selector.add(tile[:, 3:], 0, 3)
        scores, indices = selector.result()
        assert indices.tolist() == [[2, 5, 0, 1]]
        assert scores.tolist() == [[1.0, 1.0, 0.0, 0.0]]


def test_pool_compacts_many_times_and_stays_exact() -> None:
    k = 10
    rows, cols = 4, 64
    tiles = [torch.randn(rows, cols, generator=torch.Generator().manual_seed(i)) for i in range(200)]
    fast, ref = ThresholdTopK(rows, k), SortMergeTopK(rows, k)
    (fast_scores, fast_indices), (ref_scores, ref_indices) = offer([fast, ref], tiles)
    assert fast.survivors > pool_capacity(k)  # the pool must have filled and been compacted
    assert torch.equal(fast_scores, ref_scores) and torch.equal(fast_indices, ref_indices)


def test_start_thresholds_certify_or_report_rows() -> None:
    tile = torch.arange(20, dtype=torch.float32).repeat(3, 1)  # scores 0..19 in every row
    low_enough = torch.tensor([5.0, 16.0, 17.0])  # k=3 best are 19, 18, 17
    selector = ThresholdTopK(3, 3, start_thresholds=low_enough)
    selector.add(tile, 0, 0)
    scores, indices = selector.result()
    assert scores[0].tolist() == [19.0, 18.0, 17.0] and indices[0].tolist() == [19, 18, 17]
    assert scores[1].tolist() == [19.0, 18.0, 17.0]
    # Row 2's estimate equals its k-th best: docs scoring exactly 17 may have been dropped, so it is not certified.
    assert selector.uncertain_rows().tolist() == [2]


def test_start_threshold_above_everything_leaves_the_row_uncertain() -> None:
    selector = ThresholdTopK(2, 2, start_thresholds=torch.tensor([100.0, -100.0]))
    selector.add(torch.randn(2, 50), 0, 0)
    selector.result()
    assert selector.uncertain_rows().tolist() == [0]


def tie_heavy_tiles(seed: int, rows: int, widths: list[int], levels: int) -> list[torch.Tensor]:
    """Tiles whose scores take `levels` distinct values (0 means continuous), with -0.0 mixed in."""
    generator = torch.Generator().manual_seed(seed)
    tiles = []
    for cols in widths:
        tile = torch.randn(rows, cols, generator=generator)
        if levels:
            tile = torch.randint(-levels, levels + 1, (rows, cols), generator=generator).float()
            tile[torch.rand(rows, cols, generator=generator) < 0.3] = -0.0
        tiles.append(tile)
    return tiles


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rows=st.integers(1, 9),
    k=st.integers(1, 40),
    widths=st.lists(st.integers(1, 200), min_size=1, max_size=6),
    levels=st.sampled_from([0, 1, 3, 50]),
    split=st.integers(0, 9),
)
def test_packed_equals_sort_merge(seed: int, rows: int, k: int, widths: list[int], levels: int, split: int) -> None:
    tiles = tie_heavy_tiles(seed, rows, widths, levels)
    splits = (0, split) if 0 < split < rows else (0,)
    (fast_scores, fast_indices), (ref_scores, ref_indices) = offer(
        [PackedTopK(rows, k), SortMergeTopK(rows, k)], tiles, row_splits=splits
    )
    assert torch.equal(fast_scores, ref_scores) and torch.equal(fast_indices, ref_indices)
    assert not fast_scores.signbit().logical_and(fast_scores == 0).any()  # no -0.0 in the answer


POOL_CHECK = """
import random, torch
from test_topk import offer, tie_heavy_tiles
from tiny_knn import gpu_survivors
from tiny_knn.plan import gpu_pool_capacity
from tiny_knn.topk import _EMPTY, PoolTopK, SortMergeTopK, _pack
calls = {"pass": 0, "overflow": 0, "cut": 0}
append = gpu_survivors.append_survivors
def counted(scores, thresholds, first_doc, pool, fills):
    append(scores, thresholds, first_doc, pool, fills)
    calls["pass"] += 1
    calls["overflow"] += int((fills > pool.shape[1]).sum())
gpu_survivors.append_survivors = counted
cut = PoolTopK._cut
def counted_cut(self, rows, keys):
    calls["cut"] += 1
    cut(self, rows, keys)
PoolTopK._cut = counted_cut
rng = random.Random(0)
for case in range(30):
    rows, k, levels = rng.randint(1, 9), rng.choice([1, 3, 17, 40, 700]), rng.choice([0, 1, 3, 50])
    capacity = gpu_pool_capacity(k)
    widths = [rng.choice([capacity + 5, 300, 2049, 4100, 7]) for _ in range(rng.randint(2, 7))]
    tiles = tie_heavy_tiles(case, rows, widths, levels)
    if case % 5 == 0:  # products that overflow: docs scoring -inf are still answers
        tiles[0][:, ::2] = float("-inf")
        tiles[-1][0] = float("-inf")
    splits = (0, rng.randint(1, rows - 1)) if rows > 1 else (0,)
    got, expected = offer([PoolTopK(rows, k), SortMergeTopK(rows, k)], tiles, row_splits=splits)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), (case, rows, k, levels, widths)
assert calls["pass"] > 50 and calls["overflow"] > 0 and calls["cut"] > 50, calls
assert gpu_survivors.runs_on("cpu")  # the trial launch, here through the interpreter
strided = [torch.randn(2000, 3).T, torch.randn(3, 0), torch.randn(3000, 3).T]  # columns not contiguous; no docs
got, expected = offer([PoolTopK(3, 20), SortMergeTopK(3, 20)], strided)
assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
few = [torch.randn(3, 30), torch.full((3, 50), float("-inf"))]  # fewer than k finite scores: -inf ones answer
few[0][:, ::2] = float("-inf")
got, expected = offer([PoolTopK(3, 40), SortMergeTopK(3, 40)], few)
assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
special = [float("inf"), 3.4e38, 1.0, 1e-45, 0.0, -0.0, -1e-45, -1.0, -3.4e38, float("-inf")]
scores = torch.tensor([special + [float("-inf")] * 4000, special[::-1] + [-2.5] * 4000])
pool = torch.full((2, 24), _EMPTY, dtype=torch.int64)
fills = torch.tensor([0, 3], dtype=torch.int32)
lowest = torch.finfo(torch.float32).min  # below -3.4e38, yet not -inf (which keeps every score)
append(scores, torch.tensor([lowest, -2.0]), 7, pool, fills)
for row, threshold in enumerate((lowest, -2.0)):
    above = torch.nonzero(scores[row] > threshold).flatten()
    start = 3 * row
    assert int(fills[row]) == start + above.numel() <= 24
    assert (pool[row, :start] == _EMPTY).all() and (pool[row, start + above.numel() :] == _EMPTY).all()
    expected = _pack(scores[row, above], above + 7)
    assert sorted(pool[row, start : start + above.numel()].tolist()) == sorted(expected.tolist())
"""


@pytest.mark.skipif(not gpu_survivors.available(), reason="Triton not installed (the test extra installs it)")
def test_pool_selector_equals_sort_merge() -> None:
    # The CUDA selector and its Triton kernel, run here by Triton's interpreter on CPU tensors: the same answer
    # as the reference, with ties, -0.0, -inf, tiles wider than one program's block, rows that overflow their
    # pool, and pools cut many times; and the kernel's keys for special values.
    path = os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", POOL_CHECK], env=environment, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(not gpu_survivors.available(), reason="Triton not installed (the test extra installs it)")
def test_a_triton_kernel_that_cannot_run_is_not_chosen(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from tiny_knn import TinyKnnWarning
    from tiny_knn.topk import default_selection

    def broken(*args):  # type: ignore[no-untyped-def]
        raise RuntimeError("failed to compile: no C compiler\n(details)")

    monkeypatch.setattr(gpu_survivors, "append_survivors", broken)
    gpu_survivors._trial.cache_clear()
    try:
        with pytest.warns(TinyKnnWarning, match="no C compiler.*torch.topk"):
            assert not gpu_survivors.runs_on("cpu")
    finally:
        gpu_survivors._trial.cache_clear()
    monkeypatch.setattr(gpu_survivors, "runs_on", lambda device: False)
    assert default_selection("cuda", 1000) == "sort"
    monkeypatch.setattr(gpu_survivors, "runs_on", lambda device: True)
    assert default_selection("cuda", 1000) == "pool" and default_selection("cuda", 2**32) == "sort"


def test_make_running_topk_choices() -> None:
    cpu = torch.device("cpu")
    assert isinstance(make_running_topk(2, 3, cpu, 100), ThresholdTopK)
    assert isinstance(make_running_topk(2, 3, cpu, 100, "sort"), PackedTopK)
    if gpu_survivors.available():
        assert isinstance(make_running_topk(2, 3, cpu, 100, "pool"), PoolTopK)
    assert isinstance(make_running_topk(2, 3, cpu, 2**32), SortMergeTopK)
    with pytest.raises(RuntimeError):
        make_running_topk(2, 3, cpu, 2**32, "threshold")
    with pytest.raises(ValueError, match="unknown selection"):
        make_running_topk(2, 3, cpu, 100, "heap")


SCAN_CHECK = """
import torch
from tiny_knn.topk import SortMergeTopK, ThresholdTopK
generator = torch.Generator().manual_seed(3)
fast, reference = ThresholdTopK(40, 30, threads=1), SortMergeTopK(40, 30)
for number in range(12):
    tile = torch.randint(-4, 5, (40, 203), generator=generator).float()  # ties, and a ragged tail of 11 columns
    if number % 2:
        tile[tile == 0] = -0.0  # ties with +0.0 too
    for selector in (fast, reference):
        selector.add(tile, 0, number * 203)
for got, expected in zip(fast.result(), reference.result()):
    assert torch.equal(got, expected)
"""


@pytest.mark.parametrize("simd", ["default", "TINY_KNN_NO_AVX512", "TINY_KNN_NO_AVX2"])
def test_every_scan_path_of_the_kernel_selects_the_same(simd: str) -> None:
    # The kernel picks its widest scan at run time (AVX-512, AVX2, SSE2); the variables force narrower ones.
    environment = {name: value for name, value in os.environ.items() if not name.startswith("TINY_KNN_NO_AVX")}
    if simd != "default":
        environment[simd] = "1"
    done = subprocess.run([sys.executable, "-c", SCAN_CHECK], env=environment, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_packed_keys_order_by_score_then_doc_and_unpack_exactly() -> None:
    from tiny_knn.topk import _pack, _unpack

    special = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, -1.0])
    scores = torch.cat([special, torch.randn(2000), special]).unsqueeze(0)
    docs = torch.arange(scores.shape[1], dtype=torch.int64).unsqueeze(0) * 1_000_003 % 2**32
    keys = _pack(scores, docs)
    unpacked_scores, unpacked_docs = _unpack(keys)
    assert torch.equal(unpacked_docs, docs) and torch.equal(unpacked_scores, scores + 0.0)
    assert not unpacked_scores.signbit()[unpacked_scores == 0].any()
    expected = sorted(range(scores.shape[1]), key=lambda i: (-scores[0, i].item(), docs[0, i].item()))
    assert torch.argsort(keys[0]).tolist() == expected


def test_docs_scoring_minus_infinity_are_answers_not_placeholders() -> None:
    # Products that overflow give -inf; such docs still beat "no doc", in every selector.
    tile = torch.tensor([[1.0, float("-inf"), 2.0, float("-inf")], [float("-inf")] * 4])
    for selector in (ThresholdTopK(2, 4), SortMergeTopK(2, 4), PackedTopK(2, 4)):
        selector.add(tile[:, :2], 0, 0)
        selector.add(tile[:, 2:], 0, 2)
        scores, indices = selector.result()
        if isinstance(selector, ThresholdTopK):  # it cannot finish such rows: it says so, and they are redone
            assert selector.uncertain_rows().tolist() == [0, 1]
            continue
        assert indices.tolist() == [[2, 0, 1, 3], [0, 1, 2, 3]], type(selector).__name__
        assert scores[0].tolist() == [2.0, 1.0, float("-inf"), float("-inf")]
