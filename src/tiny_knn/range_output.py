"""A range search's pairs on their way to disk: held, spilled and merged per batch of queries in a checkpoint folder
(RangeCheckpoint, a sink of ranges.search_ranges), then written as the result: parquet rows `query, doc, score`, or
an npy folder in CSR form (`offsets.npy` (Q + 1) int64, `indices.npy` int64, `scores.npy` float32: query q's pairs
are at offsets[q]:offsets[q + 1]), each query's pairs in ascending doc order. Memory stays bounded however many
pairs there are: a batch holds at most the plan's `held_pairs` in memory, and every copy after that is a piece at
a time.

The checkpoint (`OUT.checkpoint/`) is written in top-k's order (checkpoint.py): the manifest first; each finished
batch as three arrays (`segment-START.counts.npy`: the batch's pairs per query; `.docs.npy`; `.scores.npy`),
fsynced and renamed into place, and only then counted by the manifest (replaced atomically). A batch's spilled runs
(`run-START-N.*.npy`) and anything the manifest does not count are deleted when a run resumes, so a SIGKILL at any
moment costs at most the batch in progress.

Also `compute_ranges`, the file-level entry point the CLI calls in range mode, and MemorySink for range_search.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np
import torch

from . import distributed, results, safety
from .checkpoint import (
    CHECKPOINT_ENTRIES,
    MANIFEST,
    CheckpointFolder,
    allocate,
    checkpoint_folder,
    difference,
    fingerprint,
    fsync_folder,
    read_manifest,
    report_stop,
)
from .errors import InvalidInputError, OutputError, output_error
from .inputs import open_inputs
from .options import SearchOptions
from .ranges import RangePlan, describe_source_reads, estimate_pairs, plan_ranges, run_ranges
from .sources import open_source

RANGE_FORMATS = ("parquet", "npy")
KIND = "range"
# Pairs copied at a time when segments are merged or written out.
COPY_PAIRS = 1 << 20
# Rows of a parquet row group: pyarrow holds a row group's columns, encoded, until it is written, and a dictionary
# per column while it encodes one, so only the query column (a few values per row group) is dictionary-encoded:
# with every column's, writing 6 M pairs took 60 MB more anonymous memory (tests/test_ranges.py's memory test).
PARQUET_ROWS = 1 << 17
_ARRAYS = (("counts", np.int64), ("docs", np.int64), ("scores", np.float32))
_ENTRY = re.compile(r"manifest\.json(\.tmp)?|(segment-\d+|run-\d+-\d+)\.(counts|docs|scores)\.npy(\.tmp)?")

log = logging.getLogger("tiny_knn")


# ---- Formats and paths.


def range_format(path: str | None, requested: str | None, writes: str = "a range search") -> str:
    """parquet or npy: as asked, else from the output path (`.parquet`: parquet; no suffix: an npy folder).

    Raises:
        InvalidInputError: another format (a .pt's arrays are fixed-shape; TREC runs are ranked lists).
    """
    fixed = f"{writes} writes parquet or an npy folder"
    if requested is not None:
        if requested not in RANGE_FORMATS:
            raise InvalidInputError(f"format {requested!r}: {fixed} (--format parquet or npy)")
        return requested
    if path is None:
        return "parquet"
    suffix = os.path.splitext(safety.output_path(path))[1].lower()
    if suffix == ".parquet":
        return "parquet"
    if not suffix:
        return "npy"
    raise InvalidInputError(
        f"output path '{path}': {fixed}; name it OUT.parquet, or a folder (no suffix) for npy"
        + (" (a .pt result's arrays are fixed-shape)" if suffix in (".pt", ".pth") else "")
    )


def default_range_path(queries_path: str, docs_path: str, fmt: str) -> str:
    """`range_{queries}_x_{docs}.parquet` (or a folder, for npy), beside the queries (results.input_name)."""
    return results.default_pair_path("range", queries_path, docs_path, ".parquet" if fmt == "parquet" else "")


# ---- Pairs in memory.


def by_query(
    pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]], start: int, stop: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch's pieces of pairs (each sorted by (query, doc), a query's pieces in ascending doc order) as (pairs
    per query, docs, scores) in (query, doc) order: a stable sort by query keeps each query's docs ascending."""
    if not pieces:
        return np.zeros(stop - start, dtype=np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    queries = np.concatenate([piece[0] for piece in pieces])
    order = np.argsort(queries, kind="stable")
    counts = np.bincount(queries - start, minlength=stop - start).astype(np.int64)
    del queries
    docs = np.concatenate([piece[1] for piece in pieces])[order]
    scores = np.concatenate([piece[2] for piece in pieces])[order]
    return counts, docs, scores


class MemorySink:
    """Every pair in memory (range_search: small cases). result(): offsets, indices, scores in CSR form."""

    def __init__(self) -> None:
        self.done_rows = 0
        self._batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._batch = (0, 0)

    def begin_batch(self, start: int, stop: int) -> None:
        self._batch, self._pieces = (start, stop), []

    def add(self, queries: np.ndarray, docs: np.ndarray, scores: np.ndarray) -> None:
        self._pieces.append((queries, docs, scores))

    def end_batch(self) -> None:
        self._batches.append(by_query(self._pieces, *self._batch))
        self._pieces = []
        self.done_rows = self._batch[1]

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        counts = np.concatenate([batch[0] for batch in self._batches]) if self._batches else np.empty(0, np.int64)
        offsets = np.zeros(counts.size + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        docs = np.concatenate([batch[1] for batch in self._batches]) if self._batches else np.empty(0, np.int64)
        scores = np.concatenate([batch[2] for batch in self._batches]) if self._batches else np.empty(0, np.float32)
        return torch.from_numpy(offsets), torch.from_numpy(docs), torch.from_numpy(scores)


# ---- Checkpoint folders of other kinds than top-k's (a range search's; dedup's).


def open_checkpoint_folder(
    target: str, kind: str, entry: re.Pattern[str], mark: dict[str, Any], restart: bool
) -> tuple[str, dict[str, Any] | None]:
    """The checkpoint folder of `target` for a run of `kind`, and its manifest where a run of the same inputs and
    options left one to resume (None: the folder is new, empty). Only tiny-knn's own folders are ever deleted (with
    --restart, or one killed before its first manifest): names matching `entry`, or a top-k checkpoint's.

    Raises:
        OutputError: something there that tiny-knn did not make, or a manifest it cannot read.
        InvalidInputError: a checkpoint of another run (another kind, inputs or options), without `restart`.
    """
    folder = checkpoint_folder(target)
    if os.path.lexists(folder):
        if os.path.islink(folder) or not os.path.isdir(folder):
            raise OutputError(
                f"checkpoint path '{folder}' is not a folder tiny-knn made (a file or a link); "
                "remove it or choose another --output-path"
            )
        entries = set(os.listdir(folder))
        regular = all(stat.S_ISREG(os.lstat(os.path.join(folder, name)).st_mode) for name in entries)
        ours = all(entry.fullmatch(name) for name in entries) and regular
        top_k = entries <= CHECKPOINT_ENTRIES and regular
        if not (ours or top_k) or (MANIFEST not in entries and entries - {MANIFEST + ".tmp"}):
            shown = ", ".join(sorted(entries)[:5])
            raise OutputError(
                f"checkpoint folder '{folder}' holds files tiny-knn did not write ({shown}); "
                "remove it or choose another --output-path"
            )
        manifest = read_manifest(folder) if MANIFEST in entries else {}
        if manifest is None:
            raise OutputError(
                f"checkpoint '{folder}': its manifest cannot be read (damaged?); delete the folder to start afresh, "
                "or choose another --output-path"
            )
        if manifest and not restart:
            if manifest.get("kind", "topk") != kind:
                raise InvalidInputError(
                    f"checkpoint '{folder}' belongs to another run (a {manifest.get('kind', 'top-k')} search); run "
                    "with --restart to discard it, or choose another --output-path"
                )
            difference_found = difference(manifest["fingerprint"], mark)
            if difference_found:
                raise InvalidInputError(
                    f"checkpoint '{folder}' belongs to another run ({difference_found}); "
                    "run with --restart to discard it, or choose another --output-path"
                )
            return folder, manifest
        try:  # discarded, or killed before its first manifest: nothing in it counts
            shutil.rmtree(folder)
        except OSError as exc:
            raise output_error(f"checkpoint '{folder}': cannot be deleted: {exc.strerror or exc}", exc) from None
    try:
        os.mkdir(folder)
    except OSError as exc:
        raise output_error(f"checkpoint '{folder}': cannot be created: {exc.strerror or exc}", exc) from None
    return folder, None


def write_manifest(folder: str, manifest: dict[str, Any]) -> None:
    """Replaces the folder's manifest atomically: a temporary file, fsync, rename, fsync of the folder."""
    temporary = os.path.join(folder, MANIFEST + ".tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump(manifest, stream, indent=1)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, os.path.join(folder, MANIFEST))
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise output_error(f"checkpoint '{folder}': cannot be written: {exc.strerror or exc}", exc) from None
    fsync_folder(folder)


def load_array(path: str, dtype: type, length: int | None) -> np.ndarray:
    """A 1-D .npy array of tiny-knn's, memory-mapped (read-only), checked to be exactly that: its dtype, its
    length (if given) and a file of exactly its size (a cut file would map zeros).

    Raises:
        ValueError: it is not.
    """
    with open(path, "rb") as stream:
        version = np.lib.format.read_magic(stream)
        if version != (1, 0):
            raise ValueError(f"{os.path.basename(path)} is a .npy file of version {version}")
        shape, fortran, found = np.lib.format.read_array_header_1_0(stream)
        header = stream.tell()
        size = os.fstat(stream.fileno()).st_size
    if len(shape) != 1 or found != np.dtype(dtype) or fortran or (length is not None and shape[0] != length):
        raise ValueError(f"{os.path.basename(path)} holds {found} {shape}, expected {np.dtype(dtype)} of {length}")
    if size != header + shape[0] * np.dtype(dtype).itemsize:
        raise ValueError(f"{os.path.basename(path)} is {size} bytes, expected {header + shape[0] * found.itemsize}")
    if not shape[0]:
        return np.empty(0, dtype=dtype)
    return cast(np.ndarray, np.load(path, mmap_mode="r"))


# ---- The range checkpoint: the sink on disk.


class RangeCheckpoint(CheckpointFolder):
    """Finished batches of pairs on disk, durable batch by batch (see the module docstring); a PairSink."""

    def __init__(self, folder: str, manifest: dict[str, Any], held_pairs: int) -> None:
        self.folder = folder
        self.fingerprint = manifest["fingerprint"]
        self.segments: list[tuple[int, int, int]] = [tuple(segment) for segment in manifest["segments"]]
        self.done_rows = int(manifest["done_rows"])
        self.pairs = sum(segment[2] for segment in self.segments)
        self.held_pairs = held_pairs
        self._fingerprint_now: Callable[[], dict[str, Any]] = lambda: self.fingerprint
        self._batch = (0, 0)
        self._held: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._held_count = 0
        self._runs: list[tuple[str, int]] = []

    @classmethod
    def open(
        cls, target: str, mark: Callable[[], dict[str, Any]], rows: int, held_pairs: int, restart: bool
    ) -> RangeCheckpoint:
        """Resumes the checkpoint of `target` for the same inputs and options, or starts one.

        Raises:
            OutputError: not tiny-knn's folder, or damaged (its segments are not what the manifest says).
            InvalidInputError: a checkpoint of another run, without `restart`.
        """
        fingerprint_now = mark()
        folder, manifest = open_checkpoint_folder(target, KIND, _ENTRY, fingerprint_now, restart)
        fresh = manifest is None
        if manifest is None:
            manifest = {"kind": KIND, "fingerprint": fingerprint_now, "done_rows": 0, "segments": []}
            write_manifest(folder, manifest)  # first: from here on the folder is known to be tiny-knn's
        store = cls(folder, manifest, held_pairs)
        store._fingerprint_now = mark
        if not fresh:
            store._check(rows)
            store._drop_uncounted()
            if store.done_rows:
                log.info(f"resuming from '{folder}': {store.done_rows} of {rows} queries already done")
        return store

    def _check(self, rows: int) -> None:
        expected = 0
        try:
            for start, stop, pairs in self.segments:
                if start != expected or stop <= start or pairs < 0:
                    raise ValueError(f"the manifest's segments do not follow each other at query {start}")
                counts = load_array(self._path(start, "counts"), np.int64, stop - start)
                if int(counts.sum()) != pairs or (counts < 0).any():
                    raise ValueError(f"segment {start} counts {int(counts.sum())} pairs, the manifest {pairs}")
                for name, dtype in _ARRAYS[1:]:
                    load_array(self._path(start, name), dtype, pairs)
                expected = stop
            if expected != self.done_rows or self.done_rows > rows:
                raise ValueError(f"the manifest counts {self.done_rows} queries, its segments {expected} of {rows}")
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise OutputError(
                f"checkpoint '{self.folder}': damaged ({reason}); delete the folder to start afresh"
            ) from None

    def _drop_uncounted(self) -> None:
        """Deletes what a killed run left that the manifest does not count (runs, unfinished segments)."""
        kept = {MANIFEST} | {os.path.basename(self._path(start, name)) for start, _, _ in self.segments
                             for name, _ in _ARRAYS}  # fmt: skip
        for name in set(os.listdir(self.folder)) - kept:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.folder, name))

    def _path(self, start: int, name: str, prefix: str = "segment") -> str:
        return os.path.join(self.folder, f"{prefix}-{start:012d}.{name}.npy")

    # PairSink

    def begin_batch(self, start: int, stop: int) -> None:
        self._batch, self._held, self._held_count, self._runs = (start, stop), [], 0, []

    def add(self, queries: np.ndarray, docs: np.ndarray, scores: np.ndarray) -> None:
        self._held.append((queries, docs, scores))
        self._held_count += queries.size
        self.pairs += queries.size
        if self._held_count >= self.held_pairs:
            self._spill()

    def _spill(self) -> None:
        """The pairs held, sorted by query, to a run of the batch on disk."""
        arrays = by_query(self._held, *self._batch)
        self._held, self._held_count = [], 0
        prefix = os.path.join(self.folder, f"run-{self._batch[0]:012d}-{len(self._runs):06d}")
        with self._guarded():
            for (name, _), array in zip(_ARRAYS, arrays, strict=True):
                results.save_array(f"{prefix}.{name}.npy", array, durable=False)
        self._runs.append((prefix, int(arrays[1].size)))

    def end_batch(self) -> None:
        start, stop = self._batch
        last = by_query(self._held, start, stop)
        self._held, self._held_count = [], 0
        with self._guarded():
            if self._runs:
                pairs = self._merge_runs(last)
            else:
                pairs = int(last[1].size)
                for (name, _), array in zip(_ARRAYS, last, strict=True):
                    results.save_array(self._path(start, name) + ".tmp", array)
            del last
            for name, _ in _ARRAYS:
                os.replace(self._path(start, name) + ".tmp", self._path(start, name))
        for prefix, _ in self._runs:
            for name, _ in _ARRAYS:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{prefix}.{name}.npy")
        self._runs = []
        fsync_folder(self.folder)
        self.segments.append((start, stop, pairs))
        self.done_rows = stop
        write_manifest(self.folder, self._manifest())

    def _merge_runs(self, last: tuple[np.ndarray, np.ndarray, np.ndarray]) -> int:
        """The batch's segment from its runs on disk and the pairs still held (`last`), each query's pairs from
        each run in turn (each run holds later docs than the one before, for any query), copied a piece at a
        time into the segment's files. Returns its pairs."""
        start = self._batch[0]
        runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [
            (np.load(f"{prefix}.counts.npy"), *(load_array(f"{prefix}.{name}.npy", dtype, pairs)
                                               for name, dtype in _ARRAYS[1:]))
            for prefix, pairs in self._runs
        ]  # fmt: skip
        runs.append(last)
        counts = np.sum([run[0] for run in runs], axis=0).astype(np.int64)
        total = int(counts.sum())
        results.save_array(self._path(start, "counts") + ".tmp", counts)
        outputs, paths = [], []
        for name, dtype in _ARRAYS[1:]:
            path = self._path(start, name) + ".tmp"
            paths.append(path)
            outputs.append(np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(total,)))
            allocate(path)  # the blocks now: writing to a memory map on a full disk would kill the process
        written = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)  # each query's next position
        for run_counts, run_docs, run_scores in runs:
            run_offsets = np.concatenate(([0], np.cumsum(run_counts))).astype(np.int64)
            for lo in range(0, int(run_offsets[-1]), COPY_PAIRS):
                hi = min(lo + COPY_PAIRS, int(run_offsets[-1]))
                at = np.arange(lo, hi, dtype=np.int64)
                query = np.searchsorted(run_offsets, at, side="right") - 1
                destination = written[query] + (at - run_offsets[query])
                outputs[0][destination] = run_docs[lo:hi]
                outputs[1][destination] = run_scores[lo:hi]
            written += run_counts
        for output, path in zip(outputs, paths, strict=True):
            output.flush()
            with open(path, "rb+") as stream:
                os.fsync(stream.fileno())
        del outputs, runs
        return total

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        """A failure to write (a full disk) as an OutputError that keeps its errno, with the batch's files not yet
        counted deleted."""
        try:
            yield
        except OSError as exc:
            start = self._batch[0]
            for name, _ in _ARRAYS:
                with contextlib.suppress(OSError):
                    os.unlink(self._path(start, name) + ".tmp")
            raise output_error(f"checkpoint '{self.folder}': cannot be written: {exc.strerror or exc}", exc) from None

    def _manifest(self) -> dict[str, Any]:
        return {"kind": KIND, "fingerprint": self.fingerprint, "done_rows": self.done_rows,
                "segments": [list(segment) for segment in self.segments]}  # fmt: skip

    # What a finished search is written from

    def segment_arrays(self) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
        """(start, stop, pairs per query, docs, scores) of each segment, in order, the last two memory-mapped."""
        for start, stop, pairs in self.segments:
            counts = np.load(self._path(start, "counts"))
            docs = load_array(self._path(start, "docs"), np.int64, pairs)
            scores = load_array(self._path(start, "scores"), np.float32, pairs)
            yield start, stop, counts, docs, scores


