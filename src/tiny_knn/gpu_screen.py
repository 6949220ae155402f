"""The screen on the GPU (issue #20, items 1 to 3): `_kernels/screen.c`'s design in Triton, for tensor cores.
Rows are prepared (bfloat16 values and the bound's factors: `prepare_rows`); every (query, doc) pair is
estimated by a bfloat16 matmul whose epilogue keeps only the pairs the bound cannot rule out (`screen`, into a
bounded `Survivors` buffer); those pairs are scored exactly, in tk_dot's or tk_l2's order, so that a GPU score
is the CPU's bit for bit (`rescore`). Selecting the k best of them is the caller's.

The bound on the GPU. screen.c's factors bound |estimate - tk_dot(q, d)| by a_q n_d + b_q r_d for float32 sums
rounded as IEEE rounds, with gamma = 2 (dim + 8) 2^-24 covering both the estimate's sums and tk_dot's. Tensor
cores do not round as IEEE does, and NVIDIA documents neither their order nor their rounding. Fasi, Higham,
Mikaitis and Pranesh ("Numerical behavior of NVIDIA tensor cores", PeerJ Computer Science 7:e330, 2021)
measured products of 16-bit inputs exact, and each block of products added to the accumulator aligned to the
largest of them, truncated, and normalised (truncated) once: with blocks of 4 products or more, at most
(2.5 dim + 2) 2^-24 |q~| |d~| from q~.d~, where IEEE's sums err by dim 2^-24 at most. The screen takes gamma
twice the CPU's: it adds gamma b_q n_d (>= gamma |q| |d|) to the CPU's slack, three times IEEE's worst case for
the estimate's sums (tests/test_gpu_screen.py checks that model; on a GPU, estimate_tile against slack measures
the hardware). Products and sums that tensor cores may flush to zero are covered by a_q's floor, as on the CPU.

float16 docs are screened as they are (issue #20, item 1): their values are not rounded to bfloat16, the queries
are rounded to float16 with a power-of-two scale a row, and the products are float16's, exact on tensor cores; their
slack is the accumulation's and the queries' rounding only (see _prepare_kernel). screen_values_dtype chooses.

Optional: without Triton, or with TINY_KNN_NO_TRITON set, `available()` is False. Under TRITON_INTERPRET=1 the
kernels run on CPU tensors (the tests do so); there the 16-bit values are widened to float32 before tl.dot, whose
interpreted form multiplies bfloat16's storage as integers (and is not trusted with float16's either).
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import gpu_survivors

if TYPE_CHECKING:  # the kernels' `tl`, bound when they are built (_kernels): Triton is optional
    import triton.language as tl

METRICS = ("ip", "cosine", "l2")
MAX_DIM = 2**22  # the epilogue's margins (see screen) need gamma well below 1: here it is at most about 1/2


def available() -> bool:
    """Whether these kernels can run: Triton importable and not switched off (TINY_KNN_NO_TRITON), as for the
    selection's kernel (gpu_survivors.available)."""
    return gpu_survivors.available()


def interpreted() -> bool:
    """Whether Triton interprets these kernels in this process (TRITON_INTERPRET=1 when Triton was imported): they
    then run on CPU tensors. Imports Triton."""
    return bool(_kernels()[1].interpreted)


@dataclass(frozen=True)
class PreparedRows:
    """Rows as the screen takes them (tk_prepare_rows's outputs for a bfloat16 estimator, or their float16 form):
    - values: the rows in bfloat16, (rows, dim), as tk_bf16 rounds: to nearest even, NaN kept, subnormals flushed;
      or in float16 (screen_values_dtype): docs as they are, query rows times 2^s_q rounded to nearest even, and
      float16's subnormals flushed in both;
    - first, second: for queries a_q and b_q, for docs n_d and r_d (float32, rounded up; infinite for rows whose
      norm is 2^60 or more, or not finite, so that all their pairs survive);
    - third (l2 only): |q|^2 for queries, |d|^2 / 2 for docs (float32, rounded down; 0 for those rows);
    - unscale (float16 queries only): 2^-s_q a row (float32), what a row's products are multiplied by."""

    values: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor
    third: torch.Tensor | None
    query: bool
    unscale: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> PreparedRows:
        """Rows start..stop of these (views, no copy)."""
        third = None if self.third is None else self.third[start:stop]
        unscale = None if self.unscale is None else self.unscale[start:stop]
        return PreparedRows(
            self.values[start:stop], self.first[start:stop], self.second[start:stop], third, self.query, unscale
        )


