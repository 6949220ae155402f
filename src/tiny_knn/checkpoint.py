"""Resuming: finished query batches go to disk at once, so an interrupted run continues where it stopped.

A checkpoint is a folder beside the output, `OUT.checkpoint/`, holding `scores.npy` and `indices.npy`
(memory-mapped, (Q, k), allocated on disk up front so that a full disk shows before any work) and
`manifest.json`: a fingerprint of the inputs (paths, sizes, modification times, and a hash of a sample of
their content, so that a file rewritten in place is noticed even with its size and time kept) and of every
option that changes the answer, and `done_rows`, the number of queries whose results are on disk.

Write order makes it safe against SIGKILL at any moment: the manifest is written first (no rows done), then
the arrays are allocated; a batch's rows are written and flushed to disk, and only then is the manifest
replaced (temporary file, fsync, rename, fsync of the folder). So the manifest never claims rows that are not
durable; rows past `done_rows` are simply computed again. Answers do not depend on batch or chunk sizes, so
those may differ between the run and its resumption.

A folder there that tiny-knn did not make (other files in it, a manifest it cannot read) is refused, never
deleted, even with --restart.

A run opens its checkpoint with `open_checkpoint` (disk space checked first); `reporting_stops` says, when the
run stops, what became of it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from .errors import InputChangedError, InvalidInputError, OutputError, is_disk_full, output_error
from .plan import INDEX_BYTES, SCORE_BYTES, Plan, format_bytes
from .sources import Source
from .store import MemoryStore

CHECKPOINT_SUFFIX = ".checkpoint"
MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: the fingerprint holds a content sample of each input file
# The version of tiny-knn's definition of an exact score (_kernels/tk.h): a checkpoint holds scores of one
# definition, whichever estimator found them.
SCORE_DEFINITION = 1
# Everything tiny-knn writes in a checkpoint folder.
CHECKPOINT_ENTRIES = frozenset({MANIFEST, MANIFEST + ".tmp", "scores.npy", "indices.npy"})
# The content sample of a fingerprint: the head and tail of each input, and SAMPLE_BLOCKS blocks spread evenly
# over it (over all the shards of a source, by size), read by SAMPLE_READERS threads at once: on a cold page
# cache the cost is the latency of a read, not its size (benchmarks/RESULTS.md).
SAMPLE_EDGE_BYTES = 64 * 1024
SAMPLE_BLOCKS = 256
SAMPLE_BLOCK_BYTES = 4096
SAMPLE_READERS = 16

# Progress notes (resuming, where an interrupted run's work is kept); the CLI prints them on stderr.
log = logging.getLogger("tiny_knn")


class CheckpointFolder:
    """What report_stop asks of a checkpoint, for every kind (top-k, range, dedup): its folder, the fingerprint it
    was made for, and a function giving the inputs' fingerprint now."""

    folder: str
    fingerprint: dict[str, Any]
    _fingerprint_now: Callable[[], dict[str, Any]]

    def inputs_changed(self) -> str:
        """'' while the inputs still match the checkpoint's fingerprint, else how they differ (an input gone, or
        no longer a regular file, differs)."""
        try:
            return difference(self.fingerprint, self._fingerprint_now())
        except OSError as exc:
            return f"an input cannot be read any more ({exc.strerror or exc}: '{exc.filename}')"

    def saved_rows(self) -> int:
        """The queries whose results the manifest on disk counts (what a resumed run will skip)."""
        manifest = read_manifest(self.folder)
        return 0 if manifest is None else int(manifest["done_rows"])

    def remove(self) -> None:
        """Deletes the checkpoint (after the final output is safely written, or when it can never be resumed)."""
        shutil.rmtree(self.folder, ignore_errors=True)


