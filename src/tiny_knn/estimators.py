"""Estimating: the products that decide which pairs the screen scores exactly (`_kernels/screen.c`).

An estimator computes, for a block of query rows and a chunk of docs, an estimate of every score within a proven
bound of its exact score, and hands the estimates to the screen, which scores exactly (tiny-knn's one definition
of a score, `_kernels/tk.h`) only the pairs the bound cannot rule out and offers those to the selection. The
answer is therefore that of scoring every pair exactly, bit for bit, whichever estimator ran:
- "screen": bfloat16 estimates by VDPBF16PS (AVX-512 BF16), fused with the screen: no estimate leaves registers;
- "kernel": float32 estimates by tiny-knn's AVX-512 product, fused likewise;
- "torch": float32 estimates by torch.mm (MKL, OpenBLAS: whatever BLAS torch has), a tile at a time;
- "torch-bf16": bfloat16 estimates by torch.mm on rows rounded to bfloat16 here, their products summed in float32
  by oneDNN (torch's "medium" float32 matmul precision: AMX or AVX-512 BF16 where the CPU has them), a tile at a
  time.
Which one runs is measured (backend.py), or forced with TINY_KNN_PRODUCT. All need the compiled kernel.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .kernel import CPU_FEATURES, HAS_AVX512BF16, HAS_AVX512BW, KERNEL, PANELS
from .plan import ROW_ALIGN, round_up

ESTIMATORS = ("screen", "kernel", "torch", "torch-bf16")
QUERY_PANEL, DOC_PANEL = PANELS
# tk_prepare_rows's flags, and the metric's code in the screen (_kernels/screen.c)
_BF16, _QUERY, _L2 = 1, 2, 4
_METRIC_CODES = {"ip": 0, "cosine": 0, "l2": 1}

# The selection state of rows from a given row on: thresholds, pools, capacity, fills, k (topk.ThresholdTopK)
RowState = Callable[[int], tuple[int, int, int, int, int, int | None, int | None]]


@dataclass
class Operand:
    """Rows as an estimator takes them: the float32 rows (padded, contiguous), their factors in the screen's
    bound (queries: a_q, b_q; docs: n_d, r_d; l2 also |q|^2 or |d|^2 / 2), and the estimator's own form of them
    (packed panels, rows rounded to bfloat16, or nothing)."""

    rows: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor
    third: torch.Tensor | None
    form: torch.Tensor | None


def available() -> list[str]:
    """The estimators that run here: the fused ones where the CPU has their instructions, the others wherever the
    compiled kernel is built."""
    if KERNEL is None:
        return []
    names = ["torch", "torch-bf16"]
    if CPU_FEATURES & HAS_AVX512BW:
        names.insert(0, "kernel")
    if CPU_FEATURES & HAS_AVX512BF16:
        names.insert(0, "screen")
    return names


def make_estimator(name: str, metric: str, dim: int, block_rows: int = 1024, tile_docs: int = 1024) -> Estimator:
    """The estimator `name` for a search of `metric` at `dim` dims (tiles of block_rows x tile_docs, for those
    that estimate into a tile).

    Raises:
        ValueError: the name is unknown, or that estimator does not run here.
    """
    if name not in available():
        raise ValueError(f"estimator {name!r} does not run here (available: {', '.join(available()) or 'none'})")
    if name in ("screen", "kernel"):
        return Fused(name, metric, dim)
    return Tiled(name, metric, dim, block_rows, tile_docs)


class Estimator:
    """What every estimator does: prepare rows (`prepare`), then screen a thread's query rows against a chunk of
    docs (`screen`), on that thread."""

    name: str
    bf16: bool
    # The float32 matmul precision torch must be set to while this estimator runs (torch.set_float32_matmul_precision)
    matmul_precision = "highest"

    def __init__(self, name: str, metric: str, dim: int) -> None:
        self.name, self.metric, self.dim = name, metric, dim
        self.bf16 = name in ("screen", "torch-bf16")
        self._slots: dict[int, Operand] = {}

    def prepare(self, rows: torch.Tensor, query: bool, slot: int | None = None) -> Operand:
        """The operand for these float32 rows (padded: queries to ROW_ALIGN, docs to the chunk's alignment; cosine
        rows already of unit length). Docs come with the reader's buffer number (`slot`): its buffers are reused,
        so the caller must be done with the slot's last chunk."""
        assert KERNEL is not None and rows.dtype == torch.float32 and rows.stride(1) == 1
        count, l2 = rows.shape[0], self.metric == "l2"
        reuse = self._slots.get(slot) if slot is not None else None
        if reuse is None or reuse.first.numel() < count:
            form = self._empty_form(count, query)
            reuse = Operand(rows, torch.empty(count), torch.empty(count), torch.empty(count) if l2 else None, form)
        operand = Operand(rows, reuse.first, reuse.second, reuse.third, reuse.form)
        flags = (_BF16 if self.bf16 else 0) | (_QUERY if query else 0) | (_L2 if l2 else 0)
        panel = QUERY_PANEL if query else DOC_PANEL
        packed = operand.form if self.name == "screen" else None
        rounded = operand.form if self.name == "torch-bf16" else None
        KERNEL.tk_prepare_rows(
            rows.data_ptr(),
            rows.stride(0),
            count,
            self.dim,
            flags,
            panel,
            _address(packed),
            _address(rounded),
            self.dim,
            operand.first.data_ptr(),
            operand.second.data_ptr(),
            _address(operand.third),
        )
        if self.name == "kernel":
            assert operand.form is not None
            KERNEL.tk_pack(rows.data_ptr(), rows.stride(0), count, self.dim, panel, operand.form.data_ptr())
        if slot is not None:
            self._slots[slot] = operand
        return operand

    def _empty_form(self, count: int, query: bool) -> torch.Tensor | None:
        return None

    def screen(
        self,
        state: RowState,
        queries: Operand,
        lo: int,
        hi: int,
        docs: Operand,
        first_doc: int,
        doc_count: int,
        scratch: list[torch.Tensor],
    ) -> tuple[int, bool]:
        """Screens query rows lo..hi (of the selector's rows, which are the operand's) against the chunk's first
        doc_count docs (numbered first_doc..), offering the pairs it cannot rule out, exactly scored, to the
        selection (`state`). `scratch` holds this thread's reusable buffer. Returns (pairs scored exactly, whether
        any exact score was NaN or infinite)."""
        raise NotImplementedError


