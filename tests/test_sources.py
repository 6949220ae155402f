from __future__ import annotations

import os
import pickle

import pytest
import torch

from tiny_knn.errors import InputFileError, InvalidInputError
from tiny_knn.sources import check_compatible, open_source


def test_opens_memory_mapped_and_reads_row_ranges(save) -> None:  # type: ignore[no-untyped-def]
    data = torch.randn(100, 7)
    source = open_source(save(data), "docs")
    assert (source.rows, source.dim, source.dtype) == (100, 7, torch.float32)
    out = torch.empty(30, 7)
    source.read_into(10, 40, out)
    assert torch.equal(out, data[10:40])
    source.read_rows(torch.tensor([3, 99, 0]), out)
    assert torch.equal(out[:3], data[[3, 99, 0]])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_is_converted_exactly(save, dtype) -> None:  # type: ignore[no-untyped-def]
    data = torch.randn(20, 5).to(dtype)
    out = torch.empty(20, 5)
    open_source(save(data), "queries").read_into(0, 20, out)
    assert torch.equal(out, data.float())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rows_are_named(save, bad) -> None:  # type: ignore[no-untyped-def]
    data = torch.randn(50, 4)
    data[37, 2] = bad
    source = open_source(save(data), "docs")
    with pytest.raises(InvalidInputError, match=r"row 37 holds NaN or Inf"):
        source.read_into(32, 50, torch.empty(18, 4))


def test_huge_finite_values_are_not_mistaken_for_inf(save) -> None:  # type: ignore[no-untyped-def]
    data = torch.full((10, 4), 3e38)  # their float32 sum overflows, but every value is finite
    out = torch.empty(10, 4)
    open_source(save(data), "docs").read_into(0, 10, out)
    assert torch.equal(out, data)


def test_the_loader_never_runs_pickled_code(tmp_path) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (open, (str(marker), "w"))

    # A zip archive like torch.save's, holding a malicious pickle.
    path = str(tmp_path / "evil.pt")
    torch.save({"x": 1}, path)
    import zipfile

    with zipfile.ZipFile(path, "a") as archive:
        names = [n for n in archive.namelist() if n.endswith("data.pkl")]
    evil = str(tmp_path / "evil2.pt")
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as target:
        for item in source.infolist():
            payload = pickle.dumps(Evil()) if item.filename in names else source.read(item.filename)
            target.writestr(item, payload)
    with pytest.raises(InvalidInputError, match="refused without running them"):
        open_source(evil, "queries")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"a": torch.randn(2, 2), "b": torch.randn(3, 2)}, "holds a dict with 2 2-D tensors, expected exactly one"),
        ([torch.randn(2, 2)], "holds a list, expected a single tensor"),
        (torch.randn(5), r"shape \(5,\), expected 2-D"),
        (torch.randn(2, 3, 4), r"shape \(2, 3, 4\), expected 2-D"),
        (torch.arange(6).reshape(2, 3), "dtype int64, expected float32, float16 or bfloat16"),
        (torch.randn(2, 3, dtype=torch.complex64), "dtype complex64"),
        (torch.randn(2, 3, dtype=torch.float64), r"dtype float64.*convert with \.float\(\)"),
        (torch.randn(0, 3), "at least one row"),
        (torch.randn(3, 0), "at least one row"),
    ],
)
def test_refuses_what_it_cannot_search(save, obj, message) -> None:  # type: ignore[no-untyped-def]
    path = save(obj)
    with pytest.raises(InvalidInputError, match=message) as caught:
        open_source(path, "docs")
    assert path in str(caught.value) and isinstance(caught.value, ValueError)


def test_a_key_on_a_file_of_one_tensor_says_there_is_no_dict(save) -> None:  # type: ignore[no-untyped-def]
    path = save(torch.randn(4, 3))
    with pytest.raises(InvalidInputError, match=r"holds one tensor, not a dict, so no tensor named 'emb'; drop ':emb'"):
        open_source(f"{path}:emb", "queries")


def test_a_file_of_one_tensor_is_not_a_result(save) -> None:  # type: ignore[no-untyped-def]
    from tiny_knn.results import open_result

    for obj, what in ((torch.randn(4, 3), "a single tensor"), ({"x": torch.randn(2, 2)}, "a dict without 'indices'")):
        with pytest.raises(InvalidInputError, match=f"holds {what}, not a tiny-knn result"):
            open_result(save(obj), "merge part")


def test_refuses_missing_directory_truncated_and_junk(tmp_path, save) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputFileError, match="no such file"):
        open_source(str(tmp_path / "missing.pt"), "docs")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(InputFileError, match=r"holds no \.pt"):
        open_source(str(tmp_path / "nothing"), "docs")
    good = save(torch.randn(100, 8))
    truncated = str(tmp_path / "truncated.pt")
    with open(good, "rb") as whole, open(truncated, "wb") as part:
        part.write(whole.read()[: os.path.getsize(good) // 2])
    for path in (truncated, str(tmp_path / "junk.pt"), str(tmp_path / "empty.pt")):
        if path.endswith("junk.pt"):
            (tmp_path / "junk.pt").write_bytes(os.urandom(500))
        if path.endswith("empty.pt"):
            (tmp_path / "empty.pt").write_bytes(b"")
        with pytest.raises(InvalidInputError):
            open_source(path, "docs")


def test_dim_mismatch_names_both_dims(save) -> None:  # type: ignore[no-untyped-def]
    queries = open_source(save(torch.randn(2, 3), "q.pt"), "queries")
    docs = open_source(save(torch.randn(2, 5), "d.pt"), "docs")
    with pytest.raises(InvalidInputError, match=r"dim 3.*dim 5"):
        check_compatible(queries, docs)


def test_an_archive_claiming_several_disks_is_one_clean_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """zipfile.is_zipfile raises (BadZipFile) on a ZIP64 locator that claims two disks (found by hypothesis)."""
    import io
    import struct

    from tiny_knn.errors import InvalidInputError
    from tiny_knn.sources import open_source

    buffer = io.BytesIO()
    torch.save(torch.randn(3, 4), buffer)
    data = buffer.getvalue()
    end = data.rfind(b"PK\x05\x06")
    (tmp_path / "q.pt").write_bytes(data[:end] + struct.pack("<4sLQL", b"PK\x06\x07", 0, 0, 2) + data[end:])
    with pytest.raises(InvalidInputError, match="not a PyTorch zip archive"):
        open_source(str(tmp_path / "q.pt"), "queries")
