"""Planning: a frozen Plan from shapes, dtype, device and memory budget. No I/O, no GPU needed; which
product the CPU uses comes from product.default_product (the CPU's vendor and features, TINY_KNN_PRODUCT).

The engine multiplies queries by docs in tiles. Every tile is padded to a multiple of ROW_ALIGN query
rows and COL_ALIGN doc rows (multiples of the kernel's panels). The kernel's own product gives each score
the same bits whatever the tile; for torch.mm, measured on MKL, a float32 product computed in such aligned
tiles is bit for bit the same whatever the tile's size, whereas ragged or tiny tiles take other code paths
and differ in the last bits. That is what makes results independent of batch and chunk sizes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from .product import default_product

DEFAULT_K = 2000
ROW_ALIGN = 16
COL_ALIGN = 64
# Tile shapes at the matrix-product floor on a 2-core AVX2 machine (benchmarks/RESULTS.md).
CPU_QUERY_BLOCK_ROWS = 4096
# With the threshold selector, every thread multiplies its own blocks of this many rows (single-threaded
# products at the same rate) and scans each tile while it is still in cache (4 MiB at 1024 docs: L3). 1024 rows
# beat 512 by 2-4% at k=10 (each product packs its doc chunk once for twice the rows) and 2048 (RESULTS.md).
CPU_THREAD_BLOCK_ROWS = 1024
# ... but only when every thread gets at least this many rows of the batch. With fewer, one product on all
# threads covers the batch: per-thread blocks would leave cores idle. On 2 threads, per-thread blocks of
# 16 and 32 rows still beat one product for the batch by 15-25% (benchmarks/RESULTS.md).
FUSED_MIN_ROWS_PER_THREAD = ROW_ALIGN
# Docs read from disk at a time. The threshold selector's threads meet once per chunk; each multiplies and
# scans a chunk CPU_TILE_DOCS docs at a time (the tile that stays in cache; 512 docs slowed the products).
CPU_DOC_CHUNK_ROWS = 4096
CPU_TILE_DOCS = 1024
CUDA_QUERY_BLOCK_ROWS = 8192
CUDA_DOC_CHUNK_ROWS = 65536
# Sampled starting threshold (threshold selection only): score each query against a strided sample of
# the docs and start from a score that, with high probability, at least k docs beat. Used only where the
# expected rank of the k-th best doc within the sample is large enough for the estimate to be tight. A row
# whose estimate was too high needs a second pass over the docs, which costs about as much as the sample
# saves: at 4 deviations about one row in 4,096 needed it at k=1000; at 6, none (benchmarks/RESULTS.md).
THRESHOLD_SAMPLE_FRACTION = 0.01
THRESHOLD_SAMPLE_MIN_RANK = 10.0
THRESHOLD_SAMPLE_SIGMAS = 6.0
# l2 keeps a few more candidates than it returns, so that most rows are certified at once (refine.py),
# and re-scores them in gathers of about this many bytes of doc rows.
L2_EXTRA_CANDIDATES_MIN = 16
L2_EXTRA_CANDIDATES_FRACTION = 1 / 8
REFINE_GATHER_BYTES = 16 * 2**20
# Measured at 4,096 x 200,000 x 384: at k=10, 95% of rows failed certification with 16 extra candidates, none
# with 96; at k=1000 every row needs more than 500 (and is widened; benchmarks/RESULTS.md).
BF16_EXTRA_CANDIDATES_MIN = 96
BF16_EXTRA_CANDIDATES_FRACTION = 1 / 8
REFINE_WIDENING = 4  # rows not certified are searched again with this many times the candidates
# --precision: fp32 (exact products), bf16 (keys from rows rounded to bfloat16, every answer re-scored
# exactly and certified, see refine.py), bf16-unsafe (keys from rounded rows, returned as they are).
PRECISIONS = ("fp32", "bf16", "bf16-unsafe")
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
    precision: str = "fp32"  # see PRECISIONS
    fused: bool = False  # CPU: each selector thread multiplies its own rows, query_block_rows at a time
    product: str = "torch"  # the matrix products: "screen" (AMD CPU, AVX-512 BF16), "kernel" (AMD CPU, AVX-512)
    # or "torch" (torch.mm); see product.py

    @property
    def refined(self) -> bool:
        """True when the candidates are re-scored exactly and certified (refine.py)."""
        return self.metric == "l2" or self.precision == "bf16"

    @property
    def candidates(self) -> int:
        """Candidates kept per query while searching: k, one more to drop the query itself, l2's margin."""
        return self.search_k or self.k

    @property
    def doc_passes(self) -> int:
        """How many times the docs are read: once per query batch."""
        return -(-self.queries // self.query_batch_rows)

    def halved(self) -> Plan:
        """A plan with half-size blocks, for retrying after running out of device memory."""
        if self.query_block_rows <= ROW_ALIGN and self.doc_chunk_rows <= COL_ALIGN:
            raise MemoryError("already at the smallest blocks")
        block = max(ROW_ALIGN, round_up(self.query_block_rows // 2, ROW_ALIGN))
        chunk = max(COL_ALIGN, round_up(self.doc_chunk_rows // 2, COL_ALIGN))
        return replace(self, query_block_rows=block, doc_chunk_rows=chunk)

    def describe(self) -> list[str]:
        """The plan in a few human lines (for --dry-run, logs and the demo)."""
        order = "docs read once" if self.doc_passes == 1 else f"docs read {self.doc_passes} times"
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
            + (f", precision {self.precision}" if self.precision != "fp32" else "")
            + (f", {self.candidates} candidates per query re-scored" if self.refined else ""),
            f"query batch {self.query_batch_rows} rows ({order}), matrix-product block {self.query_block_rows} "
            f"rows{' per thread' if self.fused else ''}, doc chunk {self.doc_chunk_rows} rows, "
            f"products by {_PRODUCT_NAMES[self.product]}",
            f"memory: about {format_bytes(self.peak_bytes)} of a {format_bytes(self.budget_bytes)} budget",
        ]


_PRODUCT_NAMES = {
    "screen": "the AVX-512 BF16 screen (exact float32 scores for the pairs it cannot rule out)",
    "kernel": "the AVX-512 kernel",
    "torch": "torch.mm",
}


def fuse_products(rows: int, threads: int) -> bool:
    """Whether the threshold selector's threads each multiply their own share of `rows` queries (and scan
    their tiles at once), rather than one product on all threads per block (see topk.ThresholdTopK)."""
    return threads <= 1 or rows >= threads * FUSED_MIN_ROWS_PER_THREAD


# The selectors' pools are sized here, where their memory is counted; topk.py allocates them.
def pool_capacity(k: int) -> int:
    """Keys a query row of topk.ThresholdTopK can hold before compaction: at least k spare slots, so
    compaction is rare."""
    return k + max(k, 256)


def gpu_pool_capacity(k: int) -> int:
    """Keys a row of topk.PoolTopK holds before it is cut back to k: room for a few tiles' survivors."""
    return round_up(max(3 * k, k + 1024), 64)


def selection_state_bytes(k: int, selection: str) -> int:
    """Bytes of running top-k state per query row."""
    if selection == "threshold":
        return pool_capacity(k) * INDEX_BYTES + 8
    if selection == "pool":
        return gpu_pool_capacity(k) * INDEX_BYTES + 8
    return k * (SCORE_BYTES + INDEX_BYTES)


def threshold_sample_docs(docs: int, k: int, selection: str) -> int:
    """How many docs to sample for a starting threshold (0: not worth it, or not the threshold selector)."""
    sample = round_up(max(COL_ALIGN, int(docs * THRESHOLD_SAMPLE_FRACTION)), COL_ALIGN)
    if selection != "threshold" or sample >= docs or k * sample / docs < THRESHOLD_SAMPLE_MIN_RANK:
        return 0
    return sample


def threshold_sample_rank(docs: int, k: int, sample: int) -> int:
    """The rank within the sample whose score at least k docs beat, with a margin of SIGMAS deviations."""
    expected = k * sample / docs
    return max(1, min(sample, int(expected + THRESHOLD_SAMPLE_SIGMAS * expected**0.5) + 1))


def search_candidates(k: int, docs: int, metric: str, exclude_self: bool, precision: str = "fp32") -> int:
    """Candidates to keep per query so as to return k: one more to drop the query itself, and where they
    are re-scored (l2, bf16) a margin for rows whose keys are too close to tell apart."""
    wanted = k + int(exclude_self)
    if precision == "bf16":  # bfloat16's error bound is wide: a wider margin saves a second pass
        wanted += max(BF16_EXTRA_CANDIDATES_MIN, int(wanted * BF16_EXTRA_CANDIDATES_FRACTION))
    elif metric == "l2":
        wanted += max(L2_EXTRA_CANDIDATES_MIN, int(wanted * L2_EXTRA_CANDIDATES_FRACTION))
    return min(docs, wanted)


def estimate_bytes(
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
    packed: bool = False,
) -> int:
    """Peak bytes a plan allocates: resident queries, top-k state, doc buffers, score tile, results, and
    for l2 the re-scoring of `candidates` per query (gathered rows, float64 differences, orderings).
    `packed`: the kernel's product also holds packed copies of the queries and of both doc buffers."""
    candidates = candidates or k
    copies = 2 if packed else 1
    resident_queries = copies * round_up(batch_rows, ROW_ALIGN) * dim * 4
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
    # Finished batches go to a checkpoint on disk when there are several; only one batch's are then held.
    results = (batch_rows if results_on_disk and batch_rows < queries else queries) * k * (SCORE_BYTES + INDEX_BYTES)
    sample = threshold_sample_docs(docs, candidates, selection)
    sample_bytes = sample * (dim * 4 + block_rows * SCORE_BYTES)  # sampled docs and one block's scores
    return resident_queries + state + doc_buffers + tile + results + sample_bytes


def make_plan(
    *,
    queries: int,
    docs: int,
    dim: int,
    k: int,
    device: str,
    budget_bytes: int,
    selection: str,
    batch_rows: int | None = None,
    chunk_rows: int | None = None,
    metric: str = "ip",
    exclude_self: bool = False,
    results_on_disk: bool = False,
    precision: str = "fp32",
    threads: int = 1,
) -> Plan:
    """Chooses block sizes that fit `budget_bytes`, holding as many queries per pass as possible.

    Raises:
        ValueError: even the smallest blocks do not fit the budget (the message says what would).
    """
    if exclude_self and docs < 2:
        raise ValueError("excluding each query's own row needs at least 2 docs")
    k = min(k, docs - int(exclude_self))
    candidates = search_candidates(k, docs, metric, exclude_self, precision)
    cuda = device == "cuda"
    product = default_product(device, queries, screenable=metric != "l2" and precision == "fp32")
    if cuda:
        block = CUDA_QUERY_BLOCK_ROWS
    else:
        block = CPU_THREAD_BLOCK_ROWS if selection == "threshold" else CPU_QUERY_BLOCK_ROWS
    # The threshold selector's threads each multiply their own share of the rows (see fuse_products).
    per_thread = selection == "threshold" and not cuda
    sharing = threads if per_thread else 1
    block = min(block, round_up(-(-queries // sharing), ROW_ALIGN))
    chunk = round_up(chunk_rows, COL_ALIGN) if chunk_rows else CUDA_DOC_CHUNK_ROWS if cuda else CPU_DOC_CHUNK_ROWS
    chunk = min(chunk, round_up(docs, COL_ALIGN))
    if batch_rows:
        batch_rows = min(batch_rows, queries)
        block = min(block, round_up(-(-batch_rows // sharing), ROW_ALIGN))

    def cost(batch: int, block: int, chunk: int) -> int:
        return estimate_bytes(
            batch_rows=batch,
            block_rows=block,
            chunk_rows=chunk,
            dim=dim,
            k=k,
            queries=queries,
            selection=selection,
            docs=docs,
            candidates=candidates,
            refine=metric == "l2" or precision == "bf16",
            results_on_disk=results_on_disk,
            threads=threads,
            packed=product in ("kernel", "screen"),  # the screen's bfloat16 copies take half as much
        )

    while True:
        if batch_rows:
            batch = batch_rows
        else:
            fixed = cost(0, block, chunk)
            per_query = cost(1, block, chunk) - fixed
            batch = min(queries, max(0, (budget_bytes - fixed) // per_query))
        if batch_rows or (batch >= 1 and cost(batch, block, chunk) <= budget_bytes):
            break
        if block <= ROW_ALIGN and (chunk_rows or chunk <= COL_ALIGN):
            smallest = cost(1, ROW_ALIGN, chunk)
            all_results = format_bytes(queries * k * (SCORE_BYTES + INDEX_BYTES))
            results = "" if results_on_disk else f" (the {queries} x {k} results alone take {all_results})"
            raise ValueError(
                f"memory budget {format_bytes(budget_bytes)} is too small: even one query at a time needs about "
                f"{format_bytes(smallest)}{results}; raise --max-memory or lower --k"
            )
        block = max(ROW_ALIGN, round_up(block // 2, ROW_ALIGN))
        if not chunk_rows:
            chunk = max(COL_ALIGN, round_up(chunk // 2, COL_ALIGN))
    fused = per_thread and fuse_products(batch, threads)
    if per_thread and not fused:
        block = min(block * threads, round_up(batch, ROW_ALIGN))  # one product for the batch, within the estimate
    else:
        block = min(block, round_up(-(-batch // sharing), ROW_ALIGN))
    return Plan(
        device=device,
        compute_dtype=torch.float32,
        k=k,
        queries=queries,
        docs=docs,
        dim=dim,
        query_batch_rows=batch,
        query_block_rows=block,
        doc_chunk_rows=chunk,
        selection=selection,
        threshold_sample_docs=threshold_sample_docs(docs, candidates, selection),
        budget_bytes=budget_bytes,
        peak_bytes=cost(batch, block, chunk),
        metric=metric,
        exclude_self=exclude_self,
        search_k=candidates,
        precision=precision,
        fused=fused,
        product=product,
    )


def default_budget_bytes(device: str) -> int:
    """What is free, times DEFAULT_BUDGET_FRACTION."""
    return int(available_bytes(device) * DEFAULT_BUDGET_FRACTION)


def available_bytes(device: str) -> int:
    """What is free: CUDA's free memory, or available RAM."""
    if device == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)
