"""Merge figure: `tiny-knn merge` of P parts of Q queries x k, wall time and peak memory, and the same merge of
fewer parts (its memory must not grow with the number of parts: the merge holds blocks of rows, not results).

    python benchmarks/merge.py                                 # 16 and 2 parts of 10,000 queries x k=1000
    python benchmarks/merge.py --queries 1000 --parts 4 2      # a quick run

Parts are generated, not searched (the merge is what is measured): a child process writes each part as a
search writes it (results.write_output: scores best first, the keys a merge needs), over 50,000 docs each.
Each merge then runs as a child process, `tiny-knn merge PART... --output-path OUT --quiet`, sampled by
procmon every 10 ms: wall time, VmHWM (peak resident set, page cache of mapped files included) and peak
RssAnon (what the process allocated), and of `tiny-knn --version`, which imports as much, as the baseline.
The parts are in the page cache (just written). A few merged rows are
checked against a stable sort of their parts' candidates. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from bench import machine_info
from procmon import console_script, mib, run_measured

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS_PER_PART = 50_000


def generate(folder: str, parts: int, queries: int, k: int) -> None:
    """Writes part_0.pt ... as tiny-knn's results over consecutive slices of DOCS_PER_PART docs each."""
    import numpy as np
    import torch

    from tiny_knn import results

    generator = np.random.default_rng(0)
    for part in range(parts):
        scores = -np.sort(-generator.standard_normal((queries, k), dtype=np.float32), axis=1)
        indices = generator.integers(0, DOCS_PER_PART, (queries, k), dtype=np.int64)
        result = {
            "indices": torch.from_numpy(indices), "scores": torch.from_numpy(scores),
            "queries_path": "queries.npy", "docs_path": f"docs_{part}.npy", "k": k, "batch_size": queries,
            "dtype": "torch.float32", "device": "cpu", "chunk_size": 4096, "version": "benchmark", "metric": "ip",
            "precision": "exact", "exclude_self": False, "format_version": results.FORMAT_VERSION,
            "requested_k": k, "doc_count": DOCS_PER_PART, "queries_fingerprint": "benchmark",
        }  # fmt: skip
        results.write_output(os.path.join(folder, f"part_{part}.pt"), "pt", result)


def check(parts: list[str], merged_path: str, rows: list[int]) -> int:
    """How many of `rows` of the merged result differ from a stable sort of the parts' candidates."""
    import torch

    merged = torch.load(merged_path, mmap=True)
    loaded = [torch.load(path, mmap=True) for path in parts]
    wrong = 0
    for row in rows:
        scores = torch.cat([part["scores"][row] for part in loaded])
        indices = torch.cat([part["indices"][row] + number * DOCS_PER_PART for number, part in enumerate(loaded)])
        order = torch.argsort(scores, descending=True, stable=True)[: merged["k"]]
        wrong += not (
            torch.equal(merged["scores"][row], scores[order]) and torch.equal(merged["indices"][row], indices[order])
        )
    return wrong


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument(
        "--parts", type=int, nargs="+", default=[16, 2], help="part counts to merge (the largest first)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs of each merge")
    parser.add_argument("--workdir", help="folder for the parts (default: a new folder under /tmp, removed)")
    parser.add_argument("--out", default=os.path.join(HERE, "out", "merge.json"), help="JSON report")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="tiny-knn-merge-")
    os.makedirs(workdir, exist_ok=True)
    most = max(args.parts)
    try:
        print(f"generating {most} parts of {args.queries} x {args.k} in {workdir}", file=sys.stderr)
        run_measured([sys.executable, __file__, "generate", workdir, str(most), str(args.queries), str(args.k)]).check()
        baseline = run_measured([console_script("tiny-knn"), "--version"]).check()  # imports all a merge imports
        runs = []
        for count in args.parts:
            parts = [os.path.join(workdir, f"part_{part}.pt") for part in range(count)]
            output = os.path.join(workdir, f"merged_{count}.pt")
            for repeat in range(args.repeats):
                measured = run_measured(
                    [console_script("tiny-knn"), "merge", *parts, "--output-path", output, "--quiet"]
                ).check()
                runs.append({
                    "parts": count, "repeat": repeat, "wall_s": round(measured.wall_s, 3),
                    "peak_rss_bytes": measured.peak_rss, "peak_rss_anon_bytes": measured.peak.get("RssAnon"),
                    "part_bytes": sum(os.path.getsize(path) for path in parts), "output_bytes": os.path.getsize(output),
                })  # fmt: skip
                print(f"{count:3d} parts: {measured.wall_s:6.2f} s, peak RSS {mib(measured.peak_rss)}, "
                      f"peak RssAnon {mib(measured.peak.get('RssAnon'))}", file=sys.stderr)  # fmt: skip
            wrong = check(parts, output, [0, args.queries // 2, args.queries - 1])
            if wrong:
                raise SystemExit(f"{wrong} checked rows of the {count}-part merge differ from a sort of the parts")
        report: dict[str, Any] = {
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(), "load_average_at_end": os.getloadavg(), "queries": args.queries, "k": args.k,
            "docs_per_part": DOCS_PER_PART, "runs": runs,
            "baseline": {"peak_rss_bytes": baseline.peak_rss, "peak_rss_anon_bytes": baseline.peak.get("RssAnon")},
        }  # fmt: skip
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as stream:
            json.dump(report, stream, indent=2)
        print(f"{'parts':>5} {'wall s':>8} {'peak RSS':>10} {'peak RssAnon':>13} {'parts on disk':>14}")
        for run in runs:
            print(f"{run['parts']:>5} {run['wall_s']:>8.2f} {mib(run['peak_rss_bytes']):>10} "
                  f"{mib(run['peak_rss_anon_bytes']):>13} {mib(run['part_bytes']):>14}")  # fmt: skip
        anon = mib(baseline.peak.get("RssAnon"))
        print(f"baseline (tiny-knn --version): peak RSS {mib(baseline.peak_rss)}, RssAnon {anon}")
        print(f"wrote {args.out}")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["generate"]:
        generate(sys.argv[2], *(int(value) for value in sys.argv[3:6]))
        raise SystemExit(0)
    raise SystemExit(main(sys.argv[1:]))