@dataclass(frozen=True)
class Survivors:
    """A bounded buffer of surviving pairs: pairs[i] = (query row, doc) for i < min(found, capacity), in no
    particular order; counts = (found, overflowed), int64. `found` counts every survivor, those that did not fit
    too; `overflowed` is 1 once a screen found more than the buffer holds: the caller then clears the buffer and
    redoes the block (with a larger buffer, or higher thresholds)."""

    pairs: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def empty(cls, capacity: int, device: torch.device | str) -> Survivors:
        """A cleared buffer for `capacity` pairs on `device`."""
        if capacity < 1:
            raise ValueError(f"a survivor buffer needs room for at least one pair, not {capacity}")
        pairs = torch.empty((capacity, 2), dtype=torch.int32, device=device)
        return cls(pairs, torch.zeros(2, dtype=torch.int64, device=device))

    def clear(self) -> None:
        """Forgets every pair (on the device: no synchronisation)."""
        self.counts.zero_()


@dataclass(frozen=True)
class ScreenTiles:
    """The screen's tiling, (query rows, docs, dims) per tl.dot step (16 or more each on a GPU), and Triton's
    launch options."""

    rows: int = 128
    docs: int = 128
    dims: int = 64
    warps: int = 8
    stages: int = 3


def screen_values_dtype(dtype: torch.dtype) -> torch.dtype:
    """The screen's variant for docs of `dtype`, chosen here only: float16 docs are screened in float16, as they
    are (nothing to round, products exact on tensor cores: the smaller slack); float32 and bfloat16 docs in
    bfloat16 (bfloat16's are as they are too; float32's have no exact 16-bit form, and bfloat16 never overflows).
    The queries follow their docs: prepare_rows(queries, values=docs.values.dtype)."""
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


def prepare_rows(
    rows: torch.Tensor,
    *,
    query: bool,
    l2: bool,
    values: torch.dtype | None = None,
    block_rows: int = 16,
    block_dims: int = 128,
) -> PreparedRows:
    """Prepares rows (float32, float16 or bfloat16; each contiguous) for the screen, on their device, with 16-bit
    values of dtype `values` (by default screen_values_dtype(rows.dtype)).

    bfloat16: what tk_prepare_rows computes with TK_BF16 (TK_QUERY for queries, TK_L2 for l2). The bfloat16 values
    are tk_bf16's bit for bit. The factors are tk_prepare_rows's, or a float32 step or two more generous (never
    less): the sums of squares are added in another order here, so they carry a margin of (dim + 8) 2^-50.
    float16 (docs that are float16; queries of any dtype, scaled by a power of two a row: `unscale`): the same
    factors, from the values of _prepare_kernel.

    Raises:
        ValueError: rows that are not a 2-D float tensor with contiguous rows; float16 values for docs that are
            not float16 (they would be rounded, and could overflow); values neither bfloat16 nor float16.
    """
    _check_rows(rows, "rows", (torch.float32, torch.float16, torch.bfloat16))
    values = screen_values_dtype(rows.dtype) if values is None else values
    if values not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the screen's values are bfloat16 or float16, not {values}")
    if values == torch.float16 and not query and rows.dtype != torch.float16:
        raise ValueError(f"float16 values are for float16 docs (kept as they are), not {rows.dtype} docs")
    count, dim = rows.shape
    device = rows.device
    out = torch.empty((count, dim), dtype=values, device=device)
    first, second = torch.empty(count, device=device), torch.empty(count, device=device)
    third = torch.empty(count, device=device) if l2 else None
    unscale = torch.empty(count, device=device) if values == torch.float16 and query else None
    if count:
        triton, kernels = _kernels()
        widened = rows.dtype == torch.bfloat16  # as bits (BF16_BITS)
        grid = (triton.cdiv(count, block_rows),)
        factors = (first, second, first if third is None else third)
        kernels.prepare[grid](
            rows.view(torch.int16) if widened else rows, rows.stride(0), count, dim, _gamma(dim),
            out.view(torch.int16), out.stride(0), first if unscale is None else unscale, *factors,
            QUERY=query, L2=l2, BF16_BITS=widened, F16=values == torch.float16, BLOCK_R=block_rows,
            BLOCK_D=block_dims,
        )  # fmt: skip
    return PreparedRows(out, first, second, third, query, unscale)


