"""Run a command as a child process and measure its wall time and peak memory (Linux only).

Shared by bench.py and memory.py. A thread samples /proc/<pid>/status every `interval` seconds:

- VmHWM, the kernel's high-water mark of the child's resident set: it only grows, so its last sample
  is the exact peak up to that moment; only growth in the child's last `interval` before exit is missed;
- RssAnon (anonymous memory: what the process allocated, as opposed to pages of memory-mapped files,
  which the kernel can drop at will), VmRSS and RssFile: these have no high-water mark, so the peak is
  the largest sample, and a spike shorter than the interval can be missed.

Not used: `ru_maxrss` from wait4/getrusage. Python starts children with vfork + exec, and Linux folds the
high-water mark of the mm replaced at exec (the parent's, shared under vfork) into the child's
ru_maxrss, so a parent holding 1 GiB makes every child report at least 1 GiB.

The child's pid is watched, not its own children: every command run here is a single process. Run
Python entry points through their real script (see `console_script`), not through a shim that forks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def read_status(pid: int | str = "self") -> dict[str, int]:
    """The memory lines of /proc/<pid>/status in bytes ({} once the process is gone or a zombie)."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                name, _, rest = line.partition(":")
                if name in STATUS_FIELDS:
                    values[name] = int(rest.split()[0]) * 1024  # reported in kB
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return values


def console_script(name: str) -> str:
    """The path of an installed console script, preferring the one beside this interpreter.

    pyenv and similar shims start an extra shell before exec'ing Python, which costs time and would be
    counted in a process's wall time.
    """
    beside = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"'{name}' is not installed (pip install -e . in the repository root)")
    return found


@dataclass
class Measured:
    """What one child process did: exit code, output, wall time, memory peaks in bytes."""

    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    peak: dict[str, int] = field(default_factory=dict)  # max of each sampled /proc field
    samples: int = 0

    @property
    def peak_rss(self) -> int | None:
        """Peak resident set: the last VmHWM sampled (or the largest VmRSS sample, if larger)."""
        values = [self.peak[name] for name in ("VmHWM", "VmRSS") if name in self.peak]
        return max(values) if values else None

    def check(self) -> Measured:
        """Raises RuntimeError with the child's stderr if it failed."""
        if self.returncode != 0:
            tail = "\n".join(self.stderr.strip().splitlines()[-20:])
            raise RuntimeError(f"command failed with exit code {self.returncode}: {' '.join(self.command)}\n{tail}")
        return self


def run_measured(
    command: Sequence[str], *, interval: float = 0.02, env: dict[str, str] | None = None, cwd: str | None = None
) -> Measured:
    """Runs `command` to completion, sampling its memory every `interval` seconds; raises only if interrupted.

    The wall time runs from just before the process is started until it has been reaped.
    """
    command = [str(part) for part in command]
    peak: dict[str, int] = {}
    count = 0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=cwd)
        stop = threading.Event()

        def sample() -> None:
            nonlocal count
            while not stop.is_set():
                values = read_status(process.pid)
                if values:
                    count += 1
                    for name, value in values.items():
                        peak[name] = max(peak.get(name, 0), value)
                stop.wait(interval)

        sampler = threading.Thread(target=sample, name="procmon-sampler", daemon=True)
        sampler.start()
        try:
            process.wait()
            wall = time.perf_counter() - start
        except BaseException:
            process.kill()
            process.wait()
            raise
        finally:
            stop.set()
            sampler.join()
        out.seek(0)
        err.seek(0)
        return Measured(
            command=command,
            returncode=process.returncode,
            stdout=out.read(),
            stderr=err.read(),
            wall_s=wall,
            peak=peak,
            samples=count,
        )


def mib(count: float | None) -> str:
    """'512 MiB' (or '-' for None)."""
    return "-" if count is None else f"{count / 2**20:,.0f} MiB"
