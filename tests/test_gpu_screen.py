"""The GPU screen's kernels (gpu_screen.py), run by Triton's interpreter on CPU tensors, against the C kernels:
rows prepared as tk_prepare_rows prepares them (the same bfloat16 bits, factors never less generous), every pair
that may be among the k best surviving the screen, estimates within its bound (also a model of tensor cores'
truncating sums), and exact scores equal to tk_dot's and tk_l2's bit for bit.

Triton decides whether it interprets kernels when it is imported (TRITON_INTERPRET=1), and this process may
have imported it for the GPU, so each check runs in a process of its own that interprets (`interpreted`); that
process imports this module to find the check. What the interpreter cannot show (tensor cores' own rounding,
the GPU's handling of subnormals) waits for the GPU check."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch
from capabilities import needs_kernel, needs_triton
from hypothesis import given, settings
from hypothesis import strategies as st
from test_estimators import hard_rows as screen_rows
from test_exact import exact_tile, hard_rows, model_dot

from tiny_knn import gpu_screen
from tiny_knn.gpu_screen import PreparedRows, ScreenTiles, Survivors
from tiny_knn.kernel import KERNEL

pytestmark = [needs_triton, needs_kernel]
SMALL = ScreenTiles(rows=16, docs=32, dims=16)  # odd shapes below: every mask of the tiles is used


def _quiet_numpy() -> None:
    # The interpreter computes with numpy, which warns about the IEEE arithmetic of inf and NaN that the kernels
    # mean (inf * 0 for rows with infinite factors, for one).
    np.seterr(all="ignore")


@pytest.fixture(scope="module")
def interpreted() -> Iterator[Callable[..., None]]:
    """interpreted(check, *args): runs a check of this module in the interpreting process."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # the worker's environment, from its start
    try:
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_quiet_numpy)
        assert pool.submit(int, "7").result() == 7  # started now
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    with pool:
        yield lambda check, *args: pool.submit(check, *args).result()


# ---- 1. Rows prepared as tk_prepare_rows prepares them


def c_prepare(rows: torch.Tensor, query: bool) -> tuple[torch.Tensor, ...]:
    """tk_prepare_rows for a bfloat16 estimator and l2: the rows' bfloat16 values (as float32) and the factors."""
    assert KERNEL is not None
    count, dim = rows.shape
    rounded, first, second, third = torch.empty(count, dim), torch.empty(count), torch.empty(count), torch.empty(count)
    flags = 1 | 4 | (2 if query else 0)  # TK_BF16 | TK_L2 | TK_QUERY
    KERNEL.tk_prepare_rows(
        rows.data_ptr(), rows.stride(0), count, dim, flags, 8, None, rounded.data_ptr(), dim, first.data_ptr(),
        second.data_ptr(), third.data_ptr(),
    )  # fmt: skip
    return rounded, first, second, third


def hard_prepared_rows(dim: int) -> torch.Tensor:
    """Rows of values from 2^-140 to 2^100 (subnormals, overflowing squares), rows of one scale (norms around the
    2^60 limit), and rows holding NaN, inf, a value that rounds to inf, a subnormal, zeros."""
    generator = torch.Generator().manual_seed(dim)
    rows = torch.randn(64, dim, generator=generator)
    rows[:24] *= torch.exp2(torch.randint(-140, 100, (24, dim), generator=generator).float())
    rows[24:48] *= torch.exp2(torch.randint(-80, 66, (24, 1), generator=generator).float())
    rows[48:56] = rows[48:56].bfloat16().float()  # nothing to round: the residual is 0
    rows[56, 0], rows[57, 0], rows[58, 0], rows[59, 0], rows[60] = float("nan"), float("inf"), 3.4e38, 1e-39, 0.0
    rows[61] = 1e-39 * torch.sign(rows[61])  # every value subnormal: flushed, the whole row moved
    return rows


