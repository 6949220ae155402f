"""tiny-knn: exact top-K nearest-neighbour search over embeddings streamed from disk.

Public API:
    compute_topk(q_path, d_path, k=2000, force_cpu=False, out_path=None, ...) -> path of the result file
    merge_results(parts, out_path, ...) -> path of one result from results over consecutive slices of the docs
    recall_at_k(run, truth, k=None) -> Recall: the recall of any result file against an exact one
    search(queries, docs, k, *, metric="ip", exclude_self=False, device=None, ...) -> (scores, indices),
        in memory, from tensors, numpy arrays or paths
    range_search(queries, docs, threshold, *, metric="ip", k=None, ...) -> (offsets, indices, scores), every
        pair within the radius, in memory, in CSR form
    TinyKnnError and its subclasses InvalidInputError, InputFileError, OutputError, MemoryBudgetError
    TinyKnnWarning

Example:
    >>> from tiny_knn import compute_topk  # doctest: +SKIP
    >>> compute_topk(q_path="queries.pt", d_path="docs.pt", k=500)  # doctest: +SKIP
    'top500_queries_x_docs.pt'
    >>> import torch
    >>> from tiny_knn import search
    >>> scores, indices = search(torch.eye(2), torch.tensor([[0.5, 0.0], [0.0, 3.0]]), k=1, device="cpu")
    >>> indices.tolist()
    [[0], [1]]
"""

from .api import Embeddings, __version__, compute_topk, range_search, search
from .errors import InputFileError, InvalidInputError, MemoryBudgetError, OutputError, TinyKnnError, TinyKnnWarning
from .merge import merge_results
from .recall import recall_at_k

__all__ = [
    "Embeddings",
    "InputFileError",
    "InvalidInputError",
    "MemoryBudgetError",
    "OutputError",
    "TinyKnnError",
    "TinyKnnWarning",
    "__version__",
    "compute_topk",
    "merge_results",
    "range_search",
    "recall_at_k",
    "search",
]
