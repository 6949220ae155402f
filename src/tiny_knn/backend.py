"""Choosing the backend: where a search runs and by what means (the device, the selector, the screen's estimator,
the threads), in one place. Hardware probing, environment variables and timing live here; the plan receives the
answers (plan.make_plan stays pure).

On the CPU with the compiled kernel every exact search is screened (engine.py), and the estimator changes only the
speed, never the answer. Which estimator is fastest depends on the CPU (its instructions, its BLAS), the threads,
the dims, the metric and k, so it is measured rather than guessed from a vendor's name: each estimator that runs
here screens a small sample of the real data (SAMPLE_ROWS_PER_THREAD queries a thread by two tiles of docs, the
first to warm up), and the fastest is used. The verdict is kept in the user's cache folder (TINY_KNN_CACHE_DIR, else
$XDG_CACHE_HOME/tiny-knn, else ~/.cache/tiny-knn), keyed by what changes the winner: the CPU model, torch's
version, the threads, dim, metric, a k bucket and few against many queries. A search too small for the
measurement to pay for itself (MEASURE_MIN_PAIRS) takes the cached verdict, else the first estimator in
UNMEASURED_ORDER that runs here. TINY_KNN_PRODUCT=screen|kernel|torch|torch-bf16 forces one; one that cannot run
is an error, never a silent fallback.

TINY_KNN_PRODUCT=triton forces the GPU's screen (gpu_engine.py): on CUDA, or on the CPU under Triton's interpreter
(TRITON_INTERPRET=1, --cpu), where its kernels run on CPU tensors. It is never chosen unforced: it has not yet run on
a GPU (benchmarks/gpu_screen_check.py is that check). Unforced, CUDA takes the path by keys.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

from . import gpu_screen
from .errors import InvalidInputError
from .estimators import ESTIMATORS, available, make_estimator
from .kernel import KERNEL
from .metrics import normalize
from .plan import COL_ALIGN, DEFAULT_BUDGET_FRACTION, ROW_ALIGN, round_up
from .sources import Source
from .topk import MAX_KERNEL_DOCS, ThresholdTopK, default_selection

# The sample the estimators are timed on: enough query rows that each thread's products are of a realistic shape
# (with 64 or 128 rows a thread, bfloat16 products looked no faster than float32 ones that took 1.5 times as long
# over a whole search: oneDNN's cost per call is paid for few rows; benchmarks/RESULTS.md), against two tiles of
# docs. The first tile warms up (oneDNN builds its kernels on a shape's first use; the rows' thresholds start from
# it, which costs about 10 us a row once per search, but most of a tile's time); only the second is timed, and
# only its screening, not the preparation of its rows, which a search does on its reader thread meanwhile.
SAMPLE_ROWS_PER_THREAD = 512
SAMPLE_DOCS = 1024
# Measure only searches of at least this many (query, doc) pairs: then the measurement, once per CPU model and
# kind of search (the verdict is cached), costs at most about 2% of the first such search.
MEASURE_MIN_PAIRS = 50 * len(ESTIMATORS) * 2 * (2 * SAMPLE_ROWS_PER_THREAD * SAMPLE_DOCS)
# Searches too small to measure for, and not measured before, take the first of these that runs here: the float32
# estimators, whose speed varies least across CPUs (a bfloat16 one is fast only where the CPU has the instructions
# for it: on an Intel Xeon, VDPBF16PS ran at half MKL's float32 rate, oneDNN's AMX path at 4 times it).
UNMEASURED_ORDER = ("kernel", "torch", "torch-bf16", "screen")
# What TINY_KNN_PRODUCT may name: the CPU's estimators, or the GPU's screen (Triton)
PRODUCTS = (*ESTIMATORS, "triton")
FEW_QUERIES = 64  # fewer queries than this are a different case for the estimators (few rows per thread)
CACHE_FILE = "estimators.json"


@dataclass(frozen=True)
class Backend:
    """Where and how a search runs."""

    device: str  # "cpu" or "cuda"
    selection: str  # "threshold", "pool" or "sort" (topk.py)
    estimator: str | None  # the screen's estimator, or None: the path by search keys (engine.py)
    threads: int
    choice: str = ""  # how the estimator was chosen, in words
    measured: dict[str, float] = field(default_factory=dict)  # seconds per estimator on the sample, if measured


def resolve(
    queries: Source,
    docs: Source,
    k: int,
    *,
    force_cpu: bool,
    metric: str,
    precision: str,
    selection: str = "auto",
) -> Backend:
    """The backend for a search (see the module docstring); reads a sample of the inputs when it measures.

    Raises:
        InvalidInputError: TINY_KNN_PRODUCT names no estimator, or one that cannot run for this search.
    """
    device = "cuda" if not force_cpu and torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    forced = os.environ.get("TINY_KNN_PRODUCT", "auto")
    if forced not in ("auto", *PRODUCTS):
        raise InvalidInputError(f"TINY_KNN_PRODUCT={forced!r}: expected auto or one of {', '.join(PRODUCTS)}")
    # Screened: the CPU, the kernel, an exact search, and the threshold selector (a selector asked for by name,
    # as tests do, takes the path by keys)
    screened = (
        device == "cpu"
        and KERNEL is not None
        and precision == "exact"
        and docs.rows < MAX_KERNEL_DOCS
        and selection in ("auto", "threshold")
    )
    if selection == "auto":
        selection = default_selection(device, docs.rows)
    if forced != "auto":
        why = _cannot_force(forced, device, precision, docs)
        if why:
            raise InvalidInputError(f"TINY_KNN_PRODUCT={forced}: {why}")
    if forced == "triton":  # one pass screens a whole batch: no threads of its own
        where = "on CUDA" if device == "cuda" else "on the CPU, by Triton's interpreter"
        return Backend(device, "pool", "triton", 1, f"forced by TINY_KNN_PRODUCT; {where}")
    if not screened:  # the GPU's path, or a selector by keys asked for by name (tests)
        return Backend(device, selection, None, threads)
    if forced != "auto":
        return Backend(device, "threshold", forced, threads, "forced by TINY_KNN_PRODUCT")
    estimator, choice, measured = _choose(queries, docs, k, metric, threads)
    return Backend(device, "threshold", estimator, threads, choice, measured)


def _cannot_force(name: str, device: str, precision: str, docs: Source) -> str:
    """Why the forced estimator cannot run for this search ('' if it can)."""
    if name == "triton":
        return _cannot_screen_with_triton(device, precision, docs)
    if device == "cuda":  # torch: the GPU's float32 products, its own path by keys
        return "" if name == "torch" else "runs on the CPU only (run with --cpu), or use torch on the GPU"
    if KERNEL is None:
        return "needs tiny-knn's compiled kernel, which is not built here (reinstall with a C compiler)"
    if precision != "exact":
        return f"estimators screen exact searches; --precision {precision} is not one"
    if name not in available():
        return f"this CPU cannot run it (here: {', '.join(available())})"
    return ""


def _cannot_screen_with_triton(device: str, precision: str, docs: Source) -> str:
    """Why the GPU's screen (gpu_engine.py) cannot run for this search ('' if it can)."""
    if not gpu_screen.available():
        return "needs Triton (it comes with torch's CUDA builds; pip install triton), and TINY_KNN_NO_TRITON unset"
    if precision != "exact":
        return f"the screen is for exact searches; --precision {precision} is not one"
    if device == "cpu" and not gpu_screen.interpreted():
        return (
            "runs on CUDA, or on the CPU only under Triton's interpreter (TRITON_INTERPRET=1 set before "
            "Triton is imported)"
        )
    if docs.dim > gpu_screen.MAX_DIM:
        return f"the screen's bound holds up to {gpu_screen.MAX_DIM} dims, not {docs.dim}"
    if docs.rows >= MAX_KERNEL_DOCS:
        return f"the pools take fewer than 2**32 docs, not {docs.rows}"
    return ""


