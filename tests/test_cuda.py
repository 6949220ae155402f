"""CUDA runs must match the CPU. They skip visibly without a GPU; TINY_KNN_REQUIRE_CUDA=1 makes that a failure."""

from __future__ import annotations

import pytest
import torch
from oracle import assert_exact

from tiny_knn import compute_topk


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("batch", "chunk"), [(None, None), (33, 777), (None, 4096)])
def test_cuda_matches_cpu(cuda, pair, tmp_path, dtype, batch, chunk) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(200, 96, generator=generator), dim=1).to(dtype)
    docs = torch.nn.functional.normalize(torch.randn(20000, 96, generator=generator), dim=1).to(dtype)
    q_path, d_path = pair(queries, docs)
    options = dict(k=300, batch_size=batch, chunk_size=chunk)
    on_gpu = torch.load(compute_topk(q_path, d_path, out_path=str(tmp_path / "gpu.pt"), **options))
    on_cpu = torch.load(compute_topk(q_path, d_path, force_cpu=True, out_path=str(tmp_path / "cpu.pt"), **options))
    assert on_gpu["device"] == "cuda" and on_cpu["device"] == "cpu"
    assert_exact(queries.float(), docs.float(), on_gpu["scores"], on_gpu["indices"])
    assert torch.allclose(on_gpu["scores"], on_cpu["scores"], atol=1e-5)
    differ = on_gpu["indices"] != on_cpu["indices"]
    assert torch.allclose(on_gpu["scores"][differ], on_cpu["scores"][differ], atol=1e-5)  # ties only


def test_out_of_memory_halves_blocks_and_carries_on(cuda, pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import tiny_knn.engine as engine

    calls = {"n": 0}
    original = engine._search_rows

    def flaky(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("simulated")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "_search_rows", flaky)
    queries, docs = torch.randn(20, 16), torch.randn(3000, 16)
    result = torch.load(compute_topk(*pair(queries, docs), k=10))
    assert calls["n"] >= 2
    assert_exact(queries, docs, result["scores"], result["indices"])


def test_gpu_selector_equals_the_reference_on_tied_tiles(cuda) -> None:  # type: ignore[no-untyped-def]
    from test_topk import offer, tie_heavy_tiles

    from tiny_knn.topk import PackedTopK, SortMergeTopK

    for levels in (0, 1, 3):
        tiles = tie_heavy_tiles(levels, 64, [4096, 1000, 4096, 333], levels)
        [(gpu_scores, gpu_indices)] = offer([PackedTopK(64, 300, "cuda")], [tile.cuda() for tile in tiles])
        [(ref_scores, ref_indices)] = offer([SortMergeTopK(64, 300)], tiles)
        assert torch.equal(gpu_scores, ref_scores) and torch.equal(gpu_indices, ref_indices)


def test_pool_selector_is_the_default_on_cuda_and_equals_the_reference(cuda, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from test_topk import offer, tie_heavy_tiles

    from tiny_knn import gpu_survivors
    from tiny_knn.topk import PoolTopK, SortMergeTopK, make_running_topk

    if not gpu_survivors.available():
        pytest.fail("Triton is missing: CUDA searches would run without the pool selector")
    assert isinstance(make_running_topk(4, 10, torch.device("cuda"), 1000), PoolTopK)
    passes = []
    original = gpu_survivors.append_survivors
    monkeypatch.setattr(gpu_survivors, "append_survivors", lambda *args: passes.append(1) or original(*args))
    for levels, k in ((0, 1000), (0, 10), (3, 100), (50, 2000), (0, 10000)):
        tiles = tie_heavy_tiles(levels + k, 96, [8192, 8192, 16384, 333, 9000, 40000], levels)
        [(gpu_scores, gpu_indices)] = offer([PoolTopK(96, k, "cuda")], [tile.cuda() for tile in tiles])
        [(ref_scores, ref_indices)] = offer([SortMergeTopK(96, k)], tiles)
        assert torch.equal(gpu_scores, ref_scores) and torch.equal(gpu_indices, ref_indices), (levels, k)
    assert len(passes) >= 20


def test_large_results_come_back_through_pinned_buffers_intact(cuda, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from tiny_knn import topk

    monkeypatch.setattr(topk, "HOST_STAGE_BYTES", 4096)
    for dtype in (torch.float32, torch.int64):
        on_gpu = torch.randn(333, 77, device="cuda").mul(1000).to(dtype)  # 5 and 13 stages, the last partial
        assert torch.equal(topk.to_host(on_gpu), on_gpu.cpu())


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_cuda_leaves_excluded_pairs_out(cuda, metric) -> None:  # type: ignore[no-untyped-def]
    """The GPU's selectors (Triton pool, packed) never return an excluded pair: the same docs as the CPU's screen,
    padding included (query 3 loses every doc but 5)."""
    from tiny_knn import search

    generator = torch.Generator().manual_seed(4)
    queries, docs = torch.randn(64, 32, generator=generator), torch.randn(5000, 32, generator=generator)
    pairs = torch.stack([torch.randint(0, 64, (20000,), generator=generator),
                         torch.randint(0, 5000, (20000,), generator=generator)], dim=1)  # fmt: skip
    pairs = torch.cat([pairs, torch.stack([torch.full((4995,), 3), torch.arange(4995)], dim=1)])
    on_gpu = search(queries, docs, 50, metric=metric, device="cuda", exclude_pairs=pairs)
    on_cpu = search(queries, docs, 50, metric=metric, device="cpu", exclude_pairs=pairs)
    assert on_gpu[1][3, 5:].tolist() == [-1] * 45
    assert torch.allclose(on_gpu[0], on_cpu[0], atol=1e-4)
    differ = on_gpu[1] != on_cpu[1]
    assert torch.allclose(on_gpu[0][differ], on_cpu[0][differ], atol=1e-4)  # ties only
