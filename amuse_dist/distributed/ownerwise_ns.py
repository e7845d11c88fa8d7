"""Owner-wise Newton-Schulz: each matrix is orthogonalized once per job, on one owner rank.

Per wave and process group, two ``all_to_all_single`` calls move the data:

1. gather: each distinct piece of every matrix in the wave (in the NS dtype) goes from one rank
   holding it to the matrix's owner, which assembles the whole matrix into its batched NS buffer;
2. return: the owner runs NS on its batches and sends every served rank exactly its piece.

The plan (``plan.py``: owners, sources, batches, waves, and here the split sizes and assembly
steps of this rank) is built once per parameter set. Waves are pipelined: wave k+1's gather is in
flight while wave k is orthogonalized, and wave k's return is in flight while wave k+1 is; an
owner holds O(wave) extra memory instead of O(all its matrices). ``pipeline=False`` runs the same
batches with one gather and one return, bitwise-equal results.

Newton-Schulz itself is passed in (``Orthogonalizer``): this package knows nothing of the math.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch._C._nn import flatten_dense_tensors as flatten
from torch._C._nn import unflatten_dense_tensors as unflatten

from amuse_dist.distributed.layout import Piece
from amuse_dist.distributed.plan import (
    DEFAULT_WAVE_BYTES,
    GroupPlan,
    MatrixTask,
    build_group_plan,
)

__all__ = ["MatrixTask", "Orthogonalizer", "OwnerwiseNewtonSchulz", "orthogonalize_full"]


class Orthogonalizer(Protocol):
    """Newton-Schulz as the exchange sees it: a batched function and its cost model.

    ``dtype`` is the NS dtype (and the dtype on the wire); ``__call__`` maps a batch
    ``[b, rows, cols]`` to its orthogonalized, scaled batch in ``dtype``; ``flops(rows, cols)``
    is the cost of one matrix, used to balance owners.
    """

    dtype: torch.dtype

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...

    def flops(self, rows: int, cols: int) -> float: ...


def orthogonalize_batch(
    batch: torch.Tensor, splits: tuple[int, ...], orth: Orthogonalizer
) -> torch.Tensor:
    """orth on a [b, rows, cols] batch, each row block of ``splits`` separately (fused QKV).

    Contiguous, whatever the orthogonalizer returns (NS5 hands tall matrices back transposed):
    the exchange slices and flattens the results in place.
    """
    if not splits:
        return orth(batch).contiguous()
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


# ------------------------------------------------------------------- this rank's share of a wave
@dataclass
class _BatchSteps:
    signature: tuple[int, int, tuple[int, ...]]
    tasks: list[int]  # group-local task indices, one per batch position
    # per position: (piece, recv index or -1, local task or -1), pieces sorted by (row, col)
    parts: list[list[tuple[Piece, int, int]]]
    full_rows: list[bool]  # every part spans all columns: one cat assembles the matrix


@dataclass
class _RankWave:
    send_tasks: list[int]
    send_splits: list[int]
    recv_sizes: list[int]  # per received piece, source-major
    recv_splits: list[int]
    batches: list[_BatchSteps]
    # result pieces, per owned (batch, position): its distinct served pieces in (row, col) order and
    # whether they are full-width row blocks tiling the matrix (then one split cuts them all)
    ret_pieces: list[tuple[int, int, list[Piece], bool]]
    ret_send: list[int]  # index into the flattened ret_pieces, destination-major
    ret_send_splits: list[int]
    ret_recv: list[tuple[int, tuple[int, int]]]  # (task, local shape), source-major
    ret_recv_splits: list[int]
    direct_in: bool = False  # the receive buffer is the (single-matrix) NS batch
    direct_out: bool = False  # the (single-matrix) result is the send buffer


def _rank_waves(plan: GroupPlan, tasks: Sequence[MatrixTask], me: int) -> list[_RankWave]:
    ws = plan.world_size
    out = []
    for wave in plan.waves:
        send: list[list[int]] = [[] for _ in range(ws)]
        recv: list[list[tuple[int, int, Piece]]] = [[] for _ in range(ws)]
        ret_send: list[list[tuple[int, int, Piece]]] = [[] for _ in range(ws)]
        ret_recv: list[list[int]] = [[] for _ in range(ws)]
        mine: list[tuple[int, _BatchSteps]] = []
        mine_jobs: list[list] = []
        for b in wave:
            if b.owner == me:
                steps = _BatchSteps(b.signature, [j.task for j in b.jobs], [], [])
                mine.append((len(mine), steps))
                mine_jobs.append(b.jobs)
            # a rank's own pieces go through the collective too (a self-copy of 1/W of the
            # matrix): then an owner of one row-blocked matrix receives it whole, in place
            for pos, job in enumerate(b.jobs):
                layout = tasks[job.task].layout
                for src, _ in job.sources:
                    if src == me:
                        send[job.owner].append(job.task)
                if me in job.served and layout.pieces[me].numel:
                    ret_recv[job.owner].append(job.task)
                if job.owner == me:
                    bi = len(mine) - 1
                    parts = []
                    for src, piece in job.sources:
                        recv[src].append((bi, pos, piece))
                        parts.append((piece, -2, -1))  # recv index filled below
                    mine[bi][1].parts.append(parts)
                    for g in job.served:
                        piece = layout.pieces[g]
                        if piece.numel:
                            ret_send[g].append((bi, pos, piece))
        # result pieces of the owned matrices, each distinct piece once
        ret_pieces: list[tuple[int, int, list[Piece], bool]] = []
        piece_at: dict[tuple[int, int, int, int], int] = {}
        for bi, steps in mine:
            rows, cols, _ = steps.signature
            for pos, task in enumerate(steps.tasks):
                job = mine_jobs[bi][pos]
                layout = tasks[task].layout
                distinct = sorted(
                    {layout.pieces[g] for g in job.served if layout.pieces[g].numel},
                    key=lambda p: (p.row, p.col),
                )
                tiled = all(p.full_width(cols) for p in distinct) and [p.row for p in distinct] == [
                    sum(q.rows for q in distinct[:k]) for k in range(len(distinct))
                ]
                for p in distinct:
                    piece_at[(bi, pos, p.row, p.col)] = len(piece_at)
                ret_pieces.append((bi, pos, distinct, tiled))
        # received pieces are numbered source-major, the order all_to_all_single lays them out
        index: dict[tuple[int, int, int, int], int] = {}
        recv_sizes = []
        for s in range(ws):
            for bi, pos, piece in recv[s]:
                index[(bi, pos, piece.row, piece.col)] = len(recv_sizes)
                recv_sizes.append(piece.numel)
        # one owned matrix whose pieces arrive (leave) in row order: the receive buffer is the
        # NS batch buffer (the result is the send buffer), no assembly copy
        single = len(mine) == 1 and len(mine[0][1].tasks) == 1
        received = [p for s_ in range(ws) for _, _, p in recv[s_]]
        leaving = [p for d in range(ws) for _, _, p in ret_send[d]]
        direct_in = single and ret_pieces[0][3] and received == ret_pieces[0][2]
        direct_out = single and ret_pieces[0][3] and leaving == ret_pieces[0][2]
        direct_in = (
            direct_in
            and sum(p.numel for p in received)
            == mine[0][1].signature[0] * (mine[0][1].signature[1])
        )
        batches = []
        for bi, steps in mine:
            for pos, parts in enumerate(steps.parts):
                filled = [
                    (p, index[(bi, pos, p.row, p.col)] if r == -2 else r, t) for p, r, t in parts
                ]
                steps.parts[pos] = filled
                steps.full_rows.append(all(p.full_width(steps.signature[1]) for p, _, _ in parts))
            batches.append(steps)
        out.append(
            _RankWave(
                send_tasks=[t for d in range(ws) for t in send[d]],
                send_splits=[
                    sum(tasks[t].layout.pieces[me].numel for t in send[d]) for d in range(ws)
                ],
                recv_sizes=recv_sizes,
                recv_splits=[sum(p.numel for _, _, p in recv[s]) for s in range(ws)],
                batches=batches,
                ret_pieces=ret_pieces,
                ret_send=[
                    piece_at[(b, pos, p.row, p.col)] for d in range(ws) for b, pos, p in ret_send[d]
                ],
                ret_send_splits=[sum(p.numel for _, _, p in ret_send[d]) for d in range(ws)],
                ret_recv=[
                    (t, tasks[t].layout.pieces[me].shape) for s in range(ws) for t in ret_recv[s]
                ],
                ret_recv_splits=[
                    sum(tasks[t].layout.pieces[me].numel for t in ret_recv[s]) for s in range(ws)
                ],
                direct_in=direct_in,
                direct_out=direct_out,
            )
        )
    return out


class OwnerwiseNewtonSchulz:
    """Orthogonalizes a fixed list of matrices across the ranks of their process groups.

    Built once for a list of tasks (the same list, in the same order, on every rank) and called
    every step with this rank's local update tensors. ``owned_log`` records which task indices ran
    NS on this rank in the last call; ``matrices_done`` counts them over the object's life.
    ``owner[i]`` is the group rank that orthogonalizes task i for this rank's replica group.
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
        self._groups: list[tuple[dist.ProcessGroup | None, list[int], list[_RankWave]]] = []
        self.owner: list[int] = [0] * len(self.tasks)
        for ids in by_group.values():
            plan = build_group_plan(
                ids, self.tasks, orthogonalizer.flops, elem, hsdp_mode, wave_bytes
            )
            if not pipeline:  # the same batches, all in one wave
                plan.waves = [[b for w in plan.waves for b in w]] if plan.waves else []
            sub = [self.tasks[i] for i in ids]
            layout = sub[0].layout
            me = layout.rank
            for job in plan.jobs:
                if me in job.served:
                    self.owner[ids[job.task]] = job.owner
            self.plans.append(plan)
            self._groups.append((layout.group, ids, _rank_waves(plan, sub, me)))
        self.owned_log: list[int] = []
        self.matrices_done = 0

    @property
    def hsdp_modes(self) -> list[str]:
        return [p.mode for p in self.plans]

    def __call__(
        self, updates: Sequence[torch.Tensor], overlap: Callable[[], None] | None = None
    ) -> list[torch.Tensor]:
        """Return this rank's piece of NS(u) * scale for every task, in the NS dtype.

        ``overlap`` is called exactly once: while the first gather is in flight, or before NS
        when there is no communication.
        """
        if len(updates) != len(self.tasks):
            raise ValueError(f"expected {len(self.tasks)} updates, got {len(updates)}")
        out: list[torch.Tensor | None] = [None] * len(self.tasks)
        self.owned_log = []
        pending = overlap
        for group, ids, waves in self._groups:
            local = [updates[i] for i in ids]
            results = self._run_group(group, ids, waves, local, pending)
            pending = None
            for i, r in zip(ids, results, strict=True):
                out[i] = r
        if pending is not None:
            pending()
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------------------ one group
    def _run_group(
        self,
        group: dist.ProcessGroup | None,
        ids: list[int],
        waves: list[_RankWave],
        updates: list[torch.Tensor],
        overlap: Callable[[], None] | None,
    ) -> list[torch.Tensor]:
        dtype = self.orth.dtype
        device = updates[0].device
        out: list[torch.Tensor | None] = [None] * len(ids)
        for t, (task_id, u) in enumerate(zip(ids, updates, strict=True)):
            if self.tasks[task_id].layout.local.numel == 0:
                out[t] = torch.empty(tuple(u.shape), dtype=dtype, device=device)
        comm = group is not None

        def a2a(send: torch.Tensor, in_splits: list[int], out_splits: list[int]):
            if not comm:  # one rank: everything it sends is what it receives
                return send, None, send
            recv = torch.empty(sum(out_splits), dtype=dtype, device=device)
            work = None
            if comm:
                work = dist.all_to_all_single(
                    recv, send, out_splits, in_splits, group=group, async_op=True
                )
            return recv, work, send

        def start_gather(w: _RankWave):
            if w.send_tasks:  # one C++ call flattens and concatenates the local pieces
                send = flatten([updates[t] for t in w.send_tasks]).to(dtype)
            else:
                send = torch.empty(0, dtype=dtype, device=device)
            return a2a(send, w.send_splits, w.recv_splits)

        def finish_return(w: _RankWave, handle) -> None:
            recv, work, _ = handle
            if work is not None:
                work.wait()
            if w.ret_recv:
                views = unflatten(recv, [updates[t] for t, _ in w.ret_recv])
                for (t, _), v in zip(w.ret_recv, views, strict=True):
                    out[t] = v

        gathers: list = [None] * len(waves)
        if waves:
            gathers[0] = start_gather(waves[0])
        if overlap is not None:
            overlap()
        previous = None
        for k, w in enumerate(waves):
            if self.pipeline and k + 1 < len(waves):
                gathers[k + 1] = start_gather(waves[k + 1])
            recv, work, _ = gathers[k]
            gathers[k] = None
            if work is not None:
                work.wait()
            views = recv.split(w.recv_sizes) if w.recv_sizes and not w.direct_in else ()
            results = []
            for steps in w.batches:
                if w.direct_in:
                    rows, cols, splits = steps.signature
                    results.append(orthogonalize_batch(recv.view(1, rows, cols), splits, self.orth))
                    self.owned_log.extend(ids[t] for t in steps.tasks)
                    self.matrices_done += len(steps.tasks)
                    continue
                rows, cols, splits = steps.signature
                buf = torch.empty((len(steps.tasks), rows, cols), dtype=dtype, device=device)
                # every piece of every matrix of the batch lands in its place in one foreach copy
                # (views of buf as destinations): a fixed op count per batch, not one per matrix
                dsts: list[torch.Tensor] = []
                srcs: list[torch.Tensor] = []
                for pos, parts in enumerate(steps.parts):
                    pieces = [views[r] if r >= 0 else updates[t].reshape(-1) for _, r, t in parts]
                    if steps.full_rows[pos]:
                        dsts += buf[pos].view(-1).split([x.numel() for x in pieces])
                        srcs += pieces
                    else:
                        for (p, _, _), x in zip(parts, pieces, strict=True):
                            dsts.append(buf[pos, p.row : p.row + p.rows, p.col : p.col + p.cols])
                            srcs.append(x.view(p.rows, p.cols))
                torch._foreach_copy_(dsts, srcs)
                results.append(orthogonalize_batch(buf, splits, self.orth))
                del buf
                self.owned_log.extend(ids[t] for t in steps.tasks)
                self.matrices_done += len(steps.tasks)
            del views, recv
            flat: list[torch.Tensor] = []
            for b, pos, distinct, tiled in [] if w.direct_out else w.ret_pieces:
                mat = results[b][pos]
                if tiled:
                    flat.extend(mat.reshape(-1).split([p.numel for p in distinct]))
                else:
                    flat.extend(
                        mat[p.row : p.row + p.rows, p.col : p.col + p.cols].reshape(-1)
                        for p in distinct
                    )
            if w.direct_out:
                send = results[0].reshape(-1)
            else:
                send = torch.empty(sum(w.ret_send_splits), dtype=dtype, device=device)
                if w.ret_send:
                    torch.cat([flat[i] for i in w.ret_send], out=send)
            del results, flat
            handle = a2a(send, w.ret_send_splits, w.ret_recv_splits)
            if previous is not None:
                finish_return(*previous)
            previous = (w, handle)
            if not self.pipeline and k + 1 < len(waves):
                finish_return(*previous)
                previous = None
        if previous is not None:
            finish_return(*previous)
        return out  # type: ignore[return-value]
