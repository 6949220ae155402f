"""Reading: open embeddings on disk as a source of rows, without ever loading a file whole.

A source knows its shape and dtype and copies row ranges on demand into a caller's buffer, checking that
they are finite. Opening a file reads only its header, to find where its values lie (`Layout`); rows are
then read with `pread` into the caller's buffer, so resident memory does not grow with the file, and a file
that shrinks while it is read is a clean error (`InputChangedError`) where a memory map would kill the
process with SIGBUS. Formats: `.pt` (`torch.load(map_location="meta", weights_only=True)`: no pickled code
ever runs, no data is loaded; a tensor, or a dict holding one 2-D tensor, or `file.pt:key`), `.npy`,
`.safetensors` (`file.safetensors:key` when it holds several tensors), `.fvecs` and `.bvecs`, and a directory
or glob of such shards, concatenated in natural sort order with global row numbers. HDF5 (`file.h5:dataset`,
needs h5py) is read the same way when its dataset is contiguous and uncompressed, else by slices through
h5py. Arrow IPC files (`file.arrow:column`, file or stream format, needs pyarrow) are read the same way too,
each record batch's values where they lie, when the column is a list of floats of one length; parquet
(`file.parquet:column`) is decoded a row group at a time. Readers know nothing of devices.
"""

from __future__ import annotations

import functools
import glob
import io
import itertools
import json
import mmap
import os
import pickle
import re
import stat
import threading
import warnings
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import InputChangedError, InputFileError, InvalidInputError, TinyKnnError, first_sentence

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HDF5_SUFFIXES = (".h5", ".hdf5")
SHARD_SUFFIXES = (".pt", ".pth", ".npy", ".safetensors", ".fvecs", ".bvecs", *HDF5_SUFFIXES, ".parquet", ".arrow")
GLOB_CHARS = "*?["  # a spec with one of these that names no path is a glob of shards
_SAFETENSORS_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64, "I64": torch.int64,
}  # fmt: skip
# How each dtype lies in a file (numpy has no bfloat16: its bits)
_STORED = {
    torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16, torch.uint8: np.uint8,
    torch.float64: np.float64, torch.int64: np.int64, torch.int32: np.int32,
}  # fmt: skip
# Rows of a parquet row group decoded at a time.
_PARQUET_BATCH_ROWS = 256
# The .fvecs family: each row is an int32 dim, then dim values of this dtype.
_VECS_DTYPES = {".fvecs": torch.float32, ".bvecs": torch.uint8, ".ivecs": torch.int32}


def import_pyarrow(label: str, error: type[TinyKnnError] = InputFileError) -> tuple[Any, Any]:
    """pyarrow and pyarrow.parquet (an optional extra), or `error`: "{label} needs pyarrow: pip install ..."."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise error(f"{label} needs pyarrow: pip install 'tiny-knn[parquet]'") from None
    return pa, pq


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: how dtypes are spelled in messages."""
    return str(dtype).removeprefix("torch.")


class Source(ABC):
    """Embeddings on disk: `rows` vectors of `dim` values, read in row ranges."""

    def __init__(self, path: str, role: str) -> None:
        self.path = path
        self.role = role  # "queries" or "docs", used in every message

    rows: int
    dim: int
    dtype: torch.dtype
    first_row = 0  # the global number of row 0 (a RowRange of a larger source starts further on)

    def label(self) -> str:
        return f"{self.role} file '{self.path}'"

    def files(self) -> list[str]:
        """The files this source reads (none for rows in memory)."""
        return []

    @property
    def nbytes(self) -> int:
        """Bytes of vector data, as stored."""
        return self.rows * self.dim * torch.empty((), dtype=self.dtype).element_size()

    @abstractmethod
    def read_into(self, start: int, stop: int, out: torch.Tensor, check: bool = True) -> None:
        """Copies rows [start, stop) into out[: stop - start], converting dtype; refuses NaN or Inf.

        `check=False` skips that check, for a caller that finds non-finite values another way (the CPU
        engine looks at the scores, which any NaN or Inf in a doc makes non-finite) and then reads again.

        Raises:
            InvalidInputError: a row holds NaN or Inf (the first such row is named).
        """

    @abstractmethod
    def read_rows(self, positions: torch.Tensor, out: torch.Tensor) -> None:
        """Copies the rows at `positions` (int64, ascending) into out[: len(positions)], converting dtype.

        Values are not checked here: every row is checked when the docs are streamed.
        """


class ArraySource(Source):
    """Rows in memory: a 2-D tensor (possibly strided), for `search()` on arrays."""

    def __init__(self, path: str, role: str, tensor: torch.Tensor) -> None:
        super().__init__(path, role)
        self.tensor = tensor
        self.rows, self.dim = int(tensor.shape[0]), int(tensor.shape[1])
        self.dtype = tensor.dtype

    def read_into(self, start: int, stop: int, out: torch.Tensor, check: bool = True) -> None:
        block = out[: stop - start]
        _convert(self.tensor[start:stop], block)
        if check:
            _check_finite(block, start, self.label())

    def read_rows(self, positions: torch.Tensor, out: torch.Tensor) -> None:
        out[: positions.numel()].copy_(self.tensor[positions])


def _convert(rows: torch.Tensor, block: torch.Tensor) -> None:
    """block[...] = rows, converting dtype. Runs on the engine's read-ahead thread, so it uses numpy where it
    can: numpy is single-threaded and does not compete with the matrix product for torch's thread pool."""
    if rows.dtype == torch.bfloat16 or block.dtype == torch.bfloat16:  # numpy has no bfloat16
        block.copy_(rows)
    else:
        np.copyto(block.numpy(), rows.numpy(), casting="same_kind")


