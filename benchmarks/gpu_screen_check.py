"""The GPU screen's check (issue #20; TINY_KNN_PRODUCT=triton, gpu_engine.py): one call on a machine with a GPU, under
5 minutes, whose table says whether the screen may become CUDA's default.

    python benchmarks/gpu_screen_check.py                                  # on a GPU: every step, full sizes
    TRITON_INTERPRET=1 python benchmarks/gpu_screen_check.py --quick       # a smoke test of the script, on the CPU

Steps (each prints its lines; the table comes last, and OUT/gpu_screen.json holds it all):
  a. tests: tests/test_cuda.py and the CUDA tests of tests/test_gpu_engine.py, CUDA required.
  b. bits: gpu_screen.rescore of every pair of 2048 x 2048 rows (4 M pairs, ip and l2, at dim 768 and 100),
     normal rows, rows whose products are subnormal or overflow, and rows that cancel, against the C kernel's
     tk_dot / tk_l2 on the CPU: the same bits everywhere (NaN where NaN).
  c. bound: the tensor cores' estimates (gpu_screen.estimate_tile) against the exact scores: the worst ratio of
     |estimate - exact| to gpu_screen.slack (must be <= 1; how far below 1 says how much the bound could shrink).
  d. time: 16,384 x 1,000,000 x 768 float32 at k=10 and 1000, the Triton screen against today's CUDA path
     (TINY_KNN_PRODUCT=torch), on the demo's clustered corpus and on normalised Gaussian rows, in-process after a
     warm-up, from the .pt/.npy paths to the written result; 64 rows of each screen answer checked byte for byte
     against the CPU's exact search.
  e. time: 100,000 x 4,000,000 x 768 at k=1000 (clustered), the same way, if the disk and memory allow (the
     issue's target: <= 2.5 s on an H100 or H200).
  f. the engine around the screen, 16,384 x 1,000,000 x 768 (normalised Gaussian rows) at k=1000 in 4 query batches
     of 4096: the docs kept resident on the GPU after the first pass against read and copied every pass; then the
     same docs as a float16 file against float32 in one pass (bytes read into the host's buffers and copied to the
     GPU, per chunk and per pass, and the time); 64 rows of each checked byte for byte against the CPU's. For the
     float16 docs, the float16 screen (docs as they are, queries scaled and rounded to float16) against the bfloat16
     screen of the same docs widened: the fraction of pairs each keeps at the true k-th scores, each screen's time
     (and its rows' preparation), and the worst |estimate - exact| / slack of the float16 screen on these rows and on
     hard ones (float16 subnormals, values near 65504, cancellation, queries from 2^-140 to 2^100).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import numpy as np
import psutil
import torch

from tiny_knn import compute_topk, gpu_screen, search
from tiny_knn import plan as planning
from tiny_knn.api import prepare
from tiny_knn.demo import make_corpus
from tiny_knn.kernel import KERNEL
from tiny_knn.options import SearchOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTENDERS = {"torch": "today's path (TINY_KNN_PRODUCT=torch)", "triton": "the Triton screen"}


def step(name: str) -> None:
    print(f"=== {name} ({time.strftime('%H:%M:%S')})", flush=True)


def run_tests(cuda: bool) -> str:
    """a. The CUDA tests, CUDA required (on the CPU they skip: a smoke test)."""
    environment = {**os.environ, "TINY_KNN_REQUIRE_CUDA": "1" if cuda else "0"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py",
               "tests/test_gpu_engine.py", "-k", "cuda"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=200)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr.strip()[-300:]
    print(f"  {last}")
    return last


def hard_rows(count: int, dim: int, seed: int) -> torch.Tensor:
    """Normal rows; rows scaled from 2^-140 to 2^100 per value (subnormal products and sums, overflow); rows of one
    scale; rows that cancel (pairs of values x, -x + tiny: sums far below their terms)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(count, dim, generator=generator)
    quarter = count // 4
    rows[:quarter] *= torch.exp2(torch.randint(-140, 100, (quarter, dim), generator=generator).float())
    rows[quarter : 2 * quarter] *= torch.exp2(torch.randint(-70, 60, (quarter, 1), generator=generator).float())
    cancel = rows[2 * quarter : 3 * quarter]
    half = dim // 2
    cancel[:, half : 2 * half] = -cancel[:, :half] * (1 + 2.0**-20 * torch.randn(quarter, half, generator=generator))
    return rows


