"""The streaming search against the float64 oracle, and its independence from how the work is cut up."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from capabilities import needs_kernel, required
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import assert_exact

from tiny_knn import engine, estimators, streaming
from tiny_knn.api import prepare
from tiny_knn.estimators import Tiled
from tiny_knn.options import SearchOptions
from tiny_knn.sources import FileSource
from tiny_knn.store import MemoryStore
from tiny_knn.topk import kernel_available

SELECTIONS = ["threshold", "sort"] if kernel_available() else ["sort"]


FUSED = [name for name in estimators.available() if name in ("screen", "kernel")]


@pytest.fixture(autouse=True, params=["fused", "tiled"])
def estimator(request, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every test runs with an estimator of each kind (estimators.py): one whose estimates stay in registers,
    and one that writes tiles (torch.mm's). The threshold selector's searches are screened by it; the "sort"
    selector's take the path by search keys."""
    if request.param == "fused" and not FUSED:
        if required("kernel") or required("screen"):
            pytest.fail("TINY_KNN_REQUIRE names a fused estimator, and none runs on this CPU")
        pytest.skip("no fused estimator runs on this CPU (set TINY_KNN_REQUIRE=kernel to make this a failure)")
    monkeypatch.setenv("TINY_KNN_PRODUCT", FUSED[0] if request.param == "fused" else "torch")


def run(q_path: str, d_path: str, k: int, tile_docs: int | None = None, **options) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    queries, docs, plan = prepare(q_path, d_path, k, SearchOptions(force_cpu=True, **options))
    if tile_docs is not None:
        plan = replace(plan, tile_docs=tile_docs)
    scores, indices, _ = engine.search(queries, docs, plan)
    return scores, indices


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize(("batch", "chunk"), [(None, None), (1, 1), (3, 7), (17, 63), (33, 65), (33, 777)])
def test_exact_for_odd_batches_and_chunks(pair, selection, batch, chunk) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(1)
    queries = torch.nn.functional.normalize(torch.randn(41, 24, generator=generator), dim=1)
    docs = torch.nn.functional.normalize(torch.randn(1500, 24, generator=generator), dim=1)
    scores, indices = run(*pair(queries, docs), 100, batch_size=batch, chunk_size=chunk, selection=selection)
    assert_exact(queries, docs, scores, indices)


@pytest.mark.parametrize(
    ("queries", "docs", "dim", "k"),
    [(1, 1, 1, 1), (1, 300, 3, 300), (5, 1, 8, 1), (9, 200, 385, 150), (3, 70, 64, 70), (20, 1000, 16, 999)],
)
def test_edge_shapes(pair, queries, docs, dim, k) -> None:  # type: ignore[no-untyped-def]
    q, d = torch.randn(queries, dim), torch.randn(docs, dim)
    scores, indices = run(*pair(q, d), k, chunk_size=64)
    assert_exact(q, d, scores, indices)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_inputs_score_in_float32(pair, dtype) -> None:  # type: ignore[no-untyped-def]
    q, d = torch.randn(30, 40).to(dtype), torch.randn(900, 40).to(dtype)
    scores, indices = run(*pair(q, d), 50, chunk_size=128)
    assert scores.dtype == torch.float32
    assert_exact(q.float(), d.float(), scores, indices)


def test_duplicate_rows_tie_by_ascending_index(pair) -> None:  # type: ignore[no-untyped-def]
    # Unit vectors, so that a query's own copies are strictly its best matches (under inner product a
    # longer vector could otherwise beat them).
    base = torch.nn.functional.normalize(torch.randn(10, 8, generator=torch.Generator().manual_seed(2)), dim=1)
    docs = base.repeat(30, 1)  # every doc appears 30 times, at indices i, i+10, i+20, ...
    queries = base[:4]
    for selection in SELECTIONS:
        scores, indices = run(*pair(queries, docs), 60, chunk_size=64, batch_size=3, selection=selection)
        for row in range(4):
            equal_runs = scores[row].unique_consecutive(return_counts=True)[1].tolist()
            start = 0
            for length in equal_runs:  # within each run of equal scores, indices ascend
                assert indices[row, start : start + length].tolist() == sorted(
                    indices[row, start : start + length].tolist()
                )
                start += length
        assert indices[0, :30].tolist() == list(range(0, 300, 10))