class Checkpoint(MemoryStore, CheckpointFolder):
    """Finished batches on disk, durable batch by batch (see the module docstring)."""

    def __init__(
        self,
        folder: str,
        fingerprint: Callable[[], dict[str, Any]],
        rows: int,
        k: int,
        done_rows: int,
        mark: dict[str, Any] | None = None,
    ) -> None:
        self.folder = folder
        self._fingerprint_now = fingerprint
        self.fingerprint = mark if mark is not None else fingerprint()
        self.rows = rows
        self.done_rows = done_rows
        if not done_rows:  # the manifest first: from here on the folder is known to be tiny-knn's
            self._write_manifest()
        try:
            self._arrays: list[np.memmap] = [self._array(name, dtype, (rows, k)) for name, dtype in _ARRAYS]
        except OSError as exc:
            if done_rows:  # resuming: an array is missing or unreadable
                raise OutputError(f"checkpoint '{folder}': damaged ({exc.strerror or exc}); delete the folder to "
                                  "start afresh") from None  # fmt: skip
            raise output_error(f"checkpoint '{folder}': cannot be created: {exc.strerror or exc}", exc) from None
        except ValueError as exc:  # an array damaged or of another shape
            raise OutputError(f"checkpoint '{folder}': damaged ({exc}); delete the folder to start afresh") from None
        self.scores = torch.from_numpy(self._arrays[0])
        self.indices = torch.from_numpy(self._arrays[1])

    def _array(self, name: str, dtype: type, shape: tuple[int, int]) -> np.memmap:
        path = self._path(name)
        if self.done_rows:
            if self.done_rows > shape[0]:
                raise ValueError(f"the manifest counts {self.done_rows} queries of {shape[0]}")
            with open(path, "rb") as stream:  # the header, then the exact size: a cut file would map zeros
                version = np.lib.format.read_magic(stream)
                if version not in ((1, 0), (2, 0)):  # tiny-knn's arrays take version 1.0
                    raise ValueError(f"{name} is a .npy file of version {version}")
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                found_shape, fortran, found_dtype = read_header(stream)
                expected = stream.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize
                size = os.fstat(stream.fileno()).st_size
            if found_shape != shape or found_dtype != dtype or fortran or size != expected:
                wanted = f"{np.dtype(dtype)} {shape} in {expected}"
                raise ValueError(f"{name} holds {found_dtype} {found_shape} in {size} bytes, expected {wanted}")
            return np.lib.format.open_memmap(path, mode="r+")
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        allocate(path)
        return array

    @classmethod
    def open(
        cls,
        output_path: str,
        fingerprint: Callable[[], dict[str, Any]],
        rows: int,
        k: int,
        *,
        restart: bool,
        wanted: bool,
    ) -> Checkpoint | None:
        """The checkpoint for `output_path`: resumed if one exists for the same inputs and options, else a
        new one if `wanted` (more than one batch), else None. `fingerprint()` is called only where needed.

        Raises:
            InvalidInputError: a checkpoint exists for other inputs or options (and not `restart`).
            OutputError: a folder there is not tiny-knn's checkpoint, or one cannot be created (no space).
        """
        folder = checkpoint_folder(output_path)
        manifest = existing_manifest(folder)
        if manifest is not None and (restart or not manifest):
            try:  # discarded, or killed before its first manifest: nothing in it counts
                shutil.rmtree(folder)
            except OSError as exc:
                raise output_error(f"checkpoint '{folder}': cannot be deleted: {exc.strerror or exc}", exc) from None
            manifest = None
        if manifest is None and not wanted:
            return None
        mark = fingerprint()
        if manifest is not None:
            difference_found = difference(manifest["fingerprint"], mark)
            if difference_found:
                raise InvalidInputError(
                    f"checkpoint '{folder}' belongs to another run ({difference_found}); "
                    "run with --restart to discard it, or choose another --output-path"
                )
            return cls(folder, fingerprint, rows, k, done_rows=manifest["done_rows"], mark=mark)
        try:
            os.mkdir(folder)
        except OSError as exc:
            raise output_error(f"checkpoint '{folder}': cannot be created: {exc.strerror or exc}", exc) from None
        try:
            return cls(folder, fingerprint, rows, k, done_rows=0, mark=mark)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def save(self, start: int, scores: torch.Tensor, indices: torch.Tensor) -> None:
        super().save(start, scores, indices)
        try:
            for array in self._arrays:
                array.flush()  # msync: the rows are on disk before the manifest says so
        except OSError as exc:
            raise output_error(f"checkpoint '{self.folder}': cannot be written: {exc.strerror or exc}", exc) from None
        self._write_manifest()

    def remove(self) -> None:
        self._arrays = []
        super().remove()

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def _write_manifest(self) -> None:
        temporary = self._path(MANIFEST + ".tmp")
        try:
            with open(temporary, "w", encoding="utf-8") as stream:
                json.dump({"fingerprint": self.fingerprint, "done_rows": self.done_rows}, stream, indent=1)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self._path(MANIFEST))
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise output_error(f"checkpoint '{self.folder}': cannot be written: {exc.strerror or exc}", exc) from None
        fsync_folder(self.folder)


