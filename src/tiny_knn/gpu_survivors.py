"""The GPU selector's threshold pass: a Triton kernel that keeps, for each row of a score tile, the scores
above that row's threshold and the columns they came from.

torch.topk over a whole tile costs about the same for any k: 5.9 ms for 8192 x 65536 scores on an H200,
over a third of the time of the tile's float32 product. Once a row holds k docs, only scores above its k-th
best can change its answer. Finding those takes one read of the tile, and the merge then runs on a few
columns per row instead of a whole tile's.

Optional: without Triton, or with TINY_KNN_NO_TRITON set, `available()` is False and the selector takes
torch.topk of every tile, with the same results.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

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


@functools.cache
def _kernel() -> tuple[Any, Any]:
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[untyped-decorator]
    def survivors_kernel(  # type: ignore[no-untyped-def]
        scores_ptr,
        row_stride,
        cols,
        thresholds_ptr,
        first_doc,
        keys_ptr,
        counts_ptr,
        capacity,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < cols
        scores = tl.load(scores_ptr + row * row_stride + offsets, mask=inside, other=float("-inf"))
        keep = (scores > tl.load(thresholds_ptr + row)) & inside
        kept = keep.to(tl.int32)
        count = tl.sum(kept, axis=0)
        if count > 0:
            first = tl.atomic_add(counts_ptr + row, count)  # this block's slots: first, first + 1, ...
            slots = first + tl.cumsum(kept, axis=0) - 1
            # topk._pack, lane by lane: -0.0 as +0.0, the bits made to rise with the score, then flipped
            # (best first) and shifted above the doc number.
            bits = scores.to(tl.int32, bitcast=True)
            bits = tl.where(bits == -2147483648, 0, bits).to(tl.int64) & 0xFFFFFFFF
            rising = tl.where(bits >= 0x80000000, bits ^ 0xFFFFFFFF, bits | 0x80000000)
            keys = ((rising ^ 0xFFFFFFFF) - 0x80000000) * 4294967296 + (offsets.to(tl.int64) + first_doc)
            tl.store(keys_ptr + row * capacity + slots, keys, mask=keep & (slots < capacity))

    return triton, survivors_kernel


def survivor_keys(
    scores: torch.Tensor, thresholds: torch.Tensor, first_doc: int, capacity: int, empty: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row r of `scores` (rows, cols; each row contiguous; column c is doc first_doc + c), the
    packed keys (topk._pack) of the scores strictly above thresholds[r] (float32, one per row), in the first
    min(count, capacity) slots of row r of a (rows, capacity) int64 tensor, in no particular order, `empty`
    in the other slots; and each row's count (int32), which exceeds capacity where the row had more
    survivors than room (some are then missing)."""
    rows, cols = scores.shape
    assert scores.stride(1) == 1 and thresholds.dtype == torch.float32
    keys = torch.full((rows, capacity), empty, dtype=torch.int64, device=scores.device)
    counts = torch.zeros(rows, dtype=torch.int32, device=scores.device)
    if rows and cols:
        triton, kernel = _kernel()
        grid = (rows, triton.cdiv(cols, BLOCK_COLS))
        kernel[grid](
            scores, scores.stride(0), cols, thresholds.contiguous(), first_doc, keys, counts, capacity,
            BLOCK=BLOCK_COLS,
        )  # fmt: skip
    return keys, counts
