"""`tiny-knn dedup`: exact de-duplication of a corpus. A self range search (ranges.py) of each row against the rows
after it, so that each pair is scored once, feeds its pairs straight into a union-find over the rows (O(rows)
memory, never the pairs); the connected components are the groups, written one row per input row: `row, group,
representative`, where the representative is the group's lowest row and groups are numbered 0, 1, ... in the order
of their representatives. A row with no neighbour is a group of one.

The union-find links a root to the lowest root it meets, so every row's parent is a row at or below it in the same
group. Any subset of its writes keeps that true, so the forest stays valid whatever a SIGKILL interrupts: its array
lives in the checkpoint folder (`OUT.checkpoint/parent.npy`, memory-mapped), flushed after each batch before the
manifest counts the batch; a resumed run redoes at most the batch in progress, whose unions are all of true pairs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from . import distributed, results, safety
from .checkpoint import CheckpointFolder, allocate, fingerprint
from .errors import InvalidInputError, OutputError, output_error
from .options import SearchOptions
from .plan import format_bytes, parse_size
from .range_output import (
    PARQUET_ROWS,
    RANGE_FORMATS,
    open_checkpoint_folder,
    range_format,
    range_key,
    reporting_stops,
    write_manifest,
)
from .ranges import estimate_pairs, plan_ranges, run_ranges
from .sources import open_source

KIND = "dedup"
DEFAULT_METRIC = "cosine"
_ENTRY = re.compile(r"manifest\.json(\.tmp)?|parent\.npy")
# Rows handled at a time where a pass over every row would otherwise copy them all at once.
PIECE_ROWS = 1 << 20

log = logging.getLogger("tiny_knn")


class UnionFind:
    """Groups of rows, as a forest in one int64 array: parent[x] <= x, in x's group; a root is its own parent and
    its group's lowest row."""

    def __init__(self, parent: np.ndarray) -> None:
        self.parent = parent

    def find(self, nodes: np.ndarray) -> np.ndarray:
        """The roots of `nodes`, halving the paths walked and pointing the nodes themselves at their roots."""
        parent = self.parent
        roots: np.ndarray = parent[nodes]
        active = np.flatnonzero(parent[roots] != roots)
        while active.size:
            walked = roots[active]
            grand = parent[parent[walked]]
            parent[walked] = grand
            roots[active] = grand
            active = active[parent[grand] != grand]
        parent[nodes] = roots
        return roots

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Joins the groups of each pair (a[i], b[i]): each higher root is linked to the lowest root it is paired
        with, until every pair shares a root."""
        while a.size:
            root_a, root_b = self.find(a), self.find(b)
            apart = root_a != root_b
            if not apart.any():
                return
            low = np.minimum(root_a[apart], root_b[apart])
            high = np.maximum(root_a[apart], root_b[apart])
            np.minimum.at(self.parent, high, low)
            a, b = low, high

    def groups(self) -> tuple[np.ndarray, np.ndarray]:
        """(group, representative) of every row: representatives are the groups' lowest rows, and groups are
        numbered 0, 1, ... in their order."""
        root = np.array(self.parent, dtype=np.int64)
        while True:
            above = root[root]
            if np.array_equal(above, root):
                break
            root = above
        del above
        is_root = root == np.arange(root.size, dtype=np.int64)
        number = np.cumsum(is_root) - 1
        return number[root], root


class DedupCheckpoint(CheckpointFolder):
    """The union-find's array on disk and a manifest (done_rows, pairs): a PairSink for ranges.search_ranges."""

    def __init__(self, folder: str, manifest: dict[str, Any], parent: np.memmap) -> None:
        self.folder = folder
        self.fingerprint = manifest["fingerprint"]
        self.done_rows = int(manifest["done_rows"])
        self.pairs = int(manifest.get("pairs", 0))
        self.forest = UnionFind(parent)
        self._parent = parent
        self._batch_stop = self.done_rows
        self._fingerprint_now: Callable[[], dict[str, Any]] = lambda: self.fingerprint

    @classmethod
    def open(cls, target: str, mark: Callable[[], dict[str, Any]], rows: int, restart: bool) -> DedupCheckpoint:
        """Resumes the checkpoint of `target` for the same input and options, or starts one.

        Raises:
            OutputError: not tiny-knn's folder, or damaged.
            InvalidInputError: a checkpoint of another run, without `restart`.
        """
        fingerprint_now = mark()
        folder, manifest = open_checkpoint_folder(target, KIND, _ENTRY, fingerprint_now, restart)
        path = os.path.join(folder, "parent.npy")
        if manifest is None:
            manifest = {"kind": KIND, "fingerprint": fingerprint_now, "done_rows": 0, "pairs": 0}
            write_manifest(folder, manifest)  # first: from here on the folder is known to be tiny-knn's
        try:
            if not int(manifest["done_rows"]) or not os.path.exists(path):
                if int(manifest["done_rows"]):
                    raise ValueError("parent.npy is missing")
                # No batch counted: the array starts (again) as every row its own group
                parent = np.lib.format.open_memmap(path, mode="w+", dtype=np.int64, shape=(rows,))
                allocate(path)
                for start in range(0, rows, PIECE_ROWS):
                    parent[start : start + PIECE_ROWS] = np.arange(start, min(start + PIECE_ROWS, rows))
                parent.flush()
            else:
                parent = _open_parent(path, rows, int(manifest["done_rows"]))
                log.info(f"resuming from '{folder}': {manifest['done_rows']} of {rows} rows already done")
        except ValueError as exc:
            raise OutputError(f"checkpoint '{folder}': damaged ({exc}); delete the folder to start afresh") from None
        except OSError as exc:
            raise output_error(f"checkpoint '{folder}': cannot be written: {exc.strerror or exc}", exc) from None
        store = cls(folder, manifest, parent)
        store._fingerprint_now = mark
        return store

    # PairSink

    def begin_batch(self, start: int, stop: int) -> None:
        self._batch_stop = stop

    def add(self, queries: np.ndarray, docs: np.ndarray, scores: np.ndarray) -> None:
        self.pairs += queries.size
        self.forest.union(queries, docs)

    def end_batch(self) -> None:
        """The batch's unions on disk (msync), then counted by the manifest, with the pairs found so far."""
        try:
            self._parent.flush()
        except OSError as exc:
            raise output_error(f"checkpoint '{self.folder}': cannot be written: {exc.strerror or exc}", exc) from None
        self.done_rows = self._batch_stop
        manifest = {"kind": KIND, "fingerprint": self.fingerprint, "done_rows": self.done_rows, "pairs": self.pairs}
        write_manifest(self.folder, manifest)

    def remove(self) -> None:
        del self._parent
        self.forest = UnionFind(np.empty(0, dtype=np.int64))
        super().remove()


