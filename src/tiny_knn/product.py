"""Scoring: the matrix products of query rows by doc rows, the floor under every search's time.

Two ways, chosen by the plan (`Plan.product`, from `default_product`):
- "kernel" (an AMD CPU with AVX-512, the compiled kernel built, KERNEL_MIN_QUERIES queries or more):
  `_select.c`'s own product. Every score is one float32 fused multiply-add chain over the dimensions in
  order, so its bits depend only on the two rows, never on blocks, tiles or threads. Both operands are packed
  first: the queries once per pass, each doc chunk on the reader thread as it arrives. On AMD Zen 5, where
  MKL's sgemm takes its AVX2 path, it runs at about 2.3 x torch.mm (benchmarks/RESULTS.md). On an Intel
  Xeon, where MKL has its own AVX-512 path, it ran at 0.66 x torch.mm, so Intel CPUs take torch.mm.
- "torch" (CUDA, other CPUs, fewer queries, or TINY_KNN_TORCH_PRODUCT=1): torch.mm on the rows as they are.

TINY_KNN_PRODUCT=kernel or =torch overrides the choice (the kernel still needs AVX-512).

The two agree to float32 rounding, not bit for bit; a plan uses one of them for all its products.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

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


def default_product(device: str, queries: int) -> str:
    """The product a plan for `queries` queries on `device` uses: "kernel" on a CPU where it runs and is the
    faster, for KERNEL_MIN_QUERIES queries or more; else "torch". TINY_KNN_PRODUCT=kernel|torch overrides,
    and TINY_KNN_TORCH_PRODUCT=1 (the older switch) means torch whatever TINY_KNN_PRODUCT says.

    Raises:
        InvalidInputError: TINY_KNN_PRODUCT is set to something else.
    """
    choice = os.environ.get("TINY_KNN_PRODUCT", "auto")
    if choice not in ("auto", "kernel", "torch"):
        raise InvalidInputError(f"TINY_KNN_PRODUCT={choice!r}: expected auto, kernel or torch")
    if os.environ.get("TINY_KNN_TORCH_PRODUCT"):
        choice = "torch"
    if device != "cpu" or choice == "torch" or not kernel_product_available():
        return "torch"
    return "kernel" if choice == "kernel" or (queries >= KERNEL_MIN_QUERIES and kernel_product_faster()) else "torch"


class TorchProduct:
    """torch.mm of the query rows by doc rows, which stay as they are read."""

    def __init__(self, query_rows: torch.Tensor) -> None:
        self.query_rows = query_rows

    def prepare(self, doc_rows: torch.Tensor, slot: int) -> torch.Tensor:
        """The operand that `score` takes for these (padded) doc rows."""
        return doc_rows

    def score(
        self, lo: int, hi: int, operand: torch.Tensor, doc_lo: int, doc_hi: int, out: torch.Tensor, threads: int = 1
    ) -> None:
        """out = scores of query rows lo..hi by the operand's docs doc_lo..doc_hi, on up to `threads` threads
        (torch.mm: torch's own). Call with threads > 1 only from outside the product's thread pool."""
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

    def prepare(self, doc_rows: torch.Tensor, slot: int) -> torch.Tensor:
        """Packs the doc rows into the slot's buffer (reused: the caller is done with the slot's last chunk)."""
        self._packed_docs[slot] = self._pack(doc_rows, DOC_PANEL, self._packed_docs[slot])
        return self._packed_docs[slot]

    def score(
        self, lo: int, hi: int, operand: torch.Tensor, doc_lo: int, doc_hi: int, out: torch.Tensor, threads: int = 1
    ) -> None:
        rows, docs = hi - lo, doc_hi - doc_lo
        if out.shape != (rows, docs) or out.stride(1) != 1 or hi * self.dim > self.packed_queries.numel():
            raise ValueError(f"the kernel's product cannot write rows {lo}..{hi} by docs {doc_lo}..{doc_hi} there")
        if doc_hi * self.dim > operand.numel():
            raise ValueError(f"the kernel's product has no docs {doc_lo}..{doc_hi} in this operand")
        parts = min(threads, docs // DOC_PANEL)
        if parts <= 1:
            self._score(lo, hi, operand, doc_lo, doc_hi, out)
            return
        # Each thread its own columns (whole panels): the scores are the same whatever the split
        step = -(-docs // parts // DOC_PANEL) * DOC_PANEL
        pieces = [(start, min(start + step, doc_hi)) for start in range(doc_lo, doc_hi, step)]
        pool = _split_pool(threads)
        for done in [
            pool.submit(self._score, lo, hi, operand, a, b, out[:, a - doc_lo : b - doc_lo]) for a, b in pieces
        ]:
            done.result()

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


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _split_pool(threads: int) -> ThreadPoolExecutor:
    """A pool of `threads` threads for products split by columns (kept for the process: idle threads cost
    nothing, and a product is split on every tile)."""
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="tiny-knn-product")
    return _POOLS[threads]


def make_product(query_rows: torch.Tensor, product: str) -> TorchProduct:
    """The plan's product (`Plan.product`) for these query rows."""
    return KernelProduct(query_rows) if product == "kernel" else TorchProduct(query_rows)