_ARRAYS = (("scores.npy", np.float32), ("indices.npy", np.int64))


def open_checkpoint(
    target: str,
    fmt: str,
    queries: Source,
    docs: Source,
    plan: Plan,
    restart: bool,
    extra: tuple[str, ...] = (),
    count_output: bool = True,
) -> Checkpoint | None:
    """Resumes or creates the run's checkpoint (none for a single batch), after checking disk space. The
    inputs' fingerprint (`extra`: more files the answer depends on, such as ids files) is taken only where a
    checkpoint is made or resumed: it reads a sample of every input."""
    folder = checkpoint_folder(target)
    result_bytes = queries.rows * plan.k * (SCORE_BYTES + INDEX_BYTES)
    output_bytes = result_bytes * (4 if fmt == "trec" else 1) if count_output else 0  # TREC: ~4x the binary
    fresh = restart or not os.path.isdir(folder)
    wanted = plan.doc_passes > 1
    check_space(os.path.dirname(os.path.abspath(target)), output_bytes + (result_bytes if fresh and wanted else 0))

    def mark() -> dict[str, Any]:
        marked = fingerprint(queries, docs, plan, extra)
        if queries.first_row:
            marked["first_query"] = queries.first_row  # one rank's share
        return marked

    store = Checkpoint.open(target, mark, queries.rows, plan.k, restart=restart, wanted=wanted)
    if store is not None and store.done_rows:
        log.info(f"resuming from '{store.folder}': {store.done_rows} of {queries.rows} queries already done")
    return store


@contextlib.contextmanager
def reporting_stops(store: object, rows: int) -> Iterator[None]:
    """Says, when what runs inside stops, what became of the finished rows kept in the store's checkpoint (see
    report_stop)."""
    try:
        yield
    except BaseException as exc:
        if isinstance(store, Checkpoint):
            report_stop(store, rows, exc)
        raise


def report_stop(checkpoint: Checkpoint, rows: int, exc: BaseException) -> None:
    """The truth about a checkpoint once a run stopped: deleted where no run can ever resume it (an input
    changed, or holds bad values that must be fixed first); else how many queries its manifest counts, and
    what to do to continue."""
    changed = checkpoint.inputs_changed() if isinstance(exc, InputChangedError) else ""
    if changed or isinstance(exc, InvalidInputError):
        checkpoint.remove()
        why = f"its inputs changed: {changed}" if changed else "a run over the fixed inputs starts afresh"
        log.warning(f"deleted the checkpoint '{checkpoint.folder}': {why}")
        return
    saved = checkpoint.saved_rows()
    first = "free some space, then " if is_disk_full(exc) else ""
    if saved < rows:
        log.warning(
            f"stopped: {saved} of {rows} queries are saved in '{checkpoint.folder}'; "
            f"{first}run the same command again to continue"
        )
    else:
        log.warning(
            f"all {rows} queries are saved in '{checkpoint.folder}'; {first}run the same command again to write "
            "the result"
        )


