"""The cost of a resume fingerprint's content sample, on a cold page cache.

    python benchmarks/fingerprint.py --size 10GiB             # writes /tmp/tiny-knn-fingerprint.bin once
    python benchmarks/fingerprint.py --file /data/docs.pt     # an existing file

The fingerprint (checkpoint.content_sample) hashes a file's head and tail (64 KiB each) and 256 blocks of
4 KiB spread evenly over it, read by 16 threads at once. Its cost does not grow with the file's size, only
with the latency of a read that misses the page cache: this script evicts the file from the cache
(posix_fadvise DONTNEED: its pages are clean, so they are dropped), times the sample with 1 and with 16
readers, five times each, and reports blocks, time, and the time per block (the latency, with 1 reader).
The same number of blocks on a file of 100 GB costs the same. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from tiny_knn.checkpoint import SAMPLE_BLOCKS, SAMPLE_READERS, content_sample
from tiny_knn.plan import parse_size


def evict(path: str) -> None:
    with open(path, "rb") as stream:
        os.fsync(stream.fileno())
        os.posix_fadvise(stream.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def write(path: str, size: int) -> None:
    """`size` bytes of real data (not a sparse file: its holes would read as zeros without touching the disk)."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as stream:
        for _ in range(size >> 20):
            stream.write(block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default="/tmp/tiny-knn-fingerprint.bin")
    parser.add_argument("--size", default="10GiB", help="size of the file to write when --file does not exist")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not os.path.exists(args.file):
        write(args.file, parse_size(args.size))
    size = os.path.getsize(args.file)
    figures = {}
    for readers in (1, SAMPLE_READERS):
        seconds = []
        with ThreadPoolExecutor(readers) as pool:
            for _ in range(args.repeats):
                evict(args.file)
                started = time.perf_counter()
                content_sample(args.file, pool)
                seconds.append(time.perf_counter() - started)
        figures[f"{readers}_readers_s"] = statistics.median(seconds)
        figures[f"{readers}_readers_all_s"] = seconds
    with ThreadPoolExecutor(SAMPLE_READERS) as pool:  # warm: the hashing itself
        started = time.perf_counter()
        content_sample(args.file, pool)
        figures["warm_s"] = time.perf_counter() - started
    reads = SAMPLE_BLOCKS + 2
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "")
    print(
        json.dumps(
            {
                "file_bytes": size,
                "reads": reads,
                "latency_per_read_ms": 1e3 * figures["1_readers_s"] / reads,
                **figures,
                "cpu": model or platform.processor(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