def screen(
    queries: PreparedRows,
    docs: PreparedRows,
    thresholds: torch.Tensor,
    survivors: Survivors,
    *,
    metric: str,
    tiles: ScreenTiles | None = None,
    estimates: torch.Tensor | None = None,
) -> None:
    """Appends to `survivors` every (query row, doc) pair whose exact score may reach its row's threshold
    (thresholds: float32, one per query row): at least every pair with tk_dot(q, d) >= thresholds[row] for ip
    and cosine, or -tk_l2(q, d) >= thresholds[row] for l2; every pair of a row whose threshold is -inf, or of
    rows with infinite factors; every pair whose estimate is NaN. Asynchronous: nothing is read back.

    Each estimate (tl.dot of the bfloat16 values, float32 sums) is compared in the matmul's epilogue and never
    stored: the pair is kept unless estimate + a'_q n_d + b'_q r_d (- h'_d for l2) < K'_q, where K'_q is the
    threshold (for l2, screen.c's key bound from it and |q|^2) and a'_q, b'_q, h'_d, K'_q are the factors moved
    outward by 2^-19 of their size (a'_q also by gamma b_q: the tensor cores', see the module's note) and
    2^-120 (K'_q), rounded outward. That margin exceeds what the epilogue's five float32 roundings can lose,
    subnormals flushed or not, for dims up to MAX_DIM: so the screen keeps every pair that the bound keeps.

    `estimates` (for tests): screens this (query rows, docs) tile of estimates instead of computing them.

    Raises:
        ValueError: operands that do not fit together (dims, devices, metric and factors, thresholds).
    """
    l2 = _metric(metric) == "l2"
    rows, _ = _check_operands(queries, docs, l2)
    if thresholds.shape != (rows,) or thresholds.dtype != torch.float32 or not thresholds.is_contiguous():
        raise ValueError(
            f"thresholds must be {rows} contiguous float32 values, not {tuple(thresholds.shape)} {thresholds.dtype}"
        )
    if estimates is not None and (estimates.shape != (rows, docs.values.shape[0]) or estimates.stride(1) != 1):
        raise ValueError(f"estimates must be a ({rows}, {docs.values.shape[0]}) tile, not {tuple(estimates.shape)}")
    _launch_screen(queries, docs, l2, tiles or ScreenTiles(), thresholds, survivors, estimates, write=False)


def estimate_tile(queries: PreparedRows, docs: PreparedRows, *, tiles: ScreenTiles | None = None) -> torch.Tensor:
    """The estimates that the screen compares, as a (query rows, docs) float32 tile: for tests of the bound,
    and for measuring it on tensor cores (the screen itself never stores them)."""
    rows, _ = _check_operands(queries, docs, False)
    tile = torch.empty((rows, docs.values.shape[0]), device=queries.values.device)
    _launch_screen(queries, docs, False, tiles or ScreenTiles(), None, None, tile, write=True)
    return tile


def slack(queries: PreparedRows, docs: PreparedRows) -> torch.Tensor:
    """The screen's bound on |estimate - tk_dot(q, d)| and on |estimate - q.d| for each pair, as a (query rows,
    docs) float64 tile: the CPU's a_q n_d + b_q r_d, plus gamma b_q n_d for the tensor cores."""
    a, b = queries.first.double()[:, None], queries.second.double()[:, None]
    gamma = _gamma(queries.values.shape[1])
    return (a + gamma * b) * docs.first.double()[None, :] + b * docs.second.double()[None, :]


def rescore(
    queries: torch.Tensor, docs: torch.Tensor, pairs: torch.Tensor, *, metric: str, block_pairs: int = 32
) -> torch.Tensor:
    """The exact score of each pair (query row, doc) of `pairs` (int32, (n, 2), as a Survivors buffer holds
    them) of these float32 rows (each contiguous), bit for bit the C kernel's (`_kernels/tk.h`): tk_dot(q, d)
    for ip and cosine, tk_l2(q, d) for l2 (the squared distance: the selection's score is its negation).

    Raises:
        ValueError: rows or pairs of the wrong shape, dtype or device.
    """
    l2 = _metric(metric) == "l2"
    _check_rows(queries, "queries", (torch.float32,))
    _check_rows(docs, "docs", (torch.float32,))
    if queries.shape[1] != docs.shape[1] or queries.device != docs.device:
        raise ValueError(f"queries {tuple(queries.shape)} and docs {tuple(docs.shape)} must share dim and device")
    if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.dtype != torch.int32 or not pairs.is_contiguous():
        raise ValueError(f"pairs must be a contiguous int32 (n, 2) tensor, not {tuple(pairs.shape)} {pairs.dtype}")
    scores = torch.empty(pairs.shape[0], device=queries.device)
    if pairs.shape[0]:
        triton, kernels = _kernels()
        # No fusion: tk_l2 rounds t * t before adding it (the C is built with -ffp-contract=off)
        kernels.rescore[(triton.cdiv(pairs.shape[0], block_pairs),)](
            queries, queries.stride(0), docs, docs.stride(0), pairs, pairs.shape[0], queries.shape[1], scores,
            L2=l2, BLOCK_P=block_pairs, enable_fp_fusion=False,
        )  # fmt: skip
    return scores


