"""Optimizer math: AMUSE, its Schedule-Free AdamW special case, the Muon, NorMuon and AdaMuon
baselines, NS5.

The names below load on first use (PEP 562): ``amuse_dist.optim.hparams`` (hyper-parameter
metadata, stdlib only) is read by the torch-free ``amuse_dist.anytime`` without pulling in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "AMUSE": "amuse_dist.optim.amuse",
    "AdaMuon": "amuse_dist.optim.adamuon",
    "NorMuon": "amuse_dist.optim.normuon",
    "schedule_free_adamw": "amuse_dist.optim.amuse",
    "param_groups": "amuse_dist.optim.groups",
    "Muon": "amuse_dist.optim.muon",
    "newton_schulz5": "amuse_dist.optim.newton_schulz",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'amuse_dist.optim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
