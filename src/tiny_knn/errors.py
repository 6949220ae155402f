"""The errors tiny-knn raises on purpose, and its one warning. Each error names the file, what was found and
what was expected.

Every class is also a built-in exception (ValueError or OSError), so callers can catch either. The CLI
turns any TinyKnnError into one line on stderr and exit code 2.
"""

from __future__ import annotations

import errno


class TinyKnnError(Exception):
    """Base class of every error tiny-knn raises about its inputs, options or outputs."""


class InvalidInputError(TinyKnnError, ValueError):
    """An input file or option holds something tiny-knn cannot search: wrong shape, dtype or value."""


class InputFileError(TinyKnnError, OSError):
    """An input file is missing or unreadable."""


class InputChangedError(InputFileError):
    """An input file changed (shrank, was cut or rewritten) while tiny-knn was reading it."""


class OutputError(TinyKnnError, OSError):
    """The result cannot be written where it was asked to go."""


class MemoryBudgetError(TinyKnnError, ValueError):
    """The memory budget is too small for even the smallest plan."""


class TinyKnnWarning(UserWarning):
    """Something was adjusted rather than refused (for instance k clamped to the number of docs)."""


def first_sentence(exc: BaseException) -> str:
    """The first sentence of an exception's message (its type's name if it has none), for one-line reports."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(". ")[0]


def output_error(message: str, cause: BaseException | None = None) -> OutputError:
    """An OutputError that keeps the errno of the OSError behind it, so that a full disk stays recognisable."""
    error = OutputError(message)
    if isinstance(cause, OSError):
        error.errno = cause.errno
    return error


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the disk (or the user's quota) is full."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
