"""Running one search: the engine with a progress bar on stderr, or with its docs counted for a whole torchrun
job; and what a finished search hands back to be written. Below both the entry points (api.py) and torchrun's
ranks (distributed.py), which run their searches this way.
"""

from __future__ import annotations

from typing import Protocol

import torch
from tqdm import tqdm

from . import engine
from .exclusions import Exclusions
from .plan import Plan
from .sources import Source
from .store import Store

# The result, the plan used, and the checkpoint to delete once the output is written (if any).
Found = tuple[torch.Tensor, torch.Tensor, Plan, "Removable | None"]


class Removable(Protocol):
    def remove(self) -> None:
        """Deletes it: the output is safely written."""


class DocCounter(Protocol):
    """Where the docs scored by every rank of a torchrun job are counted (distributed.JobProgress)."""

    def expect(self, docs: int) -> None:
        """Adds the docs this rank will score."""

    def scored(self, docs: int) -> None:
        """Adds the docs this rank just scored."""


def run_search(
    queries: Source,
    docs: Source,
    plan: Plan,
    progress: bool,
    store: Store | None = None,
    shared: DocCounter | None = None,
    excluded: Exclusions | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Plan]:
    """engine.search, with a progress bar or, in a torchrun job, progress counted for the whole job (`shared`)."""
    done = 0 if store is None else store.done_rows
    total = docs.rows * -(-(queries.rows - done) // plan.query_batch_rows)
    if shared is not None:
        shared.expect(total)
        return engine.search(queries, docs, plan, on_docs_scored=shared.scored, store=store, excluded=excluded)
    if not progress:
        return engine.search(queries, docs, plan, store=store, excluded=excluded)
    with progress_bar(total) as bar:
        return engine.search(queries, docs, plan, on_docs_scored=bar.update, store=store, excluded=excluded)


def progress_bar(total: int) -> tqdm:
    """tiny-knn's bar on stderr, counting docs scored."""
    return tqdm(total=total, unit="docs", unit_scale=True, desc="tiny-knn", dynamic_ncols=True)
