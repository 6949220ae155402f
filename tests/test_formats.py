"""Every input format gives the same answer as the .pt file holding the same vectors."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from tiny_knn import InputFileError, InvalidInputError, compute_topk
from tiny_knn.sources import ArrowSource, FileSource, HDF5Source, ParquetSource, ShardedSource, open_source


def embedding_table(data: np.ndarray, *, fixed: bool = True) -> pa.Table:
    """Embeddings as they are kept in the wild: a list<float> (or fixed_size_list<float>) column beside ids and
    text."""
    rows, dim = data.shape
    column = (
        pa.FixedSizeListArray.from_arrays(pa.array(data.ravel()), dim)
        if fixed
        else pa.array(list(data), type=pa.list_(pa.from_numpy_dtype(data.dtype)))
    )
    return pa.table({"id": [f"doc{row}" for row in range(rows)], "text": ["some words"] * rows, "emb": column})


def write_arrow(path: str, table: pa.Table, *, stream: bool = True, batch_rows: int = 97, **options: object) -> str:
    """An Arrow IPC file: the stream format (as Hugging Face datasets caches) or the file format."""
    with pa.OSFile(path, "wb") as sink:
        opened = pa.ipc.new_stream if stream else pa.ipc.new_file
        with opened(sink, table.schema, options=pa.ipc.IpcWriteOptions(**options)) as writer:  # type: ignore[arg-type]
            writer.write_table(table, max_chunksize=batch_rows)
    return path


def write_vecs(path: str, data: np.ndarray, value_dtype: str) -> str:
    rows, dim = data.shape
    header = np.full((rows, 1), dim, dtype=np.int32).view(np.uint8).reshape(rows, 4)
    values = data.astype(value_dtype).view(np.uint8).reshape(rows, -1)
    np.concatenate([header, values], axis=1).tofile(path)
    return path


@pytest.fixture
def vectors():  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(11)
    return torch.randn(23, 12, generator=generator), torch.randn(1000, 12, generator=generator)


def search(q_path: str, d_spec: str, out: str) -> tuple[torch.Tensor, torch.Tensor]:
    result = torch.load(compute_topk(q_path, d_spec, k=40, force_cpu=True, out_path=out, chunk_size=100))
    return result["scores"], result["indices"]


def test_all_formats_and_shards_give_identical_results(tmp_path, vectors) -> None:  # type: ignore[no-untyped-def]
    queries, docs = vectors
    q_path = str(tmp_path / "q.pt")
    torch.save(queries, q_path)
    torch.save(docs, tmp_path / "docs.pt")
    reference = search(q_path, str(tmp_path / "docs.pt"), str(tmp_path / "ref.pt"))

    np.save(tmp_path / "docs.npy", docs.numpy())
    save_file({"embeddings": docs}, str(tmp_path / "docs.safetensors"))
    save_file({"embeddings": docs, "other": torch.randn(5, 12)}, str(tmp_path / "multi.safetensors"))
    write_vecs(str(tmp_path / "docs.fvecs"), docs.numpy(), "<f4")
    torch.save({"emb": docs, "ids": torch.arange(1000)}, tmp_path / "dict.pt")
    torch.save({"emb": docs, "other": torch.randn(5, 12)}, tmp_path / "named.pt")
    with h5py.File(tmp_path / "docs.hdf5", "w") as file:  # laid out as ann-benchmarks files are
        file.create_dataset("train", data=docs.numpy())
        file.create_dataset("neighbors", data=np.zeros((5, 3), dtype=np.int32))
    with h5py.File(tmp_path / "chunked.h5", "w") as file:
        file.create_dataset("group/emb", data=docs.numpy(), chunks=(64, 12), compression="gzip")
    pq.write_table(embedding_table(docs.numpy()), tmp_path / "docs.parquet", row_group_size=130)
    pq.write_table(embedding_table(docs.numpy(), fixed=False), tmp_path / "list.parquet", row_group_size=333)
    write_arrow(str(tmp_path / "stream.arrow"), embedding_table(docs.numpy(), fixed=False))
    write_arrow(str(tmp_path / "file.arrow"), embedding_table(docs.numpy()), stream=False, batch_rows=1000)
    shards = tmp_path / "shards"
    shards.mkdir()
    bounds = [0, 1, 90, 91, 400, 555, 999, 1000]  # 7 uneven shards, one of a single row
    writers = [
        lambda path, part: torch.save(part.clone(), path + ".pt"),
        lambda path, part: np.save(path + ".npy", part.numpy()),
        lambda path, part: save_file({"x": part.contiguous()}, path + ".safetensors"),
        lambda path, part: write_vecs(path + ".fvecs", part.numpy(), "<f4"),
        lambda path, part: h5py.File(path + ".h5", "w").create_dataset("x", data=part.numpy()).file.close(),
        lambda path, part: pq.write_table(embedding_table(part.numpy()), path + ".parquet", row_group_size=50),
        lambda path, part: write_arrow(path + ".arrow", embedding_table(part.numpy(), fixed=False), batch_rows=40),
    ]
    for index, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        writers[index % len(writers)](str(shards / f"emb_{index}"), docs[lo:hi])
    (shards / "README.txt").write_text("ignored")

    specs = {
        "npy": "docs.npy",
        "safetensors": "docs.safetensors",
        "safetensors:key": "multi.safetensors:embeddings",
        "fvecs": "docs.fvecs",
        "pt dict": "dict.pt",
        "pt:key": "named.pt:emb",
        "hdf5:dataset": "docs.hdf5:train",
        "hdf5 chunked, gzip": "chunked.h5:/group/emb",
        "hdf5, its one 2-D dataset": "chunked.h5",
        "parquet:column, fixed_size_list, 8 row groups": "docs.parquet:emb",
        "parquet, list, its one list<float> column": "list.parquet",
        "arrow stream, list, 11 record batches": "stream.arrow:emb",
        "arrow file, fixed_size_list, one batch": "file.arrow",
        "directory": "shards",
        "glob": "shards/emb_*",
    }
    for name, spec in specs.items():
        scores, indices = search(q_path, str(tmp_path / spec), str(tmp_path / f"{name.replace(':', '_')}.pt"))
        assert torch.equal(scores, reference[0]) and torch.equal(indices, reference[1]), name


def test_hdf5_is_read_directly_when_contiguous_else_sliced(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = np.random.default_rng(1).standard_normal((300, 8), dtype=np.float32)
    with h5py.File(tmp_path / "x.h5", "w") as file:
        file.create_dataset("plain", data=data)
        file.create_dataset("packed", data=data, chunks=(32, 8), compression="gzip")
    plain, packed = (
        open_source(str(tmp_path / "x.h5:plain"), "docs"),
        open_source(str(tmp_path / "x.h5:packed"), "docs"),
    )
    assert isinstance(plain, FileSource) and isinstance(packed, HDF5Source)
    for source in (plain, packed):
        out = torch.empty(300, 8)
        source.read_into(0, 300, out)
        assert torch.equal(out, torch.from_numpy(data))
        picked = torch.empty(3, 8)
        source.read_rows(torch.tensor([0, 150, 299]), picked)
        assert torch.equal(picked, torch.from_numpy(data[[0, 150, 299]]))


def test_hdf5_errors(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    bad = np.zeros((4, 3), dtype=np.float32)
    bad[2, 1] = np.nan
    with h5py.File(tmp_path / "x.h5", "w") as file:
        file.create_dataset("a", data=np.zeros((4, 3), dtype=np.float32))
        file.create_dataset("b", data=np.zeros((4, 3), dtype=np.float32))
        file.create_dataset("cube", data=np.zeros((2, 2, 2), dtype=np.float32))
        file.create_dataset("ints", data=np.zeros((2, 2), dtype=np.int64))
        file.create_dataset("nan", data=bad, chunks=(2, 3), compression="gzip")
    spec = str(tmp_path / "x.h5")
    for suffix, message in [
        ("", "holds 4 2-D datasets, expected exactly one; name one as FILE:DATASET"),
        (":missing", "no dataset named 'missing'; it holds a, b, cube, ints, nan"),
        (":cube", r"shape \(2, 2, 2\), expected 2-D"),
        (":ints", "dtype int64, expected float32 or float16"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            open_source(spec + suffix, "docs")
    with pytest.raises(InvalidInputError, match=r"x.h5:nan': row 2 holds NaN"):
        open_source(spec + ":nan", "docs").read_into(0, 4, torch.empty(4, 3))
    (tmp_path / "junk.h5").write_bytes(b"\x89HDF\r\n" + bytes(100))
    with pytest.raises(InvalidInputError, match="not a readable HDF5 file"):
        open_source(str(tmp_path / "junk.h5"), "docs")
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(InputFileError, match=r"reading HDF5 needs h5py: pip install 'tiny-knn\[hdf5\]'"):
        open_source(spec + ":a", "docs")


def test_shards_in_natural_order_with_global_rows(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for index in (10, 2, 1):
        torch.save(torch.full((index, 3), float(index)), tmp_path / f"emb_{index}.pt")
    source = open_source(str(tmp_path), "docs")
    assert isinstance(source, ShardedSource)
    assert [os.path.basename(shard.path) for shard in source.shards] == ["emb_1.pt", "emb_2.pt", "emb_10.pt"]
    out = torch.empty(13, 3)
    source.read_into(0, 13, out)
    assert out[:, 0].tolist() == [1.0, 2.0, 2.0] + [10.0] * 10
    picked = torch.empty(3, 3)
    source.read_rows(torch.tensor([0, 2, 12]), picked)
    assert picked[:, 0].tolist() == [1.0, 2.0, 10.0]


def test_a_bad_shard_is_named(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.save(torch.randn(4, 3), tmp_path / "a_1.pt")
    torch.save(torch.randn(4, 5), tmp_path / "a_2.pt")
    with pytest.raises(InvalidInputError, match=r"a_2\.pt'.*dim 5, expected 3"):
        open_source(str(tmp_path), "docs")
    bad = torch.randn(4, 3)
    bad[2, 1] = float("nan")
    torch.save(bad, tmp_path / "a_2.pt")
    source = open_source(str(tmp_path), "docs")
    with pytest.raises(InvalidInputError, match=r"a_2\.pt': row 2 holds NaN"):
        source.read_into(0, 8, torch.empty(8, 3))


def test_bvecs_bytes_become_floats(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = np.random.default_rng(0).integers(0, 256, size=(50, 16), dtype=np.uint8)
    source = open_source(write_vecs(str(tmp_path / "x.bvecs"), data, "u1"), "docs")
    out = torch.empty(50, 16)
    source.read_into(0, 50, out)
    assert torch.equal(out, torch.from_numpy(data).float())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: np.save(p + ".npy", np.zeros((3, 2))), r"dtype float64, expected float32 or float16"),
        (lambda p: np.save(p + ".npy", np.zeros((3, 2), dtype=np.int32)), "dtype int32"),
        (lambda p: np.save(p + ".npy", np.zeros(3, dtype=np.float32)), "expected 2-D"),
        (lambda p: Path(p + ".npy").write_bytes(b"\x93NUMPY garbage"), "not a readable .npy"),
        (lambda p: Path(p + ".safetensors").write_bytes(b"\xff" * 16), "not a readable .safetensors"),
        (lambda p: save_file({"a": torch.zeros(2, 2), "b": torch.zeros(2, 2)}, p + ".safetensors"), "2 2-D tensors"),
        (lambda p: save_file({"a": torch.zeros(2, 2)}, p + ".safetensors:b"), None),
        (lambda p: Path(p + ".fvecs").write_bytes(b"\x04\x00\x00\x00abc"), "not a whole number of rows"),
        (lambda p: torch.save({"a": torch.zeros(2, 2)}, p + ".pt:b"), None),
    ],
)
def test_format_errors(tmp_path, make, message) -> None:  # type: ignore[no-untyped-def]
    base = str(tmp_path / "x")
    make(base)
    [name] = os.listdir(tmp_path)
    spec = str(tmp_path / name)
    if message is None:  # a file was written under "x.ext:b": ask for the missing key of the real one
        os.rename(spec, spec.rsplit(":", 1)[0])
        spec, message = spec, "no tensor named 'b'"
    with pytest.raises(InvalidInputError, match=message):
        open_source(spec, "docs")


def test_empty_glob_and_folder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputFileError, match="matches no files"):
        open_source(str(tmp_path / "*.npy"), "docs")


def test_parquet_and_arrow_sources_and_their_ids(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Parquet is decoded a row group at a time; an Arrow file's record batches are read where they lie, all
    through one descriptor; ids may be a column of the same file."""
    data = np.random.default_rng(2).standard_normal((300, 8), dtype=np.float32)
    pq.write_table(embedding_table(data), tmp_path / "x.parquet", row_group_size=64)
    write_arrow(str(tmp_path / "x.arrow"), embedding_table(data), batch_rows=64)
    for spec, kind in (("x.parquet:emb", ParquetSource), ("x.arrow", ArrowSource)):
        source = open_source(str(tmp_path / spec), "docs")
        assert isinstance(source, kind) and (source.rows, source.dim, source.dtype) == (300, 8, torch.float32)
        assert source.files() == [str(tmp_path / spec.split(":")[0])]
        out = torch.empty(300, 8)
        for start, stop in ((0, 300), (60, 70), (63, 200), (299, 300)):  # across row groups and batches
            source.read_into(start, stop, out)
            assert torch.equal(out[: stop - start], torch.from_numpy(data[start:stop])), (spec, start, stop)
        picked = torch.empty(4, 8)
        source.read_rows(torch.tensor([0, 64, 65, 299]), picked)
        assert torch.equal(picked, torch.from_numpy(data[[0, 64, 65, 299]]))
    arrow = open_source(str(tmp_path / "x.arrow"), "docs")
    assert isinstance(arrow, ArrowSource) and len({shard._descriptor for shard in arrow.shards}) == 1  # type: ignore[attr-defined]
    queries = tmp_path / "q.npy"
    np.save(queries, data[:5])
    for spec in ("x.parquet", "x.arrow"):
        ids = str(tmp_path / f"{spec}:id")
        path = compute_topk(str(queries), str(tmp_path / spec), k=3, force_cpu=True, metric="l2", doc_ids=ids)
        result = torch.load(path)
        assert result["doc_ids"] == [f"doc{row}" for row in range(300)]
        assert result["indices"][:, 0].tolist() == [0, 1, 2, 3, 4]  # l2: each row's nearest doc is itself


