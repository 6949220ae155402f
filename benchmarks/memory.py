"""Memory check: does tiny-knn keep its memory to the budget when the docs file is far larger than it?

    python benchmarks/memory.py                    # 1,000,000 x 384 float32 docs (1.5 GB), 64 queries, k=100
    python benchmarks/memory.py --docs 100000      # a quick run (150 MB)
    python benchmarks/memory.py --workdir /data/mem --keep   # keep the files; a later run reuses them
    python benchmarks/memory.py --queries 200000 --docs 100000 --dim 64 --k 1000 --max-memory 768MB \
        --skip-original                            # a 2.4 GB result: memory must not grow with the output

Steps:

1. A child process generates the docs (random normal, fixed seed, filled in chunks) and the queries and
   torch.save's them into the work folder. torch.save needs the whole tensor in memory, so this is done
   in its own process, which then exits: its memory is no part of what is measured.
2. Baseline: a child that only imports torch and tiny_knn reports its own RssAnon, the floor under which
   no Python search process can go.
3. `tiny-knn queries.pt docs.pt --k K --cpu --max-memory 512MB --quiet --output-path ...` as a child.
4. The original approach, as a child: torch.load both files whole (no mmap), q @ d.T, topk, torch.save.

Each child's /proc/<pid>/status is sampled every 10 ms: VmHWM (the kernel's high-water mark of the
resident set, so its last sample is the peak VmRSS), RssAnon and RssFile (largest sample). RssAnon, the
anonymous memory a process allocated, is the figure the budget is about: pages of a memory-mapped file
count in VmRSS (as RssFile) while they are touched, but they are page cache the kernel can drop at will,
not memory the search holds.
The files are in the page cache (just written), so wall times measure compute, not disk.

Prints a table and writes JSON (default benchmarks/out/memory.json). The work folder (default a new
folder under /tmp) is removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from procmon import Measured, console_script, mib, read_status, run_measured

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0
GENERATE_CHUNK_ROWS = 65536


# ----------------------------------------------------------------------------------------------------------
# Child process roles: `memory.py generate|baseline|original ...`.


def generate(folder: str, docs: int, dim: int, queries: int) -> None:
    """Writes docs.pt and queries.pt (random normal float32, seed SEED) and data.json describing them."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    query_rows = torch.randn(queries, dim, generator=generator)
    torch.save(query_rows, os.path.join(folder, "queries.pt"))
    doc_rows = torch.empty(docs, dim)
    for start in range(0, docs, GENERATE_CHUNK_ROWS):
        stop = min(start + GENERATE_CHUNK_ROWS, docs)
        doc_rows[start:stop] = torch.randn(stop - start, dim, generator=generator)
    torch.save(doc_rows, os.path.join(folder, "docs.pt"))
    with open(os.path.join(folder, "data.json"), "w") as stream:
        json.dump(data_key(docs, dim, queries), stream)


def baseline() -> None:
    """Imports what a tiny-knn process imports, then prints its own memory as JSON."""
    import torch  # noqa: F401

    import tiny_knn.api  # noqa: F401

    print(json.dumps(read_status()))


def original(q_path: str, d_path: str, k: int, out_path: str) -> None:
    """The approach tiny-knn replaced: load everything, score everything, select."""
    import torch

    queries = torch.load(q_path, map_location="cpu", weights_only=True)
    docs = torch.load(d_path, map_location="cpu", weights_only=True)
    scores = queries @ docs.T
    top_scores, top_indices = torch.topk(scores, min(k, docs.shape[0]), dim=1)
    torch.save({"indices": top_indices, "scores": top_scores}, out_path)


# ----------------------------------------------------------------------------------------------------------
# The parent.


def data_key(docs: int, dim: int, queries: int) -> dict[str, int]:
    return {"docs": docs, "dim": dim, "queries": queries, "seed": SEED}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def child(*arguments: str | int, interval: float) -> Measured:
    return run_measured([sys.executable, os.path.abspath(__file__), *map(str, arguments)], interval=interval)


