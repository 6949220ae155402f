"""Distributing: one search across the processes of a torchrun job, on torch.distributed.

    torchrun --nproc-per-node 8 -m tiny_knn QUERIES DOCS --k 1000 --output-path OUT.pt

torchrun starts one process per GPU (or CPU slot) and sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous; each process runs the ordinary command. NCCL joins them on GPUs, gloo on the CPU. The work is
split one of two ways:

- `docs`: each rank streams its own contiguous share of the docs against every query, and after each
  query batch rank 0 gathers every rank's top-k and merges them with the one tie rule. Each doc is read
  by one rank only; the merge moves world × k candidates per query.
- `queries`: each rank searches its own contiguous share of the queries against every doc, and rank 0
  gathers the finished rows at the end. No merge; every rank reads all the docs.

Either way the answer is byte-identical to a single process's: every score is computed in the same
aligned tiles whatever rows a process holds (see plan.py), and merging exact per-rank top-k lists by
(score, index) gives the exact overall top-k. Only rank 0 writes the output; with a checkpoint, each
rank's share resumes after an interruption (docs: rank 0's merged rows; queries: each rank's own).
A rank that fails exits, torchrun stops the others, and every collective has a timeout, so the job never
hangs.

compute_topk hands its search to `search` on every rank: it joins the job, plans the rank's share from the
job's options, and returns the whole result on rank 0, which writes it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist

from . import safety
from .checkpoint import Checkpoint, allocate, open_checkpoint, reporting_stops
from .errors import InvalidInputError
from .exclusions import Exclusions
from .metrics import higher_is_better
from .options import SearchOptions, plan_search
from .plan import Plan
from .refine import drop_self
from .running import Found, progress_bar, run_search
from .sources import RowRange, Source
from .store import MemoryStore, Store

SHARD_MODES = ("auto", "docs", "queries")
# Seconds any collective may wait for the other ranks (TINY_KNN_DIST_TIMEOUT overrides).
DEFAULT_TIMEOUT_S = 600
# Cost model for --shard auto: rank 0's merge, measured at about 110 ns per candidate (sort of world x k
# per query, one thread, benchmarks/RESULTS.md), against reading docs from the page cache or a fast disk.
MERGE_S_PER_CANDIDATE = 1.1e-7
READ_BYTES_PER_S = 1e10
# Seconds to reach the job's key-value store for whole-job progress.
PROGRESS_TIMEOUT_S = 30
# Rows per message when rank 0 collects a query-sharded result.
COLLECT_ROWS = 4096
# Seconds between two readings of a torchrun job's progress on rank 0.
PROGRESS_POLL_S = 0.5


@dataclass(frozen=True)
class Job:
    """This process's place in a torchrun job."""

    rank: int
    world: int
    local_rank: int

    @property
    def leader(self) -> bool:
        return self.rank == 0


