"""Each estimator against the others, the measured default, FAISS, and the code before a change: whole CLI
processes on the same files, alternating, median of several runs.

    python benchmarks/estimators.py                                  # 4096 x 200,000 x 384, k 10..2000, 5 runs
    python benchmarks/estimators.py --before /tmp/old-checkout/src   # also the products of an older checkout
    python benchmarks/estimators.py --quick                          # 1024 x 20,000 x 128: a smoke test

Contenders, each `tiny-knn Q D --k K --cpu --quiet --output-path OUT` (or faiss_search.py) as a whole process:
  default          the estimator backend.py chooses (measured on the data at its first run, then cached: the
                   first run is reported apart, the median is of the cached runs)
  NAME             each estimator that runs here, forced with TINY_KNN_PRODUCT=NAME
  before:NAME      with --before SRC: that checkout's `python -m tiny_knn` (PYTHONPATH=SRC) with
                   TINY_KNN_PRODUCT=NAME, for NAME in --before-products (its products, before this change)
  faiss            faiss_search.py (IndexFlatIP): torch.load both, add, search, torch.save
Within each run the contenders go round-robin per k, in an order rotated from one run to the next. Every
tiny-knn answer is compared with the first estimator's, byte for byte (the answer must not depend on the
estimator). Wall and CPU time (user + system, all threads) are both reported: on a shared VM the CPU time moves
less with the neighbours' load. Prints a table per k and writes OUT/estimators.json. Data: bench.py's generator
(random normal rows, fixed seed), written once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from typing import Any

from bench import write_data

HERE = os.path.dirname(os.path.abspath(__file__))


def run_process(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the process and its threads). On a shared VM the CPU time
    moves less with the neighbours' load than the wall time does."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(HERE, "out", "estimators"))
    parser.add_argument("--queries", type=int, default=4096)
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--ks", default="10,100,1000,2000")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--before", help="the src folder of an older checkout (built), to time its products")
    parser.add_argument("--before-products", default="screen,kernel,torch")
    parser.add_argument("--no-faiss", action="store_true")
    parser.add_argument("--quick", action="store_true", help="1024 x 20,000 x 128, k 10 and 2000, 2 runs")
    args = parser.parse_args()
    if args.quick:
        args.queries, args.docs, args.dim, args.ks, args.runs = 1024, 20_000, 128, "10,2000", 2
    os.makedirs(args.out, exist_ok=True)
    q_path, d_path = write_data(args.out, args.queries, args.docs, args.dim)
    ks = [int(k) for k in args.ks.split(",")]

    from tiny_knn import estimators
    from tiny_knn.backend import cpu_model

    cache = os.path.join(args.out, "estimator-cache")
    shutil.rmtree(cache, ignore_errors=True)
    base_env = {**os.environ, "TINY_KNN_CACHE_DIR": cache}
    base_env.pop("TINY_KNN_PRODUCT", None)
    contenders: dict[str, tuple[list[str], dict[str, str]]] = {}

    def cli(k: int, name: str) -> list[str]:
        return [sys.executable, "-m", "tiny_knn", q_path, d_path, "--k", str(k), "--cpu", "--quiet",
                "--output-path", os.path.join(args.out, f"{name.replace(':', '-')}-k{k}.pt")]  # fmt: skip

    contenders["default"] = ([], base_env)
    for name in estimators.available():
        contenders[name] = ([], {**base_env, "TINY_KNN_PRODUCT": name})
    if args.before:
        for name in args.before_products.split(","):
            contenders[f"before:{name}"] = ([], {**base_env, "TINY_KNN_PRODUCT": name, "PYTHONPATH": args.before})
    if not args.no_faiss:
        contenders["faiss"] = ([], base_env)

    names = list(contenders)
    times: dict[int, dict[str, list[float]]] = {k: {name: [] for name in names} for k in ks}
    cpu_times: dict[int, dict[str, list[float]]] = {k: {name: [] for name in names} for k in ks}
    first_default: dict[int, float] = {}
    for run in range(args.runs):
        for k in ks:
            order = names[run % len(names) :] + names[: run % len(names)]
            for name in order:
                env = contenders[name][1]
                if name == "faiss":
                    out = os.path.join(args.out, f"faiss-k{k}.pt")
                    argv = [sys.executable, os.path.join(HERE, "faiss_search.py"), q_path, d_path, str(k), out]
                else:
                    argv = cli(k, name)
                seconds, cpu = run_process(argv, env)
                if name == "default" and k not in first_default:
                    first_default[k] = seconds  # it measured the estimators: kept apart
                    seconds, cpu = run_process(argv, env)
                times[k][name].append(seconds)
                cpu_times[k][name].append(cpu)
                print(f"run {run + 1}, k={k}, {name}: {seconds:.2f} s ({cpu:.2f} s CPU)", file=sys.stderr)

    import torch

    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(),
        "command": " ".join(sys.argv),
        "machine": {
            "cpu": cpu_model(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "config": {"queries": args.queries, "docs": args.docs, "dim": args.dim, "ks": ks, "runs": args.runs},
        "results": {},
    }
    verdicts = os.path.join(cache, "estimators.json")
    if os.path.exists(verdicts):  # none where the search is too small to be worth measuring
        with open(verdicts, encoding="utf-8") as stream:
            report["measured"] = json.load(stream)
    for k in ks:
        medians = {name: statistics.median(seconds) for name, seconds in times[k].items()}
        cpu_medians = {name: statistics.median(seconds) for name, seconds in cpu_times[k].items()}
        # each estimator against its own code before the change (--before), by wall and by CPU time
        against_before = {
            name: {
                "wall": medians[name] / medians[f"before:{name}"],
                "cpu": cpu_medians[name] / cpu_medians[f"before:{name}"],
            }
            for name in estimators.available()
            if f"before:{name}" in medians
        }
        forced = {name: medians[name] for name in estimators.available()}
        fastest = min(forced, key=forced.__getitem__)
        reference = torch.load(os.path.join(args.out, f"{estimators.available()[0]}-k{k}.pt"))
        identical = {}
        for name in [*estimators.available(), "default"]:
            result = torch.load(os.path.join(args.out, f"{name}-k{k}.pt"))
            identical[name] = bool(
                torch.equal(result["indices"], reference["indices"])
                and torch.equal(result["scores"].view(torch.int32), reference["scores"].view(torch.int32))
            )
        report["results"][str(k)] = {
            "times_s": times[k],
            "median_s": medians,
            "cpu_s": cpu_times[k],
            "median_cpu_s": cpu_medians,
            "over_before": against_before,
            "default_first_run_s": first_default[k],
            "fastest_forced": fastest,
            "default_over_fastest": medians["default"] / forced[fastest],
            "over_faiss": {name: medians[name] / medians["faiss"] for name in medians} if "faiss" in medians else {},
            "identical_to_first_estimator": identical,
        }
        print(f"\nk={k} (median of {args.runs} runs, whole processes)")
        for name in names:
            faiss = f"  {medians[name] / medians['faiss']:.2f}x FAISS" if "faiss" in medians else ""
            print(f"  {name:<18} {medians[name]:7.2f} s ({cpu_medians[name]:6.2f} s CPU){faiss}")
        for name, ratio in against_before.items():
            print(f"  {name} / before:{name}: {ratio['wall']:.3f} wall, {ratio['cpu']:.3f} CPU")
        print(f"  default / fastest forced ({fastest}): {report['results'][str(k)]['default_over_fastest']:.3f}")
        print(f"  answers identical across estimators: {all(identical.values())}")
    with open(os.path.join(args.out, "estimators.json"), "w", encoding="utf-8") as stream:
        json.dump(report, stream, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
