"""Safety: an output never destroys what the user has, and one run at a time writes a given output.

- `check_output_path`: a file output (and any file its format writes beside it) may replace any regular file
  except an input (compared by device and inode, so `..`, symbolic and hard links are caught); a folder output
  (npy) may replace only an earlier tiny-knn folder of the same kind, never the current folder or one above
  it; no output goes inside an input's shard folder or matches its shard pattern.
- `OutputLock`: an exclusive `flock` on `OUT.lock` beside the output for the whole run, so a second run on the
  same output stops at once. A killed run may leave the file, never a held lock (flock dies with its process).
  Once it holds the lock, a run clears what a run killed while writing that output left beside it (its
  temporary files and folders, by tiny-knn's names for them; a folder output's previous version, moved aside,
  is put back first if nothing replaced it).
- `check_before_writing`: just before an output replaces what is there, the path is checked again (the folder
  may have changed during a long run), and every input must still be the file it was when the run listed it
  (device, inode, size, modification time): an answer read partly from a file rewritten during the run is an
  error, never written.

`check_output_path` is called before any work.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .checkpoint import CHECKPOINT_SUFFIX, checkpoint_folder
from .errors import InputChangedError, OutputError
from .results import beside_output
from .sources import Source, is_pattern

try:
    import fcntl
except ImportError:  # Windows: no flock, no lock
    fcntl = None  # type: ignore[assignment]

LOCK_SUFFIX = ".lock"
# What tiny-knn writes in a folder output, by the kind recorded in its meta.json ("topk" when absent): a top-k
# result, a range search's pairs in CSR form (range_output.py), a de-duplication's groups (dedup.py).
FOLDER_ENTRIES = {
    "topk": frozenset({"indices.npy", "scores.npy", "meta.json", "query_ids.txt", "doc_ids.txt"}),
    "range": frozenset({"offsets.npy", "indices.npy", "scores.npy", "meta.json", "query_ids.txt", "doc_ids.txt"}),
    "dedup": frozenset({"group.npy", "representative.npy", "meta.json"}),
}
# Keys every tiny-knn meta.json holds.
META_KEYS = frozenset({"queries_path", "docs_path", "k"})


@dataclass(frozen=True)
class Inputs:
    """Everything a run reads: files, each with the words that name it, and the folders and glob patterns
    whose matching files are inputs (shards)."""

    files: tuple[tuple[str, str], ...] = ()
    folders: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    # Each file's (device, inode, size, modification time) when the inputs were listed (None: it could not be read)
    stamps: tuple[tuple[int, int, int, int] | None, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stamps", tuple(_stamp(path) for _, path in self.files))

    @classmethod
    def of(cls, sources: Sequence[Source], extra: Sequence[tuple[str, str]] = ()) -> Inputs:
        """The inputs of `sources` (every shard), and `extra` (description, path) files such as ids files."""
        files = [(source.label(), path) for source in sources for path in source.files()]
        folders = tuple(source.path for source in sources if os.path.isdir(source.path))
        patterns = tuple(source.path for source in sources if is_pattern(source.path))
        return cls((*files, *extra), folders, patterns)

    def __add__(self, other: Inputs) -> Inputs:
        return Inputs(self.files + other.files, self.folders + other.folders, self.patterns + other.patterns)


def check_output_path(path: str, fmt: str, inputs: Inputs, *, folder_kind: str = "topk") -> None:
    """Raises OutputError unless an output of format `fmt` may be written at `path` (see the module docstring),
    and its checkpoint and lock beside it harm nothing either."""
    for suffix, what in ((LOCK_SUFFIX, "lock files"), (CHECKPOINT_SUFFIX, "checkpoints")):
        if path.endswith(suffix):
            raise OutputError(
                f"output path '{path}' ends in {suffix}, the name tiny-knn gives its {what}; choose another name"
            )
    parent = os.path.dirname(os.path.abspath(path))
    for folder in (os.path.dirname(path) or ".", parent):  # as given ('sub/..' needs 'sub'; 'file.pt/..'), then whole
        if not os.path.isdir(folder):
            raise OutputError(f"output path '{path}': folder '{folder}' does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output path '{path}': folder '{parent}' is not writable")
    if fmt != "npy" and os.path.isdir(path):
        raise OutputError(f"output path '{path}' is a directory; expected a file name such as {path}/result.{fmt}")
    _check_not_among_inputs(path, inputs)
    if fmt == "npy":
        _check_replaceable_folder(path, folder_kind)
    else:
        _check_regular(path, "output path")
    for beside in beside_output(path, fmt):  # the scores of an ivecs ground truth
        _check_not_among_inputs(beside, inputs, "scores file")
        _check_regular(beside, "scores file")
    for beside, what in ((path + LOCK_SUFFIX, "lock file"), (checkpoint_folder(path), "checkpoint")):
        _check_not_among_inputs(beside, inputs, what)
    check_lock_file(path + LOCK_SUFFIX)


def check_before_writing(path: str, fmt: str, inputs: Inputs, *, folder_kind: str = "topk") -> None:
    """check_output_path again, just before the output is written; and raises InputChangedError if an input file
    is no longer the one the run listed (another file in its place, or rewritten: its size or time moved)."""
    check_output_path(path, fmt, inputs, folder_kind=folder_kind)
    for (description, input_path), was in zip(inputs.files, inputs.stamps, strict=True):
        now = _stamp(input_path)
        if now == was:
            continue
        if was is None or now is None or now[:2] != was[:2]:
            how = "another file is there now" if now is not None else "it is gone"
        elif now[2] != was[2]:
            how = f"{now[2]} bytes, was {was[2]}"
        else:
            how = "rewritten in place: its modification time moved"
        raise InputChangedError(
            f"{description} changed while it was being read ('{input_path}': {how}); nothing was written"
        )


def _stamp(path: str) -> tuple[int, int, int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def output_path(path: str) -> str:
    """The output path as tiny-knn names it and the files beside it: without trailing separators (so that `res/`
    and `res` share one lock and one checkpoint)."""
    stripped = path.rstrip(os.sep)
    return stripped or path


def _check_not_among_inputs(path: str, inputs: Inputs, what: str = "output path") -> None:
    """Refuses a path that is an input file (same device and inode), lies inside an input's shard folder, or
    matches an input's shard pattern."""
    identity = _identity(path)
    for description, input_path in inputs.files:
        if identity is not None and identity == _identity(input_path):
            raise OutputError(f"{what} '{path}' is the {description} (an input); choose another --output-path")
        if os.path.isdir(path) and _inside(input_path, path):
            raise OutputError(f"{what} '{path}' holds the {description} (an input); choose another --output-path")
    for folder in inputs.folders:
        if _inside(path, folder):
            raise OutputError(
                f"{what} '{path}' lies inside the input shard folder '{folder}'; choose a path outside it"
            )
    for pattern in inputs.patterns:
        if _matches(path, pattern):
            raise OutputError(f"{what} '{path}' matches the input shard pattern '{pattern}'; choose another name")


