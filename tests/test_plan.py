from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny_knn.plan import (
    COL_ALIGN,
    GPU_SURVIVOR_BYTES,
    ROW_ALIGN,
    estimate_bytes,
    gpu_survivor_capacity,
    make_plan,
    parse_size,
    resident_doc_bytes,
    threshold_sample_docs,
    threshold_sample_rank,
    transfer_dtype,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MB", 512 * 10**6),
        ("8GiB", 8 * 2**30),
        ("8G", 8 * 2**30),
        ("1.5GiB", 3 * 2**29),
        ("4096", 4096),
        ("2 kb", 2000),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "12XB", "-5MB", "1..2G"])
def test_parse_size_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="expected a number"):
        parse_size(text)


def plan(**overrides):  # type: ignore[no-untyped-def]
    arguments = dict(
        queries=4096, docs=200_000, dim=384, k=2000, device="cpu", budget_bytes=2**30, selection="threshold"
    )
    arguments.update(overrides)
    return make_plan(**arguments)


def test_everything_fits_reads_docs_once() -> None:
    p = plan()
    assert p.doc_passes == 1 and p.query_batch_rows == 4096
    assert p.peak_bytes <= p.budget_bytes
    assert "docs read once" in " ".join(p.describe())


def test_tight_budget_splits_queries_into_passes() -> None:
    p = plan(budget_bytes=250 * 2**20)
    assert p.doc_passes > 1
    assert p.peak_bytes <= p.budget_bytes


def test_too_small_budget_says_what_would_fit() -> None:
    with pytest.raises(ValueError, match="too small"):
        plan(budget_bytes=10**6)


def test_k_is_clamped_to_docs() -> None:
    assert plan(docs=100, k=2000).k == 100


