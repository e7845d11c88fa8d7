"""amuse_dist: a distributed (FSDP2/DTensor) AMUSE optimizer for torchtitan."""

from amuse_dist.optim import AMUSE, Muon, param_groups, schedule_free_adamw

__all__ = ["AMUSE", "Muon", "param_groups", "schedule_free_adamw"]
__version__ = "0.1.0"
