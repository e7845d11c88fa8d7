"""Owner-wise Newton-Schulz: each matrix is orthogonalized once per job, on one owner rank.

Per wave and process group, two ``all_to_all_single`` calls move the data:

1. gather: each distinct piece of every matrix in the wave (in the NS dtype) goes from one rank
   holding it to the matrix's owner, which assembles the whole matrix into its batched NS buffer;
2. return: the owner runs NS on its batches and sends every served rank exactly its piece.

Two halves, both built once per parameter set:

* the plan (``plan.py``: owners, sources, batches, waves; here ``RankPlan``: this rank's parts of
  each wave as frozen dataclasses: what it sends, keeps, assembles, returns and receives);
* the runtime, in stages: ``stage()`` hands out, per matrix, the view where the caller writes its
  local update (straight into the gather's send buffer, or, for a piece of a matrix this rank
  orthogonalizes itself, into a keep buffer that the assembly reads once: a rank's own pieces are
  never copied twice); ``run()`` then goes gather -> assemble -> NS -> return per wave. Pipelining
  is a separate driver over those stages: wave k+1's gather is in flight while wave k is
  orthogonalized, and wave k's return while wave k+1 is; ``pipeline=False`` runs the same batches
  with one gather and one return, bitwise-equal results.

A group of one rank (one process, or a rank that owns everything) takes no collective at all: each
shape group is one NS batch in a persistent buffer, ``stage()`` hands out views of it and ``run()``
hands back views of the result: no staging copy.

Newton-Schulz itself is passed in (``Orthogonalizer``): this package knows nothing of the math.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.distributed as dist

from amuse_dist.distributed.layout import Piece
from amuse_dist.distributed.plan import (
    DEFAULT_WAVE_BYTES,
    GroupPlan,
    MatrixTask,
    build_group_plan,
)

__all__ = [
    "MatrixTask",
    "Orthogonalizer",
    "OwnerwiseNewtonSchulz",
    "RankPlan",
    "orthogonalize_full",
    "rank_plan",
]


class Orthogonalizer(Protocol):
    """Newton-Schulz as the exchange sees it: a batched function and its cost model.

    ``dtype`` is the NS dtype (and the dtype on the wire); ``__call__`` maps a batch
    ``[b, rows, cols]`` to its orthogonalized, scaled batch in ``dtype`` (any strides);
    ``flops(rows, cols)`` is the cost of one matrix, used to balance owners.
    """

    dtype: torch.dtype

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...

    def flops(self, rows: int, cols: int) -> float: ...


def orthogonalize_batch(
    batch: torch.Tensor, splits: tuple[int, ...], orth: Orthogonalizer, contiguous: bool = True
) -> torch.Tensor:
    """orth on a [b, rows, cols] batch, each row block of ``splits`` separately (fused QKV).

    ``contiguous``: the exchange slices and flattens results in place, so it asks for row-major
    results (NS5 hands tall matrices back transposed); a caller that reads views does not.
    """
    if not splits:
        out = orth(batch)
        return out.contiguous() if contiguous else out
    out = torch.empty(batch.shape, dtype=orth.dtype, device=batch.device)
    start = 0
    for rows in splits:
        out[:, start : start + rows] = orth(batch[:, start : start + rows])
        start += rows
    return out


def orthogonalize_full(
    mats: Sequence[torch.Tensor], splits: Sequence[tuple[int, ...]], orth: Orthogonalizer
) -> list[torch.Tensor]:
    """Whole matrices through ``orth``, same-signature matrices batched (single-process helper)."""
    by_sig: dict[tuple, list[int]] = defaultdict(list)
    for i, (m, s) in enumerate(zip(mats, splits, strict=True)):
        by_sig[(tuple(m.shape), tuple(s))].append(i)
    out: list[torch.Tensor | None] = [None] * len(mats)
    for (_, s), members in by_sig.items():
        result = orthogonalize_batch(
            torch.stack([mats[i].to(orth.dtype) for i in members]), s, orth
        )
        for k, i in enumerate(members):
            out[i] = result[k]
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------- this rank's parts of a wave
@dataclass(frozen=True)
class Outgoing:
    """This rank's local piece of ``task``, sent to the owner: ``send[offset : offset + numel]``."""

    task: int
    offset: int
    numel: int


