"""What the two world-size-free dataloaders (token shards, global batches) share: the batch type
and how their checkpoint state is keyed and versioned.

Each loader saves one state under ``STATE_KEY``, the same bytes on every rank (torchtitan's own
loader saves one per rank, ``dp_rank_<r>``), so DCP keeps one copy and a resume on another world
size loads it. ``STATE_VERSION`` is written into that state; a loader refuses a state of another
version with a clear error (bump it when either loader's state changes meaning).
"""

from __future__ import annotations

import torch

STATE_KEY = "global"
"""The one state-dict key of a world-size-free loader."""
STATE_VERSION = 1
"""The version of the loaders' saved state."""

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]
"""({"input": tokens [B, S]}, labels [B, S]): what torchtitan's Trainer takes from a loader."""
