"""The GPU selector's threshold pass: a Triton kernel that appends, for each row of a score tile, the packed
keys of the scores above that row's threshold to the row's pool (topk.PoolTopK).

torch.topk over a whole tile costs about the same for any k: 5.9 ms for 8192 x 65536 scores on an H200,
over a third of the time of the tile's float32 product. Once a row holds k docs, only scores above its k-th
best can change its answer; finding them takes one read of the tile.

Optional: without Triton, or with TINY_KNN_NO_TRITON set, `available()` is False and the GPU takes
torch.topk of every tile (topk.PackedTopK), with the same results.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import torch

from .errors import TinyKnnWarning, first_sentence

BLOCK_COLS = 2048  # scores one program reads


def available() -> bool:
    """Whether the kernel can run (Triton importable, not switched off)."""
    if os.environ.get("TINY_KNN_NO_TRITON"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def runs_on(device: str) -> bool:
    """Whether the kernel compiles and runs on `device` (a trial on a tiny tile, once per process and device):
    Triton can be installed where it cannot build (no C compiler, a GPU it does not support). Warns if not."""
    return available() and _trial(device)


@functools.cache
def _trial(device: str) -> bool:
    try:
        pool = torch.zeros((1, 4), dtype=torch.int64, device=device)
        fills = torch.zeros(1, dtype=torch.int32, device=device)
        thresholds = torch.tensor([1.5], device=device)
        append_survivors(torch.tensor([[1.0, 2.0]], device=device), thresholds, 0, pool, fills)
        if int(fills[0]) == 1:
            return True
        trouble = f"it kept {int(fills[0])} of 1 score in a trial"
    except Exception as exc:  # whatever Triton raises while compiling or launching
        trouble = f"{type(exc).__name__}: {first_sentence(exc)}"
    message = f"tiny-knn: the Triton selection kernel does not run here ({trouble}); selecting with torch.topk"
    warnings.warn(message, TinyKnnWarning, stacklevel=4)
    return False


@functools.cache
def _kernel() -> tuple[Any, Any]:
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[untyped-decorator]
    def append_kernel(  # type: ignore[no-untyped-def]
        scores_ptr,
        row_stride,
        cols,
        thresholds_ptr,
        first_doc,
        pool_ptr,
        fills_ptr,
        capacity,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < cols
        scores = tl.load(scores_ptr + row * row_stride + offsets, mask=inside, other=float("-inf"))
        threshold = tl.load(thresholds_ptr + row)
        open_row = (threshold == float("-inf")).to(tl.int32)  # fewer than k docs held: every score is kept
        kept = tl.maximum((scores > threshold).to(tl.int32), open_row) * inside.to(tl.int32)
        keep = kept > 0
        count = tl.sum(kept, axis=0)
        if count > 0:
            first = tl.atomic_add(fills_ptr + row, count)  # this block's slots: first, first + 1, ...
            slots = first + tl.cumsum(kept, axis=0) - 1
            # topk._pack, lane by lane: -0.0 as +0.0, the bits made to rise with the score, then flipped
            # (best first) and shifted above the doc number.
            bits = scores.to(tl.int32, bitcast=True)
            bits = tl.where(bits == -2147483648, 0, bits).to(tl.int64) & 0xFFFFFFFF
            rising = tl.where(bits >= 0x80000000, bits ^ 0xFFFFFFFF, bits | 0x80000000)
            keys = ((rising ^ 0xFFFFFFFF) - 0x80000000) * 4294967296 + (offsets.to(tl.int64) + first_doc)
            tl.store(pool_ptr + row * capacity + slots, keys, mask=keep & (slots < capacity))

    return triton, append_kernel


def append_survivors(
    scores: torch.Tensor, thresholds: torch.Tensor, first_doc: int, pool: torch.Tensor, fills: torch.Tensor
) -> None:
    """For each row r of `scores` (rows, cols; each row contiguous; column c is doc first_doc + c), appends
    the packed keys (topk._pack) of the scores strictly above thresholds[r] (float32; every score where it is
    -inf) to row r of `pool` (rows, capacity; int64, contiguous) from slot fills[r] on, in no particular
    order, and adds their number to fills[r] (int32). Keys past the capacity are dropped, so a fill above
    the capacity means the row lost some."""
    rows, cols = scores.shape
    assert scores.stride(1) == 1 and pool.is_contiguous() and fills.is_contiguous()
    assert thresholds.dtype == torch.float32 and pool.dtype == torch.int64 and fills.dtype == torch.int32
    if rows and cols:
        triton, kernel = _kernel()
        grid = (rows, triton.cdiv(cols, BLOCK_COLS))
        kernel[grid](
            scores, scores.stride(0), cols, thresholds.contiguous(), first_doc, pool, fills, pool.shape[1],
            BLOCK=BLOCK_COLS,
        )  # fmt: skip
