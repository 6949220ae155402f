"""The GPU screen's kernels (gpu_screen.py), run by Triton's interpreter on CPU tensors, against the C kernels:
rows prepared as tk_prepare_rows prepares them (the same bfloat16 bits, factors never less generous).

Triton decides whether it interprets kernels when it is imported (TRITON_INTERPRET=1), and this process may
have imported it for the GPU, so each check runs in a process of its own that interprets (`interpreted`); that
process imports this module to find the check."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch
from capabilities import needs_kernel, needs_triton

from tiny_knn import gpu_screen
from tiny_knn.kernel import KERNEL

pytestmark = [needs_triton, needs_kernel]


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
        prepared = gpu_screen.prepare_rows(rows, query=query, l2=True)
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
def test_half_precision_rows_are_prepared_as_their_float32_values(interpreted, dtype) -> None:  # type: ignore[no-untyped-def]
    interpreted(check_prepared_rows, 40, dtype)


# ---- Without the interpreter


def test_nothing_runs_where_triton_is_switched_off(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TINY_KNN_NO_TRITON", "1")
    assert not gpu_screen.available()


def test_rows_that_do_not_fit_are_refused_before_any_kernel_runs() -> None:
    with pytest.raises(ValueError, match="rows must be a 2-D"):
        gpu_screen.prepare_rows(torch.zeros(4, 6, dtype=torch.float64), query=True, l2=False)
    with pytest.raises(ValueError, match="contiguous rows"):
        gpu_screen.prepare_rows(torch.zeros(6, 4).T, query=True, l2=False)
