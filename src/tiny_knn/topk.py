"""The running top-k of a block of queries: selection, merge, and the one tie rule.

Tie rule (it lives here and nowhere else): results are ordered by descending score, and equal scores by
ascending document index, so that the answer never depends on how the work was cut up. Both selectors
below rely on score tiles arriving in ascending document order for any given query row.

`ThresholdTopK` is the fast CPU path (a small C kernel: one compare per score, work only for survivors).
`PoolTopK` is the GPU path (a Triton pass appends each row's scores above its threshold to a pool of packed
64-bit keys, cut back to the k best by torch.topk now and then; the GPU's screen offers it scattered exact
scores instead, `offer`); `PackedTopK` the GPU's without Triton
(torch.topk of every tile's packed keys). Neither sorts until the end.
`SortMergeTopK` is the straightforward method, in plain PyTorch on any device; it is also the reference
both are tested against, bit for bit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import gpu_survivors
from .estimators import Estimator, Operand
from .exclusions import Exclusions
from .kernel import KERNEL, kernel_available
from .plan import ROW_ALIGN, gpu_pool_capacity, gpu_result_slice_rows, pool_capacity, round_up

__all__ = [
    "MAX_KERNEL_DOCS",
    "PackedTopK",
    "PoolTopK",
    "RunningTopK",
    "SortMergeTopK",
    "ThresholdTopK",
    "default_selection",
    "kernel_available",
    "make_running_topk",
]

# Rows sorted at a time when a selector hands over its result (bounds the sorted copy).
FINALIZE_ROWS = 256
# Bytes of each of the two pinned buffers that large results from a GPU pass through (see to_host).
HOST_STAGE_BYTES = 64 * 2**20
# Docs are packed with their score into one 64-bit key, which leaves 32 bits for the doc index.
MAX_KERNEL_DOCS = 2**32


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

    `excluded` (add_chunk only): pairs never offered, each row's docs numbered as add_chunk's first_doc counts.
    """

    def __init__(
        self,
        rows: int,
        k: int,
        threads: int | None = None,
        start_thresholds: torch.Tensor | None = None,
        excluded: Exclusions | None = None,
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
        self._excluded = excluded
        self._threads = max(1, threads or torch.get_num_threads())
        # Each worker runs single-threaded matrix products (add_products), so that together they share the
        # cores the way one multi-threaded product would.
        self._executor = (
            ThreadPoolExecutor(self._threads, initializer=torch.set_num_threads, initargs=(1,))
            if self._threads > 1
            else None
        )
        self._scratch: list[list[torch.Tensor]] = []  # a buffer per thread, for estimators that write tiles

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
                *self._row_state(row_start),
            )
        )

    def _row_state(self, row_start: int) -> tuple[int, int, int, int, int]:
        """The kernel's arguments for the selection state from row row_start on: thresholds, pools, capacity,
        fills, k (tk_scan, tk_product_scan)."""
        pools = self._pools.data_ptr() + row_start * self.capacity * 8
        return (
            self._thresholds.data_ptr() + row_start * 4,
            pools,
            self.capacity,
            self._fills.data_ptr() + row_start * 4,
            self.k,
        )

    def _screen_state(self, row_start: int) -> tuple[int, int, int, int, int, int | None, int | None]:
        """_row_state, and the excluded pairs' offsets from row row_start on and docs (tk_screen_scan,
        tk_screen_tile)."""
        excluded = self._excluded
        if excluded is None:
            return (*self._row_state(row_start), None, None)
        return (*self._row_state(row_start), excluded.offsets.ctypes.data + row_start * 8, excluded.docs.ctypes.data)

    def add(self, scores: torch.Tensor, row_start: int, first_doc: int) -> None:
        if scores.dtype != torch.float32 or scores.stride(1) != 1 or scores.device.type != "cpu":
            raise ValueError("ThresholdTopK takes CPU float32 tiles with contiguous rows")
        rows, cols = scores.shape

        def scan(_part: int, lo: int, hi: int) -> int:
            return self._scan(scores[lo:hi], row_start + lo, hi - lo, cols, first_doc)

        self.survivors += sum(self._run(scan, self._row_ranges(0, rows)))

    def add_chunk(self, estimator: Estimator, queries: Operand, docs: Operand, first_doc: int, doc_count: int) -> bool:
        """Screens every row against a chunk of docs with `estimator` (estimators.py): each thread its own rows,
        whose pairs the estimates cannot rule out are scored exactly and offered to their pools. The chunk's first
        `doc_count` docs are real. Returns True if any exact score was NaN or infinite."""
        non_finite: list[bool] = []
        ranges = self._row_ranges(0, self.rows)
        while len(self._scratch) < len(ranges):  # grown here, not by racing threads
            self._scratch.append([torch.empty(0, dtype=torch.float32)])

        def work(part: int, lo: int, hi: int) -> int:
            scored, flagged = estimator.screen(
                self._screen_state, queries, lo, hi, docs, first_doc, doc_count, self._scratch[part]
            )
            if flagged:
                non_finite.append(True)
            return scored

        self.survivors += sum(self._run(work, ranges))
        return bool(non_finite)

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
    """The GPU selector without Triton (and the CPU's without the kernel): the same answer as SortMergeTopK,
    with no sort until the end.

    As in the C kernel, each (score, doc) is packed into one 64-bit key that orders by descending score,
    then ascending doc; keys are distinct, so the k best are simply the k smallest keys, a set that
    torch.topk finds exactly whatever its order. Per tile: the tile's best keys (tile_best_keys), merged
    into the running ones with one more torch.topk. Needs fewer than 2**32 docs.
    """

    def __init__(self, rows: int, k: int, device: torch.device | str = "cpu") -> None:
        super().__init__(rows, k)
        self._keys = torch.full((rows, k), _EMPTY, dtype=torch.int64, device=device)

    def add(self, scores: torch.Tensor, row_start: int, first_doc: int) -> None:
        stop = row_start + scores.shape[0]
        keys = tile_best_keys(scores, first_doc, self.k)
        merged = torch.cat([self._keys[row_start:stop], keys], dim=1)
        self._keys[row_start:stop] = torch.topk(merged, self.k, dim=1, largest=False, sorted=False).values
        self.survivors += keys.numel()

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _sorted_result(self._keys)