def _open_parent(path: str, rows: int, done_rows: int) -> np.memmap:
    """The union-find's array of a checkpoint, checked: rows int64 values, each a row at or below its own."""
    with open(path, "rb") as stream:
        version = np.lib.format.read_magic(stream)
        if version != (1, 0):
            raise ValueError(f"parent.npy is a .npy file of version {version}")
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        expected = stream.tell() + rows * 8
        size = os.fstat(stream.fileno()).st_size
    if shape != (rows,) or dtype != np.int64 or fortran or size != expected:
        raise ValueError(f"parent.npy holds {dtype} {shape} in {size} bytes, expected int64 ({rows},) in {expected}")
    parent = np.lib.format.open_memmap(path, mode="r+")
    for start in range(0, rows, PIECE_ROWS):
        piece = np.asarray(parent[start : start + PIECE_ROWS])
        own = np.arange(start, start + piece.size, dtype=np.int64)
        if ((piece < 0) | (piece > own)).any():
            raise ValueError("parent.npy holds a row above its own")
    return parent


# ---- The command.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiny-knn dedup",
        description="Exact de-duplication: every pair of rows within the threshold (scored once each, exactly), "
        "joined into groups (connected components: a~b and b~c put a, b and c in one group even where a and c are "
        "not within it). Writes one row per input row: row, group, representative (the group's lowest row; groups "
        "are numbered 0, 1, ... in the order of their representatives). A summary (rows, pairs, groups, largest "
        "group) goes to stderr, the output's path to stdout. Resumable: the same command continues an interrupted "
        "run.",
    )
    parser.add_argument("embeddings", metavar="EMB", help="the rows to de-duplicate, in any format tiny-knn reads")
    parser.add_argument(
        "--threshold",
        type=float,
        required=True,
        metavar="T",
        help="rows within T are duplicates: cosine (and ip) scores >= T, or l2 squared distances <= T (T is rounded "
        "to float32 first)",
    )
    parser.add_argument("--metric", choices=("cosine", "ip", "l2"), default=DEFAULT_METRIC, help="(default: cosine)")
    parser.add_argument(
        "--output-path",
        metavar="OUT.parquet",
        help="the groups: OUT.parquet (row, group, representative) or a folder (no suffix, or --format npy) of "
        "group.npy and representative.npy, indexed by row (default: dedup_EMB.parquet beside EMB)",
    )
    parser.add_argument("--format", choices=RANGE_FORMATS, help="parquet or npy (default: from --output-path)")
    parser.add_argument("--keep-list", metavar="FILE", help="also write the rows to keep (each group's "
                        "representative) to FILE, one row number a line")  # fmt: skip
    parser.add_argument("--max-memory", metavar="SIZE", help="memory budget, e.g. 512MB or 8GiB (default: 60%% of "
                        "what is free)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, metavar="N", help="rows per pass over the corpus (default: planned)")
    parser.add_argument("--chunk-size", type=int, metavar="N", help="rows per chunk read (default: planned)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and an estimate of the pairs, exit")
    parser.add_argument("--restart", action="store_true", help="discard an interrupted run's checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, summary or notes on stderr")
    return parser


def run(args: argparse.Namespace) -> str:
    """The command's work, for cli.py (which reports errors): the output's path, or the plan with --dry-run."""
    if args.max_memory is not None:
        try:
            args.max_memory = parse_size(args.max_memory)
        except ValueError as exc:
            raise InvalidInputError(f"--max-memory: {exc}") from None
    options = SearchOptions(
        force_cpu=True,
        max_memory=args.max_memory,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        metric=args.metric,
    )
    if args.dry_run:
        queries, docs = open_source(args.embeddings, "queries"), open_source(args.embeddings, "docs")
        plan = plan_ranges(queries, docs, args.threshold, options, triangle=True)
        _, estimate = estimate_pairs(queries, docs, plan)
        return "\n".join([*plan.describe(), f"pairs: {estimate}", f"corpus: {format_bytes(docs.nbytes)}"])
    return dedup_file(
        args.embeddings,
        args.threshold,
        options=options,
        out_path=args.output_path,
        output_format=args.format,
        keep_list=args.keep_list,
        restart=args.restart,
        progress=not args.quiet,
        summary=not args.quiet,
    )


def dedup_file(
    embeddings: str,
    threshold: float,
    *,
    options: SearchOptions,
    out_path: str | None = None,
    output_format: str | None = None,
    keep_list: str | None = None,
    restart: bool = False,
    progress: bool = False,
    summary: bool = False,
) -> str:
    """De-duplicates the rows of `embeddings` (see the module docstring). Returns the output's path.

    Raises:
        InputFileError, InvalidInputError, OutputError, MemoryBudgetError: as compute_topk.
    """
    if distributed.current_job() is not None:
        raise InvalidInputError("tiny-knn dedup does not run under torchrun; run it as one process")
    queries, docs = open_source(embeddings, "queries"), open_source(embeddings, "docs")
    fmt = range_format(out_path, output_format, writes="tiny-knn dedup")
    target = safety.output_path(out_path if out_path is not None else _default_path(embeddings, fmt))
    results.check_format(target, fmt)
    inputs = safety.Inputs.of([docs])
    safety.check_output_path(target, fmt, inputs, folder_kind=KIND)
    if keep_list is not None:
        if os.path.abspath(keep_list) == os.path.abspath(target):
            raise OutputError(f"keep list '{keep_list}' is the output path; choose another name")
        safety.check_output_path(keep_list, "keep-list", inputs)
    plan = plan_ranges(queries, docs, threshold, options, triangle=True)

    def mark() -> dict[str, Any]:
        return {**fingerprint(queries, docs, plan.search), KIND: range_key(plan)}

    with safety.held(safety.OutputLock(target, [keep_list] if keep_list is not None else [])):
        store = DedupCheckpoint.open(target, mark, queries.rows, restart)
        with reporting_stops(store, queries.rows):
            run_ranges(queries, docs, plan, store, progress, found_before=store.pairs)
            group, representative = store.forest.groups()
            sizes = np.bincount(group)
            meta = {
                "kind": KIND,
                "queries_path": embeddings,
                "docs_path": embeddings,
                "k": None,
                **range_key(plan),
                "rows": queries.rows,
                "pairs": store.pairs,
                "groups": int(sizes.size),
                "largest_group": int(sizes.max(initial=0)),
            }
            safety.check_before_writing(target, fmt, inputs, folder_kind=KIND)
            _write_groups(target, fmt, group, representative, meta)
            if keep_list is not None:
                keep = np.flatnonzero(representative == np.arange(representative.size))
                results.write_atomically(keep_list, lambda temporary: _write_rows(temporary, keep))
        store.remove()
    if summary:
        print(
            f"tiny-knn: dedup: {meta['rows']:,} rows, {meta['pairs']:,} pairs within the threshold, "
            f"{meta['groups']:,} groups, largest group {meta['largest_group']:,} rows",
            file=sys.stderr,
        )
    return target


def _default_path(embeddings: str, fmt: str) -> str:
    folder, name = results.input_name(embeddings)
    return os.path.join(folder, f"dedup_{name}" + (".parquet" if fmt == "parquet" else ""))


def _write_groups(path: str, fmt: str, group: np.ndarray, representative: np.ndarray, meta: dict[str, Any]) -> None:
    if fmt == "npy":

        def fill(folder: str) -> None:
            results.save_array(os.path.join(folder, "group.npy"), group)
            results.save_array(os.path.join(folder, "representative.npy"), representative)
            results.write_meta(folder, meta, {})

        results.write_folder(path, fill)
        return

    def write(temporary: str) -> None:
        pa, pq = results.output_pyarrow(temporary)
        schema = pa.schema([("row", pa.int64()), ("group", pa.int64()), ("representative", pa.int64())])
        schema = schema.with_metadata({"tiny_knn": json.dumps(meta)})
        with pq.ParquetWriter(temporary, schema, use_dictionary=False) as writer:  # see range_output.PARQUET_ROWS
            for start in range(0, max(1, group.size), PARQUET_ROWS):
                stop = min(start + PARQUET_ROWS, group.size)
                columns = [np.arange(start, stop, dtype=np.int64), group[start:stop], representative[start:stop]]
                writer.write_table(pa.table(dict(zip(("row", "group", "representative"), columns, strict=True)),
                                            schema=schema))  # fmt: skip

    results.write_atomically(path, write)


def _write_rows(path: str, rows: np.ndarray) -> None:
    with open(path, "w", encoding="ascii") as stream:
        for start in range(0, rows.size, PIECE_ROWS):
            stream.write("".join(f"{row}\n" for row in rows[start : start + PIECE_ROWS].tolist()))
