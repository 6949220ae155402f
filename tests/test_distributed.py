"""torchrun on the CPU (gloo): the same bytes as one process, in both shard modes; a failing rank ends
the job quickly; and the pieces (shares, merge, job detection) on their own."""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from tiny_knn import compute_topk, distributed
from tiny_knn.plan import Plan, make_plan

TWO_RANKS = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tiny_knn"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("dist")
    generator = torch.Generator().manual_seed(31)
    torch.save(torch.randn(37, 16, generator=generator), folder / "q.pt")  # 37 and 1001: uneven shares
    docs = torch.randn(1001, 16, generator=generator)
    docs[500:520] = docs[0]  # ties across the two ranks' shares
    torch.save(docs, folder / "d.pt")
    # Excluded pairs in both ranks' shares; query 3 loses its first 600 docs (more than k, across the split)
    pairs = [f"{q} {d}" for q in range(37) for d in (0, 505, 1000, 7 * q)] + [f"3 {d}" for d in range(600)]
    (folder / "pairs.txt").write_text("\n".join(pairs) + "\n")
    return folder


def run_two_ranks(arguments: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TWO_RANKS, *arguments], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shard", "queries", "options"),
    [
        ("docs", "q.pt", {"k": 30, "batch_size": 8}),  # several batches: merged per batch, checkpointed
        ("queries", "d.pt", {"k": 12, "batch_size": 200, "metric": "l2", "exclude_self": True}),
        ("docs", "q.pt", {"k": 30, "batch_size": 16, "exclude_pairs": "pairs.txt"}),
        ("queries", "q.pt", {"k": 12, "batch_size": 8, "metric": "l2", "exclude_pairs": "pairs.txt"}),
    ],
)
def test_two_ranks_give_the_bytes_of_one_process(monkeypatch, files, shard, queries, options) -> None:  # type: ignore[no-untyped-def]
    # The product by name, for this process and the ranks alike (conftest's choice does not reach the ranks)
    monkeypatch.setenv("TINY_KNN_PRODUCT", "screen")
    q_path, d_path = str(files / queries), str(files / "d.pt")
    if "exclude_pairs" in options:
        options = {**options, "exclude_pairs": str(files / options["exclude_pairs"])}
    reference = torch.load(compute_topk(q_path, d_path, force_cpu=True, out_path=str(files / "one.pt"), **options))
    flags = ["--k", str(options["k"]), "--batch-size", str(options["batch_size"]), "--cpu", "--quiet"]
    flags += ["--metric", options.get("metric", "ip")] + (["--exclude-self"] if options.get("exclude_self") else [])
    flags += ["--exclude-pairs", options["exclude_pairs"]] if "exclude_pairs" in options else []
    done = run_two_ranks([q_path, d_path, *flags, "--shard", shard, "--output-path", str(files / f"{shard}.pt")])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(files / f"{shard}.pt")  # printed once, by rank 0
    result = torch.load(files / f"{shard}.pt")
    assert torch.equal(result["indices"], reference["indices"]) and torch.equal(result["scores"], reference["scores"])
    leftovers = [path.name for path in files.iterdir() if "checkpoint" in path.name or "ranks" in path.name]
    assert leftovers == []


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["docs", "queries"])
def test_rank_0_shows_the_progress_of_the_whole_job(files, shard) -> None:  # type: ignore[no-untyped-def]
    # 37 queries in batches of 10 against 1001 docs: 4 passes, 4,004 docs scored in all, about half by rank 0.
    done = run_two_ranks([str(files / "q.pt"), str(files / "d.pt"), "--k", "5", "--cpu", "--batch-size", "10",
                          "--shard", shard, "--output-path", str(files / f"progress-{shard}.pt")])  # fmt: skip
    assert done.returncode == 0, done.stderr
    bars = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.startswith("tiny-knn:")]
    assert bars and "4.00k/4.00k" in bars[-1], bars[-3:]


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_quickly(files) -> None:  # type: ignore[no-untyped-def]
    docs = torch.load(files / "d.pt")
    docs[900, 3] = float("nan")  # in rank 1's share of the docs
    torch.save(docs, files / "bad.pt")
    started = time.monotonic()
    done = run_two_ranks([str(files / "q.pt"), str(files / "bad.pt"), "--k", "5", "--cpu", "--shard", "docs",
                          "--output-path", str(files / "never.pt")])  # fmt: skip
    assert done.returncode != 0
    assert "row 900 holds NaN" in done.stderr
    assert time.monotonic() - started < 60, "rank 0 must not wait for the failed rank"
    assert not (files / "never.pt").exists()


