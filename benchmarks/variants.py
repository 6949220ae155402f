"""Time tiny-knn in-process under variants of its tuning constants, each against a floor measured just before.

    python benchmarks/variants.py --set plan.THRESHOLD_SAMPLE_SIGMAS=4,6 --ks 1000,2000
    python benchmarks/variants.py --set plan.CPU_THREAD_BLOCK_ROWS=256,512,1024 --ks 10,2000 --repeats 3

Each `--set MODULE.NAME=V1,V2,...` names a constant of a tiny_knn module and the values to try; with several
`--set`, every combination runs. Within each repeat the variants run in turn for each k, and each run is
preceded by the floor: bench.py's loop of 4096-row x 1024-doc torch.mm products over the same data, or, where
it runs, the faster of that and tiny-knn's own product, so that the ratio compares like with like on a VM
whose speed drifts. Prints, per k and variant, the median seconds and the
median ratio to the adjacent floor, and how many rows needed a second pass (sampled threshold too high).
Data: bench.py's generator, written to --out once (default 4096 x 200,000 x 384).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from bench import floor_times, write_data

from tiny_knn import compute_topk, topk

FLOOR_SHAPE = (4096, 1024)  # query rows x doc rows per product, one of bench.py's floor shapes


def parse_setting(text: str) -> tuple[list[Any], str, list[Any]]:
    """The modules to set NAME in (the one named, and every tiny_knn module that imported NAME from it: a
    constant imported by name would otherwise keep its old value there), NAME, and the values."""
    target, _, values = text.partition("=")
    module_name, _, name = target.rpartition(".")
    module = importlib.import_module(f"tiny_knn.{module_name}")
    if not hasattr(module, name):
        raise SystemExit(f"--set {text}: tiny_knn.{module_name} has no {name}")
    original = getattr(module, name)
    holders = [
        other
        for other_name, other in sorted(sys.modules.items())
        if other_name.startswith("tiny_knn") and getattr(other, name, None) is original
    ]
    kind = type(original)
    return holders, name, [kind(value) for value in values.split(",")]


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=V1,V2", help="constants to vary")
    parser.add_argument("--ks", default="1000,2000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queries", type=int, default=4096)
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = parser.parse_args(argv)
    settings = [parse_setting(text) for text in args.set]
    variants = list(
        itertools.product(*[[(module, name, value) for value in values] for module, name, values in settings])
    )
    os.makedirs(args.out, exist_ok=True)
    q_path, d_path = write_data(args.out, args.queries, args.docs, args.dim)
    redone = [0]
    original_result = topk.ThresholdTopK.result

    def counting_result(self: topk.ThresholdTopK) -> tuple[torch.Tensor, torch.Tensor]:
        found = original_result(self)
        redone[0] += int(self.uncertain_rows().numel())
        return found

    topk.ThresholdTopK.result = counting_result  # type: ignore[method-assign]
    runs: dict[tuple[int, int], list[tuple[float, float, int]]] = {}
    for _ in range(args.repeats):
        for k in map(int, args.ks.split(",")):
            for number, variant in enumerate(variants):
                for holders, name, value in variant:
                    for module in holders:
                        setattr(module, name, value)
                floor = min(floor_times(q_path, d_path, [FLOOR_SHAPE]).values())
                redone[0] = 0
                started = time.perf_counter()
                compute_topk(q_path, d_path, k=k, force_cpu=True, out_path=os.path.join(args.out, "variant.pt"))
                seconds = time.perf_counter() - started
                runs.setdefault((k, number), []).append((seconds, seconds / floor, redone[0]))
    for (k, number), values in sorted(runs.items()):
        label = ", ".join(f"{name}={value}" for _, name, value in variants[number]) or "as built"
        seconds = statistics.median(value[0] for value in values)
        ratio = statistics.median(value[1] for value in values)
        ratios = " ".join(f"{value[1]:.3f}" for value in values)
        redo = sum(value[2] for value in values)
        print(f"k={k:<5} {label:<50} {seconds:6.2f} s  {ratio:.3f}x floor ({ratios})  rows redone: {redo}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
