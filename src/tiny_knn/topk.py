"""The running top-k of a block of queries: selection, merge, and the one tie rule.

Tie rule (it lives here and nowhere else): results are ordered by descending score, and equal scores by
ascending document index, so that the answer never depends on how the work was cut up. Both selectors
below rely on score tiles arriving in ascending document order for any given query row.

`ThresholdTopK` is the fast CPU path (a small C kernel: one compare per score, work only for survivors).
`PackedTopK` is the GPU path (torch.topk on packed 64-bit keys; no sort until the end; on CUDA, a Triton pass
that keeps each row's scores above its k-th best).
`SortMergeTopK` is the straightforward method, in plain PyTorch on any device; it is also the reference
both are tested against, bit for bit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import gpu_survivors
from .kernel import KERNEL, kernel_available
from .plan import ROW_ALIGN, doc_tiles, round_up

__all__ = [
    "MAX_KERNEL_DOCS",
    "PackedTopK",
    "RunningTopK",
    "SortMergeTopK",
    "ThresholdTopK",
    "kernel_available",
    "make_running_topk",
]

# Rows sorted at a time when a selector hands over its result (bounds the sorted copy).
FINALIZE_ROWS = 256
# Bytes of each of the two pinned buffers that large results from a GPU pass through (see to_host).
HOST_STAGE_BYTES = 64 * 2**20
# Docs are packed with their score into one 64-bit key, which leaves 32 bits for the doc index.
MAX_KERNEL_DOCS = 2**32
# The largest k for which PackedTopK takes its survivor pass (buffers of 2k per row, merged with the k held).
SURVIVOR_MAX_K = 2048


# score(lo, hi, doc_lo, doc_hi, out): writes the scores of (padded) query rows lo..hi against (padded) docs
# doc_lo..doc_hi of the current chunk into out.
ScoreRows = Callable[[int, int, int, int, torch.Tensor], None]


def pool_capacity(k: int) -> int:
    """Keys a query row can hold before compaction: at least k spare slots, so compaction is rare."""
    return k + max(k, 256)


_KERNEL = KERNEL


class RunningTopK(ABC):
    """The best `k` documents seen so far for each of `rows` queries."""

    def __init__(self, rows: int, k: int) -> None:
        self.rows = rows
        self.k = k
        self.survivors = 0  # scores that passed the threshold; a measure of selection work

    @abstractmethod
    def add(self, scores: torch.Tensor, row_start: int, first_doc: int) -> None:
        """Offers a float32 tile of scores: rows `row_start...` against docs `first_doc...`."""

    @abstractmethod
    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (scores float32 (rows, k), indices int64 (rows, k)), best first, on the CPU."""

    def uncertain_rows(self) -> torch.Tensor:
        """After result(): rows whose answer is not certified and must be searched again (int64 indices)."""
        return torch.empty(0, dtype=torch.int64)


