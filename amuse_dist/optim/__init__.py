"""Optimizer math: AMUSE, its Schedule-Free AdamW special case, the Muon baseline, NS5."""

from amuse_dist.optim.amuse import AMUSE, schedule_free_adamw
from amuse_dist.optim.groups import param_groups
from amuse_dist.optim.muon import Muon
from amuse_dist.optim.newton_schulz import newton_schulz5

__all__ = ["AMUSE", "Muon", "newton_schulz5", "param_groups", "schedule_free_adamw"]
