"""Scoring: the matrix products of query rows by doc rows, the floor under every search's time.

Three ways, chosen by the plan (`Plan.product`, from `default_product`):
- "screen" (as "kernel", on a CPU with AVX-512 BF16, for inner-product and cosine searches): `_select.c`'s
  screened product. Every pair is first estimated from rows rounded to bfloat16, at twice the float32 rate,
  and only pairs whose estimate comes within a proven error bound of their row's k-th best score so far are
  scored exactly; the rest provably cannot be among the k best. The exact score (`tk_dot`) is 64 float32
  fused multiply-add chains over the dimensions (dimension i in lane i mod 16 of accumulator i // 16 mod 4),
  then a fixed tree: its bits depend only on the two rows, and the answer is that of scoring every pair with
  it (tests check this bit for bit). On the Intel Xeon measured, the bfloat16 estimates took 2.2 x MKL's
  float32 product, so, like the kernel, it is the default on AMD CPUs only.
- "kernel" (an AMD CPU with AVX-512, the compiled kernel built, KERNEL_MIN_QUERIES queries or more):
  `_select.c`'s own product. Every score is one float32 fused multiply-add chain over the dimensions in
  order, so its bits depend only on the two rows, never on blocks, tiles or threads. Both operands are packed
  first: the queries once per pass, each doc chunk on the reader thread as it arrives. On AMD Zen 5, where
  MKL's sgemm takes its AVX2 path, it runs at about 2.3 x torch.mm (benchmarks/RESULTS.md). On an Intel
  Xeon, where MKL has its own AVX-512 path, it ran at 0.66 x torch.mm, so Intel CPUs take torch.mm.
- "torch" (CUDA, other CPUs, fewer queries, or TINY_KNN_TORCH_PRODUCT=1): torch.mm on the rows as they are.

TINY_KNN_PRODUCT=screen, =kernel or =torch overrides the choice (the kernel still needs AVX-512, the screen
AVX-512 BF16, and l2 searches take the kernel for a screen).

The three agree to float32 rounding, not bit for bit; a plan uses one of them for all its products.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .errors import InvalidInputError
from .kernel import KERNEL

QUERY_PANEL = 8  # the kernel's panels: query rows and doc rows per micro-kernel call (TK_MR, TK_NR)
DOC_PANEL = 32
# Fewer queries than this take torch.mm: packing every doc costs more than the kernel saves on so few rows
# (200,000 x 384 docs, 2 cores: torch.mm faster at 32 queries, the kernel at 64; RESULTS.md)
KERNEL_MIN_QUERIES = 64


def kernel_product_available() -> bool:
    """True when the kernel's product runs here: built, on a CPU with AVX-512."""
    return KERNEL is not None and bool(KERNEL.tk_product_supported())


def kernel_product_faster() -> bool:
    """True where the kernel's product was measured faster than torch.mm: AMD CPUs, where MKL takes its AVX2
    path (2.3 x on Zen 5). On an Intel Xeon, MKL's AVX-512 path was faster (1.93 against 2.93 s, 2 threads)."""
    return KERNEL is not None and bool(KERNEL.tk_cpu_is_amd())


def screen_available() -> bool:
    """True when the screened product runs here: built, on a CPU with AVX-512 BF16."""
    return KERNEL is not None and bool(KERNEL.tk_screen_supported())


def default_product(device: str, queries: int, screenable: bool = True) -> str:
    """The product a plan for `queries` queries on `device` uses: on a CPU where the kernel runs and is the
    faster, for KERNEL_MIN_QUERIES queries or more, "screen" where it runs and the search is `screenable`
    (inner product or cosine, float32), else "kernel"; "torch" otherwise. TINY_KNN_PRODUCT=screen|kernel|torch
    overrides, and TINY_KNN_TORCH_PRODUCT=1 (the older switch) means torch whatever TINY_KNN_PRODUCT says.

    Raises:
        InvalidInputError: TINY_KNN_PRODUCT is set to something else.
    """
    choice = os.environ.get("TINY_KNN_PRODUCT", "auto")
    if choice not in ("auto", "screen", "kernel", "torch"):
        raise InvalidInputError(f"TINY_KNN_PRODUCT={choice!r}: expected auto, screen, kernel or torch")
    if os.environ.get("TINY_KNN_TORCH_PRODUCT"):
        choice = "torch"
    if device != "cpu" or choice == "torch" or not kernel_product_available():
        return "torch"
    if choice == "auto" and not (queries >= KERNEL_MIN_QUERIES and kernel_product_faster()):
        return "torch"
    return "screen" if choice != "kernel" and screenable and screen_available() else "kernel"


