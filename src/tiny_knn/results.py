"""The result file: written in the contract's `.pt` format or another one, always atomically, and read back a
block of rows at a time (by merge and recall).

- `pt` (the default, the contract): a `torch.save` of a plain dict (loadable with `torch.load(path)`,
  weights_only): `indices` (Q, K) int64, `scores` (Q, K) float32, `queries_path`, `docs_path`, `k`,
  `batch_size`, `dtype`, `device`, plus `chunk_size`, `version`, `metric`, `precision`, `exclude_self`,
  `format_version` (of this layout and its keys, FORMAT_VERSION), `requested_k` (k before it was clamped to the
  docs), `doc_count`, `queries_fingerprint` (a hash of the queries' content sample: results over the same
  queries can be merged), and `query_ids` / `doc_ids` (lists of str) when ids were given.
- `npy`: a directory holding `indices.npy`, `scores.npy` and `meta.json` (everything else).
- `parquet`: one row per (query, rank): `query`, `rank` (1 = best), `doc`, `score`; queries and docs are row
  numbers, or the given ids; the metadata is in the schema's `tiny_knn` key. Needs pyarrow.
- `trec`: a TREC run file, `QID Q0 DOCID RANK SCORE tiny-knn`, ranks from 1. Evaluation tools rank by
  SCORE, highest first, so an l2 run writes the negated distance.
- `ivecs` and `bigann`: ground truth for ANN benchmarks (groundtruth.py): neighbours and scores only.

Every format is first written beside the target under a temporary name and renamed into place, so a
reader never sees a half-written result and a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import shutil
import stat
import tempfile
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, cast

import numpy as np
import torch

from . import groundtruth
from .errors import InputFileError, InvalidInputError, OutputError, output_error
from .plan import round_up
from .sources import GLOB_CHARS, Source, import_pyarrow, is_pattern, open_array, read_column, split_key

FORMATS = ("pt", "npy", "parquet", "trec", "ivecs", "bigann")
# The version of the result's layout and keys: 1 added format_version, requested_k, doc_count and
# queries_fingerprint, which merge needs.
FORMAT_VERSION = 1
_SUFFIXES = {".pt": "pt", ".pth": "pt", ".parquet": "parquet", ".trec": "trec", ".run": "trec", ".ivecs": "ivecs"}
_DEFAULT_SUFFIXES = {"npy": "", "bigann": ".bin"}  # else ".{format}"
# Rows of (query, rank) lines formatted at a time by the parquet and TREC writers.
_WRITE_BLOCK_PAIRS = 1 << 20
_TREC_LINES = 1 << 16  # TREC lines formatted at a time (their pairs as Python objects: about 8 MiB)


def output_format(path: str | None, requested: str | None) -> str:
    """The format asked for, else the one the output path's suffix implies, else `pt`."""
    if requested is not None:
        if requested not in FORMATS:
            raise InvalidInputError(f"output format {requested!r}: expected one of {', '.join(FORMATS)}")
        return requested
    if path is None:
        return "pt"
    return _SUFFIXES.get(os.path.splitext(path)[1].lower(), "pt")


def default_output_path(queries_path: str, docs_path: str, k: int, fmt: str = "pt") -> str:
    """`top{k}_{queries}_x_{docs}.pt` (or .parquet, .trec, .ivecs, .bin, or a directory for npy), next to the
    queries (see input_name)."""
    return default_pair_path(f"top{k}", queries_path, docs_path, _DEFAULT_SUFFIXES.get(fmt, f".{fmt}"))


def default_pair_path(prefix: str, queries_path: str, docs_path: str, suffix: str) -> str:
    """`{prefix}_{queries}_x_{docs}{suffix}` beside the queries, each input named as input_name names it."""
    folder, query_name = input_name(queries_path)
    return os.path.join(folder, f"{prefix}_{query_name}_x_{input_name(docs_path)[1]}{suffix}")


def input_name(spec: str) -> tuple[str, str]:
    """(folder, name) by which a default output names an input and lies beside it: a file's or a shard folder's
    folder, and its name without suffix. For a glob of shards, those of the folder before its first wildcard
    ("shards" for a pattern in the current folder): an output named with a wildcard would be a trap for the
    shell, and one inside the pattern's folder a stray shard of it."""
    spec = spec.rstrip(os.sep) or spec
    if is_pattern(spec):
        parts = spec.split(os.sep)
        fixed = next(i for i, part in enumerate(parts) if any(char in part for char in GLOB_CHARS))
        spec = os.sep.join(parts[:fixed]) or (os.sep if fixed else "")  # '/' for '/*.npy'
        if os.path.basename(spec) in ("", ".", ".."):  # no folder's name to take: '*.npy', '/*', '../*'
            return spec, "shards"
    return os.path.dirname(spec), os.path.splitext(os.path.basename(spec))[0]


