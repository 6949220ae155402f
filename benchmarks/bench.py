"""Benchmark tiny-knn against the matrix-product floor, FAISS and a naive torch.topk loop, on the same data.

    python benchmarks/bench.py                 # 4096 queries x 200,000 docs x 384 dims, k 10..2000, 2 repeats
    python benchmarks/bench.py --quick         # 1024 x 20,000 x 128, k 10 and 2000, 1 repeat: a smoke test
    python benchmarks/bench.py --ks 100 --contenders floor,tiny-knn,faiss --repeats 3

Contenders (all read the same .pt files, written once per run into --out):

  floor          the matrix products alone: every query times every doc with torch.mm into a preallocated
                 tile, no selection, data already in memory. Timed for several block shapes, and with each of
                 tiny-knn's estimators that runs here ("estimates: NAME", preparation of each doc chunk
                 included, as in the engine, and nothing scored exactly); the best float32 median (torch.mm's
                 shapes, "estimates: kernel", "estimates: torch") is the floor. It does not depend on k, so it
                 is measured once per repeat. The bfloat16 estimators' times ("estimates: screen",
                 "estimates: torch-bf16") are shown for comparison: not float32 products, so never the floor.
  tiny-knn       compute_topk(queries.pt, docs.pt, k, force_cpu=True, out_path=...) in a Python process.
  tiny-knn-cli   `tiny-knn Q D --k K --cpu --quiet --output-path OUT` as a whole process.
  faiss          faiss_search.search(): torch.load both, IndexFlatIP, add, search, torch.save.
  faiss-process  `python benchmarks/faiss_search.py Q D K OUT` as a whole process.
  torch-topk     torch.load both, then per 16,384-doc chunk: q @ chunk.T, torch.topk, merge with the
                 running top-k by cat + topk; torch.save.

How things are measured. Every contender runs in a fresh child process, one at a time, and the parent
does nothing else meanwhile. "process" contenders are timed from start to exit (interpreter start-up and
imports included). "in-process" contenders run in a worker child (this script with `worker`) that
imports everything first, then times only the call, from the .pt paths to the written result file;
their "RSS at call" column is the worker's resident set just before the call (interpreter, torch and
libraries), which their peak includes. Peak RSS is the child's VmHWM, the kernel's high-water mark of its
resident set, read from /proc/<pid>/status every 20 ms (and by in-process workers themselves after the
call); peak RssAnon (anonymous memory: what was allocated, not file pages mapped from the page cache) is
the largest of those 20 ms samples, so a shorter spike can be missed (see procmon.py). Within each
repeat the contenders run round-robin per k, in an order rotated from one repeat to the next; medians
over repeats are reported. The data files sit in the page cache throughout (they were just written):
this measures compute, not disk.

Output: a table per k on stdout (progress on stderr), OUT/bench.json (configuration, machine, plans,
every raw time and memory figure, agreement of each contender's answer with tiny-knn's) and
OUT/bench.png (time against k) when matplotlib is installed (pip install -e '.[bench]').

Duration, on the 2-core AVX2 development machine (AMD EPYC, ~65 GFLOP/s in float32): a default run takes
about 13 minutes, 6.5 per repeat (about 3 s of each of the 21 child processes per repeat is interpreter
start-up); the floor alone is ~50 s per repeat (five block shapes). --quick takes about 40 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

from procmon import Measured, console_script, mib, read_status, run_measured

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CONTENDERS = ("floor", "tiny-knn", "tiny-knn-cli", "faiss", "faiss-process", "torch-topk")
MODE = {
    "floor": "in-process",
    "tiny-knn": "in-process",
    "tiny-knn-cli": "process",
    "faiss": "in-process",
    "faiss-process": "process",
    "torch-topk": "in-process",
}
FAISS_OF_MODE = {"in-process": "faiss", "process": "faiss-process"}
# Each estimator's estimates alone, timed with the floor ("estimates: NAME"); the float32 ones (kernel, torch) are
# float32 products and may be the floor, the bfloat16 ones are shown beside it, never taken as it
ESTIMATES = "estimates: {}"
BF16_ESTIMATES = (ESTIMATES.format("screen"), ESTIMATES.format("torch-bf16"))
FLOOR_SHAPES = ((4096, 512), (4096, 1024), (2048, 2048), (1024, 4096), (4096, 2048))
NAIVE_CHUNK_ROWS = 16384
SAMPLE_INTERVAL_S = 0.02
SEED = 0
DEFAULTS = {"queries": 4096, "docs": 200_000, "dim": 384, "ks": "10,100,1000,2000", "repeats": 2}
QUICK = {"queries": 1024, "docs": 20_000, "dim": 128, "ks": "10,2000", "repeats": 1}


# ----------------------------------------------------------------------------------------------------------
# The contenders' code, run inside a worker child process.


def naive_torch_topk(
    q_path: str, d_path: str, k: int, out_path: str, device: str = "cpu", chunk_rows: int = NAIVE_CHUNK_ROWS
) -> None:
    """The loop people write first: score a chunk, keep its top k, merge with the running top k, save.

    On a GPU (gpu.py), in exact float32, the docs stream from the page cache chunk by chunk; on the CPU they
    are loaded whole first."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    queries = torch.load(q_path, map_location="cpu", weights_only=True).float().to(device)
    docs = torch.load(d_path, map_location="cpu", weights_only=True, mmap=device != "cpu")
    k = min(k, docs.shape[0])
    best_scores = best_indices = None
    for start in range(0, docs.shape[0], chunk_rows):
        scores = queries @ docs[start : start + chunk_rows].to(device, non_blocking=True).float().T
        chunk_scores, chunk_indices = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        chunk_indices += start
        if best_scores is None or best_indices is None:
            best_scores, best_indices = chunk_scores, chunk_indices
            continue
        merged_scores = torch.cat([best_scores, chunk_scores], dim=1)
        merged_indices = torch.cat([best_indices, chunk_indices], dim=1)
        best_scores, position = torch.topk(merged_scores, min(k, merged_scores.shape[1]), dim=1)
        best_indices = torch.gather(merged_indices, 1, position)
    assert best_scores is not None and best_indices is not None
    torch.save({"indices": best_indices.cpu(), "scores": best_scores.cpu()}, out_path)


