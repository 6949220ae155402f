"""The screen on the GPU (issue #20, item 1): `_kernels/screen.c`'s design in Triton, for tensor cores.
Rows are prepared here for the screen: their bfloat16 values, and the factors of the bound on how far a bfloat16
estimate of a pair's score may be from its exact score (`prepare_rows`), as tk_prepare_rows prepares them.

Optional: without Triton, or with TINY_KNN_NO_TRITON set, `available()` is False. Under TRITON_INTERPRET=1 the
kernels run on CPU tensors (the tests do so).
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


def available() -> bool:
    """Whether these kernels can run: Triton importable and not switched off (TINY_KNN_NO_TRITON), as for the
    selection's kernel (gpu_survivors.available)."""
    return gpu_survivors.available()


@dataclass(frozen=True)
class PreparedRows:
    """Rows as the screen takes them (tk_prepare_rows's outputs for a bfloat16 estimator):
    - values: the rows in bfloat16, (rows, dim), as tk_bf16 rounds: to nearest even, NaN kept, subnormals flushed;
    - first, second: for queries a_q and b_q, for docs n_d and r_d (float32, rounded up; infinite for rows whose
      norm is 2^60 or more, or not finite, so that all their pairs survive);
    - third (l2 only): |q|^2 for queries, |d|^2 / 2 for docs (float32, rounded down; 0 for those rows)."""

    values: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor
    third: torch.Tensor | None
    query: bool


def prepare_rows(
    rows: torch.Tensor, *, query: bool, l2: bool, block_rows: int = 16, block_dims: int = 128
) -> PreparedRows:
    """Prepares rows (float32, float16 or bfloat16; each contiguous) for the screen, on their device: what
    tk_prepare_rows computes with TK_BF16 (TK_QUERY for queries, TK_L2 for l2). The bfloat16 values are tk_bf16's
    bit for bit. The factors are tk_prepare_rows's, or a float32 step or two more generous (never less): the sums
    of squares are added in another order here, so they carry a margin of (dim + 8) 2^-50.

    Raises:
        ValueError: rows that are not a 2-D float tensor with contiguous rows.
    """
    _check_rows(rows, "rows", (torch.float32, torch.float16, torch.bfloat16))
    count, dim = rows.shape
    device = rows.device
    values = torch.empty((count, dim), dtype=torch.bfloat16, device=device)
    first, second = torch.empty(count, device=device), torch.empty(count, device=device)
    third = torch.empty(count, device=device) if l2 else None
    if count:
        triton, kernels = _kernels()
        widened = rows.dtype == torch.bfloat16  # as bits: see _prepare_kernel
        kernels.prepare[(triton.cdiv(count, block_rows),)](
            rows.view(torch.int16) if widened else rows, rows.stride(0), count, dim, _gamma(dim),
            values.view(torch.int16), values.stride(0), first, second, first if third is None else third,
            QUERY=query, L2=l2, BF16_BITS=widened, BLOCK_R=block_rows, BLOCK_D=block_dims,
        )  # fmt: skip
    return PreparedRows(values, first, second, third, query)


def _gamma(dim: int) -> float:
    """screen.c's gamma (tk_prepare_rows): 2 (dim + 8) 2^-24; exact in float32, as the kernels take it."""
    return 2.0 * (dim + 8) * 2.0**-24


def _check_rows(rows: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...]) -> None:
    if rows.dim() != 2 or rows.dtype not in dtypes or (rows.shape[1] > 1 and rows.stride(1) != 1):
        raise ValueError(
            f"{name} must be a 2-D {' or '.join(str(t) for t in dtypes)} tensor with contiguous rows, "
            f"not {tuple(rows.shape)} {rows.dtype} with strides {rows.stride()}"
        )


# ---- The kernels: plain functions here, made Triton functions by _kernels in a namespace of their own, where
# `tl` and their names are bound (a kernel finds the functions it calls through its globals).
# Constants scale by sums (x + x * 2^-50, not x * (1 + 2^-50)): a Python float takes the type of the tensor it
# meets, and 1 + 2^-50 is 1 in float32. The factors' arithmetic is in float64, rounded outward once.


def _round_up(x) -> Any:  # type: ignore[no-untyped-def]
    """x (float64) rounded up to float32 (tk_round_up)."""
    f = x.to(tl.float32)
    bits = f.to(tl.int32, bitcast=True)
    above = tl.where(f == 0, 1, tl.where(f > 0, bits + 1, bits - 1))  # nextafter(f, inf)
    return tl.where(f.to(tl.float64) < x, above.to(tl.float32, bitcast=True), f)


def _round_down(x) -> Any:  # type: ignore[no-untyped-def]
    """x (float64) rounded down to float32 (screen.c's tk_round_down)."""
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


def _prepare_kernel(  # type: ignore[no-untyped-def]
    x_ptr, x_stride, rows, dim, gamma, out_ptr, out_stride, first_ptr, second_ptr, third_ptr,
    QUERY: tl.constexpr, L2: tl.constexpr, BF16_BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    real = row < rows
    row = row.to(tl.int64)
    squares = tl.zeros([BLOCK_R], tl.float64)
    rounded_squares = tl.zeros([BLOCK_R], tl.float64)
    moved_squares = tl.zeros([BLOCK_R], tl.float64)
    for start in range(0, dim, BLOCK_D):
        col = start + tl.arange(0, BLOCK_D)
        inside = real[:, None] & (col < dim)[None, :]
        x = tl.load(x_ptr + row[:, None] * x_stride + col[None, :], mask=inside, other=0)
        if BF16_BITS:  # bfloat16 rows, widened by their bits (the interpreter's conversion moves subnormals)
            x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            x = x.to(tl.float32)
        half = _bf16_bits(x)
        tl.store(out_ptr + row[:, None] * out_stride + col[None, :], half.to(tl.int16), mask=inside)
        value = x.to(tl.float64)
        rounded = (half << 16).to(tl.float32, bitcast=True).to(tl.float64)
        squares += tl.sum(value * value, axis=1)
        rounded_squares += tl.sum(rounded * rounded, axis=1)
        moved_squares += tl.sum((rounded - value) * (rounded - value), axis=1)
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


_DEVICE_CODE = (_round_up, _round_down, _bf16_bits, _prepare_kernel)


@functools.cache
def _kernels() -> tuple[Any, types.SimpleNamespace]:
    """Triton and the kernels, built on first use: Triton is optional, and slow to import."""
    import triton
    import triton.language

    namespace: dict[str, Any] = {"tl": triton.language, "__name__": __name__}
    for plain in _DEVICE_CODE:
        namespace[plain.__name__] = triton.jit(types.FunctionType(plain.__code__, namespace, plain.__name__))
    return triton, types.SimpleNamespace(prepare=namespace["_prepare_kernel"])
