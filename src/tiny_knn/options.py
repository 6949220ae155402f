"""Options: what a caller asks of a search, as one frozen SearchOptions that each entry point (compute_topk,
search, the CLI) builds once and passes down; plan_search checks them against both inputs, then plans.

What this machine has (CUDA, the compiled kernel, the estimators, free memory, threads) is backend.py's to say,
so that plan.py stays pure.
"""

from __future__ import annotations

import operator
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from .backend import available_bytes, default_budget_bytes, resolve
from .errors import InvalidInputError, MemoryBudgetError, TinyKnnWarning
from .kernel import kernel_available
from .metrics import DEFAULT_METRIC, check_metric
from .plan import DEPRECATED_PRECISIONS, PRECISIONS, Plan, format_bytes, make_plan, parse_size
from .sources import Source, check_compatible

# What a caller may ask for: the plan's PRECISIONS ("exact", the default, first), or, deprecated, the older names
# of exact (see _check_precision).
DEFAULT_PRECISION = PRECISIONS[0]
PRECISION_CHOICES = (*PRECISIONS, *DEPRECATED_PRECISIONS)


@dataclass(frozen=True)
class SearchOptions:
    """Every option that shapes a search's plan (see compute_topk for each)."""

    force_cpu: bool = False
    max_memory: int | str | None = None  # bytes, or a size such as "512MB"
    batch_size: int | None = None
    chunk_size: int | None = None
    metric: str = DEFAULT_METRIC
    exclude_self: bool = False
    precision: str = DEFAULT_PRECISION
    selection: str = "auto"  # the selector (topk.py): only tests and benchmarks pick one
    results_on_disk: bool = False  # several batches go to a checkpoint (compute_topk): one batch's are held

    def compute_topk_keywords(self) -> dict[str, Any]:
        """The options as compute_topk's keyword arguments, for a caller that holds them (the CLI):
        compute_topk picks the selector and keeps results on disk itself."""
        keywords = asdict(self)
        del keywords["selection"], keywords["results_on_disk"]
        return keywords


def whole(value: Any) -> Any:
    """A whole number of any integer type (numpy's, a 0-d integer tensor: anything with __index__, but a bool)
    as an int; anything else as it is, for the checks that refuse it to name it."""
    if isinstance(value, bool):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


def plan_search(queries: Source, docs: Source, k: int, options: SearchOptions) -> Plan:
    """Checks the options against both inputs, then plans."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInputError(f"k={k!r}: expected a whole number >= 1")
    max_memory = options.max_memory
    if isinstance(max_memory, str):  # "512MB", as the command line takes it
        try:
            max_memory = parse_size(max_memory)
        except ValueError as exc:
            raise InvalidInputError(f"max_memory: {exc}") from None
    for name, value in (
        ("batch_size", options.batch_size),
        ("chunk_size", options.chunk_size),
        ("max_memory", max_memory),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidInputError(f"{name}={value!r}: expected a whole number >= 1")
    metric, exclude_self = options.metric, options.exclude_self
    try:
        check_metric(metric)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None
    precision = _check_precision(options.precision, metric)
    check_compatible(queries, docs)
    available = docs.rows - int(exclude_self)
    if exclude_self and available < 1:
        raise InvalidInputError(f"exclude_self: {docs.label()} holds 1 row; nothing is left once it is excluded")
    if k > available:
        warnings.warn(
            f"k={k} is more than the {available} docs in {docs.label()}"
            + (" besides each query itself" if exclude_self else "")
            + f"; returning k={available}",
            TinyKnnWarning,
            stacklevel=4,
        )
    backend = resolve(
        queries, docs, k, force_cpu=options.force_cpu, metric=metric, precision=precision, selection=options.selection
    )
    device = backend.device
    if device == "cpu" and not kernel_available() and not os.environ.get("TINY_KNN_NO_KERNEL"):
        warnings.warn(
            "tiny-knn's compiled kernel is missing (no C compiler when it was installed, or built from older "
            "source): the CPU search selects with torch.topk, about 10 times slower at k=2000, and its scores are "
            "torch.mm's rather than tiny-knn's one exact score; reinstall tiny-knn with a C compiler present",
            TinyKnnWarning,
            stacklevel=4,
        )
    budget = max_memory if max_memory is not None else default_budget_bytes(device)
    there = available_bytes(device)
    if budget > there:
        warnings.warn(
            f"the memory budget ({format_bytes(budget)}) is more than the {format_bytes(there)} of "
            f"{'GPU memory' if device == 'cuda' else 'RAM'} available; the run may swap or be killed",
            TinyKnnWarning,
            stacklevel=4,
        )
    try:
        return make_plan(
            queries=queries.rows,
            docs=docs.rows,
            dim=queries.dim,
            k=k,
            device=device,
            budget_bytes=budget,
            selection=backend.selection,
            estimator=backend.estimator,
            estimator_choice=backend.choice,
            batch_rows=options.batch_size,
            chunk_rows=options.chunk_size,
            metric=metric,
            exclude_self=exclude_self,
            results_on_disk=options.results_on_disk,
            precision=precision,
            threads=backend.threads,
            docs_dtype=docs.dtype,
            # Beside a GPU, the host's buffers have a budget of their own; --max-memory is the GPU's
            host_budget_bytes=default_budget_bytes("cpu") if device == "cuda" else None,
        )
    except ValueError as exc:
        raise MemoryBudgetError(str(exc)) from None


def _check_precision(precision: str, metric: str) -> str:
    """The plan's precision for the requested one: "exact" (fp32 and bf16, older names, mean it now, with a
    TinyKnnWarning), or "bf16-unsafe"; refuses combinations not built."""
    if precision in DEPRECATED_PRECISIONS:
        warnings.warn(
            f"precision {precision!r} is now 'exact': every answer is tiny-knn's exact score, whichever product "
            "estimated it (use --precision exact, the default)",
            TinyKnnWarning,
            stacklevel=5,
        )
        precision = DEFAULT_PRECISION
    if precision not in PRECISIONS:
        raise InvalidInputError(
            f"precision={precision!r}: expected one of {', '.join(PRECISIONS)} (or, deprecated, "
            f"{', '.join(DEPRECATED_PRECISIONS)})"
        )
    if (precision, metric) == ("bf16-unsafe", "l2"):
        raise InvalidInputError("precision bf16-unsafe with metric l2 is not supported; use the default, exact")
    return precision
