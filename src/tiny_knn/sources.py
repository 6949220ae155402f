"""Reading: open an embeddings file on disk as a source of rows, without ever loading it whole.

A source knows its shape and dtype and copies row ranges on demand into a caller's buffer, checking that
they are finite. `.pt` files are memory-mapped (`torch.load(mmap=True, weights_only=True)`), so resident
memory does not grow with the file and no pickled code is ever run. Readers know nothing of devices.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputFileError, InvalidInputError

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: how dtypes are spelled in messages."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Source:
    """A 2-D float tensor on disk: `rows` vectors of `dim` values, read in row ranges."""

    path: str
    role: str  # "queries" or "docs", used in every message
    tensor: torch.Tensor  # memory-mapped; never materialised whole

    @property
    def rows(self) -> int:
        return int(self.tensor.shape[0])

    @property
    def dim(self) -> int:
        return int(self.tensor.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def nbytes(self) -> int:
        return self.rows * self.dim * self.tensor.element_size()

    def label(self) -> str:
        return f"{self.role} file '{self.path}'"

    def read_into(self, start: int, stop: int, out: torch.Tensor) -> None:
        """Copies rows [start, stop) into out[: stop - start], converting dtype; refuses NaN or Inf.

        Runs on the engine's read-ahead thread, so it uses numpy where it can: numpy is single-threaded and
        does not compete with the matrix product for torch's thread pool.

        Raises:
            InvalidInputError: a row holds NaN or Inf (the first such row is named).
        """
        block = out[: stop - start]
        rows = self.tensor[start:stop]
        if rows.dtype == torch.bfloat16 or block.dtype == torch.bfloat16:  # numpy has no bfloat16
            block.copy_(rows)
        else:
            np.copyto(block.numpy(), rows.numpy(), casting="same_kind")
        # NaN and Inf survive any sum, so one cheap pass suffices; only then look for the row (a sum of huge
        # finite values can overflow too, hence the second, exact check).
        with np.errstate(over="ignore", invalid="ignore"):
            suspicious = not np.isfinite(block.numpy().sum())
        if suspicious and not bool(torch.isfinite(block).all()):
            bad = int(torch.nonzero(~torch.isfinite(block).all(dim=1))[0, 0]) + start
            raise InvalidInputError(
                f"{self.label()}: row {bad} holds NaN or Inf; expected finite values (clean or drop that row)"
            )

    def read_rows(self, positions: torch.Tensor, out: torch.Tensor) -> None:
        """Copies the rows at `positions` (int64) into out[: len(positions)], converting dtype.

        Values are not checked here: every row is checked when the docs are streamed.
        """
        out[: positions.numel()].copy_(self.tensor[positions])


def open_source(path: str | os.PathLike[str], role: str) -> Source:
    """Opens a `.pt` file holding one 2-D float tensor, memory-mapped, after checking everything cheap.

    Raises:
        InputFileError: the file is missing or unreadable.
        InvalidInputError: the file is corrupt, not a tensor, not 2-D, not float, or empty.
    """
    path = os.fspath(path)
    label = f"{role} file '{path}'"
    if not os.path.exists(path):
        raise InputFileError(f"{label}: no such file")
    if not os.path.isfile(path):
        raise InputFileError(f"{label}: is a directory, expected a .pt file holding a 2-D tensor")
    if not os.access(path, os.R_OK):
        raise InputFileError(f"{label}: permission denied")
    if os.path.getsize(path) == 0:
        raise InvalidInputError(f"{label}: the file is empty; expected a tensor saved with torch.save")
    tensor = _load_mmap(path, label)
    if not isinstance(tensor, torch.Tensor):
        raise InvalidInputError(
            f"{label}: holds a {type(tensor).__name__}, expected a single tensor saved with torch.save(tensor, path)"
        )
    if tensor.dim() != 2:
        raise InvalidInputError(
            f"{label}: tensor has shape {tuple(tensor.shape)}, expected 2-D (rows, dim)"
            + ("; reshape it with .reshape(-1, dim)" if tensor.dim() > 0 else "")
        )
    if tensor.dtype not in SUPPORTED_DTYPES:
        hint = " (convert with .float())" if tensor.dtype.is_floating_point else ""
        raise InvalidInputError(
            f"{label}: dtype {dtype_name(tensor.dtype)}, expected float32, float16 or bfloat16{hint}"
        )
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise InvalidInputError(
            f"{label}: tensor has shape {tuple(tensor.shape)}, expected at least one row and column"
        )
    return Source(path=path, role=role, tensor=tensor)


def _load_mmap(path: str, label: str) -> object:
    # torch.save writes a zip archive; anything else is truncated, corrupt, legacy or not torch at all.
    if not zipfile.is_zipfile(path):
        raise InvalidInputError(
            f"{label}: not a PyTorch zip archive (truncated, corrupt, or saved in the legacy format); "
            "expected a file written by torch.save(tensor, path)"
        )
    try:
        with warnings.catch_warnings():  # torch's remarks on odd pickles; our own verdict follows
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InvalidInputError(
            f"{label}: holds pickled objects other than tensors, refused without running them ({_first_sentence(exc)})"
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise InvalidInputError(
            f"{label}: not a readable torch file (truncated or corrupt?): {_first_sentence(exc)}"
        ) from None


def _first_sentence(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(". ")[0]


def check_compatible(queries: Source, docs: Source) -> None:
    """Raises InvalidInputError unless queries and docs have the same dimension."""
    if queries.dim != docs.dim:
        raise InvalidInputError(
            f"dimension mismatch: {queries.label()} has dim {queries.dim}, "
            f"{docs.label()} has dim {docs.dim}; both must have the same number of columns"
        )
