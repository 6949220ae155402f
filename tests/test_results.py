from __future__ import annotations

import errno
import io
import json
import os
import sys
import time

import ir_measures
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tiny_knn import results
from tiny_knn.cli import main
from tiny_knn.errors import InputFileError, InvalidInputError, OutputError


def test_default_output_path_sits_beside_the_queries() -> None:
    path = results.default_output_path("/data/run/queries.pt", "/corpus/docs.v2.pt", 100)
    assert path == "/data/run/top100_queries_x_docs.v2.pt"


def test_atomic_write_leaves_only_the_result(tmp_path) -> None:  # type: ignore[no-untyped-def]
    target = str(tmp_path / "out.pt")
    results.write_result(target, {"scores": torch.ones(2, 2)})
    assert os.listdir(tmp_path) == ["out.pt"]
    assert torch.equal(torch.load(target)["scores"], torch.ones(2, 2))


def test_failed_write_leaves_nothing(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OutputError, match="No space left on device"):
        results.write_result(str(tmp_path / "out.pt"), {"x": 1})
    assert os.listdir(tmp_path) == []


def test_an_existing_result_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    target = str(tmp_path / "out.pt")
    results.write_result(target, {"v": torch.tensor(1)})
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        results.write_result(target, {"v": torch.tensor(2)})
    monkeypatch.undo()
    assert torch.load(target)["v"].item() == 1 and os.listdir(tmp_path) == ["out.pt"]


@pytest.fixture
def large_result() -> dict[str, object]:
    """A result dict just over a lowered direct-write threshold, whose size is not a multiple of the stage."""
    generator = torch.Generator().manual_seed(3)
    return {
        "indices": torch.randint(0, 10**6, (37, 101), generator=generator),
        "scores": torch.randn(37, 101, generator=generator),
        "k": 101,
    }


def _buffered_bytes(result: dict[str, object], tmp_path) -> bytes:  # type: ignore[no-untyped-def]
    with open(tmp_path / "buffered.pt", "wb") as stream:
        torch.save(result, stream)
    return (tmp_path / "buffered.pt").read_bytes()


def _direct(descriptor: int) -> bool:
    import fcntl  # POSIX only, as is O_DIRECT

    return bool(fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_DIRECT)


linux_direct = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT exists on Linux only")


