"""What exact scores cost a float32 estimator, and how much of it a better starting threshold could save (#19).

    python benchmarks/start_threshold.py --before /tmp/old-checkout/src     # 4096 x 200,000 x 384, k=2000, 3 runs

Each run times `compute_topk` in its own process (after import), round-robin:
  before    an older checkout's code (--before SRC, built), with TINY_KNN_PRODUCT=ESTIMATOR: its products' scores
            were the answer, nothing was scored exactly
  sampled   this checkout as it is: the starting threshold from a strided sample (engine._sampled_thresholds)
  oracle    this checkout with each row's starting threshold set just below its final k-th exact score, read from
            `sampled`'s answer: the best start any threshold could give (not achievable: it needs the answer).
            The sample's pass still runs (its result unused), so only the threshold differs.
  sample:F:Z with --margins F:Z,...: this checkout with a sample of the fraction F of the docs and a margin of Z
            deviations instead of the plan's (1 %, 6): what a tighter or better-informed start buys, and costs
            (rows it leaves uncertain are searched again, as always)
For all but `before` it also counts the pairs scored exactly (what Tiled.screen returns, the sample's pass
included). The difference between oracle and before is what scoring exactly costs with a perfect threshold;
between sampled and oracle, what the threshold's margin costs. Every answer must be byte-identical to sampled's
(the exit status says whether it was). Data: bench.py's generator, written once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from bench import write_data

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")


def child(mode: str, q_path: str, d_path: str, k: int, out_path: str, reference: str) -> None:
    """One timed search in this process (mode sampled, oracle, sample:FRACTION:SIGMAS or before), printed as
    'seconds pairs'."""
    import torch

    from tiny_knn import compute_topk

    pairs = [0]
    if mode != "before":
        from tiny_knn import engine, estimators

        screen = estimators.Tiled.screen

        def counting(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            scored, bad = screen(self, *args, **kwargs)
            pairs[0] += scored
            return scored, bad

        estimators.Tiled.screen = counting  # type: ignore[method-assign]
        if mode == "oracle":
            kth = torch.load(reference)["scores"][:, -1]
            start = torch.nextafter(kth, torch.tensor(float("-inf")))
            sampled = engine._sampled_thresholds

            def oracle(queries, rows, *rest):  # type: ignore[no-untyped-def]
                sampled(queries, rows, *rest)  # the sample's pass still runs: only the threshold differs
                return start[:rows].clone()

            engine._sampled_thresholds = oracle
        elif mode.startswith("sample:"):  # sample:FRACTION:SIGMAS
            import dataclasses

            fraction, sigmas = (float(part) for part in mode.split(":")[1:])
            sampled = engine._sampled_thresholds

            def resampled(queries, rows, docs, plan, *rest):  # type: ignore[no-untyped-def]
                sample = -(-int(docs.rows * fraction) // 64) * 64
                plan = dataclasses.replace(plan, threshold_sample_docs=sample, sample_sigmas=sigmas)
                return sampled(queries, rows, docs, plan, *rest)

            engine._sampled_thresholds = resampled
    started = time.perf_counter()
    compute_topk(q_path=q_path, d_path=d_path, k=k, force_cpu=True, out_path=out_path)
    print(f"{time.perf_counter() - started:.4f} {pairs[0]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the src folder of an older checkout (built)")
    parser.add_argument("--estimator", default="torch", help="a tiled estimator: torch or torch-bf16")
    parser.add_argument("--out", default=os.path.join(HERE, "out", "start_threshold"))
    parser.add_argument("--queries", type=int, default=4096)
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--margins", default="", help="also sample:F:Z for each F:Z, e.g. 0.01:4,0.04:4")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, q_path, d_path, k, out_path, reference = args.child
        child(mode, q_path, d_path, int(k), out_path, reference)
        return 0
    os.makedirs(args.out, exist_ok=True)
    q_path, d_path = write_data(args.out, args.queries, args.docs, args.dim)
    reference = os.path.join(args.out, "sampled.pt")

    def run(mode: str) -> tuple[float, int]:
        env = {**os.environ, "TINY_KNN_PRODUCT": args.estimator}
        env["PYTHONPATH"] = os.pathsep.join([args.before if mode == "before" else SRC, HERE])
        out_path = os.path.join(args.out, f"{mode.replace(':', '-')}.pt")
        argv = [sys.executable, os.path.abspath(__file__), "--before", args.before, "--child", mode, q_path, d_path]
        done = subprocess.run([*argv, str(args.k), out_path, reference], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{mode} failed: {done.stderr.strip()[-2000:]}")
        seconds, pairs = done.stdout.split()[-2:]
        return float(seconds), int(pairs)

    run("sampled")  # the reference answer (and warm caches)
    modes = ["before", "sampled", "oracle"] + [f"sample:{margin}" for margin in args.margins.split(",") if margin]
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    pairs: dict[str, int] = {}
    for repeat in range(args.runs):
        turn = repeat % len(modes)
        for mode in modes[turn:] + modes[:turn]:
            seconds, pairs[mode] = run(mode)
            times[mode].append(seconds)
            print(f"run {repeat + 1}, {mode}: {seconds:.2f} s", flush=True)
    import torch

    answers = [torch.load(os.path.join(args.out, f"{mode.replace(':', '-')}.pt")) for mode in modes[1:]]
    same = all(torch.equal(answers[0][key], other[key]) for other in answers for key in ("indices", "scores"))
    shape = f"{args.queries} x {args.docs:,} x {args.dim}"
    print(f"\n{args.estimator}, {shape}, k={args.k}, in-process, median of {args.runs}")
    before = statistics.median(times["before"])
    for mode in modes:
        median = statistics.median(times[mode])
        scored = f", {pairs[mode] / args.queries:,.0f} pairs a row scored exactly" if mode != "before" else ""
        spread = f"{min(times[mode]):.2f}-{max(times[mode]):.2f}"
        print(f"  {mode:15} {median:.2f} s ({spread}), {median / before:.3f}x before{scored}")
    print(f"  every answer byte-identical to sampled's: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