class Fused(Estimator):
    """An estimator whose estimates are screened while still in registers (tk_screen_scan): no tile is written."""

    def _empty_form(self, count: int, query: bool) -> torch.Tensor | None:
        if self.name == "screen":
            return torch.empty(count * ((self.dim + 1) // 2), dtype=torch.int32)  # bfloat16 pairs, one word each
        return torch.empty(count * self.dim, dtype=torch.float32)

    def screen(
        self,
        state: RowState,
        queries: Operand,
        lo: int,
        hi: int,
        docs: Operand,
        first_doc: int,
        doc_count: int,
        scratch: list[torch.Tensor],
    ) -> tuple[int, bool]:
        assert KERNEL is not None and queries.form is not None and docs.form is not None
        padded_docs = round_up(doc_count, DOC_PANEL)
        if round_up(hi, QUERY_PANEL) > queries.rows.shape[0] or padded_docs > docs.rows.shape[0]:
            raise ValueError(f"operands too small for rows {lo}..{hi} by {doc_count} docs")
        flag = ctypes.c_int32(0)
        scored = KERNEL.tk_screen_scan(
            1 if self.name == "screen" else 2,
            _METRIC_CODES[self.metric],
            queries.form.data_ptr(),
            docs.form.data_ptr(),
            queries.first.data_ptr(),
            queries.second.data_ptr(),
            _address(queries.third),
            queries.rows.data_ptr(),
            queries.rows.stride(0),
            self.dim,
            lo,
            round_up(hi - lo, QUERY_PANEL),
            hi - lo,
            docs.first.data_ptr(),
            docs.second.data_ptr(),
            _address(docs.third),
            docs.rows.data_ptr(),
            docs.rows.stride(0),
            padded_docs,
            doc_count,
            first_doc,
            *state(lo),
            ctypes.addressof(flag),
        )
        if scored < 0:
            raise ValueError(f"the {self.name} estimator cannot screen rows {lo}..{hi} by {doc_count} docs")
        return int(scored), bool(flag.value)

    def estimate_tile(
        self, queries: Operand, lo: int, hi: int, docs: Operand, doc_lo: int, doc_hi: int
    ) -> torch.Tensor:
        """The estimates the fused screen compares, for padded query rows lo..hi by padded docs doc_lo..doc_hi, as
        a tile (tests check the bound with them)."""
        assert KERNEL is not None and queries.form is not None and docs.form is not None
        out = torch.empty((hi - lo, doc_hi - doc_lo), dtype=torch.float32)
        estimate = KERNEL.tk_estimate_bf16 if self.name == "screen" else KERNEL.tk_product
        done = estimate(
            queries.form.data_ptr(), self.dim, lo, hi - lo, docs.form.data_ptr(), doc_lo, doc_hi - doc_lo,
            out.data_ptr(), out.stride(0),
        )  # fmt: skip
        if done != 0:
            raise ValueError(f"the {self.name} estimator cannot estimate rows {lo}..{hi} by docs {doc_lo}..{doc_hi}")
        return out


class Tiled(Estimator):
    """An estimator that writes a tile of estimates with torch.mm (each thread its own, single-threaded), which
    the screen then reads (tk_screen_tile): block_rows query rows by tile_docs docs at a time, so that the tile
    is still in cache when it is screened.

    The products come in a few shapes only (`_window`): oneDNN, behind torch-bf16's products, keeps about 1 MiB
    for every shape it has seen (its primitive cache, and torch's), so products shaped by the remainders of
    batches and chunks (a range search's chunks shrink batch by batch) grew memory past any budget."""

    def __init__(self, name: str, metric: str, dim: int, block_rows: int, tile_docs: int) -> None:
        super().__init__(name, metric, dim)
        self.block_rows, self.tile_docs = block_rows, tile_docs
        self.matmul_precision = "medium" if name == "torch-bf16" else "highest"

    def _empty_form(self, count: int, query: bool) -> torch.Tensor | None:
        return torch.empty((count, self.dim), dtype=torch.float32) if self.name == "torch-bf16" else None

    def estimate(self, queries: torch.Tensor, docs: torch.Tensor, out: torch.Tensor) -> None:
        """out = the estimates of these query rows by these doc rows (tests wrap this to perturb them)."""
        torch.mm(queries, docs.T, out=out)

    def screen(
        self,
        state: RowState,
        queries: Operand,
        lo: int,
        hi: int,
        docs: Operand,
        first_doc: int,
        doc_count: int,
        scratch: list[torch.Tensor],
    ) -> tuple[int, bool]:
        assert KERNEL is not None
        query_values = queries.form if queries.form is not None else queries.rows
        doc_values = docs.form if docs.form is not None else docs.rows
        flag, scored = ctypes.c_int32(0), 0
        for start in range(lo, hi, self.block_rows):
            stop = min(start + self.block_rows, hi)
            row_lo, rows = _window(start, stop - start, self.block_rows, query_values.shape[0], ROW_ALIGN)
            for doc_lo in range(0, doc_count, self.tile_docs):
                doc_hi = min(doc_lo + self.tile_docs, doc_count)
                col_lo, cols = _window(doc_lo, doc_hi - doc_lo, self.tile_docs, doc_values.shape[0], DOC_PANEL)
                if scratch[0].numel() < rows * cols:
                    scratch[0] = torch.empty(rows * cols, dtype=torch.float32)
                tile = scratch[0][: rows * cols].view(rows, cols)
                self.estimate(query_values[row_lo : row_lo + rows], doc_values[col_lo : col_lo + cols], tile)
                scored += KERNEL.tk_screen_tile(
                    _METRIC_CODES[self.metric],
                    tile.data_ptr() + ((start - row_lo) * cols + doc_lo - col_lo) * 4,
                    cols,
                    stop - start,
                    doc_hi - doc_lo,
                    queries.first.data_ptr() + start * 4,
                    queries.second.data_ptr() + start * 4,
                    _address(queries.third, start),
                    docs.first.data_ptr() + doc_lo * 4,
                    docs.second.data_ptr() + doc_lo * 4,
                    _address(docs.third, doc_lo),
                    queries.rows.data_ptr() + start * queries.rows.stride(0) * 4,
                    queries.rows.stride(0),
                    docs.rows.data_ptr() + doc_lo * docs.rows.stride(0) * 4,
                    docs.rows.stride(0),
                    self.dim,
                    first_doc + doc_lo,
                    *state(start),
                    ctypes.addressof(flag),
                )
        return scored, bool(flag.value)


def _window(first: int, count: int, full: int, capacity: int, align: int) -> tuple[int, int]:
    """The rows (first row, count) a product computes to cover rows first..first+count of an operand of
    `capacity` rows, in steps of `full` (block rows, tile docs): `count` rounded up to a quarter of `full`
    (aligned), at most `full` and `capacity`, moved back where it would run past the operand. Its rows past
    those wanted are estimated, never screened (a form's rows past the chunk's are stale, but finite)."""
    quarter = round_up(-(-full // 4), align)
    size = min(round_up(count, quarter), full, capacity)
    return min(first, capacity - size), size


def _address(tensor: torch.Tensor | None, offset: int = 0) -> int | None:
    """The address of a float32 tensor's element `offset` (the first by default), or None (NULL) for no tensor."""
    return None if tensor is None else tensor.data_ptr() + offset * tensor.element_size()
