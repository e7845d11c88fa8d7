"""Optimizer math: AMUSE, its Schedule-Free AdamW special case, the Muon, NorMuon and AdaMuon
baselines, NS5."""

from amuse_dist.optim.adamuon import AdaMuon
from amuse_dist.optim.amuse import AMUSE, schedule_free_adamw
from amuse_dist.optim.groups import param_groups
from amuse_dist.optim.muon import Muon
from amuse_dist.optim.newton_schulz import newton_schulz5
from amuse_dist.optim.normuon import NorMuon

__all__ = [
    "AMUSE",
    "AdaMuon",
    "Muon",
    "NorMuon",
    "newton_schulz5",
    "param_groups",
    "schedule_free_adamw",
]
