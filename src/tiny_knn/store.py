"""Where the engine puts finished query batches: the Store protocol it writes to, and MemoryStore, the default.

The engine knows only the protocol: a checkpoint on disk (checkpoint.Checkpoint) and a torchrun job's merge
on rank 0 (distributed.MergingStore) take the batches the same way.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Store(Protocol):
    """Takes each finished batch, in order. `done_rows`: the queries already finished, after which a search
    starts (how a checkpoint resumes); `scores` (Q, k) and `indices` (Q, k): the result, once every batch is
    saved."""

    done_rows: int
    scores: torch.Tensor
    indices: torch.Tensor

    def save(self, start: int, scores: torch.Tensor, indices: torch.Tensor) -> None:
        """Stores the finished rows [start, start + len(scores))."""


class MemoryStore:
    """Finished batches kept in memory: for `search()`, and for runs of a single batch, where a
    checkpoint could only ever hold the final answer."""

    def __init__(self, rows: int, k: int) -> None:
        self.done_rows = 0
        self.rows = rows
        self.scores = torch.empty((rows, k), dtype=torch.float32)
        self.indices = torch.empty((rows, k), dtype=torch.int64)

    def save(self, start: int, scores: torch.Tensor, indices: torch.Tensor) -> None:
        """Stores the finished rows [start, start + len(scores)); batches arrive in order."""
        stop = start + scores.shape[0]
        if type(self) is MemoryStore and start == 0 and stop == self.rows:
            # One batch holds every row: keep its tensors rather than copy them (at k=2000 and 4096 queries,
            # 98 MB of fresh pages and a copy).
            self.scores, self.indices = scores.contiguous(), indices.contiguous()
        else:
            self.scores[start:stop] = scores
            self.indices[start:stop] = indices
        self.done_rows = stop
