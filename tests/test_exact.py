"""The one exact score (_kernels/exact.c): tk_dot's three forms against an exactly rounded rational model and
each other, bit for bit; tk_l2 against exact arithmetic; cosine's unit rows."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from capabilities import needs_kernel
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny_knn.kernel import CPU_FEATURES, HAS_AVX2_FMA, HAS_AVX512, KERNEL
from tiny_knn.metrics import normalize

pytestmark = needs_kernel
FORMS = {"portable": 0, "avx2": 1, "avx512": 2}
RUNS = {"portable": True, "avx2": bool(CPU_FEATURES & HAS_AVX2_FMA), "avx512": bool(CPU_FEATURES & HAS_AVX512)}


def exact_tile(queries: torch.Tensor, docs: torch.Tensor, form: int = -1, squared: bool = False) -> torch.Tensor:
    """Every exact score of the rows (tk_dot in the given form, or tk_l2)."""
    assert KERNEL is not None
    out = torch.empty(queries.shape[0], docs.shape[0])
    done = KERNEL.tk_exact_tile(
        form, int(squared), queries.data_ptr(), queries.stride(0), queries.shape[0], docs.data_ptr(), docs.stride(0),
        docs.shape[0], queries.shape[1], out.data_ptr(), out.stride(0),
    )  # fmt: skip
    assert done == 0
    return out


FLOAT32_OVERFLOW = Fraction(2**128 - 2**103)  # halfway from the largest float32 to 2^128: rounds to infinity


def _round_to_float32(value: Fraction) -> np.float32:
    if abs(value) >= FLOAT32_OVERFLOW:
        return np.float32(np.inf if value > 0 else -np.inf)
    guess = np.float32(float(value))
    candidates = [guess, np.nextafter(guess, np.float32(np.inf)), np.nextafter(guess, np.float32(-np.inf))]
    finite = [c for c in candidates if np.isfinite(c)]
    best = min(abs(Fraction(float(c)) - value) for c in finite)
    nearest = [c for c in finite if abs(Fraction(float(c)) - value) == best]
    return min(nearest, key=lambda c: int(np.array(c).view(np.uint32)) & 1)  # a tie goes to the even one


def _add(a: np.float32, b: np.float32) -> np.float32:
    if not (np.isfinite(a) and np.isfinite(b)):
        return np.float32(a) + np.float32(b)  # infinities: IEEE's rule
    return _round_to_float32(Fraction(float(a)) + Fraction(float(b)))


def model_dot(query: np.ndarray, doc: np.ndarray) -> np.float32:
    """tk_dot, defined: dimension i in lane i % 16 of accumulator (i // 16) % 4, each a fused multiply-add chain
    in order of i from +0, then (a0 + a1) + (a2 + a3) and the lanes halved as a tree (lane j + 8 onto j, then
    + 4, + 2, + 1); every step rounded once to float32, computed in exact rational arithmetic."""
    lanes = [[np.float32(0)] * 16 for _ in range(4)]
    for i, (q, d) in enumerate(zip(query.tolist(), doc.tolist(), strict=True)):
        acc = lanes[(i // 16) % 4]
        if not np.isfinite(acc[i % 16]):
            continue  # stays infinite: products of finite rows are finite, and inf + finite is inf
        acc[i % 16] = _round_to_float32(Fraction(q) * Fraction(d) + Fraction(float(acc[i % 16])))
    total = [_add(_add(lanes[0][j], lanes[1][j]), _add(lanes[2][j], lanes[3][j])) for j in range(16)]
    for half in (8, 4, 2, 1):
        total = [_add(total[j], total[j + half]) for j in range(half)]
    return total[0]


def hard_rows(count: int, dim: int, seed: int, exponents: int) -> torch.Tensor:
    """Rows of wildly different scales (subnormal products and sums included), some cancelling each other."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-exponents, exponents + 1, (count, dim), generator=generator).float())
    rows = torch.randn(count, dim, generator=generator) * scale
    if count > 1:
        rows[1] = -rows[0] * (1 + 2**-20)  # heavy cancellation against row 0
    return rows


@pytest.mark.parametrize("form", [name for name, runs in RUNS.items() if runs])
@settings(max_examples=25, deadline=None)
@given(dim=st.integers(1, 150), seed=st.integers(0, 2**16), exponents=st.integers(0, 70))
def test_every_form_of_tk_dot_is_the_exactly_rounded_model(form, dim, seed, exponents) -> None:  # type: ignore[no-untyped-def]
    queries, docs = hard_rows(2, dim, seed, exponents), hard_rows(3, dim, seed + 1, exponents)
    out = exact_tile(queries, docs, FORMS[form])
    for r in range(2):
        for c in range(3):
            expected = model_dot(queries[r].numpy(), docs[c].numpy())
            if np.isnan(expected):  # inf - inf: NaN's payload is the hardware's to choose
                assert np.isnan(out[r, c].item())
                continue
            assert out[r, c].numpy().view(np.uint32) == np.array(expected).view(np.uint32), (form, r, c)


@settings(max_examples=40, deadline=None)
@given(dim=st.integers(1, 1100), seed=st.integers(0, 2**16), exponents=st.integers(0, 140))
def test_the_forms_of_tk_dot_agree_bit_for_bit(dim, seed, exponents) -> None:  # type: ignore[no-untyped-def]
    """Many dims (every tail of the 64-wide blocks), scales down to subnormals and up to overflow."""
    queries, docs = hard_rows(4, dim, seed, exponents), hard_rows(9, dim, seed + 7, exponents)
    outs = [exact_tile(queries, docs, FORMS[name]).view(torch.int32) for name, runs in RUNS.items() if runs]
    for out in outs[1:]:
        finite = torch.isfinite(outs[0].view(torch.float32))
        assert torch.equal(out[finite], outs[0][finite])  # NaN payloads may differ; NaN is refused anyway


@pytest.mark.parametrize("dim", [1, 15, 17, 64, 70, 100])
def test_every_form_keeps_the_sign_of_a_zero_made_of_underflowing_products(dim: int) -> None:
    """A negative product that underflows makes a lane -0.0: lanes past the last dimension must stay as they are
    (the AVX2 form's fma(0, 0, lane) once made them +0.0; found by a helper's Triton comparison)."""
    queries, docs = torch.full((1, dim), 1e-30), torch.full((1, dim), -1e-30)
    scores = {name: exact_tile(queries, docs, form) for name, form in FORMS.items() if RUNS[name]}
    for name, score in scores.items():
        # -0.0 where every one of the 64 lanes is (a lane still +0.0 makes the tree's sum +0.0)
        assert score.item() == 0.0 and torch.signbit(score).item() == (dim >= 64), name


def test_exact_scores_ignore_flush_to_zero_left_set_by_a_library() -> None:
    """A subnormal product must count: the kernel sets IEEE arithmetic for itself (FTZ/DAZ off) whatever the
    thread's floating-point state."""
    tiny = torch.full((1, 16), 2.0**-70)
    expected = model_dot(tiny[0].numpy(), tiny[0].numpy())
    assert expected > 0
    torch.set_flush_denormal(True)
    try:
        out = exact_tile(tiny, tiny)
    finally:
        torch.set_flush_denormal(False)
    assert out[0, 0].item() == float(expected)


@settings(max_examples=30, deadline=None)
@given(dim=st.integers(1, 70), seed=st.integers(0, 2**16), exponents=st.integers(0, 30))
def test_tk_l2_is_the_float64_sum_of_its_lanes_rounded_once(dim, seed, exponents) -> None:  # type: ignore[no-untyped-def]
    queries, docs = hard_rows(2, dim, seed, exponents), hard_rows(3, dim, seed + 3, exponents)
    out = exact_tile(queries, docs, squared=True)
    for r in range(2):
        for c in range(3):
            lanes = [0.0] * 8
            for i in range(dim):  # float64, in lane i % 8 (the differences and squares are exact in float64 here)
                difference = float(queries[r, i]) - float(docs[c, i])
                lanes[i % 8] += difference * difference
            expected = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
            assert out[r, c].item() == float(np.float32(expected)), (r, c)


def test_cosine_rows_are_divided_by_the_square_root_of_their_exact_square() -> None:
    generator = torch.Generator().manual_seed(2)
    rows = torch.randn(20, 37, generator=generator) * torch.exp2(torch.randint(-30, 30, (20, 1), generator=generator))
    rows[3] = 0.0
    rows[4] = 1e20  # its float32 sum of squares overflows: divided by its norm in double
    original = rows.clone()
    normalize(rows)
    for r in (0, 1, 2, 5, 19):
        norm = np.sqrt(model_dot(original[r].numpy(), original[r].numpy()), dtype=np.float32)
        assert torch.equal(rows[r], torch.from_numpy(original[r].numpy() / norm))
    assert torch.equal(rows[3], original[3])
    assert torch.allclose(rows[4].norm(), torch.tensor(1.0))
