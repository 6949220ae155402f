"""Resuming: finished query batches go to disk at once, so an interrupted run continues where it stopped.

A checkpoint is a folder beside the output, `OUT.checkpoint/`, holding `scores.npy` and `indices.npy`
(memory-mapped, (Q, k), allocated on disk up front so that a full disk shows before any work) and
`manifest.json`: a fingerprint of the inputs (paths, sizes, modification times, shapes, dtypes) and of
every option that changes the answer, and `done_rows`, the number of queries whose results are on disk.

Write order makes it safe against SIGKILL at any moment: a batch's rows are written and flushed to
disk first, and only then is the manifest replaced (temporary file, fsync, rename, fsync of the folder).
So the manifest never claims rows that are not durable; rows past `done_rows` are simply computed again.
Answers do not depend on batch or chunk sizes, so those may differ between the run and its resumption.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any

import numpy as np
import torch

from .errors import InvalidInputError, OutputError
from .plan import Plan, format_bytes
from .sources import ShardedSource, Source

CHECKPOINT_SUFFIX = ".checkpoint"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class MemoryStore:
    """Finished batches kept in memory: for `search()`, and for runs of a single batch, where a
    checkpoint could only ever hold the final answer."""

    def __init__(self, rows: int, k: int) -> None:
        self.done_rows = 0
        self.rows = rows
        self.scores = torch.empty((rows, k), dtype=torch.float32)
        self.indices = torch.empty((rows, k), dtype=torch.int64)

    def save(self, start: int, scores: torch.Tensor, indices: torch.Tensor) -> None:
        """Stores the finished rows [start, start + len(scores)); batches arrive in order."""
        stop = start + scores.shape[0]
        if type(self) is MemoryStore and start == 0 and stop == self.rows:
            # One batch holds every row: keep its tensors rather than copy them (at k=2000 and 4096 queries,
            # 98 MB of fresh pages and a copy).
            self.scores, self.indices = scores.contiguous(), indices.contiguous()
        else:
            self.scores[start:stop] = scores
            self.indices[start:stop] = indices
        self.done_rows = stop


class Checkpoint(MemoryStore):
    """Finished batches on disk, durable batch by batch (see the module docstring)."""

    def __init__(self, folder: str, fingerprint: dict[str, Any], rows: int, k: int, resume: bool) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        mode = "r+" if resume else "w+"
        scores = np.lib.format.open_memmap(self._path("scores.npy"), mode=mode, dtype=np.float32, shape=(rows, k))
        indices = np.lib.format.open_memmap(self._path("indices.npy"), mode=mode, dtype=np.int64, shape=(rows, k))
        if not resume:
            for name in ("scores.npy", "indices.npy"):
                _allocate(self._path(name))
        self._arrays: list[np.memmap] = [scores, indices]
        self.scores = torch.from_numpy(scores)
        self.indices = torch.from_numpy(indices)
        self.done_rows = _read_manifest(folder)["done_rows"] if resume else 0
        if not resume:
            self._write_manifest()

    @classmethod
    def open(
        cls, output_path: str, fingerprint: dict[str, Any], rows: int, k: int, *, restart: bool, wanted: bool
    ) -> Checkpoint | None:
        """The checkpoint for `output_path`: resumed if one exists for the same inputs and options, else a
        new one if `wanted` (more than one batch), else None.

        Raises:
            InvalidInputError: a checkpoint exists for other inputs or options (and not `restart`).
            OutputError: the checkpoint cannot be created (no space, permissions).
        """
        folder = checkpoint_folder(output_path)
        if os.path.isdir(folder) and (restart or _read_manifest(folder)["fingerprint"] is None):
            shutil.rmtree(folder)  # discarded, or killed before its first manifest: nothing in it counts
        if os.path.isdir(folder):
            difference = _difference(_read_manifest(folder)["fingerprint"], fingerprint)
            if difference:
                raise InvalidInputError(
                    f"checkpoint '{folder}' belongs to another run ({difference}); "
                    "run with --restart to discard it, or choose another --output-path"
                )
            return cls(folder, fingerprint, rows, k, resume=True)
        if not wanted:
            return None
        try:
            os.mkdir(folder)
            return cls(folder, fingerprint, rows, k, resume=False)
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise OutputError(f"checkpoint '{folder}': cannot be created: {exc.strerror or exc}") from None

    def save(self, start: int, scores: torch.Tensor, indices: torch.Tensor) -> None:
        super().save(start, scores, indices)
        for array in self._arrays:
            array.flush()  # msync: the rows are on disk before the manifest says so
        self._write_manifest()

    def remove(self) -> None:
        """Deletes the checkpoint (after the final output is safely written)."""
        self._arrays = []
        shutil.rmtree(self.folder, ignore_errors=True)

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def _write_manifest(self) -> None:
        temporary = self._path(MANIFEST + ".tmp")
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump({"fingerprint": self.fingerprint, "done_rows": self.done_rows}, stream, indent=1)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, self._path(MANIFEST))
        _fsync_folder(self.folder)


def checkpoint_folder(output_path: str) -> str:
    return os.path.abspath(output_path).rstrip("/") + CHECKPOINT_SUFFIX


def fingerprint(queries: Source, docs: Source, plan: Plan) -> dict[str, Any]:
    """Everything that changes the answer: the inputs as they are on disk, and the options."""
    return {
        "format": FORMAT_VERSION,
        "queries": _describe(queries),
        "docs": _describe(docs),
        "k": plan.k,
        "metric": plan.metric,
        "exclude_self": plan.exclude_self,
        "precision": plan.precision,
        "device": plan.device,
        "compute_dtype": str(plan.compute_dtype),
        "product": plan.product,  # the kernel's and torch.mm's scores differ in the last bits
    }


def check_space(folder: str, needed: int) -> None:
    """Raises OutputError when the disk holding `folder` has less than `needed` bytes free."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise OutputError(
            f"output folder '{folder}': the result and its checkpoint need about {format_bytes(needed)}, "
            f"only {format_bytes(free)} is free; free some space or choose another --output-path"
        )


def _describe(source: Source) -> dict[str, Any]:
    shards = source.shards if isinstance(source, ShardedSource) else [source]
    files = []
    for shard in shards:
        path = shard.path
        if not os.path.exists(path) and ":" in path:
            path = path.rsplit(":", 1)[0]
        if os.path.exists(path):
            status = os.stat(path)
            files.append([os.path.abspath(path), status.st_size, status.st_mtime_ns])
    return {
        "spec": source.path,
        "rows": source.rows,
        "dim": source.dim,
        "dtype": str(source.dtype),
        "files": files,
    }


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """'' when equal, else a short account of the first difference."""
    for key, value in new.items():
        if old.get(key) != value:
            if key in ("queries", "docs") and isinstance(old.get(key), dict):
                changed = [name for name in value if old[key].get(name) != value[name]]
                detail = "modified" if changed == ["files"] else ", ".join(changed) + " differ"
                return f"the {key} '{value['spec']}': {detail}"
            return f"{key} was {old.get(key)!r}, now {value!r}"
    return ""


def _read_manifest(folder: str) -> dict[str, Any]:
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as stream:
            manifest: dict[str, Any] = json.load(stream)
        int(manifest["done_rows"])
        if isinstance(manifest["fingerprint"], dict):
            return manifest
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return {"fingerprint": None, "done_rows": 0}


def _allocate(path: str) -> None:
    """Reserves the file's blocks now: writing to a memory map on a full disk would kill the process."""
    with open(path, "rb+") as stream:
        size = os.fstat(stream.fileno()).st_size
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(stream.fileno(), 0, size)


def _fsync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
