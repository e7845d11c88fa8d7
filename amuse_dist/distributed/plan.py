"""The exchange plan: who orthogonalizes which matrix, who sends which piece, in which wave.

Pure Python on layouts (no tensors, no collectives), computed identically on every rank once when
the parameter set is built, then reused every step by ``OwnerwiseNewtonSchulz``. The benchmarks call
the same functions on synthetic layouts to count NS FLOPs and bytes per rank at any mesh size.

A *job* is one Newton-Schulz run of one matrix on one owner rank, serving a set of ranks: the owner
receives every distinct piece of the matrix once (a piece held by several ranks, as under HSDP or
DDP, is sent by one of them) and sends each served rank exactly its piece of the result. In the
default (split) mode every matrix has one job serving all ranks: orthogonalized once per job. In
the HSDP ``per_replica`` mode every replica group runs its own job (the 1-D scheme inside each
replica group, no traffic across replicas).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from amuse_dist.distributed.layout import Layout, Piece
from amuse_dist.distributed.owners import assign_owners

HSDP_MODES = ("auto", "split", "per_replica")

# Cost-model constants for the HSDP default (see docs/distributed.md): the NS matmul rate one
# accelerator sustains and the per-rank bandwidth across the replicate dimension (between nodes).
NS_FLOPS_PER_S = 400e12
REPLICATE_BYTES_PER_S = 25e9

# Default wave size: bytes (NS dtype) of whole matrices one owner handles per wave.
DEFAULT_WAVE_BYTES = 128 * 2**20


@dataclass(frozen=True)
class MatrixTask:
    """One Muon matrix: its layout and the row blocks orthogonalized separately.

    ``splits`` is empty for an ordinary matrix; for a fused QKV weight it holds the row counts of
    the Q, K and V blocks, each of which gets its own NS5 and scale.
    """

    layout: Layout
    splits: tuple[int, ...] = ()

    def blocks(self) -> list[tuple[int, int]]:
        rows, cols = self.layout.shape
        return [(r, cols) for r in self.splits] if self.splits else [(rows, cols)]

    @property
    def signature(self) -> tuple[int, int, tuple[int, ...]]:
        rows, cols = self.layout.shape
        return (rows, cols, self.splits)

    @property
    def numel(self) -> int:
        return self.layout.shape[0] * self.layout.shape[1]


@dataclass(frozen=True)
class Job:
    """One NS run: ``task`` on ``owner`` (group rank) for the ranks in ``served``.

    ``sources`` lists the distinct non-empty pieces the owner needs and the rank that sends each.
    """

    task: int
    owner: int
    served: tuple[int, ...]
    sources: tuple[tuple[int, Piece], ...]


@dataclass
class Batch:
    """Same-signature matrices one owner orthogonalizes in one batched NS call."""

    owner: int
    signature: tuple[int, int, tuple[int, ...]]
    jobs: list[Job]

    @property
    def numel(self) -> int:
        rows, cols, _ = self.signature
        return len(self.jobs) * rows * cols


@dataclass
class GroupPlan:
    """Everything the ranks of one process group agree on: jobs, batches and waves."""

    tasks: list[int]  # indices into the caller's task list, in group order
    world_size: int
    jobs: list[Job]
    waves: list[list[Batch]] = field(default_factory=list)
    mode: str = "split"


def choose_hsdp_mode(
    flops: float,
    numel: int,
    elem_bytes: int,
    ns_flops_per_s: float = NS_FLOPS_PER_S,
    replicate_bytes_per_s: float = REPLICATE_BYTES_PER_S,
) -> str:
    """Cost model for HSDP's default: "split" when it saves more NS time than its extra traffic.

    With R replica groups of S ranks (W = R S), per rank: split runs F/W NS FLOPs instead of F/S
    (saves F (R-1)/W of NS work) and receives its pieces of the matrices owned by the other replica
    groups, b N (R-1)/W bytes across the replicate dimension. Split wins iff
    F / ns_flops_per_s > b N / replicate_bytes_per_s: R and S cancel out, only the NS FLOPs per
    element F/N decide (Llama-3 8B: 95 kFLOP per element against 2 x 400e12 / 25e9 = 32 k).
    """
    if numel == 0:
        return "split"
    return (
        "split"
        if flops / ns_flops_per_s > elem_bytes * numel / replicate_bytes_per_s
        else ("per_replica")
    )


def _replica_groups(layout: Layout) -> list[list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for g, rep in enumerate(layout.replica):
        groups[rep].append(g)
    return [groups[k] for k in sorted(groups)]


def plan_jobs(
    tasks: Sequence[MatrixTask],
    costs: Sequence[float],
    hsdp_mode: str = "split",
    elem_bytes: int = 2,
) -> tuple[list[Job], str]:
    """Owners and sources for tasks that share one process group (same world size).

    Returns the jobs and the HSDP mode used ("split" when no task is HSDP). Split: LPT on NS cost
    over all ranks of the group (each replica group gets its share of the matrices, and inside it
    each shard rank). per_replica: LPT over the S positions of a replica group; replica group k's
    member at that position owns the matrix for replica group k.
    """
    if hsdp_mode not in HSDP_MODES:
        raise ValueError(f"hsdp_mode must be one of {HSDP_MODES}, got {hsdp_mode!r}")
    if not tasks:
        return [], "split"
    ws = tasks[0].layout.world_size
    hsdp = [i for i, t in enumerate(tasks) if t.layout.hsdp]
    mode = hsdp_mode
    if mode == "auto":
        mode = choose_hsdp_mode(
            sum(costs[i] for i in hsdp), sum(tasks[i].numel for i in hsdp), elem_bytes
        )
    if not hsdp:
        mode = "split"
    per_replica = set(hsdp) if mode == "per_replica" else set()
    split = [i for i in range(len(tasks)) if i not in per_replica]
    jobs: list[Job] = []
    sent = [0] * ws  # bytes each rank sends as a source so far (spreads duplicate pieces)
    owners = assign_owners([costs[i] for i in split], ws)
    owner_of = dict(zip(split, owners, strict=True))
    by_replica_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i in sorted(per_replica):
        by_replica_shape[tasks[i].layout.replica].append(i)
    pr_owner: dict[int, list[int]] = {}
    for members in by_replica_shape.values():
        rgroups = _replica_groups(tasks[members[0]].layout)
        size = len(rgroups[0])
        if any(len(g) != size for g in rgroups):
            raise ValueError("per_replica mode needs replica groups of equal size")
        pos = assign_owners([costs[i] for i in members], size)
        for i, j in zip(members, pos, strict=True):
            pr_owner[i] = [g[j] for g in rgroups]
    for i, task in enumerate(tasks):
        layout = task.layout
        if i in per_replica:
            served_sets = [tuple(g) for g in _replica_groups(layout)]
            job_owners = pr_owner[i]
        else:
            served_sets = [tuple(range(ws))]
            job_owners = [owner_of[i]]
        for owner, served in zip(job_owners, served_sets, strict=True):
            holders: dict[Piece, list[int]] = defaultdict(list)
            for g in served:
                piece = layout.pieces[g]
                if piece.numel:
                    holders[piece].append(g)
            sources = []
            for piece in sorted(holders, key=lambda p: (p.row, p.col)):
                hs = holders[piece]
                if owner in hs:
                    src = owner
                else:  # same replica group as the owner first, then the least busy sender
                    src = min(
                        hs,
                        key=lambda g: (layout.replica[g] != layout.replica[owner], sent[g], g),
                    )
                    sent[src] += piece.numel
                sources.append((src, piece))
            jobs.append(Job(i, owner, served, tuple(sources)))
    return jobs, mode


def plan_waves(
    jobs: Sequence[Job],
    tasks: Sequence[MatrixTask],
    elem_bytes: int,
    wave_bytes: int | None = DEFAULT_WAVE_BYTES,
) -> list[list[Batch]]:
    """Batches per owner (same signature, at most ``wave_bytes`` each) packed into waves.

    Each owner's batches (largest matrices first) fill its waves greedily up to ``wave_bytes``
    (at least one batch per wave); wave k is every owner's k-th wave. ``wave_bytes`` None: one
    wave. The batches do not depend on whether the waves are pipelined, so pipelined and
    unpipelined runs execute the same NS calls on the same inputs.
    """
    limit = wave_bytes if wave_bytes else None
    by_owner: dict[int, dict[tuple, list[Job]]] = defaultdict(lambda: defaultdict(list))
    for job in jobs:
        by_owner[job.owner][tasks[job.task].signature].append(job)
    owner_waves: dict[int, list[list[Batch]]] = {}
    for owner in sorted(by_owner):
        sigs = sorted(by_owner[owner], key=lambda s: (-s[0] * s[1], s))
        batches: list[Batch] = []
        for sig in sigs:
            members = by_owner[owner][sig]
            per = max(1, limit // (sig[0] * sig[1] * elem_bytes)) if limit else len(members)
            for k in range(0, len(members), per):
                batches.append(Batch(owner, sig, members[k : k + per]))
        waves: list[list[Batch]] = []
        load = 0
        for b in batches:
            nbytes = b.numel * elem_bytes
            if not waves or (limit is not None and load + nbytes > limit):
                waves.append([])
                load = 0
            waves[-1].append(b)
            load += nbytes
        owner_waves[owner] = waves
    n = max((len(w) for w in owner_waves.values()), default=0)
    out: list[list[Batch]] = []
    for k in range(n):
        out.append(
            [b for o in sorted(owner_waves) if k < len(owner_waves[o]) for b in owner_waves[o][k]]
        )
    return out


def build_group_plan(
    task_ids: Sequence[int],
    tasks: Sequence[MatrixTask],
    flops: Callable[[int, int], float],
    elem_bytes: int,
    hsdp_mode: str = "split",
    wave_bytes: int | None = DEFAULT_WAVE_BYTES,
) -> GroupPlan:
    """Jobs and waves for the tasks ``task_ids`` (one process group) under the NS cost ``flops``."""
    sub = [tasks[i] for i in task_ids]
    costs = [float(sum(flops(r, c) for r, c in t.blocks())) for t in sub]
    jobs, mode = plan_jobs(sub, costs, hsdp_mode, elem_bytes)
    ws = sub[0].layout.world_size if sub else 1
    waves = plan_waves(jobs, sub, elem_bytes, wave_bytes)
    return GroupPlan(list(task_ids), ws, jobs, waves, mode)


@dataclass
class Traffic:
    """Per-rank NS FLOPs and bytes of one step under a plan (self-traffic excluded)."""

    flops: list[float]
    sent: list[int]
    recv: list[int]
    replicate_bytes: list[int]  # received from another replica group (crosses the replicate dim)
    ns_runs: dict[int, int]  # NS runs per task over all ranks


def traffic(
    plan: GroupPlan,
    tasks: Sequence[MatrixTask],
    flops: Callable[[int, int], float],
    elem_bytes: int,
) -> Traffic:
    """Count what the plan moves and computes, per rank (the benchmarks' and tests' model)."""
    ws = plan.world_size
    fl = [0.0] * ws
    sent, recv, cross = [0] * ws, [0] * ws, [0] * ws
    runs: dict[int, int] = defaultdict(int)
    for job in plan.jobs:
        task = tasks[job.task]
        layout = task.layout
        fl[job.owner] += sum(flops(r, c) for r, c in task.blocks())
        runs[job.task] += 1
        for src, piece in job.sources:
            if src != job.owner:
                sent[src] += piece.numel * elem_bytes
                recv[job.owner] += piece.numel * elem_bytes
        for g in job.served:
            piece = layout.pieces[g]
            if g != job.owner and piece.numel:
                sent[job.owner] += piece.numel * elem_bytes
                recv[g] += piece.numel * elem_bytes
                if layout.replica[g] != layout.replica[job.owner]:
                    cross[g] += piece.numel * elem_bytes
    return Traffic(fl, sent, recv, cross, dict(runs))