@contextlib.contextmanager
def reporting_stops(store: object, rows: int) -> Iterator[None]:
    """checkpoint.reporting_stops for this module's and dedup's checkpoints: what became of the finished rows."""
    try:
        yield
    except BaseException as exc:
        report_stop(cast(Any, store), rows, exc)
        raise


# ---- Writing the result.


def write_range_output(
    path: str, fmt: str, store: RangeCheckpoint, rows: int, meta: dict[str, Any], ids: dict[str, list[str]]
) -> None:
    """The result from the store's segments, atomically (see the module docstring).

    Raises:
        OutputError: it cannot be written there (disk full, permissions); nothing is left behind.
    """
    if fmt == "npy":
        results.write_folder(path, lambda folder: _fill_csr_folder(folder, store, rows, meta, ids))
    else:
        results.write_atomically(path, lambda temporary: _write_range_parquet(temporary, store, meta, ids))


def _fill_csr_folder(
    folder: str, store: RangeCheckpoint, rows: int, meta: dict[str, Any], ids: dict[str, list[str]]
) -> None:
    offsets = np.zeros(rows + 1, dtype=np.int64)
    for start, stop, counts, _, _ in store.segment_arrays():
        offsets[start + 1 : stop + 1] = counts
    np.cumsum(offsets, out=offsets)
    total = int(offsets[-1])
    results.save_array(os.path.join(folder, "offsets.npy"), offsets)
    for name, dtype in (("indices", np.int64), ("scores", np.float32)):
        path = os.path.join(folder, f"{name}.npy")
        if not total:
            results.save_array(path, np.empty(0, dtype=dtype))
            continue
        output = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(total,))
        allocate(path)
        for start, _, _, docs, scores in store.segment_arrays():
            at = int(offsets[start])
            values = docs if name == "indices" else scores
            for lo in range(0, values.size, COPY_PAIRS):
                piece = values[lo : lo + COPY_PAIRS]
                output[at + lo : at + lo + piece.size] = piece
        output.flush()
        del output
        with open(path, "rb+") as stream:
            os.fsync(stream.fileno())
    results.write_meta(folder, meta, ids)