def summary(measured: Measured) -> dict[str, Any]:
    return {
        "command": measured.command,
        "wall_s": measured.wall_s,
        "peak_rss_anon": measured.peak.get("RssAnon"),
        "peak_vmrss": measured.peak_rss,
        "peak_rss_file": measured.peak.get("RssFile"),
        "samples": measured.samples,
    }


def agreement(first: str, second: str) -> dict[str, float]:
    """Share of identical (query, rank) indices and the worst score difference between two result files."""
    import torch

    a, b = torch.load(first, weights_only=True), torch.load(second, weights_only=True)
    return {
        "same_indices": float((a["indices"] == b["indices"]).float().mean()),
        "max_score_diff": float((a["scores"].float() - b["scores"].float()).abs().max()),
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Peak memory of tiny-knn under --max-memory on a docs file larger than the budget, against "
        "loading everything. See the module docstring (top of this file) for the method.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--docs", type=int, default=1_000_000, help="docs (1,000,000 x 384 float32 is 1.5 GB)")
    parser.add_argument("--dim", type=int, default=384, help="dimension")
    parser.add_argument("--queries", type=int, default=64, help="queries")
    parser.add_argument("--k", type=int, default=100, help="neighbours per query")
    parser.add_argument("--max-memory", default="512MB", help="tiny-knn's --max-memory")
    parser.add_argument("--workdir", help="folder for the generated files (default: a new folder under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files (a later run reuses them)")
    parser.add_argument(
        "--skip-original", action="store_true", help="do not run the load-everything approach (too big to fit)"
    )
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between /proc samples")
    parser.add_argument("--out", default=os.path.join(HERE, "out", "memory.json"), help="JSON report")
    args = parser.parse_args(argv)
    if min(args.docs, args.dim, args.queries, args.k) < 1 or args.interval <= 0:
        parser.error("sizes and k must be >= 1, --interval > 0")
    return args


def main(argv: Sequence[str]) -> int:
    role = argv[:1]
    if role == ["generate"]:
        generate(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
        return 0
    if role == ["baseline"]:
        baseline()
        return 0
    if role == ["original"]:
        original(argv[1], argv[2], int(argv[3]), argv[4])
        return 0
    args = parse_args(argv)

    from tiny_knn.api import prepare
    from tiny_knn.options import SearchOptions
    from tiny_knn.plan import parse_size

    budget = parse_size(args.max_memory)
    workdir = args.workdir or tempfile.mkdtemp(prefix="tiny-knn-memory-", dir="/tmp")
    os.makedirs(workdir, exist_ok=True)
    q_path, d_path = os.path.join(workdir, "queries.pt"), os.path.join(workdir, "docs.pt")
    tiny_out, original_out = os.path.join(workdir, "result-tiny-knn.pt"), os.path.join(workdir, "result-original.pt")
    created = [q_path, d_path, os.path.join(workdir, "data.json"), tiny_out, original_out]
    try:
        try:
            with open(os.path.join(workdir, "data.json")) as stream:
                reuse = json.load(stream) == data_key(args.docs, args.dim, args.queries)
        except (OSError, ValueError):
            reuse = False
        size = args.docs * args.dim * 4
        if reuse and os.path.exists(d_path) and os.path.exists(q_path):
            log(f"reusing {d_path} ({size / 1e9:.2f} GB) and {q_path}")
            generated = None
        else:
            log(f"generating {args.docs} x {args.dim} float32 docs ({size / 1e9:.2f} GB) in {workdir} ...")
            generated = child("generate", workdir, args.docs, args.dim, args.queries, interval=0.1).check()
            log(f"  {generated.wall_s:.1f} s")

        options = SearchOptions(force_cpu=True, max_memory=budget, results_on_disk=True)
        _queries, _docs, plan = prepare(q_path, d_path, args.k, options)
        log("tiny-knn plan: " + "; ".join(plan.describe()))

        log("baseline: python + import torch, tiny_knn ...")
        base = child("baseline", interval=args.interval).check()
        base_status = json.loads(base.stdout.strip().splitlines()[-1])

        command = [console_script("tiny-knn"), q_path, d_path, "--k", str(args.k), "--cpu"]
        command += ["--max-memory", args.max_memory, "--quiet", "--output-path", tiny_out]
        log("tiny-knn: " + " ".join(command))
        tiny = run_measured(command, interval=args.interval).check()
        log(f"  {tiny.wall_s:.1f} s, peak RssAnon {mib(tiny.peak.get('RssAnon'))}")

        whole = None
        if not args.skip_original:
            log("original approach: torch.load both whole, q @ d.T, topk ...")
            whole = child("original", q_path, d_path, args.k, original_out, interval=args.interval).check()
            log(f"  {whole.wall_s:.1f} s, peak RssAnon {mib(whole.peak.get('RssAnon'))}")

        report: dict[str, Any] = {
            "config": {
                "docs": args.docs,
                "dim": args.dim,
                "queries": args.queries,
                "k": args.k,
                "max_memory": args.max_memory,
                "budget_bytes": budget,
                "docs_file_bytes": os.path.getsize(d_path),
                "result_file_bytes": os.path.getsize(tiny_out),
                "interval_s": args.interval,
                "seed": SEED,
            },
            "machine": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "cpu_count": os.cpu_count(),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
            "plan": plan.describe(),
            "generate": summary(generated) if generated else None,
            "baseline": {"rss_anon": base_status.get("RssAnon"), "vmrss": base_status.get("VmRSS")},
            "tiny_knn": summary(tiny),
            "original": summary(whole) if whole else None,
            "agreement": agreement(tiny_out, original_out) if whole else None,
        }
        print_report(report)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as stream:
            json.dump(report, stream, indent=2)
        print(f"wrote {args.out}")
        return 0
    finally:
        if not args.keep:
            if args.workdir:
                for path in created:
                    if os.path.exists(path):
                        os.unlink(path)
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"kept {workdir}")