def check_format(path: str, fmt: str, docs: int = 0) -> None:
    """Raises OutputError when format `fmt` cannot be written here (parquet without pyarrow) or cannot number
    `docs` docs (ivecs, bigann). Which paths an output may take at all is safety.check_output_path's to say."""
    if fmt == "parquet":
        output_pyarrow(path)
    groundtruth.check_doc_count(path, fmt, docs)


def beside_output(path: str, fmt: str) -> list[str]:
    """The files a format writes beside its output path (the scores of an ivecs ground truth)."""
    return [groundtruth.scores_path(path)] if fmt == "ivecs" else []


def read_ids(path: str, rows: int, role: str) -> list[str]:
    """The ids in `path`, one per line, which must be exactly one per row of the `role` input; or, for
    `FILE.parquet:COLUMN` (or `FILE.arrow:COLUMN`), the values of that column, one per row."""
    label = f"{role} ids file '{path}'"
    file, column = split_key(path)
    if column is not None and file.lower().endswith((".parquet", ".arrow")):
        ids, unit, first = read_column(file, column, label), "row", 0
    else:
        ids, unit, first = _read_lines(path, label), "line", 1
    if len(ids) != rows:
        raise InvalidInputError(f"{label}: {len(ids)} {unit}s, expected one id per row ({rows})")
    bad = next((at for at, value in enumerate(ids, first) if not value.strip() or any(c.isspace() for c in value)), -1)
    if bad >= 0:
        raise InvalidInputError(f"{label}: {unit} {bad} is empty or holds whitespace; expected one id")
    return ids


def ids_file(path: str) -> str:
    """The file an ids spec reads (`FILE.parquet:COLUMN` reads FILE)."""
    file, column = split_key(path)
    return file if column is not None and file.lower().endswith((".parquet", ".arrow")) else path


def _read_lines(path: str, label: str) -> list[str]:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise InputFileError(f"{label}: is not a regular file (a folder, FIFO or device)")
        with open(path, encoding="utf-8") as stream:
            return stream.read().splitlines()
    except FileNotFoundError:
        raise InputFileError(f"{label}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{label}: cannot be read: {exc}") from None


def write_output(path: str, fmt: str, result: dict[str, Any], higher_is_better: bool = True) -> None:
    """Writes `result` (the .pt dict) at `path` in format `fmt`, atomically.

    Raises:
        OutputError: the result could not be written (disk full, permissions); nothing is left behind.
    """
    if fmt == "pt":
        write_result(path, result)
    elif fmt == "npy":
        _write_npy(path, result)
    elif fmt == "parquet":
        write_atomically(path, lambda temporary: _write_parquet(temporary, result))
    elif fmt == "ivecs":
        write_atomically(
            path,
            lambda temporary: groundtruth.write_vecs(temporary, result["indices"]),
            {groundtruth.scores_path(path): lambda temporary: groundtruth.write_vecs(temporary, result["scores"])},
        )
    elif fmt == "bigann":
        write_atomically(
            path, lambda temporary: groundtruth.write_bigann(temporary, result["indices"], result["scores"])
        )
    else:
        write_atomically(path, lambda temporary: _write_trec(temporary, result, higher_is_better))


def write_result(path: str, result: dict[str, Any]) -> None:
    """Saves `result` to `path` as a .pt dict, atomically (temporary file, fsync, rename).

    Large results bypass the page cache where the file system allows it (O_DIRECT, through two aligned
    buffers): on the VMs we measured, a buffered write of a fresh 98 MB file right after a search took
    0.07-0.28 s, all of it the kernel taking and filling new cache pages; written direct, 0.05 s.
    """

    def save(temporary: str) -> None:
        tensor_bytes = sum(v.nbytes for v in result.values() if isinstance(v, torch.Tensor))
        if tensor_bytes >= DIRECT_WRITE_MIN_BYTES and _save_direct(result, temporary):
            return
        with open(temporary, "wb") as stream:
            recording = _RecordingWriter(stream)
            try:
                torch.save(result, cast(IO[bytes], recording))
            except RuntimeError:
                if recording.error is None:
                    raise
            if recording.error is not None:
                raise recording.error

    write_atomically(path, save)


