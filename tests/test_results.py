from __future__ import annotations

import os

import pytest
import torch

from tiny_knn import results
from tiny_knn.errors import OutputError


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


def test_check_output_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    results.check_output_path(str(tmp_path / "fine.pt"))
    with pytest.raises(OutputError, match="does not exist"):
        results.check_output_path(str(tmp_path / "missing" / "out.pt"))
    with pytest.raises(OutputError, match="is a directory"):
        results.check_output_path(str(tmp_path))


def test_unwritable_folder_is_refused(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Root ignores permissions, so the refusal is provoked through what os.access reports.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(OutputError, match="is not writable"):
        results.check_output_path(str(tmp_path / "out.pt"))