@pytest.fixture
def direct_writes(monkeypatch) -> list[int]:  # type: ignore[no-untyped-def]
    """Lowers the direct-write threshold and stage, and records the length of every O_DIRECT write, each
    made slow enough that torch.save fills the other buffer meanwhile."""
    monkeypatch.setattr(results, "DIRECT_WRITE_MIN_BYTES", 1024)
    monkeypatch.setattr(results, "DIRECT_STAGE_BYTES", 3 * 4096)
    lengths: list[int] = []
    real_pwrite = os.pwrite

    def pwrite(descriptor: int, data, offset: int) -> int:  # type: ignore[no-untyped-def]
        if _direct(descriptor):
            lengths.append(len(data))
            time.sleep(0.005)
        return real_pwrite(descriptor, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    return lengths


@linux_direct
def test_large_results_written_direct_byte_for_byte(tmp_path, large_result, direct_writes) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "out.pt"
    results.write_result(str(target), large_result)
    expected = _buffered_bytes(large_result, tmp_path)
    assert target.read_bytes() == expected
    assert len(direct_writes) == -(-len(expected) // (3 * 4096)), "every stage went out with O_DIRECT"
    assert all(length % 4096 == 0 for length in direct_writes)


@linux_direct
@pytest.mark.parametrize("refused_by", ["open", "write"])
def test_direct_writes_refused_fall_back(tmp_path, large_result, direct_writes, monkeypatch, refused_by) -> None:  # type: ignore[no-untyped-def]
    real_open = os.open
    attempts = []

    def open_(path, flags, *args):  # type: ignore[no-untyped-def]
        if flags & os.O_DIRECT:
            attempts.append("open")
            if refused_by == "open":
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    def pwrite(descriptor: int, data, offset: int) -> int:  # type: ignore[no-untyped-def]
        attempts.append("write")  # only direct writes use pwrite
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "pwrite", pwrite)
    target = tmp_path / "out.pt"
    results.write_result(str(target), large_result)
    assert refused_by in attempts
    assert target.read_bytes() == _buffered_bytes(large_result, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["buffered.pt", "out.pt"]


def test_without_o_direct_results_are_written_buffered(tmp_path, large_result, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(results, "DIRECT_WRITE_MIN_BYTES", 1024)
    monkeypatch.delattr(os, "O_DIRECT", raising=False)  # as on macOS or Windows
    target = tmp_path / "out.pt"
    results.write_result(str(target), large_result)
    assert target.read_bytes() == _buffered_bytes(large_result, tmp_path)


@linux_direct
@pytest.mark.parametrize(
    ("failure", "expected"),
    [(OSError(errno.ENOSPC, "No space left on device"), OutputError), (ValueError("broken"), ValueError)],
)
def test_failed_direct_write_leaves_nothing(tmp_path, large_result, direct_writes, monkeypatch, failure, expected):  # type: ignore[no-untyped-def]
    written = os.pwrite
    calls = []

    def fail(descriptor: int, data, offset: int) -> int:  # type: ignore[no-untyped-def]
        calls.append(len(data))
        if len(calls) == 2:
            raise failure
        return written(descriptor, data, offset)

    monkeypatch.setattr(os, "pwrite", fail)
    with pytest.raises(expected, match=str(failure.args[-1])):
        results.write_result(str(tmp_path / "out.pt"), large_result)
    assert os.listdir(tmp_path) == []


@pytest.fixture
def finished(tmp_path):  # type: ignore[no-untyped-def]
    """A small l2 search's result dict, as compute_topk builds it, with ids."""
    scores = torch.tensor([[0.0, 0.25, 1.5], [2.0, 2.5, 3.0]])
    indices = torch.tensor([[4, 0, 2], [1, 3, 0]])
    return {
        "indices": indices,
        "scores": scores,
        "queries_path": "q.npy",
        "docs_path": "d.npy",
        "k": 3,
        "metric": "l2",
        "precision": "float32",
        "query_ids": ["qa", "qb"],
        "doc_ids": ["d0", "d1", "d2", "d3", "d4"],
    }


@pytest.mark.parametrize(
    ("path", "requested", "expected"),
    [(None, None, "pt"), ("r.parquet", None, "parquet"), ("r.trec", None, "trec"), ("r.run", None, "trec"),
     ("r.pt", "npy", "npy"), ("r.txt", None, "pt"), ("gt.ivecs", None, "ivecs"), ("gt.bin", "bigann", "bigann")],
)  # fmt: skip
def test_output_format(path, requested, expected) -> None:  # type: ignore[no-untyped-def]
    assert results.output_format(path, requested) == expected


def test_a_glob_input_names_its_default_output_by_its_folder_beside_it(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """No wildcard in a default output's name (a trap for `rm top5_*`), and no output inside the pattern's folder,
    where it would become one of its shards."""
    monkeypatch.chdir(tmp_path)
    assert results.default_output_path("shards/*.npy", "d.npy", 5) == "top5_shards_x_d.pt"
    assert results.default_output_path("/data/emb.v2/part-[0-9].npy", "/c/*/x.npy", 5) == "/data/top5_emb_x_c.pt"
    assert results.default_output_path("nest/*/e.npy", "d.npy", 5, "npy") == "top5_nest_x_d"
    assert results.default_output_path("*.npy", "../*.npy", 5) == "top5_shards_x_shards.pt"
    assert results.default_output_path("/*.npy", "d.npy", 5) == "/top5_shards_x_d.pt"
    (tmp_path / "star*.npy").write_bytes(b"")  # a file whose name has a wildcard is a file, not a pattern
    assert results.default_output_path("star*.npy", "d.npy", 5) == "top5_star*_x_d.pt"


def test_the_commands_default_outputs_for_a_glob_lie_beside_its_folder(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards").mkdir()
    generator = torch.Generator().manual_seed(5)
    for part in "ab":
        np.save(tmp_path / "shards" / f"{part}.npy", torch.randn(30, 8, generator=generator).numpy())
    np.save(tmp_path / "d.npy", torch.randn(50, 8, generator=generator).numpy())
    assert main(["shards/*.npy", "d.npy", "--k", "5", "--cpu", "--quiet"]) == 0
    assert main(["shards", "d.npy", "--k", "5", "--cpu", "--quiet", "--output-path", "again.pt"]) == 0
    assert torch.equal(torch.load("top5_shards_x_d.pt")["indices"], torch.load("again.pt")["indices"])
    assert main(["dedup", "shards/*.npy", "--threshold", "0.99", "--quiet", "--format", "npy"]) == 0
    assert sorted(os.listdir(tmp_path / "shards")) == ["a.npy", "b.npy"] and (tmp_path / "dedup_shards").is_dir()


def test_default_paths_per_format() -> None:
    assert results.default_output_path("/a/q.npy", "/b/shards/", 5, "trec") == "/a/top5_q_x_shards.trec"
    assert results.default_output_path("/a/q.npy", "/b/d.h5:train", 5, "npy") == "/a/top5_q_x_d"
    assert results.default_output_path("/a/q.npy", "/b/d.npy", 5, "bigann") == "/a/top5_q_x_d.bin"
    assert results.default_output_path("/a/q.npy", "/b/d.npy", 5, "ivecs") == "/a/top5_q_x_d.ivecs"


def test_npy_directory(tmp_path, finished) -> None:  # type: ignore[no-untyped-def]
    target = str(tmp_path / "out")
    results.write_output(target, "npy", finished)
    assert sorted(os.listdir(target)) == ["doc_ids.txt", "indices.npy", "meta.json", "query_ids.txt", "scores.npy"]
    assert np.array_equal(np.load(os.path.join(target, "indices.npy")), finished["indices"].numpy())
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["metric"] == "l2" and meta["k"] == 3 and meta["doc_ids"] == "doc_ids.txt"
    # A second write replaces the directory whole; nothing else is left beside it.
    results.write_output(target, "npy", {**finished, "k": 2})
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["k"] == 2
    assert os.listdir(tmp_path) == ["out"]


def test_parquet_rows_and_metadata(tmp_path, finished) -> None:  # type: ignore[no-untyped-def]
    target = str(tmp_path / "out.parquet")
    results.write_output(target, "parquet", finished)
    table = pq.read_table(target)
    assert table.column_names == ["query", "rank", "doc", "score"]
    assert table.column("query").to_pylist() == ["qa"] * 3 + ["qb"] * 3
    assert table.column("doc").to_pylist() == ["d4", "d0", "d2", "d1", "d3", "d0"]
    assert table.column("rank").to_pylist() == [1, 2, 3, 1, 2, 3]
    assert table.column("score").to_pylist() == [0.0, 0.25, 1.5, 2.0, 2.5, 3.0]
    assert json.loads(table.schema.metadata[b"tiny_knn"])["metric"] == "l2"
    without_ids = {key: value for key, value in finished.items() if not key.endswith("_ids")}
    results.write_output(target, "parquet", without_ids)
    assert pq.read_table(target).column("doc").to_pylist()[:3] == [4, 0, 2]


def test_parquet_without_pyarrow_is_one_clear_error(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(OutputError, match=r"needs pyarrow: pip install 'tiny-knn\[parquet\]'"):
        results.check_format(str(tmp_path / "out.parquet"), "parquet")


def test_a_trec_run_is_formatted_in_slices_of_bounded_memory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Half a million (query, rank) lines as Python objects take about 65 MiB: they are formatted a slice at a time,
    whatever --max-memory (tracemalloc sees Python's objects, not the result's tensors)."""
    import tracemalloc

    rows, k = 512, 1024
    result = {"indices": torch.arange(rows * k).reshape(rows, k) % 50_000, "scores": torch.rand(rows, k), "k": k}
    tracemalloc.start()
    try:
        results.write_output(str(tmp_path / "run.trec"), "trec", result, higher_is_better=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, f"{peak / 2**20:.0f} MiB of Python objects"
    with open(tmp_path / "run.trec", encoding="utf-8") as stream:
        lines = stream.readlines()
    assert len(lines) == rows * k and lines[k].startswith("1 Q0 1024 1 ") and lines[-1].endswith(" tiny-knn\n")


def test_trec_run_is_read_by_an_evaluation_tool(tmp_path, finished) -> None:  # type: ignore[no-untyped-def]
    target = str(tmp_path / "run.trec")
    results.write_output(target, "trec", finished, higher_is_better=False)
    assert (tmp_path / "run.trec").read_text().splitlines()[0] == "qa Q0 d4 1 0 tiny-knn"  # l2: negated, no '-0'
    run = list(ir_measures.read_trec_run(target))
    assert [(r.query_id, r.doc_id, r.score) for r in run[:2]] == [("qa", "d4", 0.0), ("qa", "d0", -0.25)]
    qrels_path = tmp_path / "qrels"
    qrels_path.write_text("qa 0 d0 1\nqb 0 d1 1\n")
    qrels = list(ir_measures.read_trec_qrels(str(qrels_path)))
    measured = ir_measures.calc_aggregate([ir_measures.RR, ir_measures.R @ 1], qrels, run)
    # qa: d0 is second (RR 1/2); qb: d1 is first (RR 1).
    assert measured[ir_measures.RR] == pytest.approx(0.75) and measured[ir_measures.R @ 1] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("content", "message"),
    [("a\nb\n", "2 lines, expected one id per row \\(3\\)"), ("a\n\nc\n", "line 2 is empty"),
     ("a\nb c\nd\n", "line 2 is empty or holds whitespace")],
)  # fmt: skip
def test_bad_ids_files(tmp_path, content, message) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "ids.txt"
    path.write_text(content)
    with pytest.raises(InvalidInputError, match=message):
        results.read_ids(str(path), 3, "doc")
    with pytest.raises(InputFileError, match="no such file"):
        results.read_ids(str(tmp_path / "missing.txt"), 3, "doc")


@pytest.mark.parametrize("fmt", ["npy", "trec", "parquet"])
def test_failed_writes_leave_nothing(tmp_path, finished, monkeypatch, fmt) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(results, "_pairs", lambda result: (_ for _ in ()).throw(OSError(28, "No space left")))
    monkeypatch.setattr(results, "save_array", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OutputError, match="No space left"):
        results.write_output(str(tmp_path / "out"), fmt, finished)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fmt", ["pt", "npy", "trec"])
def test_results_get_the_usual_permissions(tmp_path, finished, fmt) -> None:  # type: ignore[no-untyped-def]
    previous = os.umask(0o022)
    try:
        results.write_output(str(tmp_path / "out"), fmt, finished)
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == (0o755 if fmt == "npy" else 0o644)


def test_ids_from_a_column_of_a_parquet_or_arrow_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pyarrow as pa

    table = pa.table({"id": [10, 11, 12], "name": ["a", "b c", "d"], "emb": [[1.0], [2.0], [3.0]]})
    pq.write_table(table, tmp_path / "x.parquet")
    with pa.OSFile(str(tmp_path / "x.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    for name in ("x.parquet", "x.arrow"):
        assert results.read_ids(str(tmp_path / f"{name}:id"), 3, "doc") == ["10", "11", "12"]
        assert results.ids_file(str(tmp_path / f"{name}:id")) == str(tmp_path / name)
        with pytest.raises(InvalidInputError, match=r"3 rows, expected one id per row \(4\)"):
            results.read_ids(str(tmp_path / f"{name}:id"), 4, "doc")
        with pytest.raises(InvalidInputError, match="row 1 is empty or holds whitespace"):
            results.read_ids(str(tmp_path / f"{name}:name"), 3, "doc")
        with pytest.raises(InvalidInputError, match="no column named 'ids'; it holds id, name, emb"):
            results.read_ids(str(tmp_path / f"{name}:ids"), 3, "doc")


@pytest.mark.parametrize(
    "array",
    [np.arange(12, dtype=np.int64).reshape(3, 4), np.linspace(-1, 1, 35, dtype=np.float32).reshape(5, 7),
     np.empty((0, 3), dtype=np.float32), np.empty(0, dtype=np.int64)],
)  # fmt: skip
def test_save_array_writes_what_numpy_saves(tmp_path, array: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    """Every folder output's arrays (top-k, range CSR, dedup) go through save_array: the bytes of np.save."""
    expected = io.BytesIO()
    np.save(expected, array)
    results.save_array(str(tmp_path / "a.npy"), array)
    assert (tmp_path / "a.npy").read_bytes() == expected.getvalue()
