"""Merging: one answer from results over consecutive slices of the docs (a Slurm array over shards, or
yesterday's result and today's new shard), the same bytes as one search over every doc.

Part i's doc 0 is global doc Σ doc_count of the parts before it. Each part holds its slice's top k (k clamped
to the slice's docs), best first, equal scores by ascending doc. A doc in the overall top k is in its own
part's top k, so merging every part's candidates, renumbered, by the one tie rule (distributed.merge: a stable
sort, parts in doc order) gives exactly one search's answer. It is done a block of query rows at a time
(MERGE_BLOCK_BYTES of candidates, whatever the number of parts); the merged rows go to a temporary file mapped
into memory, as a search's checkpoint does, then to the output like a search's result.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import results, safety
from .checkpoint import check_space
from .distributed import merge
from .errors import InvalidInputError
from .metrics import higher_is_better
from .plan import INDEX_BYTES, SCORE_BYTES

# Candidates held at once: a block of rows of every part's (score, index), their sort order and the sorted
# copies, about 32 bytes a candidate. Small blocks stay in cache: the sort took 40 ns a candidate in blocks of
# 4-8 MB, 70-110 ns in blocks of 64-125 MB (16 parts of k=1000, on 2 cores of a Xeon).
MERGE_BLOCK_BYTES = 8 * 2**20
_BYTES_PER_CANDIDATE = 32
# What a part must record for its rows to be merged with others' (results.FORMAT_VERSION 1 added them).
MERGE_KEYS = ("format_version", "requested_k", "doc_count", "queries_fingerprint", "metric", "k")
# Recorded options that must agree between parts, with what they mean in a message.
_SAME = {
    "format_version": "format version",
    "queries_fingerprint": "queries (their content sample)",
    "metric": "metric",
    "requested_k": "requested k",
    "precision": "precision",
}


def merge_results(
    parts: Sequence[str | os.PathLike[str]],
    out_path: str | os.PathLike[str],
    *,
    output_format: str | None = None,
    progress: bool = False,
) -> str:
    """Merges results over consecutive slices of the docs, given in doc order, into the result of one search
    over all of them: the same indices and scores, byte for byte.

    Args:
        parts: results of searches with the same queries, metric and k (pt, npy, or parquet written without
            ids), part i over the docs that follow part i - 1's.
        out_path: where to write the merged result, in any output format (checked and locked as a search's).
        output_format: as for `compute_topk`; default from out_path's suffix.
        progress: show a progress bar on stderr.

    Returns:
        The path of the merged result: the parts' keys, with `k` and `doc_count` over every doc, `docs_path`
        the parts' joined by " + ", and `merged_parts`, the parts' paths.

    Raises:
        InputFileError: a part is missing or unreadable.
        InvalidInputError: a part lacks the keys merge needs, or differs from the first in queries, metric,
            requested k, precision or format version.
        OutputError: the result cannot be written there.

    Example:
        >>> import os, tempfile, torch
        >>> from tiny_knn import compute_topk, merge_results
        >>> folder = tempfile.mkdtemp()
        >>> queries, docs = (os.path.join(folder, name) for name in ("q.pt", "d.pt"))
        >>> torch.save(torch.eye(2), queries)
        >>> torch.save(torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), docs)
        >>> torch.save(torch.tensor([[0.0, 5.0], [1.0, 0.0]]), os.path.join(folder, "new.pt"))
        >>> old = compute_topk(queries, docs, k=2, force_cpu=True, out_path=os.path.join(folder, "old.pt"))
        >>> new = compute_topk(queries, os.path.join(folder, "new.pt"), k=2, force_cpu=True,
        ...                    out_path=os.path.join(folder, "new-result.pt"))
        >>> torch.load(merge_results([old, new], os.path.join(folder, "all.pt")))["indices"].tolist()
        [[2, 0], [3, 1]]
    """
    paths = [os.fspath(part) for part in parts]
    target = os.fspath(out_path)
    if not paths:
        raise InvalidInputError("merge: no parts given; expected the results of searches over slices of the docs")
    opened = [results.open_result(path, "merge part") for path in paths]
    check_parts(opened)
    docs = sum(part.meta["doc_count"] for part in opened)
    fmt = results.output_format(target, output_format)
    results.check_format(target, fmt, docs)
    inputs = safety.Inputs(
        files=tuple((part.label(), path) for part in opened for path in part.files),
        folders=tuple(part.path for part in opened if os.path.isdir(part.path)),
    )
    safety.check_output_path(target, fmt, inputs)
    with safety.OutputLock(target, results.beside_output(target, fmt)):
        result = merge_parts(opened, os.path.dirname(os.path.abspath(target)), progress)
        safety.check_before_writing(target, fmt, inputs)
        results.write_output(target, fmt, result, higher_is_better(result["metric"]))
    return target


def check_parts(parts: Sequence[results.StoredResult]) -> None:
    """Raises InvalidInputError unless the parts can be merged: each records MERGE_KEYS and scores, is no
    exclude_self search, and agrees with the first on the options in _SAME, on its rows and on query ids."""
    first = parts[0]
    for part in parts:
        label = part.label()
        missing = [key for key in MERGE_KEYS if key not in part.meta]
        if missing or not part.has_scores:
            lacking = ", ".join(missing) if missing else "scores"
            raise InvalidInputError(
                f"{label}: lacks {lacking}, which merge needs; expected a result of tiny-knn "
                f"{'(format version 1 or later: search again)' if missing else 'with scores'}"
            )
        meta = part.meta
        if meta["format_version"] > results.FORMAT_VERSION:
            raise InvalidInputError(
                f"{label}: format version {meta['format_version']}, expected at most {results.FORMAT_VERSION}; "
                "merge it with the tiny-knn that wrote it"
            )
        if meta.get("exclude_self"):
            raise InvalidInputError(
                f"{label}: an --exclude-self search (its docs are the queries); expected searches over slices of "
                "the docs, which cannot be the queries"
            )
        for key, what in _SAME.items():
            if meta.get(key) != first.meta.get(key):
                raise InvalidInputError(
                    f"{label}: {what} {_shown(key, meta)}, expected {_shown(key, first.meta)} like the first part "
                    f"'{first.path}'; merge only parts of one search split by docs"
                )
        expected_k = min(meta["requested_k"], meta["doc_count"])
        if (part.rows, part.k, meta["k"]) != (first.rows, expected_k, expected_k):
            raise InvalidInputError(
                f"{label}: records k={meta['k']} and holds {part.rows} queries of {part.k} neighbours, expected "
                f"{first.rows} queries of k={expected_k} (k={meta['requested_k']} over its {meta['doc_count']} "
                "docs); a damaged result?"
            )
        if meta.get("query_ids") != first.meta.get("query_ids"):
            raise InvalidInputError(f"{label}: its query ids differ from the first part's '{first.path}'")
        if ("doc_ids" in meta) != ("doc_ids" in first.meta):
            raise InvalidInputError(
                f"{label}: {'has' if 'doc_ids' in meta else 'lacks'} doc ids, the first part '{first.path}' "
                f"{'lacks' if 'doc_ids' in meta else 'has'} them; expected all parts with doc ids or none"
            )


def _shown(key: str, meta: dict[str, Any]) -> str:
    """A recorded option as a message shows it (the queries by their path, as the fingerprint means nothing)."""
    if key == "queries_fingerprint":
        return f"of '{meta.get('queries_path')}'"
    return repr(meta.get(key))


def merge_parts(parts: Sequence[results.StoredResult], folder: str, progress: bool = False) -> dict[str, Any]:
    """The merged result dict of parts checked by check_parts; its rows lie in a temporary file in `folder`."""
    first = parts[0].meta
    counts = [part.meta["doc_count"] for part in parts]
    docs, rows = sum(counts), parts[0].rows
    k = min(first["requested_k"], docs)
    offsets = np.cumsum([0, *counts[:-1]]).tolist()
    block_rows = max(1, MERGE_BLOCK_BYTES // (_BYTES_PER_CANDIDATE * sum(part.k for part in parts)))
    check_space(folder, 2 * rows * k * (SCORE_BYTES + INDEX_BYTES))  # the merged rows, then the output
    scores, indices = _file_backed(folder, (rows, k), np.float32), _file_backed(folder, (rows, k), np.int64)
    better = higher_is_better(first["metric"])
    streams = [part.blocks(block_rows) for part in parts]
    with tqdm(total=rows, unit=" queries", disable=not progress, desc="merging") as bar:
        for start in range(0, rows, block_rows):
            blocks = [next(stream) for stream in streams]
            candidates = [
                _global(part, block_indices, offset)
                for part, offset, (block_indices, _) in zip(parts, offsets, blocks, strict=True)
            ]
            block_scores = torch.cat([block[1] for block in blocks if block[1] is not None], dim=1)
            merged_scores, merged_indices = merge(block_scores, torch.cat(candidates, dim=1), better)
            stop = start + merged_scores.shape[0]
            scores[start:stop], indices[start:stop] = merged_scores[:, :k], merged_indices[:, :k]
            bar.update(stop - start)
    merged = {key: value for key, value in first.items() if key != "doc_ids"}
    merged.update(
        indices=indices,
        scores=scores,
        docs_path=" + ".join(str(part.meta.get("docs_path")) for part in parts),
        k=k,
        doc_count=docs,
        format_version=results.FORMAT_VERSION,
        merged_parts=[part.path for part in parts],
    )
    if "doc_ids" in first:
        merged["doc_ids"] = [name for part in parts for name in part.meta["doc_ids"]]
    return merged


def _global(part: results.StoredResult, indices: torch.Tensor, offset: int) -> torch.Tensor:
    """A block of a part's doc numbers as global ones, after checking that they are the part's own."""
    if indices.numel() and (int(indices.min()) < -1 or int(indices.max()) >= part.meta["doc_count"]):
        raise InvalidInputError(
            f"{part.label()}: doc numbers from {int(indices.min())} to {int(indices.max())}, expected "
            f"0 to {part.meta['doc_count'] - 1}; a damaged result?"
        )
    return torch.where(indices >= 0, indices + offset, indices)  # -1 marks no doc (padding): it stays


def _file_backed(folder: str, shape: tuple[int, int], dtype: type) -> torch.Tensor:
    """A zeroed array in an unlinked temporary file in `folder`, mapped into memory: the output's size never
    sets the merge's memory, and the file is gone with the process, however it ends."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    with tempfile.TemporaryFile(dir=folder) as stream:
        stream.truncate(size)
        if hasattr(os, "posix_fallocate") and size:
            os.posix_fallocate(stream.fileno(), 0, size)  # blocks now: a full disk under a map would be SIGBUS
        array = np.memmap(stream, dtype=dtype, mode="r+", shape=shape) if size else np.zeros(shape, dtype)
    return torch.from_numpy(array)