def check_prepared_rows(dim: int, dtype_name: str) -> None:
    rows = hard_prepared_rows(dim).to(getattr(torch, dtype_name))
    for query in (True, False):
        rounded, *factors = c_prepare(rows.float(), query)
        prepared = gpu_screen.prepare_rows(rows, query=query, l2=True, values=torch.bfloat16)
        assert prepared.third is not None
        ours_bits, c_bits = prepared.values.float().view(torch.int32), rounded.view(torch.int32)
        assert torch.equal(ours_bits, c_bits), f"bfloat16 bits differ at {torch.nonzero(ours_bits != c_bits)[:5]}"
        for name, ours, theirs, up in zip(
            ("first", "second", "third"),
            (prepared.first, prepared.second, prepared.third),
            factors,
            (1, 1, -1),
            strict=True,
        ):
            where = f"{name} factor, query={query}, dim {dim}, {dtype_name}"
            assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), where
            finite = torch.isfinite(theirs)
            ours, theirs = ours[finite].double(), theirs[finite].double()
            assert (up * ours >= up * theirs).all(), f"{where}: less generous than tk_prepare_rows's"
            # at most two float32 steps apart (the margins' one, and the rounding's)
            assert (up * (ours - theirs) <= theirs.abs() * 2**-22 + 2.0**-148).all(), f"{where}: not tight"


@pytest.mark.parametrize("dim", [1, 7, 16, 33, 100, 300])
def test_rows_round_as_tk_bf16_and_their_factors_are_tk_prepare_rows_or_more_generous(interpreted, dim) -> None:  # type: ignore[no-untyped-def]
    interpreted(check_prepared_rows, dim, "float32")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_rows_are_prepared_for_bfloat16_as_their_float32_values(interpreted, dtype) -> None:  # type: ignore[no-untyped-def]
    interpreted(check_prepared_rows, 40, dtype)


# ---- 2. The screen