@dataclass(frozen=True)
class Layout:
    """Where a file's values lie: element [r, c] of the (rows, dim) matrix is at byte
    offset + r * row_stride + c * col_stride, stored as `stored` (bfloat16 as its uint16 bits)."""

    offset: int
    rows: int
    dim: int
    row_stride: int
    col_stride: int
    stored: np.dtype
    dtype: torch.dtype

    @property
    def end(self) -> int:
        """One past the last byte of the values."""
        return self.offset + (self.rows - 1) * self.row_stride + (self.dim - 1) * self.col_stride + self.stored.itemsize

    @classmethod
    def row_major(cls, offset: int, rows: int, dim: int, dtype: torch.dtype) -> Layout:
        stored = np.dtype(_STORED[dtype])
        return cls(offset, rows, dim, dim * stored.itemsize, stored.itemsize, stored, dtype)


class FileSource(Source):
    """One file whose values lie at a known `Layout`, read with pread: a file that shrinks under the run is
    an InputChangedError, never a signal, and no page of it stays mapped."""

    def __init__(self, spec: str, role: str, path: str, layout: Layout, *, opened: FileSource | None = None) -> None:
        super().__init__(spec, role)
        self.file, self.layout = path, layout
        self.rows, self.dim, self.dtype = layout.rows, layout.dim, layout.dtype
        # Pieces of one file (an Arrow file's record batches) read through the first piece's descriptor.
        self._opened = opened
        self._descriptor: int = (
            opened._descriptor if opened else os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        )
        self.size = os.fstat(self._descriptor).st_size
        self._mapped: torch.Tensor | None = None
        if layout.end > self.size:
            raise InvalidInputError(
                f"{self.label()}: its values run past the end of the file ({self.size} bytes, expected at least "
                f"{layout.end}); truncated?"
            )

    def __del__(self) -> None:
        descriptor = getattr(self, "_descriptor", None)
        if descriptor is not None and self._opened is None:
            os.close(descriptor)

    def files(self) -> list[str]:
        return [self.file]

    def read_into(self, start: int, stop: int, out: torch.Tensor, check: bool = True) -> None:
        block = out[: stop - start]
        layout = self.layout
        if (
            layout.row_stride == layout.dim * layout.col_stride == layout.dim * layout.stored.itemsize
            and block.is_contiguous()
            and block.dtype == layout.dtype != torch.bfloat16
        ):  # the common case: straight into the caller's buffer
            self._pread(block.numpy().data.cast("B"), layout.offset + start * layout.row_stride)
        else:
            _convert(torch.from_numpy(self._values(start, stop)).view(layout.dtype), block)
        if check:
            _check_finite(block, start, self.label())

    def read_rows(self, positions: torch.Tensor, out: torch.Tensor) -> None:
        # One read per run of consecutive rows.
        where = positions.numpy()
        breaks = [0, *(np.flatnonzero(np.diff(where) != 1) + 1).tolist(), where.size]
        for first, last in itertools.pairwise(breaks):
            if last > first:
                row = int(where[first])
                self.read_into(row, row + last - first, out[first:], check=False)

    def mapped(self) -> torch.Tensor | None:
        """The float32 rows memory-mapped, for the C kernels' reads in place, which are guarded against the file
        shrinking (a call returns TK_INPUT_CHANGED, see `changed`); None unless float32 with contiguous rows."""
        layout = self.layout
        if layout.dtype != torch.float32 or layout.col_stride != 4 or layout.row_stride % 4:
            return None
        if self._mapped is None:
            try:  # the file this source opened, even if another has taken its name since
                whole = mmap.mmap(self._descriptor, layout.end, access=mmap.ACCESS_READ)
            except ValueError:  # "mmap length is greater than file size": it shrank since it was opened
                raise self.changed() from None
            rows = np.ndarray(
                (layout.rows, layout.dim), np.float32, whole, offset=layout.offset, strides=(layout.row_stride, 4)
            )
            self._mapped = _quietly_from_numpy(rows)
        return self._mapped

    def changed(self) -> InputChangedError:
        """The error to raise when the file was found shorter than when it was opened."""
        return changed_error(self.label(), os.fstat(self._descriptor).st_size, self.size)

    def _values(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop as stored (bfloat16 as uint16), read by one pread over their span (by one per
        column where the file is stored column by column)."""
        layout, count = self.layout, stop - start
        first = layout.offset + start * layout.row_stride
        if layout.col_stride <= layout.row_stride:
            return self._span(first, (count, layout.dim), (layout.row_stride, layout.col_stride))
        columns = [self._span(first + c * layout.col_stride, (count,), (layout.row_stride,)) for c in range(layout.dim)]
        return np.stack(columns, axis=1)

    def _span(self, offset: int, shape: tuple[int, ...], strides: tuple[int, ...]) -> np.ndarray:
        """The values of a strided array at `offset` (non-negative strides), read by one pread over its bytes."""
        itemsize = self.layout.stored.itemsize
        span = sum((size - 1) * stride for size, stride in zip(shape, strides, strict=True)) + itemsize
        raw = np.empty(span, np.uint8)
        self._pread(raw.data, offset)
        values: np.ndarray = np.ndarray(shape, self.layout.stored, buffer=raw, strides=strides)
        return values.view(np.int16) if self.layout.dtype == torch.bfloat16 else values

    def _pread(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            try:
                if hasattr(os, "preadv"):
                    count = os.preadv(self._descriptor, [view[done:]], offset + done)
                else:  # no preadv (older macOS): a copy
                    data = os.pread(self._descriptor, len(view) - done, offset + done)
                    view[done : done + len(data)] = data
                    count = len(data)
            except OSError as exc:
                raise InputFileError(f"{self.label()}: cannot be read: {exc.strerror or exc}") from None
            if count == 0:
                raise self.changed()
            done += count


def changed_error(label: str, size: int, was: int) -> InputChangedError:
    """The error for an input that changed while it was being read."""
    return InputChangedError(f"{label} changed while it was being read ({size} bytes, was {was}); nothing was written")


def read_failure(label: str, file: str, was: int, exc: BaseException) -> InputFileError:
    """The error for a library's failed read of `file` (h5py's, pyarrow's): InputChangedError if the file is no
    longer the `was` bytes it was when opened, else what the library said."""
    size = os.path.getsize(file) if os.path.exists(file) else 0
    if size != was:
        return changed_error(label, size, was)
    return InputFileError(f"{label}: cannot be read: {first_sentence(exc)}")


def _check_finite(block: torch.Tensor, start: int, label: str) -> None:
    """Raises InvalidInputError naming the first row of `block` (row `start` of its file) with NaN or Inf."""
    # NaN and Inf survive any sum, so one cheap pass suffices; only then look for the row (a sum of huge
    # finite values can overflow too, hence the second, exact check).
    if block.dtype == torch.bfloat16:  # numpy has no bfloat16: a value is not finite where its exponent is all ones
        suspicious = bool(((block.view(torch.int16).numpy() & 0x7F80) == 0x7F80).any())
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            suspicious = not np.isfinite(block.numpy().sum())
    if suspicious and not bool(torch.isfinite(block).all()):
        bad = int(torch.nonzero(~torch.isfinite(block).all(dim=1))[0, 0]) + start
        raise InvalidInputError(f"{label}: row {bad} holds NaN or Inf; expected finite values (clean or drop that row)")


class HDF5Source(Source):
    """A chunked or compressed HDF5 dataset, read by slices through h5py (which decompresses chunks, and reads
    with pread: a file that shrinks is an error from h5py, reported as InputChangedError)."""

    def __init__(self, path: str, role: str, file: str, dataset: Any) -> None:
        super().__init__(path, role)
        self.file = file
        self.size = os.path.getsize(file)
        self.dataset = dataset  # keeps its file open
        self.rows, self.dim = (int(size) for size in dataset.shape)
        self.dtype = torch.float16 if dataset.dtype == np.float16 else torch.float32

    def files(self) -> list[str]:
        return [self.file]

    def read_into(self, start: int, stop: int, out: torch.Tensor, check: bool = True) -> None:
        block = out[: stop - start]
        _convert(torch.from_numpy(self._read(slice(start, stop))), block)
        if check:
            _check_finite(block, start, self.label())

    def read_rows(self, positions: torch.Tensor, out: torch.Tensor) -> None:
        out[: positions.numel()].copy_(torch.from_numpy(self._read(positions.numpy())))

    def _read(self, where: Any) -> np.ndarray:
        try:
            values: np.ndarray = self.dataset[where]
        except Exception as exc:  # h5py reports a failed read as OSError, or worse
            raise read_failure(self.label(), self.file, self.size, exc) from None
        return values


class RowRange(Source):
    """Rows [start, stop) of another source, numbered globally from `start` (one process's share)."""

    def __init__(self, source: Source, start: int, stop: int) -> None:
        super().__init__(source.path, source.role)
        self.source = source
        self.first_row = source.first_row + start
        self._start = start
        self.rows, self.dim, self.dtype = stop - start, source.dim, source.dtype

    def label(self) -> str:
        return self.source.label()

    def files(self) -> list[str]:
        return self.source.files()

    def read_into(self, start: int, stop: int, out: torch.Tensor, check: bool = True) -> None:
        self.source.read_into(self._start + start, self._start + stop, out, check)

    def read_rows(self, positions: torch.Tensor, out: torch.Tensor) -> None:
        self.source.read_rows(positions + self._start, out)


class ShardedSource(Source):
    """Several files of the same dim, concatenated: global row r lives in the shard whose range holds it."""

    def __init__(self, path: str, role: str, shards: list[Source]) -> None:
        super().__init__(path, role)
        self.shards = shards
        self.dim, self.dtype = shards[0].dim, shards[0].dtype
        self.offsets = [0]
        for shard in shards:
            if shard.dim != self.dim:
                raise InvalidInputError(
                    f"{shard.label()}: dim {shard.dim}, expected {self.dim} like the first shard '{shards[0].path}'"
                )
            self.offsets.append(self.offsets[-1] + shard.rows)
        self.rows = self.offsets[-1]

    def label(self) -> str:
        return f"{self.role} shards '{self.path}'"

    def files(self) -> list[str]:
        return [name for shard in self.shards for name in shard.files()]

    def _overlaps(self, start: int, stop: int) -> list[tuple[Source, int, int, int]]:
        """(shard, local start, local stop, offset in the caller's block) for each shard meeting [start, stop)."""
        pieces = []
        for shard, first in zip(self.shards, self.offsets[:-1], strict=True):
            lo, hi = max(start, first), min(stop, first + shard.rows)
            if lo < hi:
                pieces.append((shard, lo - first, hi - first, lo - start))
        return pieces

    def read_into(self, start: int, stop: int, out: torch.Tensor, check: bool = True) -> None:
        for shard, lo, hi, at in self._overlaps(start, stop):
            shard.read_into(lo, hi, out[at:], check)

    def read_rows(self, positions: torch.Tensor, out: torch.Tensor) -> None:
        owner = torch.bucketize(positions, torch.tensor(self.offsets[1:]), right=True)
        for index, shard in enumerate(self.shards):
            mine = torch.nonzero(owner == index).flatten()
            if mine.numel():
                part = torch.empty((mine.numel(), self.dim), dtype=out.dtype)
                shard.read_rows(positions[mine] - self.offsets[index], part)
                out[mine] = part


class ParquetSource(Source):
    """A list<float> or fixed_size_list<float> column of a parquet file, decoded a row group at a time (in small
    batches, into an array of its own). The last group decoded is kept for the next read (the engine reads rows
    in order), so memory is the budget plus one row group's values."""

    def __init__(self, spec: str, role: str, path: str, parquet: Any, column: str, dtype: torch.dtype) -> None:
        super().__init__(spec, role)
        self.file, self.size = path, os.path.getsize(path)
        self._parquet, self._column = parquet, column
        metadata = parquet.metadata
        self._starts = np.cumsum([0] + [metadata.row_group(group).num_rows for group in range(metadata.num_row_groups)])
        self.rows, self.dtype = int(metadata.num_rows), dtype
        self._kept: tuple[int, np.ndarray] | None = None
        self._lock = threading.Lock()  # the engine's read-ahead thread and the main thread share the file

    def files(self) -> list[str]:
        return [self.file]

    def read_into(self, start: int, stop: int, out: torch.Tensor, check: bool = True) -> None:
        block = out[: stop - start]
        for group in range(int(np.searchsorted(self._starts, start, side="right")) - 1, len(self._starts) - 1):
            first, last = int(self._starts[group]), int(self._starts[group + 1])
            if first >= stop:
                break
            lo, hi = max(start, first), min(stop, last)
            if hi > lo:
                _convert(torch.from_numpy(self._group(group)[lo - first : hi - first]), block[lo - start : hi - start])
        if check:
            _check_finite(block, start, self.label())

    def read_rows(self, positions: torch.Tensor, out: torch.Tensor) -> None:
        where = positions.numpy()
        groups = np.searchsorted(self._starts, where, side="right") - 1
        for group in np.unique(groups).tolist():
            mine = np.flatnonzero(groups == group)
            rows = self._group(group)[where[mine] - int(self._starts[group])]
            out[torch.from_numpy(mine)] = torch.from_numpy(rows).to(out.dtype)

    def first_values(self) -> np.ndarray:
        """The values of the first row group that has rows (kept for the first read)."""
        sizes = np.diff(self._starts)
        return self._group(int(np.flatnonzero(sizes)[0]))

    def _group(self, group: int) -> np.ndarray:
        """Row group `group`'s values, (rows, dim) as stored."""
        with self._lock:
            if self._kept is None or self._kept[0] != group:
                self._kept = None  # the last group's memory goes before the next one's comes
                first, last = int(self._starts[group]), int(self._starts[group + 1])
                values = np.empty((last - first, max(self.dim, 0)), dtype=_STORED[self.dtype])
                at = first
                try:
                    # Decoded in small batches into an array of our own, on one thread: pyarrow then allocates
                    # little at a time (a whole group decoded at once cost 40 MB more at 4 MB row groups).
                    for batch in self._parquet.iter_batches(
                        batch_size=_PARQUET_BATCH_ROWS, row_groups=[group], columns=[self._column], use_threads=False
                    ):
                        piece = _list_values(batch.column(0), self.dim, self.label(), at)
                        if self.dim < 0:  # the first look, for the dim of a list<float> column
                            self.dim = piece.shape[1]
                            values = np.empty((last - first, self.dim), dtype=piece.dtype)
                        values[at - first : at - first + len(piece)] = piece
                        at += len(piece)
                except InvalidInputError:
                    raise
                except Exception as exc:  # pyarrow reports a failed read as several kinds of error
                    raise read_failure(self.label(), self.file, self.size, exc) from None
                self._kept = (group, values)
            return self._kept[1]


class ArrowSource(ShardedSource):
    """A column of an Arrow IPC file whose record batches each hold their rows' values contiguous (see
    _open_arrow): each batch is read with pread where its values lie, like a file of its own, all through one
    descriptor. Nothing is decoded or copied on the way to the caller's buffer."""

    def __init__(self, spec: str, role: str, path: str, layouts: list[Layout]) -> None:
        first = FileSource(spec, role, path, layouts[0])
        pieces = [FileSource(spec, role, path, layout, opened=first) for layout in layouts[1:]]
        super().__init__(spec, role, [first, *pieces])
        self.file = path

    def label(self) -> str:
        return f"{self.role} file '{self.path}'"

    def files(self) -> list[str]:
        return [self.file]

    def read_into(self, start: int, stop: int, out: torch.Tensor, check: bool = True) -> None:
        super().read_into(start, stop, out, check=False)
        if check:  # here, so that a bad row is named by its row in the file, not in its batch
            _check_finite(out[: stop - start], start, self.label())


def open_source(spec: str | os.PathLike[str], role: str) -> Source:
    """Opens a file, `file:key`, directory or glob of embeddings, after every cheap check (headers only).

    Raises:
        InputFileError: a file is missing or unreadable, or a directory or glob holds no embeddings.
        InvalidInputError: a file is corrupt, not a tensor, not 2-D, not float, or empty.
    """
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        files = [os.path.join(spec, name) for name in os.listdir(spec) if name.lower().endswith(SHARD_SUFFIXES)]
        if not files:
            raise InputFileError(
                f"{role} directory '{spec}': holds no {', '.join(SHARD_SUFFIXES)} files; expected embedding shards"
            )
        return _sharded(spec, role, files)
    if is_pattern(spec):
        files = [path for path in glob.glob(spec) if os.path.isfile(path)]
        if not files:
            raise InputFileError(f"{role} pattern '{spec}': matches no files")
        return _sharded(spec, role, files)
    path, key = split_key(spec)
    return _open_file(spec, path, key, role)


def is_pattern(spec: str) -> bool:
    """Whether a spec is read as a glob of shards: it has a wildcard and names no existing path."""
    return any(char in spec for char in GLOB_CHARS) and not os.path.exists(spec)


def split_key(spec: str) -> tuple[str, str | None]:
    """`file:key` as (file, key) where `file` exists and `file:key` does not; any other spec as (spec, None)."""
    if not os.path.exists(spec) and ":" in spec and os.path.isfile(spec.rsplit(":", 1)[0]):
        path, key = spec.rsplit(":", 1)
        return path, key
    return spec, None


def open_array(path: str, key: str | None, role: str, dtypes: tuple[torch.dtype, ...]) -> Source:
    """A 2-D array of one of `dtypes` that is not embeddings (a result's indices or scores): `path` is a
    .npy, .pt (`key` names a tensor of its dict), .ivecs or .fvecs file, read like any source (headers only,
    then pread). Its values are the caller's to check: read it with `check=False`.

    Raises:
        InputFileError: the file is missing or unreadable.
        InvalidInputError: it is corrupt, lacks `key`, or holds an array of another shape or dtype.
    """
    return _open_file(path if key is None else f"{path}:{key}", path, key, role, dtypes)


def _open_file(
    spec: str, path: str, key: str | None, role: str, dtypes: tuple[torch.dtype, ...] | None = None
) -> Source:
    label = f"{role} file '{spec}'"
    _check_regular_file(path, label)
    suffix = os.path.splitext(path)[1].lower()
    if suffix in HDF5_SUFFIXES:
        return _open_hdf5(spec, path, key, role, label)
    if suffix == ".parquet":
        return _open_parquet(spec, path, key, role, label)
    if suffix == ".arrow":
        return _open_arrow(spec, path, key, role, label)
    allowed: tuple[torch.dtype, ...] = SUPPORTED_DTYPES if dtypes is None else dtypes
    if suffix == ".npy":
        found = _npy_values(path, label, allowed)
    elif suffix == ".safetensors":
        found = _safetensors_values(path, key, label)
    elif suffix in _VECS_DTYPES:
        found = _vecs_values(path, label, suffix)
        if dtypes is None:  # bytes of .bvecs become floats as they are read
            allowed = (*SUPPORTED_DTYPES, torch.uint8)
    else:
        found = _pt_values(path, key, label)
    _check_matrix(found.shape, found.dtype, label, allowed)
    if found.mapped is not None:  # torch too old to say where a .pt file's values lie
        return ArraySource(spec, role, found.mapped)
    rows, dim = found.shape
    row_stride, col_stride = found.strides
    layout = Layout(found.offset, rows, dim, row_stride, col_stride, np.dtype(_STORED[found.dtype]), found.dtype)
    return FileSource(spec, role, path, layout)


def _sharded(spec: str, role: str, files: list[str]) -> Source:
    ordered = sorted(files, key=_natural_key)
    return ShardedSource(spec, role, [_open_file(f, f, None, role) for f in ordered])


def _natural_key(path: str) -> list[object]:
    """emb_2 before emb_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", os.path.basename(path))]


@dataclass(frozen=True)
class _Values:
    """What a file's header says of the tensor in it: shape, dtype, and where its values lie (byte offset and
    byte strides); or, for .pt files under torch < 2.5, the tensor memory-mapped (`mapped`)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = 0
    strides: tuple[int, ...] = ()
    mapped: torch.Tensor | None = None

    @classmethod
    def row_major(cls, shape: tuple[int, ...], dtype: torch.dtype, offset: int) -> _Values:
        itemsize = torch.empty((), dtype=dtype).element_size()
        strides = tuple(int(np.prod(shape[i + 1 :], dtype=np.int64)) * itemsize for i in range(len(shape)))
        return cls(shape, dtype, offset, strides)


def _check_regular_file(path: str, label: str) -> None:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise InputFileError(f"{label}: no such file") from None
    except OSError as exc:
        raise InputFileError(f"{label}: cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(status.st_mode):
        raise InputFileError(f"{label}: is a directory, expected a .pt file holding a 2-D tensor")
    if not stat.S_ISREG(status.st_mode):
        raise InputFileError(f"{label}: is not a regular file (a FIFO, device or socket); expected embeddings on disk")
    if not os.access(path, os.R_OK):
        raise InputFileError(f"{label}: permission denied")
    if status.st_size == 0:
        raise InvalidInputError(f"{label}: the file is empty; expected embeddings")


def _check_matrix(shape: tuple[int, ...], dtype: torch.dtype, label: str, allowed: tuple[torch.dtype, ...]) -> None:
    """Raises InvalidInputError unless the tensor is 2-D, of an allowed dtype, with rows and columns."""
    if len(shape) != 2:
        raise InvalidInputError(
            f"{label}: tensor has shape {shape}, expected 2-D (rows, dim)"
            + ("; reshape it with .reshape(-1, dim)" if len(shape) > 0 else "")
        )
    if dtype not in allowed:
        hint = " (convert with .float())" if dtype.is_floating_point and allowed == SUPPORTED_DTYPES else ""
        raise InvalidInputError(f"{label}: dtype {dtype_name(dtype)}, expected {_one_of(allowed)}{hint}")
    if 0 in shape:
        raise InvalidInputError(f"{label}: tensor has shape {shape}, expected at least one row and column")


def _one_of(dtypes: tuple[torch.dtype, ...]) -> str:
    """'float32, float16 or bfloat16'."""
    names = [dtype_name(dtype) for dtype in dtypes]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _pick_tensor(loaded: object, key: str | None, label: str) -> torch.Tensor:
    """A .pt file's tensor: the object itself, the one 2-D tensor of a dict, or dict[key]."""
    if isinstance(loaded, torch.Tensor) and key is None:
        return loaded
    if isinstance(loaded, dict):
        if key is not None:
            if key not in loaded or not isinstance(loaded[key], torch.Tensor):
                raise InvalidInputError(f"{label}: no tensor named {key!r}; it holds {_keys(loaded)}")
            chosen: torch.Tensor = loaded[key]
            return chosen
        matrices = [value for value in loaded.values() if isinstance(value, torch.Tensor) and value.dim() == 2]
        if len(matrices) == 1:
            return matrices[0]
        raise InvalidInputError(
            f"{label}: holds a dict with {len(matrices)} 2-D tensors, expected exactly one; "
            f"name one as FILE:KEY (keys: {_keys(loaded)})"
        )
    if isinstance(loaded, torch.Tensor):  # and a key was given
        raise InvalidInputError(f"{label}: holds one tensor, not a dict, so no tensor named {key!r}; drop ':{key}'")
    what = type(loaded).__name__
    raise InvalidInputError(f"{label}: holds a {what}, expected a single tensor saved with torch.save(tensor, path)")


def _keys(mapping: Mapping[Any, object]) -> str:
    names = [str(name) for name in mapping]
    return ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")


def _quietly_from_numpy(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only memory maps: tiny-knn never writes to them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _npy_values(path: str, label: str, allowed: tuple[torch.dtype, ...]) -> _Values:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # the header only: no value is read
    except Exception as exc:  # a damaged header makes numpy raise anything (SyntaxError, TokenError, ...)
        raise InvalidInputError(
            f"{label}: not a readable .npy file (truncated or corrupt?): {first_sentence(exc)}"
        ) from None
    stored = [dtype for dtype in allowed if dtype != torch.bfloat16]  # numpy has no bfloat16
    dtype = next((dtype for dtype in stored if array.dtype == _STORED[dtype]), None)
    if dtype is None:
        hint = " (convert with .astype(np.float32))" if array.dtype.kind == "f" and torch.float32 in stored else ""
        raise InvalidInputError(f"{label}: dtype {array.dtype}, expected {_one_of(tuple(stored))}{hint}")
    offset = array.offset if isinstance(array, np.memmap) else 0
    return _Values(tuple(array.shape), dtype, offset, tuple(array.strides))


def _safetensors_values(path: str, key: str | None, label: str) -> _Values:
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as stream:
            header_length = int.from_bytes(stream.read(8), "little")
            if not 0 < header_length <= size - 8:
                raise ValueError("bad header length")
            header = json.loads(stream.read(header_length))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{label}: not a readable .safetensors file (truncated or corrupt?): {exc}") from None
    if not isinstance(header, dict):
        raise InvalidInputError(f"{label}: not a readable .safetensors file: its header is not a JSON object")
    tensors = {name: info for name, info in header.items() if name != "__metadata__" and isinstance(info, dict)}
    if key is None:
        matrices = [name for name, info in tensors.items() if len(info.get("shape") or []) == 2]
        if len(matrices) != 1:
            raise InvalidInputError(
                f"{label}: holds {len(matrices)} 2-D tensors, expected exactly one; name one as FILE:KEY "
                f"(keys: {_keys(tensors)})"
            )
        key = matrices[0]
    if key not in tensors:
        raise InvalidInputError(f"{label}: no tensor named {key!r}; it holds {_keys(tensors)}")
    info = tensors[key]
    if info.get("dtype") not in _SAFETENSORS_DTYPES:
        raise InvalidInputError(f"{label}: tensor {key!r} has dtype {info.get('dtype')}, expected F32, F16 or BF16")
    try:
        shape = tuple(int(size) for size in info["shape"])
        start, stop = (int(offset) for offset in info["data_offsets"])
        if min((*shape, start, stop)) < 0:
            raise ValueError("negative size or offset")
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"{label}: tensor {key!r} has a malformed header entry ({exc!r}); corrupt file?"
        ) from None
    dtype = _SAFETENSORS_DTYPES[info["dtype"]]
    count = int(np.prod(shape)) if shape else 1
    if 8 + header_length + stop > size or stop - start != count * np.dtype(_STORED[dtype]).itemsize:
        raise InvalidInputError(f"{label}: tensor {key!r} runs past the end of the file (truncated?)")
    return _Values.row_major(shape, dtype, 8 + header_length + start)


def _open_hdf5(spec: str, path: str, key: str | None, role: str, label: str) -> Source:
    """An HDF5 dataset (`file.h5:name`, or the file's only 2-D dataset): read with pread like the other formats
    when it is stored contiguous and uncompressed (as ann-benchmarks files are), else by slices through h5py."""
    try:
        import h5py
    except ImportError:
        raise InputFileError(f"{label}: reading HDF5 needs h5py: pip install 'tiny-knn[hdf5]'") from None
    try:
        handle = h5py.File(path, "r")
    except Exception as exc:  # h5py reports a damaged file as OSError, or worse
        raise InvalidInputError(
            f"{label}: not a readable HDF5 file (truncated or corrupt?): {first_sentence(exc)}"
        ) from None
    try:
        names: list[str] = []
        handle.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
        if key is None:
            matrices = [name for name in names if len(handle[name].shape) == 2]
            if len(matrices) != 1:
                raise InvalidInputError(
                    f"{label}: holds {len(matrices)} 2-D datasets, expected exactly one; name one as FILE:DATASET "
                    f"(datasets: {', '.join(names[:10]) or 'none'})"
                )
            key = matrices[0]
        item = handle.get(key)
        if not isinstance(item, h5py.Dataset):
            raise InvalidInputError(f"{label}: no dataset named {key!r}; it holds {', '.join(names[:10]) or 'none'}")
        _check_array(item.shape, item.dtype, label)
        offset = item.id.get_offset()
        if item.chunks is None and item.compression is None and offset is not None:
            dtype = torch.float32 if item.dtype == np.float32 else torch.float16
            layout = Layout.row_major(int(offset), int(item.shape[0]), int(item.shape[1]), dtype)
            handle.close()
            return FileSource(spec, role, path, layout)
        return HDF5Source(spec, role, path, item)
    except InvalidInputError:
        handle.close()
        raise
    except Exception as exc:  # a damaged file can fail anywhere inside h5py
        handle.close()
        raise InvalidInputError(
            f"{label}: not a readable HDF5 file (truncated or corrupt?): {first_sentence(exc)}"
        ) from None


def _open_parquet(spec: str, path: str, key: str | None, role: str, label: str) -> Source:
    """A parquet file's column of embeddings (`file.parquet:column`, or its only list-of-floats column)."""
    _, pq = import_pyarrow(f"{label}: reading parquet")
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
    except Exception as exc:  # pyarrow reports a damaged file as several kinds of error
        raise InvalidInputError(
            f"{label}: not a readable parquet file (truncated or corrupt?): {first_sentence(exc)}"
        ) from None
    column, dtype, dim = _embedding_column(schema, key, label)
    source = ParquetSource(spec, role, path, parquet, column, dtype)
    source.dim = -1 if dim is None else dim  # -1: the first row's length, which every row must share
    if dim is None and source.rows:
        source.dim = int(source.first_values().shape[1])
    _check_matrix((source.rows, max(source.dim, 0)), dtype, label, SUPPORTED_DTYPES)
    return source


def _open_arrow(spec: str, path: str, key: str | None, role: str, label: str) -> Source:
    """An Arrow IPC file's column of embeddings (the file or the stream format, which Hugging Face datasets caches
    in): its record batches are found through a memory map of the file, and each batch's values, which lie
    uncompressed and contiguous in the file when every row has the same length, become a Layout."""
    pa, _ = import_pyarrow(f"{label}: reading Arrow")
    layouts: list[Layout] = []
    try:
        with pa.memory_map(path) as mapped:
            whole = mapped.read_buffer()  # the whole file, mapped: where each batch's values lie is their offset
            mapped.seek(0)
            schema, batches = _ipc_batches(pa, mapped)
            column, dtype, dim = _embedding_column(schema, key, label)
            index = schema.get_field_index(column)
            first_row = 0
            for batch in batches:
                array = batch.column(index)
                if len(array) == 0:
                    continue
                values = _list_values(array, -1 if dim is None else dim, label, first_row)
                dim = int(values.shape[1])
                offset = values.ctypes.data - whole.address
                if not 0 <= offset <= whole.size - values.nbytes:  # decompressed into memory: not in the file
                    raise InvalidInputError(
                        f"{label}: its record batches are compressed; expected an uncompressed Arrow IPC file "
                        "(write it without compression, or as parquet)"
                    )
                layouts.append(Layout.row_major(offset, len(array), dim, dtype))
                first_row += len(array)
    except (InvalidInputError, InputFileError):
        raise
    except Exception as exc:  # pyarrow reports a damaged file as several kinds of error
        raise InvalidInputError(
            f"{label}: not a readable Arrow IPC file (truncated or corrupt?): {first_sentence(exc)}"
        ) from None
    rows = sum(layout.rows for layout in layouts)
    _check_matrix((rows, dim or 0), dtype, label, SUPPORTED_DTYPES)
    return FileSource(spec, role, path, layouts[0]) if len(layouts) == 1 else ArrowSource(spec, role, path, layouts)


def _ipc_batches(pa: Any, mapped: Any) -> tuple[Any, Iterator[Any]]:
    """The schema and record batches of an Arrow IPC file in the file format (it starts with ARROW1) or the
    stream format."""
    file_format = mapped.read(6) == b"ARROW1"
    mapped.seek(0)
    if file_format:
        reader = pa.ipc.open_file(mapped)
        return reader.schema, (reader.get_batch(index) for index in range(reader.num_record_batches))
    stream = pa.ipc.open_stream(mapped)
    return stream.schema, iter(stream)


# Arrow's float types that hold embeddings, by their name in a schema.
_ARROW_FLOATS = {"float": torch.float32, "halffloat": torch.float16}


def _embedding_column(schema: Any, key: str | None, label: str) -> tuple[str, torch.dtype, int | None]:
    """The column of embeddings in a parquet or Arrow schema (`key`, or its only list-of-floats column), its
    dtype, and its dim where its type fixes one (fixed_size_list)."""
    import pyarrow as pa

    def is_list(kind: Any) -> bool:
        return bool(pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind))

    if key is None:
        float_lists = [
            field.name for field in schema if is_list(field.type) and pa.types.is_floating(field.type.value_type)
        ]
        if len(float_lists) != 1:
            raise InvalidInputError(
                f"{label}: holds {len(float_lists)} columns of float lists, expected exactly one; name one as "
                f"FILE:COLUMN (columns: {_keys(dict.fromkeys(schema.names))})"
            )
        key = float_lists[0]
    if key not in schema.names:
        raise InvalidInputError(f"{label}: no column named {key!r}; it holds {_keys(dict.fromkeys(schema.names))}")
    kind = schema.field(key).type
    if not is_list(kind) or str(kind.value_type) not in _ARROW_FLOATS:
        raise InvalidInputError(
            f"{label}: column {key!r} is {kind}, expected a list<float> or fixed_size_list<float> (float32 or "
            "float16) of embeddings" + ("; cast it to float32" if is_list(kind) else "")
        )
    dim = int(kind.list_size) if pa.types.is_fixed_size_list(kind) else None
    return key, _ARROW_FLOATS[str(kind.value_type)], dim


def _list_values(column: Any, dim: int, label: str, first_row: int) -> np.ndarray:
    """A list column's values as a (rows, dim) array, without a copy where pyarrow allows; refuses null rows,
    null values and rows of another length than `dim` (any, when -1), naming the first (`first_row` is the
    file's number of the column's row 0)."""
    array = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if array.null_count:
        bad = int(np.flatnonzero(~array.is_valid().to_numpy(zero_copy_only=False))[0])
        raise InvalidInputError(f"{label}: row {first_row + bad} is null; expected a list of floats in every row")
    lengths = array.value_lengths().to_numpy(zero_copy_only=False)
    dim = int(lengths[0]) if dim < 0 and lengths.size else dim
    wrong = np.flatnonzero(lengths != dim)
    if wrong.size:
        bad = int(wrong[0])
        raise InvalidInputError(
            f"{label}: row {first_row + bad} holds {int(lengths[bad])} values, expected {dim} like the first row"
        )
    values = array.flatten()
    if values.null_count:
        bad = int(np.flatnonzero(~values.is_valid().to_numpy(zero_copy_only=False))[0]) // max(dim, 1)
        raise InvalidInputError(f"{label}: row {first_row + bad} holds a null value; expected floats")
    stored: np.ndarray = values.to_numpy(zero_copy_only=False)
    return stored.reshape(len(array), dim)


def read_column(path: str, column: str, label: str) -> list[str]:
    """A column of a parquet or Arrow file as strings (ids kept beside the embeddings, `FILE.parquet:id`).

    Raises:
        InputFileError: pyarrow is missing, or the file cannot be read.
        InvalidInputError: no such column, or a null in it.
    """
    pa, pq = import_pyarrow(f"{label}: reading {'parquet' if path.lower().endswith('.parquet') else 'Arrow'}")
    try:
        if path.lower().endswith(".parquet"):
            names = pq.read_schema(path).names
            table = pq.read_table(path, columns=[column]) if column in names else None
        else:
            with pa.memory_map(path) as mapped:
                schema, batches = _ipc_batches(pa, mapped)
                names = schema.names
                table = pa.Table.from_batches(batches, schema).select([column]) if column in names else None
    except Exception as exc:  # pyarrow reports a damaged file as several kinds of error
        raise InputFileError(f"{label}: cannot be read: {first_sentence(exc)}") from None
    if table is None:
        raise InvalidInputError(f"{label}: no column named {column!r}; it holds {_keys(dict.fromkeys(names))}")
    values = table.column(0)
    if values.null_count:
        bad = int(np.flatnonzero(~values.is_valid().to_numpy(zero_copy_only=False))[0])
        raise InvalidInputError(f"{label}: row {bad} is null; expected an id in every row")
    return [str(value) for value in values.to_pylist()]


def _check_array(shape: tuple[int, ...], dtype: np.dtype, label: str) -> None:
    """Raises InvalidInputError unless a numpy-typed array is 2-D, non-empty, float32 or float16."""
    if len(shape) != 2:
        raise InvalidInputError(f"{label}: dataset has shape {tuple(shape)}, expected 2-D (rows, dim)")
    if dtype not in (np.float32, np.float16):
        hint = " (convert it to float32)" if dtype.kind == "f" else ""
        raise InvalidInputError(f"{label}: dtype {dtype}, expected float32 or float16{hint}")
    if 0 in shape:
        raise InvalidInputError(f"{label}: dataset has shape {tuple(shape)}, expected at least one row and column")


def _vecs_values(path: str, label: str, suffix: str) -> _Values:
    """.fvecs / .bvecs / .ivecs (the ANN benchmark formats): each row is an int32 dim, then dim values."""
    size = os.path.getsize(path)
    dtype = _VECS_DTYPES[suffix]
    value_bytes = np.dtype(_STORED[dtype]).itemsize
    with open(path, "rb") as stream:
        dim = int.from_bytes(stream.read(4), "little", signed=True)
        row_bytes = 4 + dim * value_bytes
        if dim <= 0 or size % row_bytes:
            raise InvalidInputError(
                f"{label}: file size {size} is not a whole number of rows of dim {dim}; truncated or not a "
                f"{suffix.lstrip('.')} file"
            )
        stream.seek(size - row_bytes)
        last_dim = int.from_bytes(stream.read(4), "little", signed=True)
    if last_dim != dim:
        raise InvalidInputError(f"{label}: the last row declares dim {last_dim}, the first {dim}; not a vecs file")
    return _Values((size // row_bytes, dim), dtype, 4, (row_bytes, value_bytes))


def _is_zip(path: str) -> bool:
    """zipfile.is_zipfile, which raises (BadZipFile) on some damaged archives (a ZIP64 locator claiming two
    disks) rather than answering."""
    try:
        return zipfile.is_zipfile(path)
    except zipfile.BadZipFile:
        return False


def _pt_values(path: str, key: str | None, label: str) -> _Values:
    # torch.save writes a zip archive; anything else is truncated, corrupt, legacy or not torch at all.
    if not _is_zip(path):
        raise InvalidInputError(
            f"{label}: not a PyTorch zip archive (truncated, corrupt, or saved in the legacy format); "
            "expected a file written by torch.save(tensor, path)"
        )
    meta = _meta_offsets()
    try:
        with warnings.catch_warnings():  # torch's remarks on odd pickles; our own verdict follows
            warnings.simplefilter("ignore")
            # On the meta device nothing is read but the pickle; each storage says where it lies in the file.
            loaded = torch.load(path, map_location="meta" if meta else "cpu", mmap=not meta, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InvalidInputError(
            f"{label}: holds pickled objects other than tensors, refused without running them ({first_sentence(exc)})"
        ) from None
    except Exception as exc:  # a damaged archive makes torch raise anything (IndexError, KeyError, ...)
        raise InvalidInputError(
            f"{label}: not a readable torch file (truncated or corrupt?): {first_sentence(exc)}"
        ) from None
    tensor = _pick_tensor(loaded, key, label)
    shape = tuple(tensor.shape)
    if not meta:
        return _Values(shape, tensor.dtype, mapped=tensor)
    itemsize = tensor.element_size()
    offset = int(tensor.untyped_storage()._checkpoint_offset or 0) + int(tensor.storage_offset()) * itemsize
    strides = tuple(stride * itemsize for stride in tensor.stride())
    if min(strides, default=0) < 0:
        raise InvalidInputError(f"{label}: tensor has negative strides; save a contiguous copy")
    return _Values(shape, tensor.dtype, offset, strides)


@functools.cache
def _meta_offsets() -> bool:
    """Whether torch.load on the meta device records where each storage lies in the file (torch >= 2.5)."""
    buffer = io.BytesIO()
    torch.save(torch.zeros(1), buffer)
    buffer.seek(0)
    tensor = torch.load(buffer, map_location="meta", weights_only=True)
    return isinstance(getattr(tensor.untyped_storage(), "_checkpoint_offset", None), int)


def check_compatible(queries: Source, docs: Source) -> None:
    """Raises InvalidInputError unless queries and docs have the same dimension."""
    if queries.dim != docs.dim:
        raise InvalidInputError(
            f"dimension mismatch: {queries.label()} has dim {queries.dim}, "
            f"{docs.label()} has dim {docs.dim}; both must have the same number of columns"
        )


IN_MEMORY_DTYPES = (*SUPPORTED_DTYPES, torch.float64)


def from_array(array: torch.Tensor | np.ndarray, role: str) -> Source:
    """A source over a (rows, dim) tensor or numpy array in memory (float64 too: converted as read).

    Raises:
        InvalidInputError: not 2-D, not a float dtype, or empty.
    """
    label = f"in-memory {role}"
    if isinstance(array, np.ndarray):
        if array.dtype.kind != "f":
            raise InvalidInputError(f"{label}: dtype {array.dtype}, expected float32, float16 or float64")
        array = torch.from_numpy(array)
    tensor = array.detach().cpu()
    if tensor.dim() != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise InvalidInputError(f"{label}: shape {tuple(tensor.shape)}, expected 2-D (rows, dim), not empty")
    if tensor.dtype not in IN_MEMORY_DTYPES:
        raise InvalidInputError(
            f"{label}: dtype {dtype_name(tensor.dtype)}, expected float32, float16, bfloat16 or float64"
        )
    source = ArraySource(f"<{label}>", role, tensor)
    source.label = lambda: label  # type: ignore[method-assign]
    return source
