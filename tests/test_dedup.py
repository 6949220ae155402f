"""`tiny-knn dedup` (dedup.py): the union-find against scipy's connected_components; the command against scipy on
the pairs of every exact score, with planted groups of near-copies and chains (a~b, b~c, a not~c: one group); the
output formats and the keep list; resumption after SIGKILL; a group of 2,000 identical rows (2 M pairs) under a
64 MB budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from tests.capabilities import needs, needs_kernel
from tests.runs import kill_in_batch
from tests.test_ranges import every_exact_score
from tiny_knn.cli import main
from tiny_knn.dedup import UnionFind
from tiny_knn.estimators import ESTIMATORS

pytestmark = needs_kernel


def scipy_groups(rows: int, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group, representative) from scipy's connected components, renumbered as dedup numbers them: each group's
    representative its lowest row, groups in the order of their representatives."""
    graph = coo_matrix((np.ones(a.size), (a, b)), shape=(rows, rows))
    _, labels = connected_components(graph, directed=False)
    lowest = np.full(labels.max(initial=0) + 1, rows, dtype=np.int64)
    np.minimum.at(lowest, labels, np.arange(rows))
    representative = lowest[labels]
    order = np.argsort(lowest)
    number = np.empty_like(order)
    number[order] = np.arange(order.size)
    return number[labels], representative


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 300), edges=st.integers(0, 600), batches=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_union_find_is_connected_components(rows: int, edges: int, batches: int, seed: int) -> None:
    generator = np.random.default_rng(seed)
    a, b = generator.integers(0, rows, edges), generator.integers(0, rows, edges)
    forest = UnionFind(np.arange(rows, dtype=np.int64))
    for part_a, part_b in zip(np.array_split(a, batches), np.array_split(b, batches), strict=True):
        forest.union(part_a, part_b)
        assert (forest.parent <= np.arange(rows)).all()  # the invariant a SIGKILL relies on
    group, representative = forest.groups()
    expected = scipy_groups(rows, a, b)
    assert np.array_equal(group, expected[0]) and np.array_equal(representative, expected[1])


def test_a_long_chain_is_one_group() -> None:
    rows = 50_000
    forest = UnionFind(np.arange(rows, dtype=np.int64))
    forest.union(np.arange(rows - 1)[::-1].copy(), np.arange(1, rows)[::-1].copy())  # a path, joined from its far end
    group, representative = forest.groups()
    assert not group.any() and not representative.any()


