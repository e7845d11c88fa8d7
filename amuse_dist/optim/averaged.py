"""The averaged weights X of a model's optimizers, and evaluating the model at them.

An averaging optimizer (``protocols.AveragingOptimizer``) trains at Y and keeps X out of place.
Validation, amuse-eval and the X export all ask for X the same way (``averaged_weights``) and the
first two evaluate at X by swapping it into the parameters' local shards and back bit for bit
(``weights_swapped``). Pure torch: no collectives, no torchtitan.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule

from amuse_dist.distributed.layout import local_view
from amuse_dist.optim.protocols import averaging


def averaged_weights(optimizers: Any) -> dict[torch.Tensor, torch.Tensor]:
    """{param: X} from every optimizer of a container that averages (AMUSE, SF-AdamW)."""
    out: dict[torch.Tensor, torch.Tensor] = {}
    for opt in averaging(optimizers):
        out.update(opt.x_tensors())
    return out


def reshard(model_parts: list[nn.Module]) -> None:
    for model in model_parts:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


@contextmanager
def weights_swapped(
    model_parts: list[nn.Module], new: dict[torch.Tensor, torch.Tensor]
) -> Iterator[None]:
    """Temporarily load ``new[p]`` into each parameter p (local shards), restoring exactly.

    ``new`` is used as the swap buffer (it holds Y while inside), so the extra memory is one
    parameter at a time.
    """
    reshard(model_parts)
    params = [p for m in model_parts for p in m.parameters() if p in new]
    with torch.no_grad():
        for p in params:
            y, x = local_view(p), local_view(new[p])
            tmp = y.clone()
            y.copy_(x)
            x.copy_(tmp)
    try:
        yield
    finally:
        reshard(model_parts)
        with torch.no_grad():
            for p in params:
                local_view(p).copy_(local_view(new[p]))