def existing_manifest(folder: str) -> dict[str, Any] | None:
    """None when there is no checkpoint at `folder`; else its manifest, or {} for a checkpoint killed before
    its first manifest (only files tiny-knn writes there, no manifest).

    Raises:
        OutputError: something there that tiny-knn did not make, or a manifest it cannot read.
    """
    if not os.path.lexists(folder):
        return None
    if os.path.islink(folder) or not os.path.isdir(folder):
        raise OutputError(
            f"checkpoint path '{folder}' is not a folder tiny-knn made (a file or a link); "
            "remove it or choose another --output-path"
        )
    entries = set(os.listdir(folder))
    # Only regular files of tiny-knn's names; before its manifest, tiny-knn writes nothing but the manifest's
    # temporary file (the arrays come after it), so a folder without a manifest holds that at most.
    strangers = sorted(name for name in entries if name not in CHECKPOINT_ENTRIES or not _regular(folder, name))
    if MANIFEST not in entries:
        strangers += sorted(entries - {MANIFEST + ".tmp"} - set(strangers))
    if strangers:
        raise OutputError(
            f"checkpoint folder '{folder}' holds files tiny-knn did not write ({', '.join(strangers[:5])}); "
            "remove it or choose another --output-path"
        )
    if MANIFEST not in entries:
        return {}
    manifest = read_manifest(folder)
    if manifest is None:
        raise OutputError(
            f"checkpoint '{folder}': its manifest cannot be read (damaged?); delete the folder to start afresh, "
            "or choose another --output-path"
        )
    return manifest


def _regular(folder: str, name: str) -> bool:
    return stat.S_ISREG(os.lstat(os.path.join(folder, name)).st_mode)


def checkpoint_folder(output_path: str) -> str:
    return os.path.abspath(output_path).rstrip("/") + CHECKPOINT_SUFFIX


def fingerprint(queries: Source, docs: Source, plan: Plan, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Everything that changes the answer: the inputs as they are on disk (and the `extra` files, such as
    ids files, by content), and the options."""
    with ThreadPoolExecutor(SAMPLE_READERS, thread_name_prefix="tiny-knn-sample") as readers:
        return {
            "format": FORMAT_VERSION,
            "queries": describe(queries, readers),
            "docs": describe(docs, readers),
            "extra": [_describe_file(path, readers) for path in extra],
            "k": plan.k,
            "metric": plan.metric,
            "exclude_self": plan.exclude_self,
            "precision": plan.precision,
            "device": plan.device,
            "compute_dtype": str(plan.compute_dtype),
            # The screened path's scores are exact, whatever the estimator; the path by keys has the products' own
            "scores": f"exact {SCORE_DEFINITION}" if plan.estimator else "by keys",
        }


def content_fingerprint(source: Source) -> str:
    """A hash of a source's shape, dtype and its files' content samples (as `describe` takes them; no path or
    time): the same for the same rows wherever they lie and whatever they are called, so that results over the
    same queries are recognised as such on any machine (merge)."""
    with ThreadPoolExecutor(SAMPLE_READERS, thread_name_prefix="tiny-knn-sample") as readers:
        described = describe(source, readers)
    samples = [entry[3] for entry in described["files"]]
    text = json.dumps([described["rows"], described["dim"], described["dtype"], samples])
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def check_space(folder: str, needed: int) -> None:
    """Raises OutputError when the disk holding `folder` has less than `needed` bytes free."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise OutputError(
            f"output folder '{folder}': the result and its checkpoint need about {format_bytes(needed)}, "
            f"only {format_bytes(free)} is free; free some space or choose another --output-path"
        )