def planted_corpus(seed: int = 0) -> np.ndarray:
    """Random rows (far apart at dim 48), groups of 2..50 near-copies of a row, and chains a~b~c with a not~c at
    cosine 0.95, shuffled."""
    generator = np.random.default_rng(seed)
    dim = 48
    rows = [generator.standard_normal((1500, dim))]
    for size in (2, 3, 5, 8, 13, 21, 34, 50):
        centre = generator.standard_normal(dim)
        rows.append(centre + 0.02 * np.linalg.norm(centre) / dim**0.5 * generator.standard_normal((size, dim)))
    for length in (3, 4, 6):  # each link at about cosine 0.96: neighbours in the chain, the ends are not
        start, step = generator.standard_normal(dim), generator.standard_normal(dim)
        start, step = start / np.linalg.norm(start), step - step @ start / (start @ start) * start
        step /= np.linalg.norm(step)
        angles = np.arange(length) * np.arccos(0.96)
        rows.append(np.cos(angles)[:, None] * start + np.sin(angles)[:, None] * step)
    corpus = np.concatenate(rows).astype(np.float32)
    return corpus[generator.permutation(corpus.shape[0])]


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_dedup_is_connected_components_of_the_pairs_within_the_threshold(tmp_path, fmt: str, capsys) -> None:  # type: ignore[no-untyped-def]
    corpus = planted_corpus()
    np.save(tmp_path / "emb.npy", corpus)
    scores = every_exact_score(torch.from_numpy(corpus), torch.from_numpy(corpus), "cosine")
    a, b = np.nonzero(np.triu(scores >= np.float32(0.95), k=1))
    group, representative = scipy_groups(corpus.shape[0], a, b)
    same_group = group[:, None] == group[None, :]
    assert (same_group & (scores < np.float32(0.95))).any()  # chains: rows of one group that are not within it
    out = tmp_path / ("groups.parquet" if fmt == "parquet" else "groups")
    argv = ["dedup", str(tmp_path / "emb.npy"), "--threshold", "0.95", "--output-path", str(out), "--keep-list",
            str(tmp_path / "keep.txt"), "--batch-size", "300", "--chunk-size", "256"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{out}\n"
    sizes = np.bincount(group)
    summary = (f"tiny-knn: dedup: {corpus.shape[0]:,} rows, {a.size:,} pairs within the threshold, {sizes.size:,} "
               f"groups, largest group {sizes.max():,} rows")  # fmt: skip
    assert summary in captured.err
    if fmt == "parquet":
        table = pq.read_table(out)
        assert table.column_names == ["row", "group", "representative"]
        assert np.array_equal(table.column("row").to_numpy(), np.arange(corpus.shape[0]))
        got_group, got_representative = table.column("group").to_numpy(), table.column("representative").to_numpy()
        meta = json.loads(pq.read_schema(out).metadata[b"tiny_knn"])
    else:
        assert sorted(os.listdir(out)) == ["group.npy", "meta.json", "representative.npy"]
        got_group, got_representative = np.load(out / "group.npy"), np.load(out / "representative.npy")
        meta = json.loads((out / "meta.json").read_text())
    assert np.array_equal(got_group, group) and np.array_equal(got_representative, representative)
    assert meta["pairs"] == a.size and meta["groups"] == sizes.size and meta["kind"] == "dedup"
    keep = [int(line) for line in (tmp_path / "keep.txt").read_text().splitlines()]
    assert keep == np.flatnonzero(representative == np.arange(corpus.shape[0])).tolist()
    assert not [name for name in os.listdir(tmp_path) if name.endswith((".checkpoint", ".lock", ".tmp"))]


def test_l2_and_a_row_with_no_neighbour(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rows = np.array([[0, 0], [0, 1], [0, 2.5], [5, 5], [0, 0]], dtype=np.float32)
    np.save(tmp_path / "emb.npy", rows)
    out = tmp_path / "groups.parquet"
    argv = ["dedup", str(tmp_path / "emb.npy"), "--threshold", "1", "--metric", "l2", "--output-path", str(out)]
    assert main([*argv, "--quiet"]) == 0
    table = pq.read_table(out).to_pydict()
    assert table["group"] == [0, 0, 1, 2, 0] and table["representative"] == [0, 0, 2, 3, 0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--threshold", "nan"], "expected a finite number"),
        (["--threshold", "-1", "--metric", "l2"], "a squared distance >= 0"),
        (["--threshold", "0.9", "--output-path", "groups.pt"], "tiny-knn dedup writes parquet or an npy folder"),
        (["--threshold", "0.9", "--keep-list", "emb.npy"], "is the docs file"),
        (["--threshold", "0.9", "--max-memory", "1KB"], "too small for a range search"),
    ],
)
def test_bad_options_are_one_line_and_leave_nothing(tmp_path, monkeypatch, capsys, extra, message) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "emb.npy", np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32))
    assert main(["dedup", "emb.npy", "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == ["emb.npy"]


def test_dry_run_estimates_the_pairs(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    np.save(tmp_path / "emb.npy", planted_corpus())
    assert main(["dedup", str(tmp_path / "emb.npy"), "--threshold", "0.95", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "each row against the rows after it" in out and "pairs: about" in out
    assert os.listdir(tmp_path) == ["emb.npy"]


def test_help_says_what_a_group_is(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit):
        main(["dedup", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--threshold" in text and "--keep-list" in text and "connected components" in text


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_groups(tmp_path) -> None:  # type: ignore[no-untyped-def]
    corpus = np.concatenate([planted_corpus(1)] * 3)  # every row three times: groups span the batches
    np.save(tmp_path / "emb.npy", corpus)

    def command(out: str) -> list[str]:
        return [sys.executable, "-m", "tiny_knn", "dedup", str(tmp_path / "emb.npy"), "--threshold", "0.95",
                "--batch-size", "400", "--quiet", "--output-path", str(tmp_path / out)]  # fmt: skip

    subprocess.run(command("reference"), check=True, capture_output=True)
    kill_in_batch(command("out"), tmp_path / "pause", saved_batches=3)
    manifest = json.loads((tmp_path / "out.checkpoint" / "manifest.json").read_text())
    assert manifest["done_rows"] == 1200
    done = subprocess.run([arg for arg in command("out") if arg != "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    for name in ("group.npy", "representative.npy"):
        assert np.array_equal(np.load(tmp_path / "out" / name), np.load(tmp_path / "reference" / name))
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta == json.loads((tmp_path / "reference" / "meta.json").read_text())
    assert not (tmp_path / "out.checkpoint").exists()


@pytest.mark.slow
@pytest.mark.parametrize("product", [None] + [pytest.param(name, marks=needs(name)) for name in ESTIMATORS])
def test_a_group_of_2000_identical_rows_dedups_under_64MB(tmp_path, monkeypatch, product) -> None:  # type: ignore[no-untyped-def]
    """About 2 M pairs, none of them held: anonymous memory above a tiny run's stays within the budget, with the
    estimator chosen here and with each one forced (torch-bf16's products once grew oneDNN's caches shape by
    shape, 70 MiB here, past the budget)."""
    from tests.test_memory import peak_rss_anon

    if product is not None:
        monkeypatch.setenv("TINY_KNN_PRODUCT", product)

    generator = np.random.default_rng(3)
    corpus = generator.standard_normal((30_000, 64)).astype(np.float32)
    planted = generator.permutation(30_000)[:2000]
    corpus[planted] = corpus[planted[0]]
    np.save(tmp_path / "emb.npy", corpus)
    np.save(tmp_path / "tiny.npy", corpus[:100])

    def command(name: str) -> list[str]:
        return [sys.executable, "-m", "tiny_knn", "dedup", str(tmp_path / name), "--threshold", "0.95",
                "--max-memory", "64MB", "--quiet", "--output-path", str(tmp_path / f"{name}.parquet")]  # fmt: skip

    baseline = peak_rss_anon(command("tiny.npy"))
    peak = peak_rss_anon(command("emb.npy"))
    table = pq.read_table(tmp_path / "emb.npy.parquet")
    meta = json.loads(pq.read_schema(tmp_path / "emb.npy.parquet").metadata[b"tiny_knn"])
    assert meta["pairs"] == 2000 * 1999 // 2 and meta["largest_group"] == 2000
    assert np.array_equal(np.unique(table.column("representative").to_numpy()[planted]), [planted.min()])
    assert peak - baseline < 64 * 10**6, f"peak RssAnon {(peak - baseline) / 2**20:.0f} MiB above a tiny run's"