@dataclass(frozen=True)
class Kept:
    """This rank's local piece of a matrix it orthogonalizes itself: no collective, it waits in
    ``keep[offset : offset + numel]`` for the assembly (its only copy)."""

    task: int
    offset: int
    numel: int


@dataclass(frozen=True)
class Part:
    """One piece of an owned matrix as the assembly reads it: from the gather's receive buffer
    or from the keep buffer, at ``offset``."""

    piece: Piece
    source: Literal["recv", "keep"]
    offset: int


@dataclass(frozen=True)
class OwnedMatrix:
    """A matrix this rank orthogonalizes: where its pieces come from, which pieces go back.

    ``full_rows``: every part spans all columns (flat slices of the batch buffer hold them);
    ``served``: the distinct result pieces in (row, col) order; ``tiled``: they are full-width row
    blocks tiling the matrix (one split of the flat result cuts them all).
    """

    task: int
    parts: tuple[Part, ...]
    full_rows: bool
    served: tuple[Piece, ...]
    tiled: bool


@dataclass(frozen=True)
class OwnedBatch:
    """Same-signature matrices orthogonalized here in one NS call."""

    signature: tuple[int, int, tuple[int, ...]]
    matrices: tuple[OwnedMatrix, ...]


@dataclass(frozen=True)
class Returned:
    """A result piece sent back: ``served`` piece ``piece`` of matrix ``pos`` of batch ``batch``."""

    batch: int
    pos: int
    piece: int


@dataclass(frozen=True)
class Incoming:
    """This rank's piece of the result of ``task``, in the return's receive buffer."""

    task: int
    shape: tuple[int, int]
    offset: int


@dataclass(frozen=True)
class WavePlan:
    """This rank's share of one wave.

    ``direct_in``: one owned matrix whose pieces (this rank's own included, through the
    collective) arrive in row order: the receive buffer is the NS batch, no assembly.
    ``direct_out``: the one result is the return's send buffer, no packing.
    """

    outgoing: tuple[Outgoing, ...]
    send_splits: tuple[int, ...]
    kept: tuple[Kept, ...]
    keep_numel: int
    recv_splits: tuple[int, ...]
    batches: tuple[OwnedBatch, ...]
    returned: tuple[Returned, ...]
    return_send_splits: tuple[int, ...]
    incoming: tuple[Incoming, ...]
    return_recv_splits: tuple[int, ...]
    direct_in: bool
    direct_out: bool

    @property
    def send_numel(self) -> int:
        return sum(self.send_splits)


@dataclass(frozen=True)
class RankPlan:
    """This rank's parts of every wave of one process group (built once per parameter set)."""

    waves: tuple[WavePlan, ...]


def _tiled(distinct: Sequence[Piece], cols: int) -> bool:
    row = 0
    for p in distinct:
        if not p.full_width(cols) or p.row != row:
            return False
        row += p.rows
    return True


