"""The public entry points: check everything, plan, search, write. The CLI calls only this."""

from __future__ import annotations

import os
import warnings

import torch

from . import engine, results
from .errors import InvalidInputError, MemoryBudgetError
from .plan import DEFAULT_K, Plan, default_budget_bytes, make_plan
from .sources import Source, check_compatible, open_source
from .topk import MAX_KERNEL_DOCS, kernel_available

__version__ = "0.2.0"


class TinyKnnWarning(UserWarning):
    """Something was adjusted rather than refused (for instance k clamped to the number of docs)."""


def compute_topk(
    q_path: str | os.PathLike[str],
    d_path: str | os.PathLike[str],
    k: int = DEFAULT_K,
    force_cpu: bool = False,
    out_path: str | os.PathLike[str] | None = None,
    *,
    max_memory: int | None = None,
    batch_size: int | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> str:
    """Finds, for every query, the `k` documents with the highest dot product, and saves them.

    Both files are streamed from disk (memory-mapped), so they may be far larger than RAM or GPU memory.
    Results are exact float32 scores, best first; equal scores are ordered by ascending document index,
    and the answer does not depend on batch or chunk sizes.

    Args:
        q_path: `.pt` file holding a (Q, dim) float32/float16/bfloat16 tensor of queries.
        d_path: `.pt` file holding a (D, dim) tensor of documents, same dim.
        k: neighbours per query; clamped (with a TinyKnnWarning) to D when larger.
        force_cpu: run on the CPU even when CUDA is available.
        out_path: where to write the result; default `top{k}_{queries}_x_{docs}.pt` beside the queries.
        max_memory: memory budget in bytes (GPU memory on CUDA, RAM on CPU); default 60% of what is free.
        batch_size: queries per pass over the docs (default: as many as the budget allows).
        chunk_size: docs per chunk read from disk (default: tuned per device).
        progress: show a progress bar on stderr.

    Returns:
        The path of the result file: a dict with `indices` (Q, k) int64, `scores` (Q, k) float32,
        `queries_path`, `docs_path`, `k`, `batch_size`, `dtype`, `device`, `chunk_size`, `version`.

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
    q_path, d_path = os.fspath(q_path), os.fspath(d_path)
    queries, docs, plan = prepare(
        q_path, d_path, k, force_cpu=force_cpu, max_memory=max_memory, batch_size=batch_size, chunk_size=chunk_size
    )
    target = os.fspath(out_path) if out_path is not None else results.default_output_path(q_path, d_path, plan.k)
    results.check_output_path(target)
    scores, indices, plan = _run(queries, docs, plan, progress)
    results.write_result(
        target,
        {
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
        },
    )
    return target


def prepare(
    q_path: str,
    d_path: str,
    k: int,
    *,
    force_cpu: bool = False,
    max_memory: int | None = None,
    batch_size: int | None = None,
    chunk_size: int | None = None,
    selection: str = "auto",
) -> tuple[Source, Source, Plan]:
    """Opens and checks both inputs and the options, then plans. Does no search work."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInputError(f"k={k!r}: expected a whole number >= 1")
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size), ("max_memory", max_memory)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidInputError(f"{name}={value!r}: expected a whole number >= 1")
    queries = open_source(q_path, "queries")
    docs = open_source(d_path, "docs")
    check_compatible(queries, docs)
    if k > docs.rows:
        warnings.warn(
            f"k={k} is more than the {docs.rows} docs in {docs.label()}; returning k={docs.rows}",
            TinyKnnWarning,
            stacklevel=3,
        )
    device = "cuda" if not force_cpu and torch.cuda.is_available() else "cpu"
    if selection == "auto":
        selection = "threshold" if device == "cpu" and kernel_available() and docs.rows < MAX_KERNEL_DOCS else "sort"
    budget = max_memory if max_memory is not None else default_budget_bytes(device)
    try:
        plan = make_plan(
            queries=queries.rows,
            docs=docs.rows,
            dim=queries.dim,
            k=k,
            device=device,
            budget_bytes=budget,
            selection=selection,
            batch_rows=batch_size,
            chunk_rows=chunk_size,
        )
    except ValueError as exc:
        raise MemoryBudgetError(str(exc)) from None
    return queries, docs, plan


def _run(queries: Source, docs: Source, plan: Plan, progress: bool) -> tuple[torch.Tensor, torch.Tensor, Plan]:
    if not progress:
        return engine.search(queries, docs, plan)
    from tqdm import tqdm

    with tqdm(
        total=docs.rows * plan.doc_passes, unit="docs", unit_scale=True, desc="tiny-knn", dynamic_ncols=True
    ) as bar:

        def advance(doc_count: int) -> None:
            bar.update(doc_count)

        return engine.search(queries, docs, plan, on_docs_scored=advance)
