"""Sums over the pieces of a matrix: what a per-matrix normalization after the return needs.

The owner-wise exchange hands each rank its piece of the orthogonalized matrix. A normalization
that needs whole-matrix numbers (a Frobenius norm, a row's sum across column pieces) sums each
rank's piece locally and completes the sums with ``sum_over_ranks``: one all-reduce per process
group for all matrices of a step. ``Geometry`` says where this rank's piece sits and how many
ranks hold the same piece or the same rows (so replicated pieces count once). Nothing here knows
the optimizer's math (``amuse_dist.optim.directions`` uses it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from amuse_dist.distributed.plan import MatrixTask


@dataclass(frozen=True)
class Geometry:
    """Where this rank's piece of one matrix sits, as the normalization needs it."""

    group: dist.ProcessGroup | None  # None: nothing to reduce (one process, or one rank)
    group_key: tuple[int, ...]
    row0: int  # global index of the piece's first row
    rows: int  # rows of the piece
    cols: int  # columns of the global matrix
    full_width: bool  # the piece spans every column: its row sums are complete
    copies: int  # ranks of the group holding this same piece (replicas)
    row_copies: int  # ranks of the group holding these same rows (replicas, TP column pieces)
    blocks: tuple[tuple[int, int], ...]  # (global first row, rows) of each NS block

    @classmethod
    def of(cls, task: MatrixTask) -> Geometry:
        layout = task.layout
        me = layout.local
        copies = sum(1 for p in layout.pieces if p == me)
        same_rows = sum(1 for p in layout.pieces if (p.row, p.rows) == (me.row, me.rows))
        rows, cols = layout.shape
        starts = [0]
        for n in task.splits:
            starts.append(starts[-1] + n)
        blocks = tuple(zip(starts, task.splits, strict=False)) if task.splits else ((0, rows),)
        return cls(
            group=layout.group,
            group_key=layout.group_key,
            row0=me.row,
            rows=me.rows,
            cols=cols,
            full_width=me.full_width(cols),
            copies=copies,
            row_copies=same_rows,
            blocks=blocks,
        )

    def local_blocks(self) -> list[tuple[int, slice]]:
        """(block rows, local row slice) for each block this piece holds rows of."""
        out = []
        for start, n in self.blocks:
            lo, hi = max(self.row0, start), min(self.row0 + self.rows, start + n)
            if hi > lo:
                out.append((n, slice(lo - self.row0, hi - self.row0)))
            else:
                out.append((n, slice(0, 0)))
        return out


def sum_over_ranks(geoms: Sequence[Geometry], values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Sum each ``values[i]`` over the ranks of ``geoms[i].group``: one all-reduce per group.

    Values of the same group are packed into one flat float64 buffer (the per-matrix scalars of
    a step travel together); single-process values come back as they are.
    """
    out = list(values)
    by_group: dict[tuple[int, ...], list[int]] = {}
    for i, g in enumerate(geoms):
        if g.group is not None:
            by_group.setdefault(g.group_key, []).append(i)
    for ids in by_group.values():
        flat = torch.cat([values[i].reshape(-1).to(torch.float64) for i in ids])
        dist.all_reduce(flat, group=geoms[ids[0]].group)
        start = 0
        for i in ids:
            n = values[i].numel()
            out[i] = flat[start : start + n].view(values[i].shape)
            start += n
    return out
