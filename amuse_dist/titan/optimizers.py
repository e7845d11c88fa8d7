"""The train spec's ``build_optimizers``: any optimizer of ``amuse_dist.optim.registry``.

AMUSE/Muon need their own param groups (Muon branch vs AdamW branch), which torchtitan's
OptimizersContainer cannot express (it passes a flat param list). The subclass below keeps
everything else of the container (flattened get/set_optimizer_state_dict for checkpoints,
hooks, one optimizer per model part) so DCP checkpoints and LR schedulers keep working.
Optimizers registered without a builder (AdamW, Adam) get torchtitan's own container.
"""

from collections.abc import Callable
from typing import Any

import torch.nn as nn
from torch.optim import Optimizer
from torchtitan.components.ft import FTManager
from torchtitan.components.optimizer import OptimizersContainer, build_optimizers
from torchtitan.distributed import ParallelDims

from amuse_dist.optim import registry

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


def make_build_optimizers(cfg_getter: Callable[[], Any]) -> Callable[..., OptimizersContainer]:
    """The train spec's builder; ``cfg_getter`` returns the full job config (torchtitan passes
    only the ``[optimizer]`` section, but an optimizer reads its own section too). The config was
    checked before launch (``amuse_dist.titan.config``): nothing is refused here."""

    def build(
        model_parts: list[nn.Module],
        optimizer_config: Any,
        parallel_dims: ParallelDims,
        ft_manager: FTManager | None = None,
    ) -> OptimizersContainer:
        spec = registry.get(optimizer_config.name)
        if spec.build is None:
            return build_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager)
        hp = getattr(cfg_getter(), spec.section) if spec.section else None
        lr = optimizer_config.lr
        builder = spec.build
        return GroupedOptimizersContainer(model_parts, lambda m: builder(m, lr, hp), {"lr": lr})

    return build
