"""Merging results over consecutive slices of the docs gives the bytes of one search over every doc (and the
float64 brute force's answer), whatever the format of the parts, ties across parts included; parts that were
not searched alike are refused in one line."""

from __future__ import annotations

import itertools
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import brute_force

from tiny_knn import InvalidInputError, OutputError, compute_topk, merge_results
from tiny_knn import merge as merging
from tiny_knn.cli import main
from tiny_knn.safety import OutputLock

K = 12
BOUNDS = [0, 130, 131, 400, 596, 600]  # five slices: one of a single doc, the last smaller than K


@pytest.fixture
def corpus(tmp_path):  # type: ignore[no-untyped-def]
    """Queries and docs (with exact copies of one doc in four slices, near some queries), the docs whole and
    sliced."""
    generator = torch.Generator().manual_seed(5)
    queries = torch.randn(37, 8, generator=generator)
    queries[1] -= (queries[1] @ queries[0]) / (queries[0] @ queries[0]) * queries[0]  # orthogonal to query 0
    queries[:2] *= 10 / queries[:2].norm(dim=1, keepdim=True)  # long: their copies are their best docs
    docs = torch.randn(BOUNDS[-1], 8, generator=generator)
    for copy in (140, 130, 598, 7):  # ties across parts: the same vector in slices 0, 1, 2 and 4
        docs[copy] = queries[0]
    for copy in (460, 450):  # and a tie within one slice
        docs[copy] = queries[1]
    torch.save(queries, tmp_path / "q.pt")
    torch.save(docs, tmp_path / "d.pt")
    for index, (lo, hi) in enumerate(itertools.pairwise(BOUNDS)):
        torch.save(docs[lo:hi].clone(), tmp_path / f"d{index}.pt")
    return tmp_path, queries, docs


def search_parts(folder: Path, metric: str, formats: list[str], *, ids: bool = False) -> list[str]:
    """One search per slice, in the given formats (one per slice, cycled); with `ids`, with query ids and each
    slice's doc ids ("doc" and the global row)."""
    parts = []
    for index, (lo, hi) in enumerate(itertools.pairwise(BOUNDS)):
        fmt = formats[index % len(formats)]
        out = folder / f"part{index}-{metric}{'' if fmt == 'npy' else '.' + fmt}"
        named = {}
        if ids:
            (folder / f"ids{index}.txt").write_text("".join(f"doc{row}\n" for row in range(lo, hi)))
            named = {"query_ids": folder / "qids.txt", "doc_ids": folder / f"ids{index}.txt"}
        with warnings.catch_warnings():  # the last slice clamps k, with a warning
            warnings.simplefilter("ignore")
            search = {"k": K, "force_cpu": True, "metric": metric, "output_format": fmt, **named}
            parts.append(compute_topk(folder / "q.pt", folder / f"d{index}.pt", out_path=out, **search))
    return parts


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("formats", [["pt"], ["npy"], ["pt", "npy", "parquet"]], ids=["pt", "npy", "mixed"])
def test_merge_gives_the_bytes_of_one_search(corpus, metric, formats, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    folder, queries, docs = corpus
    whole = torch.load(compute_topk(folder / "q.pt", folder / "d.pt", k=K, force_cpu=True, metric=metric,
                                    out_path=folder / f"whole-{metric}.pt"))  # fmt: skip
    parts = search_parts(folder, metric, formats)
    monkeypatch.setattr(merging, "MERGE_BLOCK_BYTES", 5000)  # blocks of a few rows: the merge streams
    merged = torch.load(merge_results(parts, folder / "merged.pt"))
    assert torch.equal(merged["indices"], whole["indices"])
    assert torch.equal(merged["scores"].view(torch.int32), whole["scores"].view(torch.int32))  # bit for bit
    best, _ = brute_force(queries, docs, K, metric)  # float64
    assert torch.allclose(merged["scores"].double(), best, rtol=1e-5, atol=1e-5)
    assert merged["indices"][0, :4].tolist() == [7, 130, 140, 598], "ties across parts: the lower global doc first"
    assert merged["indices"][1, :2].tolist() == [450, 460]
    assert len(set(merged["scores"][0, :4].tolist())) == len(set(merged["scores"][1, :2].tolist())) == 1
    assert (merged["k"], merged["requested_k"], merged["doc_count"]) == (K, K, BOUNDS[-1])
    assert merged["queries_fingerprint"] == whole["queries_fingerprint"]
    assert merged["merged_parts"] == [str(part) for part in parts]
    assert merged["docs_path"] == " + ".join(str(folder / f"d{index}.pt") for index in range(len(BOUNDS) - 1))


def test_every_output_format_and_the_command_line(corpus, capsys) -> None:  # type: ignore[no-untyped-def]
    folder, _, _ = corpus
    parts = search_parts(folder, "ip", ["npy"])
    whole = torch.load(compute_topk(folder / "q.pt", folder / "d.pt", k=K, force_cpu=True, out_path=folder / "w.pt"))
    assert main(["merge", *parts, "--output-path", str(folder / "merged"), "--format", "npy", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{folder / 'merged'}\n" and captured.err == ""
    assert np.array_equal(np.load(folder / "merged" / "indices.npy"), whole["indices"].numpy())
    meta = json.loads((folder / "merged" / "meta.json").read_text())
    assert meta["doc_count"] == BOUNDS[-1] and meta["k"] == K
    # A merged result merges again: yesterday's merge, today's new slice.
    torch.save(torch.randn(50, 8), folder / "new.pt")
    today = compute_topk(folder / "q.pt", folder / "new.pt", k=K, force_cpu=True, out_path=folder / "today.pt")
    assert main(["merge", str(folder / "merged"), today, "--output-path", str(folder / "all.pt"), "--quiet"]) == 0
    torch.save(torch.cat([torch.load(folder / "d.pt"), torch.load(folder / "new.pt")]), folder / "all-docs.pt")
    again = torch.load(compute_topk(folder / "q.pt", folder / "all-docs.pt", k=K, force_cpu=True,
                                    out_path=folder / "again.pt"))  # fmt: skip
    assert torch.equal(torch.load(folder / "all.pt")["indices"], again["indices"])


def test_ids_travel_with_the_merge(corpus) -> None:  # type: ignore[no-untyped-def]
    folder, queries, _ = corpus
    (folder / "qids.txt").write_text("".join(f"q{row}\n" for row in range(len(queries))))
    merged = torch.load(merge_results(search_parts(folder, "ip", ["pt", "npy"], ids=True), folder / "merged.pt"))
    assert merged["doc_ids"] == [f"doc{row}" for row in range(BOUNDS[-1])]
    assert merged["query_ids"] == [f"q{row}" for row in range(len(queries))]


def damaged(path: str, folder: Path, **changes: object) -> str:
    """A copy of a pt result with keys changed (None: removed)."""
    result = torch.load(path)
    for key, value in changes.items():
        if value is None:
            del result[key]
        else:
            result[key] = value
    target = str(folder / f"damaged-{len(os.listdir(folder))}.pt")
    torch.save(result, target)
    return target


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"queries_fingerprint": "0" * 32}, r"queries \(their content sample\) of 'q.pt', expected of '.*q.pt'"),
        ({"metric": "l2"}, r"metric 'l2', expected 'ip' like the first part"),
        ({"requested_k": 11}, "requested k 11, expected 12"),
        ({"format_version": 0}, "format version 0, expected 1"),
        ({"format_version": 99}, "format version 99, expected at most 1"),
        ({"precision": "bf16-unsafe"}, "precision 'bf16-unsafe', expected 'exact'"),
        ({"doc_count": None}, r"lacks doc_count, which merge needs; expected a result of tiny-knn \(format version 1"),
        ({"exclude_self": True}, "an --exclude-self search"),
        ({"k": 3}, r"records k=3 and holds 37 queries of 12 neighbours, expected 37 queries of k=12 \(k=12 over"),
        ({"indices": torch.full((37, K), 500)}, r"doc numbers from 500 to 500, expected 0 to 268"),
    ],
)
def test_parts_not_searched_alike_are_refused(corpus, change, message) -> None:  # type: ignore[no-untyped-def]
    folder, _, _ = corpus
    parts = search_parts(folder, "ip", ["pt"])
    if "queries_fingerprint" in change:
        change = {**change, "queries_path": "q.pt"}
    parts[2] = damaged(parts[2], folder, **change)
    before = sorted(os.listdir(folder))
    with pytest.raises(InvalidInputError, match=message):
        merge_results(parts, folder / "merged.pt")
    assert sorted(os.listdir(folder)) == before


