"""A toy averaging optimizer registered from outside the package (loaded with
``--experimental.custom_import tests.toy_optimizer``): proves that adding an optimizer needs its
own module and one registry line, and no edit of amuse_dist/titan."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from amuse_dist.optim import registry
from amuse_dist.optim.hparams import hparam


@dataclass
class ToyHParams:
    c: float = hparam(0.5, lo=0, hi=1, lo_open=True)
    """Weight of the new Y in the running average X, in (0, 1]."""


class ToyAveraging(Optimizer):
    """SGD on Y; X is an exponential average of Y, kept in the state (so it is checkpointed)."""

    def __init__(self, params: Any, lr: float = 0.01, c: float = 0.5) -> None:
        super().__init__(params, dict(lr=lr, c=c))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "x" not in state:
                    state["x"] = p.detach().clone()
                if group["lr"] == 0.0:  # torch's DCP state initialisation: change nothing
                    continue
                p.add_(p.grad, alpha=-group["lr"])
                state["x"].lerp_(p.detach(), group["c"])

    def x_tensors(self) -> dict[torch.Tensor, torch.Tensor]:
        return {
            p: (self.state[p]["x"] if "x" in self.state.get(p, {}) else p.detach()).clone()
            for g in self.param_groups
            for p in g["params"]
        }

    def beta(self) -> float:
        return 1.0

    def scalars(self) -> dict[str, float]:
        return {"c": float(self.param_groups[0]["c"])}

    def update_rms(self) -> dict[str, float]:
        return {}


def _build(model: nn.Module, lr: float, hp: ToyHParams) -> Optimizer:
    return ToyAveraging([p for p in model.parameters() if p.requires_grad], lr=lr, **asdict(hp))


SPEC = registry.register(
    registry.OptimizerSpec(
        "ToyAveraging",
        _build,
        ToyHParams,
        "toy_avg",
        averaging=True,
        state_keys=(frozenset({"x"}),),
    )
)
