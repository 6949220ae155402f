"""FAISS exact search from .pt files to a result file, the way a user would do it with IndexFlatIP.

    python benchmarks/faiss_search.py QUERIES.pt DOCS.pt K OUT.pt

Loads both tensors whole, adds the docs to an `IndexFlatIP`, searches every query for its top k by
inner product, and saves {"indices": (Q, k) int64, "scores": (Q, k) float32} with torch.save. bench.py
times this both as a whole process (`faiss-process`) and as the `search` call alone (`faiss`).
"""

from __future__ import annotations

import sys

import faiss
import numpy as np
import torch


def search(q_path: str, d_path: str, k: int, out_path: str) -> None:
    """Top-k inner-product search with faiss.IndexFlatIP; writes the result to out_path."""
    queries = torch.load(q_path, map_location="cpu", weights_only=True)
    docs = torch.load(d_path, map_location="cpu", weights_only=True)
    k = min(k, docs.shape[0])
    index = faiss.IndexFlatIP(docs.shape[1])
    index.add(np.ascontiguousarray(docs.float().numpy()))
    del docs  # the index holds its own copy
    scores, indices = index.search(np.ascontiguousarray(queries.float().numpy()), k)
    torch.save({"indices": torch.from_numpy(indices), "scores": torch.from_numpy(scores)}, out_path)


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    q_path, d_path, k, out_path = argv
    search(q_path, d_path, int(k), out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