def scores_and_thresholds(
    queries: torch.Tensor, docs: torch.Tensor, metric: str, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every exact score as the selection holds it (tk_dot, or -tk_l2), and each row's k-th best."""
    exact = exact_tile(queries, docs, squared=metric == "l2")
    scores = -exact if metric == "l2" else exact
    return scores, torch.sort(scores, dim=1, descending=True).values[:, k - 1].contiguous()


def needed_and_found(
    scores: torch.Tensor, thresholds: torch.Tensor, survivors: Survivors
) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """The pairs that may be among the k best (exact score at or above the threshold, or NaN) and the survivors,
    which must be distinct and all in the buffer."""
    found, overflowed = survivors.counts.tolist()
    assert overflowed == 0 and found <= survivors.pairs.shape[0], survivors.counts
    pairs = [tuple(pair) for pair in survivors.pairs[:found].tolist()]
    assert len(set(pairs)) == found, "a pair survived twice"
    needed = {tuple(pair) for pair in torch.nonzero(~(scores < thresholds[:, None])).tolist()}
    return needed, set(pairs)


def check_screen(metric: str, kind: str, k: int) -> None:
    generator = torch.Generator().manual_seed(k)
    queries, docs = screen_rows(kind, 21, 40, generator), screen_rows(kind, 150, 40, generator)
    queries[1, 3] = float("nan")  # every pair of its row survives
    scores, thresholds = scores_and_thresholds(queries, docs, metric, k)
    thresholds[2] = float("-inf")  # a row with no threshold yet: every pair survives
    l2 = metric == "l2"
    prepared = gpu_screen.prepare_rows(queries, query=True, l2=l2), gpu_screen.prepare_rows(docs, query=False, l2=l2)
    survivors = Survivors.empty(21 * 150, "cpu")
    gpu_screen.screen(*prepared, thresholds, survivors, metric=metric, tiles=SMALL)
    needed, found = needed_and_found(scores, thresholds, survivors)
    assert needed <= found, f"{metric} {kind} k={k}: missed {sorted(needed - found)[:5]}"
    assert {(row, doc) for row in (1, 2) for doc in range(150)} <= found


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("kind", ["normal", "tied", "near", "scaled", "huge", "offset"])
def test_every_pair_that_may_be_in_the_top_k_survives(interpreted, metric, kind) -> None:  # type: ignore[no-untyped-def]
    for k in (1, 9):
        interpreted(check_screen, metric, kind, k)


def check_edge_of_the_bound(metric: str, kind: str) -> None:
    """Estimates at the lowest the bound allows (it holds around tk_dot and the true q.d alike): the screen still
    keeps every pair it must; three times lower, it must not (so the estimates reach the comparison)."""
    generator = torch.Generator().manual_seed(3)
    queries, docs = screen_rows(kind, 19, 24, generator), screen_rows(kind, 70, 24, generator)
    scores, thresholds = scores_and_thresholds(queries, docs, metric, 5)
    l2 = metric == "l2"
    prepared = gpu_screen.prepare_rows(queries, query=True, l2=l2), gpu_screen.prepare_rows(docs, query=False, l2=l2)
    slack = gpu_screen.slack(*prepared)
    exact, true = exact_tile(queries, docs).double(), queries.double() @ docs.double().T
    for share, kept in ((1, True), (3, False)):
        lowest = (torch.maximum(exact, true) - share * slack).float()
        lowest = torch.where(
            lowest.double() < torch.maximum(exact, true) - share * slack, lowest.nextafter(torch.tensor(np.inf)), lowest
        )
        survivors = Survivors.empty(19 * 70, "cpu")
        gpu_screen.screen(*prepared, thresholds, survivors, metric=metric, tiles=SMALL, estimates=lowest)
        needed, found = needed_and_found(scores, thresholds, survivors)
        assert (needed <= found) == kept, f"{metric} {kind}, estimates {share} slack low: kept {len(found)}"


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("kind", ["normal", "tied", "scaled", "offset"])
def test_estimates_anywhere_within_the_bound_keep_every_pair_it_must(interpreted, metric, kind) -> None:  # type: ignore[no-untyped-def]
    interpreted(check_edge_of_the_bound, metric, kind)


def check_few_survivors() -> None:
    generator = torch.Generator().manual_seed(0)
    queries, docs = torch.randn(32, 64, generator=generator), torch.randn(1024, 64, generator=generator)
    queries /= queries.norm(dim=1, keepdim=True)
    docs /= docs.norm(dim=1, keepdim=True)
    prepared = (
        gpu_screen.prepare_rows(queries, query=True, l2=False),
        gpu_screen.prepare_rows(docs, query=False, l2=False),
    )
    for k in (10, 100):
        scores, thresholds = scores_and_thresholds(queries, docs, "ip", k)
        survivors = Survivors.empty(32 * 1024, "cpu")
        gpu_screen.screen(*prepared, thresholds, survivors, metric="ip", tiles=ScreenTiles(32, 64, 32))
        needed, found = needed_and_found(scores, thresholds, survivors)
        assert needed <= found and len(found) <= 1.25 * len(needed), (k, len(found), len(needed))


def test_survivors_are_few_at_the_true_kth_score(interpreted) -> None:  # type: ignore[no-untyped-def]
    """Unit rows at dim 64, thresholds at each row's k-th best exact score: a few pairs more than the k best
    (about 7% at k = 10) are scored exactly, of 1024 a row."""
    interpreted(check_few_survivors)


def check_overflow() -> None:
    generator = torch.Generator().manual_seed(1)
    queries, docs = torch.randn(20, 16, generator=generator), torch.randn(300, 16, generator=generator)
    scores, thresholds = scores_and_thresholds(queries, docs, "ip", 10)
    prepared = (
        gpu_screen.prepare_rows(queries, query=True, l2=False),
        gpu_screen.prepare_rows(docs, query=False, l2=False),
    )
    survivors = Survivors.empty(4000, "cpu")
    gpu_screen.screen(*prepared, thresholds, survivors, metric="ip", tiles=SMALL)
    _, everything = needed_and_found(scores, thresholds, survivors)
    small = Survivors.empty(50, "cpu")
    gpu_screen.screen(*prepared, thresholds, small, metric="ip", tiles=SMALL)
    assert small.counts.tolist() == [len(everything), 1]  # every survivor counted; the flag set
    pairs = {tuple(pair) for pair in small.pairs.tolist()}
    assert len(pairs) == 50 and pairs <= everything
    redone = Survivors.empty(len(everything), "cpu")  # what a caller does: redoes the block, with room for all
    gpu_screen.screen(*prepared, thresholds, redone, metric="ip", tiles=SMALL)
    assert needed_and_found(scores, thresholds, redone)[1] == everything


def test_a_full_buffer_counts_every_survivor_and_flags_the_overflow(interpreted) -> None:  # type: ignore[no-untyped-def]
    interpreted(check_overflow)


# ---- The bound: estimates of the interpreter and of a model of tensor cores


def tensor_core_products(queries: np.ndarray, docs: np.ndarray, block: int) -> np.ndarray:
    """Fasi et al.'s model of a tensor core's bfloat16 product with float32 sums (see gpu_screen's note): exact
    products; each block of them and the accumulator aligned to the largest, truncated to 24 bits below its
    leading bit, summed, and the sum truncated to 24 bits (subnormal results flushed). Exact in float64."""
    acc = np.zeros((queries.shape[0], docs.shape[0]))
    for start in range(0, queries.shape[1], block):
        products = queries[:, None, start : start + block] * docs[None, :, start : start + block]
        terms = np.concatenate([acc[:, :, None], products], axis=2)
        unit = np.ldexp(1.0, np.frexp(np.abs(terms).max(axis=2))[1] - 24)[:, :, None]
        total = (np.trunc(terms / unit) * unit).sum(axis=2)
        unit = np.ldexp(1.0, np.frexp(total)[1] - 24)
        acc = np.trunc(total / unit) * unit
        acc[np.abs(acc) < 2.0**-126] = 0.0
    return acc


def check_bound(kind: str) -> None:
    generator = torch.Generator().manual_seed(5)
    if kind == "truncated":  # 1, then products of 1.9 2^-24 that a truncating sum loses, where IEEE's rounds up
        queries = torch.full((1, 256), 1.375 * 2.0**-12)
        queries[0, 0] = 1.0
        docs = queries
    else:
        queries, docs = screen_rows(kind, 16, 96, generator), screen_rows(kind, 64, 96, generator)
    prepared = (
        gpu_screen.prepare_rows(queries, query=True, l2=False),
        gpu_screen.prepare_rows(docs, query=False, l2=False),
    )
    slack, exact = gpu_screen.slack(*prepared), exact_tile(queries, docs).double()
    interpreted_estimates = gpu_screen.estimate_tile(*prepared, tiles=SMALL).double()
    assert ((interpreted_estimates - exact).abs() <= slack).all(), kind
    query_rows, doc_rows = prepared
    cpu_slack = query_rows.first.double()[:, None] * doc_rows.first.double()[None, :]
    cpu_slack += query_rows.second.double()[:, None] * doc_rows.second.double()[None, :]
    values = [rows.values.double().numpy() for rows in prepared]
    for block in (4, 8, 16):
        error = np.abs(tensor_core_products(*values, block) - exact.numpy())
        ratio = error / slack.numpy()
        assert ratio.max() <= 1.0, f"{kind}, blocks of {block}: {ratio.max():.3f} of the bound"
        if kind == "truncated":  # nearly the CPU's whole slack: why the GPU's gamma is twice the CPU's
            assert (error / cpu_slack.numpy()).max() > 0.9, (error / cpu_slack.numpy()).max()


@pytest.mark.parametrize("kind", ["normal", "near", "scaled", "offset", "truncated"])
def test_estimates_stay_within_the_bound_also_for_truncating_tensor_cores(interpreted, kind) -> None:  # type: ignore[no-untyped-def]
    interpreted(check_bound, kind)


# ---- The float16 screen: float16 docs as they are, query rows scaled by a power of two and rounded to float16

HALF_SMALLEST_NORMAL, HALF_SCALED_LARGEST = 2.0**-14, 2.0**15


def half_docs(kind: str, count: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """float16 docs where the float16 screen's bound is thinnest or its arithmetic nearest its limits:
    - normal: Gaussian values;
    - wide: values from 2^-26 to 2^15 in one row: float16's subnormals (flushed, counted in r_d) beside values near
      its largest (products near 2^31);
    - largest: every value within 10% of 65504, float16's largest;
    - subnormal: every value a subnormal (the whole row flushed: r_d = |d|);
    - cancel: rows (x, -x + x 2^-9 t): their products with (y, y) cancel to far below their size."""
    rows = torch.randn(count, dim, generator=generator)
    if kind == "wide":
        rows *= torch.exp2(torch.randint(-26, 15, (count, dim), generator=generator).float())
    elif kind == "largest":
        rows = torch.sign(rows) * (65504 - 6000 * torch.rand(count, dim, generator=generator))
    elif kind == "subnormal":
        rows = torch.sign(rows) * torch.randint(1, 1024, (count, dim), generator=generator) * 2.0**-24
    elif kind == "cancel":
        half = dim // 2
        rows[:, half : 2 * half] = -rows[:, :half] * (1 + 2.0**-9 * torch.randn(count, half, generator=generator))
    return rows.clamp(-65504, 65504).half()


def half_queries(kind: str, count: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """float32 query rows for the float16 screen: Gaussian rows; rows of values from 2^-140 to 2^100 (most flushed
    against the row's largest; norms past 2^60); rows of one scale from float32's subnormals (the scale's limit,
    s = 126) to 2^59 (s = -45); rows whose largest value rounds up to 2^15 once scaled (1.99999988 2^e); and for
    `cancel`, rows (y, y)."""
    rows = torch.randn(count, dim, generator=generator)
    rows[:4] *= torch.exp2(torch.randint(-140, 100, (4, dim), generator=generator).float())
    rows[4:6] = rows[4:6] * 2.0**-135
    rows[6:8] *= torch.exp2(torch.tensor([[56.0], [-100.0]]))
    rows[8, 0], rows[9, 3] = (2 - 2.0**-23) * 2.0**20, -(2 - 2.0**-23) * 2.0**-3
    if kind == "cancel":
        half = dim // 2
        rows[10:, half : 2 * half] = rows[10:, :half]
    return rows


def scaled_half_reference(rows: torch.Tensor, query: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What the float16 screen should read for these rows (float64, not Triton): the float16 values (queries times
    2^s, s = min(14 - e, 126), rounded to nearest even, subnormals flushed) and 2^-s (1 for docs)."""
    wide = rows.double()
    if query:
        exponent = torch.frexp(wide.abs().amax(dim=1)).exponent - 1  # e: 2^e <= largest < 2^(e+1)
        power = torch.clamp(14 - exponent, max=126).double()[:, None]
    else:
        power = torch.zeros(rows.shape[0], 1, dtype=torch.float64)
    values = (wide * torch.exp2(power)).half()
    values = torch.where(values.abs() < HALF_SMALLEST_NORMAL, values * 0, values)  # -0.0 stays -0.0
    return values, torch.exp2(-power[:, 0])


def check_half_prepared_rows(dim: int, kind: str) -> None:
    generator = torch.Generator().manual_seed(dim)
    for query, rows in ((True, half_queries(kind, 24, dim, generator)), (False, half_docs(kind, 24, dim, generator))):
        prepared = gpu_screen.prepare_rows(rows, query=query, l2=True, values=torch.float16)
        assert prepared.values.dtype == torch.float16 and prepared.third is not None
        values, unscale = scaled_half_reference(rows, query)
        finite = torch.isfinite(rows).all(dim=1) & (rows.double().norm(dim=1) < 2.0**59)
        assert torch.equal(prepared.values[finite].view(torch.int16), values[finite].view(torch.int16)), (query, kind)
        magnitudes = prepared.values[finite].double().abs()
        assert ((magnitudes == 0) | (magnitudes >= HALF_SMALLEST_NORMAL)).all(), "a float16 subnormal was kept"
        assert (magnitudes <= HALF_SCALED_LARGEST if query else magnitudes <= 65504).all()
        if query:
            assert prepared.unscale is not None and torch.equal(prepared.unscale.double(), unscale)
        else:
            assert prepared.unscale is None
            normal = rows.double().abs() >= HALF_SMALLEST_NORMAL  # kept bit for bit
            assert torch.equal(prepared.values.view(torch.int16)[normal], rows.view(torch.int16)[normal])
        # the factors, against float64: never less than the bound's, at most a few float32 steps more
        read = values.double() * unscale[:, None]
        size = torch.maximum(rows.double().norm(dim=1), read.norm(dim=1)).clamp(min=2.0**-40)
        moved = (read - rows.double()).norm(dim=1)
        gamma = 2 * (dim + 8) * 2.0**-24
        expected = (torch.clamp(moved + gamma * size, min=gamma * 2.0**-61), size) if query else (size, moved)
        screened = finite & (size < 2.0**60)
        for name, ours, theirs in zip(("first", "second"), (prepared.first, prepared.second), expected, strict=True):
            ours = ours.double()
            assert torch.isinf(ours[~torch.isfinite(rows).all(dim=1)]).all(), (name, query)
            assert (ours[screened] >= theirs[screened]).all(), f"{name}, query={query}, {kind}: below the bound"
            assert (ours[screened] <= theirs[screened] * (1 + 2.0**-20) + 2.0**-140).all(), f"{name}: not tight"


@pytest.mark.parametrize("kind", ["normal", "wide", "largest", "subnormal", "cancel"])
def test_half_rows_keep_float16_values_and_scale_queries_by_a_power_of_two(interpreted, kind) -> None:  # type: ignore[no-untyped-def]
    """Docs' float16 values are kept (subnormals flushed, counted in r_d); query rows are scaled so their largest
    value lies in [2^14, 2^15], rounded to float16 and flushed; the factors are the bound's, from those values."""
    for dim in (7, 40, 130):
        interpreted(check_half_prepared_rows, dim, kind)


def half_tensor_core_estimates(queries: PreparedRows, docs: PreparedRows, block: int) -> np.ndarray:
    """The float16 screen's estimates by Fasi et al.'s model of tensor cores (tensor_core_products) on the scaled
    float16 values, times 2^-s in float32 (rounded to nearest, flushed below 2^-126)."""
    assert queries.unscale is not None
    values = [rows.values.double().numpy() for rows in (queries, docs)]
    scaled = tensor_core_products(*values, block) * queries.unscale.double().numpy()[:, None]
    estimates = scaled.astype(np.float32).astype(np.float64)
    return np.where(np.abs(estimates) < 2.0**-126, 0.0, estimates)


def check_half_bound(kind: str) -> float:
    """Estimates of the interpreter (exact products, IEEE float32 sums) and of the tensor cores' model against
    tk_dot and the exact q.d (float64): within the slack. Returns the worst ratio seen."""
    generator = torch.Generator().manual_seed(11)
    queries, docs = half_queries(kind, 20, 96, generator), half_docs(kind, 48, 96, generator)
    prepared = (
        gpu_screen.prepare_rows(queries, query=True, l2=False, values=torch.float16),
        gpu_screen.prepare_rows(docs, query=False, l2=False),
    )
    assert prepared[1].values.dtype == torch.float16
    slack = gpu_screen.slack(*prepared)
    exact, true = exact_tile(queries, docs.float()).double(), queries.double() @ docs.double().T
    screened = torch.isfinite(slack)
    assert screened.sum() >= 0.6 * slack.numel()  # most pairs are screened: the rest are rows scored exactly
    worst = 0.0
    estimates = {"interpreted": gpu_screen.estimate_tile(*prepared, tiles=SMALL).double()}
    for block in (4, 8, 16):
        estimates[f"blocks of {block}"] = torch.from_numpy(half_tensor_core_estimates(*prepared, block))
    for name, estimate in estimates.items():
        assert torch.isfinite(estimate[screened]).all(), f"{kind}, {name}: an estimate overflowed"
        error = torch.maximum((estimate - exact).abs(), (estimate - true).abs())[screened]
        ratio = float((error / slack[screened]).max())
        assert ratio <= 1.0, f"{kind}, {name}: {ratio:.3f} of the bound"
        worst = max(worst, ratio)
    return worst


@pytest.mark.parametrize("kind", ["normal", "wide", "largest", "subnormal", "cancel"])
def test_float16_estimates_stay_within_their_bound(interpreted, kind) -> None:  # type: ignore[no-untyped-def]
    """Large and small magnitudes, values near float16's largest, subnormals, cancellation: the float16 screen's
    estimates (interpreted, and by the tensor cores' model) are within the slack of tk_dot and of q.d."""
    assert 0 < interpreted(check_half_bound, kind) <= 1


def check_half_screen(metric: str, kind: str, k: int) -> None:
    generator = torch.Generator().manual_seed(k)
    queries, docs = half_queries(kind, 21, 40, generator), half_docs(kind, 150, 40, generator)
    scores, thresholds = scores_and_thresholds(queries, docs.float(), metric, k)
    l2 = metric == "l2"
    prepared = (
        gpu_screen.prepare_rows(queries, query=True, l2=l2, values=torch.float16),
        gpu_screen.prepare_rows(docs, query=False, l2=l2),
    )
    survivors = Survivors.empty(21 * 150, "cpu")
    gpu_screen.screen(*prepared, thresholds, survivors, metric=metric, tiles=SMALL)
    needed, found = needed_and_found(scores, thresholds, survivors)
    assert needed <= found, f"{metric} {kind} k={k}: missed {sorted(needed - found)[:5]}"
    normal = [row for row in range(10, 21) if torch.isfinite(thresholds[row])]
    kept = sum(1 for row, _ in found if row in normal)
    assert kind == "subnormal" or kept < 0.5 * 150 * len(normal), f"{metric} {kind}: the screen kept {kept}"


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("kind", ["normal", "wide", "largest", "cancel"])
def test_the_float16_screen_keeps_every_pair_that_may_be_in_the_top_k(interpreted, metric, kind) -> None:  # type: ignore[no-untyped-def]
    for k in (1, 9):
        interpreted(check_half_screen, metric, kind, k)


def check_half_slack_against_bfloat16(dim: int) -> tuple[float, float]:
    """The same data screened both ways: float16 docs as they are (r_d = 0: nothing rounded) and their float32
    widening in bfloat16 (both sides rounded). Returns the median and largest ratio of the slacks, float16's to
    bfloat16's."""
    generator = torch.Generator().manual_seed(dim)
    queries = torch.nn.functional.normalize(torch.randn(24, dim, generator=generator), dim=1)
    docs = torch.randn(64, dim, generator=generator)
    docs = torch.where(docs.abs() < 2.0**-10, 2.0**-10, docs).half()  # no subnormals: nothing to flush
    half = (
        gpu_screen.prepare_rows(queries, query=True, l2=False, values=torch.float16),
        gpu_screen.prepare_rows(docs, query=False, l2=False),
    )
    assert half[1].values.dtype == torch.float16 and torch.equal(half[1].values.view(torch.int16),
                                                                 docs.view(torch.int16))  # fmt: skip
    assert (half[1].second == 0).all(), "float16 docs moved: their residual is not 0"
    bfloat16 = (
        gpu_screen.prepare_rows(queries, query=True, l2=False),
        gpu_screen.prepare_rows(docs.float(), query=False, l2=False),
    )
    assert bfloat16[1].values.dtype == torch.bfloat16 and (bfloat16[1].second > 0).all()
    ratio = gpu_screen.slack(*half) / gpu_screen.slack(*bfloat16)
    return float(ratio.median()), float(ratio.max())


@pytest.mark.parametrize("dim", [40, 768])
def test_float16_docs_have_no_residual_and_a_smaller_slack_than_bfloat16s(interpreted, dim) -> None:  # type: ignore[no-untyped-def]
    """Unit Gaussian queries, Gaussian float16 docs: the float16 screen's slack is a tenth to a fifteenth of the
    bfloat16 screen's on the same data (measured: a median of 0.066 and at most 0.100 at dim 40; 0.111 and 0.118
    at dim 768, where the sums' share, 3 gamma, grows), as the queries' rounding (2^-12 relative, not 2^-9) and the
    sums are all that is left of it."""
    median, largest = interpreted(check_half_slack_against_bfloat16, dim)
    assert largest < 0.15 and median < 0.12, (median, largest)


def test_the_screens_variant_is_chosen_by_the_docs_dtype() -> None:
    assert gpu_screen.screen_values_dtype(torch.float16) == torch.float16
    assert gpu_screen.screen_values_dtype(torch.float32) == torch.bfloat16
    assert gpu_screen.screen_values_dtype(torch.bfloat16) == torch.bfloat16


# ---- 3. Exact re-scores


def check_rescore(dim: int, seed: int, exponents: int) -> None:
    queries, docs = hard_rows(3, dim, seed, exponents), hard_rows(5, dim, seed + 1, exponents)
    order = torch.randperm(15, generator=torch.Generator().manual_seed(seed))
    pairs = torch.tensor([(r, c) for r in range(3) for c in range(5)], dtype=torch.int32)[order].contiguous()
    for metric in ("ip", "l2"):
        scores = gpu_screen.rescore(queries, docs, pairs, metric=metric, block_pairs=8)
        for form in (0, -1):  # portable C, and this CPU's widest (the same bits)
            expected = exact_tile(queries, docs, form, squared=metric == "l2")[pairs[:, 0].long(), pairs[:, 1].long()]
            nan = torch.isnan(expected)
            assert torch.equal(torch.isnan(scores), nan), (metric, dim)
            assert torch.equal(scores[~nan].view(torch.int32), expected[~nan].view(torch.int32)), (metric, form, dim)


def test_rescores_are_tk_dot_and_tk_l2_bit_for_bit_at_every_tail_of_64(interpreted) -> None:  # type: ignore[no-untyped-def]
    for dim in [*range(1, 65), 65, 100, 127, 128, 129, 191, 200, 255, 256, 300]:
        interpreted(check_rescore, dim, dim, 140)  # scales down to subnormal products and sums, and overflow
        interpreted(check_rescore, dim, dim, 3)  # scales alike: every lane and step of the tree counts


@settings(max_examples=25, deadline=None)
@given(dim=st.integers(1, 300), seed=st.integers(0, 2**16), exponents=st.integers(0, 140))
def test_rescores_of_hard_rows_are_tk_dot_and_tk_l2_bit_for_bit(interpreted, dim, seed, exponents) -> None:  # type: ignore[no-untyped-def]
    interpreted(check_rescore, dim, seed, exponents)


def check_rescore_model() -> None:
    for dim in (1, 17, 70, 130):
        queries, docs = hard_rows(2, dim, dim, 60), hard_rows(2, dim, dim + 9, 60)
        pairs = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=torch.int32)
        scores = gpu_screen.rescore(queries, docs, pairs, metric="ip")
        for (row, doc), score in zip(pairs.tolist(), scores.numpy(), strict=True):
            expected = model_dot(queries[row].numpy(), docs[doc].numpy())
            assert score.view(np.uint32) == np.array(expected).view(np.uint32), (dim, row, doc)
    # Products that round to -0.0 in every lane: -0.0, as AVX-512 and portable C give (AVX2's fma on its masked
    # lanes gives +0.0 here, the model +0.0 always)
    tiny = torch.full((1, 70), 2.0**-100)
    score = gpu_screen.rescore(-tiny, tiny, torch.zeros((1, 2), dtype=torch.int32), metric="ip")
    assert score.item() == 0 and score.signbit().item()
    assert exact_tile(-tiny, tiny, 0).signbit().item()


def test_rescores_are_the_exactly_rounded_model_of_tk_dot(interpreted) -> None:  # type: ignore[no-untyped-def]
    interpreted(check_rescore_model)


# ---- Without the interpreter


def test_nothing_runs_where_triton_is_switched_off(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TINY_KNN_NO_TRITON", "1")
    assert not gpu_screen.available()


def test_operands_that_do_not_fit_are_refused_before_any_kernel_runs() -> None:
    def rows(count: int, dim: int, query: bool, l2: bool = False) -> PreparedRows:
        values = torch.zeros((count, dim), dtype=torch.bfloat16)
        return PreparedRows(values, torch.ones(count), torch.ones(count), torch.ones(count) if l2 else None, query)

    survivors = Survivors.empty(4, "cpu")
    thresholds = torch.zeros(3)
    with pytest.raises(ValueError, match=r"queries \(query=True\), then docs"):
        gpu_screen.screen(rows(3, 8, False), rows(5, 8, False), thresholds, survivors, metric="ip")
    with pytest.raises(ValueError, match="must share dim"):
        gpu_screen.screen(rows(3, 8, True), rows(5, 9, False), thresholds, survivors, metric="ip")
    with pytest.raises(ValueError, match="l2 needs rows prepared with l2=True"):
        gpu_screen.screen(rows(3, 8, True), rows(5, 8, False), thresholds, survivors, metric="l2")
    with pytest.raises(ValueError, match="thresholds must be 3 contiguous float32"):
        gpu_screen.screen(rows(3, 8, True), rows(5, 8, False), torch.zeros(4), survivors, metric="ip")
    with pytest.raises(ValueError, match="unknown metric 'dot'"):
        gpu_screen.screen(rows(3, 8, True), rows(5, 8, False), thresholds, survivors, metric="dot")
    with pytest.raises(ValueError, match="rows must be a 2-D"):
        gpu_screen.prepare_rows(torch.zeros(4, 6, dtype=torch.float64), query=True, l2=False)
    with pytest.raises(ValueError, match="contiguous rows"):
        gpu_screen.prepare_rows(torch.zeros(6, 4).T, query=True, l2=False)
    with pytest.raises(ValueError, match="pairs must be a contiguous int32"):
        gpu_screen.rescore(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros((2, 2), dtype=torch.int64), metric="ip")
    with pytest.raises(ValueError, match="at least one pair"):
        Survivors.empty(0, "cpu")
    half = PreparedRows(torch.zeros((5, 8), dtype=torch.float16), torch.ones(5), torch.ones(5), None, False)
    with pytest.raises(ValueError, match=r"prepare the queries with values=docs\.values\.dtype"):
        gpu_screen.screen(rows(3, 8, True), half, thresholds, survivors, metric="ip")
    unscaled = PreparedRows(torch.zeros((3, 8), dtype=torch.float16), torch.ones(3), torch.ones(3), None, True)
    with pytest.raises(ValueError, match="float16 queries, and only they, carry their scales"):
        gpu_screen.screen(unscaled, half, thresholds, survivors, metric="ip")
    with pytest.raises(ValueError, match="float16 values are for float16 docs"):
        gpu_screen.prepare_rows(torch.zeros(4, 6), query=False, l2=False, values=torch.float16)
    with pytest.raises(ValueError, match=r"bfloat16 or float16, not torch\.float32"):
        gpu_screen.prepare_rows(torch.zeros(4, 6), query=True, l2=False, values=torch.float32)