@settings(max_examples=40, deadline=None)
@given(
    queries=st.integers(1, 5000),
    docs=st.integers(1, 300_000),
    dim=st.integers(1, 1024),
    k=st.integers(1, 3000),
    batch=st.one_of(st.none(), st.integers(1, 5000)),
    chunk=st.one_of(st.none(), st.integers(1, 50_000)),
)
def test_plans_are_aligned_and_within_budget(queries, docs, dim, k, batch, chunk) -> None:  # type: ignore[no-untyped-def]
    p = plan(queries=queries, docs=docs, dim=dim, k=k, budget_bytes=2**31, batch_rows=batch, chunk_rows=chunk)
    assert p.query_block_rows % ROW_ALIGN == 0 and p.doc_chunk_rows % COL_ALIGN == 0
    assert 1 <= p.query_batch_rows <= queries
    assert p.query_block_rows <= max(ROW_ALIGN, -(-p.query_batch_rows // ROW_ALIGN) * ROW_ALIGN)
    if batch is None:
        assert p.peak_bytes <= p.budget_bytes
    halved = p.halved() if p.query_block_rows > ROW_ALIGN or p.doc_chunk_rows > COL_ALIGN else p
    assert halved.query_block_rows % ROW_ALIGN == 0 and halved.doc_chunk_rows % COL_ALIGN == 0


def test_halved_stops_at_the_smallest_blocks() -> None:
    p = plan(queries=1, docs=1, k=1)
    with pytest.raises(MemoryError):
        p.halved()


def test_threshold_sample_only_where_the_estimate_is_tight() -> None:
    assert threshold_sample_docs(200_000, 2000, "threshold") == 2048
    assert threshold_sample_docs(200_000, 10, "threshold") == 0  # expected rank in the sample < 1
    assert threshold_sample_docs(200_000, 2000, "sort") == 0
    rank = threshold_sample_rank(200_000, 2000, 2048)
    assert 20 < rank < 2048  # past the expected rank (20.5), with margin


def test_screened_threads_estimate_their_own_rows() -> None:
    screened = make_plan(queries=4096, docs=10**6, dim=64, k=10, device="cpu", budget_bytes=2**32,
                         selection="threshold", estimator="torch", threads=8)  # fmt: skip
    assert screened.query_block_rows == 512  # 4096 / 8 = 512 rows per thread
    by_keys = make_plan(queries=4096, docs=10**6, dim=64, k=10, device="cpu", budget_bytes=2**32, selection="sort",
                        threads=8)  # fmt: skip
    assert by_keys.query_block_rows == 4096  # one product for the block, on torch's threads
    assert "per thread" in screened.describe()[2] and "per thread" not in by_keys.describe()[2]


def test_the_gpu_pools_are_counted() -> None:
    from tiny_knn.plan import gpu_pool_capacity

    sort = plan(device="cuda", selection="sort", budget_bytes=2**34)
    pool = plan(device="cuda", selection="pool", budget_bytes=2**34)
    assert sort.query_batch_rows == pool.query_batch_rows == 4096
    held = pool.query_batch_rows * (gpu_pool_capacity(2000) * 8 - 2000 * 12)  # pools instead of k keys per row
    assert pool.peak_bytes - sort.peak_bytes >= held
    tight = plan(device="cuda", selection="pool", budget_bytes=2**28)
    assert tight.doc_passes > 1 and tight.peak_bytes <= tight.budget_bytes


def test_the_estimators_copies_are_counted_and_named() -> None:
    screened = plan(budget_bytes=2**34, estimator="screen", estimator_choice="forced by TINY_KNN_PRODUCT")
    by_keys = plan(budget_bytes=2**34)
    shape = dict(batch_rows=4096, block_rows=1024, chunk_rows=4096, dim=384, k=2000, queries=4096,
                 selection="threshold", docs=200_000, threads=2)  # fmt: skip
    copies = 4096 * 384 * 4 + 2 * 4096 * 384 * 4  # the queries and both doc buffers, again
    assert estimate_bytes(**shape, screened=True) - estimate_bytes(**shape) == copies
    assert screened.peak_bytes == estimate_bytes(**{**shape, "threads": 1}, screened=True)
    assert "screened by the screen estimator (forced by TINY_KNN_PRODUCT)" in screened.describe()[3]
    assert "the products' own (by search keys)" in by_keys.describe()[3]
    l2 = plan(budget_bytes=2**34, metric="l2")
    assert l2.refined and l2.candidates > 2000 and "re-scored exactly" in l2.describe()[3]
    exact_l2 = plan(budget_bytes=2**34, metric="l2", estimator="torch")
    assert not exact_l2.refined and exact_l2.candidates == 2000  # scored exactly in the pass: no margin


def test_the_gpu_screen_samples_start_thresholds_and_counts_its_survivor_buffer() -> None:
    """The Triton path (estimator "triton", the pool selector) samples start thresholds as the CPU's screen does,
    and its memory counts the survivor buffer and the pools' cut, not a score tile."""
    assert threshold_sample_docs(200_000, 2000, "pool", screened=True) == 2048
    assert threshold_sample_docs(200_000, 2000, "pool") == 0
    plan = make_plan(queries=1000, docs=200_000, dim=64, k=2000, device="cuda", budget_bytes=2**33, selection="pool",
                     estimator="triton")  # fmt: skip
    assert plan.threshold_sample_docs == 2048 and not plan.refined
    assert gpu_survivor_capacity(1000) * GPU_SURVIVOR_BYTES < plan.peak_bytes
    assert any("Triton path" in line for line in plan.describe())


def test_halved_halves_the_query_batch_where_its_pools_fill_the_device() -> None:
    """After running out of device memory: where the batch's pools hold most of the estimate, the query batch halves
    (smaller blocks could not help); where the chunks do, the blocks and chunks halve; each halves once the other is
    at its floor, and resident docs are given up first."""
    pools = make_plan(queries=100_000, docs=10**6, dim=128, k=1000, device="cuda", budget_bytes=2**31,
                      selection="pool", estimator="triton", host_budget_bytes=2**40)  # fmt: skip
    assert pools.docs_resident and pools.doc_passes > 1
    dropped = pools.halved()
    assert not dropped.docs_resident and dropped.query_batch_rows == pools.query_batch_rows
    smaller = dropped.halved()
    assert smaller.query_batch_rows == -(-pools.query_batch_rows // 2)
    assert smaller.doc_chunk_rows == pools.doc_chunk_rows and smaller.peak_bytes < dropped.peak_bytes < pools.peak_bytes
    chunks = make_plan(queries=64, docs=10**6, dim=768, k=10, device="cuda", budget_bytes=2**31, selection="pool",
                       estimator="triton", host_budget_bytes=2**40)  # fmt: skip
    halved = chunks.halved()
    assert halved.query_batch_rows == chunks.query_batch_rows and halved.doc_chunk_rows == chunks.doc_chunk_rows // 2
    floor = replace(chunks, query_block_rows=ROW_ALIGN, doc_chunk_rows=COL_ALIGN)
    assert floor.halved().query_batch_rows == 32
    resident = replace(chunks, docs_resident=True)
    assert not resident.halved().docs_resident and resident.halved().query_batch_rows == chunks.query_batch_rows
    with pytest.raises(MemoryError):
        replace(floor, query_batch_rows=1).halved()


def test_beside_a_gpu_host_buffers_count_against_the_host_budget() -> None:
    """On CUDA --max-memory is the GPU's budget: the results, the batch's queries and the pinned doc buffers are the
    host's, counted against a budget of their own; on the CPU one budget covers everything."""
    shape = dict(queries=20_000, docs=10**6, dim=768, k=1000, device="cuda", selection="pool", estimator="triton")
    roomy = make_plan(**shape, budget_bytes=2**34, host_budget_bytes=2**36)
    results = 20_000 * 1000 * 12
    assert roomy.host_peak_bytes >= results + 2 * roomy.doc_chunk_rows * 768 * 4
    assert roomy.peak_bytes <= roomy.budget_bytes and roomy.host_peak_bytes <= roomy.host_budget_bytes
    memory = roomy.memory(roomy.query_batch_rows, roomy.query_block_rows, roomy.doc_chunk_rows)
    assert (memory.device_bytes, memory.host_bytes) == (roomy.peak_bytes, roomy.host_peak_bytes)
    assert "of GPU memory; host: about" in roomy.describe()[-1]
    # The host's budget, not the GPU's, limits the batch where results are on disk and RAM is short
    tight_host = make_plan(**shape, budget_bytes=2**34, host_budget_bytes=2**29, results_on_disk=True)
    assert tight_host.query_batch_rows < roomy.query_batch_rows and tight_host.host_peak_bytes <= 2**29
    with pytest.raises(ValueError, match=r"host memory budget .* RAM"):
        make_plan(**shape, budget_bytes=2**34, host_budget_bytes=2**20)
    cpu = plan(budget_bytes=2**30)
    assert cpu.host_peak_bytes == cpu.host_budget_bytes == 0 and "host" not in cpu.describe()[-1]


def test_the_gpu_screen_copies_half_precision_docs_as_they_are() -> None:
    """float16 and bfloat16 docs travel as they are on the GPU screen (ip, l2), halving the pinned buffers; cosine's
    rows are scaled on the host in float32, and the other paths read float32."""
    for dtype in (torch.float16, torch.bfloat16):
        assert transfer_dtype(dtype, "triton", "ip") == transfer_dtype(dtype, "triton", "l2") == dtype
        assert transfer_dtype(dtype, "triton", "cosine") == transfer_dtype(dtype, None, "ip") == torch.float32
    assert transfer_dtype(torch.float32, "triton", "ip") == torch.float32
    shape = dict(queries=1000, docs=10**6, dim=768, k=10, device="cuda", selection="pool", estimator="triton",
                 budget_bytes=2**34, host_budget_bytes=2**36, chunk_rows=65536)  # fmt: skip
    narrow, wide = make_plan(**shape, docs_dtype=torch.float16), make_plan(**shape)
    assert narrow.chunk_dtype == torch.float16 and "copied as float16" in narrow.describe()[2]
    assert wide.host_peak_bytes - narrow.host_peak_bytes == 2 * 65536 * 768 * 2


def test_the_gpu_screen_keeps_docs_resident_across_batches_when_they_fit() -> None:
    shape = dict(docs=10**6, dim=768, k=1000, device="cuda", selection="pool", estimator="triton",
                 host_budget_bytes=2**40)  # fmt: skip
    several = make_plan(queries=16_384, budget_bytes=40 * 2**30, batch_rows=4096, **shape)
    assert (
        several.docs_resident
        and several.doc_passes == 4
        and "kept on the device for all 4 passes" in several.describe()[2]
    )
    assert several.peak_bytes >= resident_doc_bytes(10**6, 768) and several.peak_bytes <= several.budget_bytes
    assert not make_plan(queries=4096, budget_bytes=40 * 2**30, **shape).docs_resident  # one pass: nothing to keep
    small = make_plan(queries=16_384, budget_bytes=8 * 2**30, batch_rows=4096, **shape)  # docs over half of it
    assert not small.docs_resident
    by_keys = make_plan(queries=16_384, budget_bytes=40 * 2**30, batch_rows=4096, **{**shape, "estimator": None})
    assert not by_keys.docs_resident
