"""The public entry points: check everything, plan, search, write. The CLI calls only these; a torchrun job's
search is distributed.search's."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from . import distributed, range_output, ranges, results, safety
from .checkpoint import content_fingerprint, open_checkpoint, reporting_stops
from .errors import InvalidInputError
from .errors import TinyKnnWarning as TinyKnnWarning  # its home before errors.py, still importable from here
from .exclusions import Exclusions, exclusions_from_array, read_exclusions
from .inputs import Inputs, open_inputs
from .metrics import DEFAULT_METRIC, higher_is_better
from .options import DEFAULT_PRECISION, SearchOptions, plan_search, whole
from .plan import DEFAULT_K, Plan
from .running import Found, run_search
from .sources import Source, from_array, open_source

__version__ = "0.3.0"

# What search() takes: a tensor or array in memory, or the spec of embeddings on disk.
Embeddings = Union[torch.Tensor, np.ndarray, str, "os.PathLike[str]"]
# Excluded pairs: an (n, 2) array of (query row, doc row), or the path of a pairs or qrels file (exclusions.py).
Pairs = Union[torch.Tensor, np.ndarray, str, "os.PathLike[str]"]


def search(
    queries: Embeddings,
    docs: Embeddings,
    k: int,
    *,
    metric: str = DEFAULT_METRIC,
    exclude_self: bool = False,
    precision: str = DEFAULT_PRECISION,
    device: str | None = None,
    max_memory: int | str | None = None,
    batch_size: int | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    exclude_pairs: Pairs | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Finds the `k` best docs of every query, in memory: nothing is written to disk.

    The same engine as `compute_topk`: the answer is exact, ties go to the lower doc index, and it does
    not depend on batch or chunk sizes.

    Args:
        queries: (Q, dim) tensor or numpy array (float32, float16, bfloat16 or float64; on the CPU), or the
            path of embeddings on disk in any format `compute_topk` reads.
        docs: (D, dim), likewise.
        k: neighbours per query; clamped (with a TinyKnnWarning) to D, or D - 1 with exclude_self.
        metric: "ip" (dot product, highest first), "cosine" (highest first) or "l2" (squared Euclidean
            distance, smallest first).
        exclude_self: queries and docs are the same rows (query i is doc i): leave each query's own row out.
        precision: "exact" (the default: every score is tiny-knn's one exact score, see `compute_topk`), or
            "bf16-unsafe" (bfloat16 products returned as they are: fast on a GPU, not exact; ip, cosine). "fp32"
            and "bf16", older names, mean "exact" (with a TinyKnnWarning).
        device: "cpu" or "cuda"; default CUDA when available.
        max_memory, batch_size, chunk_size, progress: as for `compute_topk`.
        exclude_pairs: (query row, doc row) pairs never returned: an (n, 2) integer array, or a file as for
            `compute_topk` (by row numbers).

    Returns:
        (scores float32 (Q, k), indices int64 (Q, k)), best first, on the CPU. A query left with fewer than k
        docs by exclude_pairs is padded with index -1 (score -inf; +inf for l2).

    Example:
        >>> import torch
        >>> from tiny_knn import search
        >>> docs = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0]])
        >>> scores, indices = search(torch.tensor([[1.0, 0.0]]), docs, k=2, device="cpu")
        >>> indices.tolist(), scores.tolist()
        ([[2, 1]], [[2.0, 1.0]])
        >>> search(torch.tensor([[1.0, 0.0]]), docs, k=2, metric="l2", device="cpu")[1].tolist()
        [[1, 2]]
        >>> search(docs, docs, k=1, metric="cosine", exclude_self=True, device="cpu")[1].tolist()
        [[1], [2], [1]]
    """
    k = whole(k)
    query_source = _as_source(queries, "queries")
    doc_source = _as_source(docs, "docs")
    if exclude_self and query_source.rows != doc_source.rows:
        raise InvalidInputError(
            f"exclude_self: {query_source.rows} queries and {doc_source.rows} docs; expected the same rows "
            "(query i is doc i)"
        )
    if device is not None and device not in ("cpu", "cuda"):
        raise InvalidInputError(f"device={device!r}: expected 'cpu' or 'cuda'")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("device='cuda': this torch finds no CUDA GPU (torch.cuda.is_available() is False)")
    options = SearchOptions(
        force_cpu=device == "cpu",
        max_memory=max_memory,
        batch_size=batch_size,
        chunk_size=chunk_size,
        metric=metric,
        exclude_self=exclude_self,
        precision=precision,
    )
    excluded = _exclusions(exclude_pairs, query_source, doc_source)
    plan = plan_search(query_source, doc_source, k, options)
    scores, indices, _ = run_search(query_source, doc_source, plan, progress, excluded=excluded)
    return scores, indices


