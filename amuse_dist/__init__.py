"""amuse_dist: a distributed (FSDP2/DTensor) AMUSE optimizer for torchtitan.

The optimizer names are loaded on first use (PEP 562), so ``import amuse_dist.data`` and
``import amuse_dist.anytime`` do not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["AMUSE", "AdaMuon", "Muon", "NorMuon", "param_groups", "schedule_free_adamw"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("amuse_dist.optim"), name)
    raise AttributeError(f"module 'amuse_dist' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
