"""Scaling across processes: torchrun with 2 CPU ranks against 1 process, and the inputs of a scaling model.

    python benchmarks/distributed.py                  # 4,096 x 200,000 x 384 float32 (bench.py's default), k=100
    python benchmarks/distributed.py --quick          # 1,024 x 20,000 x 128
    python benchmarks/distributed.py --docs 1000000   # any size: --queries, --docs, --dim

Every run has 1 thread per process (OMP_NUM_THREADS=1, as torchrun sets by default), so 2 ranks use the
2 cores that 1 process leaves half idle: the figure is the parallel efficiency of the split, not a
comparison with a 2-thread process. Timed: whole processes, wall clock, best of --repeats, alternated:

- `alone`: tiny-knn ... --cpu, one process;
- `docs`: torchrun --nproc-per-node 2 -m tiny_knn ... --shard docs;
- `queries`: torchrun --nproc-per-node 2 -m tiny_knn ... --shard queries.

Also measured, for the model in RESULTS.md: the merge's sort (`distributed.merge`) on world × k
candidates per query, for several world sizes. Writes JSON (default benchmarks/out/distributed.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from bench import SEED, machine_info, write_data

DEFAULT = {"queries": 4096, "docs": 200_000, "dim": 384}
QUICK = {"queries": 1024, "docs": 20_000, "dim": 128}


def timed(command: list[str], environment: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - started


def merge_costs(k: int, worlds: Sequence[int], queries: int = 256) -> dict[int, float]:
    """Seconds per query to merge `world` lists of k candidates (the sort on rank 0), one thread."""
    import torch

    from tiny_knn import distributed

    torch.set_num_threads(1)
    costs = {}
    for world in worlds:
        rows = max(1, queries // world)
        scores = torch.randn(rows, world * k)
        indices = torch.arange(world * k).repeat(rows, 1)
        started = time.perf_counter()
        distributed.merge(scores, indices, higher_is_better=True)
        costs[world] = (time.perf_counter() - started) / rows
    return costs


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--queries", type=int, help=f"queries (default {DEFAULT['queries']})")
    parser.add_argument("--docs", type=int, help=f"docs (default {DEFAULT['docs']})")
    parser.add_argument("--dim", type=int, help=f"dimension (default {DEFAULT['dim']})")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "distributed.json")
    )
    args = parser.parse_args(argv)
    size = dict(QUICK if args.quick else DEFAULT)
    size.update({name: getattr(args, name) for name in size if getattr(args, name) is not None})
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="tiny-knn-dist-") as folder:
        q_path, d_path = write_data(folder, size["queries"], size["docs"], size["dim"])
        common = [q_path, d_path, "--k", str(args.k), "--cpu", "--quiet"]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        commands = {
            "alone": [sys.executable, "-m", "tiny_knn", *common, "--output-path", os.path.join(folder, "alone.pt")],
            "docs": [
                *torchrun,
                "-m",
                "tiny_knn",
                *common,
                "--shard",
                "docs",
                "--output-path",
                os.path.join(folder, "d.pt"),
            ],
            "queries": [
                *torchrun,
                "-m",
                "tiny_knn",
                *common,
                "--shard",
                "queries",
                "--output-path",
                os.path.join(folder, "q.pt"),
            ],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for repeat in range(args.repeats):
            for name, command in commands.items():
                times[name].append(timed(command, environment))
                print(f"repeat {repeat + 1}: {name} {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
        import torch

        same = all(
            torch.equal(torch.load(os.path.join(folder, f"{name}.pt"))["indices"],
                        torch.load(os.path.join(folder, "alone.pt"))["indices"])
            for name in ("d", "q")
        )  # fmt: skip
    best = {name: min(values) for name, values in times.items()}
    merges = merge_costs(args.k, (2, 8, 64, 512))
    report: dict[str, Any] = {
        "config": {**size, "k": args.k, "repeats": args.repeats, "seed": SEED, "threads_per_process": 1},
        "machine": machine_info(),
        "times_s": times,
        "best_s": best,
        "ratio_to_alone": {name: best[name] / best["alone"] for name in best},
        "identical_indices": same,
        "merge_s_per_query": merges,
    }
    print(
        f"{size['queries']} x {size['docs']} x {size['dim']}, k={args.k}, 1 thread per process, best of {args.repeats}"
    )
    for name in commands:
        print(f"  {name:<8} {best[name]:7.2f} s  {best[name] / best['alone']:.2f}x alone")
    print(f"  indices identical to one process: {same}")
    for world, cost in merges.items():
        print(f"  merge of {world} x {args.k} candidates: {cost * 1e6:.1f} us per query")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as stream:
        json.dump(report, stream, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