# Results at least this large are written past the page cache, staged through two buffers of this many bytes.
DIRECT_WRITE_MIN_BYTES = 16 * 2**20
DIRECT_STAGE_BYTES = 4 * 2**20
_DIRECT_ALIGN = 4096  # offsets and lengths of O_DIRECT writes: 512- and 4096-byte blocks (larger: EINVAL, buffered)


def _save_direct(result: dict[str, Any], path: str) -> bool:
    """torch.save(result) into the (existing, empty) file at `path` with O_DIRECT. False, with nothing
    written, where the file system does not allow it (EINVAL at open or at a write)."""
    flag = getattr(os, "O_DIRECT", 0)  # Linux only
    if not flag:
        return False
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_TRUNC | flag)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(os.close, descriptor)
        writer = _DirectWriter(descriptor)
        cleanup.callback(writer.close)  # runs first: the writes are over before the descriptor closes
        try:
            torch.save(result, cast(IO[bytes], writer))  # it only calls write() and flush()
        except RuntimeError:
            if writer.error is None:
                raise
        writer.finish()  # waits for every write in flight; after a failure, writes nothing more
        if writer.error is None:
            return True
        if not (isinstance(writer.error, OSError) and writer.error.errno == errno.EINVAL):
            raise writer.error
        os.ftruncate(descriptor, 0)  # refused: written again through the page cache
        return False


class _DirectWriter:
    """The file-like object torch.save writes into: bytes are gathered in two page-aligned buffers in turn,
    each written out whole by a background thread while the other fills; `finish()` writes the last, padded
    block and cuts the file to its length.

    torch.save does not reliably pass on an exception raised in `write` (it may raise its own RuntimeError,
    or carry on), so a failed write is kept in `error` instead, for the caller to see, and nothing more is
    written after it.
    """

    def __init__(self, descriptor: int) -> None:
        self._descriptor = descriptor
        self._stages = [mmap.mmap(-1, DIRECT_STAGE_BYTES) for _ in range(2)]  # anonymous maps are page-aligned
        self._pending: list[Future[None] | None] = [None, None]
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tiny-knn-write")
        self._current = 0
        self._filled = 0  # bytes in the current buffer
        self._handed = 0  # bytes handed to the background thread: the file offset of the current buffer
        self.error: Exception | None = None

    def write(self, data: Any) -> int:
        if self.error is not None:
            return 0
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            take = min(len(view) - done, DIRECT_STAGE_BYTES - self._filled)
            self._stages[self._current][self._filled : self._filled + take] = view[done : done + take]
            self._filled += take
            done += take
            if self._filled == DIRECT_STAGE_BYTES and not self._hand_over(DIRECT_STAGE_BYTES):
                return 0
        return len(view)

    def flush(self) -> None:
        """Nothing: whole buffers are written as they fill (torch.save calls this)."""

    def finish(self) -> None:
        length = self._handed + self._filled  # every byte torch.save wrote
        if self.error is None and self._filled:
            padded = round_up(self._filled, _DIRECT_ALIGN)
            self._stages[self._current][self._filled : padded] = bytes(padded - self._filled)
            self._hand_over(padded)
        for index in range(2):
            self._wait(index)
        if self.error is None:
            os.ftruncate(self._descriptor, length)

    def close(self) -> None:
        self._writer.shutdown()
        for stage in self._stages:
            stage.close()

    def _hand_over(self, length: int) -> bool:
        """Queues the current buffer's first `length` bytes for writing and switches to the other buffer
        once its own write is done. False if a write failed (see `error`)."""
        self._pending[self._current] = self._writer.submit(self._write_out, self._current, length, self._handed)
        self._handed += length
        self._current = 1 - self._current
        self._filled = 0
        return self._wait(self._current)

    def _wait(self, index: int) -> bool:
        pending, self._pending[index] = self._pending[index], None
        if pending is not None:
            try:
                pending.result()
            except Exception as exc:  # any failure: kept for the caller (see the class docstring)
                self.error = self.error or exc
        return self.error is None

    def _write_out(self, index: int, length: int, offset: int) -> None:
        written = 0
        while written < length:
            with memoryview(self._stages[index])[written:length] as piece:  # released even on failure
                count = os.pwrite(self._descriptor, piece, offset + written)
            if count <= 0:
                raise OSError(errno.EIO, "the disk accepted no bytes")
            written += count  # a short write continues unaligned: EINVAL, and the buffered write takes over