def _check_replaceable_folder(path: str, kind: str) -> None:
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        if not os.path.isdir(path):
            raise OutputError(f"output path '{path}' is a file; the npy format writes a directory there")
        raise OutputError(f"output path '{path}' is a symbolic link; the npy format writes a directory there")
    here = os.path.realpath(os.getcwd())
    if _inside(here, path):
        raise OutputError(
            f"output path '{path}' is the current folder or one above it; the npy format replaces the folder "
            "it writes: name a new one"
        )
    entries = set(os.listdir(path))
    if not entries:
        return  # an empty folder: replacing it loses nothing
    if not _is_tiny_knn_folder(path, entries, kind):
        other = next((found for found in FOLDER_ENTRIES if found != kind and _is_tiny_knn_folder(path, entries, found)),
                     None)  # fmt: skip
        if other is not None:
            raise OutputError(
                f"output path '{path}' holds a tiny-knn {other} result, not a {kind} one; name a new folder, or "
                "delete it first"
            )
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise OutputError(
            f"output path '{path}' is a folder tiny-knn did not write (it holds {shown}); the npy format replaces "
            "the folder it writes: name a new one"
        )


def _is_tiny_knn_folder(path: str, entries: set[str], kind: str) -> bool:
    """Whether `path` is an earlier tiny-knn folder output of `kind`: only the files tiny-knn writes there, and
    a meta.json with tiny-knn's keys."""
    if "meta.json" not in entries or not entries <= FOLDER_ENTRIES.get(kind, frozenset()):
        return False
    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as stream:
            meta = json.load(stream)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.keys() >= META_KEYS and meta.get("kind", "topk") == kind


def _check_regular(path: str, what: str) -> None:
    """Refuses an existing path that is not a regular file (a dangling symbolic link is replaced, as a file)."""
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise OutputError(f"{what} '{path}' is not a regular file (a FIFO, device or socket); choose another path")