def exact_tile(queries: torch.Tensor, docs: torch.Tensor, l2: bool) -> torch.Tensor:
    """Every tk_dot (or tk_l2) of queries x docs on the CPU (the C kernel), float32."""
    assert KERNEL is not None, "the compiled kernel is needed for the CPU's exact scores"
    queries, docs = queries.contiguous(), docs.contiguous()
    out = torch.empty((queries.shape[0], docs.shape[0]))
    KERNEL.tk_exact_tile(
        -1, int(l2), queries.data_ptr(), queries.stride(0), queries.shape[0], docs.data_ptr(), docs.stride(0),
        docs.shape[0], queries.shape[1], out.data_ptr(), out.stride(0),
    )  # fmt: skip
    return out


def check_bits(device: str, rows: int, dims: list[int]) -> dict[str, Any]:
    """b. The GPU's exact scores against the CPU's, bit for bit, on every pair of rows x rows."""
    report = {}
    for dim in dims:
        queries, docs = hard_rows(rows, dim, dim), hard_rows(rows, dim, dim + 1)
        pairs = torch.cartesian_prod(torch.arange(rows), torch.arange(rows)).to(torch.int32).contiguous()
        for metric in ("ip", "l2"):
            ours = gpu_screen.rescore(queries.to(device), docs.to(device), pairs.to(device), metric=metric).cpu()
            theirs = exact_tile(queries, docs, metric == "l2").flatten()
            nan = torch.isnan(theirs)
            differ = int((ours.view(torch.int32) != theirs.view(torch.int32))[~nan].sum())
            differ += int((torch.isnan(ours) != nan).sum())
            report[f"{metric} dim {dim}"] = {"pairs": pairs.shape[0], "differ": differ}
            print(f"  {metric} dim {dim}: {pairs.shape[0]} pairs, {differ} with other bits than the CPU's")
    return report


def check_bound(device: str, rows: int, dim: int) -> dict[str, float]:
    """c. The worst |estimate - exact| / slack of the screen's estimates (the tensor cores' on a GPU)."""
    generator = torch.Generator().manual_seed(3)
    kinds = {
        "gaussian": torch.nn.functional.normalize(torch.randn(2 * rows, dim, generator=generator), dim=1),
        "clustered": make_corpus(2 * rows, dim, 64, 3),
        "hard": torch.cat([hard_rows(rows, dim, 5), hard_rows(rows, dim, 6)]),
    }
    ratios = {}
    for kind, both in kinds.items():
        queries, docs = both[:rows].contiguous(), both[rows:].contiguous()
        prepared = (
            gpu_screen.prepare_rows(queries.to(device), query=True, l2=False),
            gpu_screen.prepare_rows(docs.to(device), query=False, l2=False),
        )
        estimates = gpu_screen.estimate_tile(*prepared).double().cpu()
        slack = gpu_screen.slack(*prepared).cpu()
        exact, true = exact_tile(queries, docs, False).double(), queries.double() @ docs.double().T
        finite = torch.isfinite(slack) & torch.isfinite(exact) & torch.isfinite(estimates) & (slack > 0)
        error = torch.maximum((estimates - exact).abs(), (estimates - true).abs())
        ratios[kind] = float((error[finite] / slack[finite]).max())
        print(f"  {kind}: worst |estimate - exact| / slack = {ratios[kind]:.4f} (must be <= 1)")
    return ratios