def describe(source: Source, readers: ThreadPoolExecutor) -> dict[str, Any]:
    """A source as it is on disk: its spec, shape and dtype, and each file's path, size, modification time and
    content sample (`SAMPLE_BLOCKS` blocks for the whole source, spread over its files by size)."""
    paths = source.files()
    sizes = [os.path.getsize(path) for path in paths]
    total = max(1, sum(sizes))
    spec = os.path.realpath(source.path) if os.path.exists(source.path) else source.path  # a file's any spelling
    return {
        "spec": spec,
        "rows": source.rows,
        "dim": source.dim,
        "dtype": str(source.dtype),
        "files": [
            _describe_file(path, readers, SAMPLE_BLOCKS * size // total)
            for path, size in zip(paths, sizes, strict=True)
        ],
    }


def _describe_file(path: str, readers: ThreadPoolExecutor, blocks: int = SAMPLE_BLOCKS) -> list[Any]:
    status = os.stat(path)
    return [os.path.abspath(path), status.st_size, status.st_mtime_ns, content_sample(path, readers, blocks)]


def content_sample(path: str, readers: ThreadPoolExecutor, blocks: int = SAMPLE_BLOCKS) -> str:
    """A hash of the file's size, head, tail and `blocks` blocks of SAMPLE_BLOCK_BYTES spread evenly between
    them (the whole file when that is about as much), the blocks read in parallel by `readers`."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # opening a FIFO would wait for a writer
        raise OSError(errno.EINVAL, "not a regular file", path)
    with open(path, "rb") as stream:
        descriptor = stream.fileno()
        size = os.fstat(descriptor).st_size
        if size <= 2 * SAMPLE_EDGE_BYTES + blocks * SAMPLE_BLOCK_BYTES:
            pieces = [(0, size)]
        else:
            spread = size - 2 * SAMPLE_EDGE_BYTES
            pieces = [(0, SAMPLE_EDGE_BYTES), (size - SAMPLE_EDGE_BYTES, SAMPLE_EDGE_BYTES)] + [
                (SAMPLE_EDGE_BYTES + spread * (i + 1) // (blocks + 1) // SAMPLE_BLOCK_BYTES * SAMPLE_BLOCK_BYTES,
                 SAMPLE_BLOCK_BYTES)
                for i in range(blocks)
            ]  # fmt: skip
        digest = hashlib.blake2b(str(size).encode(), digest_size=16)
        for data in readers.map(lambda piece: os.pread(descriptor, piece[1], piece[0]), pieces):
            digest.update(data)
    return digest.hexdigest()


def difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """'' when two fingerprints are equal, else a short account of the first difference."""
    for key, value in new.items():
        if old.get(key) != value:
            if key in ("queries", "docs") and isinstance(old.get(key), dict):
                changed = [name for name in value if old[key].get(name) != value[name]]
                detail = _file_change(old[key]["files"], value["files"]) if changed == ["files"] else ""
                return f"the {key} '{value['spec']}': " + (detail or ", ".join(changed) + " differ")
            if key == "extra":
                return "the ids or exclude-pairs files differ"
            return f"{key} was {old.get(key)!r}, now {value!r}"
    return ""


def _file_change(old: list[list[Any]], new: list[list[Any]]) -> str:
    """How the first changed file changed: its size, its time, or its content alone (rewritten in place)."""
    if [entry[0] for entry in old] != [entry[0] for entry in new]:
        return "other files"
    for before, after in zip(old, new, strict=True):
        if before == after:
            continue
        name = f"shard '{os.path.basename(after[0])}' " if len(new) > 1 else ""
        if before[1] != after[1]:
            return f"{name}changed size ({before[1]} bytes, now {after[1]})"
        if before[3:] != after[3:]:
            same_time = " with the same size and modification time" if before[2] == after[2] else ""
            return f"{name}rewritten (its content differs{same_time})"
        return f"{name}modified (its modification time changed)"
    return ""


def read_manifest(folder: str) -> dict[str, Any] | None:
    """The manifest, or None when it cannot be read or lacks tiny-knn's keys."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as stream:
            manifest: dict[str, Any] = json.load(stream)
        if isinstance(manifest, dict) and int(manifest["done_rows"]) >= 0 and isinstance(manifest["fingerprint"], dict):
            return manifest
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def allocate(path: str) -> None:
    """Reserves the file's blocks now: writing to a memory map on a full disk would kill the process."""
    with open(path, "rb+") as stream:
        size = os.fstat(stream.fileno()).st_size
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(stream.fileno(), 0, size)


def fsync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
