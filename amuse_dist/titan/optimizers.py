"""``build_optimizers`` for the train spec: AMUSE, AdamW (torch), Muon, ScheduleFreeAdamW.

AMUSE/Muon need their own param groups (Muon branch vs AdamW branch), which torchtitan's
OptimizersContainer cannot express (it passes a flat param list). The subclass below keeps
everything else of the container (flattened get/set_optimizer_state_dict for checkpoints,
hooks, one optimizer per model part) so DCP checkpoints and LR schedulers keep working.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import torch.nn as nn
from torch.optim import Optimizer
from torchtitan.components.ft import FTManager
from torchtitan.components.optimizer import OptimizersContainer, build_optimizers
from torchtitan.distributed import ParallelDims

from amuse_dist.optim import AMUSE, Muon, param_groups, schedule_free_adamw

OptimizerFactory = Callable[[nn.Module], Optimizer]


class GroupedOptimizersContainer(OptimizersContainer):
    """OptimizersContainer whose optimizers are built per model part by ``factory``."""

    def __init__(
        self, model_parts: list[nn.Module], factory: OptimizerFactory, defaults: dict[str, Any]
    ) -> None:
        self.model_parts = model_parts
        self.optimizers = [factory(m) for m in model_parts]
        all_params = [p for m in model_parts for p in m.parameters() if p.requires_grad]
        self._validate_length(len(model_parts))
        self._post_init(all_params, defaults)


def _factory(name: str, cfg: Any) -> OptimizerFactory:
    """A builder of one model part's optimizer from the job config."""
    o = cfg.optimizer
    if name == "AMUSE":
        # [amuse] holds exactly AMUSE's keyword arguments (lr comes from [optimizer])
        amuse_kwargs = dataclasses.asdict(cfg.amuse)
        return lambda m: AMUSE(param_groups(m), lr=o.lr, **amuse_kwargs)
    if name == "Muon":
        mu = cfg.muon
        return lambda m: Muon(
            param_groups(m),
            lr=o.lr,
            momentum=mu.momentum,
            nesterov=mu.nesterov,
            weight_decay=o.weight_decay,
            adamw_betas=(mu.adamw_beta1, mu.adamw_beta2),
            adamw_eps=mu.adamw_eps,
            ns_steps=mu.ns_steps,
        )
    if name == "ScheduleFreeAdamW":
        return lambda m: schedule_free_adamw(
            [p for p in m.parameters() if p.requires_grad],
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            weight_decay=o.weight_decay,
            warmup_steps=cfg.amuse.warmup_steps,
            eps=o.eps,
        )
    raise ValueError(
        f'[optimizer] name = "{name}": expected one of AMUSE, AdamW, Muon, ScheduleFreeAdamW'
    )


def make_build_optimizers(cfg_getter: Callable[[], Any]) -> Callable[..., OptimizersContainer]:
    """The train spec's builder; ``cfg_getter`` returns the full job config (torchtitan passes
    only the ``[optimizer]`` section, but AMUSE reads ``[amuse]`` and ``[muon]`` too)."""

    def build(
        model_parts: list[nn.Module],
        optimizer_config: Any,
        parallel_dims: ParallelDims,
        ft_manager: FTManager | None = None,
    ) -> OptimizersContainer:
        name = optimizer_config.name
        if name in ("AdamW", "Adam"):
            return build_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager)
        if optimizer_config.early_step_in_backward:
            raise ValueError(f"[optimizer] early_step_in_backward = true: not supported by {name}")
        if ft_manager is not None and ft_manager.enabled:
            raise ValueError(f"[fault_tolerance] enable = true: not supported by {name}")
        cfg = cfg_getter()
        return GroupedOptimizersContainer(
            model_parts, _factory(name, cfg), {"lr": optimizer_config.lr}
        )

    return build