class PoolTopK(RunningTopK):
    """The CUDA selector where Triton is installed: PackedTopK's keys, kept in a pool per row the way the C
    kernel keeps its own, so that a tile costs one read instead of a torch.topk over it.

    gpu_survivors' kernel appends to each row's pool the keys of the tile's scores above the row's threshold
    (any score while it is -inf). The threshold is the k-th best key's score at the pool's last cut, when
    the pool was cut back to its k best by torch.topk; a doc scoring exactly that loses the tie to the doc
    that set it (tiles arrive in ascending doc order for each row), so nothing that can still enter the
    answer is left out. The pool is cut when the next tile might not fit: each tile brings fewer survivors
    than the one before as the threshold rises. Rows that overflow anyway (the first tile, at -inf) take
    that tile's keys from tile_best_keys instead. Needs fewer than 2**32 docs.
    """

    def __init__(
        self, rows: int, k: int, device: torch.device | str = "cpu", start_thresholds: torch.Tensor | None = None
    ) -> None:
        super().__init__(rows, k)
        self.capacity = gpu_pool_capacity(k)
        self._pool = torch.full((rows, self.capacity), _EMPTY, dtype=torch.int64, device=device)
        self._fills = torch.zeros(rows, dtype=torch.int32, device=device)
        # A start threshold (offer only) is a floor under each row's threshold, as in ThresholdTopK
        self._floor = torch.full((rows,), float("-inf"), dtype=torch.float32, device=device)
        if start_thresholds is not None:
            self._floor.copy_(start_thresholds)
        self._thresholds = self._floor.clone()
        self._uncertain = torch.empty(0, dtype=torch.int64)
        # offer's host-side bookkeeping, so that it needs no synchronisation: no row holds more keys than
        # _fill_bound; _open until the first cut after some row may hold k keys
        self._fill_bound, self._open = 0, True

    @property
    def thresholds(self) -> torch.Tensor:
        """Each row's threshold (float32, on the pool's device): every doc that can still enter the row's k best
        scores at least this (its k-th best at the last cut, at least the start threshold)."""
        return self._thresholds

    def add(self, scores: torch.Tensor, row_start: int, first_doc: int) -> None:
        if not scores.numel():
            return
        if scores.stride(1) != 1:
            scores = scores.contiguous()
        rows = slice(row_start, row_start + scores.shape[0])
        if first_doc == 0 and scores.shape[1] > self.capacity:  # every row would overflow
            self._cut(rows, tile_best_keys(scores, first_doc, self.k))
            return
        fills = self._fills[rows]
        before = fills.clone()
        gpu_survivors.append_survivors(scores, self._thresholds[rows], first_doc, self._pool[rows], fills)
        counts = fills - before
        most_filled, most_added, added = torch.stack([fills.max(), counts.max(), counts.sum()]).tolist()
        self.survivors += added
        if most_filled > self.capacity:  # these rows lost some of the tile's keys: take its best from topk
            slots = torch.arange(self.capacity, device=scores.device)
            # an eighth of the block at a time: the copies of their scores stay within the plan's estimate
            every_lost, group = torch.nonzero(fills > self.capacity).flatten(), -(-scores.shape[0] // 8)
            for start in range(0, every_lost.numel(), group):
                lost = every_lost[start : start + group]
                held = self._pool[rows][lost].masked_fill_(slots >= before[lost].unsqueeze(1), _EMPTY)
                best = tile_best_keys(scores[lost], first_doc, self.k)
                self._cut(lost + row_start, torch.cat([held, best], dim=1))
        if most_filled + 2 * most_added + 64 > self.capacity:  # the next tile might not fit
            self._cut(rows, self._pool[rows])

    def offer(self, rows: torch.Tensor, docs: torch.Tensor, scores: torch.Tensor, most: int | None = None) -> None:
        """Offers scattered exact scores: scores[i] (float32) of doc docs[i] for row rows[i] (int64, on the pool's
        device; docs numbered as the answer numbers them), in any order, each (row, doc) at most once over the
        whole search. A doc < 0 is no doc (an excluded pair): it takes no place. `most`: how many of them any one
        row receives at most, if the caller knows (else it is counted here, which reads it back to the host).

        Unlike add, any order of docs is fine: the keys are kept as they come, and each cut keeps the k smallest
        keys, (score, doc) together. The pools are cut before they could overflow (a row offered more than a cut
        pool holds takes its keys in turns), and when cutting would raise the thresholds much. A pool is fed by
        offer or by add, never both: each keeps its own count of the room left."""
        count = rows.numel()
        if not count:
            return
        keys = torch.where(docs < 0, _EMPTY, _pack(scores, docs.clamp(min=0)))
        per_row = torch.zeros(self.rows, dtype=torch.int64, device=rows.device)
        per_row.index_add_(0, rows, torch.ones_like(rows))
        most = int(per_row.max()) if most is None else most
        order = torch.argsort(rows, stable=True)
        rows, keys = rows[order], keys[order]
        rank = torch.arange(count, device=rows.device) - (torch.cumsum(per_row, 0) - per_row)[rows]
        room = self.capacity - self.k  # what a cut pool holds besides its k best
        for first in range(0, most, room):
            turn = min(room, most - first)
            if self._fill_bound + turn > self.capacity:
                self.cut()
            turn_rows, turn_keys, turn_rank = rows, keys, rank
            if turn < most:  # a row with more keys than room (a pass's first docs): reads the turn's size back
                inside = torch.nonzero((rank >= first) & (rank < first + turn)).flatten()
                turn_rows, turn_keys, turn_rank = rows[inside], keys[inside], rank[inside] - first
            self._pool[turn_rows, self._fills[turn_rows].long() + turn_rank] = turn_keys
            self._fills += (per_row - first).clamp(0, turn).to(torch.int32)
            self._fill_bound += turn
        self.survivors += count
        if (self._open and self._fill_bound >= self.k) or self._fill_bound + 2 * min(most, room) + 64 > self.capacity:
            self.cut()
            self._open = False

    def cut(self) -> None:
        """Cuts every row's pool back to its k best, raising the thresholds to the k-th best's score."""
        self._cut(slice(None), self._pool)
        self._fill_bound = self.k

    def _cut(self, rows: slice | torch.Tensor, keys: torch.Tensor) -> None:
        """Sets the pools of `rows` to the k best of `keys` (one row of keys each) and their thresholds to the
        k-th best's score (-inf while fewer than k docs are held), or the start threshold if higher."""
        best = torch.topk(keys, self.k, dim=1, largest=False, sorted=False).values
        worst = best.max(dim=1).values
        scores, _ = _unpack(worst)
        pool = torch.full((best.shape[0], self.capacity), _EMPTY, dtype=torch.int64, device=best.device)
        pool[:, : self.k] = best
        self._pool[rows] = pool
        self._fills[rows] = self.k
        self._thresholds[rows] = torch.maximum(scores.masked_fill(worst == _EMPTY, float("-inf")), self._floor[rows])

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best of each row, best first, on the host: taken and copied out a slice of rows at a time
        (gpu_result_slice_rows), so that a big batch's answer never needs a second full-size copy on the device."""
        scores = torch.empty((self.rows, self.k), dtype=torch.float32)
        indices = torch.empty((self.rows, self.k), dtype=torch.int64)
        step = gpu_result_slice_rows(self.k)
        for lo in range(0, self.rows, step):
            best = torch.topk(self._pool[lo : lo + step], self.k, dim=1, largest=False, sorted=False).values
            scores[lo : lo + step], indices[lo : lo + step] = _sorted_result(best)
        # With a start threshold, docs scoring at or below it may have been left out (offer's caller screens by
        # the thresholds): the row is certified only if its k-th best is above it, as in ThresholdTopK
        floor = self._floor.cpu()
        self._uncertain = torch.nonzero((scores[:, -1] <= floor) & (floor > float("-inf"))).flatten()
        return scores, indices

    def uncertain_rows(self) -> torch.Tensor:
        return self._uncertain


def tile_best_keys(scores: torch.Tensor, first_doc: int, k: int) -> torch.Tensor:
    """Keys that hold each row's k best of the tile (and perhaps one more, made empty).

    torch.topk's choice among copies of the k-th score is arbitrary, so rows where the (k+1)-th best ties
    with another of the best (rare but for heavily tied data) take the top-k of their packed keys instead.
    """
    cols = scores.shape[1]
    take = min(k, cols)
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


def _sorted_result(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices) on the host, best first, from each row's k best keys; empty keys (fewer than k
    docs seen) come out as -inf and -1, as SortMergeTopK gives them."""
    keys = torch.sort(keys, dim=1).values
    scores, indices = _unpack(keys)
    empty = keys == _EMPTY
    return to_host(scores.masked_fill(empty, float("-inf"))), to_host(indices.masked_fill(empty, -1))


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
    """Picks the selector: the C threshold kernel on the CPU when built, the Triton pool on CUDA where Triton
    is installed, else top-k and sort (any device); see default_selection.

    `start_thresholds` (threshold selector only) are estimated starting thresholds, see ThresholdTopK.
    """
    if method not in ("auto", "threshold", "pool", "sort"):
        raise ValueError(f"unknown selection method {method!r}")
    if method == "auto":
        method = default_selection(device.type, docs)
    if method == "threshold":
        if device.type != "cpu" or _KERNEL is None or docs >= MAX_KERNEL_DOCS:
            raise RuntimeError("the threshold selector needs the CPU, the built kernel and fewer than 2**32 docs")
        return ThresholdTopK(rows, k, start_thresholds=start_thresholds)
    if method == "pool":
        if not gpu_survivors.available() or docs >= MAX_KERNEL_DOCS:
            raise RuntimeError("the pool selector needs Triton and fewer than 2**32 docs")
        return PoolTopK(rows, k, device)
    if docs < MAX_KERNEL_DOCS:
        return PackedTopK(rows, k, device)
    return SortMergeTopK(rows, k, device)


def default_selection(device: str, docs: int) -> str:
    """The selector for a device: the C kernel ("threshold") on the CPU where it is built, Triton ("pool") on
    CUDA where it is installed, else "sort"; each needs fewer than 2**32 docs."""
    if docs >= MAX_KERNEL_DOCS:
        return "sort"
    if device == "cpu" and _KERNEL is not None:
        return "threshold"
    if device == "cuda" and gpu_survivors.runs_on(device):
        return "pool"
    return "sort"