def _write_range_parquet(path: str, store: RangeCheckpoint, meta: dict[str, Any], ids: dict[str, list[str]]) -> None:
    pa, pq = results.output_pyarrow(path)
    query_ids, doc_ids = ids.get("query_ids"), ids.get("doc_ids")
    lookup_q = None if query_ids is None else np.asarray(query_ids, dtype=object)
    lookup_d = None if doc_ids is None else np.asarray(doc_ids, dtype=object)
    schema = pa.schema(
        [("query", results.id_type(pa, lookup_q)), ("doc", results.id_type(pa, lookup_d)), ("score", pa.float32())]
    ).with_metadata({"tiny_knn": json.dumps(meta)})
    with pq.ParquetWriter(path, schema, use_dictionary=["query"]) as writer:
        for start, _, counts, docs, scores in store.segment_arrays():
            offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
            for lo in range(0, docs.size, PARQUET_ROWS):
                hi = min(lo + PARQUET_ROWS, docs.size)
                queries = start + np.searchsorted(offsets, np.arange(lo, hi, dtype=np.int64), side="right") - 1
                piece_docs = np.asarray(docs[lo:hi])
                table = pa.table(
                    {
                        "query": pa.array(queries if lookup_q is None else lookup_q[queries], type=schema[0].type),
                        "doc": pa.array(piece_docs if lookup_d is None else lookup_d[piece_docs], type=schema[1].type),
                        "score": pa.array(np.asarray(scores[lo:hi])),
                    },
                    schema=schema,
                )
                writer.write_table(table)