def range_search(
    queries: Embeddings,
    docs: Embeddings,
    threshold: float,
    *,
    metric: str = DEFAULT_METRIC,
    k: int | None = None,
    exclude_self: bool = False,
    max_memory: int | str | None = None,
    batch_size: int | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    exclude_pairs: Pairs | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (query, doc) pair within a radius, in memory (small cases; `tiny-knn --min-score` streams to disk).

    A pair is in iff its exact score (tiny-knn's one definition, as `compute_topk`'s) is >= float32(threshold) for
    "ip" and "cosine", or its squared distance is <= float32(threshold) for "l2". Runs on the CPU with the compiled
    kernel; no pair in the radius is ever missed.

    Args:
        queries, docs, metric, exclude_self, max_memory, batch_size, chunk_size, progress, exclude_pairs: as for
            `search`.
        threshold: the radius: the lowest score (ip, cosine) or the largest squared distance (l2) returned.
        k: at most this many pairs per query, the best ones (ties to the lower doc); default: all of them.

    Returns:
        (offsets int64 (Q + 1,), indices int64 (P,), scores float32 (P,)), in CSR form: query q's docs are
        indices[offsets[q]:offsets[q + 1]], in ascending doc order, with their scores (distances for l2).

    Example:
        >>> import torch
        >>> from tiny_knn import range_search
        >>> docs = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0]])
        >>> offsets, indices, scores = range_search(torch.tensor([[1.0, 0.0]]), docs, 1.0)
        >>> offsets.tolist(), indices.tolist(), scores.tolist()
        ([0, 2], [1, 2], [1.0, 2.0])
    """
    k = whole(k)
    query_source = _as_source(queries, "queries")
    doc_source = _as_source(docs, "docs")
    options = SearchOptions(
        force_cpu=True,
        max_memory=max_memory,
        batch_size=batch_size,
        chunk_size=chunk_size,
        metric=metric,
        exclude_self=exclude_self,
    )
    excluded = _exclusions(exclude_pairs, query_source, doc_source)
    plan = ranges.plan_ranges(query_source, doc_source, threshold, options, cap=k)
    sink = range_output.MemorySink()
    ranges.run_ranges(query_source, doc_source, plan, sink, progress, excluded)
    return sink.result()


def compute_topk(
    q_path: str | os.PathLike[str],
    d_path: str | os.PathLike[str],
    k: int = DEFAULT_K,
    force_cpu: bool = False,
    out_path: str | os.PathLike[str] | None = None,
    *,
    max_memory: int | str | None = None,
    batch_size: int | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    metric: str = DEFAULT_METRIC,
    exclude_self: bool = False,
    output_format: str | None = None,
    query_ids: str | os.PathLike[str] | None = None,
    doc_ids: str | os.PathLike[str] | None = None,
    restart: bool = False,
    shard: str = "auto",
    precision: str = DEFAULT_PRECISION,
    exclude_pairs: str | os.PathLike[str] | None = None,
) -> str:
    """Finds, for every query, the `k` documents with the highest dot product, and saves them.

    Both files are streamed from disk in chunks, so they may be far larger than RAM or GPU memory. Results are
    exact float32 scores, best first; equal scores are ordered by ascending document index. On the CPU (with the
    compiled kernel) every score is tiny-knn's one exact score (a fixed order of fused multiply-adds; for l2 a
    float64 sum rounded once), so the answer is the same bytes whatever the CPU, threads, batches or chunks.

    Args:
        q_path: (Q, dim) float32/float16/bfloat16 queries: a `.pt`, `.npy`, `.safetensors`, `.fvecs`/`.bvecs`
            or HDF5 file (`FILE:KEY` to pick a tensor or dataset), a `.parquet` or `.arrow` file (`FILE:COLUMN`
            to pick a list<float> column; needs pyarrow), or a directory or glob of such shards.
        d_path: (D, dim) documents, likewise, with the same dim.
        k: neighbours per query; clamped (with a TinyKnnWarning) to D (D - 1 with exclude_self) when larger.
        force_cpu: run on the CPU even when CUDA is available.
        out_path: where to write the result; default `top{k}_{queries}_x_{docs}.pt` beside the queries.
        max_memory: memory budget (GPU memory on CUDA, RAM on CPU): bytes, or a size such as "512MB" or "8GiB";
            default 60% of what is free. A budget over what is there is used, with a TinyKnnWarning. On CUDA the
            host's buffers (pinned doc chunks, the batch's queries, the results) have a budget of their own, 60% of
            the RAM available.
        batch_size: queries per pass over the docs (default: as many as the budget allows).
        chunk_size: docs per chunk read from disk (default: tuned per device).
        progress: show a progress bar on stderr.
        metric: "ip" (dot product, the default), "cosine", or "l2" (squared distance, smallest first).
        exclude_self: queries and docs are the same file: leave each query's own row out (by index).
        output_format: "pt" (the default), "npy", "parquet", "trec", or ground truth for ANN benchmarks: "ivecs"
            (with an .fvecs of scores beside it) or "bigann"; default from out_path's suffix.
        query_ids, doc_ids: text files with one id per row, or a column of a parquet or Arrow file
            (`FILE.parquet:COLUMN`), recorded in the result and used by the parquet and TREC formats in place of
            row numbers.
        restart: discard a checkpoint left by an interrupted run instead of resuming from it.
        shard: under torchrun, split the work by "docs" or by "queries" ("auto": see distributed.py).
        precision: "exact" (default) or "bf16-unsafe", as for `search`.
        exclude_pairs: a file of (query, doc) pairs never returned (hard-negative mining's positives): one pair a
            line, `QUERY DOC` (row numbers, or ids where query_ids / doc_ids are given), or TREC qrels lines
            (`qid iteration docid relevance`: every pair listed, whatever its relevance). A query left with
            fewer than k docs is padded with index -1 (score -inf; +inf for l2).

    A run of several query batches keeps a checkpoint beside the output (`OUT.checkpoint/`, see
    checkpoint.py): if it is interrupted, calling again with the same inputs and options resumes after the
    last finished batch, and the answer is the same bytes as an uninterrupted run's.

    Returns:
        The path of the result. In the default format, a dict with `indices` (Q, k) int64, `scores`
        (Q, k) float32, `queries_path`, `docs_path`, `k`, `batch_size`, `dtype`, `device`, `chunk_size`,
        `version`, `metric`, `precision`, `exclude_self`, `format_version`, `requested_k` (k before it was
        clamped), `doc_count`, `queries_fingerprint` (see results.py), and `query_ids` / `doc_ids` when given.

    Raises:
        InputFileError: an input file is missing or unreadable.
        InvalidInputError: an input is not a finite 2-D float tensor, dims differ, or k < 1.
        OutputError: the result cannot be written there.
        MemoryBudgetError: the budget is too small for even one query at a time.

    Example:
        >>> import torch, tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> torch.save(torch.eye(3), os.path.join(folder, "q.pt"))
        >>> torch.save(torch.tensor([[0., 1, 0], [1, 0, 0], [2, 0, 0]]), os.path.join(folder, "d.pt"))
        >>> path = compute_topk(os.path.join(folder, "q.pt"), os.path.join(folder, "d.pt"), k=2, force_cpu=True)
        >>> torch.load(path)["indices"].tolist()
        [[2, 1], [0, 1], [0, 1]]
    """
    q_path, d_path, k = os.fspath(q_path), os.fspath(d_path), whole(k)
    options = SearchOptions(
        force_cpu=force_cpu,
        max_memory=max_memory,
        batch_size=batch_size,
        chunk_size=chunk_size,
        metric=metric,
        exclude_self=exclude_self,
        precision=precision,
        results_on_disk=True,
    )
    id_paths = {role: os.fspath(path) for role, path in (("query", query_ids), ("doc", doc_ids)) if path is not None}
    pairs_path = None if exclude_pairs is None else os.fspath(exclude_pairs)
    prepared = prepare_search(q_path, d_path, k, options, id_paths, pairs_path)
    opened, plan = prepared.inputs, prepared.plan
    queries, docs, ids, excluded = opened.queries, opened.docs, opened.ids, opened.excluded
    fmt = results.output_format(None if out_path is None else os.fspath(out_path), output_format)
    target = safety.output_path(
        os.fspath(out_path) if out_path is not None else results.default_output_path(q_path, d_path, plan.k, fmt)
    )
    results.check_format(target, fmt, docs.rows)
    inputs = safety.Inputs.of([queries, docs], opened.others)
    safety.check_output_path(target, fmt, inputs)
    job = distributed.current_job()
    extra = opened.other_files
    lock = safety.OutputLock(target, results.beside_output(target, fmt))
    with safety.held(lock if job is None or job.leader else None):
        found: Found | None
        if job is None:
            found = _search_alone(queries, docs, plan, target, fmt, restart, progress, extra, excluded)
        else:
            found = distributed.search(
                job, queries, docs, plan, options, target, fmt, restart, progress, shard, extra, excluded
            )
        if found is None:  # another rank of a torchrun job: rank 0 writes the output
            return target
        scores, indices, plan, store = found
        result = {
            "indices": indices,
            "scores": scores,
            "queries_path": q_path,
            "docs_path": d_path,
            "k": plan.k,
            "batch_size": plan.query_batch_rows,
            "dtype": str(queries.dtype),
            "device": plan.device,
            "chunk_size": plan.doc_chunk_rows,
            "version": __version__,
            "metric": plan.metric,
            "precision": plan.precision,
            "exclude_self": plan.exclude_self,
            "format_version": results.FORMAT_VERSION,
            "requested_k": k,
            "doc_count": docs.rows,
            "queries_fingerprint": content_fingerprint(queries),
            **ids,
            **({"exclude_pairs": pairs_path} if pairs_path is not None else {}),
        }
        try:
            with reporting_stops(store, queries.rows):
                safety.check_before_writing(target, fmt, inputs)
                results.write_output(target, fmt, result, higher_is_better(plan.metric))
            if store is not None:
                store.remove()
        finally:
            if job is not None:
                distributed.leave()
    return target


def _search_alone(
    queries: Source,
    docs: Source,
    plan: Plan,
    target: str,
    fmt: str,
    restart: bool,
    progress: bool,
    extra: tuple[str, ...],
    excluded: Exclusions | None,
) -> Found:
    """One process: search with a checkpoint (when there are several batches)."""
    store = open_checkpoint(target, fmt, queries, docs, plan, restart, extra)
    with reporting_stops(store, queries.rows):
        scores, indices, plan = run_search(queries, docs, plan, progress, store, excluded=excluded)
    return scores, indices, plan, store


@dataclass(frozen=True)
class Prepared:
    """A search ready to run: its inputs open and read (inputs.py), the plan made."""

    inputs: Inputs
    plan: Plan


def prepare(q_path: str, d_path: str, k: int, options: SearchOptions) -> tuple[Source, Source, Plan]:
    """Opens and checks both input files and the options, then plans. Does no search work."""
    prepared = prepare_search(q_path, d_path, k, options)
    return prepared.inputs.queries, prepared.inputs.docs, prepared.plan


def prepare_search(
    q_path: str,
    d_path: str,
    k: int,
    options: SearchOptions,
    id_paths: dict[str, str] | None = None,
    exclude_pairs: str | None = None,
) -> Prepared:
    """Opens and checks both input files, the ids files ({"query": path, "doc": path}), the excluded pairs and
    the options, then plans. Does no search work."""
    opened = open_inputs(q_path, d_path, options.exclude_self, id_paths, exclude_pairs)
    return Prepared(opened, plan_search(opened.queries, opened.docs, k, options))


def _exclusions(pairs: Pairs | None, queries: Source, docs: Source) -> Exclusions | None:
    """search's and range_search's exclude_pairs: an (n, 2) array, or a file by row numbers."""
    if pairs is None:
        return None
    if isinstance(pairs, (torch.Tensor, np.ndarray)):
        return exclusions_from_array(pairs, queries.rows, docs.rows)
    return read_exclusions(os.fspath(pairs), queries.rows, docs.rows)


def _as_source(embeddings: Embeddings, role: str) -> Source:
    if isinstance(embeddings, (torch.Tensor, np.ndarray)):
        return from_array(embeddings, role)
    if isinstance(embeddings, (str, os.PathLike)):
        return open_source(embeddings, role)
    raise InvalidInputError(f"{role}: got a {type(embeddings).__name__}, expected a tensor, a numpy array or a path")