def _identity(path: str) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies below it, by identity (device and inode) of the folder and of each folder
    above the path (links resolved), so that another spelling, a link or a bind mount of the folder is caught."""
    target = _identity(folder)
    if target is None:
        return False
    here = os.path.realpath(path)
    while True:
        if _identity(here) == target:
            return True
        parent = os.path.dirname(here)
        if parent == here:
            return False
        here = parent


def _matches(path: str, pattern: str) -> bool:
    """Whether `path` would be one of a glob's shards: its name matches the pattern's last part, in the pattern's
    folder (compared by identity where that folder has no wildcards; by the real paths' text otherwise)."""
    folder, name = os.path.split(os.path.abspath(pattern))
    if not fnmatch.fnmatch(os.path.basename(path), name):
        return False
    if is_pattern(folder):
        return fnmatch.fnmatch(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.realpath(folder))
    return _identity(os.path.dirname(os.path.abspath(path))) == _identity(folder)


def check_lock_file(path: str) -> None:
    """Refuses a lock path holding something other than a tiny-knn lock file: a link (symbolic or hard), a
    folder or device, or a file with more in it than a pid. A lock is opened, written and deleted: never one
    that is not tiny-knn's."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputError(f"lock file '{path}': {exc.strerror or exc}") from None
    ours = stat.S_ISREG(status.st_mode) and status.st_nlink == 1 and status.st_size <= 32
    if ours:
        try:
            with open(path, "rb") as stream:
                ours = re.fullmatch(rb"[0-9]*\n?", stream.read(33)) is not None
        except OSError:
            ours = False
    if not ours:
        raise OutputError(
            f"lock file '{path}' exists and is not a tiny-knn lock (a link, a folder, or a file with other "
            "contents); remove it or choose another --output-path"
        )


class OutputLock:
    """An exclusive lock on `OUT.lock` for the whole run (see the module docstring). The file holds the pid of
    the run that holds it, for the message another run gets. Only a tiny-knn lock file is ever opened (never
    through a link), written or deleted; one left by another user is locked read-only."""

    def __init__(self, output_path: str, beside: Sequence[str] = ()) -> None:
        self.output_path, self.beside = output_path, tuple(beside)  # beside: other files the run writes
        self.path = output_path + LOCK_SUFFIX
        self._descriptor: int | None = None

    def __enter__(self) -> OutputLock:
        if fcntl is None:
            return self
        while True:
            check_lock_file(self.path)
            descriptor = self._open()
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(descriptor)
                os.close(descriptor)
                raise OutputError(
                    f"another tiny-knn run{f' (pid {holder})' if holder else ''} is writing '{self.output_path}'; "
                    "wait for it to finish, or choose another --output-path"
                ) from None
            # The run that held it may have removed the file since we opened it (and a third may have created
            # a new one): the lock counts only if the path is still the file we locked.
            if _identity(self.path) == _descriptor_identity(descriptor):
                break
            os.close(descriptor)
        self._descriptor = descriptor
        with contextlib.suppress(OSError):  # the pid is only for messages (and a read-only lock has none)
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        for path in (self.output_path, *self.beside):
            remove_leftovers(path)
        return self

    def _open(self) -> int:
        flags = os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            return os.open(self.path, os.O_RDWR | flags, 0o666)
        except PermissionError:  # left by another user's run: a read-only descriptor takes the lock as well
            try:
                return os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
            except OSError as exc:
                raise OutputError(f"lock file '{self.path}': cannot be opened: {exc.strerror or exc}") from None
        except OSError as exc:
            raise OutputError(f"lock file '{self.path}': cannot be created: {exc.strerror or exc}") from None

    def __exit__(self, *exc_info: object) -> None:
        if self._descriptor is None:
            return
        if _identity(self.path) == _descriptor_identity(self._descriptor):  # still ours: not replaced meanwhile
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still held: no other run can hold a lock on this file meanwhile
        os.close(self._descriptor)
        self._descriptor = None


def remove_leftovers(path: str) -> None:
    """Deletes what a run killed while writing `path` left beside it, by the names results.py gives them (a
    file or folder being written, `.NAME.XXXXXXXX.tmp`; a folder output's previous version moved aside,
    `.NAME.XXXXXXXX.old/previous`, put back first where nothing has replaced it). Only for the run that holds
    the output's lock: no other run can be writing them."""
    folder = os.path.dirname(os.path.abspath(path))
    name = re.compile(rf"\.{re.escape(os.path.basename(path))}\.[a-z0-9_]{{8}}\.(tmp|old)")  # tempfile's names
    try:
        entries = [entry for entry in os.scandir(folder) if name.fullmatch(entry.name)]
    except OSError:
        return
    for entry in entries:
        with contextlib.suppress(OSError):
            previous = os.path.join(entry.path, "previous")
            if entry.name.endswith(".old") and os.path.isdir(previous) and not os.path.lexists(path):
                os.replace(previous, path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


@contextlib.contextmanager
def held(lock: OutputLock | None) -> Iterator[None]:
    """`with lock`, or nothing when there is no lock to take."""
    if lock is None:
        yield
        return
    with lock:
        yield


def _read_pid(descriptor: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(descriptor, 32, 0).decode().strip() or "0") or None
    return None


def _descriptor_identity(descriptor: int) -> tuple[int, int]:
    status = os.fstat(descriptor)
    return status.st_dev, status.st_ino
