"""How a parameter is laid out across ranks, as far as owner-wise Newton-Schulz cares.

Supported: plain tensors (one process, or replicated on every rank of a group as under DDP),
and DTensors on a 1-D mesh that are either Replicate() or Shard(d) (FSDP2's layout, uneven and
empty shards included). Anything else (tensor parallel, HSDP 2-D meshes, partial or strided
placements) is refused with an error naming the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard


@dataclass(frozen=True)
class Layout:
    """Where the pieces of one global matrix live."""

    shape: tuple[int, ...]
    shard_dim: int | None  # None: every rank of the group holds the whole tensor
    group: dist.ProcessGroup | None  # None: single process, no communication
    world_size: int
    rank: int

    def piece_size(self, rank: int) -> int:
        """Length along ``shard_dim`` of ``rank``'s piece (torch.chunk semantics, as FSDP2 uses)."""
        assert self.shard_dim is not None
        return chunk_sizes(self.shape[self.shard_dim], self.world_size)[rank]

    def piece_shape(self, rank: int) -> tuple[int, ...]:
        if self.shard_dim is None:
            return self.shape
        shape = list(self.shape)
        shape[self.shard_dim] = self.piece_size(rank)
        return tuple(shape)


def chunk_sizes(n: int, world_size: int) -> list[int]:
    """Sizes of ``torch.chunk(range(n), world_size)`` padded with zeros to ``world_size`` entries."""
    chunk = -(-n // world_size) if n else 0
    return [max(0, min(chunk, n - r * chunk)) for r in range(world_size)]


def layout_of(
    param: torch.Tensor, name: str, replicated_group: dist.ProcessGroup | None = None
) -> Layout:
    """Describe ``param``'s layout; raise ValueError for layouts the optimizer cannot handle."""
    if not isinstance(param, DTensor):
        if replicated_group is None:
            return Layout(tuple(param.shape), None, None, 1, 0)
        ws = dist.get_world_size(replicated_group)
        return Layout(
            tuple(param.shape), None, replicated_group, ws, dist.get_rank(replicated_group)
        )
    mesh = param.device_mesh
    names = mesh.mesh_dim_names or ()
    if mesh.ndim != 1:
        if any(n and "tp" in n for n in names):
            raise ValueError(
                f"parameter {name!r}: tensor parallelism (mesh dims {names}, placements "
                f"{param.placements}) is not supported by AMUSE's owner-wise Newton-Schulz yet; "
                "use FSDP (data_parallel_shard_degree) without TP"
            )
        raise ValueError(
            f"parameter {name!r}: a {mesh.ndim}-D device mesh {names or ''} with placements "
            f"{param.placements} (HSDP or another multi-dimensional layout) is not supported; "
            "use 1-D FSDP (data_parallel_replicate_degree = 1)"
        )
    if names and any(n and "tp" in n for n in names):
        raise ValueError(
            f"parameter {name!r}: tensor parallelism (mesh dim {names[0]!r}) is not supported by "
            "AMUSE's owner-wise Newton-Schulz yet; use FSDP without TP"
        )
    (placement,) = param.placements
    group = mesh.get_group(0)
    ws, rank = mesh.size(0), mesh.get_local_rank(0)
    if type(placement) is Replicate:
        return Layout(tuple(param.shape), None, group if ws > 1 else None, ws, rank)
    if type(placement) is Shard:
        layout = Layout(tuple(param.shape), placement.dim, group, ws, rank)
        local = tuple(param.to_local().shape)
        if local != layout.piece_shape(rank):
            raise ValueError(
                f"parameter {name!r}: local shard shape {local} on rank {rank} is not the "
                f"torch.chunk layout {layout.piece_shape(rank)} of global shape {param.shape}"
            )
        return layout
    raise ValueError(
        f"parameter {name!r}: placement {placement} is not supported (expected Shard(d) or "
        "Replicate() on a 1-D mesh)"
    )


def local_view(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor behind ``t`` (a DTensor's shard, or ``t`` itself)."""
    return t.to_local() if isinstance(t, DTensor) else t