# ---- The file-level entry point.


def compute_ranges(
    q_path: str,
    d_path: str,
    threshold: float,
    k: int | None = None,
    out_path: str | None = None,
    *,
    options: SearchOptions,
    output_format: str | None = None,
    query_ids: str | None = None,
    doc_ids: str | None = None,
    exclude_pairs: str | None = None,
    restart: bool = False,
    progress: bool = False,
) -> str:
    """Every (query, doc) pair within the radius `threshold` (scores >= it for ip and cosine; squared distances <=
    it for l2), at most `k` per query (the best) where k is given, streamed to `out_path` (parquet or an npy CSR
    folder). Resumable like compute_topk. Returns the path of the result.

    Raises:
        InputFileError, InvalidInputError, OutputError, MemoryBudgetError: as compute_topk.
    """
    if distributed.current_job() is not None:
        raise InvalidInputError("range search does not run under torchrun; run it as one process")
    id_paths = {role: path for role, path in (("query", query_ids), ("doc", doc_ids)) if path is not None}
    opened = open_inputs(q_path, d_path, options.exclude_self, id_paths, exclude_pairs)
    queries, docs, ids, excluded = opened.queries, opened.docs, opened.ids, opened.excluded
    fmt = range_format(out_path, output_format)
    target = safety.output_path(out_path if out_path is not None else default_range_path(q_path, d_path, fmt))
    results.check_format(target, fmt)
    inputs = safety.Inputs.of([queries, docs], opened.others)
    safety.check_output_path(target, fmt, inputs, folder_kind=KIND)
    plan = plan_ranges(queries, docs, threshold, options, cap=k)
    extra = opened.other_files

    def mark() -> dict[str, Any]:
        return {**fingerprint(queries, docs, plan.search, extra), KIND: range_key(plan)}

    with safety.held(safety.OutputLock(target)):
        store = RangeCheckpoint.open(target, mark, queries.rows, plan.held_pairs, restart)
        with reporting_stops(store, queries.rows):
            run_ranges(queries, docs, plan, store, progress, excluded, found_before=store.pairs)
            meta = {
                "kind": KIND,
                "queries_path": q_path,
                "docs_path": d_path,
                "k": plan.cap,
                **range_key(plan),
                "pairs": store.pairs,
                "dtype": str(queries.dtype),
                "version": _version(),
                **({"exclude_pairs": exclude_pairs} if exclude_pairs is not None else {}),
            }
            safety.check_before_writing(target, fmt, inputs, folder_kind=KIND)
            write_range_output(target, fmt, store, queries.rows, meta, ids)
        store.remove()
    return target


