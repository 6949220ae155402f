"""A search's inputs as the entry points open them (compute_topk, range search, dedup): both embeddings, the ids
files, the excluded pairs, each checked; and the files besides the embeddings that the output must never
replace and that a resumed run must find unchanged."""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import results
from .errors import InvalidInputError
from .exclusions import Exclusions, read_exclusions
from .sources import Source, open_source


@dataclass(frozen=True)
class Inputs:
    """Both embeddings open, the ids and excluded pairs read."""

    queries: Source
    docs: Source
    ids: dict[str, list[str]]  # "query_ids" and "doc_ids", where given
    excluded: Exclusions | None
    others: list[tuple[str, str]]  # (label, file) of every other input file: ids files, the pairs file

    @property
    def other_files(self) -> tuple[str, ...]:
        return tuple(path for _, path in self.others)


def open_inputs(
    q_path: str,
    d_path: str,
    exclude_self: bool = False,
    id_paths: dict[str, str] | None = None,
    exclude_pairs: str | None = None,
) -> Inputs:
    """Opens and checks both embeddings, the ids files ({"query": spec, "doc": spec}: a text file or
    FILE.parquet:COLUMN) and the excluded pairs (exclusions.py)."""
    queries = open_source(q_path, "queries")
    docs = open_source(d_path, "docs")
    if exclude_self and same_input(q_path) != same_input(d_path):
        raise InvalidInputError(
            f"exclude_self: {queries.label()} and {docs.label()} differ; expected the same file for both "
            "(each query's own row is left out by index)"
        )
    id_paths = id_paths or {}
    rows = {"query": queries.rows, "doc": docs.rows}
    ids = {f"{role}_ids": results.read_ids(path, rows[role], role) for role, path in id_paths.items()}
    excluded = None
    if exclude_pairs is not None:
        excluded = read_exclusions(exclude_pairs, queries.rows, docs.rows, ids.get("query_ids"), ids.get("doc_ids"))
    # FILE.parquet:COLUMN reads FILE
    others = [(f"{role} ids file '{path}'", results.ids_file(path)) for role, path in id_paths.items()]
    if exclude_pairs is not None:
        others.append((f"exclude-pairs file '{exclude_pairs}'", exclude_pairs))
    return Inputs(queries, docs, ids, excluded, others)


def same_input(spec: str) -> str:
    """The same string for two specs naming the same file (or directory, glob, key)."""
    path, colon, key = spec.rpartition(":") if not os.path.exists(spec) and ":" in spec else (spec, "", "")
    return os.path.realpath(path) + colon + key