def test_shares_cover_every_row_once() -> None:
    for rows in (1, 7, 1001):
        for world in (1, 2, 3, 8):
            shares = [distributed.share(rows, distributed.Job(rank, world, 0)) for rank in range(world)]
            assert shares[0][0] == 0 and shares[-1][1] == rows
            assert all(first[1] == second[0] for first, second in itertools.pairwise(shares))


def test_merge_keeps_the_tie_rule_across_ranks() -> None:
    # Rank 0 holds docs 0-9, rank 1 docs 10-19; equal scores must come out by ascending index.
    scores = torch.tensor([[5.0, 3.0, 3.0, float("-inf"), 5.0, 3.0, 1.0, 0.0]])
    indices = torch.tensor([[2, 4, 7, -1, 11, 12, 13, 15]])
    _, merged_indices = distributed.merge(scores, indices, higher_is_better=True)
    assert merged_indices.tolist() == [[2, 11, 4, 7, 12, 13, 15, -1]]
    _, order = distributed.merge(torch.tensor([[0.5, float("inf"), 0.5]]), torch.tensor([[3, -1, 9]]), False)
    assert order.tolist() == [[3, 9, -1]]


def test_choose_shard() -> None:
    def plan(queries: int, docs: int, batch: int) -> Plan:
        return make_plan(queries=queries, docs=docs, dim=768, k=100, device="cpu", budget_bytes=2**40,
                         selection="sort", batch_rows=batch)  # fmt: skip

    few_queries, many_queries = plan(100, 10**7, 100), plan(10**6, 10**7, 10**6)
    assert distributed.choose_shard("auto", few_queries, 8, 10**7 * 768 * 4) == "docs"  # tiny merge, big read
    assert distributed.choose_shard("auto", many_queries, 8, 10**7 * 768 * 4) == "queries"  # huge merge
    assert distributed.choose_shard("auto", plan(1000, 10**7, 100), 8, 10**7 * 768 * 4) == "queries"  # passes
    assert distributed.choose_shard("docs", many_queries, 8, 1) == "docs"


def test_current_job_from_the_environment(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed.current_job() is None  # no rank: not launched by torchrun
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.current_job() == distributed.Job(2, 4, 0)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.current_job() is None  # a job of one is just a process


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["queries", "docs"])
def test_an_interrupted_job_resumes_on_every_rank(tmp_path, shard) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(5)
    torch.save(torch.randn(1200, 32, generator=generator), tmp_path / "q.pt")
    torch.save(torch.randn(200_000, 32, generator=generator), tmp_path / "d.pt")
    reference = torch.load(compute_topk(str(tmp_path / "q.pt"), str(tmp_path / "d.pt"), k=20, force_cpu=True,
                                        out_path=str(tmp_path / "one.pt")))  # fmt: skip
    argv = [*TWO_RANKS, str(tmp_path / "q.pt"), str(tmp_path / "d.pt"), "--k", "20", "--cpu", "--batch-size", "40",
            "--shard", shard, "--output-path", str(tmp_path / "out.pt")]  # fmt: skip
    job = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not _some_rows_done(tmp_path.glob("out.pt*checkpoint/manifest.json")) and time.monotonic() < deadline:
        time.sleep(0.005)
    job.send_signal(signal.SIGINT)  # by progress, not by the clock: mid-run on a machine of any speed
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0 and "queries are saved in" in err, err
    assert not (tmp_path / "out.pt").exists()
    resumed = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr
    result = torch.load(tmp_path / "out.pt")
    assert torch.equal(result["indices"], reference["indices"]) and torch.equal(result["scores"], reference["scores"])
    assert not list(tmp_path.glob("out.pt*checkpoint"))


def _some_rows_done(manifests) -> bool:  # type: ignore[no-untyped-def]
    """Whether a rank's checkpoint holds two batches (80 rows) already."""
    for manifest in manifests:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(manifest.read_text())["done_rows"] >= 80:
                return True
    return False