def test_what_cannot_be_merged_says_why_in_one_line(corpus, capsys) -> None:  # type: ignore[no-untyped-def]
    folder, _, _ = corpus
    parts = search_parts(folder, "ip", ["pt"])
    (folder / "qids.txt").write_text("".join(f"q{row}\n" for row in range(37)))
    with_ids = compute_topk(folder / "q.pt", folder / "d0.pt", k=K, force_cpu=True, out_path=folder / "ids.parquet",
                            query_ids=folder / "qids.txt")  # fmt: skip
    other_queries = folder / "q2.pt"
    torch.save(torch.randn(37, 8), other_queries)
    foreign = compute_topk(other_queries, folder / "d2.pt", k=K, force_cpu=True, out_path=folder / "other.pt")
    trec = compute_topk(folder / "q.pt", folder / "d0.pt", k=K, force_cpu=True, out_path=folder / "run.trec")
    cases = {
        "ids": ([with_ids, parts[1]], r"its query column holds ids \(string\), not row numbers"),
        "queries": ([parts[0], foreign], r"queries \(their content sample\) of '.*q2.pt', expected of '.*q.pt'"),
        "trec": ([trec, parts[1]], "a TREC run holds ids, not row numbers"),
        "missing": ([parts[0], str(folder / "nowhere.pt")], "no such file or folder"),
        "output is a part": ([*parts, "--output-path", parts[2]], r"is the merge part '.*' \(an input\)"),
    }
    for name, (argv, message) in cases.items():
        if "--output-path" not in argv:
            argv = [*argv, "--output-path", str(folder / "merged.pt")]
        assert main(["merge", *map(str, argv), "--quiet"]) == 2, name
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert captured.out == "" and len(lines) == 1 and lines[0].startswith("tiny-knn: error: "), name
        assert re.search(message, lines[0]), (name, lines[0])
    assert not (folder / "merged.pt").exists()


def test_the_output_is_locked_and_checked_like_a_search(corpus) -> None:  # type: ignore[no-untyped-def]
    folder, _, _ = corpus
    parts = search_parts(folder, "ip", ["npy"])
    with OutputLock(str(folder / "merged.pt")), pytest.raises(OutputError, match="another tiny-knn run"):
        merge_results(parts, folder / "merged.pt")
    with pytest.raises(OutputError, match="lies inside the input shard folder"):
        merge_results(parts, Path(parts[0]) / "merged.pt")
    with pytest.raises(OutputError, match="holds the merge part"):
        merge_results(parts, parts[1], output_format="npy")
