"""The matrix products (product.py): the kernel's against an exactly rounded reference and float64, and
the bits of a score independent of how the product is split."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import assert_exact

from tiny_knn import search
from tiny_knn.errors import InvalidInputError
from tiny_knn.kernel import KERNEL
from tiny_knn.product import (
    DOC_PANEL,
    QUERY_PANEL,
    KernelProduct,
    ScreenedDocs,
    ScreenedProduct,
    TorchProduct,
    default_product,
    exact_scores,
    kernel_product_available,
    make_product,
    screen_available,
)

needs_kernel = pytest.mark.skipif(not kernel_product_available(), reason="the kernel's product needs AVX-512")


def _fma_chain(query: np.ndarray, doc: np.ndarray) -> np.float32:
    """The score the kernel promises: acc = fma(q[d], doc[d], acc) for d in order from acc = 0, each step
    rounded once to float32 (nearest, ties to even), computed in exact rational arithmetic."""
    acc = np.float32(0)
    for q, d in zip(query.tolist(), doc.tolist(), strict=True):
        acc = _round_to_float32(Fraction(q) * Fraction(d) + Fraction(float(acc)))
    return acc


def _round_to_float32(value: Fraction) -> np.float32:
    guess = np.float32(float(value))
    candidates = [guess, np.nextafter(guess, np.float32(np.inf)), np.nextafter(guess, np.float32(-np.inf))]
    finite = [c for c in candidates if np.isfinite(c)]
    best = min(abs(Fraction(float(c)) - value) for c in finite)
    nearest = [c for c in finite if abs(Fraction(float(c)) - value) == best]
    return min(nearest, key=lambda c: int(np.array(c).view(np.uint32)) & 1)  # a tie goes to the even one


def _packed_product(queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    product = KernelProduct(queries)
    out = torch.empty(queries.shape[0], docs.shape[0])
    product.score(0, queries.shape[0], product.prepare(docs, 0), 0, docs.shape[0], out)
    return out


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(
    query_panels=st.integers(1, 3),
    doc_panels=st.integers(1, 3),
    dim=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_each_score_is_one_fused_multiply_add_chain_in_order(query_panels, doc_panels, dim, seed) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(query_panels * QUERY_PANEL, dim, generator=generator)
    docs = torch.randn(doc_panels * DOC_PANEL, dim, generator=generator) * 3
    scores = _packed_product(queries, docs).numpy()
    for row, col in [(0, 0), (queries.shape[0] - 1, docs.shape[0] - 1), (seed % queries.shape[0], seed % 29)]:
        expected = _fma_chain(queries[row].numpy(), docs[col].numpy())
        assert scores[row, col].view(np.uint32) == np.array(expected).view(np.uint32)


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(data=st.data(), query_panels=st.integers(1, 6), doc_panels=st.integers(1, 8), dim=st.integers(1, 70))
def test_a_score_does_not_depend_on_how_the_product_is_split(data, query_panels, doc_panels, dim) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(query_panels * 1000 + doc_panels * 10 + dim)
    queries = torch.randn(query_panels * QUERY_PANEL, dim, generator=generator)
    docs = torch.randn(doc_panels * DOC_PANEL, dim, generator=generator)
    whole = _packed_product(queries, docs)
    exact = queries.double() @ docs.double().T
    bound = 2 * dim * np.finfo(np.float32).eps * (queries.double().abs() @ docs.double().abs().T) + 1e-30
    assert ((whole.double() - exact).abs() <= bound).all()
    product = KernelProduct(queries)
    operand = product.prepare(docs, 1)
    lo = QUERY_PANEL * data.draw(st.integers(0, query_panels - 1))
    hi = QUERY_PANEL * data.draw(st.integers(lo // QUERY_PANEL + 1, query_panels))
    doc_lo = DOC_PANEL * data.draw(st.integers(0, doc_panels - 1))
    doc_hi = DOC_PANEL * data.draw(st.integers(doc_lo // DOC_PANEL + 1, doc_panels))
    padded = torch.full((hi - lo, doc_hi - doc_lo + 5), float("nan"))
    out = padded[:, : doc_hi - doc_lo]  # rows apart by more than their width
    product.score(lo, hi, operand, doc_lo, doc_hi, out)
    assert torch.equal(out, whole[lo:hi, doc_lo:doc_hi])
    assert padded[:, doc_hi - doc_lo :].isnan().all()  # nothing written past the tile


needs_screen = pytest.mark.skipif(not screen_available(), reason="the screened product needs AVX-512 BF16")


def _screen_dot(query: np.ndarray, doc: np.ndarray) -> np.float32:
    """The score the screen promises (tk_dot): dimension i in lane i % 16 of accumulator (i // 16) % 4, each a
    fused multiply-add chain in order of i from 0, then (a0 + a1) + (a2 + a3) and the lanes halved as a tree
    (lane j + 8 onto j, then + 4, + 2, + 1); every step rounded once to float32, in exact arithmetic."""
    lanes = [[np.float32(0)] * 16 for _ in range(4)]
    for i, (q, d) in enumerate(zip(query.tolist(), doc.tolist(), strict=True)):
        acc = lanes[(i // 16) % 4]
        acc[i % 16] = _round_to_float32(Fraction(q) * Fraction(d) + Fraction(float(acc[i % 16])))
    total = [_add(_add(lanes[0][j], lanes[1][j]), _add(lanes[2][j], lanes[3][j])) for j in range(16)]
    for half in (8, 4, 2, 1):
        total = [_add(total[j], total[j + half]) for j in range(half)]
    return total[0]


def _add(a: np.float32, b: np.float32) -> np.float32:
    return _round_to_float32(Fraction(float(a)) + Fraction(float(b)))


@needs_screen
@settings(max_examples=25, deadline=None)
@given(
    dim=st.integers(1, 150),
    seed=st.integers(0, 2**16),
    exponents=st.integers(0, 40),
)
def test_the_screens_exact_scores_are_its_promised_sums(dim, seed, exponents) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-exponents, exponents + 1, (2, 3, dim), generator=generator).float())
    queries, docs = (
        torch.randn(2, dim, generator=generator) * scale[0, :2],
        torch.randn(3, dim, generator=generator) * scale[1],
    )
    out = torch.empty(2, 3)
    exact_scores(queries, docs, out)
    for r in range(2):
        for c in range(3):
            assert out[r, c].item() == float(_screen_dot(queries[r].numpy(), docs[c].numpy())), (r, c)
    product = ScreenedProduct(torch.cat([queries, torch.zeros(14, dim)]))
    tile = torch.empty(16, 64)
    product.score(0, 16, product.prepare(torch.cat([docs, torch.zeros(61, dim)]), 0), 0, 64, tile)
    assert torch.equal(tile[:2, :3], out)


@needs_screen
@pytest.mark.parametrize("dim", [1, 7, 16, 33, 40])
def test_the_screens_packing_rounds_to_even_and_measures_what_it_moved(dim) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(dim)
    docs = torch.randn(64, dim, generator=generator) * torch.exp2(torch.randint(-140, 100, (64, dim)).float())
    docs[0, 0], docs[1, 0], docs[2, 0], docs[3, :] = float("nan"), 3.4e38, 1e-39, 0.0  # NaN, to inf, subnormal
    packed = ScreenedProduct(torch.zeros(16, dim)).prepare(docs, 0)
    assert isinstance(packed, ScreenedDocs)
    words = packed.packed.numpy().view(np.uint32).reshape(2, (dim + 1) // 2, 32)  # panel, pair, row
    halves = np.stack([words & 0xFFFF, words >> 16], axis=-1).transpose(0, 2, 1, 3).reshape(64, -1)[:, :dim]
    values = (halves.astype(np.uint32) << 16).view(np.float32)
    bits = docs.numpy().view(np.uint32).astype(np.uint64)
    expected = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint32)  # to nearest, ties to even
    expected[np.isnan(docs.numpy())] = 0x7FC0
    expected[(expected & 0x7F80) == 0] &= 0x8000  # subnormals flushed, as VDPBF16PS reads them
    assert np.array_equal(halves, expected)
    if dim % 2:  # the last word of an odd row: its high half is padding
        assert (words[:, -1, :] >> 16 == 0).all()
    finite = np.isfinite(docs.numpy()).all(axis=1) & (docs.double().norm(dim=1) < 2.0**60).numpy()
    x, r = docs.double().numpy()[finite], values.astype(np.float64)[finite]
    size = np.maximum(np.maximum(np.linalg.norm(x, axis=1), np.linalg.norm(r, axis=1)), 2.0**-40)
    assert np.allclose(packed.norms.numpy()[finite], size, rtol=1e-6)
    assert (packed.norms.numpy()[finite] >= size * (1 - 1e-12)).all()  # rounded up
    assert np.allclose(packed.resid.numpy()[finite], np.linalg.norm(r - x, axis=1), rtol=1e-6)
    assert np.isinf(packed.norms.numpy()[~finite]).all()  # NaN or too large: every pair scored exactly


@needs_screen
@pytest.mark.parametrize(("k", "chunk_size", "batch_size"), [(10, 1000, None), (700, 3000, None), (2000, 4096, 40)])
def test_a_screened_search_equals_sorting_every_exact_score(monkeypatch, k, chunk_size, batch_size) -> None:  # type: ignore[no-untyped-def]
    """The whole engine with the screen (several chunks and batches, the sampled starting threshold at k=700
    and 2000, the first chunk's seed at k=10) against a stable sort of every pair's exact score (tk_dot)."""
    monkeypatch.setenv("TINY_KNN_PRODUCT", "screen")
    generator = torch.Generator().manual_seed(k)
    queries, docs = torch.randn(93, 48, generator=generator), torch.randn(20_000, 48, generator=generator)
    docs[5000:5100] = docs[7]  # exact ties across chunks
    scores, indices = search(queries, docs, k=k, device="cpu", chunk_size=chunk_size, batch_size=batch_size)
    every = torch.empty(93, 20_000)
    exact_scores(queries, docs, every)
    expected_scores, order = torch.sort(every + 0.0, dim=1, descending=True, stable=True)
    assert torch.equal(indices, order[:, :k]) and torch.equal(scores, expected_scores[:, :k])


@needs_screen
def test_the_screen_screens_however_few_rows_each_thread_has(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Only the fused pass screens; with fewer rows than threads x 16 it still runs (on fewer threads), and
    the exact scores of every pair (ScreenedProduct.score) are left to the paths that need whole tiles."""
    monkeypatch.setenv("TINY_KNN_PRODUCT", "screen")
    monkeypatch.setattr(ScreenedProduct, "score", lambda *args, **kwargs: pytest.fail("scored every pair"))
    generator = torch.Generator().manual_seed(5)
    queries, docs = torch.randn(70, 24, generator=generator), torch.randn(5000, 24, generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(8)  # 70 rows < 8 x 16: other products take one product per block on all threads
    try:
        scores, indices = search(queries, docs, k=20, device="cpu")
    finally:
        torch.set_num_threads(threads)
    every = torch.empty(70, 5000)
    exact_scores(queries, docs, every)
    expected_scores, order = torch.sort(every, dim=1, descending=True, stable=True)
    assert torch.equal(indices, order[:, :20]) and torch.equal(scores, expected_scores[:, :20])


@needs_screen
@pytest.mark.parametrize("threads", [1, 3])
def test_the_screens_whole_tiles_split_over_threads_change_no_bit(threads) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(threads)
    product = ScreenedProduct(torch.randn(16, 40, generator=generator))
    operand = product.prepare(torch.randn(7 * DOC_PANEL, 40, generator=generator), 0)
    assert isinstance(operand, ScreenedDocs)
    split = torch.empty(16, 6 * DOC_PANEL)
    product.score(0, 16, operand, DOC_PANEL, 7 * DOC_PANEL, split, threads=threads)
    alone = torch.empty(16, 6 * DOC_PANEL)
    exact_scores(product.query_rows, operand.rows[DOC_PANEL:], alone)
    assert torch.equal(alone, split)


@needs_kernel
def test_integer_products_equal_torch_mm() -> None:
    generator = torch.Generator().manual_seed(3)
    queries = torch.randint(-50, 51, (24, 384), generator=generator).float()
    docs = torch.randint(-50, 51, (96, 384), generator=generator).float()
    assert torch.equal(_packed_product(queries, docs), queries @ docs.T)  # exact in float32: no rounding


@needs_kernel
def test_ranges_off_the_panels_are_refused() -> None:
    product = KernelProduct(torch.randn(16, 4))
    operand = product.prepare(torch.randn(64, 4), 0)
    with pytest.raises(ValueError, match=r"cannot take rows 4\.\.12"):
        product.score(4, 12, operand, 0, 32, torch.empty(8, 32))
    with pytest.raises(ValueError, match=r"by docs 0\.\.48"):
        product.score(0, 8, operand, 0, 48, torch.empty(8, 48))


def test_the_plan_names_the_product(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from tiny_knn import product

    monkeypatch.setattr(product, "KERNEL_MIN_QUERIES", 64)  # the real threshold (conftest lowers it)
    kernel = "kernel" if kernel_product_available() else "torch"
    screen = "screen" if screen_available() else kernel
    assert default_product("cuda", 4096) == "torch"
    assert default_product("cpu", 4096) == screen
    assert default_product("cpu", 4096, screenable=False) == kernel  # l2 or bf16 precision
    assert default_product("cpu", 63) == "torch"  # too few queries to pay for packing every doc
    monkeypatch.setattr(product, "kernel_product_faster", lambda: False)  # Intel: MKL's own AVX-512 path
    assert default_product("cpu", 4096) == "torch"
    monkeypatch.setenv("TINY_KNN_PRODUCT", "kernel")
    assert (default_product("cpu", 4096), default_product("cpu", 8), default_product("cuda", 4096)) == (
        kernel,
        kernel,
        "torch",
    )
    monkeypatch.setenv("TINY_KNN_PRODUCT", "screen")
    assert (default_product("cpu", 8), default_product("cpu", 8, screenable=False)) == (screen, kernel)
    monkeypatch.setenv("TINY_KNN_PRODUCT", "mkl")
    with pytest.raises(InvalidInputError, match="TINY_KNN_PRODUCT='mkl': expected auto, screen, kernel or torch"):
        default_product("cpu", 4096)
    monkeypatch.setattr(product, "kernel_product_faster", lambda: True)
    monkeypatch.setenv("TINY_KNN_PRODUCT", "torch")
    assert default_product("cpu", 4096) == "torch"
    monkeypatch.delenv("TINY_KNN_PRODUCT")
    monkeypatch.setenv("TINY_KNN_TORCH_PRODUCT", "1")
    assert default_product("cpu", 4096) == "torch"
    monkeypatch.setenv("TINY_KNN_PRODUCT", "kernel")  # the older switch wins, as it did before
    assert default_product("cpu", 4096) == "torch"


@pytest.mark.skipif(KERNEL is None or not os.path.exists("/proc/cpuinfo"), reason="needs the kernel and Linux")
def test_the_kernel_is_preferred_on_amd_processors_only() -> None:
    with open("/proc/cpuinfo") as cpuinfo:
        amd = "AuthenticAMD" in cpuinfo.read()
    assert KERNEL is not None and bool(KERNEL.tk_cpu_is_amd()) == amd  # conftest patches kernel_product_faster
    assert type(make_product(torch.randn(16, 4), "torch")) is TorchProduct


@pytest.mark.parametrize("name", ["screen", "kernel", "torch"])
@pytest.mark.parametrize("k", [1, 25, 700])
def test_every_product_gives_exact_answers(monkeypatch, name, k) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TINY_KNN_PRODUCT", name)
    generator = torch.Generator().manual_seed(11)
    queries, docs = torch.randn(37, 19, generator=generator), torch.randn(3001, 19, generator=generator)
    scores, indices = search(queries, docs, k=k, device="cpu")
    assert_exact(queries, docs, scores, indices)


@needs_kernel
@pytest.mark.parametrize("threads", [2, 3, 8])
def test_a_product_split_over_threads_changes_no_bit(threads) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(threads)
    queries, docs = torch.randn(16, 40, generator=generator), torch.randn(7 * DOC_PANEL, 40, generator=generator)
    product = KernelProduct(queries)
    operand = product.prepare(docs, 0)
    alone, split = torch.empty(16, 6 * DOC_PANEL), torch.empty(16, 6 * DOC_PANEL)
    product.score(0, 16, operand, DOC_PANEL, 7 * DOC_PANEL, alone)
    product.score(0, 16, operand, DOC_PANEL, 7 * DOC_PANEL, split, threads=threads)
    assert torch.equal(alone, split)
    with pytest.raises(ValueError, match="no docs"):
        product.score(0, 16, operand, 0, 8 * DOC_PANEL, torch.empty(16, 8 * DOC_PANEL))


def test_a_kernel_built_from_older_source_is_not_used(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import ctypes

    from tiny_knn import kernel

    load = ctypes.CDLL

    class Stale:  # the library as an older _select.c built it: one function short
        def __init__(self, path: str) -> None:
            self._lib = load(path)

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            if name == "tk_cpu_is_amd":
                raise AttributeError(name)
            return getattr(self._lib, name)

    monkeypatch.setattr(ctypes, "CDLL", Stale)
    assert kernel._load() is None
    monkeypatch.undo()
    assert (kernel._load() is None) == (KERNEL is None)
