"""Owner-wise Newton-Schulz: each matrix is orthogonalized exactly once, on one owner rank.

Per step and process group, two ``all_to_all_single`` calls move the data:

1. gather: every rank sends its shard of matrix i (in the NS dtype, bf16 by default) to owner(i);
   the owner concatenates the shards along the shard dimension into the full matrix.
2. return: the owner runs NS5 on all its matrices (batched by shape), scales them, and sends each
   rank its shard of the result.

Replicated matrices (every rank holds the full update, as under DDP) skip the gather; the owner
sends the full result to every rank. Uneven and empty shards need no padding: split sizes are
computed from the global shape with torch.chunk semantics, identically on every rank.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from amuse_dist.distributed.layout import Layout, chunk_sizes
from amuse_dist.distributed.owners import assign_owners
from amuse_dist.optim.newton_schulz import muon_scale, newton_schulz5, ns_flops


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
    def cost(self) -> int:
        return sum(ns_flops(r, c) for r, c in self.blocks())


def orthogonalize_full(
    mats: Sequence[torch.Tensor],
    splits: Sequence[tuple[int, ...]],
    ns_steps: int,
    ns_dtype: torch.dtype,
) -> list[torch.Tensor]:
    """NS5(u) * 0.2 * sqrt(max(rows, cols)) for whole matrices, same-shape blocks batched.

    Returns tensors in ``ns_dtype``. This is the only place NS5 runs, on one process or an owner.
    """
    pieces: list[list[torch.Tensor]] = []
    by_shape: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for i, (mat, split) in enumerate(zip(mats, splits, strict=True)):
        blocks = list(mat.split(list(split))) if split else [mat]
        pieces.append(blocks)
        for j, block in enumerate(blocks):
            by_shape[tuple(block.shape)].append((i, j))
    out: list[list[torch.Tensor | None]] = [[None] * len(p) for p in pieces]
    for (rows, cols), members in by_shape.items():
        batch = torch.stack([pieces[i][j] for i, j in members])
        result = newton_schulz5(batch, ns_steps, ns_dtype, scale=muon_scale(rows, cols))
        for k, (i, j) in enumerate(members):
            out[i][j] = result[k]
    return [blocks[0] if len(blocks) == 1 else torch.cat(blocks) for blocks in out]  # type: ignore[arg-type]


def _all_to_all(
    send: list[list[torch.Tensor]],
    recv_shapes: list[list[tuple[int, ...]]],
    dtype: torch.dtype,
    device: torch.device,
    group: dist.ProcessGroup,
) -> list[list[torch.Tensor]]:
    """Send ``send[d]`` to rank d; receive tensors of ``recv_shapes[s]`` from rank s."""
    in_splits = [sum(t.numel() for t in ts) for ts in send]
    out_splits = [sum(math.prod(s) for s in shapes) for shapes in recv_shapes]
    flat = [t.reshape(-1).to(dtype) for ts in send for t in ts]
    send_buf = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
    recv_buf = torch.empty(sum(out_splits), dtype=dtype, device=device)
    dist.all_to_all_single(recv_buf, send_buf, out_splits, in_splits, group=group)
    received: list[list[torch.Tensor]] = []
    for chunk, shapes in zip(recv_buf.split(out_splits), recv_shapes, strict=True):
        sizes = [math.prod(s) for s in shapes]
        received.append([p.view(s) for p, s in zip(chunk.split(sizes), shapes, strict=True)])
    return received


class OwnerwiseNewtonSchulz:
    """Orthogonalizes a fixed list of matrices across the ranks of their process group.

    Built once for a list of tasks (the same list, in the same order, on every rank) and called
    every step with this rank's local update tensors. ``owned_log`` records which task indices ran
    NS5 on this rank in the last call; ``matrices_done`` counts them over the object's life.
    """

    def __init__(self, tasks: Sequence[MatrixTask], ns_steps: int, ns_dtype: torch.dtype):
        self.tasks = list(tasks)
        self.ns_steps = ns_steps
        self.ns_dtype = ns_dtype
        groups: dict[int, list[int]] = defaultdict(list)
        for i, task in enumerate(self.tasks):
            if len(task.layout.shape) != 2:
                raise ValueError(f"Muon matrix {i} has shape {task.layout.shape}, expected 2-D")
            groups[id(task.layout.group)].append(i)
        self._groups = list(groups.values())
        self.owner: list[int] = [0] * len(self.tasks)
        for members in self._groups:
            ws = self.tasks[members[0]].layout.world_size
            owners = assign_owners([self.tasks[i].cost for i in members], ws)
            for i, o in zip(members, owners, strict=True):
                self.owner[i] = o
        self.owned_log: list[int] = []
        self.matrices_done = 0

    def __call__(
        self, updates: Sequence[torch.Tensor], overlap: Callable[[], None] | None = None
    ) -> list[torch.Tensor]:
        """Return this rank's piece of NS5(u) * scale for every task, in ``ns_dtype``.

        ``overlap`` is called once, while the exchange is in flight (other work hides there).
        """
        if len(updates) != len(self.tasks):
            raise ValueError(f"expected {len(self.tasks)} updates, got {len(updates)}")
        if overlap is not None:
            overlap()
        out: list[torch.Tensor | None] = [None] * len(self.tasks)
        self.owned_log = []
        for members in self._groups:
            layout = self.tasks[members[0]].layout
            if layout.group is None or layout.world_size == 1:
                results = self._run(members, [updates[i] for i in members])
            else:
                results = self._exchange(members, updates, layout)
            for i, r in zip(members, results, strict=True):
                out[i] = r
        return out  # type: ignore[return-value]

    def _run(self, idx: list[int], mats: list[torch.Tensor]) -> list[torch.Tensor]:
        self.owned_log.extend(idx)
        self.matrices_done += len(idx)
        if not idx:
            return []
        splits = [self.tasks[i].splits for i in idx]
        return orthogonalize_full(mats, splits, self.ns_steps, self.ns_dtype)

    def _exchange(
        self, members: list[int], updates: Sequence[torch.Tensor], layout: Layout
    ) -> list[torch.Tensor]:
        ws, rank, group = layout.world_size, layout.rank, layout.group
        assert group is not None
        device = updates[members[0]].device
        dtype = self.ns_dtype
        owned = [i for i in members if self.owner[i] == rank]
        sharded = {i for i in members if self.tasks[i].layout.shard_dim is not None}

        # 1. gather shards of every sharded matrix to its owner
        send = [
            [updates[i] for i in members if self.owner[i] == d and i in sharded] for d in range(ws)
        ]
        recv_shapes = [
            [self.tasks[i].layout.piece_shape(s) for i in owned if i in sharded] for s in range(ws)
        ]
        got = _all_to_all(send, recv_shapes, dtype, device, group)
        full: list[torch.Tensor] = []
        cursor = [0] * ws
        for i in owned:
            if i in sharded:
                parts = []
                for s in range(ws):
                    parts.append(got[s][cursor[s]])
                    cursor[s] += 1
                full.append(torch.cat(parts, dim=self.tasks[i].layout.shard_dim))
            else:
                full.append(updates[i].to(dtype))

        # 2. orthogonalize owned matrices once, here
        results = dict(zip(owned, self._run(owned, full), strict=True))

        # 3. send every rank its piece of each result
        send = []
        for d in range(ws):
            pieces = []
            for i in owned:
                task_layout = self.tasks[i].layout
                if task_layout.shard_dim is None:
                    pieces.append(results[i])
                else:
                    sizes = chunk_sizes(task_layout.shape[task_layout.shard_dim], ws)
                    pieces.append(
                        results[i].narrow(task_layout.shard_dim, sum(sizes[:d]), sizes[d])
                    )
            send.append(pieces)
        recv_shapes = [
            [self.tasks[i].layout.piece_shape(rank) for i in members if self.owner[i] == s]
            for s in range(ws)
        ]
        got = _all_to_all(send, recv_shapes, dtype, device, group)
        back: dict[int, torch.Tensor] = {}
        for s in range(ws):
            for i, t in zip([i for i in members if self.owner[i] == s], got[s], strict=True):
                back[i] = t
        return [back[i] for i in members]