class _RecordingWriter:
    """A file torch.save or numpy.save writes into through the page cache: a failed write (a full disk) is kept
    in `error` for the caller to raise, with its errno: torch.save reports it as a RuntimeError of its own
    ("unexpected pos"), numpy as an OSError without one ("N requested and M written")."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        if self.error is not None:
            return 0
        try:
            return self._stream.write(data)
        except OSError as exc:
            self.error = exc
            return 0

    def flush(self) -> None:
        if self.error is None:
            try:
                self._stream.flush()
            except OSError as exc:
                self.error = exc


def metadata(result: dict[str, Any]) -> dict[str, Any]:
    """Everything but the two tensors (and the id lists, which npy and parquet do not repeat)."""
    return {key: value for key, value in result.items() if key not in ("indices", "scores", "query_ids", "doc_ids")}


def write_atomically(
    path: str, write: Callable[[str], None], beside: dict[str, Callable[[str], None]] | None = None
) -> None:
    """Calls write(temporary path) beside `path`, fsyncs, renames into place; cleans up on any failure. The
    files `beside` (path: write) are written the same way, all of them before any is renamed."""
    writes = {path: write, **(beside or {})}
    temporaries: dict[str, str] = {}
    try:
        for target, write_one in writes.items():
            temporaries[target] = _temporary_beside(target)
            write_one(temporaries[target])
            with open(temporaries[target], "rb+") as stream:
                os.fsync(stream.fileno())
        for target in reversed(writes):  # the main file last: it is complete only with the others in place
            os.replace(temporaries.pop(target), target)
    except BaseException as exc:
        for temporary in temporaries.values():
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise output_error(f"output path '{path}': writing failed: {exc.strerror or exc}", exc) from None
        raise


def _temporary_beside(path: str) -> str:
    """A new empty file, with an ordinary file's permissions, in `path`'s folder under a temporary name."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise output_error(f"output path '{path}': cannot create a file in '{folder}': {exc.strerror}", exc) from None
    os.close(handle)
    try:
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp makes it private; a result is an ordinary file
    except BaseException:
        os.unlink(temporary)
        raise
    return temporary


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_npy(path: str, result: dict[str, Any]) -> None:
    """indices.npy, scores.npy and meta.json in a folder (write_folder)."""
    write_folder(path, lambda folder: _fill_npy(folder, result))


def _fill_npy(folder: str, result: dict[str, Any]) -> None:
    for name in ("indices", "scores"):
        save_array(os.path.join(folder, f"{name}.npy"), result[name].numpy())
    ids = {f"{role}_ids": result[f"{role}_ids"] for role in ("query", "doc") if f"{role}_ids" in result}
    write_meta(folder, {"kind": "topk", **metadata(result)}, ids)


def save_array(path: str, array: np.ndarray, durable: bool = True) -> None:
    """np.save, with a full disk's errno kept (numpy's own writes lose it) and, if `durable`, fsynced."""
    array = np.ascontiguousarray(array)
    with open(path, "wb") as stream:
        np.lib.format.write_array_header_1_0(stream, np.lib.format.header_data_from_array_1_0(array))
        stream.write(memoryview(cast(Any, array.reshape(-1))).cast("B"))  # flat: a shape with a 0 cannot be cast
        stream.flush()
        if durable:
            os.fsync(stream.fileno())


def write_meta(folder: str, meta: dict[str, Any], ids: dict[str, list[str]]) -> None:
    """meta.json (and the ids files it names) in a folder output."""
    meta = dict(meta)
    for role in ("query", "doc"):
        if f"{role}_ids" in ids:
            with open(os.path.join(folder, f"{role}_ids.txt"), "w", encoding="utf-8") as stream:
                stream.write("\n".join(ids[f"{role}_ids"]) + "\n")
            meta[f"{role}_ids"] = f"{role}_ids.txt"
    with open(os.path.join(folder, "meta.json"), "w", encoding="utf-8") as stream:
        json.dump(meta, stream, indent=2)
        stream.flush()
        os.fsync(stream.fileno())