def _gamma(dim: int) -> float:
    """screen.c's gamma (tk_prepare_rows): 2 (dim + 8) 2^-24; exact in float32, as the kernels take it."""
    return 2.0 * (dim + 8) * 2.0**-24


def _launch_screen(
    queries: PreparedRows,
    docs: PreparedRows,
    l2: bool,
    tiles: ScreenTiles,
    thresholds: torch.Tensor | None,
    survivors: Survivors | None,
    tile: torch.Tensor | None,
    write: bool,
) -> None:
    """The screen's kernel in one of its modes: screening its estimates, screening a given tile (`tile`), or
    writing its estimates to `tile` (write)."""
    rows, dim = queries.values.shape
    doc_count = docs.values.shape[0]
    if not rows or not doc_count:
        return
    triton, kernels = _kernels()
    unused = queries.first  # for the pointers a mode does not read
    kernels.screen[(triton.cdiv(rows, tiles.rows), triton.cdiv(doc_count, tiles.docs))](
        queries.values, queries.values.stride(0), docs.values, docs.values.stride(0), rows, doc_count, dim,
        _gamma(dim), unused if queries.unscale is None else queries.unscale,
        queries.first, queries.second, queries.third if l2 else unused,
        unused if thresholds is None else thresholds, docs.first, docs.second, docs.third if l2 else unused,
        unused if survivors is None else survivors.pairs, 0 if survivors is None else survivors.pairs.shape[0],
        unused if survivors is None else survivors.counts, unused if tile is None else tile,
        0 if tile is None else tile.stride(0),
        L2=l2, WIDEN=kernels.interpreted, SCALED=queries.unscale is not None, GIVEN=tile is not None and not write,
        WRITE=write,
        BLOCK_M=tiles.rows, BLOCK_N=tiles.docs, BLOCK_K=tiles.dims, num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip


def _metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (expected one of {', '.join(METRICS)})")
    return metric


def _check_rows(rows: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...]) -> None:
    if rows.dim() != 2 or rows.dtype not in dtypes or (rows.shape[1] > 1 and rows.stride(1) != 1):
        raise ValueError(
            f"{name} must be a 2-D {' or '.join(str(t) for t in dtypes)} tensor with contiguous rows, "
            f"not {tuple(rows.shape)} {rows.dtype} with strides {rows.stride()}"
        )


def _check_operands(queries: PreparedRows, docs: PreparedRows, l2: bool) -> tuple[int, int]:
    rows, dim = queries.values.shape
    if not queries.query or docs.query:
        raise ValueError("the screen takes rows prepared as queries (query=True), then docs (query=False)")
    if docs.values.shape[1] != dim or docs.values.device != queries.values.device:
        raise ValueError(
            f"queries {tuple(queries.values.shape)} and docs {tuple(docs.values.shape)} must share dim and device"
        )
    if dim > MAX_DIM:
        raise ValueError(f"the screen's bound holds up to {MAX_DIM} dims, not {dim}")
    if queries.values.dtype != docs.values.dtype:
        raise ValueError(
            f"queries prepared in {queries.values.dtype} and docs in {docs.values.dtype}: prepare the queries with "
            "values=docs.values.dtype"
        )
    if (queries.values.dtype == torch.float16) != (queries.unscale is not None):
        raise ValueError("float16 queries, and only they, carry their scales (unscale): prepare them by prepare_rows")
    if l2 and (queries.third is None or docs.third is None):
        raise ValueError("l2 needs rows prepared with l2=True (their squared norms)")
    return rows, dim


# ---- The kernels: plain functions here, made Triton functions by _kernels in a namespace of their own, where
# `tl` and their names are bound (a kernel finds the functions it calls through its globals).
# Constants scale by sums (x + x * 2^-50, not x * (1 + 2^-50)): a Python float takes the type of the tensor it
# meets, and 1 + 2^-50 is 1 in float32. The factors' arithmetic is in float64, rounded outward once.


def _round_up(x) -> Any:  # type: ignore[no-untyped-def]
    """x (float64) rounded up to float32 (screen.c's tk_round_up)."""
    f = x.to(tl.float32)
    bits = f.to(tl.int32, bitcast=True)
    above = tl.where(f == 0, 1, tl.where(f > 0, bits + 1, bits - 1))  # nextafter(f, inf)
    return tl.where(f.to(tl.float64) < x, above.to(tl.float32, bitcast=True), f)


def _round_down(x) -> Any:  # type: ignore[no-untyped-def]
    """x (float64) rounded down to float32 (tk_round_down)."""
    f = x.to(tl.float32)
    bits = f.to(tl.int32, bitcast=True)
    below = tl.where(f == 0, -2147483647, tl.where(f > 0, bits - 1, bits + 1))  # nextafter(f, -inf)
    return tl.where(f.to(tl.float64) > x, below.to(tl.float32, bitcast=True), f)


