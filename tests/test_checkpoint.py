"""Checkpoint and resume, in process: interruptions at every batch, refusals, disk space, determinism."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiny_knn import InvalidInputError, OutputError, TinyKnnWarning, checkpoint, compute_topk, engine, results


class Stop(BaseException):
    """Stands for Ctrl-C or SIGTERM arriving after some batches were saved."""


def interrupt_after(monkeypatch, batches: int) -> None:  # type: ignore[no-untyped-def]
    """Makes the run stop just after its `batches`-th batch was saved."""
    saved = {"count": 0}
    real_save = checkpoint.Checkpoint.save

    def save(self, start, scores, indices):  # type: ignore[no-untyped-def]
        real_save(self, start, scores, indices)
        saved["count"] += 1
        if saved["count"] == batches:
            raise Stop()

    monkeypatch.setattr(checkpoint.Checkpoint, "save", save)


@pytest.fixture
def inputs(pair):  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(12)
    return pair(torch.randn(90, 16, generator=generator), torch.randn(3000, 16, generator=generator))


def results_of(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    result = torch.load(path)
    return result["scores"], result["indices"]


def test_resume_after_each_batch_gives_the_same_bytes(inputs, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    reference = results_of(compute_topk(*inputs, k=25, force_cpu=True, out_path=str(tmp_path / "ref.pt")))
    target = str(tmp_path / "out.pt")
    for interruption in (1, 2, 3):  # each run saves one more batch of 20 queries, then is stopped
        with monkeypatch.context() as patch:
            interrupt_after(patch, 1)
            with pytest.raises(Stop):
                compute_topk(*inputs, k=25, force_cpu=True, out_path=target, batch_size=20)
        manifest = json.loads((tmp_path / "out.pt.checkpoint" / "manifest.json").read_text())
        assert manifest["done_rows"] == 20 * interruption
        assert not os.path.exists(target)
    # Resume with other batch and chunk sizes: the answer does not depend on them.
    compute_topk(*inputs, k=25, force_cpu=True, out_path=target, batch_size=7, chunk_size=300)
    assert not os.path.exists(tmp_path / "out.pt.checkpoint")
    scores, indices = results_of(target)
    assert torch.equal(scores, reference[0]) and torch.equal(indices, reference[1])


def test_a_checkpoint_for_other_inputs_or_options_is_refused(inputs, tmp_path, monkeypatch, save) -> None:  # type: ignore[no-untyped-def]
    target = str(tmp_path / "out.pt")
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(Stop):
            compute_topk(*inputs, k=25, force_cpu=True, out_path=target, batch_size=20)
    with pytest.raises(InvalidInputError, match=r"belongs to another run \(k was 25, now 26\); run with --restart"):
        compute_topk(*inputs, k=26, force_cpu=True, out_path=target, batch_size=20)
    with pytest.raises(InvalidInputError, match="metric was 'ip', now 'l2'"):
        compute_topk(*inputs, k=25, force_cpu=True, out_path=target, batch_size=20, metric="l2")
    os.utime(inputs[1], ns=(1, 1))  # the docs file changed since the checkpoint was made
    with pytest.raises(InvalidInputError, match=r"the docs '.*docs.pt': modified"):
        compute_topk(*inputs, k=25, force_cpu=True, out_path=target, batch_size=20)
    path = compute_topk(*inputs, k=25, force_cpu=True, out_path=target, batch_size=20, restart=True)
    assert path == target and not os.path.exists(target + ".checkpoint")


def test_a_checkpoint_killed_before_its_first_manifest_is_started_afresh(inputs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Its manifest is the first thing written: killed before it, the folder holds its temporary file at most."""
    (tmp_path / "out.pt.checkpoint").mkdir()
    (tmp_path / "out.pt.checkpoint" / "manifest.json.tmp").write_bytes(b'{"fingerpr')
    compute_topk(*inputs, k=5, force_cpu=True, out_path=str(tmp_path / "out.pt"), batch_size=30)
    assert sorted(os.listdir(tmp_path)) == ["docs.pt", "out.pt", "queries.pt"]
    (tmp_path / "out.pt.checkpoint").mkdir()
    (tmp_path / "out.pt.checkpoint" / "scores.npy").write_bytes(b"half")  # arrays come after the manifest
    with pytest.raises(OutputError, match=r"holds files tiny-knn did not write \(scores.npy\)"):
        compute_topk(*inputs, k=5, force_cpu=True, out_path=str(tmp_path / "out.pt"), batch_size=30)
    assert (tmp_path / "out.pt.checkpoint" / "scores.npy").read_bytes() == b"half"


