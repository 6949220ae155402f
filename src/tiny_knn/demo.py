"""`tiny-knn demo`: generate a realistic corpus, search it, verify a sample against float64, report.

The corpus is clustered and L2-normalised like sentence embeddings (200,000 x 384 by default). The
demo checks every sampled query's indices and scores against a float64 brute force and exits 1 if any
differ, so it doubles as a smoke test of an installation.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

import torch


def make_corpus(rows: int, dim: int, clusters: int, seed: int) -> torch.Tensor:
    """Normalised vectors drawn around `clusters` random centres, as embedding models produce."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=generator), dim=1)
    vectors = torch.empty(rows, dim)
    for start in range(0, rows, 65536):
        stop = min(start + 65536, rows)
        owner = torch.randint(0, clusters, (stop - start,), generator=generator)
        noise = torch.randn(stop - start, dim, generator=generator) / dim**0.5
        vectors[start:stop] = torch.nn.functional.normalize(centres[owner] + 0.6 * noise, dim=1)
    return vectors


def verify_sample(
    queries: torch.Tensor, docs: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor, sample: int
) -> tuple[int, float]:
    """Checks `sample` queries against a float64 brute force. Returns (mismatching queries, worst score error).

    A query mismatches if a returned score is off by more than 1e-5, or an index differs where the
    float64 scores are not tied.
    """
    rows = torch.linspace(0, queries.shape[0] - 1, min(sample, queries.shape[0])).long()
    exact = queries[rows].double() @ docs.double().T
    k = scores.shape[1]
    best, _ = exact.topk(k, dim=1)
    worst = float((scores[rows].double() - best).abs().max())
    ours = exact.gather(1, indices[rows])  # the exact scores of the docs we returned
    bad = int(((ours - best).abs() > 1e-5).any(dim=1).sum()) + int(worst > 1e-5)
    return bad, worst


def _peak_resident_mib() -> float | None:
    """This process's peak resident set (Linux, macOS); None where the platform does not say."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20  # KiB on Linux, bytes on macOS


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tiny-knn demo",
        description="Generate a clustered, normalised synthetic corpus, search it with tiny-knn, verify a sample "
        "of queries against a float64 brute force, and print time, throughput and peak memory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--docs", type=int, default=200_000, help="documents in the corpus")
    parser.add_argument("--queries", type=int, default=2_000, help="queries")
    parser.add_argument("--dim", type=int, default=384, help="embedding dimension")
    parser.add_argument("--k", type=int, default=100, help="neighbours per query")
    parser.add_argument("--verify", type=int, default=64, help="queries checked against float64")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    parser.add_argument("--workdir", help="keep the generated files here (default: a temporary folder, removed)")
    args = parser.parse_args(list(argv or []))

    from . import compute_topk

    workdir = args.workdir or tempfile.mkdtemp(prefix="tiny-knn-demo-")
    os.makedirs(workdir, exist_ok=True)
    try:
        print(f"generating {args.docs} docs and {args.queries} queries, dim {args.dim} ...", file=sys.stderr)
        docs = make_corpus(args.docs, args.dim, clusters=max(1, args.docs // 200), seed=0)
        queries = make_corpus(args.queries, args.dim, clusters=max(1, args.docs // 200), seed=0)[
            torch.randperm(args.queries)
        ]
        queries = torch.nn.functional.normalize(queries + 0.05 * torch.randn_like(queries) / args.dim**0.5, dim=1)
        q_path, d_path = os.path.join(workdir, "queries.pt"), os.path.join(workdir, "docs.pt")
        torch.save(queries, q_path)
        torch.save(docs, d_path)
        start = time.perf_counter()
        out = compute_topk(q_path, d_path, k=args.k, force_cpu=args.cpu, progress=True)
        seconds = time.perf_counter() - start
        result = torch.load(out)
        bad, worst = verify_sample(queries, docs, result["scores"], result["indices"], args.verify)
        peak_mib = _peak_resident_mib()
        pairs = args.queries * args.docs
        # Without --workdir the files go with the temporary folder: say so rather than name a path that is gone.
        kept = f"{out}" if args.workdir else "removed on exit (pass --workdir DIR to keep the files)"
        print(f"result:      {kept}")
        print(f"device:      {result['device']}, k={result['k']}")
        print(f"time:        {seconds:.2f} s")
        print(
            f"throughput:  {pairs / seconds / 1e6:.1f} M query-doc pairs/s, "
            f"{2 * pairs * args.dim / seconds / 1e9:.1f} GFLOP/s"
        )
        peak_text = f"{peak_mib:.0f} MiB resident" if peak_mib is not None else "not measurable on this system"
        print(f"peak memory: {peak_text} (includes generating the corpus in memory)")
        print(
            f"verified:    {args.verify} queries against float64 brute force: "
            f"{'OK' if bad == 0 else f'{bad} MISMATCHES'} (max score error {worst:.1e})"
        )
        return 0 if bad == 0 else 1
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