@dataclass
class ScreenedDocs:
    """A doc chunk as the screened product takes it: the float32 rows (padded), their bfloat16 panels, and
    each row's norm and rounding residual (tk_pack_bf16)."""

    rows: torch.Tensor
    packed: torch.Tensor
    norms: torch.Tensor
    resid: torch.Tensor


# What a product scores a doc chunk from: the rows themselves, or what its `prepare` made of them
Operand = torch.Tensor | ScreenedDocs


class TorchProduct:
    """torch.mm of the query rows by doc rows, which stay as they are read."""

    def __init__(self, query_rows: torch.Tensor) -> None:
        self.query_rows = query_rows

    def prepare(self, doc_rows: torch.Tensor, slot: int) -> Operand:
        """The operand that `score` takes for these (padded) doc rows."""
        return doc_rows

    def score(
        self, lo: int, hi: int, operand: Operand, doc_lo: int, doc_hi: int, out: torch.Tensor, threads: int = 1
    ) -> None:
        """out = scores of query rows lo..hi by the operand's docs doc_lo..doc_hi, on up to `threads` threads
        (torch.mm: torch's own). Call with threads > 1 only from outside the product's thread pool."""
        assert isinstance(operand, torch.Tensor)
        torch.mm(self.query_rows[lo:hi], operand[doc_lo:doc_hi].T, out=out)


class KernelProduct(TorchProduct):
    """The kernel's product on packed operands. Query rows come padded to a multiple of QUERY_PANEL, doc rows
    to a multiple of DOC_PANEL (the plan's ROW_ALIGN and COL_ALIGN are multiples of both)."""

    def __init__(self, query_rows: torch.Tensor) -> None:
        super().__init__(query_rows)
        assert KERNEL is not None and query_rows.dtype == torch.float32 and query_rows.device.type == "cpu"
        self.dim = query_rows.shape[1]
        self.packed_queries = self._pack(query_rows, QUERY_PANEL, torch.empty(0))
        self._packed_docs = [torch.empty(0), torch.empty(0)]  # one per slot: the reader fills one while one is used

    def _pack(self, rows: torch.Tensor, panel: int, out: torch.Tensor) -> torch.Tensor:
        assert KERNEL is not None and rows.shape[0] % panel == 0 and rows.stride(1) == 1
        if out.numel() < rows.numel():
            out = torch.empty(rows.numel(), dtype=torch.float32)
        KERNEL.tk_pack(rows.data_ptr(), rows.stride(0), rows.shape[0], self.dim, panel, out.data_ptr())
        return out

    def prepare(self, doc_rows: torch.Tensor, slot: int) -> Operand:
        """Packs the doc rows into the slot's buffer (reused: the caller is done with the slot's last chunk)."""
        self._packed_docs[slot] = self._pack(doc_rows, DOC_PANEL, self._packed_docs[slot])
        return self._packed_docs[slot]

    def score(
        self, lo: int, hi: int, operand: Operand, doc_lo: int, doc_hi: int, out: torch.Tensor, threads: int = 1
    ) -> None:
        assert isinstance(operand, torch.Tensor)
        rows, docs = hi - lo, doc_hi - doc_lo
        if out.shape != (rows, docs) or out.stride(1) != 1 or hi * self.dim > self.packed_queries.numel():
            raise ValueError(f"the kernel's product cannot write rows {lo}..{hi} by docs {doc_lo}..{doc_hi} there")
        if doc_hi * self.dim > operand.numel():
            raise ValueError(f"the kernel's product has no docs {doc_lo}..{doc_hi} in this operand")
        _split_columns(functools.partial(self._score, lo, hi, operand), doc_lo, doc_hi, out, threads)

    def _score(self, lo: int, hi: int, operand: torch.Tensor, doc_lo: int, doc_hi: int, out: torch.Tensor) -> None:
        assert KERNEL is not None
        done = KERNEL.tk_product(
            self.packed_queries.data_ptr(),
            self.dim,
            lo,
            hi - lo,
            operand.data_ptr(),
            doc_lo,
            doc_hi - doc_lo,
            out.data_ptr(),
            out.stride(0),
        )
        if done != 0:
            raise ValueError(f"the kernel's product cannot take rows {lo}..{hi} by docs {doc_lo}..{doc_hi}")