def print_report(report: dict[str, Any]) -> None:
    config, tiny, whole, base = report["config"], report["tiny_knn"], report["original"], report["baseline"]
    print()
    print(
        f"memory check: {config['queries']} queries x {config['docs']} docs x {config['dim']} dims float32 "
        f"(docs file {config['docs_file_bytes'] / 1e9:.2f} GB), k={config['k']}, "
        f"tiny-knn --max-memory {config['max_memory']} ({mib(config['budget_bytes'])})"
    )
    print(f"tiny-knn plan: {report['plan'][2]}; {report['plan'][3]}")
    header = f"{'run':<34} {'wall s':>7} {'peak RssAnon':>13} {'peak VmRSS':>11} {'peak RssFile':>13}"
    print(header)
    print("-" * len(header))
    print(f"{'python + import torch, tiny_knn':<34} {'-':>7} {mib(base['rss_anon']):>13} {mib(base['vmrss']):>11}")
    rows = [(f"tiny-knn --max-memory {config['max_memory']}", tiny)]
    rows += [("original (load whole, q @ d.T)", whole)] if whole else []
    for label, row in rows:
        print(
            f"{label:<34} {row['wall_s']:>7.2f} {mib(row['peak_rss_anon']):>13} {mib(row['peak_vmrss']):>11} "
            f"{mib(row['peak_rss_file']):>13}"
        )
    tiny_anon = tiny["peak_rss_anon"] or 0
    within = tiny_anon <= config["budget_bytes"]
    print()
    print(
        f"tiny-knn peak RssAnon {mib(tiny_anon)} ({mib(tiny_anon - (base['rss_anon'] or 0))} above the import "
        f"baseline): {'within' if within else 'OVER'} the {config['max_memory']} budget; result file "
        f"{config['result_file_bytes'] / 1e9:.2f} GB."
    )
    if whole:
        whole_anon = whole["peak_rss_anon"] or 0
        print(f"The original approach: {mib(whole_anon)} ({whole_anon / max(1, tiny_anon):.1f}x tiny-knn's).")
    print(
        "peak VmRSS (VmHWM) includes pages of the memory-mapped docs file (RssFile): page cache the kernel can "
        f"reclaim, not memory the search holds. RssAnon and RssFile peaks are {config['interval_s'] * 1000:.0f} ms "
        "samples."
    )
    agree = report["agreement"]
    if not agree:
        return
    print(
        f"answers: {agree['same_indices']:.4%} of (query, rank) indices identical, max score difference "
        f"{agree['max_score_diff']:.1e}"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