small_ints = st.integers(-2, 2).map(float)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    n_queries=st.integers(1, 40),
    n_docs=st.integers(1, 400),
    dim=st.integers(1, 40),
    tied=st.booleans(),
)
def test_identical_whatever_the_plan_and_selector(pair, monkeypatch, data, n_queries, n_docs, dim, tied) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(n_queries * 7919 + n_docs * 31 + dim)
    if tied:
        queries = torch.randint(-2, 3, (n_queries, dim), generator=generator).float()
        docs = torch.randint(-2, 3, (n_docs, dim), generator=generator).float()
    else:
        queries, docs = torch.randn(n_queries, dim, generator=generator), torch.randn(n_docs, dim, generator=generator)
        docs[n_docs // 2 :] = docs[: n_docs - n_docs // 2].clone()  # duplicated rows
    k = data.draw(st.integers(1, n_docs + 5))
    paths = pair(queries, docs)
    references = {}
    for selection in SELECTIONS:  # the screened path's exact scores, and the path by keys' (torch.mm's own)
        with pytest.warns(UserWarning) if k > n_docs else _nothing():
            references[selection] = run(*paths, k, selection=selection, batch_size=n_queries, chunk_size=n_docs)
        assert_exact(queries, docs, *references[selection])
    for _ in range(2):
        batch = data.draw(st.integers(1, n_queries))
        chunk = data.draw(st.integers(1, n_docs))
        selection = data.draw(st.sampled_from(SELECTIONS))
        reference = references[selection]
        # Tiles narrower than the chunk, as with the defaults (chunks of 4096 docs screened 1024 at a time)
        tile_docs = data.draw(st.sampled_from([64, 128, 1024]))
        with pytest.warns(UserWarning) if k > n_docs else _nothing():
            scores, indices = run(
                *paths, k, tile_docs=tile_docs, selection=selection, batch_size=batch, chunk_size=chunk
            )
        assert torch.equal(scores, reference[0]) and torch.equal(indices, reference[1])


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@needs_kernel
@pytest.mark.parametrize("sigmas", [4.0, 0.0, -100.0])
def test_sampled_start_threshold_stays_exact_even_when_too_high(pair, sigmas) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(5)
    queries, docs = torch.randn(50, 16, generator=generator), torch.randn(7000, 16, generator=generator)
    paths = pair(queries, docs)
    queries_source, docs_source, plan = prepare(*paths, 1000, SearchOptions(force_cpu=True, selection="threshold"))
    plan = replace(plan, sample_sigmas=sigmas)  # -100: every row must be redone
    assert plan.threshold_sample_docs > 0
    scores, indices, _ = engine.search(queries_source, docs_source, plan)
    reference = run(*paths, 1000, selection="threshold", batch_size=50, chunk_size=7000)
    assert torch.equal(scores, reference[0]) and torch.equal(indices, reference[1])


@pytest.fixture
def doc_reads(monkeypatch) -> list[int]:  # type: ignore[no-untyped-def]
    """The row counts of every read of the docs, in order."""
    reads: list[int] = []
    original = FileSource.read_into

    def spy(self, start, stop, out, check=True):  # type: ignore[no-untyped-def]
        if self.role == "docs":
            reads.append(stop - start)
        original(self, start, stop, out, check)

    monkeypatch.setattr(FileSource, "read_into", spy)
    assert reads == []
    return reads


def test_tiles_of_estimates_stay_as_small_as_the_plan_counts(pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A tiled estimator writes tiles at most tile_docs wide and query_block_rows high, however large the chunk
    (searches of a few rows again included)."""
    monkeypatch.setenv("TINY_KNN_PRODUCT", "torch")
    shapes = []
    real = Tiled.estimate

    def estimate(self, queries, docs, out):  # type: ignore[no-untyped-def]
        shapes.append(tuple(out.shape))
        real(self, queries, docs, out)

    monkeypatch.setattr(Tiled, "estimate", estimate)
    queries, docs = torch.randn(20, 8), torch.randn(1000, 8)
    _queries, _docs, plan = prepare(*pair(queries, docs), 7, SearchOptions(force_cpu=True, chunk_size=1000))
    scores, indices = run(*pair(queries, docs), 7, tile_docs=64, chunk_size=1000)
    assert_exact(queries, docs, scores, indices)
    assert all(rows <= plan.query_block_rows for rows, _ in shapes)
    assert max(cols for _, cols in shapes) == 64


def test_docs_are_streamed_in_chunks_never_whole(pair, doc_reads) -> None:  # type: ignore[no-untyped-def]
    run(*pair(torch.randn(4, 8), torch.randn(1000, 8)), 5, chunk_size=128)
    assert sum(doc_reads) == 1000 and max(doc_reads) <= 128 and len(doc_reads) == 8


def test_docs_read_once_per_query_batch(pair, doc_reads) -> None:  # type: ignore[no-untyped-def]
    run(*pair(torch.randn(10, 8), torch.randn(300, 8)), 5, batch_size=4)
    assert sum(doc_reads) == 3 * 300  # three query batches, one pass each


@pytest.mark.parametrize("pieces", [1, 3])
def test_chunks_read_in_pieces_hold_the_rows_and_name_the_first_bad_one(pair, pieces) -> None:  # type: ignore[no-untyped-def]
    from tiny_knn.errors import InvalidInputError

    docs = torch.randn(1000, 8)
    _queries, source, plan = prepare(*pair(torch.randn(4, 8), docs), 5, SearchOptions(force_cpu=True, chunk_size=256))
    starts = []
    unprepared = lambda buffer, count, slot: (buffer, None, 0.0)  # noqa: E731
    for start, count, rows, *_ in streaming.host_chunks(source, plan, unprepared, pieces=pieces):
        assert torch.equal(rows[:count], docs[start : start + count])  # buffers are reused: check each now
        starts.append(start)
    assert starts == [0, 256, 512, 768]
    docs[600, 3] = float("nan")
    docs[700, 1] = float("inf")
    _queries, source, plan = prepare(*pair(torch.randn(4, 8), docs), 5, SearchOptions(force_cpu=True, chunk_size=256))
    with pytest.raises(InvalidInputError, match=r"row 600 holds NaN or Inf"):
        list(streaming.host_chunks(source, plan, unprepared, pieces=pieces))


# 0xFFFFFFFF is a NaN too, one that bfloat16 rounding would wrap to zero if it were not caught first.
ALL_ONES_NAN = torch.tensor([-1], dtype=torch.int32).view(torch.float32).item()


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), ALL_ONES_NAN])
@pytest.mark.parametrize("row", [0, 1234, 2999])  # sampled (k=1000 samples row 0), mid-chunk, last chunk
def test_non_finite_docs_are_named_though_only_scores_are_watched(pair, selection, bad, row) -> None:  # type: ignore[no-untyped-def]
    from tiny_knn.errors import InvalidInputError

    docs = torch.randn(3000, 8)
    docs[row, 5] = bad
    queries = torch.randn(40, 8)
    queries[0] = 0.0  # the watched row: 0 * Inf is NaN, so it still sees the bad doc
    with pytest.raises(InvalidInputError, match=rf"row {row} holds NaN or Inf"):
        run(*pair(queries, docs), 1000, selection=selection, chunk_size=448)


@pytest.mark.parametrize(
    ("metric", "precision"), [("cosine", "exact"), ("l2", "exact"), ("ip", "bf16-unsafe"), ("cosine", "bf16-unsafe")]
)
@pytest.mark.parametrize("bad", [float("inf"), ALL_ONES_NAN])
def test_non_finite_docs_are_named_for_every_metric_and_precision(pair, monkeypatch, metric, precision, bad) -> None:  # type: ignore[no-untyped-def]
    from tiny_knn.errors import InvalidInputError

    if precision != "exact":
        monkeypatch.delenv("TINY_KNN_PRODUCT")  # no estimator screens a search by keys: forcing one is refused

    docs = torch.randn(2000, 8)
    docs[777, 2] = bad
    with pytest.raises(InvalidInputError, match=r"row 777 holds NaN or Inf"):
        run(*pair(torch.randn(30, 8), docs), 20, metric=metric, precision=precision, chunk_size=256)


def test_finite_docs_whose_scores_overflow_are_not_refused(pair) -> None:  # type: ignore[no-untyped-def]
    docs, queries = torch.randn(500, 8), torch.randn(20, 8)
    docs[7] = 3e38  # finite, but its products overflow float32
    scores, indices = run(*pair(queries, docs), 5, chunk_size=128)
    assert torch.isinf(scores).any() and indices.shape == (20, 5)


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_fewer_than_k_docs_above_minus_infinity_are_still_answered(pair, selection, metric) -> None:  # type: ignore[no-untyped-def]
    queries = torch.tensor([[1.0, 0.0], [-2.0, 0.0]])
    docs = torch.tensor([[3e38, 0.0], [3e38, 0.0], [0.5, 0.0], [1.0, 1.0]])  # overflowing products
    scores, indices = run(*pair(queries, docs), 4, selection=selection, metric=metric)
    assert sorted(indices[0].tolist()) == sorted(indices[1].tolist()) == [0, 1, 2, 3]
    if metric == "ip":
        assert indices[1].tolist() == [2, 3, 0, 1] and scores[1, 2:].isinf().all()


def test_without_a_query_free_of_zeros_docs_are_checked_as_read(pair) -> None:  # type: ignore[no-untyped-def]
    from tiny_knn.errors import InvalidInputError

    queries = torch.randn(20, 8)
    queries[:, 3] = 0.0  # a BLAS may skip zero factors, and 0 * NaN with them: no query can be watched
    docs = torch.randn(1000, 8)
    docs[500, 3] = float("nan")
    with pytest.raises(InvalidInputError, match=r"row 500 holds NaN or Inf"):
        run(*pair(queries, docs), 5, chunk_size=128)


def test_a_bad_row_before_a_sampled_bad_row_is_the_one_named(pair) -> None:  # type: ignore[no-untyped-def]
    from tiny_knn.errors import InvalidInputError

    docs = torch.randn(2000, 6)
    docs[5, 1] = docs[1500, 2] = float("nan")  # only 1500 falls in the threshold sample
    with pytest.raises(InvalidInputError, match=r"row 5 holds NaN or Inf"):
        run(*pair(torch.randn(10, 6), docs), 700)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_out_of_memory_halves_the_query_batch_and_keeps_finished_rows(pair, monkeypatch, selection) -> None:  # type: ignore[no-untyped-def]
    """Running out of device memory while a batch's pools are too big (here: any batch over 10 rows) retries that
    batch with smaller plans until the query batch itself is small enough; the batches already saved are not
    searched again, and the answer is the same, byte for byte."""
    generator = torch.Generator().manual_seed(5)
    queries, docs = torch.randn(40, 24, generator=generator), torch.randn(700, 24, generator=generator)
    paths = pair(queries, docs)
    source_queries, source_docs, plan = prepare(*paths, 300, SearchOptions(force_cpu=True, selection=selection,
                                                                           batch_size=24))  # fmt: skip
    reference_scores, reference_indices, _ = engine.search(source_queries, source_docs, plan)
    attempts: list[int] = []
    for name in ("_search_screened", "_search_by_keys"):
        original = getattr(engine, name)

        def too_big(host_queries, rows, *args, original=original):  # type: ignore[no-untyped-def]
            attempts.append(rows)
            if rows > 10:
                raise torch.cuda.OutOfMemoryError("simulated: the pools do not fit")
            return original(host_queries, rows, *args)

        monkeypatch.setattr(engine, name, too_big)
    saved: list[tuple[int, int]] = []
    store = MemoryStore(40, plan.k)
    save = store.save
    monkeypatch.setattr(store, "save", lambda start, s, i: (saved.append((start, s.shape[0])), save(start, s, i)))
    scores, indices, used = engine.search(source_queries, source_docs, plan, store=store)
    assert used.query_batch_rows <= 10 < plan.query_batch_rows and attempts[-1] <= 10
    assert [start for start, _ in saved] == sorted({start for start, _ in saved})  # each row saved once, in order
    assert sum(rows for _, rows in saved) == 40
    assert torch.equal(indices, reference_indices) and torch.equal(
        scores.view(torch.int32), reference_scores.view(torch.int32)
    )
