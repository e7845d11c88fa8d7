"""How a parameter is laid out across ranks: where each rank's piece sits in the global matrix.

One description covers every layout the optimizer accepts: a ``Layout`` lists, for every rank of
the exchange group (all ranks of the parameter's device mesh, flattened), the rectangle of the
global matrix that rank holds (global offset and local shape, from torch's own DTensor rule for
Shard, _StridedShard and Replicate), and the replica group of that rank (ranks that together hold
one full copy). That is enough for 1-D FSDP (Shard(0)), HSDP (Replicate, Shard(0)), TP
(Shard(0)/Shard(1) on a tp dim), FSDP+TP (_StridedShard(0) + Shard(0), or Shard(0) + Shard(1)),
DTensor Replicate() and plain tensors replicated over a process group (DDP).

Refused with an error naming the parameter: Partial placements and any layout whose pieces are not
rectangles that tile the matrix (for example a _StridedShard that interleaves rows).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import _get_shard_size_and_offsets
from torch.distributed.tensor.placement_types import Placement, _StridedShard


@dataclass(frozen=True)
class Piece:
    """A rectangle of the global matrix: rows [row, row + rows) x columns [col, col + cols)."""

    row: int
    col: int
    rows: int
    cols: int

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    def full_width(self, cols: int) -> bool:
        return self.col == 0 and self.cols == cols


@dataclass(frozen=True)
class Layout:
    """Where the pieces of one global 2-D matrix live.

    ``pieces[g]`` is the piece held by rank g of ``group`` (group ranks, not global ranks);
    ``replica[g]`` numbers the replica group of rank g: ranks with the same number together hold
    one full copy (one group for FSDP and TP, R groups for HSDP, one per rank for DDP).
    ``kind`` names the layout for messages and docs.
    """

    shape: tuple[int, ...]
    group: dist.ProcessGroup | None  # None: single process, no communication
    rank: int
    pieces: tuple[Piece, ...]
    replica: tuple[int, ...]
    kind: str
    group_key: tuple[int, ...] = ()  # global ranks of the group, in group order

    @property
    def world_size(self) -> int:
        return len(self.pieces)

    @property
    def local(self) -> Piece:
        return self.pieces[self.rank]

    @property
    def hsdp(self) -> bool:
        """Several replica groups, each holding the matrix in more than one piece."""
        n_rep = len(set(self.replica))
        return 1 < n_rep < self.world_size


def chunk_sizes(n: int, world_size: int) -> list[int]:
    """Sizes of ``torch.chunk(range(n), world_size)`` padded with zeros to ``world_size`` entries."""
    chunk = -(-n // world_size) if n else 0
    return [max(0, min(chunk, n - r * chunk)) for r in range(world_size)]


def _refuse(name: str, why: str) -> ValueError:
    return ValueError(f"parameter {name!r}: {why}")


def _dim_indices(
    size: int, mesh_shape: tuple[int, ...], coord: tuple[int, ...], placements, dim: int
) -> torch.Tensor:
    """Global indices along tensor dim ``dim`` held at mesh ``coord`` (torch's own rule)."""
    local, offsets = size, None
    for mesh_dim, placement in enumerate(placements):
        if not isinstance(placement, (Shard, _StridedShard)) or placement.dim != dim:
            continue
        local, offsets = _get_shard_size_and_offsets(
            local, mesh_shape[mesh_dim], coord[mesh_dim], placement, offsets, size, False
        )
        if local == 0:
            return torch.empty(0, dtype=torch.long)
    return torch.arange(size) if offsets is None else offsets[:local]


@functools.lru_cache(maxsize=256)
def mesh_pieces(
    shape: tuple[int, int],
    mesh_shape: tuple[int, ...],
    placements: tuple[Placement, ...],
    name: str,
) -> tuple[Piece, ...]:
    """Piece at every mesh coordinate (row-major order of the mesh) for a 2-D DTensor layout.

    Raises ValueError naming ``name`` when a piece is not a contiguous rectangle.
    """
    for p in placements:
        if not isinstance(p, (Shard, _StridedShard, Replicate)):
            raise _refuse(
                name,
                f"placement {p} in {placements} cannot be mapped to pieces of the global matrix "
                "(AMUSE's Newton-Schulz needs Shard, _StridedShard or Replicate; a Partial "
                "tensor must be reduced before the optimizer step)",
            )
        if isinstance(p, (Shard, _StridedShard)) and p.dim not in (0, 1):
            raise _refuse(name, f"placement {p} shards dim {p.dim} of a 2-D matrix")
    pieces = []
    per_dim: dict[tuple[int, tuple[int, ...]], tuple[int, int]] = {}
    for flat in range(math.prod(mesh_shape)):
        coord, rest = [], flat
        for n in reversed(mesh_shape):
            coord.append(rest % n)
            rest //= n
        coord_t = tuple(reversed(coord))
        span = []
        for dim in (0, 1):
            used = tuple(
                coord_t[m]
                for m, p in enumerate(placements)
                if isinstance(p, (Shard, _StridedShard)) and p.dim == dim
            )
            key = (dim, used)
            if key not in per_dim:
                idx = _dim_indices(shape[dim], mesh_shape, coord_t, placements, dim)
                n = int(idx.numel())
                start = int(idx[0]) if n else 0
                if n and not torch.equal(idx, torch.arange(start, start + n)):
                    raise _refuse(
                        name,
                        f"placements {placements} on mesh {mesh_shape} give mesh coordinate "
                        f"{coord_t} non-contiguous indices along dim {dim}; the owner-wise "
                        "exchange needs every piece to be a rectangle of the global matrix",
                    )
                per_dim[key] = (start, n)
            span.append(per_dim[key])
        (r0, h), (c0, w) = span
        pieces.append(Piece(r0, c0, h, w))
    return tuple(pieces)


def _replica_ids(mesh_shape: tuple[int, ...], placements) -> list[int]:
    """Replica number of every mesh coordinate (row-major): its coordinate on Replicate dims."""
    rep_dims = [m for m, p in enumerate(placements) if isinstance(p, Replicate)]
    out = []
    for flat in range(math.prod(mesh_shape)):
        coord, rest = [], flat
        for n in reversed(mesh_shape):
            coord.append(rest % n)
            rest //= n
        coord.reverse()
        rep = 0
        for m in rep_dims:
            rep = rep * mesh_shape[m] + coord[m]
        out.append(rep)
    return out


def mesh_layout(
    shape: tuple[int, int], mesh_shape: tuple[int, ...], placements, name: str = "matrix"
) -> Layout:
    """The layout a DTensor with ``placements`` on a mesh of ``mesh_shape`` would have, seen
    from mesh rank 0, without a process group: for plans and cost models at any scale."""
    pieces = mesh_pieces(tuple(shape), tuple(mesh_shape), tuple(placements), name)
    replica = _replica_ids(tuple(mesh_shape), placements)
    return Layout(tuple(shape), None, 0, pieces, tuple(replica), "model")


def _mesh_kind(mesh_shape, placements, names) -> str:
    kinds = []
    for size, p, n in zip(mesh_shape, placements, names, strict=True):
        if size == 1:
            continue
        if isinstance(p, Replicate):
            kinds.append("replicate")
        elif n and "tp" in n:
            kinds.append("tp")
        else:
            kinds.append("shard")
    return "+".join(kinds) or "single"


_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


def mesh_group(mesh, name: str) -> tuple[dist.ProcessGroup, tuple[int, ...]]:
    """A process group over every rank of ``mesh`` and the global ranks in group-rank order."""
    ranks = tuple(int(r) for r in mesh.mesh.flatten().tolist())
    if mesh.ndim == 1:
        group = mesh.get_group(0)
    elif sorted(ranks) == list(range(dist.get_world_size())):
        group = dist.group.WORLD
    elif tuple(sorted(ranks)) in _GROUPS:
        group = _GROUPS[tuple(sorted(ranks))]
    else:  # a sub-mesh of a bigger world: flatten it (a collective over the world, once)
        group = mesh._flatten().get_group()
    _GROUPS.setdefault(tuple(sorted(ranks)), group)
    order = tuple(dist.get_global_rank(group, g) for g in range(dist.get_world_size(group)))
    if sorted(order) != sorted(ranks):
        raise _refuse(name, f"could not build a process group over mesh ranks {ranks}")
    return group, order


def layout_of(
    param: torch.Tensor, name: str, replicated_group: dist.ProcessGroup | None = None
) -> Layout:
    """Describe ``param``'s layout; raise ValueError naming it for layouts that cannot be mapped."""
    shape = tuple(param.shape)
    if len(shape) != 2:
        raise _refuse(name, f"shape {shape}: the Muon branch takes 2-D matrices only")
    whole = Piece(0, 0, shape[0], shape[1])
    if not isinstance(param, DTensor):
        if replicated_group is None or dist.get_world_size(replicated_group) == 1:
            return Layout(shape, None, 0, (whole,), (0,), "single")
        ws = dist.get_world_size(replicated_group)
        key = tuple(dist.get_global_rank(replicated_group, g) for g in range(ws))
        return Layout(
            shape,
            replicated_group,
            dist.get_rank(replicated_group),
            (whole,) * ws,
            tuple(range(ws)),
            "replicated",
            key,
        )
    mesh = param.device_mesh
    placements = tuple(param.placements)
    mesh_shape = tuple(mesh.shape)
    pieces_by_coord = mesh_pieces(shape, mesh_shape, placements, name)  # type: ignore[arg-type]
    coord = mesh.get_coordinate()
    assert coord is not None, f"rank {dist.get_rank()} is not in the mesh of {name!r}"
    flat_index = 0
    for c, n in zip(coord, mesh_shape, strict=True):
        flat_index = flat_index * n + c
    mine = pieces_by_coord[flat_index]
    local = tuple(param.to_local().shape)
    if local != mine.shape:
        raise _refuse(
            name,
            f"local shard shape {local} at mesh coordinate {tuple(coord)} is not the piece "
            f"{mine.shape} that placements {placements} give for global shape {shape}",
        )
    if sum(p.numel for p in set(pieces_by_coord)) != shape[0] * shape[1]:
        raise _refuse(name, f"placements {placements} do not tile the matrix into pieces")
    names = mesh.mesh_dim_names or (None,) * mesh.ndim
    kind = _mesh_kind(mesh_shape, placements, names)
    if math.prod(mesh_shape) == 1:
        return Layout(shape, None, 0, (whole,), (0,), "single")
    group, order = mesh_group(mesh, name)
    flat_of_rank = {int(r): i for i, r in enumerate(mesh.mesh.flatten().tolist())}
    replica_of = _replica_ids(mesh_shape, placements)
    pieces = [pieces_by_coord[flat_of_rank[r]] for r in order]
    replica = [replica_of[flat_of_rank[r]] for r in order]
    return Layout(
        shape,
        group,
        dist.get_rank(group),
        tuple(pieces),
        tuple(replica),
        kind,
        order,
    )


def local_view(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor behind ``t`` (a DTensor's shard, or ``t`` itself)."""
    return t.to_local() if isinstance(t, DTensor) else t


def replication(t: torch.Tensor) -> int:
    """How many ranks of ``t``'s mesh hold each of its elements (product of Replicate dims).

    Divide a sum over ranks of local values by this to count each element once (HSDP: R; FSDP,
    TP, FSDP+TP: 1). Plain tensors: 1 (the caller knows its replicated group).
    """
    if not isinstance(t, DTensor):
        return 1
    mesh_shape = tuple(t.device_mesh.shape)
    pairs = zip(mesh_shape, t.placements, strict=True)
    return math.prod(n for n, p in pairs if isinstance(p, Replicate))
