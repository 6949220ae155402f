"""Running tiny-knn the way some tests need: with a product forced for a while, or killed at a known point."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path


@contextlib.contextmanager
def forced_product(name: str) -> Iterator[None]:
    """TINY_KNN_PRODUCT=name for the duration (hypothesis's examples cannot take monkeypatch)."""
    before = os.environ.get("TINY_KNN_PRODUCT")
    os.environ["TINY_KNN_PRODUCT"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["TINY_KNN_PRODUCT"]
        else:
            os.environ["TINY_KNN_PRODUCT"] = before


def kill_in_batch(argv: Sequence[str], pause: Path, saved_batches: int) -> None:
    """Runs argv with the engine's test pause (TINY_KNN_TEST_PAUSE: every pass stops after its first chunk until
    `pause` is deleted), lets `saved_batches` batches finish, and kills it (SIGKILL) in the next one's first chunk."""
    process = subprocess.Popen(argv, env={**os.environ, "TINY_KNN_TEST_PAUSE": str(pause)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    for batch in range(saved_batches + 1):
        deadline = time.monotonic() + 120
        while not pause.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        if batch < saved_batches:
            pause.unlink()
    process.send_signal(signal.SIGKILL)
    process.wait()
    pause.unlink()