def hard_half_rows(count: int, dim: int, seed: int) -> torch.Tensor:
    """float16 docs where the float16 screen's bound is thinnest: values from 2^-26 to 2^15 (subnormals, which are
    flushed and counted, beside products near 2^31); values near 65504, float16's largest; rows of subnormals only;
    rows that cancel."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(count, dim, generator=generator)
    quarter = count // 4
    rows[:quarter] *= torch.exp2(torch.randint(-26, 15, (quarter, dim), generator=generator).float())
    rows[quarter : 2 * quarter] = torch.sign(rows[quarter : 2 * quarter]) * (65504 - 6000 * torch.rand(quarter, dim))
    rows[2 * quarter : 3 * quarter] = torch.sign(rows[2 * quarter : 3 * quarter]) * 2.0**-16
    cancel = rows[3 * quarter :]
    half = dim // 2
    cancel[:, half : 2 * half] = -cancel[:, :half] * (1 + 2.0**-9 * torch.randn(cancel.shape[0], half))
    return rows.clamp(-65504, 65504).half()


def half_bound(device: str, queries: torch.Tensor, docs: torch.Tensor) -> float:
    """The worst |estimate - exact| / slack of the float16 screen (tk_dot on the CPU, and q.d in float64)."""
    prepared = (
        gpu_screen.prepare_rows(queries.to(device), query=True, l2=False, values=torch.float16),
        gpu_screen.prepare_rows(docs.to(device), query=False, l2=False),
    )
    assert prepared[1].values.dtype == torch.float16
    estimates = gpu_screen.estimate_tile(*prepared).double().cpu()
    slack = gpu_screen.slack(*prepared).cpu()
    exact, true = exact_tile(queries, docs.float(), False).double(), queries.double() @ docs.double().T
    finite = torch.isfinite(slack) & torch.isfinite(exact) & (slack > 0)
    error = torch.maximum((estimates - exact).abs(), (estimates - true).abs())
    return float((error[finite] / slack[finite]).max())


def timed(run: Callable[[], Any], repeats: int, cuda: bool) -> float:
    """The median seconds of `repeats` runs of `run`, after one more (the warm-up: Triton compiles)."""
    times = []
    for _ in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def compare_half_screens(
    queries: torch.Tensor, docs: torch.Tensor, result: str, k: int, repeats: int, cuda: bool
) -> dict[str, Any]:
    """f. float16 docs: the float16 screen of them against the bfloat16 screen of their float32 widening (the path
    float32 docs take), at the true k-th scores (the search's own answer, `result`): pairs kept and seconds a
    screen (and a preparation of the docs), and the float16 bound's worst observed ratio."""
    device = "cuda" if cuda else "cpu"
    thresholds = torch.load(result, weights_only=True)["scores"][:, k - 1].contiguous().to(device)
    on_device = queries.to(device), docs.to(device)
    pairs = queries.shape[0] * docs.shape[0]
    survivors = gpu_screen.Survivors.empty(max(1, min(pairs, 64 * 2**20)), device)
    report: dict[str, Any] = {}
    for variant, doc_rows in (("float16", on_device[1]), ("bfloat16", on_device[1].float())):
        prepared_docs = gpu_screen.prepare_rows(doc_rows, query=False, l2=False)
        values = prepared_docs.values.dtype
        assert str(values) == f"torch.{variant}", values
        prepared_queries = gpu_screen.prepare_rows(on_device[0], query=True, l2=False, values=values)

        def screen(prepared_queries: Any = prepared_queries, prepared_docs: Any = prepared_docs) -> None:
            survivors.clear()
            gpu_screen.screen(prepared_queries, prepared_docs, thresholds, survivors, metric="ip")

        seconds = timed(screen, repeats, cuda)
        prepare = timed(lambda doc_rows=doc_rows: gpu_screen.prepare_rows(doc_rows, query=False, l2=False), repeats,
                        cuda)  # fmt: skip
        found = int(survivors.counts[0])
        report[variant] = {"kept": found / pairs, "seconds": seconds, "prepare seconds": prepare}
        print(f"  {variant} screen of float16 docs: keeps {found / pairs:.3%} of pairs at the true k-th scores, "
              f"{seconds:.4f} s a screen ({2 * pairs * docs.shape[1] / seconds / 1e12:.0f} TFLOP/s), "
              f"{prepare:.4f} s to prepare the docs", flush=True)  # fmt: skip
    sample = min(2048, queries.shape[0], docs.shape[0])
    report["float16 bound"] = {
        "gaussian": half_bound(device, queries[:sample].contiguous(), docs[:sample].contiguous()),
        "hard": half_bound(device, hard_rows(sample, docs.shape[1], 7), hard_half_rows(sample, docs.shape[1], 8)),
    }
    for kind, ratio in report["float16 bound"].items():
        print(f"  float16 screen's bound, {kind}: worst |estimate - exact| / slack = {ratio:.4f} (must be <= 1)")
    return report


def write_rows(path: str, rows: torch.Tensor) -> str:
    np.save(path, rows.numpy())
    return path


def timed_search(q_path: str, d_path: str, k: int, out: str, product: str, cuda: bool, **options: Any) -> float:
    with mock.patch.dict(os.environ, {"TINY_KNN_PRODUCT": product}):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        compute_topk(q_path, d_path, k=k, out_path=out, force_cpu=not cuda, progress=False, **options)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


def checked_rows(q_path: str, d_path: str, k: int, out: str, rows: torch.Tensor) -> str:
    """The screen's answer for some rows against the CPU's exact search of them (the C kernel), byte for byte."""
    result = torch.load(out, weights_only=True, mmap=True)
    queries = torch.from_numpy(np.load(q_path, mmap_mode="r")[rows.numpy()])
    scores, indices = search(queries, d_path, k, device="cpu")
    same = torch.equal(result["indices"][rows], indices)
    same = same and torch.equal(result["scores"][rows].view(torch.int32), scores.view(torch.int32))
    return f"{rows.numel()} rows identical" if same else f"FAIL: {rows.numel()} rows differ from the CPU's"


def time_case(
    name: str, queries: torch.Tensor, docs: torch.Tensor, ks: list[int], repeats: int, out: str, cuda: bool
) -> list[dict[str, Any]]:
    """d, e. Both contenders at each k: a warm-up, then the median of `repeats` runs; the screen's answer checked."""
    folder = os.path.join(out, name.replace(" ", "-"))
    os.makedirs(folder, exist_ok=True)
    q_path = write_rows(os.path.join(folder, "queries.npy"), queries)
    d_path = write_rows(os.path.join(folder, "docs.npy"), docs)
    flops = 2 * queries.shape[0] * docs.shape[0] * docs.shape[1]
    sample = torch.randperm(queries.shape[0], generator=torch.Generator().manual_seed(1))[:64].sort().values
    rows = []
    for k in ks:
        row: dict[str, Any] = {"case": name, "k": k}
        for product in CONTENDERS:
            result = os.path.join(folder, f"{product}-{k}.pt")
            times = [timed_search(q_path, d_path, k, result, product, cuda) for _ in range(repeats + 1)][1:]
            row[product] = statistics.median(times)
            row[f"{product} TFLOP/s"] = flops / row[product] / 1e12
        row["check"] = checked_rows(q_path, d_path, k, os.path.join(folder, f"triton-{k}.pt"), sample)
        print(f"  {name} k={k}: torch {row['torch']:.3f} s, triton {row['triton']:.3f} s; {row['check']}", flush=True)
        rows.append(row)
    shutil.rmtree(folder, ignore_errors=True)
    return rows


def time_engine(
    queries: torch.Tensor, docs: torch.Tensor, k: int, batch: int, repeats: int, out: str, cuda: bool
) -> list[dict[str, Any]]:
    """f. The Triton screen in several query batches with the docs resident and without (the plan's share for
    resident docs set to 0), then float16 docs against float32 in one pass: the median of `repeats` runs after a
    warm-up, the plan's chunk (rows, dtype, host bytes a chunk) and 64 rows checked."""
    folder = os.path.join(out, "engine")
    os.makedirs(folder, exist_ok=True)
    q_path = write_rows(os.path.join(folder, "queries.npy"), queries)
    paths = {"float32": write_rows(os.path.join(folder, "docs.npy"), docs)}
    paths["float16"] = write_rows(os.path.join(folder, "docs-f16.npy"), docs.half())
    sample = torch.randperm(queries.shape[0], generator=torch.Generator().manual_seed(3))[:64].sort().values
    cases = [("resident", "float32", batch, None), ("read every pass", "float32", batch, 0.0),
             ("float32 docs", "float32", None, None), ("float16 docs", "float16", None, None)]  # fmt: skip
    rows = []
    for name, dtype, batch_size, share in cases:
        resident_share = planning.RESIDENT_DOCS_MAX_SHARE if share is None else share
        with mock.patch.object(planning, "RESIDENT_DOCS_MAX_SHARE", resident_share):
            with mock.patch.dict(os.environ, {"TINY_KNN_PRODUCT": "triton"}):
                options = SearchOptions(force_cpu=not cuda, batch_size=batch_size)
                plan = prepare(q_path, paths[dtype], k, options)[2]
            result = os.path.join(folder, f"{name.replace(' ', '-')}.pt")
            times = [timed_search(q_path, paths[dtype], k, result, "triton", cuda, batch_size=batch_size)
                     for _ in range(repeats + 1)][1:]  # fmt: skip
        chunk_bytes = plan.doc_chunk_rows * plan.dim * plan.chunk_dtype.itemsize
        row: dict[str, Any] = {
            "case": f"{name} ({plan.doc_passes} passes{', resident' if plan.docs_resident else ''})",
            "seconds": statistics.median(times),
            "chunk": f"{plan.doc_chunk_rows} rows {str(plan.chunk_dtype).removeprefix('torch.')}",
            "MiB a chunk": chunk_bytes / 2**20,
            "MiB a pass": docs.shape[0] * plan.dim * plan.chunk_dtype.itemsize / 2**20,
            "check": checked_rows(q_path, paths[dtype], k, result, sample),
        }
        print(f"  {row['case']}: {row['seconds']:.3f} s; chunks of {row['chunk']}, {row['MiB a chunk']:.1f} MiB each "
              f"({row['MiB a pass']:.0f} MiB a pass); {row['check']}", flush=True)  # fmt: skip
        if dtype == "float16":
            row["screens"] = compare_half_screens(queries, docs.half(), result, k, repeats, cuda)
        rows.append(row)
    shutil.rmtree(folder, ignore_errors=True)
    return rows


def room_for(rows: int, dim: int, out: str) -> str:
    """'' if the disk and RAM hold two copies of `rows` float32 rows (the file, and the generated tensor), else
    why not."""
    need = 2 * rows * dim * 4
    free_disk = shutil.disk_usage(out).free
    free_ram = psutil.virtual_memory().available
    if free_disk < need or free_ram < need:
        gib = 2**30
        return f"skipped: needs {need / gib:.0f} GiB of disk and RAM; has {free_disk / gib:.0f}, {free_ram / gib:.0f}"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test on the CPU, interpreted)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip", default="", help="steps to leave out, e.g. 'a,e'")
    parser.add_argument("--out", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "tiny-knn-gpu-screen"))
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        raise SystemExit("no CUDA device: run with --quick under TRITON_INTERPRET=1 for a smoke test on the CPU")
    device = "cuda" if cuda else "cpu"
    os.makedirs(args.out, exist_ok=True)
    skip = set(args.skip.split(","))
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton's interpreter)"
    report: dict[str, Any] = {"device": name, "torch": torch.__version__, "quick": args.quick}
    print(f"{name}, torch {torch.__version__}")
    small = args.quick
    if "a" not in skip:
        step("a. CUDA tests")
        report["tests"] = run_tests(cuda)
    if "b" not in skip:
        step("b. the GPU's exact scores against the CPU's, bit for bit")
        report["bits"] = check_bits(device, 48 if small else 2048, [40] if small else [768, 100])
    if "c" not in skip:
        step("c. the bound: worst observed |estimate - exact| / slack")
        report["bound"] = check_bound(device, 32 if small else 2048, 40 if small else 768)
    timings: list[dict[str, Any]] = []
    if "d" not in skip:
        step("d. time against today's path")
        queries, docs, dim = (64, 3000, 32) if small else (16384, 1_000_000, 768)
        clustered = make_corpus(docs + queries, dim, 16 if small else 1000, 0)
        timings += time_case(f"{queries}x{docs}x{dim} clustered", clustered[docs:], clustered[:docs], [10, 100 if small
                             else 1000], args.repeats, args.out, cuda)  # fmt: skip
        del clustered
        generator = torch.Generator().manual_seed(2)
        gaussian = torch.nn.functional.normalize(torch.randn(docs + queries, dim, generator=generator), dim=1)
        timings += time_case(f"{queries}x{docs}x{dim} gaussian", gaussian[docs:], gaussian[:docs], [10, 100 if small
                             else 1000], args.repeats, args.out, cuda)  # fmt: skip
        del gaussian
    if "e" not in skip:
        step("e. the large case")
        queries, docs, dim = (128, 6000, 32) if small else (100_000, 4_000_000, 768)
        why = room_for(queries + docs, dim, args.out)
        if why:
            print(f"  {why}")
            report["large"] = why
        else:
            clustered = make_corpus(docs + queries, dim, 16 if small else 1000, 4)
            timings += time_case(f"{queries}x{docs}x{dim} clustered", clustered[docs:], clustered[:docs],
                                 [100 if small else 1000], 1, args.out, cuda)  # fmt: skip
            del clustered
    report["timings"] = timings
    if "f" not in skip:
        step("f. the engine: resident docs across query batches; float16 docs as they are")
        queries, docs, dim, batch = (64, 3000, 32, 16) if small else (16384, 1_000_000, 768, 4096)
        generator = torch.Generator().manual_seed(5)
        gaussian = torch.nn.functional.normalize(torch.randn(docs + queries, dim, generator=generator), dim=1)
        report["engine"] = time_engine(gaussian[docs:], gaussian[:docs], 100 if small else 1000, batch, args.repeats,
                                       args.out, cuda)  # fmt: skip
        del gaussian
    with open(os.path.join(args.out, "gpu_screen.json"), "w") as stream:
        json.dump(report, stream, indent=1)
    print_table(report)
    return 0


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['device']}, torch {report['torch']}" + (" (quick)" if report["quick"] else ""))
    if "tests" in report:
        print(f"tests: {report['tests']}")
    for case, found in report.get("bits", {}).items():
        print(f"bits {case:14s} {found['differ']:>8d} of {found['pairs']} pairs differ from the CPU")
    for kind, ratio in report.get("bound", {}).items():
        print(f"bound {kind:13s} worst ratio {ratio:.4f}")
    line: Callable[..., str] = "{:34s} {:>6} {:>10} {:>10} {:>8} {:>10}  {}".format
    print(line("case", "k", "torch s", "triton s", "speedup", "TFLOP/s", "screen's answer"))
    for row in report["timings"]:
        speedup = row["torch"] / row["triton"]
        print(line(row["case"], row["k"], f"{row['torch']:.3f}", f"{row['triton']:.3f}", f"{speedup:.2f}x",
                   f"{row['triton TFLOP/s']:.1f}", row["check"]))  # fmt: skip
    if "large" in report:
        print(f"large case: {report['large']}")
    for row in report.get("engine", []):
        print(f"engine {row['case']:38s} {row['seconds']:.3f} s  chunks of {row['chunk']} ({row['MiB a chunk']:.1f} "
              f"MiB, {row['MiB a pass']:.0f} MiB a pass)  {row['check']}")  # fmt: skip
        screens = row.get("screens")
        if screens:
            half, bfloat16 = screens["float16"], screens["bfloat16"]
            ratios = ", ".join(f"{kind} {ratio:.4f}" for kind, ratio in screens["float16 bound"].items())
            print(f"  float16 docs, float16 screen against bfloat16's: keeps {half['kept']:.3%} against "
                  f"{bfloat16['kept']:.3%} of pairs, {half['seconds']:.4f} s against {bfloat16['seconds']:.4f} s "
                  f"a screen; the float16 bound's worst ratio {ratios}")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