def _wave_plan(plan: GroupPlan, wave, tasks: Sequence[MatrixTask], me: int) -> WavePlan:  # type: ignore[no-untyped-def]
    ws = plan.world_size
    owned = [b for b in wave if b.owner == me]
    # one owned matrix whose pieces arrive (leave) in row order: the receive buffer is the NS
    # batch (the result is the send buffer); then this rank's own piece rides the collective too
    single = len(owned) == 1 and len(owned[0].jobs) == 1
    direct_in = direct_out = False
    if single:
        job = owned[0].jobs[0]
        layout = tasks[job.task].layout
        rows, cols, _ = owned[0].signature
        served = sorted(
            {layout.pieces[g] for g in job.served if layout.pieces[g].numel},
            key=lambda p: (p.row, p.col),
        )
        by_src = sorted(job.sources, key=lambda s: s[0])
        received = [p for _, p in by_src]
        leaving = [layout.pieces[g] for g in sorted(job.served) if layout.pieces[g].numel]
        tiled = _tiled(served, cols)
        direct_in = tiled and received == served and sum(p.numel for p in received) == rows * cols
        direct_out = tiled and leaving == served
    # gather: pieces this rank sends (destination-major) or keeps; pieces it receives
    send: list[list[int]] = [[] for _ in range(ws)]
    keep: list[int] = []
    recv: list[list[tuple[int, int, Piece]]] = [[] for _ in range(ws)]  # (batch, pos, piece)
    ret_send: list[list[tuple[int, int, Piece]]] = [[] for _ in range(ws)]
    ret_recv: list[list[int]] = [[] for _ in range(ws)]
    for b in wave:
        for job in b.jobs:
            layout = tasks[job.task].layout
            for src, _ in job.sources:
                if src == me:
                    if job.owner == me and not direct_in:
                        keep.append(job.task)
                    else:
                        send[job.owner].append(job.task)
            if me in job.served and layout.pieces[me].numel:
                ret_recv[job.owner].append(job.task)
    for bi, b in enumerate(owned):
        for pos, job in enumerate(b.jobs):
            layout = tasks[job.task].layout
            for src, piece in job.sources:
                if src != me or direct_in:
                    recv[src].append((bi, pos, piece))
            for g in job.served:
                piece = layout.pieces[g]
                if piece.numel:
                    ret_send[g].append((bi, pos, piece))
    outgoing, offset = [], 0
    for d in range(ws):
        for t in send[d]:
            n = tasks[t].layout.local.numel
            outgoing.append(Outgoing(t, offset, n))
            offset += n
    kept, keep_numel = [], 0
    for t in keep:
        n = tasks[t].layout.local.numel
        kept.append(Kept(t, keep_numel, n))
        keep_numel += n
    recv_at: dict[tuple[int, int, Piece], int] = {}
    offset = 0
    for s in range(ws):
        for key in recv[s]:
            recv_at[key] = offset
            offset += key[2].numel
    kept_at = {k.task: k.offset for k in kept}
    batches, served_at = [], {}
    for bi, b in enumerate(owned):
        rows, cols, _ = b.signature
        mats = []
        for pos, job in enumerate(b.jobs):
            layout = tasks[job.task].layout
            parts = []
            for src, piece in job.sources:
                if src == me and not direct_in:
                    parts.append(Part(piece, "keep", kept_at[job.task]))
                else:
                    parts.append(Part(piece, "recv", recv_at[(bi, pos, piece)]))
            served = tuple(
                sorted(
                    {layout.pieces[g] for g in job.served if layout.pieces[g].numel},
                    key=lambda p: (p.row, p.col),
                )
            )
            for k, p in enumerate(served):
                served_at[(bi, pos, p)] = k
            mats.append(
                OwnedMatrix(
                    task=job.task,
                    parts=tuple(parts),
                    full_rows=all(p.piece.full_width(cols) for p in parts),
                    served=served,
                    tiled=_tiled(served, cols),
                )
            )
        batches.append(OwnedBatch(b.signature, tuple(mats)))
    incoming, offset = [], 0
    for s in range(ws):
        for t in ret_recv[s]:
            local = tasks[t].layout.local
            incoming.append(Incoming(t, local.shape, offset))
            offset += local.numel
    return WavePlan(
        outgoing=tuple(outgoing),
        send_splits=tuple(sum(tasks[t].layout.local.numel for t in send[d]) for d in range(ws)),
        kept=tuple(kept),
        keep_numel=keep_numel,
        recv_splits=tuple(sum(p.numel for _, _, p in recv[s]) for s in range(ws)),
        batches=tuple(batches),
        returned=tuple(
            Returned(bi, pos, served_at[(bi, pos, p)])
            for d in range(ws)
            for bi, pos, p in ret_send[d]
        ),
        return_send_splits=tuple(sum(p.numel for _, _, p in ret_send[d]) for d in range(ws)),
        incoming=tuple(incoming),
        return_recv_splits=tuple(
            sum(tasks[t].layout.local.numel for t in ret_recv[s]) for s in range(ws)
        ),
        direct_in=direct_in,
        direct_out=direct_out,
    )


def rank_plan(plan: GroupPlan, tasks: Sequence[MatrixTask], me: int) -> RankPlan:
    """This rank's parts of every wave of ``plan`` (``tasks``: the group's tasks, group order)."""
    return RankPlan(tuple(_wave_plan(plan, wave, tasks, me) for wave in plan.waves))


# ------------------------------------------------------------------------------------ runtime
@dataclass
class _Group:
    """One process group's plan and this step's buffers."""

    group: dist.ProcessGroup | None
    ids: list[int]  # indices into the caller's task list, group order
    plan: GroupPlan
    rank_plan: RankPlan | None  # None: a group of one rank (no collective)
    send: list[torch.Tensor] | None = None  # per wave, this step
    keep: list[torch.Tensor] | None = None
    local: list[torch.Tensor] | None = None  # one rank: persistent NS batch buffers