def _choose(queries: Source, docs: Source, k: int, metric: str, threads: int) -> tuple[str, str, dict[str, float]]:
    """The estimator to use, how it was chosen, and what was measured (if anything)."""
    names = available()
    if len(names) == 1:
        return names[0], "the only one that runs here", {}
    key = cache_key(queries.rows, docs.dim, metric, k, threads)
    cached = _read_cache().get(key)
    if isinstance(cached, dict) and cached.get("chosen") in names:
        return cached["chosen"], f"measured earlier: {_timings(cached.get('measured', {}))}", {}
    if queries.rows * docs.rows < MEASURE_MIN_PAIRS:
        first = next(name for name in UNMEASURED_ORDER if name in names)
        return first, "not measured: the search is too small to be worth it", {}
    measured = measure(names, queries, docs, k, metric, threads)
    chosen = min(measured, key=measured.__getitem__)
    _write_cache(key, {"chosen": chosen, "measured": measured, "date": datetime.now(timezone.utc).isoformat()})
    # (kept in cache_path() for the next search of this kind)
    sample = f"{min(queries.rows, threads * SAMPLE_ROWS_PER_THREAD)} x {min(docs.rows, 2 * SAMPLE_DOCS)}"
    return chosen, f"measured on {sample} of the data: {_timings(measured)}", measured


