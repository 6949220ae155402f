"""Every input format gives the same answer as the .pt file holding the same vectors."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tiny_knn import InputFileError, InvalidInputError, compute_topk
from tiny_knn.sources import FileSource, HDF5Source, ShardedSource, open_source


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
    shards = tmp_path / "shards"
    shards.mkdir()
    bounds = [0, 1, 90, 91, 400, 555, 999, 1000]  # 7 uneven shards, one of a single row
    writers = [
        lambda path, part: torch.save(part.clone(), path + ".pt"),
        lambda path, part: np.save(path + ".npy", part.numpy()),
        lambda path, part: save_file({"x": part.contiguous()}, path + ".safetensors"),
        lambda path, part: write_vecs(path + ".fvecs", part.numpy(), "<f4"),
        lambda path, part: h5py.File(path + ".h5", "w").create_dataset("x", data=part.numpy()).file.close(),
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