class ScreenedProduct(TorchProduct):
    """The screened product (see the module's docstring). Query rows come padded to a multiple of QUERY_PANEL,
    doc rows to a multiple of DOC_PANEL, as for KernelProduct. Only the fused pass
    (topk.ThresholdTopK.add_screened) screens; `score` writes every exact score (tk_dot), for the few tiles
    that take another path."""

    def __init__(self, query_rows: torch.Tensor) -> None:
        assert KERNEL is not None and query_rows.dtype == torch.float32 and query_rows.device.type == "cpu"
        super().__init__(query_rows.contiguous())
        self.dim = query_rows.shape[1]
        # Each query's slack factors (a_q, b_q in _select.c)
        self.packed_queries, self.query_a, self.query_b = self._pack(self.query_rows, QUERY_PANEL, True, None)
        self._docs: list[ScreenedDocs | None] = [None, None]  # one per slot, reused

    def _pack(
        self, rows: torch.Tensor, panel: int, queries: bool, reuse: ScreenedDocs | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows in bfloat16 panels, and two factors per row: for queries a_q and b_q, for docs the norm and
        residual; in reuse's buffers where they are large enough."""
        assert KERNEL is not None and rows.shape[0] % panel == 0 and rows.stride(1) == 1
        count, words = rows.shape[0], rows.shape[0] * ((self.dim + 1) // 2)
        if reuse is not None and reuse.packed.numel() >= words and reuse.norms.numel() >= count:
            packed, first, second = reuse.packed, reuse.norms, reuse.resid
        else:
            packed, first, second = torch.empty(words, dtype=torch.int32), torch.empty(count), torch.empty(count)
        KERNEL.tk_pack_bf16(
            rows.data_ptr(),
            rows.stride(0),
            count,
            self.dim,
            panel,
            int(queries),
            packed.data_ptr(),
            first.data_ptr(),
            second.data_ptr(),
        )
        return packed, first, second

    def prepare(self, doc_rows: torch.Tensor, slot: int) -> Operand:
        """Packs the doc rows into the slot's buffers (reused: the caller is done with the slot's last chunk)."""
        docs = self._docs[slot] = ScreenedDocs(doc_rows, *self._pack(doc_rows, DOC_PANEL, False, self._docs[slot]))
        return docs

    def score(
        self, lo: int, hi: int, operand: Operand, doc_lo: int, doc_hi: int, out: torch.Tensor, threads: int = 1
    ) -> None:
        assert isinstance(operand, ScreenedDocs)
        queries, rows = self.query_rows[lo:hi], operand.rows

        def part(first: int, last: int, into: torch.Tensor) -> None:
            exact_scores(queries, rows[first:last], into)

        _split_columns(part, doc_lo, doc_hi, out, threads)


def exact_scores(query_rows: torch.Tensor, doc_rows: torch.Tensor, out: torch.Tensor) -> None:
    """out = the screened product's exact scores (tk_dot) of float32 query rows by doc rows (contiguous)."""
    assert KERNEL is not None and query_rows.stride(1) == 1 and doc_rows.stride(1) == 1 and out.stride(1) == 1
    done = KERNEL.tk_dot_tile(
        query_rows.data_ptr(),
        query_rows.stride(0),
        query_rows.shape[0],
        doc_rows.data_ptr(),
        doc_rows.stride(0),
        doc_rows.shape[0],
        query_rows.shape[1],
        out.data_ptr(),
        out.stride(0),
    )
    if done != 0:
        raise ValueError("the screened product's exact scores need AVX-512")


def _split_columns(
    score: Callable[[int, int, torch.Tensor], None], doc_lo: int, doc_hi: int, out: torch.Tensor, threads: int
) -> None:
    """score(a, b, out's columns a - doc_lo..b - doc_lo) for docs doc_lo..doc_hi, each of up to `threads` threads
    its own columns (whole panels): a product whose scores are the same whatever the split."""
    parts = min(threads, (doc_hi - doc_lo) // DOC_PANEL)
    if parts <= 1:
        score(doc_lo, doc_hi, out)
        return
    step = -(-(doc_hi - doc_lo) // parts // DOC_PANEL) * DOC_PANEL
    pieces = [(start, min(start + step, doc_hi)) for start in range(doc_lo, doc_hi, step)]
    pool = _split_pool(threads)
    for done in [pool.submit(score, a, b, out[:, a - doc_lo : b - doc_lo]) for a, b in pieces]:
        done.result()


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _split_pool(threads: int) -> ThreadPoolExecutor:
    """A pool of `threads` threads for products split by columns (kept for the process: idle threads cost
    nothing, and a product is split on every tile)."""
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="tiny-knn-product")
    return _POOLS[threads]


def make_product(query_rows: torch.Tensor, product: str) -> TorchProduct:
    """The plan's product (`Plan.product`) for these query rows."""
    if product == "screen":
        return ScreenedProduct(query_rows)
    return KernelProduct(query_rows) if product == "kernel" else TorchProduct(query_rows)