class OwnerwiseNewtonSchulz:
    """Orthogonalizes a fixed list of matrices across the ranks of their process groups.

    Built once for a list of tasks (the same list, in the same order, on every rank). Each step:
    ``stage()`` returns the view where each task's local update goes (NS dtype), the caller writes
    them, ``run()`` returns this rank's piece of NS(u) * scale per task. ``owned_log`` records
    which task indices ran NS on this rank in the last call. ``owner[i]`` is the group rank that
    orthogonalizes task i for this rank's replica group.
    """

    def __init__(
        self,
        tasks: Sequence[MatrixTask],
        orthogonalizer: Orthogonalizer,
        hsdp_mode: str = "auto",
        wave_bytes: int | None = DEFAULT_WAVE_BYTES,
        pipeline: bool = True,
    ):
        self.tasks = list(tasks)
        self.orth = orthogonalizer
        self.pipeline = pipeline
        elem = torch.empty(0, dtype=orthogonalizer.dtype).element_size()
        by_group: dict[tuple, list[int]] = defaultdict(list)
        for i, task in enumerate(self.tasks):
            if len(task.layout.shape) != 2:
                raise ValueError(f"Muon matrix {i} has shape {task.layout.shape}, expected 2-D")
            layout = task.layout
            key = (layout.group_key, layout.world_size) if layout.group is not None else ()
            by_group[key].append(i)
        self.plans: list[GroupPlan] = []
        self._groups: list[_Group] = []
        self.owner: list[int] = [0] * len(self.tasks)
        for ids in by_group.values():
            sub = [self.tasks[i] for i in ids]
            layout = sub[0].layout
            alone = layout.world_size == 1
            # one rank: whole shape groups in one batch (no wave bound: nothing is in flight)
            plan = build_group_plan(
                ids,
                self.tasks,
                orthogonalizer.flops,
                elem,
                hsdp_mode,
                None if alone else wave_bytes,
            )
            if not pipeline:  # the same batches, all in one wave
                plan.waves = [[b for w in plan.waves for b in w]] if plan.waves else []
            me = layout.rank
            for job in plan.jobs:
                if me in job.served:
                    self.owner[ids[job.task]] = job.owner
            self.plans.append(plan)
            self._groups.append(
                _Group(layout.group, ids, plan, None if alone else rank_plan(plan, sub, me))
            )
        self.owned_log: list[int] = []
        self._device: torch.device | str | None = None  # set by stage(), cleared by run()

    @property
    def hsdp_modes(self) -> list[str]:
        return [p.mode for p in self.plans]

    # ------------------------------------------------------------------------------ staging
    def stage(self, device: torch.device | str) -> list[torch.Tensor]:
        """Per task, the tensor (local shape, NS dtype) where its local update is to be written.

        Views of the gather's send buffers, of the keep buffers, or (one rank) of the persistent
        NS batch buffers; a piece that no owner needs from this rank gets scratch space.
        """
        dtype = self.orth.dtype
        inputs: list[torch.Tensor | None] = [None] * len(self.tasks)
        for grp in self._groups:
            if grp.rank_plan is None:
                if grp.local is None:  # persistent: allocated at the first step only
                    grp.local = [
                        torch.empty((len(b.jobs), *b.signature[:2]), dtype=dtype, device=device)
                        for w in grp.plan.waves
                        for b in w
                    ]
                batches = [b for w in grp.plan.waves for b in w]
                for buf, b in zip(grp.local, batches, strict=True):
                    for k, job in enumerate(b.jobs):
                        inputs[grp.ids[job.task]] = buf[k]
                continue
            grp.send, grp.keep = [], []
            for w in grp.rank_plan.waves:
                send = torch.empty(w.send_numel, dtype=dtype, device=device)
                keep = torch.empty(w.keep_numel, dtype=dtype, device=device)
                grp.send.append(send)
                grp.keep.append(keep)
                for part, buf in [(o, send) for o in w.outgoing] + [(k, keep) for k in w.kept]:
                    shape = self.tasks[grp.ids[part.task]].layout.local.shape
                    inputs[grp.ids[part.task]] = buf[part.offset : part.offset + part.numel].view(
                        shape
                    )
        for i, t in enumerate(inputs):
            if t is None:
                inputs[i] = torch.empty(
                    self.tasks[i].layout.local.shape, dtype=dtype, device=device
                )
        self._device = device
        return inputs  # type: ignore[return-value]

    # ------------------------------------------------------------------------------ running
    def run(self, overlap: Callable[[], None] | None = None) -> list[torch.Tensor]:
        """Return this rank's piece of NS(u) * scale for every task, in the NS dtype.

        Call after ``stage()`` and after writing the updates. ``overlap`` is called exactly
        once: while the first gather is in flight, or before NS when there is no communication.
        """
        if self._device is None:
            raise RuntimeError("OwnerwiseNewtonSchulz.run() before stage()")
        out: list[torch.Tensor | None] = [None] * len(self.tasks)
        self.owned_log = []
        pending = overlap
        for grp in self._groups:
            if grp.rank_plan is None:
                if pending is not None:
                    pending()
                    pending = None
                self._run_alone(grp, out)
            else:
                self._run_group(grp, out, pending)
                pending = None
        if pending is not None:
            pending()
        device = self._device
        for i, o in enumerate(out):
            if o is None:  # an empty local piece (matrix smaller than the world)
                out[i] = torch.empty(
                    self.tasks[i].layout.local.shape, dtype=self.orth.dtype, device=device
                )
        self._device = None
        return out  # type: ignore[return-value]

    def __call__(
        self, updates: Sequence[torch.Tensor], overlap: Callable[[], None] | None = None
    ) -> list[torch.Tensor]:
        """``stage()``, one foreach copy of ``updates`` into the staged views, ``run()``."""
        if len(updates) != len(self.tasks):
            raise ValueError(f"expected {len(self.tasks)} updates, got {len(updates)}")
        device = updates[0].device if updates else "cpu"
        inputs = self.stage(device)
        pairs = [(i, u) for i, u in zip(inputs, updates, strict=True) if u.numel()]
        if pairs:
            torch._foreach_copy_([i for i, _ in pairs], [u for _, u in pairs])
        del inputs, pairs  # the staged views: each wave's send buffer is freed once sent
        return self.run(overlap)

    def _run_alone(self, grp: _Group, out: list[torch.Tensor | None]) -> None:
        """One rank: NS on the staged batch buffers, results handed back as views."""
        assert grp.local is not None
        batches = [b for w in grp.plan.waves for b in w]
        for buf, b in zip(grp.local, batches, strict=True):
            result = orthogonalize_batch(buf, b.signature[2], self.orth, contiguous=False)
            for k, job in enumerate(b.jobs):
                out[grp.ids[job.task]] = result[k]
                self.owned_log.append(grp.ids[job.task])

    # stages of one wave ------------------------------------------------------------------
    def _a2a(
        self,
        grp: _Group,
        send: torch.Tensor,
        in_splits,
        out_splits,  # type: ignore[no-untyped-def]
    ) -> tuple[torch.Tensor, dist.Work | None, torch.Tensor]:
        """Start one all_to_all_single; the handle keeps ``send`` alive until it is waited on."""
        recv = torch.empty(sum(out_splits), dtype=send.dtype, device=send.device)
        work = dist.all_to_all_single(
            recv, send, list(out_splits), list(in_splits), group=grp.group, async_op=True
        )
        return recv, work, send

    def _gather(self, grp: _Group, k: int) -> tuple[torch.Tensor, dist.Work | None, torch.Tensor]:
        w = grp.rank_plan.waves[k]  # type: ignore[union-attr]
        return self._a2a(grp, grp.send[k], w.send_splits, w.recv_splits)  # type: ignore[index]

    def _assemble(self, w: WavePlan, recv: torch.Tensor, keep: torch.Tensor) -> list[torch.Tensor]:
        """The NS batch buffers of wave ``w``: every piece lands in its place in one foreach
        copy per batch (views of the buffer as destinations), from ``recv`` or ``keep``."""
        dtype, device = recv.dtype, recv.device
        if w.direct_in:
            rows, cols, _ = w.batches[0].signature
            return [recv.view(1, rows, cols)]
        bufs = []
        for b in w.batches:
            rows, cols, _ = b.signature
            buf = torch.empty((len(b.matrices), rows, cols), dtype=dtype, device=device)
            dsts: list[torch.Tensor] = []
            srcs: list[torch.Tensor] = []
            for pos, mat in enumerate(b.matrices):
                src = [
                    (recv if p.source == "recv" else keep)[p.offset : p.offset + p.piece.numel]
                    for p in mat.parts
                ]
                if mat.full_rows:
                    dsts += buf[pos].view(-1).split([x.numel() for x in src])
                    srcs += src
                else:
                    for p, x in zip(mat.parts, src, strict=True):
                        q = p.piece
                        dsts.append(buf[pos, q.row : q.row + q.rows, q.col : q.col + q.cols])
                        srcs.append(x.view(q.rows, q.cols))
            torch._foreach_copy_(dsts, srcs)
            bufs.append(buf)
        return bufs

    def _orthogonalize(self, grp: _Group, w: WavePlan, bufs: list[torch.Tensor]) -> list:
        results = []
        for b, buf in zip(w.batches, bufs, strict=True):
            results.append(orthogonalize_batch(buf, b.signature[2], self.orth))
            self.owned_log.extend(grp.ids[m.task] for m in b.matrices)
        return results

    def _start_return(
        self, grp: _Group, w: WavePlan, results: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dist.Work | None, torch.Tensor]:
        if w.direct_out:
            send = results[0].reshape(-1)
        else:
            flat: list[list[torch.Tensor]] = []
            for b, result in zip(w.batches, results, strict=True):
                rows, cols, _ = b.signature
                for pos, mat in enumerate(b.matrices):
                    m = result[pos]
                    if mat.tiled:
                        flat.append(list(m.reshape(-1).split([p.numel for p in mat.served])))
                    else:
                        flat.append(
                            [
                                m[p.row : p.row + p.rows, p.col : p.col + p.cols].reshape(-1)
                                for p in mat.served
                            ]
                        )
            # matrices in batch order: index (batch, pos) -> position in ``flat``
            starts = [0]
            for b in w.batches:
                starts.append(starts[-1] + len(b.matrices))
            dtype = results[0].dtype if results else self.orth.dtype
            device = results[0].device if results else self._device
            send = torch.empty(sum(w.return_send_splits), dtype=dtype, device=device)
            if w.returned:
                torch.cat([flat[starts[r.batch] + r.pos][r.piece] for r in w.returned], out=send)
        return self._a2a(grp, send, w.return_send_splits, w.return_recv_splits)

    def _finish_return(
        self,
        grp: _Group,
        w: WavePlan,
        handle: tuple[torch.Tensor, dist.Work | None, torch.Tensor],
        out: list[torch.Tensor | None],
    ) -> None:
        recv, work, _ = handle
        if work is not None:
            work.wait()
        for inc in w.incoming:
            n = inc.shape[0] * inc.shape[1]
            out[grp.ids[inc.task]] = recv[inc.offset : inc.offset + n].view(inc.shape)

    # the driver: pipelining over the stages ---------------------------------------------------
    def _run_group(
        self,
        grp: _Group,
        out: list[torch.Tensor | None],
        overlap: Callable[[], None] | None,
    ) -> None:
        waves = grp.rank_plan.waves  # type: ignore[union-attr]
        gathers: list = [None] * len(waves)
        if waves:
            gathers[0] = self._gather(grp, 0)
        if overlap is not None:
            overlap()
        previous = None
        for k, w in enumerate(waves):
            if self.pipeline and k + 1 < len(waves):
                gathers[k + 1] = self._gather(grp, k + 1)
            recv, work, _ = gathers[k]
            gathers[k] = None
            if work is not None:
                work.wait()
            grp.send[k] = None  # type: ignore[index]  # sent: its memory can go (O(wave) held)
            results = self._orthogonalize(grp, w, self._assemble(w, recv, grp.keep[k]))  # type: ignore[index]
            del recv
            handle = self._start_return(grp, w, results)
            del results
            if previous is not None:
                self._finish_return(grp, *previous, out)
            previous = (w, handle)
            if not self.pipeline:
                self._finish_return(grp, *previous, out)
                previous = None
        if previous is not None:
            self._finish_return(grp, *previous, out)
        grp.send = grp.keep = None