def _bf16_bits(x) -> Any:  # type: ignore[no-untyped-def]
    """tk_bf16: the bfloat16 bits of float32 x, to nearest even, NaN kept, subnormals flushed."""
    bits = x.to(tl.uint32, bitcast=True)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    half = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    half = tl.where(nan, 0x7FC0, half)
    return tl.where((half & 0x7F80) != 0, half, half & 0x8000)


def _f16_bits(x) -> Any:  # type: ignore[no-untyped-def]
    """The float16 bits of float32 x, to nearest even, NaN kept, subnormals flushed (as _bf16_bits flushes), so
    that tensor cores read these values whether they flush float16's subnormals or not."""
    bits = x.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    return tl.where((bits & 0x7C00) != 0, bits, bits & 0x8000)


def _as_float32(x, BF16_BITS: tl.constexpr) -> Any:  # type: ignore[no-untyped-def]
    """A block of rows as float32, exactly: bfloat16 rows (loaded as int16) widened by their bits (the
    interpreter's conversion moves subnormals), others converted."""
    if BF16_BITS:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


def _store_factors(  # type: ignore[no-untyped-def]
    row, real, squares, rounded_squares, moved_squares, gamma, first_ptr, second_ptr, third_ptr,
    QUERY: tl.constexpr, L2: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """tk_prepare_rows's factors from a block of rows' float64 sums: |x|^2, |x~|^2 and |x~ - x|^2, where x~ is the
    row as the screen's products read it."""
    # tk_prepare_rows's arithmetic, from sums raised by (dim + 8) 2^-50 and square roots raised by 2^-50: each
    # float64 sum errs by less than dim 2^-53 (of nonnegative terms, in any order), a square root by 2 ulps.
    gamma = gamma + tl.zeros([BLOCK_R], tl.float64)
    margin = gamma * 2.0**-27
    larger = tl.where(rounded_squares > squares, rounded_squares, squares)  # NaN: squares, as the C's
    size = tl.sqrt(larger + larger * margin)
    size += size * 2.0**-50
    moved = tl.sqrt(moved_squares + moved_squares * margin)
    moved += moved * 2.0**-50
    huge = ~(size < 2.0**60)  # NaN too
    size = tl.where(huge, float("inf"), tl.where(size < 2.0**-40, 2.0**-40, size))
    moved = tl.where(huge, float("inf"), moved)
    if QUERY:
        a = moved + gamma * size
        floor = gamma * 2.0**-61  # 4 (dim + 8) 2^-86
        tl.store(first_ptr + row, _round_up(tl.where(a > floor, a, floor)), mask=real)
        tl.store(second_ptr + row, _round_up(size), mask=real)
    else:
        tl.store(first_ptr + row, _round_up(size), mask=real)
        tl.store(second_ptr + row, _round_up(moved), mask=real)
    if L2:
        low = (squares - squares * margin) * (1.0 - gamma * 2.0**-29)  # below = 1 - (dim + 8) 2^-52
        if not QUERY:
            low = low * 0.5
        tl.store(third_ptr + row, tl.where(huge, 0.0, _round_down(low)), mask=real)


# The float16 screen's bound. Docs are float16 on disk, and their values are kept (d~ = d) but for float16's
# subnormals, flushed to zero here (_f16_bits) so that the tensor cores read the same values whether or not they
# flush them (Fasi et al. found float16 subnormals supported; nothing here relies on it): r_d = |d~ - d|, 0 for a
# row without subnormals, n_d = |d| >= |d~|. A query row q is scaled by 2^s, s = min(14 - e, 126) where 2^e is the
# leading power of two of its largest |q_i| (e from the float32 exponent field; -127 for zeros and subnormals), and
# rounded to float16: q' = f16(2^s q), with |q'_i| <= 2^15 < 65504 (no overflow), and every q_i within 2^-28 of
# the largest keeps float16's 11 bits (the rest are flushed, and counted). The screen's estimate of a pair is
# 2^-s fl(q'.d~), fl the tensor cores' float32 sum of exact products; 2^-s is a float32 in [2^-126, 2^114]
# (s in [-114, 126]), and q^ = 2^-s q' is exact in float64, where r_q = |q^ - q| and |q|, |q^| are summed. Then
#   estimate - q.d = 2^-s (fl(q'.d~) - q'.d~) + (q^ - q).d~ + q.(d~ - d) + u_back,
# - the products of float16 values are exact in float32 (11 x 11 bits) on tensor cores (Fasi et al., op. cit.,
#   whose measurements are of float16 inputs) and in the interpreter's widened float32 tl.dot, and the sum's error
#   is relative: |2^-s (fl(q'.d~) - q'.d~)| <= (2.5 dim + 2) 2^-24 |q^| |d~|, covered as the bfloat16 path's is
#   (a_q's 2 gamma' max(|q|, |q^|), plus gamma b_q for the tensor cores); tk_dot's error is within it too;
# - |(q^ - q).d~| <= r_q n_d and |q.(d~ - d)| <= b_q r_d, b_q = max(|q|, |q^|): the bfloat16 path's terms;
# - nothing underflows in the scaled sum: normal float16 values are multiples of 2^-24, so every product, and
#   every sum of them (rounded or truncated to float32), is 0 or at least 2^-48 in size; nor overflows: below
#   dim 2^15 65504 < 2^53 (dim <= MAX_DIM);
# - u_back: 2^-s times a float32 is exact unless the result is below 2^-126, where it may lose 2^-126 (flushed);
#   a_q's floor of 4 (dim + 8) 2^-86 (n_d >= 2^-40) was sized for 2 dim such flushes in the bfloat16 sums, of
#   which this sum makes none. It cannot overflow: rows of norm 2^60 or more get infinite factors (every pair
#   survives), others' estimates stay below 2^61 |d| (float16 docs: |d| < 2^27).
# So the factors are the bfloat16 path's formulas (_store_factors) of these x~, with nothing added.
def _prepare_kernel(  # type: ignore[no-untyped-def]
    x_ptr, x_stride, rows, dim, gamma, out_ptr, out_stride, unscale_ptr, first_ptr, second_ptr, third_ptr,
    QUERY: tl.constexpr, L2: tl.constexpr, BF16_BITS: tl.constexpr, F16: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    # Rows' 16-bit values (bfloat16: tk_bf16's bits; with F16 float16, as above: float16 docs kept, query rows scaled
    # by 2^s, their 2^-s stored at unscale_ptr) and the bound's factors of those values (_store_factors). BF16_BITS:
    # x holds bfloat16 rows as int16 bits (the interpreter's conversion moves subnormals).
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    real = row < rows
    row = row.to(tl.int64)
    scale = tl.full([BLOCK_R], 1.0, tl.float32)
    unscale = scale
    if F16 and QUERY:  # 2^s: the row's largest value to [2^14, 2^15)
        largest = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, dim, BLOCK_D):
            col = start + tl.arange(0, BLOCK_D)
            inside = real[:, None] & (col < dim)[None, :]
            x = _as_float32(tl.load(x_ptr + row[:, None] * x_stride + col[None, :], mask=inside, other=0), BF16_BITS)
            largest = tl.maximum(largest, tl.max(tl.abs(x), axis=1))
        power = tl.minimum(141 - ((largest.to(tl.int32, bitcast=True) >> 23) & 0xFF), 126)  # s = 14 - e
        scale = ((power + 127) << 23).to(tl.float32, bitcast=True)
        unscale = ((127 - power) << 23).to(tl.float32, bitcast=True)
        tl.store(unscale_ptr + row, unscale, mask=real)
    squares = tl.zeros([BLOCK_R], tl.float64)
    rounded_squares = tl.zeros([BLOCK_R], tl.float64)
    moved_squares = tl.zeros([BLOCK_R], tl.float64)
    for start in range(0, dim, BLOCK_D):
        col = start + tl.arange(0, BLOCK_D)
        inside = real[:, None] & (col < dim)[None, :]
        x = _as_float32(tl.load(x_ptr + row[:, None] * x_stride + col[None, :], mask=inside, other=0), BF16_BITS)
        if F16:
            half = _f16_bits(x * scale[:, None])  # exact product: a power of two, and |x| 2^s < 2^15
            rounded = half.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float64) * unscale.to(tl.float64)[:, None]
        else:
            half = _bf16_bits(x)
            rounded = (half << 16).to(tl.float32, bitcast=True).to(tl.float64)
        tl.store(out_ptr + row[:, None] * out_stride + col[None, :], half.to(tl.int16), mask=inside)
        value = x.to(tl.float64)
        squares += tl.sum(value * value, axis=1)
        rounded_squares += tl.sum(rounded * rounded, axis=1)
        moved_squares += tl.sum((rounded - value) * (rounded - value), axis=1)
    _store_factors(row, real, squares, rounded_squares, moved_squares, gamma, first_ptr, second_ptr, third_ptr,
                   QUERY, L2, BLOCK_R)  # fmt: skip


