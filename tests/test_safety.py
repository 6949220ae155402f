"""Never destroy what the user has. Each case runs the real CLI in a subprocess and checks its exit code, its
one-line message, that no input changed (every file's hash before and after) and that nothing is left behind.
Cases that must act in the middle of a search (cut an input, start a second run, fill the disk) use the
engine's test-only pause (TINY_KNN_TEST_PAUSE), so that they never race the search on 2 cores."""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tiny_knn import MemoryBudgetError, OutputError, TinyKnnWarning, compute_topk
from tiny_knn.cli import main
from tiny_knn.results import beside_output
from tiny_knn.safety import Inputs, OutputLock, check_output_path
from tiny_knn.sources import open_source

pytestmark = pytest.mark.slow

Q_ROWS, D_ROWS, DIM = 60, 4000, 16


@pytest.fixture
def inputs(tmp_path) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(3)
    torch.save(torch.randn(Q_ROWS, DIM, generator=generator), tmp_path / "q.pt")
    torch.save(torch.randn(D_ROWS, DIM, generator=generator), tmp_path / "d.pt")
    return tmp_path / "q.pt", tmp_path / "d.pt"


def tiny_knn(*argv: object, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen[str]:
    """The CLI as a process (--cpu --quiet are for the caller to add)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tiny_knn", *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def finished(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def run(*argv: object, cwd: Path | None = None) -> tuple[int, str, str]:
    return finished(tiny_knn(*argv, cwd=cwd))


def the_error(err: str, pattern: str) -> str:
    """The one error line of stderr, checked against `pattern`; every other line is a tiny-knn note."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("tiny-knn: error: ")]
    assert len(errors) == 1 and all(line.startswith("tiny-knn: ") for line in lines), err
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below `folder` (links as their target's path) by content hash: what a run must not change."""
    seen = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            seen[name] = "-> " + os.readlink(path)
        elif path.is_file():
            seen[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            seen[name] = "dir"
        else:
            seen[name] = "special"
    return seen


@contextlib.contextmanager
def paused(pause: Path, process: subprocess.Popen[str]) -> Iterator[None]:
    """Waits until the process stops at the engine's test pause, yields, then lets it go on."""
    deadline = time.monotonic() + 120
    while not pause.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never reached its pause"
        time.sleep(0.01)
    yield
    pause.unlink()


# ---- 1. An output never destroys an input, a folder, or anything tiny-knn did not write.


@pytest.mark.parametrize(
    "case", ["docs", "queries", "dotdot", "symlink", "hardlink", "trec", "ids", "shard-folder", "shard-glob"]
)
def test_an_output_never_replaces_an_input(inputs, tmp_path, case) -> None:  # type: ignore[no-untyped-def]
    queries, docs = inputs
    (tmp_path / "sub").mkdir()
    extra: list[object] = []
    if case == "symlink":
        (tmp_path / "link.pt").symlink_to(docs)
    if case == "hardlink":
        os.link(docs, tmp_path / "hard.pt")
    if case == "ids":
        (tmp_path / "ids.txt").write_text("".join(f"q{i}\n" for i in range(Q_ROWS)))
        extra = ["--query-ids", tmp_path / "ids.txt"]
    if case.startswith("shard"):
        (tmp_path / "shards").mkdir()
        for part in range(2):
            torch.save(torch.randn(100, DIM), tmp_path / "shards" / f"part{part}.pt")
        docs = tmp_path / ("shards" if case == "shard-folder" else "shards/*.pt")
    output = {
        "docs": docs,
        "queries": queries,
        "dotdot": tmp_path / "sub" / ".." / "d.pt",
        "symlink": tmp_path / "link.pt",
        "hardlink": tmp_path / "hard.pt",
        "trec": docs,
        "ids": tmp_path / "ids.txt",
        "shard-folder": tmp_path / "shards" / "out.pt",
        "shard-glob": tmp_path / "shards" / "out.pt",
    }[case]
    form = ["--format", "trec"] if case == "trec" else []
    before = snapshot(tmp_path)
    code, out, err = run(queries, docs, "--k", 5, "--cpu", "--quiet", "--output-path", output, *form, *extra)
    assert code == 2 and out == ""
    the_error(err, r"output path '.*' (is the .* \(an input\)|lies inside the input shard folder|matches the input)")
    assert snapshot(tmp_path) == before


def test_an_output_in_a_missing_folder_names_that_folder(inputs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """'missing/../d.pt' resolves nowhere: the folder named is the one as given, not its absolute form (which
    exists)."""
    queries, docs = inputs
    before = snapshot(tmp_path)
    output = tmp_path / "missing" / ".." / "d.pt"
    code, _, err = run(queries, docs, "--k", 5, "--cpu", "--quiet", "--output-path", output)
    assert code == 2
    the_error(err, r"output path '.*missing/\.\./d\.pt': folder '.*missing/\.\.' does not exist; create it first")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["foreign", "cwd", "above-cwd", "holds-inputs", "earlier-result", "empty"])
def test_a_folder_output_replaces_only_an_earlier_tiny_knn_folder(inputs, tmp_path, case) -> None:  # type: ignore[no-untyped-def]
    queries, docs = inputs
    work = tmp_path / "work"
    work.mkdir()
    target = {
        "foreign": tmp_path / "mine",
        "cwd": Path("."),
        "above-cwd": tmp_path,
        "holds-inputs": tmp_path,
        "earlier-result": tmp_path / "result",
        "empty": tmp_path / "empty",
    }[case]
    if case == "foreign":
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("keep me")
        (tmp_path / "mine" / "indices.npy").write_bytes(b"not ours")
    if case == "earlier-result":
        assert run(queries, docs, "--k", 3, "--cpu", "--quiet", "--format", "npy", "--output-path", target)[0] == 0
    if case == "empty":
        target.mkdir()
    cwd = work if case in ("cwd", "above-cwd") else tmp_path
    before = snapshot(tmp_path)
    code, _, err = run(queries, docs, "--k", 5, "--cpu", "--quiet", "--format", "npy", "--output-path", target, cwd=cwd)
    if case in ("earlier-result", "empty"):
        assert code == 0, err
        assert json.loads((target / "meta.json").read_text())["k"] == 5
        assert snapshot(tmp_path / "work") == {} and (tmp_path / "q.pt").exists()
        return
    assert code == 2
    the_error(err, r"(a folder tiny-knn did not write|the current folder or one above it|holds the .* \(an input\))")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("restart", [False, True])
@pytest.mark.parametrize("case", ["foreign-file", "bad-manifest", "not-a-folder"])
def test_a_checkpoint_folder_tiny_knn_did_not_make_is_refused_not_deleted(inputs, tmp_path, case, restart) -> None:  # type: ignore[no-untyped-def]
    queries, docs = inputs
    folder = tmp_path / "out.pt.checkpoint"
    if case == "not-a-folder":
        folder.write_text("mine")
    else:
        folder.mkdir()
        if case == "foreign-file":
            (folder / "thesis.tex").write_text("years of work")
        else:
            (folder / "manifest.json").write_text("{not json")
    before = snapshot(tmp_path)
    flags = ["--restart"] if restart else []
    code, _, err = run(queries, docs, "--k", 5, "--cpu", "--quiet", "--batch-size", 20, "--output-path",
                       tmp_path / "out.pt", *flags)  # fmt: skip
    assert code == 2
    the_error(err, r"checkpoint .*(did not write|cannot be read|not a folder tiny-knn made)")
    assert snapshot(tmp_path) == before


# ---- 2. Inputs that change under a run give a clean error, never a signal.


@pytest.mark.parametrize("case", ["pt", "npy", "l2-in-place"])
def test_an_input_cut_during_a_search_is_a_clean_error(inputs, tmp_path, case) -> None:  # type: ignore[no-untyped-def]
    """The docs file is cut while a real search waits at its pause: after its first chunk (pt, npy: the next
    chunks are read with pread), or, with one chunk of l2 docs, in the second batch, before its candidates are
    re-scored from the file's mapping that the first batch made (the C kernel's guarded reads)."""
    queries, docs = inputs
    if case == "npy":
        np.save(tmp_path / "d.npy", torch.load(docs).numpy())
        docs = tmp_path / "d.npy"
    chunk = ["--chunk-size", D_ROWS, "--metric", "l2"] if case == "l2-in-place" else ["--chunk-size", 256]
    pause = tmp_path / "pause"
    process = tiny_knn(queries, docs, "--k", 5, "--cpu", "--batch-size", 20, *chunk,
                       "--output-path", tmp_path / "out.pt", env={"TINY_KNN_TEST_PAUSE": str(pause)})  # fmt: skip
    size = docs.stat().st_size
    if case == "l2-in-place":
        with paused(pause, process):
            pass
    with paused(pause, process):
        before = snapshot(tmp_path)
        os.truncate(docs, 4096)
    code, _, err = finished(process)
    assert code == 2
    the_error(err, rf"docs file '.*' changed while it was being read \(4096 bytes, was {size}\); nothing was written")
    assert re.search(r"deleted the checkpoint .*: its inputs changed: the docs '.*': changed size", err), err
    cut = docs.name
    after = snapshot(tmp_path)
    assert after.pop(cut) != before.pop(cut)
    assert before.pop("pause") and {"out.pt.checkpoint", "out.pt.lock"} <= before.keys()
    assert after == {name: digest for name, digest in before.items() if not name.startswith("out.pt")}
    # the queries untouched; no output, checkpoint, lock or temporary file left


@pytest.mark.parametrize("search", ["topk", "range", "dedup"])
def test_an_input_rewritten_in_place_during_a_search_is_a_clean_error(inputs, tmp_path, search) -> None:  # type: ignore[no-untyped-def]
    """The docs (.npy, read with pread) are rewritten in place, same size, after the first chunk of a one-pass
    search: its later chunks would be the new rows, the answer a mix of both files. Nothing is written."""
    queries, docs = inputs
    np.save(tmp_path / "d.npy", torch.load(docs).numpy())
    docs = tmp_path / "d.npy"
    argv: list[object] = {
        "topk": [queries, docs, "--k", 5, "--cpu", "--output-path", tmp_path / "out.pt"],
        "range": [queries, docs, "--min-score", 4, "--cpu", "--output-path", tmp_path / "out.parquet"],
        "dedup": ["dedup", docs, "--threshold", 0.9, "--output-path", tmp_path / "out.parquet"],
    }[search]
    pause = tmp_path / "pause"
    process = tiny_knn(*argv, "--quiet", "--chunk-size", 256, env={"TINY_KNN_TEST_PAUSE": str(pause)})
    with paused(pause, process):
        size = docs.stat().st_size
        rows = np.load(docs, mmap_mode="r+")
        rows[:] = -rows  # other rows, the same size
        rows.flush()
        del rows
        assert docs.stat().st_size == size
        before = snapshot(tmp_path)
    code, _, err = finished(process)
    assert code == 2
    the_error(err, r"docs file '.*' changed while it was being read \('.*d.npy': rewritten in place: its modification "
                   r"time moved\); nothing was written")  # fmt: skip
    after = snapshot(tmp_path)
    assert before.pop("pause")
    assert after == {name: digest for name, digest in before.items() if not name.startswith("out.")}
    # no output, checkpoint, lock or temporary file left; the inputs as they were at the pause


def test_resume_notices_a_file_rewritten_with_the_same_size_and_time(inputs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    queries, docs = inputs
    pause = tmp_path / "pause"
    process = tiny_knn(queries, docs, "--k", 5, "--cpu", "--quiet", "--batch-size", 20, "--output-path",
                       tmp_path / "out.pt", env={"TINY_KNN_TEST_PAUSE": str(pause)})  # fmt: skip
    with paused(pause, process):
        pass
    with paused(pause, process):  # the first batch is saved; stopped in the second
        process.kill()
    process.communicate()
    assert json.loads((tmp_path / "out.pt.checkpoint" / "manifest.json").read_text())["done_rows"] == 20
    status = docs.stat()
    other = torch.load(docs)
    other[1000:] = torch.randn(D_ROWS - 1000, DIM)  # other values, same shape: the same size
    torch.save(other, docs)
    os.utime(docs, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert docs.stat().st_size == status.st_size and docs.stat().st_mtime_ns == status.st_mtime_ns
    code, _, err = run(queries, docs, "--k", 5, "--cpu", "--quiet", "--batch-size", 20, "--output-path",
                       tmp_path / "out.pt")  # fmt: skip
    assert code == 2
    the_error(err, r"belongs to another run \(the docs '.*': rewritten \(its content differs with the same size and "
              r"modification time\)\); run with --restart")  # fmt: skip


@pytest.mark.parametrize("special", ["fifo", "/dev/zero", "/dev/null"])
def test_a_fifo_or_device_is_not_a_regular_file(inputs, tmp_path, special) -> None:  # type: ignore[no-untyped-def]
    queries, _ = inputs
    docs = special
    if special == "fifo":
        docs = str(tmp_path / "docs.pt")
        os.mkfifo(docs)
    code, _, err = run(queries, docs, "--k", 5, "--cpu", "--quiet", "--output-path", tmp_path / "out.pt")
    assert code == 2
    the_error(err, r"docs file '.*': is not a regular file \(a FIFO, device or socket\)")
    assert not (tmp_path / "out.pt").exists()


# ---- 4. One writer per output.


def test_a_second_run_on_the_same_output_stops_at_once(inputs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    queries, docs = inputs
    argv = [queries, docs, "--k", 5, "--cpu", "--quiet", "--batch-size", 20, "--output-path", tmp_path / "out.pt"]
    pause = tmp_path / "pause"
    first = tiny_knn(*argv, env={"TINY_KNN_TEST_PAUSE": str(pause)})
    with paused(pause, first):
        started = time.monotonic()
        code, _, err = run(*argv)
        assert code == 2 and time.monotonic() - started < 60
        the_error(err, rf"another tiny-knn run \(pid {first.pid}\) is writing '.*out.pt'")
        assert json.loads((tmp_path / "out.pt.checkpoint" / "manifest.json").read_text())["done_rows"] == 0
    while first.poll() is None:  # the first run's later batches pause too
        with contextlib.suppress(FileNotFoundError):
            pause.unlink()
        time.sleep(0.01)
    code, _, err = finished(first)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["d.pt", "out.pt", "q.pt"]  # no lock file, no checkpoint


def test_a_lock_file_left_by_a_killed_run_blocks_nothing(inputs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    queries, docs = inputs
    (tmp_path / "out.pt.lock").write_text("12345\n")  # its holder is gone: the lock died with it
    code, _, err = run(queries, docs, "--k", 5, "--cpu", "--quiet", "--output-path", tmp_path / "out.pt")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["d.pt", "out.pt", "q.pt"]


@pytest.mark.parametrize("fmt", ["pt", "npy"])
def test_the_next_run_clears_what_a_run_killed_while_writing_left(inputs, tmp_path, fmt) -> None:  # type: ignore[no-untyped-def]
    """A run killed while it wrote its output leaves temporaries (.OUT.XXXXXXXX.tmp) and, for a folder output, the
    previous folder moved aside (.OUT.XXXXXXXX.old/previous); the next run on that output, once it holds the lock,
    deletes them, putting the previous folder back first if nothing replaced it. Other names are left alone."""
    queries, docs = inputs
    out, name = tmp_path / f"out.{fmt}", f"out.{fmt}"
    argv = [str(queries), str(docs), "--cpu", "--quiet", "--output-path", str(out), "--format", fmt]
    left = [tmp_path / f".{name}.k1ll_3d0.tmp", tmp_path / f".{name}.a8c7e6d5.tmp"]
    left[0].write_bytes(b"half a result")
    left[1].mkdir()
    (left[1] / "indices.npy").write_bytes(b"half")
    others = [tmp_path / f".{name}.short.tmp", tmp_path / ".other.pt.abcdefgh.tmp", tmp_path / f"{name}.tmp"]
    for other in others:
        other.write_text("not tiny-knn's")
    if fmt == "npy":  # killed between moving the previous result aside and renaming the new one into place
        assert main([*argv, "--k", "3"]) == 0
        aside = tmp_path / f".{name}.zz_99yy8.old"
        aside.mkdir()
        out.rename(aside / "previous")
        previous = json.loads((aside / "previous" / "meta.json").read_text())
        assert previous["k"] == 3
    before = snapshot(tmp_path)
    with OutputLock(str(out)):
        if fmt == "npy":
            assert json.loads((out / "meta.json").read_text()) == previous  # put back before anything else
    assert not any(path.exists() for path in left) and not (tmp_path / f".{name}.zz_99yy8.old").exists()
    assert all(path.read_text() == "not tiny-knn's" for path in others)
    after = snapshot(tmp_path)
    gone = {name for name in before if name not in after}
    assert gone == {entry for entry in before if entry.startswith((left[0].name, left[1].name, f".{name}.zz_99yy8"))}
    assert main([*argv, "--k", "5"]) == 0


def test_the_lock_is_the_file_at_the_path_after_a_removal_race(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A run that takes the lock just as its holder removes the file must not count a lock on the removed
    file: with two locks in one process (flock is per open file), the second sees the first's and refuses,
    and once the first is released (file removed) a new one is taken on a fresh file."""
    output = str(tmp_path / "out.pt")
    with (
        OutputLock(output),
        pytest.raises(OutputError, match=rf"another tiny-knn run \(pid {os.getpid()}\) is writing"),
        OutputLock(output),
    ):
        pass
    assert not os.path.exists(output + ".lock")
    with OutputLock(output) as lock:
        assert os.path.exists(lock.path)


# ---- 5. Failure messages tell the truth.


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    """A 4 MiB tmpfs, where this machine lets the test mount one (root, or a container that allows it)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"no tmpfs can be mounted here ({mounted.stderr.decode().strip()}); test_disk_full_injected runs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def fill(folder: Path) -> None:
    with contextlib.suppress(OSError), open(folder / "filler", "wb", buffering=0) as stream:
        while True:
            stream.write(b"\0" * 65536)


@pytest.mark.parametrize(("when", "fmt"), [("checkpoint", "pt"), ("result", "pt"), ("result", "npy")])
def test_a_disk_that_fills_during_a_run_on_a_real_tmpfs(inputs, tmp_path, small_disk, when, fmt) -> None:  # type: ignore[no-untyped-def]
    """The output folder is a small tmpfs, filled while the run waits at its pause: during a multi-batch run (the
    checkpoint's next manifest cannot be written) or a single batch (the result cannot be written). One line,
    exit 2, no temporary file, and a count of saved queries that the manifest really holds."""
    queries, docs = inputs
    batches = ["--batch-size", 20] if when == "checkpoint" else []
    argv = [queries, docs, "--k", 5, "--cpu", "--output-path", small_disk / "out.pt", "--format", fmt, *batches]
    pause = tmp_path / "pause"
    process = tiny_knn(*argv, env={"TINY_KNN_TEST_PAUSE": str(pause)})
    with paused(pause, process):
        fill(small_disk)
    code, _, err = finished(process)
    assert code == 2
    the_error(err, r"(checkpoint|output path) '.*': (cannot be written|writing failed): No space left on device")
    assert "free some space" in err or when == "result"
    left = sorted(os.listdir(small_disk))
    if when == "checkpoint":
        assert "stopped: 0 of 60 queries are saved in" in err and "free some space, then run the same" in err
        assert left == ["filler", "out.pt.checkpoint"]
        assert sorted(os.listdir(small_disk / "out.pt.checkpoint")) == ["indices.npy", "manifest.json", "scores.npy"]
    else:
        assert left == ["filler"]
    os.unlink(small_disk / "filler")
    code, _, err = run(*argv)
    assert code == 0, err
    reference = compute_topk(queries, docs, k=5, force_cpu=True, out_path=str(tmp_path / "reference.pt"))
    if fmt == "npy":
        assert np.array_equal(np.load(small_disk / "out.pt" / "indices.npy"), torch.load(reference)["indices"].numpy())
    else:
        assert torch.equal(torch.load(small_disk / "out.pt")["indices"], torch.load(reference)["indices"])


def test_bad_data_found_mid_run_says_what_to_fix(inputs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    queries, docs = inputs
    values = torch.load(docs)
    values[3000, 7] = float("nan")
    torch.save(values, docs)
    code, _, err = run(queries, docs, "--k", 5, "--cpu", "--batch-size", 20, "--output-path", tmp_path / "out.pt")
    assert code == 2
    the_error(err, r"row 3000 holds NaN or Inf; expected finite values \(clean or drop that row\)")
    assert "run the same command again" not in err and "deleted the checkpoint" in err
    assert sorted(os.listdir(tmp_path)) == ["d.pt", "q.pt"]


# ---- 6, 7. The demo's result line; sizes, budgets and the help.


@pytest.mark.parametrize("keep", [False, True])
def test_the_demo_names_its_result_only_where_it_survives(tmp_path, keep) -> None:  # type: ignore[no-untyped-def]
    workdir = ["--workdir", tmp_path / "demo"] if keep else []
    code, out, err = run(
        "demo", "--docs", 2000, "--queries", 20, "--dim", 16, "--k", 5, "--cpu", *workdir, cwd=tmp_path
    )
    assert code == 0, err
    shown = re.search(r"^result:\s+(.*)$", out, re.MULTILINE)
    assert shown is not None
    if keep:
        assert os.path.exists(shown.group(1))
    else:
        assert "removed on exit" in shown.group(1)


def test_sizes_are_taken_alike_by_the_library_and_the_command(inputs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    queries, docs = inputs
    with pytest.raises(MemoryBudgetError):
        compute_topk(queries, docs, k=5, force_cpu=True, out_path=str(tmp_path / "o.pt"), max_memory="1KB")
    code, _, err = run(queries, docs, "--k", 5, "--cpu", "--max-memory", "1KB", "--output-path", tmp_path / "o.pt")
    assert code == 2 and "budget" in err
    with pytest.warns(TinyKnnWarning, match=r"the memory budget \(.*\) is more than the .* of RAM available"):
        compute_topk(queries, docs, k=5, force_cpu=True, out_path=str(tmp_path / "o.pt"), max_memory="1000TB")


# ---- Hostile paths: whatever path an output is given, it is refused or it is not an input.

SEGMENTS = st.sampled_from(
    ["q.pt", "d.pt", "sub", "..", ".", "link-d", "link-sub", "shards", "new.pt", "ids.txt", "d.ivecs", "q.ivecs"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(SEGMENTS, min_size=1, max_size=4), fmt=st.sampled_from(["pt", "npy", "trec", "ivecs"]))
@example(parts=["sub", "..", "d.ivecs"], fmt="ivecs")  # its scores would be d.fvecs, an input
def test_no_output_path_reaches_an_input(tmp_path, parts, fmt) -> None:  # type: ignore[no-untyped-def]
    base = tmp_path / "hostile"
    if not base.exists():
        (base / "sub").mkdir(parents=True)
        (base / "shards").mkdir()
        torch.save(torch.randn(4, 3), base / "q.pt")
        torch.save(torch.randn(9, 3), base / "d.pt")
        torch.save(torch.randn(9, 3), base / "shards" / "s1.pt")
        (base / "ids.txt").write_text("a\nb\nc\nd\n")
        (base / "link-d").symlink_to(base / "d.pt")
        (base / "link-sub").symlink_to(base / "sub")
        np.concatenate([np.full((9, 1), 3, "<i4").view("<f4"), np.ones((9, 3), "<f4")], axis=1).tofile(base / "d.fvecs")
    sources = [open_source(str(base / "q.pt"), "queries"), open_source(str(base / "shards"), "docs")]
    inputs = Inputs.of(sources, [("query ids file", str(base / "ids.txt"))]) + Inputs.of(
        [open_source(str(base / "d.pt"), "docs"), open_source(str(base / "d.fvecs"), "docs")]
    )
    path = os.path.join(base, *parts)
    protected = [base / "q.pt", base / "d.pt", base / "shards" / "s1.pt", base / "ids.txt", base / "d.fvecs"]
    try:
        check_output_path(path, fmt, inputs)
    except OutputError:
        return
    real = os.path.realpath(path)
    for written in (path, *beside_output(path, fmt)):  # ivecs: the .fvecs of scores beside it too
        assert all(not os.path.exists(written) or not os.path.samefile(written, p) for p in protected)
    assert not real.startswith(os.path.realpath(base / "shards") + os.sep)
    if fmt == "npy" and os.path.isdir(path):
        assert all(not str(os.path.realpath(p)).startswith(real + os.sep) for p in protected)


class InjectedDisk:
    """Files opened under `folder` (by `open`, as every writer of tiny-knn opens them) and space reserved there
    by posix_fallocate count against `budget` bytes; past it, writes fail with ENOSPC, as on a full disk."""

    def __init__(self, folder: Path, budget: float) -> None:
        self.folder, self.budget, self.used = str(folder), budget, 0

    def charge(self, count: int) -> None:
        if self.used + count > self.budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.used += count

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_open, real_fallocate = builtins.open, os.posix_fallocate
        disk = self

        class Charged:
            def __init__(self, stream: Any) -> None:
                self._stream = stream

            def write(self, data: Any) -> int:
                disk.charge(len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes)
                return int(self._stream.write(data))

            def __getattr__(self, name: str) -> Any:
                return getattr(self._stream, name)

            def __enter__(self) -> Charged:
                return self

            def __exit__(self, *exc: object) -> None:
                self._stream.close()

        def charged_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            stream = real_open(file, mode, *args, **kwargs)
            inside = isinstance(file, (str, os.PathLike)) and os.path.abspath(file).startswith(disk.folder)
            return Charged(stream) if inside and any(c in mode for c in "wa+") else stream

        def charged_fallocate(descriptor: int, offset: int, length: int) -> None:
            disk.charge(length)
            real_fallocate(descriptor, offset, length)

        monkeypatch.setattr(builtins, "open", charged_open)
        monkeypatch.setattr(os, "posix_fallocate", charged_fallocate)


def test_disk_full_injected_at_every_point(inputs, tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """Runs on every machine (the tmpfs test above needs one it may mount): the disk fills after 0 bytes, after
    every write a run makes in turn, and never. Each run exits 0, or 2 with one line; leaves no temporary
    file, lock or partial output; and where its checkpoint survives, says how many queries it holds exactly
    as its manifest counts them."""
    queries, docs = inputs

    def attempt(budget: float) -> tuple[int, str, InjectedDisk]:
        out = tmp_path / f"out-{budget}"
        out.mkdir()
        disk = InjectedDisk(out, budget)
        with monkeypatch.context() as patch:
            disk.install(patch)
            code = main([str(queries), str(docs), "--k", "5", "--cpu", "--batch-size", "20", "--output-path",
                         str(out / "r.pt")])  # fmt: skip
        return code, capsys.readouterr().err, disk

    code, err, whole = attempt(float("inf"))
    assert code == 0, err
    budgets = sorted({0, 1, *np.linspace(0, whole.used - 1, 14).astype(int).tolist()})
    for budget in budgets:
        code, err, _ = attempt(budget)
        folder = tmp_path / f"out-{budget}"
        assert code == 2, (budget, err)
        the_error(err, r"No space left on device|disk is full")
        left = sorted(os.listdir(folder))
        assert left in ([], ["r.pt.checkpoint"]), (budget, left)
        if left:
            saved = json.loads((folder / "r.pt.checkpoint" / "manifest.json").read_text())["done_rows"]
            told = f"all {Q_ROWS} queries are saved" if saved == Q_ROWS else f"stopped: {saved} of {Q_ROWS} queries"
            assert told in err, err
            assert not any(name.endswith(".tmp") for name in os.listdir(folder / "r.pt.checkpoint"))


# ---- Found by a review of the above (each failed before its fix).


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "contents", "dangling", "folder"])
def test_a_lock_path_that_is_not_a_tiny_knn_lock_is_refused_and_left_alone(inputs, tmp_path, kind) -> None:  # type: ignore[no-untyped-def]
    queries, docs = inputs
    lock = tmp_path / "out.pt.lock"
    (tmp_path / "notes.txt").write_text("precious")
    if kind == "symlink":
        lock.symlink_to(tmp_path / "notes.txt")
    elif kind == "hardlink":
        os.link(tmp_path / "notes.txt", lock)
    elif kind == "contents":
        lock.write_text("my own data")
    elif kind == "dangling":
        lock.symlink_to(tmp_path / "somewhere")
    else:
        lock.mkdir()
    before = snapshot(tmp_path)
    code, _, err = run(queries, docs, "--k", 5, "--cpu", "--quiet", "--output-path", tmp_path / "out.pt")
    assert code == 2
    the_error(err, r"lock file '.*out.pt.lock' exists and is not a tiny-knn lock")
    assert snapshot(tmp_path) == before and not (tmp_path / "somewhere").exists()


def test_a_rank_lock_never_follows_a_link(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Under torchrun each rank locks OUT.rankNofM.lock; a link there (to an input, say) is refused, untouched."""
    (tmp_path / "D.pt").write_text("docs")
    (tmp_path / "r.pt.rank1of2.lock").symlink_to(tmp_path / "D.pt")
    with pytest.raises(OutputError, match="is not a tiny-knn lock"), OutputLock(str(tmp_path / "r.pt.rank1of2")):
        pass
    assert (tmp_path / "D.pt").read_text() == "docs"


def test_a_lock_left_by_another_user_is_taken_read_only(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "out.pt.lock").write_text("123\n")
    real_open = os.open

    def refused(path, flags, *args):  # type: ignore[no-untyped-def]
        if str(path).endswith(".lock") and flags & os.O_RDWR:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refused)
    with OutputLock(str(tmp_path / "out.pt")):
        pass


@pytest.mark.parametrize("name", ["r.pt.lock", "r.pt.checkpoint"])
def test_outputs_may_not_take_the_names_of_locks_and_checkpoints(inputs, tmp_path, name) -> None:  # type: ignore[no-untyped-def]
    queries, docs = inputs
    code, _, err = run(queries, docs, "--k", 5, "--cpu", "--quiet", "--output-path", tmp_path / name)
    assert code == 2
    the_error(err, r"ends in \.(lock|checkpoint), the name tiny-knn gives its")


def test_a_folder_output_with_a_trailing_separator_is_one_output_with_its_twin(inputs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    queries, docs = inputs
    argv = [queries, docs, "--k", 5, "--cpu", "--quiet", "--format", "npy", "--batch-size", 20]
    pause = tmp_path / "pause"
    first = tiny_knn(*argv, "--output-path", f"{tmp_path / 'res'}/", env={"TINY_KNN_TEST_PAUSE": str(pause)})
    with paused(pause, first):
        code, _, err = run(*argv, "--output-path", tmp_path / "res")
        assert code == 2
        the_error(err, r"another tiny-knn run \(pid \d+\) is writing")
    while first.poll() is None:
        with contextlib.suppress(FileNotFoundError):
            pause.unlink()
        time.sleep(0.01)
    code, _, err = finished(first)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "res")) == ["indices.npy", "meta.json", "scores.npy"]


@pytest.mark.parametrize("damage", ["cut-array", "missing-array", "rows-past-the-end"])
def test_a_damaged_checkpoint_is_refused_not_resumed(inputs, tmp_path, damage) -> None:  # type: ignore[no-untyped-def]
    queries, docs = inputs
    argv = [queries, docs, "--k", 5, "--cpu", "--quiet", "--batch-size", 20, "--output-path", tmp_path / "out.pt"]
    pause = tmp_path / "pause"
    process = tiny_knn(*argv, env={"TINY_KNN_TEST_PAUSE": str(pause)})
    with paused(pause, process):
        pass
    with paused(pause, process):  # one batch saved
        process.kill()
    process.communicate()
    folder = tmp_path / "out.pt.checkpoint"
    if damage == "cut-array":
        os.truncate(folder / "scores.npy", 5000)
    elif damage == "missing-array":
        os.unlink(folder / "indices.npy")
    else:
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**manifest, "done_rows": 10**6}))
    code, _, err = run(*argv)
    assert code == 2
    the_error(err, r"checkpoint '.*out.pt.checkpoint': damaged .*; delete the folder to start afresh")
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("then", ["removed", "a folder", "a fifo"])
def test_an_input_cut_and_then_replaced_is_still_one_clean_error(inputs, tmp_path, then) -> None:  # type: ignore[no-untyped-def]
    queries, docs = inputs
    pause = tmp_path / "pause"
    process = tiny_knn(queries, docs, "--k", 5, "--cpu", "--batch-size", 20, "--chunk-size", 256, "--output-path",
                       tmp_path / "out.pt", env={"TINY_KNN_TEST_PAUSE": str(pause)})  # fmt: skip
    with paused(pause, process):
        os.truncate(docs, 1000)
        os.unlink(docs)
        if then == "a folder":
            docs.mkdir()
        elif then == "a fifo":
            os.mkfifo(docs)
    code, _, err = finished(process)
    assert code == 2
    the_error(err, r"docs file '.*' changed while it was being read")
    assert "deleted the checkpoint" in err and not (tmp_path / "out.pt.checkpoint").exists()


def test_a_shard_glob_is_guarded_whatever_the_spelling_of_its_folder(inputs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    queries, _ = inputs
    (tmp_path / "shards").mkdir()
    for part in range(2):
        torch.save(torch.randn(100, DIM), tmp_path / "shards" / f"emb_{part}.pt")
    (tmp_path / "link").symlink_to(tmp_path / "shards")
    before = snapshot(tmp_path)
    for pattern, output in (("link/emb_*.pt", "shards/emb_9.pt"), ("shards/emb_*.pt", "link/emb_9.pt")):
        code, _, err = run(
            queries, tmp_path / pattern, "--k", 5, "--cpu", "--quiet", "--output-path", tmp_path / output
        )
        assert code == 2
        the_error(err, "matches the input shard pattern")
    assert snapshot(tmp_path) == before


def test_a_shard_folder_is_guarded_through_a_bind_mount(inputs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    queries, _ = inputs
    (tmp_path / "shards").mkdir()
    (tmp_path / "bound").mkdir()
    torch.save(torch.randn(100, DIM), tmp_path / "shards" / "emb_0.pt")
    mounted = subprocess.run(
        ["mount", "--bind", str(tmp_path / "shards"), str(tmp_path / "bound")], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"no bind mount can be made here ({mounted.stderr.decode().strip()})")
    try:
        code, _, err = run(queries, tmp_path / "shards", "--k", 5, "--cpu", "--quiet", "--output-path",
                           tmp_path / "bound" / "res.pt")  # fmt: skip
        assert code == 2
        the_error(err, "lies inside the input shard folder")
        assert os.listdir(tmp_path / "shards") == ["emb_0.pt"]
    finally:
        subprocess.run(["umount", "--lazy", str(tmp_path / "bound")], check=True)


def test_a_full_stdout_is_one_line_and_the_result_stays(inputs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    queries, docs = inputs
    argv = [sys.executable, "-m", "tiny_knn", str(queries), str(docs), "--k", "5", "--cpu", "--quiet",
            "--output-path", str(tmp_path / "out.pt")]  # fmt: skip
    with open("/dev/full", "w") as full:
        done = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == 2
    the_error(done.stderr, r"the result was written to .*out.pt, but its path could not be printed")
    assert (tmp_path / "out.pt").exists()
