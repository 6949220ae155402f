"""Writing: the result, in the contract's `.pt` format or another one, always atomically.

- `pt` (the default, the contract): a `torch.save` of a plain dict (loadable with `torch.load(path)`,
  weights_only): `indices` (Q, K) int64, `scores` (Q, K) float32, `queries_path`, `docs_path`, `k`,
  `batch_size`, `dtype`, `device`, plus `chunk_size`, `version`, `metric`, `precision`, `exclude_self`, and
  `query_ids` / `doc_ids` (lists of str) when ids were given.
- `npy`: a directory holding `indices.npy`, `scores.npy` and `meta.json` (everything else).
- `parquet`: one row per (query, rank): `query`, `rank` (1 = best), `doc`, `score`; queries and docs are row
  numbers, or the given ids; the metadata is in the schema's `tiny_knn` key. Needs pyarrow.
- `trec`: a TREC run file, `QID Q0 DOCID RANK SCORE tiny-knn`, ranks from 1. Evaluation tools rank by
  SCORE, highest first, so an l2 run writes the negated distance.

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
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, cast

import numpy as np
import torch

from .errors import InputFileError, InvalidInputError, OutputError, output_error
from .plan import round_up

FORMATS = ("pt", "npy", "parquet", "trec")
_SUFFIXES = {".pt": "pt", ".pth": "pt", ".parquet": "parquet", ".trec": "trec", ".run": "trec"}
# Rows of (query, rank) lines formatted at a time by the parquet and TREC writers.
_WRITE_BLOCK_PAIRS = 1 << 20


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
    """`top{k}_{queries}_x_{docs}.pt` (or .parquet, .trec, or a directory for npy), next to the queries."""
    query_name = os.path.splitext(os.path.basename(queries_path.rstrip("/")))[0]
    doc_name = os.path.splitext(os.path.basename(docs_path.rstrip("/")))[0]
    suffix = "" if fmt == "npy" else f".{fmt}"
    return os.path.join(os.path.dirname(queries_path), f"top{k}_{query_name}_x_{doc_name}{suffix}")


def check_format(path: str, fmt: str) -> None:
    """Raises OutputError when format `fmt` cannot be written here (parquet without pyarrow). Which paths an
    output may take at all is safety.check_output_path's to say."""
    if fmt == "parquet":
        _pyarrow(path)


def read_ids(path: str, rows: int, role: str) -> list[str]:
    """The ids in `path`, one per line, which must be exactly one per row of the `role` input."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise InputFileError(f"{role} ids file '{path}': is not a regular file (a folder, FIFO or device)")
        with open(path, encoding="utf-8") as stream:
            ids = stream.read().splitlines()
    except FileNotFoundError:
        raise InputFileError(f"{role} ids file '{path}': no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{role} ids file '{path}': cannot be read: {exc}") from None
    if len(ids) != rows:
        raise InvalidInputError(f"{role} ids file '{path}': {len(ids)} lines, expected one id per row ({rows})")
    bad = next((line for line, value in enumerate(ids, 1) if not value.strip() or any(c.isspace() for c in value)), 0)
    if bad:
        raise InvalidInputError(f"{role} ids file '{path}': line {bad} is empty or holds whitespace; expected one id")
    return ids


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
        _atomically(path, lambda temporary: _write_parquet(temporary, result))
    else:
        _atomically(path, lambda temporary: _write_trec(temporary, result, higher_is_better))


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

    _atomically(path, save)


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


def _atomically(path: str, write: Callable[[str], None]) -> None:
    """Calls write(temporary path) beside `path`, fsyncs, renames into place; cleans up on any failure."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise output_error(f"output path '{path}': cannot create a file in '{folder}': {exc.strerror}", exc) from None
    os.close(handle)
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; a result is an ordinary file
        write(temporary)
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(exc, OSError):
            raise output_error(f"output path '{path}': writing failed: {exc.strerror or exc}", exc) from None
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_npy(path: str, result: dict[str, Any]) -> None:
    """A directory built under a temporary name, then renamed; an older one at `path` is replaced."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        temporary = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise output_error(
            f"output path '{path}': cannot create a directory in '{folder}': {exc.strerror}", exc
        ) from None
    old = None
    try:
        os.chmod(temporary, 0o777 & ~_umask())
        for name in ("indices", "scores"):
            with open(os.path.join(temporary, f"{name}.npy"), "wb") as stream:
                recording = _RecordingWriter(stream)  # numpy's own file writes report a full disk without errno
                np.save(cast(IO[bytes], recording), result[name].numpy())
                if recording.error is not None:
                    raise recording.error
                stream.flush()
                os.fsync(stream.fileno())
        meta = {"kind": "topk", **metadata(result)}
        for role in ("query", "doc"):
            if f"{role}_ids" in result:
                with open(os.path.join(temporary, f"{role}_ids.txt"), "w", encoding="utf-8") as stream:
                    stream.write("\n".join(result[f"{role}_ids"]) + "\n")
                meta[f"{role}_ids"] = f"{role}_ids.txt"
        with open(os.path.join(temporary, "meta.json"), "w", encoding="utf-8") as stream:
            json.dump(meta, stream, indent=2)
        if os.path.isdir(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=folder)
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
    pa, pq = _pyarrow(path)
    query_ids, doc_ids = result.get("query_ids"), result.get("doc_ids")
    lookup_q = None if query_ids is None else np.asarray(query_ids, dtype=object)
    lookup_d = None if doc_ids is None else np.asarray(doc_ids, dtype=object)
    writer = None
    try:
        for rows, ranks, docs, scores in _pairs(result):
            table = pa.table(
                {
                    "query": pa.array(rows if lookup_q is None else lookup_q[rows], type=_id_type(pa, lookup_q)),
                    "rank": pa.array(ranks),
                    "doc": pa.array(docs if lookup_d is None else lookup_d[docs], type=_id_type(pa, lookup_d)),
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


def _id_type(pa: Any, lookup: np.ndarray | None) -> Any:
    return pa.int64() if lookup is None else pa.string()


def _pyarrow(path: str) -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise OutputError(
            f"output path '{path}': the parquet format needs pyarrow: pip install 'tiny-knn[parquet]'"
        ) from None
    return pa, pq


def _write_trec(path: str, result: dict[str, Any], higher_is_better: bool) -> None:
    query_ids, doc_ids = result.get("query_ids"), result.get("doc_ids")
    with open(path, "w", encoding="utf-8") as stream:
        for rows, ranks, docs, scores in _pairs(result):
            shown = scores if higher_is_better else 0 - scores  # 0 - x: no '-0' for a zero distance
            queries = map(str, rows.tolist()) if query_ids is None else (query_ids[r] for r in rows.tolist())
            names = map(str, docs.tolist()) if doc_ids is None else (doc_ids[d] for d in docs.tolist())
            # %.9g keeps every float32 distinct; evaluation tools read the score as a double.
            stream.writelines(
                f"{q} Q0 {d} {r} {s:.9g} tiny-knn\n"
                for q, d, r, s in zip(queries, names, ranks.tolist(), shown.tolist(), strict=True)
            )