def _screen_kernel(  # type: ignore[no-untyped-def]
    q_ptr, q_stride, d_ptr, d_stride, rows, docs, dim, gamma, unscale_ptr,
    a_ptr, b_ptr, q_sq_ptr, thresholds_ptr, n_ptr, r_ptr, h_ptr,
    pairs_ptr, capacity, counts_ptr, tile_ptr, tile_stride,
    L2: tl.constexpr, WIDEN: tl.constexpr, SCALED: tl.constexpr, GIVEN: tl.constexpr, WRITE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    doc = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    real_row, real_doc = row < rows, doc < docs
    real = real_row[:, None] & real_doc[None, :]
    tile_at = tile_ptr + row.to(tl.int64)[:, None] * tile_stride + doc[None, :]
    if GIVEN:
        estimate = tl.load(tile_at, mask=real, other=0.0)
    else:
        estimate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        q_rows = q_ptr + row.to(tl.int64)[:, None] * q_stride
        d_rows = d_ptr + doc.to(tl.int64)[None, :] * d_stride
        for start in range(0, dim, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            q = tl.load(q_rows + k[None, :], mask=real_row[:, None] & (k < dim)[None, :], other=0.0)
            d = tl.load(d_rows + k[:, None], mask=real_doc[None, :] & (k < dim)[:, None], other=0.0)
            if WIDEN:  # the interpreter's: exact products of the 16-bit values, float32 sums
                estimate = tl.dot(q.to(tl.float32), d.to(tl.float32), estimate, input_precision="ieee")
            else:
                estimate = tl.dot(q, d, estimate)
        if SCALED:  # float16 queries: their products times 2^-s_q, exact but for an underflow (_prepare_kernel)
            estimate = estimate * tl.load(unscale_ptr + row, mask=real_row, other=1.0)[:, None]
    if WRITE:
        tl.store(tile_at, estimate, mask=real)
    else:
        gamma = gamma + tl.zeros([BLOCK_M], tl.float64)
        threshold = tl.load(thresholds_ptr + row, mask=real_row, other=0.0).to(tl.float64)
        a = tl.load(a_ptr + row, mask=real_row, other=0.0).to(tl.float64)
        b = tl.load(b_ptr + row, mask=real_row, other=0.0).to(tl.float64)
        if L2:  # K (screen.c's tk_l2_key_bound): the key q.d - |d|^2 / 2 of any pair scoring >= the threshold
            query_sq = tl.load(q_sq_ptr + row, mask=real_row, other=0.0).to(tl.float64)
            size = tl.abs(threshold)
            key = (threshold - size * 2.0**-22 + query_sq) * 0.5 - (size + query_sq) * 2.0**-50
        else:
            key = threshold
        bound = _round_down(key - tl.abs(key) * 2.0**-19 - 2.0**-120)
        a_row = _round_up(a + gamma * b + (a + b) * 2.0**-19)
        b_row = _round_up(b + b * 2.0**-19)
        value = tl.fma(a_row[:, None], tl.load(n_ptr + doc, mask=real_doc, other=0.0)[None, :], estimate)
        value = tl.fma(b_row[:, None], tl.load(r_ptr + doc, mask=real_doc, other=0.0)[None, :], value)
        if L2:
            half_sq = tl.load(h_ptr + doc, mask=real_doc, other=0.0).to(tl.float64)
            value = value - _round_down(half_sq - half_sq * 2.0**-19)[None, :]
        keep = ~(value < bound[:, None]) & real  # NaN passes (a NaN estimate, or inf * 0 of infinite factors)
        kept = keep.to(tl.int32)
        per_row = tl.sum(kept, axis=1)
        count = tl.sum(per_row, axis=0)
        if count > 0:  # most tiles keep nothing; one atomic reserves this tile's slots, in row order
            first = tl.atomic_add(counts_ptr, count.to(tl.int64))
            slot = first + (tl.cumsum(per_row, axis=0) - per_row)[:, None] + tl.cumsum(kept, axis=1) - 1
            fits = keep & (slot < capacity)
            tl.store(pairs_ptr + 2 * slot, row[:, None] + 0 * doc[None, :], mask=fits)
            tl.store(pairs_ptr + 2 * slot + 1, doc[None, :] + 0 * row[:, None], mask=fits)
            if first + count > capacity:
                tl.store(counts_ptr + 1, 1)


def _lane_fma(q_rows, d_rows, i, dim, real, acc) -> Any:  # type: ignore[no-untyped-def]
    """One step of 16 of tk_dot's lanes: acc = fma(q_i, d_i, acc) for dims i < dim; the other lanes are left as
    they are (as AVX-512's masked lanes: an fma of zeros would turn a -0.0 lane into +0.0)."""
    inside = real[:, None] & (i < dim)[None, :]
    q = tl.load(q_rows[:, None] + i[None, :], mask=inside, other=0.0)
    d = tl.load(d_rows[:, None] + i[None, :], mask=inside, other=0.0)
    return tl.where(inside, tl.fma(q, d, acc), acc)


def _fold(x, WIDTH: tl.constexpr, STRIDE: tl.constexpr):  # type: ignore[no-untyped-def]
    """Halves x's WIDTH lanes: lane j of the result is x[j] + x[j + WIDTH / 2] (STRIDE = WIDTH / 2: tk_dot's
    tree), or x[2j] + x[2j + 1] (STRIDE = 1: tk_l2's)."""
    if STRIDE == 1:
        low, high = tl.split(tl.reshape(x, (x.shape[0], WIDTH // 2, 2)))
    else:
        low, high = tl.split(tl.permute(tl.reshape(x, (x.shape[0], 2, WIDTH // 2)), (0, 2, 1)))
    return low + high


def _rescore_kernel(  # type: ignore[no-untyped-def]
    q_ptr, q_stride, d_ptr, d_stride, pairs_ptr, count, dim, out_ptr, L2: tl.constexpr, BLOCK_P: tl.constexpr
):
    pair = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    real = pair < count
    q_rows = q_ptr + tl.load(pairs_ptr + 2 * pair, mask=real, other=0).to(tl.int64) * q_stride
    d_rows = d_ptr + tl.load(pairs_ptr + 2 * pair + 1, mask=real, other=0).to(tl.int64) * d_stride
    if L2:
        # tk_l2: dimension i in lane i % 8, (q - d)^2 in float64 added in order of i; then neighbours, twice,
        # ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), rounded once to float32
        acc = tl.zeros([BLOCK_P, 8], tl.float64)
        for start in range(0, dim, 8):
            i = start + tl.arange(0, 8)
            inside = real[:, None] & (i < dim)[None, :]
            q = tl.load(q_rows[:, None] + i[None, :], mask=inside, other=0.0).to(tl.float64)
            d = tl.load(d_rows[:, None] + i[None, :], mask=inside, other=0.0).to(tl.float64)
            acc = acc + (q - d) * (q - d)  # + 0 where outside: these lanes are never -0.0
        low, high = tl.split(_fold(_fold(acc, 8, 1), 4, 1))
        score = (low + high).to(tl.float32)
    else:
        # tk_dot: dimension i in lane i % 16 of accumulator (i / 16) % 4, a float32 fma chain in order of i;
        # then (a0 + a1) + (a2 + a3), lane j + 8 onto lane j, + 4, and (l0 + l2) + (l1 + l3)
        lane = tl.arange(0, 16)
        acc0 = tl.zeros([BLOCK_P, 16], tl.float32)
        acc1 = tl.zeros([BLOCK_P, 16], tl.float32)
        acc2 = tl.zeros([BLOCK_P, 16], tl.float32)
        acc3 = tl.zeros([BLOCK_P, 16], tl.float32)
        for start in range(0, dim, 64):
            acc0 = _lane_fma(q_rows, d_rows, start + lane, dim, real, acc0)
            acc1 = _lane_fma(q_rows, d_rows, start + 16 + lane, dim, real, acc1)
            acc2 = _lane_fma(q_rows, d_rows, start + 32 + lane, dim, real, acc2)
            acc3 = _lane_fma(q_rows, d_rows, start + 48 + lane, dim, real, acc3)
        low, high = tl.split(_fold(_fold(_fold((acc0 + acc1) + (acc2 + acc3), 16, 8), 8, 4), 4, 2))
        score = low + high
    tl.store(out_ptr + pair, score, mask=real)


_DEVICE_CODE = (
    _round_up, _round_down, _bf16_bits, _f16_bits, _as_float32, _store_factors, _prepare_kernel, _screen_kernel,
    _lane_fma, _fold, _rescore_kernel,
)  # fmt: skip


@functools.cache
def _kernels() -> tuple[Any, types.SimpleNamespace]:
    """Triton and the kernels (prepare, screen, rescore; `interpreted`: whether Triton interprets
    them, as it does where TRITON_INTERPRET was set when it was imported), built on first use: Triton is optional,
    and slow to import."""
    import triton
    import triton.language
    from triton.runtime.interpreter import InterpretedFunction

    namespace: dict[str, Any] = {"tl": triton.language, "__name__": __name__}
    for plain in _DEVICE_CODE:
        namespace[plain.__name__] = triton.jit(types.FunctionType(plain.__code__, namespace, plain.__name__))
    screen = namespace["_screen_kernel"]
    return triton, types.SimpleNamespace(
        prepare=namespace["_prepare_kernel"], screen=screen,
        rescore=namespace["_rescore_kernel"],
        interpreted=isinstance(screen, InterpretedFunction),
    )  # fmt: skip
