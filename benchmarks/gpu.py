"""Time tiny-knn on a CUDA GPU against the float32 and TF32 matrix-product floors and the naive torch.topk loop.

    python benchmarks/gpu.py                          # 16,384 queries x 1,000,000 docs x 768, k 10 and 1000
    python benchmarks/gpu.py --queries 4096 --docs 200000 --ks 10,100,1000,2000 --repeats 3

Contenders, all on the same generated float32 data (docs written once to a .pt file in --out, so that
tiny-knn streams them from the page cache as a user's run would):

  floor-fp32   every query times every doc in exact float32 (TF32 off), docs already on the GPU, in
               (16,384 x 65,536) tiles; no selection. CUDA events around the whole loop.
  floor-tf32   the same with TF32 on (what the original tiny-knn used; not exact).
  tiny-knn     compute_topk(queries.pt, docs.pt, k, out_path=...) on CUDA: from the .pt paths to the
               written result file, wall clock.
  naive        bench.py's naive loop on the GPU: queries on the GPU, docs streamed to it per 65,536-doc
               chunk, q @ chunk.T (exact float32), torch.topk, cat with the running top-k, torch.topk
               again; results copied back and saved with torch.save, as tiny-knn's are. Wall clock,
               loading and saving included.

Effective TFLOP/s = 2 * Q * D * dim / seconds. Each contender runs --repeats times after a warm-up run;
the median is reported. Each tiny-knn answer is checked on 64 random queries against float64 scores
(tests/oracle.py's test). Writes OUT/gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

import torch
from bench import naive_torch_topk

from tiny_knn import compute_topk

TILE_QUERIES, TILE_DOCS = 16384, 65536


def floor_seconds(queries: torch.Tensor, docs: torch.Tensor, tf32: bool) -> float:
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    tile = torch.empty(min(TILE_QUERIES, queries.shape[0]) * TILE_DOCS, device="cuda")
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for doc_start in range(0, docs.shape[0], TILE_DOCS):
        chunk_t = docs[doc_start : doc_start + TILE_DOCS].T
        for query_start in range(0, queries.shape[0], TILE_QUERIES):
            block = queries[query_start : query_start + TILE_QUERIES]
            out = tile[: block.shape[0] * chunk_t.shape[1]].view(block.shape[0], chunk_t.shape[1])
            torch.mm(block, chunk_t, out=out)
    stop.record()
    torch.cuda.synchronize()
    torch.backends.cuda.matmul.allow_tf32 = previous
    return start.elapsed_time(stop) / 1000


def exact_reference(q_path: str, d_path: str, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 scores of the given query rows against every doc, on the GPU, and the scale of their error."""
    queries = torch.load(q_path, weights_only=True)[rows].cuda().double()
    docs = torch.load(d_path, weights_only=True, mmap=True)
    scores = torch.cat(
        [queries @ docs[start : start + TILE_DOCS].cuda().double().T for start in range(0, docs.shape[0], TILE_DOCS)],
        dim=1,
    )
    largest = max(
        float(docs[start : start + TILE_DOCS].norm(dim=1).max()) for start in range(0, docs.shape[0], TILE_DOCS)
    )
    return {"scores": scores, "tolerance": 1e-5 * (queries.norm(dim=1, keepdim=True) * largest).clamp(min=1.0)}


def check_exact(reference: dict[str, torch.Tensor], scores: torch.Tensor, indices: torch.Tensor) -> str:
    """tests/oracle.assert_exact's test: scores within the float32 tolerance of the float64 top-k, and every
    returned doc's float64 score too (so indices agree with float64 except at genuine ties)."""
    k = scores.shape[1]
    best = torch.topk(reference["scores"], k, dim=1).values
    tolerance = reference["tolerance"]
    if not ((scores.cuda().double() - best).abs() <= tolerance).all():
        return "FAIL: scores differ from the float64 top-k"
    if not ((reference["scores"].gather(1, indices.cuda()) - best).abs() <= tolerance).all():
        return "FAIL: a returned doc is not in the float64 top-k"
    if any(row.unique().numel() != k for row in indices):
        return "FAIL: a doc returned twice"
    return "exact"


