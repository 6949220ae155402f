"""Every format's reader keeps memory bounded: a search over a 128 MB docs file under a 32 MB budget holds
far less anonymous memory than the file, whatever the format (a whole-file load would show at once).

Anonymous memory (RssAnon) is what a process allocates; pages of a memory-mapped file count as RssFile,
page cache the kernel can drop, so they are rightly left out. Each run is a separate CLI process whose
/proc/<pid>/status is sampled every 2 ms; the same measurement of a tiny search is the baseline (for parquet,
of a tiny parquet search: pyarrow's first read of a row group sets up about 40 MB once, whatever the file).
Each estimator is also forced in turn, since which one runs by default depends on the machine.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.numpy import save_file

from tests.capabilities import needs
from tiny_knn.estimators import ESTIMATORS

pytestmark = pytest.mark.slow

ROWS, DIM = 250_000, 128  # 128 MB of float32
BUDGET = "32MB"
ALLOWED_SHARE = 0.25  # of the file's bytes (32 MB, the budget), above the baseline
GROUP_ROWS = 8192  # parquet row groups of 4 MiB; Arrow record batches of 1000 rows, as Hugging Face datasets writes


def peak_rss_anon(argv: list[str]) -> int:
    """Runs argv, returns the largest RssAnon (bytes) sampled while it ran; fails if it fails."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0

    def sample() -> None:
        nonlocal peak
        while process.poll() is None:
            try:
                with open(f"/proc/{process.pid}/status") as status:
                    for line in status:
                        if line.startswith("RssAnon:"):
                            peak = max(peak, int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = process.communicate(timeout=300)
    sampler.join()
    assert process.returncode == 0, err.decode()
    return peak


def search(queries: Path, docs: str, output: Path) -> list[str]:
    return [sys.executable, "-m", "tiny_knn", str(queries), docs, "--k", "10", "--cpu",
            "--max-memory", BUDGET, "--quiet", "--output-path", str(output)]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("memory")
    data = np.random.default_rng(0).standard_normal((ROWS, DIM), dtype=np.float32)
    np.save(folder / "queries.npy", data[:64])
    np.save(folder / "tiny.npy", data[:100])
    np.save(folder / "docs.npy", data)
    torch.save(torch.from_numpy(data), folder / "docs.pt")
    save_file({"embeddings": data}, str(folder / "docs.safetensors"))
    header = np.full((ROWS, 1), DIM, dtype="<i4").view(np.float32)
    np.concatenate([header, data], axis=1).tofile(folder / "docs.fvecs")
    with h5py.File(folder / "docs.h5", "w") as file:
        file.create_dataset("train", data=data)
        file.create_dataset("chunked", data=data, chunks=(4096, DIM))
    (folder / "shards").mkdir()
    for index, start in enumerate(range(0, ROWS, 60_000)):
        np.save(folder / "shards" / f"part_{index}.npy", data[start : start + 60_000])
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(data.ravel()), DIM)
    table = pa.table({"id": np.arange(ROWS), "emb": fixed})
    pq.write_table(table, folder / "docs.parquet", row_group_size=GROUP_ROWS)
    offsets = pa.array(np.arange(0, ROWS * DIM + 1, DIM, dtype=np.int32))
    listed = pa.table({"id": np.arange(ROWS), "emb": pa.ListArray.from_arrays(offsets, pa.array(data.ravel()))})
    pq.write_table(listed, folder / "list.parquet", row_group_size=GROUP_ROWS)
    with pa.OSFile(str(folder / "docs.arrow"), "wb") as sink, pa.ipc.new_stream(sink, listed.schema) as writer:
        writer.write_table(listed, max_chunksize=1000)
    pq.write_table(table.slice(0, 100), folder / "tiny.parquet")
    baselines = {
        suffix: peak_rss_anon(search(folder / "queries.npy", str(folder / f"tiny{suffix}"), folder / "tiny-out.pt"))
        for suffix in (".npy", ".parquet")
    }
    return folder, baselines


@pytest.mark.parametrize(
    "spec",
    [
        *("docs.pt", "docs.npy", "docs.safetensors", "docs.fvecs", "docs.h5:train", "docs.h5:chunked", "shards"),
        *("docs.parquet:emb", "list.parquet", "docs.arrow:emb"),
    ],
)
def test_reading_a_large_file_keeps_memory_bounded(files, spec) -> None:  # type: ignore[no-untyped-def]
    folder, baselines = files
    baseline = baselines[".parquet" if ".parquet" in spec else ".npy"]
    peak = peak_rss_anon(search(folder / "queries.npy", str(folder / spec), folder / "out.pt"))
    file_bytes = ROWS * DIM * 4
    assert peak - baseline < ALLOWED_SHARE * file_bytes, (
        f"{spec}: peak RssAnon {peak / 2**20:.0f} MiB, {(peak - baseline) / 2**20:.0f} MiB above the tiny search's "
        f"{baseline / 2**20:.0f} MiB; the docs file is {file_bytes / 2**20:.0f} MiB"
    )


@pytest.mark.parametrize("product", [pytest.param(name, marks=needs(name)) for name in ESTIMATORS])
def test_every_estimator_keeps_memory_bounded(files, product, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    folder, _ = files
    monkeypatch.setenv("TINY_KNN_PRODUCT", product)
    baseline = peak_rss_anon(search(folder / "queries.npy", str(folder / "tiny.npy"), folder / "tiny-out.pt"))
    peak = peak_rss_anon(search(folder / "queries.npy", str(folder / "docs.npy"), folder / "out.pt"))
    assert peak - baseline < ALLOWED_SHARE * ROWS * DIM * 4, (
        f"{product}: peak RssAnon {(peak - baseline) / 2**20:.0f} MiB above the tiny search's with it"
    )