class ThresholdTopK(RunningTopK):
    """CPU selector: each row keeps a pool of packed keys and a threshold, the k-th best score so far.

    `start_thresholds` may set a row's threshold above -inf from the start (an estimate). Scores at or
    below it are dropped unseen, so the row's answer is certified only if its k-th best score ends up
    strictly above the estimate; `uncertain_rows()` lists the rows where it did not.
    """

    def __init__(
        self, rows: int, k: int, threads: int | None = None, start_thresholds: torch.Tensor | None = None
    ) -> None:
        super().__init__(rows, k)
        if _KERNEL is None:
            raise RuntimeError("the tiny-knn selection kernel is not built")
        self._lib = _KERNEL
        self.capacity = pool_capacity(k)
        self._pools = torch.empty((rows, self.capacity), dtype=torch.int64)
        self._fills = torch.zeros(rows, dtype=torch.int32)
        self._thresholds = torch.full((rows,), float("-inf"), dtype=torch.float32)
        self._start_thresholds = None if start_thresholds is None else start_thresholds.to(torch.float32).cpu()
        if self._start_thresholds is not None:
            self._thresholds.copy_(self._start_thresholds)
        self._uncertain = torch.empty(0, dtype=torch.int64)
        self._threads = max(1, threads or torch.get_num_threads())
        # Each worker runs single-threaded matrix products (add_products), so that together they share the
        # cores the way one multi-threaded product would.
        self._executor = (
            ThreadPoolExecutor(self._threads, initializer=torch.set_num_threads, initargs=(1,))
            if self._threads > 1
            else None
        )
        self._tiles: list[torch.Tensor] = []

    @property
    def threads(self) -> int:
        return self._threads

    def _row_ranges(self, start: int, stop: int) -> list[tuple[int, int]]:
        """One range of rows per thread, each starting at a multiple of ROW_ALIGN."""
        parts = min(self._threads, max(1, (stop - start) // ROW_ALIGN))
        step = round_up(-(-(stop - start) // parts), ROW_ALIGN)
        return [(lo, min(lo + step, stop)) for lo in range(start, stop, step)]

    def _run(self, fn, ranges: list[tuple[int, int]]) -> list[int]:  # type: ignore[no-untyped-def]
        if self._executor is None or len(ranges) == 1:
            return [fn(part, lo, hi) for part, (lo, hi) in enumerate(ranges)]
        return list(self._executor.map(lambda args: fn(*args), [(part, *r) for part, r in enumerate(ranges)]))

    def _scan(self, scores: torch.Tensor, row_start: int, rows: int, cols: int, first_doc: int) -> int:
        """Scans rows 0..rows, cols 0..cols of `scores` (contiguous rows) as the selector's rows row_start..."""
        return int(
            self._lib.tk_scan(
                scores.data_ptr(),
                scores.stride(0),
                rows,
                cols,
                first_doc,
                self._thresholds.data_ptr() + row_start * 4,
                self._pools.data_ptr() + row_start * self.capacity * 8,
                self.capacity,
                self._fills.data_ptr() + row_start * 4,
                self.k,
            )
        )

    def add(self, scores: torch.Tensor, row_start: int, first_doc: int) -> None:
        if scores.dtype != torch.float32 or scores.stride(1) != 1 or scores.device.type != "cpu":
            raise ValueError("ThresholdTopK takes CPU float32 tiles with contiguous rows")
        rows, cols = scores.shape

        def scan(_part: int, lo: int, hi: int) -> int:
            return self._scan(scores[lo:hi], row_start + lo, hi - lo, cols, first_doc)

        self.survivors += sum(self._run(scan, self._row_ranges(0, rows)))

    def add_products(
        self, score: ScoreRows, first_doc: int, doc_count: int, padded_docs: int, block_rows: int, tile_docs: int
    ) -> None:
        """Scores all rows against a doc chunk and selects, each tile scanned while it is still in cache.

        Each thread takes its own rows, `block_rows` (a multiple of ROW_ALIGN) at a time, and for each block
        the chunk's docs `tile_docs` (a multiple of COL_ALIGN) at a time: `score(lo, hi, doc_lo, doc_hi,
        tile)` writes padded query rows lo..hi against the chunk's (padded) docs doc_lo..doc_hi into a tile of
        the thread's own, which is scanned at once; the chunk's first `doc_count` docs are real. Compared
        with one product over all rows and then a scan, the scores never travel to memory and back; and the
        threads wait for each other once per chunk, not once per tile.
        """

        def work(part: int, lo: int, hi: int) -> int:
            width = min(tile_docs, padded_docs)
            if self._tiles[part].numel() < block_rows * width:
                self._tiles[part] = torch.empty(block_rows * width, dtype=torch.float32)
            survivors = 0
            for start in range(lo, hi, block_rows):
                stop = min(start + block_rows, hi)
                padded = round_up(stop - start, ROW_ALIGN)
                for doc_lo, doc_hi, real in doc_tiles(doc_count, padded_docs, width):
                    tile = self._tiles[part][: padded * (doc_hi - doc_lo)].view(padded, doc_hi - doc_lo)
                    score(start, start + padded, doc_lo, doc_hi, tile)
                    survivors += self._scan(tile, start, stop - start, real, first_doc + doc_lo)
            return survivors

        ranges = self._row_ranges(0, self.rows)
        while len(self._tiles) < len(ranges):  # grown here, not by racing threads
            self._tiles.append(torch.empty(0, dtype=torch.float32))
        self.survivors += sum(self._run(work, ranges))

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.empty((self.rows, self.k), dtype=torch.float32)
        indices = torch.empty((self.rows, self.k), dtype=torch.int64)
        keys = self._pools.numpy().view(np.uint64)

        def finalize(_part: int, lo: int, hi: int) -> int:
            self._lib.tk_select_best(
                self._pools.data_ptr() + lo * self.capacity * 8,
                self.capacity,
                self._fills.data_ptr() + lo * 4,
                hi - lo,
                self.k,
            )
            # numpy's SIMD sort of 64-bit keys beats anything hand-written here; it releases the GIL. A few
            # rows at a time, so that the sorted copy stays small.
            for first in range(lo, hi, FINALIZE_ROWS):
                last = min(first + FINALIZE_ROWS, hi)
                best = np.sort(keys[first:last, : self.k], axis=1)
                self._lib.tk_decode(
                    best.ctypes.data,
                    best.size,
                    scores.data_ptr() + first * self.k * 4,
                    indices.data_ptr() + first * self.k * 8,
                )
            return 0

        self._run(finalize, self._row_ranges(0, self.rows))
        if self._executor is not None:
            self._executor.shutdown()
        # A row with fewer than k keys (the threshold kept out docs at or below it, or, with none set, fewer
        # than k docs scored above -inf) holds garbage past its fill: it must be searched again.
        uncertain = self._fills < self.k
        if self._start_thresholds is not None:
            uncertain |= scores[:, -1] <= self._start_thresholds
        self._uncertain = torch.nonzero(uncertain).flatten()
        return scores, indices

    def uncertain_rows(self) -> torch.Tensor:
        return self._uncertain


class SortMergeTopK(RunningTopK):
    """The straightforward method: top-k of each tile by stable sort, merged into the running top-k."""

    def __init__(self, rows: int, k: int, device: torch.device | str = "cpu") -> None:
        super().__init__(rows, k)
        # -inf placeholders with index -1 sort last and are pushed out once k real docs have been seen.
        self._scores = torch.full((rows, k), float("-inf"), dtype=torch.float32, device=device)
        self._indices = torch.full((rows, k), -1, dtype=torch.int64, device=device)

    def add(self, scores: torch.Tensor, row_start: int, first_doc: int) -> None:
        cols = scores.shape[1]
        # Adding 0.0 turns -0.0 into +0.0, as the kernel does, so the two order zeros alike.
        tile_scores, tile_order = torch.sort(scores + 0.0, dim=1, descending=True, stable=True)
        take = min(self.k, cols)
        self._merge(row_start, tile_scores[:, :take], tile_order[:, :take] + first_doc)

    def _merge(self, row_start: int, scores: torch.Tensor, indices: torch.Tensor) -> None:
        """Merges a tile's best (in rule order, doc indices above all seen so far) into rows row_start..."""
        stop = row_start + scores.shape[0]
        # Stable sorts keep ties in input order: running entries (smaller doc indices, already in rule
        # order) before the tile's (in rule order too), which is exactly ascending doc index.
        merged_scores = torch.cat([self._scores[row_start:stop], scores], dim=1)
        merged_indices = torch.cat([self._indices[row_start:stop], indices], dim=1)
        # Placeholders after every real doc, even one scoring -inf (a product that overflowed).
        real_first = torch.argsort((merged_indices < 0).to(torch.uint8), dim=1, stable=True)
        merged_scores, merged_indices = merged_scores.gather(1, real_first), merged_indices.gather(1, real_first)
        best_scores, pick = torch.sort(merged_scores, dim=1, descending=True, stable=True)
        self._scores[row_start:stop] = best_scores[:, : self.k]
        self._indices[row_start:stop] = torch.gather(merged_indices, 1, pick[:, : self.k])
        self.survivors += scores.numel()

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._scores.cpu(), self._indices.cpu()


class PackedTopK(RunningTopK):
    """The GPU selector (and the CPU's without the kernel): the same answer as SortMergeTopK, with no sort
    until the end.

    As in the C kernel, each (score, doc) is packed into one 64-bit key that orders by descending score,
    then ascending doc; keys are distinct, so the k best are simply the k smallest keys, a set that
    torch.topk finds exactly whatever its order. A tile's keys are merged into the running ones with one
    more torch.topk. Needs fewer than 2**32 docs.

    Which of a tile's keys are offered:
    - With the survivor pass (on CUDA with Triton, k <= SURVIVOR_MAX_K), once every row holds k docs: the
      scores above the row's k-th best so far (gpu_survivors). A doc scoring exactly the k-th best loses the
      tie to it (tiles arrive in ascending doc order), so nothing else can enter. Rows with more survivors
      than the buffer holds take the path below.
    - Otherwise torch.topk of the tile's scores, whose choice among copies of the k-th score is arbitrary,
      so rows where the (k+1)-th best ties with another of the best (rare but for heavily tied data) take
      the top-k of their packed keys instead.
    """

    def __init__(
        self, rows: int, k: int, device: torch.device | str = "cpu", survivor_pass: bool | None = None
    ) -> None:
        super().__init__(rows, k)
        self._keys = torch.full((rows, k), _EMPTY, dtype=torch.int64, device=device)
        if survivor_pass is None:
            survivor_pass = self._keys.is_cuda and k <= SURVIVOR_MAX_K and gpu_survivors.available()
        self._survivor_pass = survivor_pass

    def add(self, scores: torch.Tensor, row_start: int, first_doc: int) -> None:
        stop = row_start + scores.shape[0]
        running = self._keys[row_start:stop]
        capacity = survivor_capacity(self.k)
        if self._survivor_pass and first_doc >= self.k and capacity * 4 <= scores.shape[1]:
            keys = self._survivor_keys(scores, running, first_doc, capacity)
        else:
            keys = self._tile_keys(scores, first_doc)
        self._keys[row_start:stop] = torch.topk(
            torch.cat([running, keys], dim=1), self.k, dim=1, largest=False, sorted=False
        ).values
        self.survivors += keys.numel()

    def _tile_keys(self, scores: torch.Tensor, first_doc: int) -> torch.Tensor:
        """Keys holding the tile's k best of each row (and perhaps one more, made empty)."""
        cols = scores.shape[1]
        take = min(self.k, cols)
        if take * 2 > cols:  # topk saves little here: pack every score
            keys = _pack(scores, _doc_numbers(scores, first_doc, cols))
            return torch.topk(keys, take, dim=1, largest=False, sorted=False).values
        # One more than needed: the k best are certain where the (k+1)-th best is the only copy of its score
        # among them; it is then dropped (its key made empty).
        values, positions = torch.topk(scores, take + 1, dim=1, sorted=False)
        last = values.min(dim=1, keepdim=True)
        tied = torch.nonzero((values == last.values).sum(dim=1) > 1).flatten()
        keys = _pack(values, positions + first_doc).scatter_(1, last.indices, _EMPTY)
        if tied.numel():
            rows_tied = scores[tied]
            every = _pack(rows_tied, _doc_numbers(rows_tied, first_doc, cols))
            keys[tied, :take] = torch.topk(every, take, dim=1, largest=False, sorted=False).values
            keys[tied, take] = _EMPTY
        return keys

    def _survivor_keys(
        self, scores: torch.Tensor, running: torch.Tensor, first_doc: int, capacity: int
    ) -> torch.Tensor:
        """Keys of the scores above each row's k-th best so far (every running key is a real doc's), empty
        keys in the slots left over."""
        kth_best, _ = _unpack(running.max(dim=1).values)
        keys, counts = gpu_survivors.survivor_keys(scores, kth_best, first_doc, capacity, _EMPTY)
        overflowed = torch.nonzero(counts > capacity).flatten()
        if overflowed.numel():
            tile_keys = self._tile_keys(scores[overflowed], first_doc)
            keys[overflowed] = _EMPTY
            keys[overflowed, : tile_keys.shape[1]] = tile_keys
        return keys

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.sort(self._keys, dim=1).values
        scores, indices = _unpack(keys)
        empty = keys == _EMPTY  # fewer than k docs seen: -inf and -1, as SortMergeTopK
        return to_host(scores.masked_fill(empty, float("-inf"))), to_host(indices.masked_fill(empty, -1))


def survivor_capacity(k: int) -> int:
    """Survivors a row can take from one tile in PackedTopK's survivor pass. Once a row holds k docs, a
    tile as wide as all those seen so far has about k scores above its k-th best; twice that leaves room
    for chance and for corpora whose order brings nearer docs later."""
    return round_up(max(2 * k, 64), 64)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in (ordinary) host memory. From a GPU, large tensors go through two small pinned buffers in
    turn, the GPU filling one while the other is copied out: several times the rate of `.cpu()`, whose
    copies to pageable memory are staged by the driver."""
    flat = tensor.reshape(-1)
    step = max(1, HOST_STAGE_BYTES // tensor.element_size())
    if tensor.device.type == "cpu" or flat.numel() <= step:
        return tensor.cpu()
    out = torch.empty(tensor.shape, dtype=tensor.dtype)
    stages = [torch.empty(step, dtype=tensor.dtype, pin_memory=True) for _ in range(2)]
    filled = [torch.cuda.Event(), torch.cuda.Event()]  # type: ignore[no-untyped-call]
    pieces = [(lo, min(lo + step, flat.numel())) for lo in range(0, flat.numel(), step)]
    for index, (lo, hi) in enumerate([*pieces, (0, 0)]):
        if hi:  # the buffer was last read out two pieces ago, below
            stages[index % 2][: hi - lo].copy_(flat[lo:hi], non_blocking=True)
            filled[index % 2].record()
        if index:
            before_lo, before_hi = pieces[index - 1]
            filled[(index - 1) % 2].synchronize()
            out.view(-1)[before_lo:before_hi].copy_(stages[(index - 1) % 2][: before_hi - before_lo])
    return out


_EMPTY = torch.iinfo(torch.int64).max  # no doc yet: sorts after every key
_LOW_32 = 0xFFFFFFFF
_SIGN_32 = 0x80000000


def _doc_numbers(like: torch.Tensor, first_doc: int, cols: int) -> torch.Tensor:
    return torch.arange(first_doc, first_doc + cols, dtype=torch.int64, device=like.device).expand(like.shape[0], -1)


def _pack(scores: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """int64 keys, ascending in (score descending, doc ascending); -0.0 packs as +0.0. docs < 2**32."""
    bits = (scores + 0.0).view(torch.int32).to(torch.int64) & _LOW_32
    rising = torch.where(bits >= _SIGN_32, bits ^ _LOW_32, bits | _SIGN_32)  # larger score, larger bits
    return ((rising ^ _LOW_32) - _SIGN_32) * 2**32 + docs  # signed, so that int64 order is key order


def _unpack(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rising = ((keys >> 32) + _SIGN_32) ^ _LOW_32
    bits = torch.where(rising >= _SIGN_32, rising & (_SIGN_32 - 1), rising ^ _LOW_32)
    bits = torch.where(bits >= _SIGN_32, bits - 2**32, bits)  # as a signed 32-bit value
    return bits.to(torch.int32).view(torch.float32), keys & _LOW_32


def make_running_topk(
    rows: int,
    k: int,
    device: torch.device,
    docs: int,
    method: str = "auto",
    start_thresholds: torch.Tensor | None = None,
) -> RunningTopK:
    """Picks the selector: the C threshold kernel on CPU when built, else top-k and sort (any device).

    `start_thresholds` (threshold selector only) are estimated starting thresholds, see ThresholdTopK.
    """
    if method not in ("auto", "threshold", "sort"):
        raise ValueError(f"unknown selection method {method!r}")
    use_kernel = device.type == "cpu" and _KERNEL is not None and docs < MAX_KERNEL_DOCS
    if method == "threshold" and not use_kernel:
        raise RuntimeError("the threshold selector needs the CPU, the built kernel and fewer than 2**32 docs")
    if method != "sort" and use_kernel:
        return ThresholdTopK(rows, k, start_thresholds=start_thresholds)
    if docs < MAX_KERNEL_DOCS:
        return PackedTopK(rows, k, device)
    return SortMergeTopK(rows, k, device)