def profile(q_path: str, d_path: str, k: int, out_path: str) -> str:
    """torch.profiler's table of the CUDA and CPU ops of one tiny-knn call."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    with profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        compute_topk(q_path, d_path, k=k, out_path=out_path)
        torch.cuda.synchronize()
    return str(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=50))


def run_tiny_knn(q_path: str, d_path: str, k: int, out_path: str, options: dict[str, Any]) -> str:
    """compute_topk with the given keyword options, under the variables in options["environment"] if any."""
    options = dict(options)
    with mock.patch.dict(os.environ, options.pop("environment", {})):
        return compute_topk(q_path, d_path, k=k, out_path=out_path, **options)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, value


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=16384)
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--ks", default="10,1000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-sizes", default="", help="tiny-knn doc chunk sizes to try (default: its own)")
    parser.add_argument("--max-memory-gib", type=float, default=0, help="also time tiny-knn under this memory budget")
    parser.add_argument("--profile-k", type=int, default=0, help="print torch.profiler's top CUDA ops for this k")
    parser.add_argument(
        "--without-triton", action="store_true", help="also time tiny-knn with TINY_KNN_NO_TRITON=1 (topk per tile)"
    )
    parser.add_argument("--out", default=os.environ.get("TMPDIR", "/tmp") + "/tiny-knn-gpu")
    parser.add_argument("--json", default=None, help="where to write the report (default OUT/gpu.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    os.makedirs(args.out, exist_ok=True)
    generator = torch.Generator(device="cuda").manual_seed(0)
    queries = torch.randn(args.queries, args.dim, device="cuda", generator=generator)
    docs = torch.randn(args.docs, args.dim, device="cuda", generator=generator)
    q_path, d_path = os.path.join(args.out, "queries.pt"), os.path.join(args.out, "docs.pt")
    torch.save(queries.cpu(), q_path)
    torch.save(docs.cpu(), d_path)
    flops = 2 * args.queries * args.docs * args.dim
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, **vars(args)}
    floor_seconds(queries, docs, tf32=False)  # warm-up
    floors = {
        name: statistics.median(floor_seconds(queries, docs, tf32) for _ in range(args.repeats))
        for name, tf32 in (("floor-fp32", False), ("floor-tf32", True))
    }
    del queries, docs
    torch.cuda.empty_cache()
    sample = torch.randperm(args.queries, generator=torch.Generator().manual_seed(1))[:64]
    reference = exact_reference(q_path, d_path, sample)
    rows = []
    naive_path = os.path.join(args.out, "naive.pt")
    for k in map(int, args.ks.split(",")):
        variants: dict[str, dict[str, Any]] = {"tiny-knn": {}}
        for chunk in filter(None, args.chunk_sizes.split(",")):
            variants[f"tiny-knn chunk {chunk}"] = {"chunk_size": int(chunk)}
        if args.without_triton:
            variants["tiny-knn without Triton"] = {"environment": {"TINY_KNN_NO_TRITON": "1"}}
        if args.max_memory_gib:
            variants[f"tiny-knn --max-memory {args.max_memory_gib}GiB"] = {
                "max_memory": int(args.max_memory_gib * 2**30)
            }
        out_paths = {name: os.path.join(args.out, f"result-{k}-{number}.pt") for number, name in enumerate(variants)}
        times: dict[str, list[float]] = {name: [] for name in [*variants, "naive"]}
        for repeat in range(args.repeats + 1):  # the first run of each is a warm-up
            for name, options in variants.items():
                seconds, _ = timed(
                    lambda k=k, out_path=out_paths[name], options=options: run_tiny_knn(
                        q_path, d_path, k, out_path, options
                    )
                )
                if repeat:
                    times[name].append(seconds)
            seconds, _ = timed(lambda k=k: naive_torch_topk(q_path, d_path, k, naive_path, "cuda", TILE_DOCS))
            if repeat:
                times["naive"].append(seconds)
        checks = {}
        for name, out_path in out_paths.items():
            result = torch.load(out_path, weights_only=True)
            checks[name] = check_exact(reference, result["scores"][sample], result["indices"][sample])
            device = result["device"]
        medians = {name: statistics.median(values) for name, values in times.items()}
        rows.append({"k": k, "device": device, "medians": medians, "times": times, "float64_check": checks})
    if args.profile_k:
        report["profile"] = profile(q_path, d_path, args.profile_k, os.path.join(args.out, "profiled.pt"))
    report.update(floors=floors, rows=rows)
    with open(args.json or os.path.join(args.out, "gpu.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"{report['device']}, torch {report['torch']}: {args.queries} x {args.docs} x {args.dim} float32")
    for name, seconds in floors.items():
        print(f"  {name:10s} {seconds:8.3f} s  {flops / seconds / 1e12:7.1f} TFLOP/s")
    for row in rows:
        for name, seconds in row["medians"].items():
            print(
                f"  k={row['k']:<6d} {name:34s} {seconds:8.3f} s  {flops / seconds / 1e12:7.1f} TFLOP/s"
                f"  ({seconds / floors['floor-fp32']:.2f}x fp32 floor)"
            )
        print(f"  k={row['k']:<6d} on {row['device']}; float64 check of 64 queries: {row['float64_check']}")
    if args.profile_k:
        print(report["profile"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
