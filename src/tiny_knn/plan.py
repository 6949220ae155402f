"""Planning: a frozen Plan from shapes, the backend (device, estimator, selector, threads: backend.py resolves
them) and the memory budget. Pure: no I/O, no hardware probing, no GPU needed.

The engine works in tiles padded to a multiple of ROW_ALIGN query rows and COL_ALIGN doc rows (multiples of the
kernel's panels). On the screened path every score is exact whatever the tiles, threads or estimator. On the path
by search keys (a GPU, or the CPU without the kernel), measured on MKL and cuBLAS, a float32 product computed in
such aligned tiles is bit for bit the same whatever the tile's size, whereas ragged or tiny tiles take other code
paths and differ in the last bits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch

DEFAULT_K = 2000
ROW_ALIGN = 16
COL_ALIGN = 64
# Tile shapes at the matrix-product floor on a 2-core AVX2 machine (benchmarks/RESULTS.md).
CPU_QUERY_BLOCK_ROWS = 4096
# On the screened path every thread estimates its own blocks of this many rows (single-threaded products at the
# same rate) and screens each tile while it is still in cache (4 MiB at 1024 docs: L3). 1024 rows beat 512 by
# 2-4% at k=10 (each product packs its doc chunk once for twice the rows) and 2048 (RESULTS.md).
CPU_THREAD_BLOCK_ROWS = 1024
# Docs read from disk at a time. The threshold selector's threads meet once per chunk; each multiplies and
# scans a chunk CPU_TILE_DOCS docs at a time (the tile that stays in cache; 512 docs slowed the products).
CPU_DOC_CHUNK_ROWS = 4096
CPU_TILE_DOCS = 1024
CUDA_QUERY_BLOCK_ROWS = 8192
CUDA_DOC_CHUNK_ROWS = 65536
# The GPU screen's survivor buffer (gpu_engine.py): room for this many pairs per query row of a batch, within bounds
# (never less than the batch's rows: a piece of one doc then always fits). A chunk whose survivors do not fit is
# screened again in pieces; the bytes count the pairs, their exact scores and the offer's temporaries.
GPU_SURVIVORS_PER_ROW = 128
GPU_SURVIVORS_MIN, GPU_SURVIVORS_MAX = 2**12, 2**24
GPU_SURVIVOR_BYTES = 96
# The pools' answer leaves the device in slices of rows of about this many bytes of temporaries (about this many a
# key: the k best keys, their order, their scores and doc numbers)
GPU_RESULT_SLICE_BYTES = 64 * 2**20
GPU_RESULT_BYTES_PER_KEY = 48
# The GPU screen keeps the docs on the device across query batches (gpu_engine.ResidentDocs) when they take at most
# this share of the device budget: later passes then read no disk and copy nothing to the device. A doc row held
# there costs its float32 values (the exact re-scoring's), its bfloat16 values and three float32 factors.
RESIDENT_DOCS_MAX_SHARE = 0.5
RESIDENT_DOC_VALUE_BYTES = 4 + 2
RESIDENT_DOC_ROW_BYTES = 3 * 4
# Sampled starting threshold (threshold selection, and the screens): score each query against a strided sample of
# the docs and start from a score that, with high probability, at least k docs beat. Used only where the
# expected rank of the k-th best doc within the sample is large enough for the estimate to be tight. A row
# whose estimate was too high needs a second pass over the docs, which costs about as much as the sample
# saves: at 4 deviations about one row in 4,096 needed it at k=1000; at 6, none (benchmarks/RESULTS.md).
THRESHOLD_SAMPLE_FRACTION = 0.01
THRESHOLD_SAMPLE_MIN_RANK = 10.0
THRESHOLD_SAMPLE_SIGMAS = 6.0
# On the path by keys, l2 keeps a few more candidates than it returns, so that most rows are certified at once
# (refine.py), and re-scores them in gathers of about this many bytes of doc rows.
L2_EXTRA_CANDIDATES_MIN = 16
L2_EXTRA_CANDIDATES_FRACTION = 1 / 8
REFINE_GATHER_BYTES = 16 * 2**20
REFINE_WIDENING = 4  # rows not certified are searched again with this many times the candidates
# --precision: exact (tiny-knn's one exact score, _kernels/tk.h), or bf16-unsafe (keys from rows rounded to
# bfloat16, returned as they are: not exact). fp32 and bf16, kept as names, now mean exact (DEPRECATED_PRECISIONS).
PRECISIONS = ("exact", "bf16-unsafe")
DEPRECATED_PRECISIONS = ("fp32", "bf16")
# Share of the free memory taken when the user sets no budget.
DEFAULT_BUDGET_FRACTION = 0.6
SCORE_BYTES = 4
INDEX_BYTES = 8
_UNITS = {
    "": 1, "B": 1,
    "K": 2**10, "KIB": 2**10, "KB": 10**3,
    "M": 2**20, "MIB": 2**20, "MB": 10**6,
    "G": 2**30, "GIB": 2**30, "GB": 10**9,
    "T": 2**40, "TIB": 2**40, "TB": 10**12,
}  # fmt: skip


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= value."""
    return -(-value // multiple) * multiple


def doc_tiles(doc_count: int, padded_docs: int, width: int) -> list[tuple[int, int, int]]:
    """How a chunk of `doc_count` docs (zero rows after them up to `padded_docs`) is scored `width` docs at a
    time: (doc_lo, doc_hi, real) per tile, docs doc_lo..doc_hi of the padded chunk, the first `real` of them
    real docs."""
    return [
        (doc_lo, min(doc_lo + width, padded_docs), min(doc_lo + width, doc_count) - doc_lo)
        for doc_lo in range(0, doc_count, width)
    ]


def parse_size(text: str) -> int:
    """Parses a memory size: '512MB' (10**6), '8GiB' or '8G' (2**30), '1e9' bytes.

    Example:
        >>> parse_size("512MB"), parse_size("1.5GiB"), parse_size("4096")
        (512000000, 1610612736, 4096)
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _UNITS:
        raise ValueError(f"memory size {text!r}: expected a number with an optional unit, like 512MB or 8GiB")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(count: float) -> str:
    """'1.5 GiB' for 1610612736."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


@dataclass(frozen=True)
class Plan:
    """How a search will run: where, in which precision, and in which blocks."""

    device: str  # "cpu" or "cuda"
    compute_dtype: torch.dtype
    k: int  # effective k: never more than the number of docs (less one with exclude_self)
    queries: int
    docs: int
    dim: int
    query_batch_rows: int  # queries held, with their running top-k, during one pass over the docs
    query_block_rows: int  # queries per matrix product; a multiple of ROW_ALIGN
    doc_chunk_rows: int  # docs per chunk read from disk; a multiple of COL_ALIGN
    selection: str  # "threshold" (CPU kernel), "pool" (CUDA, Triton) or "sort" (torch.topk, any device)
    threshold_sample_docs: int  # docs sampled for a starting threshold; 0 = none
    budget_bytes: int
    peak_bytes: int  # estimated peak of the memory the plan allocates
    metric: str = "ip"  # see metrics.py
    exclude_self: bool = False  # drop each query's own row (doc index == query index)
    search_k: int = 0  # candidates kept per query during the search (>= k); 0 means k
    precision: str = "exact"  # see PRECISIONS
    # The screen's estimator (estimators.py; the CPU with the compiled kernel), or None: the path by search keys
    estimator: str | None = None
    estimator_choice: str = ""  # how the estimator was chosen, in words (backend.py), for describe()
    threads: int = 1  # the selector's threads (the screened path: each screens its own query rows)
    # Tuning: docs per tile (a tiled estimator's, the threshold scan's on the path by keys), and the deviations of
    # margin in a sampled starting threshold (see threshold_sample_rank); fields so that tests can vary them.
    tile_docs: int = CPU_TILE_DOCS
    sample_sigmas: float = THRESHOLD_SAMPLE_SIGMAS
    results_on_disk: bool = False  # several batches go to a checkpoint: one batch's results are held
    # The dtype doc chunks are read in and copied to the device: float32, or on the GPU screen the docs' own float16
    # or bfloat16 (widened on the device: half the bytes moved; see transfer_dtype)
    chunk_dtype: torch.dtype = torch.float32
    docs_resident: bool = False  # the GPU screen keeps the docs on the device after the first pass
    # On CUDA, the host's own budget and estimated peak (pinned doc chunks, the batch's queries, the results), apart
    # from the device's (budget_bytes, peak_bytes); 0 on the CPU, where one budget covers both.
    host_budget_bytes: int = 0
    host_peak_bytes: int = 0

    @property
    def refined(self) -> bool:
        """True when the candidates are re-scored exactly and certified after the search (refine.py): l2 on the
        path by search keys."""
        return self.metric == "l2" and self.estimator is None

    @property
    def candidates(self) -> int:
        """Candidates kept per query while searching: k, one more to drop the query itself, l2's margin."""
        return self.search_k or self.k

    @property
    def doc_passes(self) -> int:
        """How many times the docs are read: once per query batch."""
        return -(-self.queries // self.query_batch_rows)

    def memory(self, batch: int, block: int, chunk: int, docs_resident: bool | None = None) -> MemoryEstimate:
        """The peak bytes of this plan with other sizes (estimate_memory)."""
        return estimate_memory(
            batch_rows=batch,
            block_rows=block,
            chunk_rows=chunk,
            dim=self.dim,
            k=self.k,
            queries=self.queries,
            selection=self.selection,
            docs=self.docs,
            candidates=self.candidates,
            refine=self.refined,
            results_on_disk=self.results_on_disk,
            threads=self.threads,
            screened=self.estimator is not None,
            triton=self.estimator == "triton",
            cuda=self.device == "cuda",
            chunk_value_bytes=self.chunk_dtype.itemsize,
            docs_resident=self.docs_resident if docs_resident is None else docs_resident,
        )

    def halved(self) -> Plan:
        """A smaller plan, for retrying after running out of device memory: resident docs are dropped first; then
        the query batch halves where it holds most of the device's estimate (its queries, pools and survivor
        buffer: smaller blocks cannot help there), else the blocks and chunks do; each halves when the other is at
        its floor.

        Raises:
            MemoryError: one query at a time in the smallest blocks.
        """
        if self.docs_resident:
            return self._resized(self.query_batch_rows, self.query_block_rows, self.doc_chunk_rows, False)
        batch, block, chunk = self.query_batch_rows, self.query_block_rows, self.doc_chunk_rows
        blocks_at_floor = block <= ROW_ALIGN and chunk <= COL_ALIGN
        if batch <= 1 and blocks_at_floor:
            raise MemoryError("already one query at a time in the smallest blocks")
        batch_bytes = self.memory(batch, block, chunk).device_bytes - self.memory(0, block, chunk).device_bytes
        if batch > 1 and (blocks_at_floor or 2 * batch_bytes >= self.peak_bytes):
            half = -(-batch // 2)
            return self._resized(half, min(block, round_up(half, ROW_ALIGN)), chunk, False)
        block = max(ROW_ALIGN, round_up(block // 2, ROW_ALIGN))
        chunk = max(COL_ALIGN, round_up(chunk // 2, COL_ALIGN))
        return self._resized(batch, block, chunk, False)

    def _resized(self, batch: int, block: int, chunk: int, docs_resident: bool) -> Plan:
        """This plan with these sizes, its peak bytes estimated again."""
        memory = self.memory(batch, block, chunk, docs_resident)
        return replace(self, query_batch_rows=batch, query_block_rows=block, doc_chunk_rows=chunk,
                       docs_resident=docs_resident, peak_bytes=memory.device_bytes,
                       host_peak_bytes=memory.host_bytes)  # fmt: skip

    def describe(self) -> list[str]:
        """The plan in a few human lines (for --dry-run, logs and the demo)."""
        order = "docs read once" if self.doc_passes == 1 else f"docs read {self.doc_passes} times"
        if self.docs_resident:
            order = f"docs read once and kept on the device for all {self.doc_passes} passes"
        return [
            f"device {self.device}, compute dtype {str(self.compute_dtype).removeprefix('torch.')}, "
            f"selection {self.selection}"
            + (
                f", starting threshold from {self.threshold_sample_docs} sampled docs"
                if self.threshold_sample_docs
                else ""
            ),
            f"{self.queries} queries x {self.docs} docs x {self.dim} dims, k={self.k}, metric {self.metric}"
            + (", excluding each query's own row" if self.exclude_self else "")
            + (f", precision {self.precision}" if self.precision != "exact" else "")
            + (f", {self.candidates} candidates per query re-scored" if self.refined else ""),
            (
                f"query batch {self.query_batch_rows} rows ({order}), screened whole against each doc chunk of "
                f"{self.doc_chunk_rows} rows"
                + (
                    f" (copied as {str(self.chunk_dtype).removeprefix('torch.')})"
                    if self.chunk_dtype.itemsize < 4
                    else ""
                )
                + f", survivors in two buffers of {gpu_survivor_capacity(self.query_batch_rows)} pairs"
                if self.estimator == "triton"
                else f"query batch {self.query_batch_rows} rows ({order}), matrix-product block "
                f"{self.query_block_rows} rows{' per thread' if self.estimator else ''}, doc chunk "
                f"{self.doc_chunk_rows} rows"
            ),
            (
                "scores: exact (tiny-knn's one definition), screened by the Triton path (gpu_screen: bfloat16 "
                "estimates, or float16 for float16 docs, within a proven bound, survivors re-scored in tk_dot's order)"
                if self.estimator == "triton"
                else f"scores: exact (tiny-knn's one definition), screened by the {self.estimator} estimator"
                if self.estimator
                else "scores: the products' own (by search keys" + (", re-scored exactly)" if self.refined else ")")
            )
            + (f" ({self.estimator_choice})" if self.estimator and self.estimator_choice else ""),
            f"memory: about {format_bytes(self.peak_bytes)} of a {format_bytes(self.budget_bytes)} budget"
            + (
                f" of GPU memory; host: about {format_bytes(self.host_peak_bytes)} of a "
                f"{format_bytes(self.host_budget_bytes)} budget of RAM"
                if self.device == "cuda"
                else ""
            ),
        ]


# The selectors' pools are sized here, where their memory is counted; topk.py allocates them.
def pool_capacity(k: int) -> int:
    """Keys a query row of topk.ThresholdTopK can hold before compaction: at least k spare slots, so
    compaction is rare."""
    return k + max(k, 256)


def gpu_survivor_capacity(rows: int) -> int:
    """Pairs the GPU screen's survivor buffer holds for a batch of `rows` query rows."""
    return max(rows, min(GPU_SURVIVORS_MAX, max(GPU_SURVIVORS_MIN, rows * GPU_SURVIVORS_PER_ROW)))


def gpu_pool_capacity(k: int) -> int:
    """Keys a row of topk.PoolTopK holds before it is cut back to k: room for a few tiles' survivors."""
    return round_up(max(3 * k, k + 1024), 64)


def gpu_result_slice_rows(k: int) -> int:
    """Rows of topk.PoolTopK's pools whose answer is taken and copied to the host at a time: their temporaries (the
    k best keys, sorted, unpacked: under GPU_RESULT_SLICE_BYTES) stay far below the pools' own cut."""
    return max(1, GPU_RESULT_SLICE_BYTES // (k * GPU_RESULT_BYTES_PER_KEY))


def selection_state_bytes(k: int, selection: str) -> int:
    """Bytes of running top-k state per query row."""
    if selection == "threshold":
        return pool_capacity(k) * INDEX_BYTES + 8
    if selection == "pool":
        return gpu_pool_capacity(k) * INDEX_BYTES + 8
    return k * (SCORE_BYTES + INDEX_BYTES)


def threshold_sample_docs(docs: int, k: int, selection: str, screened: bool = False) -> int:
    """How many docs to sample for a starting threshold (0: not worth it, or neither the threshold selector nor a
    screen)."""
    sample = round_up(max(COL_ALIGN, int(docs * THRESHOLD_SAMPLE_FRACTION)), COL_ALIGN)
    if (selection != "threshold" and not screened) or sample >= docs or k * sample / docs < THRESHOLD_SAMPLE_MIN_RANK:
        return 0
    return sample


def threshold_sample_rank(docs: int, k: int, sample: int, sigmas: float = THRESHOLD_SAMPLE_SIGMAS) -> int:
    """The rank within the sample whose score at least k docs beat, with a margin of `sigmas` deviations."""
    expected = k * sample / docs
    return max(1, min(sample, int(expected + sigmas * expected**0.5) + 1))


def search_candidates(k: int, docs: int, metric: str, exclude_self: bool, refined: bool = False) -> int:
    """Candidates to keep per query so as to return k: one more to drop the query itself, and where they are
    re-scored after the search (l2 on the path by keys) a margin for rows whose keys are too close to tell apart."""
    wanted = k + int(exclude_self)
    if refined:
        wanted += max(L2_EXTRA_CANDIDATES_MIN, int(wanted * L2_EXTRA_CANDIDATES_FRACTION))
    return min(docs, wanted)


@dataclass(frozen=True)
class MemoryEstimate:
    """A plan's peak bytes by where they lie: the device's, and, beside a GPU, the host's (pinned doc chunks, the
    batch's queries, the results). On the CPU the host is the device: everything is device_bytes."""

    device_bytes: int
    host_bytes: int = 0


def transfer_dtype(docs_dtype: torch.dtype, estimator: str | None, metric: str) -> torch.dtype:
    """The dtype doc chunks are read in and copied to the device: the GPU screen takes float16 and bfloat16 docs
    as they are (widening them on the device is exact, and halves the bytes read into host buffers and copied),
    except for cosine, whose rows are scaled to unit length on the host in float32 (tiny-knn's one normalisation,
    metrics.normalize). Every other path reads float32."""
    if estimator == "triton" and metric != "cosine" and docs_dtype in (torch.float16, torch.bfloat16):
        return docs_dtype
    return torch.float32


def resident_doc_bytes(docs: int, dim: int) -> int:
    """Device bytes of every doc kept resident by the GPU screen (RESIDENT_DOC_VALUE_BYTES a value, and factors)."""
    rows = round_up(docs, COL_ALIGN)
    return rows * (dim * RESIDENT_DOC_VALUE_BYTES + RESIDENT_DOC_ROW_BYTES)


def gpu_screen_doc_bytes(chunk_rows: int, dim: int, value_bytes: int) -> int:
    """Device bytes of doc chunks on the GPU screen, whose host synchronisation lags a chunk: three chunks as copied
    (the one whose survivors are read, the one screened, the one arriving), two of them widened to float32 if they
    came narrower, and two chunks' prepared rows (bfloat16 values, three factors)."""
    values = chunk_rows * dim
    widened = 2 * values * 4 if value_bytes < 4 else 0
    return 3 * values * value_bytes + widened + 2 * chunk_rows * (dim * 2 + RESIDENT_DOC_ROW_BYTES)


def estimate_bytes(**shape: Any) -> int:
    """Peak bytes a plan allocates, the host's and the device's together (estimate_memory)."""
    memory = estimate_memory(**shape)
    return memory.device_bytes + memory.host_bytes


def estimate_memory(
    *,
    batch_rows: int,
    block_rows: int,
    chunk_rows: int,
    dim: int,
    k: int,
    queries: int,
    selection: str,
    docs: int,
    candidates: int | None = None,
    refine: bool = False,
    results_on_disk: bool = False,
    threads: int = 1,
    screened: bool = False,
    triton: bool = False,
    cuda: bool = False,
    chunk_value_bytes: int = 4,
    docs_resident: bool = False,
) -> MemoryEstimate:
    """Peak bytes a plan allocates: resident queries, top-k state, doc buffers, score tile, results, and
    for l2 the re-scoring of `candidates` per query (gathered rows, float64 differences, orderings).
    `screened`: the estimator also holds its form of the queries and of both doc buffers (at most as large
    again), and their factors. `triton` (the GPU screen, with the pool selector): no tile, but two survivor buffers
    (its synchronisation lags a chunk), the pools' cut of the whole batch (its k best, and a fresh pool), its doc
    chunks (gpu_screen_doc_bytes, read as `chunk_value_bytes` a value) and, `docs_resident`, every doc.

    `cuda`: the host's bytes apart (MemoryEstimate): the batch's queries, the two pinned doc buffers, the results
    and the sampled docs; on the device, their copies and the rest."""
    candidates = candidates or k
    copies = 2 if screened else 1
    padded_batch = round_up(batch_rows, ROW_ALIGN)
    resident_queries = copies * padded_batch * dim * 4
    state = batch_rows * selection_state_bytes(candidates, selection)
    if refine:
        state += batch_rows * candidates * 6 * INDEX_BYTES + 4 * REFINE_GATHER_BYTES
    doc_buffers = copies * 2 * chunk_rows * dim * 4  # double-buffered: one read ahead while one is scored
    # A tile per thread (the threshold selector's are at most CPU_TILE_DOCS wide)
    tile = block_rows * chunk_rows * SCORE_BYTES
    if selection == "threshold":
        tile = block_rows * min(chunk_rows, CPU_TILE_DOCS) * SCORE_BYTES * threads
    if selection in ("sort", "pool"):  # topk's temporaries (packed keys for every score when k is over half
        # a chunk); the pool's cut of a block: its k best, and a fresh pool for the block
        per_score = 1 + (4 * INDEX_BYTES if 2 * candidates > chunk_rows else 0)
        tile += block_rows * (chunk_rows * per_score + 4 * candidates * (SCORE_BYTES + INDEX_BYTES))
        if selection == "pool":  # also the rows that overflow their pools, an eighth of a block at a time:
            # their scores copied, their pools and the tile's best keys joined
            pool_bytes = selection_state_bytes(candidates, selection)
            tile += block_rows * pool_bytes + -(-block_rows // 8) * (chunk_rows * SCORE_BYTES + 3 * pool_bytes)
    if triton:
        cut = batch_rows * (selection_state_bytes(candidates, selection) + candidates * 2 * INDEX_BYTES)
        tile = 2 * gpu_survivor_capacity(batch_rows) * GPU_SURVIVOR_BYTES + cut
        doc_buffers = gpu_screen_doc_bytes(chunk_rows, dim, chunk_value_bytes)
        if docs_resident:
            doc_buffers += resident_doc_bytes(docs, dim)
    # Finished batches go to a checkpoint on disk when there are several; only one batch's are then held.
    results = (batch_rows if results_on_disk and batch_rows < queries else queries) * k * (SCORE_BYTES + INDEX_BYTES)
    sample = threshold_sample_docs(docs, candidates, selection, screened)
    sample_bytes = sample * (dim * 4 + block_rows * SCORE_BYTES)  # sampled docs and one block's scores
    if not cuda:
        return MemoryEstimate(resident_queries + state + doc_buffers + tile + results + sample_bytes)
    host = padded_batch * dim * 4 + 2 * chunk_rows * dim * chunk_value_bytes + results + sample * dim * 4
    return MemoryEstimate(resident_queries + state + doc_buffers + tile + sample_bytes, host)


def make_plan(
    *,
    queries: int,
    docs: int,
    dim: int,
    k: int,
    device: str,
    budget_bytes: int,
    selection: str,
    estimator: str | None = None,
    estimator_choice: str = "",
    batch_rows: int | None = None,
    chunk_rows: int | None = None,
    metric: str = "ip",
    exclude_self: bool = False,
    results_on_disk: bool = False,
    precision: str = "exact",
    threads: int = 1,
    docs_dtype: torch.dtype = torch.float32,
    host_budget_bytes: int | None = None,
) -> Plan:
    """Chooses block sizes that fit `budget_bytes`, holding as many queries per pass as possible, for the backend
    given (device, selection, estimator: None for the path by search keys; threads).

    On CUDA `budget_bytes` is the GPU's, and the host's buffers (pinned doc chunks, the batch's queries, the
    results) count against `host_budget_bytes` instead (None: not limited); on the CPU one budget covers all. The
    GPU screen keeps the docs resident on the device across query batches when there are several and the docs take
    at most RESIDENT_DOCS_MAX_SHARE of the budget (the batch is then planned in what is left).

    Raises:
        ValueError: even the smallest blocks do not fit the budget (the message says what would).
    """
    if exclude_self and docs < 2:
        raise ValueError("excluding each query's own row needs at least 2 docs")
    k = min(k, docs - int(exclude_self))
    refined = metric == "l2" and estimator is None
    candidates = search_candidates(k, docs, metric, exclude_self, refined)
    cuda = device == "cuda"
    screened = estimator is not None
    block = CUDA_QUERY_BLOCK_ROWS if cuda else CPU_THREAD_BLOCK_ROWS if screened else CPU_QUERY_BLOCK_ROWS
    # On the screened path each thread estimates its own share of the rows.
    sharing = threads if screened else 1
    block = min(block, round_up(-(-queries // sharing), ROW_ALIGN))
    chunk = round_up(chunk_rows, COL_ALIGN) if chunk_rows else CUDA_DOC_CHUNK_ROWS if cuda else CPU_DOC_CHUNK_ROWS
    chunk = min(chunk, round_up(docs, COL_ALIGN))
    if batch_rows:
        batch_rows = min(batch_rows, queries)
        block = min(block, round_up(-(-batch_rows // sharing), ROW_ALIGN))
    host_budget = host_budget_bytes if cuda else None
    draft = Plan(
        device=device,
        compute_dtype=torch.float32,
        k=k,
        queries=queries,
        docs=docs,
        dim=dim,
        query_batch_rows=0,
        query_block_rows=block,
        doc_chunk_rows=chunk,
        selection=selection,
        threshold_sample_docs=threshold_sample_docs(docs, candidates, selection, screened),
        budget_bytes=budget_bytes,
        peak_bytes=0,
        metric=metric,
        exclude_self=exclude_self,
        search_k=candidates,
        precision=precision,
        estimator=estimator,
        estimator_choice=estimator_choice,
        threads=threads,
        results_on_disk=results_on_disk,
        chunk_dtype=transfer_dtype(docs_dtype, estimator, metric),
        host_budget_bytes=host_budget or 0,
    )

    def fits(memory: MemoryEstimate) -> bool:
        return memory.device_bytes <= budget_bytes and (host_budget is None or memory.host_bytes <= host_budget)

    def largest_batch(block: int, chunk: int, resident: bool) -> int:
        """The most query rows that fit (0 if none), by bisection: the estimate grows with the batch, but not in
        proportion (the survivor buffer has a floor; results held jump to every query's at one batch)."""
        if batch_rows:
            return batch_rows
        fitting, too_many = 0, queries + 1
        while too_many - fitting > 1:
            middle = (fitting + too_many) // 2
            fitting, too_many = (
                (middle, too_many) if fits(draft.memory(middle, block, chunk, resident)) else (fitting, middle)
            )
        return fitting

    while True:
        batch = largest_batch(block, chunk, False)
        if batch >= 1:
            break
        if block <= ROW_ALIGN and (chunk_rows or chunk <= COL_ALIGN):
            raise ValueError(_too_small(draft.memory(1, ROW_ALIGN, chunk, False), budget_bytes, host_budget, draft))
        block = max(ROW_ALIGN, round_up(block // 2, ROW_ALIGN))
        if not chunk_rows:
            chunk = max(COL_ALIGN, round_up(chunk // 2, COL_ALIGN))
    resident = False
    if (
        estimator == "triton"
        and batch < queries
        and resident_doc_bytes(docs, dim) <= RESIDENT_DOCS_MAX_SHARE * budget_bytes
    ):
        resident_batch = largest_batch(block, chunk, True)
        if resident_batch >= 1 and fits(draft.memory(resident_batch, block, chunk, True)):
            batch, resident = resident_batch, True
    return draft._resized(batch, min(block, round_up(-(-batch // sharing), ROW_ALIGN)), chunk, resident)


def _too_small(smallest: MemoryEstimate, budget: int, host_budget: int | None, plan: Plan) -> str:
    """Why even one query at a time does not fit: the device's budget, or the host's beside a GPU."""
    all_results = format_bytes(plan.queries * plan.k * (SCORE_BYTES + INDEX_BYTES))
    results = "" if plan.results_on_disk else f" (the {plan.queries} x {plan.k} results alone take {all_results})"
    if host_budget is not None and smallest.device_bytes <= budget:
        return (
            f"host memory budget {format_bytes(host_budget)} (RAM beside the GPU) is too small: "
            f"even one query at a time needs about {format_bytes(smallest.host_bytes)} of RAM{results}; free some "
            "RAM or lower --k"
        )
    return (
        f"memory budget {format_bytes(budget)} is too small: even one query at a time needs about "
        f"{format_bytes(smallest.device_bytes)}{results}; "
        "raise --max-memory or lower --k"
    )