def test_a_single_batch_needs_no_checkpoint(inputs, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    made = []
    monkeypatch.setattr(checkpoint.Checkpoint, "_write_manifest", lambda self: made.append(1))
    compute_topk(*inputs, k=5, force_cpu=True, out_path=str(tmp_path / "out.pt"))
    assert made == [] and sorted(os.listdir(tmp_path)) == ["docs.pt", "out.pt", "queries.pt"]


def test_not_enough_disk_is_refused_before_any_work(inputs, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10_000))
    with pytest.raises(OutputError, match=r"need about .* only 9.8 KiB is free"):
        compute_topk(*inputs, k=25, force_cpu=True, out_path=str(tmp_path / "out.pt"), batch_size=20)
    assert sorted(os.listdir(tmp_path)) == ["docs.pt", "queries.pt"]


def test_a_full_disk_while_allocating_the_checkpoint_is_one_clean_error(inputs, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def full(descriptor: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OutputError, match="cannot be created: No space left on device"):
        compute_topk(*inputs, k=25, force_cpu=True, out_path=str(tmp_path / "out.pt"), batch_size=20)
    assert sorted(os.listdir(tmp_path)) == ["docs.pt", "queries.pt"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 70),
    docs=st.integers(1, 700),
    dim=st.integers(1, 24),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    k=st.integers(1, 40),
    batch=st.integers(1, 40),
    resume_batch=st.integers(1, 40),
    chunk=st.integers(64, 900),
    stop_after=st.integers(1, 4),
    threads=st.sampled_from([1, 2]),
    metric=st.sampled_from(["ip", "cosine", "l2"]),
    seed=st.integers(0, 2**16),
)
def test_byte_identical_whatever_the_batches_threads_and_resume_point(  # type: ignore[no-untyped-def]
    tmp_path_factory, rows, docs, dim, dtype, k, batch, resume_batch, chunk, stop_after, threads, metric, seed
) -> None:
    folder = tmp_path_factory.mktemp("run")
    generator = torch.Generator().manual_seed(seed)
    paths = [str(folder / "q.pt"), str(folder / "d.pt")]
    torch.save(torch.randn(rows, dim, generator=generator).to(dtype), paths[0])
    torch.save(torch.randn(docs, dim, generator=generator).to(dtype), paths[1])
    options = {"k": k, "force_cpu": True, "metric": metric}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TinyKnnWarning)  # k above the number of docs
        reference = results_of(compute_topk(*paths, out_path=str(folder / "ref.pt"), **options))
        target = str(folder / "out.pt")
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with pytest.MonkeyPatch.context() as patch:
                interrupt_after(patch, stop_after)
                with contextlib.suppress(Stop):
                    compute_topk(*paths, out_path=target, batch_size=batch, chunk_size=chunk, **options)
            compute_topk(*paths, out_path=target, batch_size=resume_batch, **options)
        finally:
            torch.set_num_threads(previous)
    scores, indices = results_of(target)
    assert torch.equal(scores, reference[0]) and torch.equal(indices, reference[1])


def test_a_failed_write_keeps_the_finished_checkpoint(inputs, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    target = str(tmp_path / "out.pt")
    with monkeypatch.context() as patch:
        patch.setattr(results, "write_output", lambda *a, **k: (_ for _ in ()).throw(OutputError("disk full")))
        with pytest.raises(OutputError):
            compute_topk(*inputs, k=5, force_cpu=True, out_path=target, batch_size=30)
    manifest = json.loads((tmp_path / "out.pt.checkpoint" / "manifest.json").read_text())
    assert manifest["done_rows"] == 90  # every query done: the next run only writes
    searched = []
    monkeypatch.setattr(engine, "_search_batch", lambda *a, **k: searched.append(1))
    assert compute_topk(*inputs, k=5, force_cpu=True, out_path=target, batch_size=30) == target
    assert searched == [] and not os.path.exists(target + ".checkpoint")