def current_job() -> Job | None:
    """The torchrun job this process belongs to (from its environment), or None when it runs alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return None
    return Job(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def join(job: Job, device: str) -> None:
    """Joins the job's process group: NCCL with one GPU per rank, or gloo on the CPU."""
    if dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=float(os.environ.get("TINY_KNN_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    if device == "cuda":
        torch.cuda.set_device(job.local_rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timeout)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class JobProgress:
    """Docs scored by every rank, counted in the job's key-value store (the TCPStore at MASTER_ADDR:MASTER_PORT
    that torchrun's rendezvous runs), so that rank 0 can show the progress of the whole job.

    Each rank says how many docs it will score (`expect`) and reports them as it goes (`scored`); `read`
    returns (scored, expected) over all ranks so far. Every instance has its own connection.
    """

    def __init__(self) -> None:
        attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        client = dist.TCPStore(  # type: ignore[attr-defined]
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=PROGRESS_TIMEOUT_S),
        )
        self._store = dist.PrefixStore(  # type: ignore[attr-defined]
            f"tiny_knn/progress/{attempt}/", client
        )

    @classmethod
    def connect(cls) -> JobProgress | None:
        """A connection to the job's store, or None when there is none to reach (progress stays per rank)."""
        try:
            return cls()
        except (KeyError, ValueError, RuntimeError):
            return None

    def expect(self, docs: int) -> None:
        self._store.add("expected", docs)

    def scored(self, docs: int) -> None:
        self._store.add("scored", docs)

    def read(self) -> tuple[int, int]:
        return self._store.add("scored", 0), self._store.add("expected", 0)


def search(
    job: Job,
    queries: Source,
    docs: Source,
    plan: Plan,
    options: SearchOptions,
    target: str,
    fmt: str,
    restart: bool,
    progress: bool,
    shard: str,
    extra: tuple[str, ...],
    excluded: Exclusions | None = None,
) -> Found | None:
    """compute_topk's search on this rank of a torchrun job: joins the job, searches this rank's share (planned
    with the whole job's `options`, leaving out the `excluded` pairs) with a checkpoint, and returns the whole
    result on rank 0, else None.
    With `progress`, the docs every rank scores are counted for the whole job's bar on rank 0."""
    with _joined(job, plan.device, progress) as shared:
        mode = choose_shard(shard, plan, job.world, docs.nbytes)
        if mode == "docs":
            if docs.rows < job.world:
                raise InvalidInputError(f"{docs.label()}: {docs.rows} docs for {job.world} ranks; use --shard queries")
            first, last = share(docs.rows, job)
            my_docs = RowRange(docs, first, last)
            wanted = plan.k + int(plan.exclude_self)  # the query's own row is dropped after the merge
            quiet_k = min(wanted, my_docs.rows)
            mine = plan_search(queries, my_docs, quiet_k, replace(options, exclude_self=False))
            batch = agree_min(mine.query_batch_rows, plan.device)
            mine = plan_search(queries, my_docs, quiet_k, replace(options, exclude_self=False, batch_size=batch))
            plan = replace(plan, query_batch_rows=batch)
            store: Store | None = (
                open_checkpoint(target, fmt, queries, docs, plan, restart, extra) if job.leader else None
            )
            if job.leader and store is None:
                store = MemoryStore(queries.rows, plan.k)
            done = from_leader(store.done_rows if store is not None else 0, plan.device)
            merging = MergingStore(
                job,
                store,
                done_rows=done,
                candidates=wanted,
                k=plan.k,
                higher_is_better=higher_is_better(plan.metric),
                exclude_self=plan.exclude_self,
                device=plan.device,
            )
            with reporting_stops(store, queries.rows):  # the merged rows' checkpoint, on rank 0
                run_search(queries, my_docs, mine, progress and job.leader, merging, shared, excluded)
            if store is None:
                return None
            return store.scores, store.indices, plan, store if isinstance(store, Checkpoint) else None
        first, last = share(queries.rows, job)
        my_queries = RowRange(queries, first, last)
        mine = plan_search(my_queries, docs, plan.k, options)
        rank_target = f"{target}.rank{job.rank}of{job.world}"
        with safety.OutputLock(rank_target):
            own = open_checkpoint(rank_target, "pt", my_queries, docs, mine, restart, extra, count_output=False)
            with reporting_stops(own, my_queries.rows):
                scores, indices, _ = run_search(my_queries, docs, mine, progress and job.leader, own, shared, excluded)
        folder = assembly_folder(target) if job.leader else ""
        collected = collect_rows(job, scores, indices, queries.rows, folder, plan.device)

        class Finish:
            def remove(self) -> None:
                if isinstance(own, Checkpoint):
                    own.remove()
                remove_folder(folder)
                barrier(plan.device)  # the others keep their checkpoints until the output is written

        if collected is None:
            barrier(plan.device)
            if isinstance(own, Checkpoint):
                own.remove()
            return None
        return collected[0], collected[1], plan, Finish()


@contextlib.contextmanager
def _joined(job: Job, device: str, progress: bool) -> Iterator[JobProgress | None]:
    """In the job's process group while what runs inside does (then a rank other than 0 leaves; rank 0 leaves
    once it has written the output), with the job's progress counter when `progress` is asked for."""
    try:
        join(job, device)
        # Every rank counts the docs it scores in the job's store; rank 0 shows the total (or, where the
        # store cannot be reached, its own share).
        shared = JobProgress.connect() if progress else None
        with _job_progress_bar(shared is not None and job.leader):
            yield shared
    finally:
        if not job.leader:
            leave()


@contextlib.contextmanager
def _job_progress_bar(show: bool) -> Iterator[None]:
    """With `show` (rank 0 of a torchrun job): a bar that follows the docs scored by every rank, read from
    the job's store every PROGRESS_POLL_S seconds by a thread with a connection of its own (rank 0 may be
    busy merging or waiting)."""
    reader = JobProgress.connect() if show else None
    if reader is None:
        yield
        return
    stop = threading.Event()
    with progress_bar(0) as bar:

        def update() -> None:
            scored, expected = reader.read()
            bar.total, bar.n = expected, scored
            bar.refresh()

        def follow() -> None:
            with contextlib.suppress(RuntimeError):  # the store went away: the job is ending anyway
                while not stop.wait(PROGRESS_POLL_S):
                    update()
                update()

        thread = threading.Thread(target=follow, name="tiny-knn-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def share(rows: int, job: Job) -> tuple[int, int]:
    """This rank's contiguous share [start, stop) of `rows`, as even as can be."""
    return rows * job.rank // job.world, rows * (job.rank + 1) // job.world


def choose_shard(requested: str, plan: Plan, world: int, doc_bytes: int) -> str:
    """Which split costs less (see benchmarks/RESULTS.md, "Scaling model"):

    - `queries` when one rank could not hold every query's running top-k: splitting the queries also
      divides the passes over the docs;
    - else `docs` when merging world × k candidates per query on rank 0 costs less than every rank reading
      all the docs once more, and `queries` otherwise.
    """
    if requested != "auto":
        return requested
    if plan.doc_passes > 1:
        return "queries"
    merge_s = plan.queries * world * plan.candidates * MERGE_S_PER_CANDIDATE
    extra_read_s = doc_bytes * (world - 1) / world / READ_BYTES_PER_S
    return "docs" if merge_s < extra_read_s else "queries"


def agree_min(value: int, device: str) -> int:
    """The smallest `value` over all ranks (so that every rank cuts the same query batches)."""
    tensor = torch.tensor([value], dtype=torch.int64, device=_comm_device(device))
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def from_leader(value: int, device: str) -> int:
    """Rank 0's `value`, on every rank (the resume point)."""
    tensor = torch.tensor([value], dtype=torch.int64, device=_comm_device(device))
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


class MergingStore:
    """For `docs` sharding, the store.Store the engine saves to: each finished batch of this rank's
    candidates (global doc numbers) goes to rank 0, which merges every rank's into the overall top k and hands
    them to its own `store`."""

    def __init__(
        self,
        job: Job,
        store: Store | None,
        *,
        done_rows: int,
        candidates: int,
        k: int,
        higher_is_better: bool,
        exclude_self: bool,
        device: str,
    ) -> None:
        self.job, self.store, self.done_rows = job, store, done_rows
        # Rank 0 holds the merged result; the others hold nothing.
        self.scores = store.scores if store is not None else torch.empty(0)
        self.indices = store.indices if store is not None else torch.empty(0, dtype=torch.int64)
        self.candidates, self.k, self.device = candidates, k, device
        self.higher_is_better, self.exclude_self = higher_is_better, exclude_self

    def save(self, start: int, scores: torch.Tensor, indices: torch.Tensor) -> None:
        rows, mine = scores.shape
        # Every rank sends the same shape: a rank with fewer docs than candidates pads with sentinels
        # (worst score, index -1) that the merge drops.
        worst = float("-inf") if self.higher_is_better else float("inf")
        padded_scores = torch.full((rows, self.candidates), worst, dtype=torch.float32)
        padded_indices = torch.full((rows, self.candidates), -1, dtype=torch.int64)
        padded_scores[:, :mine], padded_indices[:, :mine] = scores, indices
        gathered = _gather([padded_scores, padded_indices], self.job, self.device)
        if self.job.leader:
            all_scores = torch.cat([parts[0] for parts in gathered], dim=1)
            all_indices = torch.cat([parts[1] for parts in gathered], dim=1)
            merged_scores, merged_indices = merge(all_scores, all_indices, self.higher_is_better)
            keep = self.k + int(self.exclude_self)
            merged_scores, merged_indices = merged_scores[:, :keep], merged_indices[:, :keep]
            if self.exclude_self:
                merged_scores, merged_indices = drop_self(merged_scores, merged_indices, start, self.k)
            assert self.store is not None
            self.store.save(start, merged_scores, merged_indices)
        self.done_rows = start + rows


def merge(scores: torch.Tensor, indices: torch.Tensor, higher_is_better: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Orders each row's candidates (already ascending by index within equal scores, ranks in doc order)
    best first by a stable sort, so equal scores stay in ascending index order: the one tie rule. Padding
    (index -1, the worst score) sorts last."""
    key = scores + 0.0  # -0.0 and +0.0 compare equal, as everywhere else
    order = torch.argsort(key, dim=1, descending=higher_is_better, stable=True)
    return torch.gather(scores, 1, order), torch.gather(indices, 1, order)


def collect_rows(
    job: Job, share_scores: torch.Tensor, share_indices: torch.Tensor, rows: int, folder: str, device: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For `queries` sharding: rank 0 receives every rank's rows into memory-mapped arrays made under `folder` and
    then unlinked (so the output's size never sets anyone's memory, and nothing is left behind); other ranks send
    theirs and get None."""
    k = share_scores.shape[1]
    if not job.leader:
        for start in range(0, share_scores.shape[0], COLLECT_ROWS):
            for part in (share_scores, share_indices):
                dist.send(part[start : start + COLLECT_ROWS].contiguous().to(_comm_device(device)), dst=0)
        return None
    arrays = []
    for name, stored in (("scores.npy", np.float32), ("indices.npy", np.int64)):
        arrays.append(np.lib.format.open_memmap(os.path.join(folder, name), mode="w+", dtype=stored, shape=(rows, k)))
        allocate(os.path.join(folder, name))  # a full disk shows here, not as SIGBUS on a write to the mapping
    # The mappings outlive their names: removed now, the folder is never left behind, whatever happens next
    # (on a system that refuses to remove open files, it is removed once the output is written).
    remove_folder(folder)
    scores, indices = arrays
    scores[: share_scores.shape[0]] = share_scores.numpy()
    indices[: share_indices.shape[0]] = share_indices.numpy()
    for rank in range(1, job.world):
        first, last = share(rows, Job(rank, job.world, 0))
        for start in range(first, last, COLLECT_ROWS):
            stop = min(start + COLLECT_ROWS, last)
            for target, dtype in ((scores, torch.float32), (indices, torch.int64)):
                buffer = torch.empty((stop - start, k), dtype=dtype, device=_comm_device(device))
                dist.recv(buffer, src=rank)
                target[start:stop] = buffer.cpu().numpy()
    return torch.from_numpy(scores), torch.from_numpy(indices)


def assembly_folder(output_path: str) -> str:
    """A fresh folder beside the output for rank 0 to assemble a query-sharded result in."""
    return tempfile.mkdtemp(
        prefix=f".{os.path.basename(output_path)}.", suffix=".ranks", dir=os.path.dirname(os.path.abspath(output_path))
    )


def remove_folder(folder: str) -> None:
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def barrier(device: str) -> None:
    if device == "cuda":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _gather(parts: list[torch.Tensor], job: Job, device: str) -> list[list[torch.Tensor]]:
    """Every rank's `parts`, on rank 0 (in rank order); [] elsewhere."""
    where = _comm_device(device)
    gathered: list[list[torch.Tensor]] = []
    for part in parts:
        local = part.to(where)
        buckets = [torch.empty_like(local) for _ in range(job.world)] if job.leader else None
        dist.gather(local, gather_list=buckets, dst=0)
        if buckets is not None:
            gathered.append([bucket.cpu() for bucket in buckets])
    return [list(per_rank) for per_rank in zip(*gathered, strict=True)] if job.leader else []


def _comm_device(device: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
