"""Readers fed random, truncated and corrupted bytes: a clean TinyKnnError or a good read, never anything
else (no other exception, no crash, no hang)."""

from __future__ import annotations

import io
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes

from tiny_knn import TinyKnnError
from tiny_knn.kernel import KERNEL
from tiny_knn.refine import _exact_scores
from tiny_knn.sources import FileSource, open_source

ROWS, DIM = 6, 5
SECONDS_PER_READ = 10


def _pt() -> bytes:
    buffer = io.BytesIO()
    torch.save(torch.randn(ROWS, DIM), buffer)
    return buffer.getvalue()


def _npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(0).standard_normal((ROWS, DIM), dtype=np.float32))
    return buffer.getvalue()


def _vecs(value_dtype: str) -> Callable[[], bytes]:
    def build() -> bytes:
        header = np.full((ROWS, 1), DIM, dtype="<i4").view(np.uint8)
        values = np.random.default_rng(0).integers(0, 255, (ROWS, DIM)).astype(value_dtype).view(np.uint8)
        return np.concatenate([header, values], axis=1).tobytes()

    return build


def _h5() -> bytes:
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as file:
        file.create_dataset("x", data=np.random.default_rng(0).standard_normal((ROWS, DIM), dtype=np.float32))
    return buffer.getvalue()


VALID: dict[str, Callable[[], bytes]] = {
    ".h5": _h5,
    ".pt": _pt,
    ".npy": _npy,
    ".safetensors": lambda: safetensors_bytes({"x": torch.randn(ROWS, DIM)}),
    ".fvecs": _vecs("<f4"),
    ".bvecs": _vecs("u1"),
}


@contextmanager
def no_hang(seconds: int) -> Iterator[None]:
    def alarm(signum: int, frame: object) -> None:
        raise TimeoutError(f"a reader hung for {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def read_everything(path: str) -> None:
    """Opens the file and reads every row, as a search would."""
    source = open_source(path, "docs")
    out = torch.empty((source.rows, source.dim), dtype=torch.float32)
    for start in range(0, source.rows, 4):
        source.read_into(start, min(start + 4, source.rows), out[start:])
    source.read_rows(torch.arange(0, source.rows, 3), out)


@st.composite
def damaged(draw: st.DrawFn) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from(sorted(VALID)))
    data = bytearray(VALID[suffix]())
    how = draw(st.sampled_from(["truncate", "flip", "random", "splice"]))
    if how == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] = draw(st.integers(0, 255))
    elif how == "random":
        data = bytearray(draw(st.binary(min_size=0, max_size=600)))
    else:  # a valid head followed by garbage
        data = data[: draw(st.integers(0, len(data)))] + draw(st.binary(min_size=1, max_size=200))
    return suffix, bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=damaged())
def test_damaged_files_fail_cleanly(tmp_path, case) -> None:  # type: ignore[no-untyped-def]
    suffix, data = case
    path = os.path.join(tmp_path, "docs" + suffix)
    with open(path, "wb") as stream:
        stream.write(data)
    with no_hang(SECONDS_PER_READ), suppress(TinyKnnError):
        read_everything(path)


@pytest.mark.parametrize("suffix", sorted(VALID))
def test_the_undamaged_files_read(tmp_path, suffix) -> None:  # type: ignore[no-untyped-def]
    path = os.path.join(tmp_path, "docs" + suffix)
    with open(path, "wb") as stream:
        stream.write(VALID[suffix]())
    read_everything(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.sampled_from(sorted(VALID)), kept=st.floats(0.0, 0.999), mapped_first=st.booleans())
def test_files_cut_after_they_are_opened_fail_cleanly(tmp_path, suffix, kept, mapped_first) -> None:  # type: ignore[no-untyped-def]
    """A file cut (another process truncating it) after tiny-knn opened it: every read, the C kernel's reads
    through the file's mapping included, is a clean TinyKnnError or good data, never a signal."""
    data = VALID[suffix]()
    path = os.path.join(tmp_path, "docs" + suffix)
    with open(path, "wb") as stream:
        stream.write(data)
    source = open_source(path, "docs")
    if mapped_first and isinstance(source, FileSource):
        source.mapped()
    os.truncate(path, int(len(data) * kept))
    with no_hang(SECONDS_PER_READ), suppress(TinyKnnError):
        out = torch.empty((source.rows, source.dim), dtype=torch.float32)
        source.read_into(0, source.rows, out)
    with no_hang(SECONDS_PER_READ), suppress(TinyKnnError):
        source.read_rows(torch.arange(source.rows), out)
    if isinstance(source, FileSource) and KERNEL is not None:
        with no_hang(SECONDS_PER_READ), suppress(TinyKnnError):
            _exact_scores(torch.ones(2, source.dim), source, torch.zeros(2, 3, dtype=torch.int64), squared=True)
