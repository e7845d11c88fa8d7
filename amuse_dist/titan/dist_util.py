"""Rank and barrier that also work without a process group (one process: rank 0, no wait), for
the code that runs both under torchrun and in a plain process (checkpoints, exports, amuse-eval
on one rank, tests)."""

from __future__ import annotations

import torch.distributed as dist


def rank() -> int:
    """This process's global rank; 0 without a process group."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank; nothing without a process group."""
    if dist.is_initialized():
        dist.barrier()