def measure(names: list[str], queries: Source, docs: Source, k: int, metric: str, threads: int) -> dict[str, float]:
    """Seconds each estimator takes to screen SAMPLE_ROWS_PER_THREAD queries per thread against SAMPLE_DOCS docs,
    after a first tile of as many (see SAMPLE_ROWS_PER_THREAD), keeping k scaled to the sample's share of the
    docs."""
    query_rows, doc_rows = min(queries.rows, threads * SAMPLE_ROWS_PER_THREAD), min(docs.rows, 2 * SAMPLE_DOCS)
    sample_queries = torch.zeros((round_up(query_rows, ROW_ALIGN), queries.dim))
    queries.read_into(0, query_rows, sample_queries)
    warm, timed = min(doc_rows, SAMPLE_DOCS), doc_rows - min(doc_rows, SAMPLE_DOCS)
    tiles = [torch.zeros((round_up(count, COL_ALIGN), docs.dim)) for count in (warm, timed)]
    docs.read_into(0, warm, tiles[0])
    docs.read_into(warm, doc_rows, tiles[1])
    if metric == "cosine":
        normalize(sample_queries[:query_rows])
        normalize(tiles[0][:warm])
        normalize(tiles[1][:timed])
    sample_k = max(1, min(doc_rows, round(k * doc_rows / docs.rows)))
    seconds = {}
    for name in names:
        estimator = make_estimator(name, metric, docs.dim)
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(estimator.matmul_precision)
        try:
            selector = ThresholdTopK(query_rows, sample_k, threads=threads)
            operand = estimator.prepare(sample_queries, query=True)
            selector.add_chunk(estimator, operand, estimator.prepare(tiles[0], query=False, slot=0), 0, warm)
            second = estimator.prepare(tiles[1], query=False, slot=1)
            started = time.perf_counter()
            selector.add_chunk(estimator, operand, second, warm, timed)
            seconds[name] = time.perf_counter() - started
            selector.result()  # and its threads end
        finally:
            torch.set_float32_matmul_precision(previous)
    return seconds


def cache_key(queries: int, dim: int, metric: str, k: int, threads: int) -> str:
    """What changes which estimator is fastest."""
    bucket = 4 ** int(math.log(max(1, k), 4))  # k in [1, 4), [4, 16), [16, 64), ...
    few = "few" if queries < FEW_QUERIES else "many"
    return f"{cpu_model()}|torch {torch.__version__}|{threads} threads|dim {dim}|{metric}|k~{bucket}|{few} queries"


def cpu_model() -> str:
    """The CPU's model name as the OS reports it (Linux's /proc/cpuinfo), else platform's word for it."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as stream:
        for line in stream:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cache_path() -> str:
    folder = os.environ.get("TINY_KNN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "tiny-knn"
    )
    return os.path.join(folder, CACHE_FILE)


def _read_cache() -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        with open(cache_path(), encoding="utf-8") as stream:
            verdicts = json.load(stream)
        if isinstance(verdicts, dict):
            return verdicts
    return {}


def _write_cache(key: str, verdict: dict[str, Any]) -> None:
    """Adds a verdict to the cache file (atomically; a cache that cannot be written is only not kept)."""
    path = cache_path()
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        verdicts = {**_read_cache(), key: verdict}
        handle, temporary = tempfile.mkstemp(prefix=".estimators.", suffix=".tmp", dir=os.path.dirname(path))
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump(verdicts, stream, indent=1)
            os.replace(temporary, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def _timings(measured: dict[str, float]) -> str:
    return ", ".join(f"{name} {1e3 * seconds:.1f} ms" for name, seconds in sorted(measured.items(), key=lambda x: x[1]))


def default_budget_bytes(device: str) -> int:
    """The budget when the user sets none: what is free, times DEFAULT_BUDGET_FRACTION."""
    return int(available_bytes(device) * DEFAULT_BUDGET_FRACTION)


def available_bytes(device: str) -> int:
    """What is free: CUDA's free memory, or available RAM."""
    if device == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)
