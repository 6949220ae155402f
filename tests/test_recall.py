"""Recall@K of any result file against an exact one, by ids and by ann-benchmarks' rule, on cases worked out by
hand, in each format tiny-knn reads (the ground-truth files written here by numpy, as other tools write them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiny_knn import InvalidInputError, compute_topk, recall_at_k
from tiny_knn.cli import main

TRUTH_IDS = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
TRUTH_SCORES = [[0.9, 0.8, 0.7, 0.6]] * 3
# Row 0: the exact answer. Row 1: two of the ids; a third doc scores 0.5995, within 1e-3 of the 4th exact
# score (0.6), the fourth does not. Row 2: doc 8 twice (it counts once by ids), two docs of other ids whose
# scores make the cut.
RUN_IDS = [[0, 1, 2, 3], [5, 4, 99, 98], [8, 8, 12, 13]]
RUN_SCORES = [[0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.5995, 0.5], [0.9, 0.9, 0.61, 0.2]]


def write_pt(path, ids, scores, **meta) -> str:  # type: ignore[no-untyped-def]
    torch.save({"indices": torch.tensor(ids), "scores": torch.tensor(scores), **meta}, path)
    return str(path)


def write_vecs(path, values, dtype: str) -> str:  # type: ignore[no-untyped-def]
    array = np.asarray(values, dtype=dtype)
    header = np.full((array.shape[0], 1), array.shape[1], dtype="<i4").view(dtype)
    np.concatenate([header, array], axis=1).tofile(path)
    return str(path)


def write_bigann(path, ids, scores) -> str:  # type: ignore[no-untyped-def]
    rows, k = np.shape(ids)
    with open(path, "wb") as stream:
        stream.write(np.array([rows, k], dtype="<i4").tobytes())
        stream.write(np.asarray(ids, dtype="<u4").tobytes() + np.asarray(scores, dtype="<f4").tobytes())
    return str(path)


def test_a_hand_made_case(tmp_path) -> None:  # type: ignore[no-untyped-def]
    truth = write_pt(tmp_path / "truth.pt", TRUTH_IDS, TRUTH_SCORES, metric="ip")
    run = write_pt(tmp_path / "run.pt", RUN_IDS, RUN_SCORES)
    measured = recall_at_k(run, truth)
    assert (measured.k, measured.queries) == (4, 3)
    assert measured.by_ids == pytest.approx(7 / 12) and measured.by_scores == pytest.approx(10 / 12)
    at_two = recall_at_k(run, truth, k=2)  # row 2: {8} of {8, 9}; every score at least 0.8 - 1e-3
    assert at_two.by_ids == pytest.approx(5 / 6) and at_two.by_scores == pytest.approx(1.0)


def test_distances_and_the_ground_truth_formats_of_other_tools(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """l2: the same case with distances (smaller is better) as the ground truth; its direction is read from
    the order of its scores, since these files record no metric."""
    distances = [[1.0, 2.0, 3.0, 4.0]] * 3
    run_distances = [[1.0, 2.0, 4.0005, 9.0], [1.0, 1.5, 4.0, 4.01], [0.5, 0.6, 0.7, 0.8]]
    run = write_pt(tmp_path / "run.pt", RUN_IDS, run_distances)
    write_vecs(tmp_path / "gt.fvecs", distances, "<f4")
    truths = {
        "ivecs": write_vecs(tmp_path / "gt.ivecs", TRUTH_IDS, "<i4"),
        "bigann": write_bigann(tmp_path / "gt.bin", TRUTH_IDS, distances),
    }
    for name, truth in truths.items():
        measured = recall_at_k(run, truth)
        assert measured.by_ids == pytest.approx(7 / 12), name
        assert measured.by_scores == pytest.approx((3 + 3 + 4) / 12), name
    # The run may be in those formats too; an .ivecs without its .fvecs has no scores.
    assert recall_at_k(truths["bigann"], truths["ivecs"]).by_scores == pytest.approx(1.0)
    (tmp_path / "gt.fvecs").unlink()
    alone = recall_at_k(truths["ivecs"], truths["bigann"])
    assert alone.by_ids == 1.0 and alone.by_scores is None
    assert "by scores: not measured" in alone.describe()


def test_against_a_search(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(4)
    torch.save(torch.randn(30, 5, generator=generator), tmp_path / "q.pt")
    torch.save(torch.randn(200, 5, generator=generator), tmp_path / "d.pt")
    exact = compute_topk(tmp_path / "q.pt", tmp_path / "d.pt", k=10, force_cpu=True, metric="l2",
                         out_path=tmp_path / "gt.ivecs")  # fmt: skip
    result = torch.load(compute_topk(tmp_path / "q.pt", tmp_path / "d.pt", k=10, force_cpu=True, metric="l2",
                                     out_path=tmp_path / "r.pt"))  # fmt: skip
    farthest = {name: result[name].flip(1)[:, :5] for name in ("indices", "scores")}  # the 5 farthest of the 10
    torch.save({**result, **farthest}, tmp_path / "worst.pt")
    assert main(["recall", str(tmp_path / "r.pt"), exact]) == 0
    assert capsys.readouterr().out == (
        "recall@10: 1.000000 by ids, 1.000000 by scores (within 0.001 of the 10th exact score, ann-benchmarks' "
        "rule); 30 queries\n"
    )
    assert main(["recall", str(tmp_path / "worst.pt"), exact, "--k", "5"]) == 0
    assert capsys.readouterr().out.startswith("recall@5: 0.000000 by ids, 0.000000 by scores")


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("k", "run '.*run.pt': 4 neighbours per query, expected at least k=5"),
        ("rows", r"run '.*short.pt': 2 queries, expected 3 like the ground truth"),
        ("junk", "not a result tiny-knn reads"),
        ("unsorted", "its scores neither fall nor rise along each row"),
    ],
)
def test_refusals(tmp_path, capsys, case, message) -> None:  # type: ignore[no-untyped-def]
    truth = write_pt(tmp_path / "truth.pt", TRUTH_IDS, TRUTH_SCORES, metric="ip")
    run = write_pt(tmp_path / "run.pt", RUN_IDS, RUN_SCORES)
    argv = {
        "k": [run, truth, "--k", "5"],
        "rows": [write_pt(tmp_path / "short.pt", RUN_IDS[:2], RUN_SCORES[:2]), truth],
        "junk": [run, str(tmp_path / "junk.bin")],
        "unsorted": [run, write_bigann(tmp_path / "mixed.bin", TRUTH_IDS, [[1.0, 3.0, 2.0, 4.0]] * 3)],
    }[case]
    (tmp_path / "junk.bin").write_bytes(b"not a ground truth")
    assert main(["recall", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("tiny-knn: error: ")
    with pytest.raises(InvalidInputError, match=message):
        recall_at_k(*argv[:2], k=int(argv[3]) if len(argv) > 2 else None)
