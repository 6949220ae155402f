"""Ground truth for ANN benchmarks: a result's neighbours written in the files that benchmark tools read, and
those files opened again as sources of rows (for `tiny-knn recall`). results.py writes them atomically.

- `ivecs`: `OUT.ivecs` holds each query's neighbours as one row (int32 k, then k int32 doc numbers), and
  `OUT.fvecs` beside it their scores (int32 k, then k float32), as the SIFT and GIST sets ship them.
- `bigann`: big-ann-benchmarks' binary ground truth: int32 n, int32 k, then n * k uint32 doc numbers, then
  n * k float32 scores, row after row.

Scores are written as they are, best first: squared distances for l2 (smallest first), similarities for ip
and cosine (highest first).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from .errors import InvalidInputError, OutputError
from .sources import FileSource, Layout, Source, open_array

# The largest doc number + 1 each format can hold: ivecs stores int32, bigann uint32.
ID_LIMITS = {"ivecs": 2**31, "bigann": 2**32}
_BIGANN_HEADER_BYTES = 8
# Rows of a result converted and written at a time.
_WRITE_BLOCK_VALUES = 1 << 22


def scores_path(path: str) -> str:
    """Where the scores of an ivecs ground truth go: `gt.ivecs` -> `gt.fvecs` (else the path + `.fvecs`)."""
    stem, suffix = os.path.splitext(path)
    return stem + ".fvecs" if suffix.lower() == ".ivecs" else path + ".fvecs"


def check_doc_count(path: str, fmt: str, docs: int) -> None:
    """Raises OutputError when format `fmt` cannot number `docs` docs."""
    limit = ID_LIMITS.get(fmt)
    if limit is not None and docs > limit:
        raise OutputError(
            f"output path '{path}': the {fmt} format numbers docs with {'u' if fmt == 'bigann' else ''}int32, "
            f"at most {limit:,} docs; these are {docs:,}: choose another --format"
        )


def write_vecs(path: str, values: torch.Tensor) -> None:
    """Writes (rows, k) int32-able indices or float32 scores as .ivecs / .fvecs rows at `path`."""
    dtype = np.float32 if values.dtype.is_floating_point else np.int32
    k = values.shape[1]
    with open(path, "wb") as stream:
        for block in _blocks(values):
            framed = np.empty((block.shape[0], 1 + k), dtype=dtype)
            framed.view(np.int32)[:, 0] = k
            framed[:, 1:] = block
            stream.write(framed.data)


def write_bigann(path: str, indices: torch.Tensor, scores: torch.Tensor) -> None:
    """Writes big-ann-benchmarks' ground-truth file at `path`."""
    rows, k = indices.shape
    with open(path, "wb") as stream:
        stream.write(np.array([rows, k], dtype="<i4").data)
        for block in _blocks(indices):
            stream.write(block.astype("<u4").data)
        for block in _blocks(scores):
            stream.write(block.astype("<f4").data)


def _blocks(values: torch.Tensor) -> Iterator[np.ndarray]:
    rows, k = values.shape
    step = max(1, _WRITE_BLOCK_VALUES // max(1, k))
    array = values.numpy()
    for start in range(0, rows, step):
        yield array[start : start + step]


def open_ivecs(path: str, role: str) -> tuple[Source, Source | None]:
    """An .ivecs ground truth's neighbours, and its scores where an .fvecs of the same shape lies beside it."""
    indices = open_array(path, None, role, (torch.int32,))
    beside = scores_path(path)
    if not os.path.isfile(beside):
        return indices, None
    scores = open_array(beside, None, role, (torch.float32,))
    if (scores.rows, scores.dim) != (indices.rows, indices.dim):
        raise InvalidInputError(
            f"{scores.label()}: {scores.rows} rows of {scores.dim} scores, expected {indices.rows} of {indices.dim} "
            f"like the neighbours in '{path}' (or no scores file beside them)"
        )
    return indices, scores


def open_bigann(path: str, role: str) -> tuple[Source, Source] | None:
    """A big-ann-benchmarks ground-truth file's neighbours (uint32 stored, read as int32 bits) and scores; None
    unless the file's size is exactly what its header promises."""
    size = os.path.getsize(path)
    if size < _BIGANN_HEADER_BYTES:
        return None
    with open(path, "rb") as stream:
        rows, k = (int(value) for value in np.frombuffer(stream.read(_BIGANN_HEADER_BYTES), dtype="<i4"))
    if rows <= 0 or k <= 0 or size != _BIGANN_HEADER_BYTES + rows * k * 8:
        return None
    ids = Layout.row_major(_BIGANN_HEADER_BYTES, rows, k, torch.int32)
    distances = Layout.row_major(_BIGANN_HEADER_BYTES + rows * k * 4, rows, k, torch.float32)
    return FileSource(path, role, path, ids), FileSource(path, role, path, distances)
