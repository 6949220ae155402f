"""Excluded pairs: (query, doc) pairs a search never offers to its selection (hard-negative mining's positives; a
query's own passage, named by id). They come from a file of one pair a line, `QUERY<whitespace>DOC` (row numbers,
or ids where that side's ids file is given), or TREC qrels lines (`qid iteration docid relevance`: every pair
listed is excluded, whatever its relevance), and are held per query as sorted doc numbers in two compact arrays
(CSR: each query's offset into one array of docs): 16 bytes a pair at most, never Python objects, so a qrels
file of 10 million lines fits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputFileError, InvalidInputError

PLURAL = {"query": "queries", "doc": "docs"}
# Bytes of whole lines parsed at a time (about half a million pairs): bounded memory, converted a block at a time.
BLOCK_BYTES = 8 << 20
_WHITESPACE = np.frombuffer(b" \t\n\r\x0b\x0c", dtype=np.uint8)  # what bytes.split() splits on


@dataclass(frozen=True)
class Exclusions:
    """Each query's excluded docs: docs[offsets[q]:offsets[q + 1]], ascending, without repeats."""

    offsets: np.ndarray  # int64, queries + 1
    docs: np.ndarray  # int64, one per pair

    @classmethod
    def from_pairs(cls, queries: np.ndarray, docs: np.ndarray, query_count: int) -> Exclusions:
        """From (query, doc) pairs in any order, repeats included."""
        span = int(docs.max(initial=0)) + 1
        return cls.from_keys(queries.astype(np.int64) * span + docs, span, query_count)

    @classmethod
    def from_keys(cls, keys: np.ndarray, span: int, query_count: int) -> Exclusions:
        """From pairs as one int64 each, query * span + doc (any order, repeats included; sorted in place)."""
        keys.sort()
        if keys.size:
            keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
        offsets = np.zeros(query_count + 1, dtype=np.int64)
        np.cumsum(np.bincount(keys // span, minlength=query_count), out=offsets[1:])
        return cls(offsets, keys % span)

    def rows(self, rows: np.ndarray, first_doc: int = 0, doc_count: int | None = None) -> Exclusions:
        """The exclusions of the given queries (their order), with doc numbers relative to first_doc and only
        those below doc_count (a share of the docs, or all of them)."""
        starts, stops = self.offsets[rows], self.offsets[rows + 1]
        counts = stops - starts
        picked = np.repeat(starts - np.cumsum(np.concatenate(([0], counts[:-1]))), counts) + np.arange(counts.sum())
        docs = self.docs[picked] - first_doc
        owner = np.repeat(np.arange(rows.size), counts)
        inside = (docs >= 0) & (docs < doc_count) if doc_count is not None else docs >= 0
        return Exclusions.from_pairs(owner[inside], docs[inside], rows.size)

    def count(self) -> np.ndarray:
        """Excluded docs per query."""
        return np.diff(self.offsets)

    def widest(self) -> int:
        """The most docs excluded for any one query."""
        return int(self.count().max(initial=0))

    def sampled(self, positions: np.ndarray) -> Exclusions:
        """The exclusions among the docs at `positions` (ascending), numbered as the sample's 0, 1, ..."""
        at = np.minimum(np.searchsorted(positions, self.docs), max(positions.size - 1, 0))
        hit = positions[at] == self.docs if positions.size else np.zeros(self.docs.size, dtype=bool)
        return Exclusions.from_pairs(self._owners()[hit], at[hit], self.offsets.size - 1)

    def mask(self, indices: np.ndarray) -> np.ndarray:
        """Which entries of `indices` (queries x n doc numbers, -1 for none) are excluded for their row."""
        queries = indices.shape[0]
        span = max(int(self.docs.max(initial=-1)), int(indices.max(initial=-1))) + 2
        # (query, doc) as one number, in the order the pairs are held: ascending
        pairs = self._owners() * span + (self.docs + 1)
        wanted = np.arange(queries, dtype=np.int64)[:, None] * span + (indices + 1)
        at = np.minimum(np.searchsorted(pairs, wanted), max(pairs.size - 1, 0))
        return pairs[at] == wanted if pairs.size else np.zeros(indices.shape, dtype=bool)

    def block(self, row_lo: int, row_hi: int, doc_lo: int, doc_hi: int) -> tuple[np.ndarray, np.ndarray]:
        """The excluded pairs among rows row_lo..row_hi and docs doc_lo..doc_hi, as (rows, docs) relative to
        row_lo and doc_lo."""
        lo, hi = self.offsets[row_lo], self.offsets[row_hi]
        docs = self.docs[lo:hi]
        rows = np.repeat(np.arange(row_hi - row_lo, dtype=np.int64), np.diff(self.offsets[row_lo : row_hi + 1]))
        inside = (docs >= doc_lo) & (docs < doc_hi)
        return rows[inside], docs[inside] - doc_lo

    def _owners(self) -> np.ndarray:
        return np.repeat(np.arange(self.offsets.size - 1, dtype=np.int64), self.count())


def mask_excluded(tile: torch.Tensor, excluded: Exclusions, row_lo: int, doc_lo: int) -> None:
    """Sets the scores of a tile's excluded pairs (its rows are excluded's row_lo.., its columns docs doc_lo..)
    to -inf, on any device: they can then take no place from a doc that is not excluded (drop_excluded removes
    them where a row has fewer docs than places)."""
    rows, docs = excluded.block(row_lo, row_lo + tile.shape[0], doc_lo, doc_lo + tile.shape[1])
    if rows.size:
        where = (torch.from_numpy(rows).to(tile.device), torch.from_numpy(docs).to(tile.device))
        tile.index_put_(where, torch.tensor(float("-inf"), dtype=tile.dtype, device=tile.device))


def drop_excluded(
    scores: torch.Tensor, indices: torch.Tensor, excluded: Exclusions, want: int, worst: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `want` of each row's ordered candidates that are not excluded, padded with index -1 and score
    `worst` where fewer are left."""
    rows, have = indices.shape
    if have < want:
        scores = torch.cat([scores, torch.full((rows, want - have), worst, dtype=scores.dtype)], dim=1)
        indices = torch.cat([indices, torch.full((rows, want - have), -1, dtype=indices.dtype)], dim=1)
    hit = torch.from_numpy(excluded.mask(indices.numpy()))
    # The kept entries first, in their order: a stable sort on the mask.
    order = torch.argsort(hit.to(torch.int8), dim=1, stable=True)[:, :want]
    scores, indices = torch.gather(scores, 1, order), torch.gather(indices, 1, order)
    missing = torch.arange(want)[None, :] >= (~hit).sum(dim=1, keepdim=True)
    scores[missing], indices[missing] = worst, -1
    return scores, indices


def exclusions_from_array(pairs: np.ndarray | torch.Tensor, query_rows: int, doc_rows: int) -> Exclusions:
    """From an (n, 2) array of (query row, doc row) pairs.

    Raises:
        InvalidInputError: not an (n, 2) array of whole numbers, or a row out of range.
    """
    values = pairs.cpu().numpy() if isinstance(pairs, torch.Tensor) else np.asarray(pairs)
    if values.ndim != 2 or values.shape[1] != 2 or not (values.size == 0 or np.issubdtype(values.dtype, np.integer)):
        raise InvalidInputError(
            f"exclude_pairs: got a {values.dtype} array of shape {tuple(values.shape)}, expected (n, 2) whole numbers "
            "(query row, doc row)"
        )
    values = values.astype(np.int64)
    for column, (side, count) in enumerate((("query", query_rows), ("doc", doc_rows))):
        outside = (values[:, column] < 0) | (values[:, column] >= count)
        if outside.any():
            at = int(np.argmax(outside))
            raise InvalidInputError(
                f"exclude_pairs: pair {at} names {side} row {values[at, column]}; expected 0..{count - 1}"
            )
    return Exclusions.from_pairs(values[:, 0], values[:, 1], query_rows)


def read_exclusions(
    path: str,
    query_rows: int,
    doc_rows: int,
    query_ids: Sequence[str] | None = None,
    doc_ids: Sequence[str] | None = None,
) -> Exclusions:
    """The pairs in `path` (see the module docstring): each side a row number, or an id of that side's ids when
    given.

    Raises:
        InputFileError: the file is missing or unreadable.
        InvalidInputError: a line is neither a pair nor a qrels line, a row is out of range, or an id unknown
            (the first such is named, with its line).
    """
    label = f"exclude-pairs file '{path}'"
    query_lookup = None if query_ids is None else _Lookup(query_ids)
    doc_lookup = None if doc_ids is None else _Lookup(doc_ids)
    keys = []  # a pair as one int64, query * doc_rows + doc: half the memory of two arrays while reading
    for first_line, block in _blocks(path, label):
        # Fields per line, vectorized over the block's bytes; the tokens by one C-level split (bytes objects
        # only: nothing for the garbage collector to walk).
        data = np.frombuffer(block, dtype=np.uint8)
        space = np.isin(data, _WHITESPACE)
        starts = np.flatnonzero(~space & np.concatenate(([True], space[:-1])))
        newlines = np.flatnonzero(data == ord("\n"))
        widths = np.bincount(np.searchsorted(newlines, starts), minlength=newlines.size + 1)
        used = np.flatnonzero(widths)
        wrong = (widths[used] != 2) & (widths[used] != 4)
        if wrong.any():
            bad = int(used[np.argmax(wrong)])
            raise InvalidInputError(
                f"{label}: line {first_line + bad} has {widths[bad]} fields; expected QUERY DOC, or a TREC qrels "
                "line (query, iteration, doc, relevance)"
            )
        tokens = block.split()
        first_token = (np.cumsum(widths) - widths)[used]
        query_at, doc_at = first_token, first_token + np.where(widths[used] == 2, 1, 2)
        numbers = first_line + used
        block_keys = _rows([tokens[at] for at in query_at.tolist()], query_lookup, query_rows, "query", label, numbers)
        block_keys *= doc_rows
        block_keys += _rows([tokens[at] for at in doc_at.tolist()], doc_lookup, doc_rows, "doc", label, numbers)
        keys.append(block_keys)
    return Exclusions.from_keys(np.concatenate(keys) if keys else np.empty(0, np.int64), doc_rows, query_rows)


def _blocks(path: str, label: str) -> Iterator[tuple[int, bytes]]:
    """(the first line's number, whole lines): the file's bytes, about BLOCK_BYTES at a time."""
    try:
        with open(path, "rb") as stream:
            first = 1
            while lines := stream.readlines(BLOCK_BYTES):
                yield first, b"".join(lines)
                first += len(lines)
    except FileNotFoundError:
        raise InputFileError(f"{label}: no such file") from None
    except OSError as exc:
        raise InputFileError(f"{label}: cannot be read: {exc.strerror or exc}") from None


class _Lookup:
    """Ids to row numbers without a dict: the ids as UTF-8 bytes, sorted, and searched (an id's first row wins)."""

    def __init__(self, ids: Sequence[str]) -> None:
        values = np.array([value.encode() for value in ids], dtype=bytes)
        self._order = np.argsort(values, kind="stable")
        self._sorted = values[self._order]

    def rows(self, tokens: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(rows, found) for a list of ids."""
        wanted = np.array(tokens, dtype=bytes)
        at = np.minimum(np.searchsorted(self._sorted, wanted), max(self._sorted.size - 1, 0))
        if not self._sorted.size:
            return np.zeros(len(tokens), dtype=np.int64), np.zeros(len(tokens), dtype=bool)
        return self._order[at], self._sorted[at] == wanted


def _rows(
    tokens: list[bytes], lookup: _Lookup | None, count: int, side: str, label: str, numbers: np.ndarray
) -> np.ndarray:
    """Row numbers for one side's tokens (line numbers `numbers`), by id or as numbers, checked."""
    if lookup is not None:
        rows, found = lookup.rows(tokens)
        if not found.all():
            bad = int(np.argmin(found))
            raise InvalidInputError(
                f"{label}: line {numbers[bad]}: {side} id {_shown(tokens[bad])} is not in the {side} ids file"
            )
        return rows.astype(np.int64)
    numeric = np.fromiter(map(bytes.isdigit, tokens), dtype=bool, count=len(tokens))
    if not numeric.all():
        bad = int(np.argmin(numeric))
        raise InvalidInputError(
            f"{label}: line {numbers[bad]}: {side} {_shown(tokens[bad])} is not a row number (give --{side}-ids to "
            "name rows by id)"
        )
    rows = np.fromiter(map(int, tokens), dtype=np.int64, count=len(tokens))
    if rows.size and rows.max() >= count:
        bad = int(np.argmax(rows >= count))
        raise InvalidInputError(
            f"{label}: line {numbers[bad]}: {side} row {rows[bad]} is past the last of the {count} {PLURAL[side]}"
        )
    return rows


def _shown(token: bytes) -> str:
    return repr(token.decode("utf-8", errors="replace"))