def test_half_precision_parquet_equals_half_precision_npy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = np.random.default_rng(3).standard_normal((200, 6)).astype(np.float16)
    np.save(tmp_path / "d.npy", data)
    pq.write_table(embedding_table(data, fixed=False), tmp_path / "d.parquet", row_group_size=50)
    np.save(tmp_path / "q.npy", data[:7].astype(np.float32))
    assert open_source(str(tmp_path / "d.parquet"), "docs").dtype == torch.float16
    found = []
    for name in ("d.npy", "d.parquet"):
        path = compute_topk(
            str(tmp_path / "q.npy"), str(tmp_path / name), k=5, force_cpu=True, out_path=str(tmp_path / f"{name}.pt")
        )
        found.append(torch.load(path))
    assert torch.equal(found[0]["indices"], found[1]["indices"]) and torch.equal(found[0]["scores"], found[1]["scores"])


def test_parquet_and_arrow_errors(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    data = np.ones((200, 4), dtype=np.float32)
    two = embedding_table(data).append_column("other", pa.array(list(data), type=pa.list_(pa.float32())))
    pq.write_table(two, tmp_path / "two.parquet")
    ragged = pa.array([[1.0, 2.0, 3.0, 4.0]] * 5 + [[1.0, 2.0, 3.0]], type=pa.list_(pa.float32()))
    pq.write_table(pa.table({"emb": ragged}), tmp_path / "ragged.parquet", row_group_size=4)
    nulls = pa.array([[1.0, 2.0], None, [3.0, 4.0]], type=pa.list_(pa.float32()))
    pq.write_table(pa.table({"emb": nulls}), tmp_path / "nulls.parquet")
    holes = pa.array([[1.0, 2.0], [3.0, None]], type=pa.list_(pa.float32()))
    pq.write_table(pa.table({"emb": holes}), tmp_path / "holes.parquet")
    pq.write_table(pa.table({"emb": pa.array([[1.0, 2.0]], type=pa.list_(pa.float64()))}), tmp_path / "double.parquet")
    nan = data.copy()
    nan[150, 2] = np.nan
    write_arrow(str(tmp_path / "nan.arrow"), embedding_table(nan), batch_rows=64)
    write_arrow(str(tmp_path / "zstd.arrow"), embedding_table(data), compression="zstd")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1" + bytes(100))
    (tmp_path / "junk.arrow").write_bytes(b"ARROW1" + bytes(100))
    for spec, message in [
        ("two.parquet", r"holds 2 columns of float lists, expected exactly one; name one as FILE:COLUMN \(columns: id"),
        ("two.parquet:nope", "no column named 'nope'; it holds id, text, emb, other"),
        ("two.parquet:text", "column 'text' is string, expected a list<float> or fixed_size_list<float>"),
        ("double.parquet", r"column 'emb' is list<element: double>.*; cast it to float32"),
        ("ragged.parquet", "row 5 holds 3 values, expected 4 like the first row"),
        ("nulls.parquet", "row 1 is null; expected a list of floats in every row"),
        ("holes.parquet", "row 1 holds a null value"),
        ("zstd.arrow", "its record batches are compressed; expected an uncompressed Arrow IPC file"),
        ("junk.parquet", "not a readable parquet file"),
        ("junk.arrow", "not a readable Arrow IPC file"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            source = open_source(str(tmp_path / spec), "docs")
            source.read_into(0, source.rows, torch.empty(source.rows, source.dim))
    with pytest.raises(InvalidInputError, match=r"nan.arrow': row 150 holds NaN"):  # the file's row, not the batch's
        open_source(str(tmp_path / "nan.arrow"), "docs").read_into(0, 200, torch.empty(200, 4))
    with pytest.raises(InvalidInputError, match="no column named 'idx'"):
        compute_topk(str(tmp_path / "nan.arrow"), str(tmp_path / "two.parquet:emb"), k=1, force_cpu=True,
                     out_path=str(tmp_path / "r.pt"), doc_ids=str(tmp_path / "two.parquet:idx"))  # fmt: skip
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    for spec in ("two.parquet:emb", "nan.arrow"):
        with pytest.raises(InputFileError, match=r"needs pyarrow: pip install 'tiny-knn\[parquet\]'"):
            open_source(str(tmp_path / spec), "docs")