def floor_times(q_path: str, d_path: str, shapes: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Seconds to multiply all queries by all docs, in (query block, doc chunk) tiles, for each shape.

    Docs are the outer loop and query blocks the inner one, as in tiny-knn's engine; every product is
    written into a preallocated tile. Nothing is selected.
    """
    import torch

    queries = torch.load(q_path, map_location="cpu", weights_only=True).float()
    docs = torch.load(d_path, map_location="cpu", weights_only=True).float()
    rows, count = queries.shape[0], docs.shape[0]
    torch.mm(queries[:256], docs[:1024].T)  # warm-up: thread pool, BLAS dispatch
    times = {}
    for block_rows, chunk_rows in shapes:
        tile = torch.empty(block_rows * chunk_rows)
        start = time.perf_counter()
        for doc_start in range(0, count, chunk_rows):
            chunk_t = docs[doc_start : doc_start + chunk_rows].T
            cols = chunk_t.shape[1]
            for query_start in range(0, rows, block_rows):
                block = queries[query_start : query_start + block_rows]
                torch.mm(block, chunk_t, out=tile[: block.shape[0] * cols].view(block.shape[0], cols))
        times[f"{block_rows}x{chunk_rows}"] = time.perf_counter() - start
    from tiny_knn import estimators

    for name in estimators.available():
        times[ESTIMATES.format(name)] = estimates_only(name, queries, docs)
    return times


def _prepared_chunks(estimator: Any, docs: Any, chunk_rows: int) -> Iterator[tuple[int, int, Any, int]]:
    """(first doc, docs, operand, padded docs) per chunk: each chunk prepared by `estimator` on one thread while
    the caller works on the one before, as in the engine."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from tiny_knn.estimators import DOC_PANEL

    count = docs.shape[0]
    chunk_buffers = [torch.zeros((chunk_rows, docs.shape[1])) for _ in range(2)]

    def pack(start: int, slot: int) -> tuple[int, int, Any, int]:
        stop = min(start + chunk_rows, count)
        padded = -(-(stop - start) // DOC_PANEL) * DOC_PANEL
        buffer = chunk_buffers[slot]
        buffer[: stop - start] = docs[start:stop]
        buffer[stop - start : padded] = 0  # zero rows up to the panel
        return start, stop - start, estimator.prepare(buffer[:padded], query=False, slot=slot), padded

    starts = range(0, count, chunk_rows)
    with ThreadPoolExecutor(1) as packer:
        pending = packer.submit(pack, 0, 0)
        for index in range(len(starts)):
            chunk = pending.result()
            if index + 1 < len(starts):
                pending = packer.submit(pack, starts[index + 1], (index + 1) % 2)
            yield chunk


def estimates_only(name: str, queries: Any, docs: Any, chunk_rows: int = 4096) -> float:
    """Seconds for estimator `name`'s estimates of every pair (preparation included, as in the engine), with
    every threshold at +inf so that no pair is scored exactly or selected: its floor. For the float32
    estimators ("kernel", "torch") these are float32 products; the bfloat16 ones are reported beside the floor,
    never as the floor."""
    import torch

    from tiny_knn.engine import matmul_precision
    from tiny_knn.estimators import make_estimator
    from tiny_knn.topk import ThresholdTopK

    estimator = make_estimator(name, "ip", queries.shape[1])
    padded = torch.zeros((-(-queries.shape[0] // 16) * 16, queries.shape[1]))
    padded[: queries.shape[0]] = queries
    selector = ThresholdTopK(queries.shape[0], 1, start_thresholds=torch.full((queries.shape[0],), float("inf")))
    with matmul_precision(estimator.matmul_precision):
        start_time = time.perf_counter()
        operand = estimator.prepare(padded, query=True)
        for first, count, chunk, _ in _prepared_chunks(estimator, docs, chunk_rows):
            selector.add_chunk(estimator, operand, chunk, first, count)
        return time.perf_counter() - start_time


def worker_main(spec_json: str) -> int:
    """`bench.py worker SPEC`: imports, then times one in-process contender; prints one JSON line."""
    spec = json.loads(spec_json)
    name = spec["name"]
    import torch

    if name == "tiny-knn":
        import warnings

        from tiny_knn import compute_topk

        warnings.simplefilter("ignore")  # k clamped to the docs in tiny runs

        def call() -> Any:
            return compute_topk(spec["q"], spec["d"], spec["k"], force_cpu=True, out_path=spec["out"])
    elif name == "faiss":
        from faiss_search import search

        def call() -> Any:
            return search(spec["q"], spec["d"], spec["k"], spec["out"])
    elif name == "torch-topk":

        def call() -> Any:
            return naive_torch_topk(spec["q"], spec["d"], spec["k"], spec["out"])
    elif name == "floor":

        def call() -> Any:
            return floor_times(spec["q"], spec["d"], [tuple(shape) for shape in spec["shapes"]])
    else:
        raise SystemExit(f"unknown contender {name!r}")
    at_call = read_status()
    start = time.perf_counter()
    value = call()
    seconds = time.perf_counter() - start
    after = read_status()
    report = {
        "seconds": seconds,
        "rss_at_call": at_call.get("VmRSS"),
        "rss_anon_at_call": at_call.get("RssAnon"),
        "hwm_after_call": after.get("VmHWM"),
        "torch_threads": torch.get_num_threads(),
    }
    if name == "floor":
        report["shapes"] = value
    print(json.dumps(report))
    return 0


# ----------------------------------------------------------------------------------------------------------
# The parent: data, runs, summaries.


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time tiny-knn against the matrix-product floor, FAISS and a naive torch.topk loop on the "
        "same data. See the module docstring (top of this file) for what is measured and how.",
    )
    parser.add_argument(
        "--queries", type=int, help=f"queries (default {DEFAULTS['queries']}; --quick {QUICK['queries']})"
    )
    parser.add_argument("--docs", type=int, help=f"docs (default {DEFAULTS['docs']}; --quick {QUICK['docs']})")
    parser.add_argument("--dim", type=int, help=f"dimension (default {DEFAULTS['dim']}; --quick {QUICK['dim']})")
    parser.add_argument("--ks", help=f"comma-separated values of k (default {DEFAULTS['ks']}; --quick {QUICK['ks']})")
    parser.add_argument(
        "--repeats", type=int, help=f"repeats (default {DEFAULTS['repeats']}; --quick {QUICK['repeats']})"
    )
    parser.add_argument("--out", default=os.path.join(HERE, "out"), help="output folder (default benchmarks/out)")
    parser.add_argument(
        "--contenders", default=",".join(CONTENDERS), help=f"comma-separated subset of {','.join(CONTENDERS)}"
    )
    parser.add_argument(
        "--threads", type=int, help="OMP_NUM_THREADS and MKL_NUM_THREADS for every child (default: libraries' own)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test of this script")
    parser.add_argument("--keep-results", action="store_true", help="keep the contenders' result files")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.ks = sorted({int(k) for k in str(args.ks).split(",") if k.strip()})
    args.contenders = [name.strip() for name in args.contenders.split(",") if name.strip()]
    unknown = [name for name in args.contenders if name not in CONTENDERS]
    if unknown or not args.contenders:
        parser.error(f"--contenders: unknown {unknown}; choose from {','.join(CONTENDERS)}")
    if min(args.queries, args.docs, args.dim, args.repeats, *args.ks) < 1:
        parser.error("sizes, k and repeats must be >= 1")
    return args


def machine_info() -> dict[str, Any]:
    import numpy
    import torch

    import tiny_knn

    cpu_model = "unknown"
    flags: set[str] = set()
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            name, _, value = line.partition(":")
            if name.strip() == "model name" and cpu_model == "unknown":
                cpu_model = value.strip()
            if name.strip() == "flags" and not flags:
                flags = set(value.split())
    memory = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    try:
        import faiss

        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = None
    try:
        commit = subprocess.run(
            ["git", "-C", REPO, "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "cpu_model": cpu_model,
        "simd": sorted(flags & {"avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"}),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_bytes": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": numpy.__version__,
        "faiss": faiss_version,
        "tiny_knn": tiny_knn.__version__,
        "git": commit,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_data(folder: str, queries: int, docs: int, dim: int) -> tuple[str, str]:
    """Random normal float32 queries and docs from a fixed seed, torch.save'd into `folder`."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    q_path, d_path = os.path.join(folder, "queries.pt"), os.path.join(folder, "docs.pt")
    torch.save(torch.randn(queries, dim, generator=generator), q_path)
    torch.save(torch.randn(docs, dim, generator=generator), d_path)
    return q_path, d_path


def plan_for(q_path: str, d_path: str, k: int) -> dict[str, Any]:
    """tiny-knn's plan for this k (default budget from the memory free now) and the docs bytes it reads."""
    import warnings

    from tiny_knn.api import prepare
    from tiny_knn.options import SearchOptions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _queries, _docs, plan = prepare(q_path, d_path, k, SearchOptions(force_cpu=True))
    return {
        "describe": plan.describe(),
        "doc_passes": plan.doc_passes,
        "query_batch_rows": plan.query_batch_rows,
        "query_block_rows": plan.query_block_rows,
        "doc_chunk_rows": plan.doc_chunk_rows,
        "selection": plan.selection,
        "docs_bytes_read": os.path.getsize(d_path) * plan.doc_passes,
    }


def command_for(
    name: str, q_path: str, d_path: str, k: int, out_path: str, shapes: Sequence[tuple[int, int]] = ()
) -> list[str]:
    if name == "tiny-knn-cli":
        return [
            console_script("tiny-knn"),
            q_path,
            d_path,
            "--k",
            str(k),
            "--cpu",
            "--quiet",
            "--output-path",
            out_path,
        ]
    if name == "faiss-process":
        return [sys.executable, os.path.join(HERE, "faiss_search.py"), q_path, d_path, str(k), out_path]
    spec = {"name": name, "q": q_path, "d": d_path, "k": k, "out": out_path, "shapes": list(shapes)}
    return [sys.executable, os.path.abspath(__file__), "worker", json.dumps(spec)]


def run_one(
    name: str,
    q_path: str,
    d_path: str,
    k: int,
    out_path: str,
    env: dict[str, str],
    shapes: Sequence[tuple[int, int]] = (),
) -> dict[str, Any]:
    """Runs one contender once in a child process; returns its seconds and memory figures."""
    measured: Measured = run_measured(
        command_for(name, q_path, d_path, k, out_path, shapes), interval=SAMPLE_INTERVAL_S, env=env, cwd=HERE
    ).check()
    record: dict[str, Any] = {
        "seconds": measured.wall_s,
        "process_wall_s": measured.wall_s,
        "peak_rss": measured.peak_rss,
        "peak_rss_sampled": measured.peak.get("VmRSS"),
        "peak_rss_anon": measured.peak.get("RssAnon"),
        "peak_rss_file": measured.peak.get("RssFile"),
        "samples": measured.samples,
    }
    if MODE[name] == "in-process":
        report = json.loads(measured.stdout.strip().splitlines()[-1])
        record.update(report)  # "seconds" becomes the call alone
        record["peak_rss"] = max(record["peak_rss"] or 0, report.get("hwm_after_call") or 0)
    return record


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def agreement(reference_path: str, other_path: str, docs: int) -> dict[str, float]:
    """How far another answer is from tiny-knn's: share of the same (query, doc) pairs, worst score gap."""
    import torch

    reference = torch.load(reference_path, weights_only=True)
    other = torch.load(other_path, weights_only=True)
    ref_indices, other_indices = reference["indices"].long(), other["indices"].long()
    offsets = torch.arange(ref_indices.shape[0]).unsqueeze(1) * docs
    shared = torch.isin((other_indices + offsets).flatten(), (ref_indices + offsets).flatten()).sum()
    gap = (reference["scores"].float() - other["scores"].float()).abs().max()
    return {"recall_vs_tiny_knn": float(shared) / ref_indices.numel(), "max_score_diff": float(gap)}


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_tables(report: dict[str, Any]) -> None:
    config, floor = report["config"], report.get("floor")
    print()
    print(
        f"tiny-knn benchmark: {config['queries']} queries x {config['docs']} docs x {config['dim']} dims float32, "
        f"median of {config['repeats']} repeat(s); {report['machine']['cpu_model']}, "
        f"{report['machine']['cpus_usable']} cores, torch {report['machine']['torch']}, "
        f"faiss {report['machine']['faiss']}"
    )
    if floor:
        shapes = ", ".join(f"{shape} {seconds:.2f} s" for shape, seconds in floor["median_s"].items())
        print(f"floor: best block shape {floor['best_shape']} ({floor['gflops']:.0f} GFLOP/s); all shapes: {shapes}")
    print(
        "in-process = a worker child timing only the call (RSS at call: its resident set just before the call, "
        "included in its peak); process = a whole child process, start-up included. Peak RSS: VmHWM (kernel high-water "
        f"mark); peak RssAnon: max of {SAMPLE_INTERVAL_S * 1000:.0f} ms samples. x faiss compares like with like "
        "(in-process with faiss, process with faiss-process)."
    )
    header = (
        f"{'contender':<14} {'mode':<10} {'median s':>9} {'x floor':>8} {'x faiss':>8} "
        f"{'peak RSS':>10} {'peak RssAnon':>13} {'RSS at call':>12}  {'recall':>7}"
    )
    for k, entry in report["results"].items():
        plan = report["plans"][k]
        print()
        print(
            f"k={k}: tiny-knn plan: {plan['describe'][2]}; docs bytes read {plan['docs_bytes_read'] / 1e6:,.0f} MB "
            f"({plan['doc_passes']} pass(es))"
        )
        print(header)
        print("-" * len(header))
        if floor:
            print(
                f"{'floor':<14} {'in-process':<10} {floor['best_median_s']:>9.2f} {1:>8.2f} {'-':>8} "
                f"{mib(floor['peak_rss']):>10} {mib(floor['peak_rss_anon']):>13} {mib(floor['rss_at_call']):>12}  "
                f"{'-':>7}"
            )
        for name, row in entry.items():
            recall = row.get("agreement", {}).get("recall_vs_tiny_knn")
            print(
                f"{name:<14} {row['mode']:<10} {row['median_s']:>9.2f} {fmt_ratio(row['x_floor']):>8} "
                f"{fmt_ratio(row['x_faiss']):>8} {mib(row['peak_rss']):>10} {mib(row['peak_rss_anon']):>13} "
                f"{mib(row.get('rss_at_call')):>12}  {'-' if recall is None else f'{recall:.4f}':>7}"
            )
    print()
    print("recall: share of tiny-knn's (query, doc) pairs that the contender also returned (first repeat).")


def draw_chart(report: dict[str, Any], path: str) -> str | None:
    """Time against k, one line per contender, the floor as a horizontal line. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ks = [int(k) for k in report["results"]]
    names = [name for name in CONTENDERS if name != "floor" and name in report["config"]["contenders"]]
    figure, axes = plt.subplots(figsize=(8, 5))
    for name in names:
        axes.plot(ks, [report["results"][str(k)][name]["median_s"] for k in ks], marker="o", label=name)
    floor = report.get("floor")
    if floor:
        axes.axhline(
            floor["best_median_s"],
            color="black",
            linestyle="--",
            label=f"floor (matrix products, {floor['best_shape']})",
        )
        torch_shapes = {s: t for s, t in floor["median_s"].items() if not s.startswith(ESTIMATES.format(""))}
        if floor["best_shape"] not in torch_shapes and torch_shapes:  # the torch.mm floor too, for comparison
            best = min(torch_shapes, key=torch_shapes.get)
            axes.axhline(torch_shapes[best], color="gray", linestyle=":", label=f"torch.mm floor ({best})")
    axes.set_xscale("log")
    axes.set_xticks(ks, [str(k) for k in ks])
    axes.set_ylim(bottom=0)
    axes.set_xlabel("k")
    axes.set_ylabel("seconds (median)")
    config, machine = report["config"], report["machine"]
    axes.set_title(
        f"{config['queries']} x {config['docs']} x {config['dim']} float32, CPU: {machine['cpu_model']}, "
        f"{machine['cpus_usable']} cores",
        fontsize=9,
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["worker"]:
        return worker_main(argv[1])
    args = parse_args(argv)
    env = dict(os.environ)
    if args.threads:
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[variable] = os.environ[variable] = str(args.threads)
    if any(name.startswith("faiss") for name in args.contenders):
        try:
            import faiss  # noqa: F401
        except ImportError:
            log("faiss is not installed (pip install faiss-cpu): dropping the faiss contenders")
            args.contenders = [name for name in args.contenders if not name.startswith("faiss")]
    began = time.perf_counter()
    args.out = os.path.abspath(args.out)  # workers run elsewhere
    os.makedirs(args.out, exist_ok=True)
    results_dir = os.path.join(args.out, "results")
    os.makedirs(results_dir, exist_ok=True)
    log(f"generating {args.queries} queries and {args.docs} docs, dim {args.dim}, seed {SEED} ...")
    q_path, d_path = write_data(args.out, args.queries, args.docs, args.dim)
    machine = machine_info()
    plans = {str(k): plan_for(q_path, d_path, k) for k in args.ks}
    runners = [name for name in CONTENDERS if name in args.contenders and name != "floor"]
    # Clamped to the data; shapes that become equal are timed once.
    shapes = list(dict.fromkeys((min(b, args.queries), min(c, args.docs)) for b, c in FLOOR_SHAPES))
    floor_runs: list[dict[str, Any]] = []
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {str(k): {name: [] for name in runners} for k in args.ks}
    agreements: dict[str, dict[str, dict[str, float]]] = {}
    total_runs = args.repeats * (("floor" in args.contenders) + len(args.ks) * len(runners))
    done = 0

    def progress(text: str) -> None:
        nonlocal done
        done += 1
        elapsed = time.perf_counter() - began
        log(f"[{done}/{total_runs}, {elapsed / 60:.1f} min] {text}")

    for repeat in range(args.repeats):
        if "floor" in args.contenders:
            spec_shapes = shapes[repeat % len(shapes) :] + shapes[: repeat % len(shapes)]
            record = run_one("floor", q_path, d_path, 0, "", env, spec_shapes)
            record["order"] = [f"{b}x{c}" for b, c in spec_shapes]
            floor_runs.append(record)
            best = min(record["shapes"], key=record["shapes"].get)
            progress(f"repeat {repeat + 1}: floor: best {best} {record['shapes'][best]:.2f} s")
        for k in args.ks:
            shift = repeat % max(1, len(runners))
            for name in runners[shift:] + runners[:shift]:
                out_path = os.path.join(results_dir, f"{name}-k{k}.pt")
                record = run_one(name, q_path, d_path, k, out_path, env)
                raw[str(k)][name].append(record)
                progress(
                    f"repeat {repeat + 1}: k={k} {name}: {record['seconds']:.2f} s "
                    f"(process {record['process_wall_s']:.2f} s), peak RSS {mib(record['peak_rss'])}, "
                    f"peak RssAnon {mib(record['peak_rss_anon'])}"
                )
            reference = next((name for name in ("tiny-knn", "tiny-knn-cli") if name in runners), None)
            if repeat == 0 and reference is not None:
                reference_path = os.path.join(results_dir, f"{reference}-k{k}.pt")
                agreements[str(k)] = {
                    name: agreement(reference_path, os.path.join(results_dir, f"{name}-k{k}.pt"), args.docs)
                    for name in runners
                }

    report: dict[str, Any] = {
        "config": {
            "queries": args.queries,
            "docs": args.docs,
            "dim": args.dim,
            "dtype": "float32",
            "ks": args.ks,
            "repeats": args.repeats,
            "contenders": args.contenders,
            "threads": args.threads,
            "seed": SEED,
            "floor_shapes": [f"{b}x{c}" for b, c in shapes],
            "naive_chunk_rows": NAIVE_CHUNK_ROWS,
            "sample_interval_s": SAMPLE_INTERVAL_S,
        },
        "machine": machine,
        "method": {
            "isolation": "every contender runs in a fresh child process, one at a time",
            "in-process": "a worker child imports everything, then times only the call (paths in, result file out)",
            "process": "wall time of the whole child process, from start to exit",
            "peak_rss": f"VmHWM of the child sampled every {SAMPLE_INTERVAL_S * 1000:.0f} ms, and read by "
            "in-process workers after the call (ru_maxrss is not used: it includes the parent's, see procmon.py)",
            "peak_rss_anon": f"max of /proc/<pid>/status RssAnon sampled every {SAMPLE_INTERVAL_S * 1000:.0f} ms",
            "order": "round-robin per k within each repeat, order rotated per repeat; medians over repeats",
            "page_cache": "input files are in the page cache (written just before): compute, not disk, is measured",
        },
        "data": {
            "queries_path": q_path,
            "docs_path": d_path,
            "queries_bytes": os.path.getsize(q_path),
            "docs_bytes": os.path.getsize(d_path),
        },
        "plans": plans,
    }
    if floor_runs:
        per_shape = {shape: [run["shapes"][shape] for run in floor_runs] for shape in floor_runs[0]["shapes"]}
        medians = {shape: median(times) for shape, times in per_shape.items()}
        float32 = {shape: seconds for shape, seconds in medians.items() if shape not in BF16_ESTIMATES}
        best_shape = min(float32, key=float32.get)
        report["floor"] = {
            "times_s": per_shape,
            "median_s": medians,
            "best_shape": best_shape,
            "best_median_s": medians[best_shape],
            "gflops": 2 * args.queries * args.docs * args.dim / medians[best_shape] / 1e9,
            "peak_rss": max(run["peak_rss"] for run in floor_runs),
            "peak_rss_anon": max(run["peak_rss_anon"] or 0 for run in floor_runs),
            "rss_at_call": floor_runs[0]["rss_at_call"],
            "runs": floor_runs,
        }
    report["results"] = {}
    for k in args.ks:
        entry = {}
        for name in runners:
            runs = raw[str(k)][name]
            entry[name] = {
                "mode": MODE[name],
                "times_s": [run["seconds"] for run in runs],
                "median_s": median([run["seconds"] for run in runs]),
                "process_wall_s": [run["process_wall_s"] for run in runs],
                "peak_rss": max(run["peak_rss"] for run in runs),
                "peak_rss_anon": max(run["peak_rss_anon"] or 0 for run in runs),
                "rss_at_call": runs[0].get("rss_at_call"),
                "runs": runs,
            }
        for name, row in entry.items():
            row["x_floor"] = row["median_s"] / report["floor"]["best_median_s"] if floor_runs else None
            faiss_name = FAISS_OF_MODE[row["mode"]]
            row["x_faiss"] = row["median_s"] / entry[faiss_name]["median_s"] if faiss_name in entry else None
            if str(k) in agreements and name in agreements[str(k)]:
                row["agreement"] = agreements[str(k)][name]
        report["results"][str(k)] = entry
    report["total_seconds"] = time.perf_counter() - began

    print_tables(report)
    json_path = os.path.join(args.out, "bench.json")
    with open(json_path, "w") as stream:
        json.dump(report, stream, indent=2)
    print(f"\nwrote {json_path}")
    chart = draw_chart(report, os.path.join(args.out, "bench.png"))
    print(f"wrote {chart}" if chart else "no chart: matplotlib is not installed (pip install -e '.[bench]')")
    if not args.keep_results:
        shutil.rmtree(results_dir, ignore_errors=True)
    log(f"total {report['total_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
