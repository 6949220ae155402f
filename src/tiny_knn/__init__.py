"""tiny-knn: exact top-K nearest-neighbour search over embeddings streamed from disk.

Public API:
    compute_topk(q_path, d_path, k=2000, force_cpu=False, out_path=None, ...) -> path of the result file
    TinyKnnError and its subclasses InvalidInputError, InputFileError, OutputError, MemoryBudgetError
    TinyKnnWarning

Example:
    >>> from tiny_knn import compute_topk  # doctest: +SKIP
    >>> compute_topk(q_path="queries.pt", d_path="docs.pt", k=500)  # doctest: +SKIP
    'top500_queries_x_docs.pt'
"""

from .api import TinyKnnWarning, __version__, compute_topk
from .errors import InputFileError, InvalidInputError, MemoryBudgetError, OutputError, TinyKnnError

__all__ = [
    "InputFileError",
    "InvalidInputError",
    "MemoryBudgetError",
    "OutputError",
    "TinyKnnError",
    "TinyKnnWarning",
    "__version__",
    "compute_topk",
]
