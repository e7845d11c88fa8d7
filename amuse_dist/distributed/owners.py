"""Owner assignment: which rank runs Newton-Schulz for which matrix.

Longest-processing-time-first (LPT) greedy on NS FLOPs: sort matrices by cost (largest first) and
give each to the currently least-loaded rank. Deterministic (ties break on index, then rank), so every
rank computes the same assignment without communication.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Return ``owner[i]`` in ``[0, world_size)`` for each matrix cost, balanced by LPT."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    owners = [0] * len(costs)
    if world_size == 1:
        return owners
    heap = [(0.0, r) for r in range(world_size)]
    order = sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i))
    for i in order:
        load, rank = heapq.heappop(heap)
        owners[i] = rank
        heapq.heappush(heap, (load + float(costs[i]), rank))
    return owners


def round_robin_owners(n: int, world_size: int) -> list[int]:
    """The naive assignment (matrix i -> rank i mod world_size), kept for comparison."""
    return [i % world_size for i in range(n)]


def load_per_rank(costs: Sequence[float], owners: Sequence[int], world_size: int) -> list[float]:
    """Total cost each rank carries under ``owners``."""
    loads = [0.0] * world_size
    for cost, owner in zip(costs, owners, strict=True):
        loads[owner] += float(cost)
    return loads


def imbalance(costs: Sequence[float], owners: Sequence[int], world_size: int) -> float:
    """max/mean load over ranks (1.0 is perfect balance)."""
    loads = load_per_rank(costs, owners, world_size)
    mean = sum(loads) / world_size
    return max(loads) / mean if mean > 0 else 1.0
