"""What the trainer, the metrics and the validator may ask of an optimizer, written down.

An averaging optimizer (AMUSE, Schedule-Free AdamW) trains at Y but keeps the averaged weights X,
which are validated and exported. The trainer glue asks for X, beta and the logged scalars
through this protocol instead of probing attributes, so a new averaging optimizer only has to
implement these four methods (and register itself, see ``amuse_dist.optim.registry``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class AveragingOptimizer(Protocol):
    def x_tensors(self) -> dict[torch.Tensor, torch.Tensor]:
        """{param: X} out of place, in each parameter's own sharding; the state is untouched."""
        ...

    def beta(self) -> float:
        """The weight of X in Y after the last step (Y = beta X + (1 - beta) Z)."""
        ...

    def scalars(self) -> dict[str, float]:
        """The last step's scalars to log (e.g. t, lr, beta, c)."""
        ...

    def update_rms(self) -> dict[str, float]:
        """RMS of the last step's update per branch; a collective under torch.distributed
        (every rank calls it, on the steps that log)."""
        ...


def averaging(optimizers: object) -> list[AveragingOptimizer]:
    """The averaging optimizers of a torchtitan OptimizersContainer (or of one optimizer)."""
    opts = getattr(optimizers, "optimizers", None)
    if opts is None:
        opts = [optimizers]
    return [o for o in opts if isinstance(o, AveragingOptimizer)]
