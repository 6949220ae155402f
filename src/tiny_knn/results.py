"""Writing: the result file. Its schema is the original contract; it is written atomically.

The file is a `torch.save` of a plain dict (loadable with `torch.load(path)`, weights_only): `indices`
(Q, K) int64, `scores` (Q, K) float32, `queries_path`, `docs_path`, `k`, `batch_size`, `dtype`, `device`,
plus `chunk_size` and `version`. It is first written to a temporary file beside the target and renamed
into place, so a reader never sees a half-written result and a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any

import torch

from .errors import OutputError


def default_output_path(queries_path: str, docs_path: str, k: int) -> str:
    """`top{k}_{queries}_x_{docs}.pt`, next to the queries file."""
    query_name = os.path.splitext(os.path.basename(queries_path))[0]
    doc_name = os.path.splitext(os.path.basename(docs_path))[0]
    return os.path.join(os.path.dirname(queries_path), f"top{k}_{query_name}_x_{doc_name}.pt")


def check_output_path(path: str) -> None:
    """Raises OutputError unless `path` can be created: its folder exists and is writable."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise OutputError(f"output path '{path}' is a directory; expected a file name such as {path}/result.pt")
    if not os.path.isdir(folder):
        raise OutputError(f"output path '{path}': folder '{folder}' does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output path '{path}': folder '{folder}' is not writable")


def write_result(path: str, result: dict[str, Any]) -> None:
    """Saves `result` to `path` atomically (temporary file, fsync, rename).

    Raises:
        OutputError: the file could not be written (disk full, permissions); nothing is left behind.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(f"output path '{path}': cannot create a file in '{folder}': {exc.strerror}") from None
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(result, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(exc, OSError):
            raise OutputError(f"output path '{path}': writing failed: {exc.strerror or exc}") from None
        raise
