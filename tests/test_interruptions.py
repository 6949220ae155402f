"""The CLI killed for real: SIGKILL at random moments, then resumed, gives the uninterrupted bytes;
SIGTERM and Ctrl-C stop cleanly, keep the checkpoint, say how to continue, and exit 143 / 130."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.slow

KILLS = 10


@pytest.fixture(scope="module")
def job(tmp_path_factory):  # type: ignore[no-untyped-def]
    """Inputs for a CLI run of many small batches, and the bytes of its uninterrupted result."""
    folder = tmp_path_factory.mktemp("kill")
    generator = torch.Generator().manual_seed(21)
    torch.save(torch.randn(600, 48, generator=generator), folder / "q.pt")
    torch.save(torch.randn(150_000, 48, generator=generator), folder / "d.pt")

    def command(output: str) -> list[str]:
        return [sys.executable, "-m", "tiny_knn", str(folder / "q.pt"), str(folder / "d.pt"), "--k", "100",
                "--cpu", "--batch-size", "25", "--quiet", "--output-path", str(folder / output)]  # fmt: skip

    started = time.monotonic()
    subprocess.run(command("reference.pt"), check=True, capture_output=True)
    return folder, command, time.monotonic() - started


def test_sigkill_at_random_moments_then_resume_gives_identical_bytes(job) -> None:  # type: ignore[no-untyped-def]
    """Kill i lands at a random moment after the job has passed i/KILLS of its queries (the first during
    start-up), so the kills spread across one job, each run resuming the previous one's checkpoint."""
    folder, command, _ = job
    output, manifest = folder / "out.pt", folder / "out.pt.checkpoint" / "manifest.json"
    interrupted = 0
    for kill in range(KILLS):
        chance = random.Random(kill)
        process = subprocess.Popen(command("out.pt"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = 500 * kill // KILLS
        while kill and _done_rows(manifest) < target and process.poll() is None:
            time.sleep(0.005)
        # Within a batch or so of the target, or during start-up (importing torch alone takes longer): never
        # at a moment that depends on how fast the machine is.
        time.sleep(chance.uniform(0, 0.01 if kill else 0.25))
        process.send_signal(signal.SIGKILL)
        process.wait()
        interrupted += process.returncode == -signal.SIGKILL and not output.exists()
    assert interrupted >= KILLS - 2, "the kills should land mid-run"
    assert 0 < _done_rows(manifest) < 600 and not output.exists(), "the last run must resume a killed one"
    done = subprocess.run([arg for arg in command("out.pt") if arg != "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr and not manifest.parent.exists()
    assert output.read_bytes() == (folder / "reference.pt").read_bytes()


def _done_rows(manifest) -> int:  # type: ignore[no-untyped-def]
    try:
        return int(json.loads(manifest.read_text())["done_rows"])
    except (OSError, ValueError):
        return -1


@pytest.mark.parametrize(
    ("signum", "code", "word"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_sigterm_and_ctrl_c_keep_the_checkpoint_and_say_how_to_continue(job, signum, code, word) -> None:  # type: ignore[no-untyped-def]
    folder, command, _ = job
    name = f"stopped-{signum}.pt"
    argv = [arg for arg in command(name) if arg != "--quiet"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    manifest = folder / f"{name}.checkpoint" / "manifest.json"
    deadline = time.monotonic() + 60
    while _done_rows(manifest) < 50 and time.monotonic() < deadline:  # two batches in, far from the end
        time.sleep(0.005)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert f"tiny-knn: {word}; no result was written" in err
    assert "queries are saved in" in err and "run the same command again to continue" in err
    assert out == "" and manifest.exists() and not (folder / name).exists()
    resumed = subprocess.run(argv, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr
    assert (folder / name).read_bytes() == (folder / "reference.pt").read_bytes()


@pytest.mark.parametrize(
    ("signum", "code", "word"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_a_signal_again_while_stopping_changes_nothing(job, signum, code, word) -> None:  # type: ignore[no-untyped-def]
    """`timeout` signals the process and then its group, and a user may press Ctrl-C twice: the later signals land
    while the first unwinds, and must neither turn its one line into a traceback (a generator's cleanup can only
    print what interrupts it) nor kill the process before it says why it stopped."""
    folder, command, _ = job
    name = f"twice-{signum}.pt"
    process = subprocess.Popen(command(name), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    manifest = folder / f"{name}.checkpoint" / "manifest.json"
    deadline = time.monotonic() + 60
    while _done_rows(manifest) < 50 and time.monotonic() < deadline:
        time.sleep(0.005)
    for _ in range(20):
        if process.poll() is not None:
            break
        process.send_signal(signum)
        time.sleep(0.002)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert f"tiny-knn: {word}; no result was written" in err.splitlines(), err
    assert all(line.startswith("tiny-knn: ") for line in err.splitlines()), err  # no traceback, no "ignored"
