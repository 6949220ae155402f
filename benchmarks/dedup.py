"""De-duplication figure (#22): `tiny-knn dedup` on a corpus with planted groups of near-copies.

    python benchmarks/dedup.py                        # 500,000 x 384 float32, 5,000 planted groups of 2..50 rows
    python benchmarks/dedup.py --rows 50000 --groups 500   # a quick run
    python benchmarks/dedup.py --workdir /data/dd --keep   # keep the corpus; a later run reuses it

Steps:
1. A child process writes the corpus (`emb.npy`, fixed seed, in chunks): random normal rows, far apart at this dim
   (random cosines are about N(0, 1/dim)), then `--groups` groups of 2..`--max-size` near-copies of a random
   centre (each copy the centre plus noise of `--noise` times its norm: copies at cosine about 1 - noise^2 of each
   other, 0.98 at 0.15), placed at random rows. Its memory is no part of what is measured.
2. `tiny-knn dedup emb.npy --threshold 0.95 --max-memory SIZE --quiet --output-path groups.parquet` as a child,
   with OMP_NUM_THREADS=--threads: wall time and memory (procmon.py: VmHWM, the peak RssAnon).
3. The groups are checked against the planted ones: each planted group is exactly one output group, and every
   other row is a group of one; the pairs reported must be the planted groups' pairs (and any others found are
   counted).

Prints the figures and `uptime` before and after (the load of other processes on the machine), and writes JSON
(default benchmarks/out/dedup.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from typing import Any

import numpy as np
from procmon import console_script, mib, run_measured

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0
GENERATE_CHUNK_ROWS = 65536


def generate(path: str, rows: int, dim: int, groups: int, max_size: int, noise: float) -> None:
    """The corpus (see the module docstring) and, beside it, `planted.npy`: each row's planted group, or -1."""
    generator = np.random.default_rng(SEED)
    corpus = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    for start in range(0, rows, GENERATE_CHUNK_ROWS):
        stop = min(start + GENERATE_CHUNK_ROWS, rows)
        corpus[start:stop] = generator.standard_normal((stop - start, dim), dtype=np.float32)
    sizes = generator.integers(2, max_size + 1, groups)
    if sizes.sum() > rows:
        raise SystemExit(f"{sizes.sum()} planted rows do not fit {rows} rows")
    places = generator.permutation(rows)[: sizes.sum()]
    planted = np.full(rows, -1, dtype=np.int64)
    at = 0
    for group, size in enumerate(sizes.tolist()):
        centre = generator.standard_normal(dim).astype(np.float32)
        copies = centre + noise * np.linalg.norm(centre) / dim**0.5 * generator.standard_normal((size, dim))
        members = np.sort(places[at : at + size])
        corpus[members] = copies.astype(np.float32)
        planted[members] = group
        at += size
    corpus.flush()
    np.save(os.path.join(os.path.dirname(path), "planted.npy"), planted)


def check(groups_path: str, planted: np.ndarray) -> dict[str, Any]:
    """How the output's groups compare with the planted ones."""
    import pyarrow.parquet as pq

    table = pq.read_table(groups_path)
    group = table.column("group").to_numpy()
    meta = json.loads(pq.read_schema(groups_path).metadata[b"tiny_knn"])
    in_plant = planted >= 0
    sizes = np.bincount(group)
    planted_sizes = np.bincount(planted[in_plant])
    # Each planted group one output group of its own size (so holding nothing else); every other row alone
    links = np.unique(np.stack([planted[in_plant], group[in_plant]], axis=1), axis=0)
    one_each = links.shape[0] == planted_sizes.size and np.unique(links[:, 1]).size == links.shape[0]
    whole = bool((sizes[group[in_plant]] == planted_sizes[planted[in_plant]]).all())
    return {
        "pairs": meta["pairs"],
        "planted_pairs": int((planted_sizes * (planted_sizes - 1) // 2).sum()),
        "groups": meta["groups"],
        "largest_group": meta["largest_group"],
        "planted_groups": int(planted_sizes.size),
        "each_planted_group_is_one_group": bool(one_each and whole),
        "other_rows_alone": bool((sizes[group[~in_plant]] == 1).all()),
    }


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--groups", type=int, default=5_000)
    parser.add_argument("--max-size", type=int, default=50)
    parser.add_argument("--noise", type=float, default=0.15)
    parser.add_argument("--threshold", default="0.95")
    parser.add_argument("--max-memory", default="2GB")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "out", "dedup.json"))
    parser.add_argument("--generate-only", nargs=1, metavar="PATH", help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args(argv)
    if args.generate_only:
        generate(args.generate_only[0], args.rows, args.dim, args.groups, args.max_size, args.noise)
        return 0
    workdir = args.workdir or tempfile.mkdtemp(prefix="tiny-knn-dedup-")
    os.makedirs(workdir, exist_ok=True)
    corpus = os.path.join(workdir, "emb.npy")
    if not os.path.exists(corpus):
        subprocess.run([sys.executable, __file__, "--generate-only", corpus, "--rows", str(args.rows), "--dim",
                        str(args.dim), "--groups", str(args.groups), "--max-size", str(args.max_size), "--noise",
                        str(args.noise)], check=True)  # fmt: skip
    output = os.path.join(workdir, "groups.parquet")
    command = [console_script("tiny-knn"), "dedup", corpus, "--threshold", args.threshold, "--max-memory",
               args.max_memory, "--quiet", "--output-path", output]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    before = uptime()
    measured = run_measured(command, env=env).check()
    after = uptime()
    figures = check(output, np.load(os.path.join(workdir, "planted.npy")))
    report = {
        "date": datetime.now(timezone.utc).isoformat(),
        "cpu": cpu_model(),
        "threads": args.threads,
        "command": " ".join(["tiny-knn", *command[1:]]),
        "rows": args.rows,
        "dim": args.dim,
        "wall_s": measured.wall_s,
        "peak_rss_anon": measured.peak.get("RssAnon"),
        "peak_rss": measured.peak_rss,
        "uptime_before": before,
        "uptime_after": after,
        **figures,
    }
    print(json.dumps(report, indent=1))
    print(f"wall {measured.wall_s:.1f} s, {figures['pairs']:,} pairs ({figures['planted_pairs']:,} planted), "
          f"{figures['groups']:,} groups, peak RssAnon {mib(measured.peak.get('RssAnon'))}, "
          f"peak RSS {mib(measured.peak_rss)}")  # fmt: skip
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as stream:
        json.dump(report, stream, indent=1)
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