def range_key(plan: RangePlan) -> dict[str, Any]:
    """What makes a range search's answer, besides the inputs and the metric: for its fingerprint and metadata."""
    return {
        "metric": plan.search.metric,
        "threshold": plan.bound,
        "in_range": "distance <= threshold" if plan.search.metric == "l2" else "score >= threshold",
        "cap": plan.cap,
        "exclude_self": plan.search.exclude_self,
        "triangle": plan.triangle,
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tiny-knn")
    except PackageNotFoundError:
        return "unknown"


def run_command(args: argparse.Namespace, options: SearchOptions) -> str:
    """The search command in range mode (--min-score or --max-distance), for cli.py (which reports errors): the
    output's path, or the plan and an estimate of the pairs with --dry-run."""
    if args.min_score is not None and args.max_distance is not None:
        raise InvalidInputError("give --min-score (ip, cosine) or --max-distance (l2), not both")
    if args.metric == "l2" and args.min_score is not None:
        raise InvalidInputError("--min-score is a score for ip and cosine; with --metric l2 give --max-distance")
    if args.metric != "l2" and args.max_distance is not None:
        raise InvalidInputError(f"--max-distance is a squared distance for --metric l2; with {args.metric} give "
                                "--min-score")  # fmt: skip
    threshold = args.min_score if args.min_score is not None else args.max_distance
    if args.dry_run:
        queries, docs = open_source(args.queries, "queries"), open_source(args.docs, "docs")
        plan = plan_ranges(queries, docs, threshold, options, cap=args.k)
        _, estimate = estimate_pairs(queries, docs, plan)
        return "\n".join([*plan.describe(), f"pairs: {estimate}", describe_source_reads(queries, docs, plan)])
    return compute_ranges(
        args.queries,
        args.docs,
        threshold,
        args.k,
        args.output_path,
        options=options,
        output_format=args.format,
        query_ids=args.query_ids,
        doc_ids=args.doc_ids,
        exclude_pairs=args.exclude_pairs,
        restart=args.restart,
        progress=not args.quiet,
    )