def write_folder(path: str, fill: Callable[[str], None]) -> None:
    """A folder output built under a temporary name beside `path` by fill(temporary), then renamed into place; an
    older one at `path` is replaced (safety.check_output_path says which may be). Nothing is left behind on failure.

    Raises:
        OutputError: it cannot be written (the errno of a full disk kept).
    """
    parent = os.path.dirname(os.path.abspath(path))
    try:
        temporary = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise output_error(
            f"output path '{path}': cannot create a directory in '{parent}': {exc.strerror}", exc
        ) from None
    old = None
    try:
        os.chmod(temporary, 0o777 & ~current_umask())
        fill(temporary)
        if os.path.isdir(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=parent)
            os.replace(path, os.path.join(old, "previous"))
        os.replace(temporary, path)
    except BaseException as exc:
        shutil.rmtree(temporary, ignore_errors=True)
        if old is not None and not os.path.exists(path):
            os.replace(os.path.join(old, "previous"), path)
        if isinstance(exc, OSError):
            raise output_error(f"output path '{path}': writing failed: {exc.strerror or exc}", exc) from None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _pairs(result: dict[str, Any]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(query rows, ranks from 1, doc indices, scores) as flat arrays, a block of queries at a time; padding (doc
    -1, where excluded pairs left a query fewer than k docs) is left out."""
    indices, scores = result["indices"].numpy(), result["scores"].numpy()
    queries, k = indices.shape
    step = max(1, _WRITE_BLOCK_PAIRS // max(1, k))
    for start in range(0, queries, step):
        stop = min(start + step, queries)
        rows = np.repeat(np.arange(start, stop, dtype=np.int64), k)
        ranks = np.tile(np.arange(1, k + 1, dtype=np.int32), stop - start)
        docs, values = indices[start:stop].ravel(), scores[start:stop].ravel()
        real = docs >= 0
        if not real.all():
            rows, ranks, docs, values = rows[real], ranks[real], docs[real], values[real]
        yield rows, ranks, docs, values


def _write_parquet(path: str, result: dict[str, Any]) -> None:
    pa, pq = output_pyarrow(path)
    query_ids, doc_ids = result.get("query_ids"), result.get("doc_ids")
    lookup_q = None if query_ids is None else np.asarray(query_ids, dtype=object)
    lookup_d = None if doc_ids is None else np.asarray(doc_ids, dtype=object)
    writer = None
    try:
        for rows, ranks, docs, scores in _pairs(result):
            table = pa.table(
                {
                    "query": pa.array(rows if lookup_q is None else lookup_q[rows], type=id_type(pa, lookup_q)),
                    "rank": pa.array(ranks),
                    "doc": pa.array(docs if lookup_d is None else lookup_d[docs], type=id_type(pa, lookup_d)),
                    "score": pa.array(scores),
                }
            )
            if writer is None:
                schema = table.schema.with_metadata({"tiny_knn": json.dumps(metadata(result))})
                writer = pq.ParquetWriter(path, schema)
            writer.write_table(table.replace_schema_metadata(schema.metadata))
    finally:
        if writer is not None:
            writer.close()


def id_type(pa: Any, lookup: np.ndarray | None) -> Any:
    return pa.int64() if lookup is None else pa.string()


def output_pyarrow(path: str) -> tuple[Any, Any]:
    return import_pyarrow(f"output path '{path}': the parquet format", OutputError)


def _write_trec(path: str, result: dict[str, Any], higher_is_better: bool) -> None:
    query_ids, doc_ids = result.get("query_ids"), result.get("doc_ids")
    with open(path, "w", encoding="utf-8") as stream:
        for block in _pairs(result):
            for lo in range(0, block[0].size, _TREC_LINES):  # as Python objects: about 130 bytes a pair
                rows, ranks, docs, scores = (column[lo : lo + _TREC_LINES] for column in block)
                shown = scores if higher_is_better else 0 - scores  # 0 - x: no '-0' for a zero distance
                queries = map(str, rows.tolist()) if query_ids is None else (query_ids[r] for r in rows.tolist())
                names = map(str, docs.tolist()) if doc_ids is None else (doc_ids[d] for d in docs.tolist())
                # %.9g keeps every float32 distinct; evaluation tools read the score as a double.
                stream.writelines(
                    f"{q} Q0 {d} {r} {s:.9g} tiny-knn\n"
                    for q, d, r, s in zip(queries, names, ranks.tolist(), shown.tolist(), strict=True)
                )


class StoredResult(ABC):
    """A result file opened for reading (by merge and recall): its metadata and shape from its header, its rows
    a block at a time, never the whole file at once."""

    def __init__(self, path: str, fmt: str, meta: dict[str, Any], rows: int, k: int, files: list[str]) -> None:
        self.path, self.fmt, self.meta, self.rows, self.k = path, fmt, meta, rows, k
        self.files = files  # every file read, for the output's safety checks
        self.role = "result"  # what messages call it ("merge part", "ground truth"): open_result's role

    def label(self) -> str:
        return f"{self.role} '{self.path}'"

    has_scores = True

    @abstractmethod
    def blocks(self, block_rows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """(indices int64, scores float32 or None) of rows [0, block_rows), then the next block_rows, ...: every
        row, in order."""


class _ArraysResult(StoredResult):
    """Indices and scores that lie in a file as arrays (pt, npy, ivecs, bigann), read with pread."""

    def __init__(
        self, path: str, fmt: str, meta: dict[str, Any], indices: Source, scores: Source | None, unsigned: bool
    ) -> None:
        files = [*indices.files(), *(scores.files() if scores is not None else [])]
        super().__init__(path, fmt, meta, indices.rows, indices.dim, list(dict.fromkeys(files)))
        self.indices, self.scores, self.unsigned = indices, scores, unsigned
        self.has_scores = scores is not None
        if scores is not None and (scores.rows, scores.dim) != (indices.rows, indices.dim):
            raise InvalidInputError(
                f"result '{path}': scores of shape ({scores.rows}, {scores.dim}) but indices of shape "
                f"({indices.rows}, {indices.dim}); expected the same shape (a damaged result?)"
            )

    def blocks(self, block_rows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        for start in range(0, self.rows, block_rows):
            stop = min(start + block_rows, self.rows)
            indices = torch.empty((stop - start, self.k), dtype=self.indices.dtype)
            self.indices.read_into(start, stop, indices, check=False)
            indices = indices.to(torch.int64)
            if self.unsigned:  # uint32 doc numbers, read as their int32 bits
                indices &= 0xFFFFFFFF
            scores = None
            if self.scores is not None:
                scores = torch.empty((stop - start, self.k), dtype=torch.float32)
                self.scores.read_into(start, stop, scores, check=False)
            yield indices, scores


class _ParquetResult(StoredResult):
    """A parquet result written without ids: (query, rank, doc, score) rows, k per query in query order."""

    def __init__(self, path: str, meta: dict[str, Any], pairs: int) -> None:
        k = meta["k"]
        if not isinstance(k, int) or k < 1 or pairs % k:
            raise InvalidInputError(f"result '{path}': {pairs} rows, expected a whole number of queries of k={k}")
        super().__init__(path, "parquet", meta, pairs // k, k, [path])

    def blocks(self, block_rows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        _, pq = import_pyarrow(self.label(), InputFileError)
        file = pq.ParquetFile(self.path)
        batches = file.iter_batches(batch_size=_WRITE_BLOCK_PAIRS, columns=["query", "doc", "score"])
        held: list[list[np.ndarray]] = [[], [], []]  # query, doc, score pieces not yet handed out
        for start in range(0, self.rows, block_rows):
            stop = min(start + block_rows, self.rows)
            wanted = (stop - start) * self.k
            while sum(piece.size for piece in held[0]) < wanted:
                batch = next(batches)
                for column, pieces in enumerate(held):
                    pieces.append(batch.column(column).to_numpy())
            query, doc, score = (_take(pieces, wanted) for pieces in held)
            if not np.array_equal(query, np.repeat(np.arange(start, stop), self.k)):
                raise InvalidInputError(
                    f"{self.label()}: its query column is not rows {start}..{stop - 1} with k={self.k} each, "
                    "in order; expected a parquet result as tiny-knn writes it"
                )
            # Copies: pyarrow's arrays are read-only.
            yield torch.from_numpy(doc.reshape(-1, self.k).copy()), torch.from_numpy(score.reshape(-1, self.k).copy())


def _take(pieces: list[np.ndarray], count: int) -> np.ndarray:
    """The first `count` values of the arrays `pieces`, removed from it."""
    taken = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
    pieces[:] = [taken[count:]] if taken.size > count else []
    return taken[:count]


def open_result(path: str, role: str = "result") -> StoredResult:
    """Opens a result file for reading by row blocks: tiny-knn's pt, npy (a folder) or parquet written without
    ids, or a ground truth in ivecs (.ivecs, its .fvecs of scores beside it if any) or bigann format.

    Raises:
        InputFileError: the file is missing or unreadable, or parquet without pyarrow.
        InvalidInputError: it is not a result tiny-knn reads, or a damaged one.
    """
    opened = _open_result(path, role)
    opened.role = role
    return opened


def _open_result(path: str, role: str) -> StoredResult:
    label = f"{role} '{path}'"
    if os.path.isdir(path):
        return _open_npy_result(path, role, label)
    if not os.path.isfile(path):
        raise InputFileError(f"{label}: no such file or folder")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".trec", ".run"):
        raise InvalidInputError(f"{label}: a TREC run holds ids, not row numbers; expected a pt, npy or parquet result")
    if suffix == ".parquet":
        return _open_parquet_result(path, label)
    if suffix == ".ivecs":
        indices, scores = groundtruth.open_ivecs(path, role)
        return _ArraysResult(path, "ivecs", {}, indices, scores, unsigned=False)
    if suffix not in (".pt", ".pth"):
        found = groundtruth.open_bigann(path, role)
        if found is not None:
            return _ArraysResult(path, "bigann", {}, *found, unsigned=True)
        if not zipfile.is_zipfile(path):
            raise InvalidInputError(
                f"{label}: not a result tiny-knn reads; expected a .pt result, an npy result folder, a .parquet "
                "result, an .ivecs or a bigann ground-truth file"
            )
    try:
        loaded = torch.load(path, map_location="meta", weights_only=True)
    except Exception:  # open_array below says what is wrong with the file
        loaded = None
    if loaded is not None and not (isinstance(loaded, dict) and "indices" in loaded):
        what = "a single tensor" if isinstance(loaded, torch.Tensor) else f"a {type(loaded).__name__}"
        what = "a dict without 'indices'" if isinstance(loaded, dict) else what
        raise InvalidInputError(f"{label}: holds {what}, not a tiny-knn result (a dict with indices and scores)")
    indices = open_array(path, "indices", role, (torch.int64,))
    scores = open_array(path, "scores", role, (torch.float32,))
    assert isinstance(loaded, dict)  # open_array has read it: it loads
    meta = {key: value for key, value in loaded.items() if not isinstance(value, torch.Tensor)}
    return _ArraysResult(path, "pt", meta, indices, scores, unsigned=False)


def _open_npy_result(path: str, role: str, label: str) -> StoredResult:
    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as stream:
            meta = json.load(stream)
    except (OSError, ValueError) as exc:
        raise InputFileError(
            f"{label}: a folder without a readable meta.json ({exc}); expected an npy result"
        ) from None
    if not isinstance(meta, dict):
        raise InvalidInputError(f"{label}: its meta.json holds no object; expected an npy result")
    meta.pop("kind", None)
    indices = open_array(os.path.join(path, "indices.npy"), None, role, (torch.int64,))
    scores = open_array(os.path.join(path, "scores.npy"), None, role, (torch.float32,))
    for key in ("query_ids", "doc_ids"):
        if key in meta:
            with open(os.path.join(path, str(meta[key])), encoding="utf-8") as stream:
                meta[key] = stream.read().splitlines()
    return _ArraysResult(path, "npy", meta, indices, scores, unsigned=False)


def _open_parquet_result(path: str, label: str) -> StoredResult:
    pa, pq = import_pyarrow(label, InputFileError)
    try:
        file = pq.ParquetFile(path)
        schema = file.schema_arrow
        meta = json.loads((schema.metadata or {}).get(b"tiny_knn", b"null"))
    except Exception as exc:  # pyarrow reports a damaged file as several kinds of error
        raise InvalidInputError(f"{label}: not a readable parquet file (truncated or corrupt?): {exc}") from None
    if not isinstance(meta, dict) or schema.names != ["query", "rank", "doc", "score"]:
        raise InvalidInputError(f"{label}: not a parquet result of tiny-knn (no tiny_knn metadata, or other columns)")
    for column in ("query", "doc"):
        if not pa.types.is_integer(schema.field(column).type):
            raise InvalidInputError(
                f"{label}: its {column} column holds ids ({schema.field(column).type}), not row numbers; expected "
                "a result written without --query-ids/--doc-ids (or in pt or npy format, which keep both)"
            )
    return _ParquetResult(path, meta, file.metadata.num_rows)
