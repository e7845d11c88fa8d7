"""What AMUSE and the Muon baseline share: argument checks and the Muon-branch machinery.

The Muon branch needs whole matrices; ``MuonBranch`` turns the optimizer's Muon parameters into
``MatrixTask``s (one per parameter, same order on every rank) and owns the owner-wise NS object,
rebuilt only when the set of parameters with gradients changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from amuse_dist.distributed.layout import layout_of
from amuse_dist.distributed.ownerwise_ns import MatrixTask, Orthogonalizer, OwnerwiseNewtonSchulz
from amuse_dist.distributed.plan import DEFAULT_WAVE_BYTES, HSDP_MODES
from amuse_dist.optim.newton_schulz import muon_scale, newton_schulz5, ns_flops


def check_finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_range(
    name: str, value: float, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False
) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is finite and inside the interval."""
    check_finite(name, value)
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {value!r}")


def split_named(params: Iterable[Any]) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """Normalize params/groups; move (name, tensor) names out of the groups into a lookup.

    Names only serve error messages, so they are kept off the state dict.
    """
    groups = list(params)
    if not groups:
        raise ValueError("optimizer got an empty parameter list")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    names: dict[int, str] = {}
    out = []
    for gi, group in enumerate(groups):
        group = dict(group)
        tensors = []
        for j, p in enumerate(group["params"]):
            if isinstance(p, tuple):
                names[id(p[1])] = p[0]
                p = p[1]
            names.setdefault(id(p), f"param_groups[{gi}].params[{j}]")
            tensors.append(p)
        group["params"] = tensors
        group.pop("param_names", None)
        out.append(group)
    return out, names


@dataclass(frozen=True)
class NewtonSchulz:
    """NS5 with the Muon scale, as the owner-wise exchange's ``Orthogonalizer``; ``kernel`` as in
    ``newton_schulz5`` ("eager", "triton", "auto")."""

    steps: int = 5
    dtype: torch.dtype = torch.bfloat16
    kernel: str = "eager"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        rows, cols = batch.shape[-2:]
        return newton_schulz5(
            batch,
            self.steps,
            self.dtype,
            scale=muon_scale(rows, cols),
            contiguous=False,
            kernel=self.kernel,
        )

    def flops(self, rows: int, cols: int) -> float:
        return float(ns_flops(rows, cols, self.steps))


class MuonBranch:
    """Owner-wise Newton-Schulz for a list of Muon parameters.

    ``hsdp_mode`` ("auto", "split", "per_replica") picks how HSDP layouts share the NS work (see
    ``amuse_dist.distributed.plan.choose_hsdp_mode``); ``wave_bytes`` bounds the owner's matrices
    per pipelined wave; ``orthogonalizer`` replaces NS5 (benchmarks pass their own).
    """

    def __init__(
        self,
        names: dict[int, str],
        ns_steps: int,
        ns_dtype: torch.dtype,
        replicated_group: dist.ProcessGroup | None,
        hsdp_mode: str = "auto",
        wave_bytes: int | None = DEFAULT_WAVE_BYTES,
        pipeline: bool = True,
        orthogonalizer: Orthogonalizer | None = None,
    ):
        if hsdp_mode not in HSDP_MODES:
            raise ValueError(f"hsdp_mode must be one of {HSDP_MODES}, got {hsdp_mode!r}")
        self.names = names
        self.ns_steps = ns_steps
        self.ns_dtype = ns_dtype
        self.replicated_group = replicated_group
        self.hsdp_mode = hsdp_mode
        self.wave_bytes = wave_bytes
        self.pipeline = pipeline
        self.orthogonalizer = orthogonalizer or NewtonSchulz(ns_steps, ns_dtype)
        self._key: tuple[int, ...] | None = None
        self._ns: OwnerwiseNewtonSchulz | None = None

    def tasks(
        self, params: Sequence[torch.Tensor], splits: Sequence[Sequence[int]]
    ) -> list[MatrixTask]:
        tasks = []
        for p, split in zip(params, splits, strict=True):
            name = self.names.get(id(p), "?")
            if p.ndim != 2:
                raise ValueError(
                    f"parameter {name!r} with shape {tuple(p.shape)} is in a use_muon group; "
                    "the Muon branch takes 2-D matrices only"
                )
            split = tuple(int(s) for s in split)
            if split and sum(split) != p.shape[0]:
                raise ValueError(
                    f"parameter {name!r}: ns_split {split} does not sum to its {p.shape[0]} rows"
                )
            tasks.append(MatrixTask(layout_of(p, name, self.replicated_group), split))
        return tasks

    def stage(
        self, params: Sequence[torch.Tensor], splits: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """Where each parameter's local update goes this step (NS dtype, the local shape):
        views of the exchange's send/keep buffers or, in one process, of the NS batch buffers.

        The caller writes the updates there (``amuse::nesterov`` does, with the cast), then
        calls ``run()``. The exchange is rebuilt only when the set of parameters changes.
        """
        key = tuple(id(p) for p in params)
        if key != self._key:
            self._ns = OwnerwiseNewtonSchulz(
                self.tasks(params, splits),
                self.orthogonalizer,
                self.hsdp_mode,
                self.wave_bytes,
                self.pipeline,
            )
            self._key = key
        assert self._ns is not None
        device = params[0].device if params else "cpu"
        return self._ns.stage(device)

    def run(self, overlap: Callable[[], None] | None = None) -> list[torch.Tensor]:
        """Local pieces of NS5(update) * scale for each staged parameter (ns dtype).

        ``overlap`` (optional) is called exactly once, while the exchange is in flight where there
        is one: the optimizer's other branch runs its elementwise math there.
        """
        assert self._ns is not None, "MuonBranch.run() before stage()"
        return self._ns.run(overlap)

    def orthogonalize(
        self,
        params: Sequence[torch.Tensor],
        splits: Sequence[Sequence[int]],
        updates: Sequence[torch.Tensor],
        overlap: Callable[[], None] | None = None,
    ) -> list[torch.Tensor]:
        """``stage``, one foreach copy (and cast) of ``updates`` into the staged views, ``run``."""
        inputs = self.stage(params, splits)
        pairs = [(i, u) for i, u in zip(inputs, updates, strict=True) if u.numel()]
        if pairs:
            torch._foreach_copy_([i for i, _ in pairs], [u for _, u in pairs])
        del inputs, pairs  # the staged views: each wave's send buffer is freed once sent
        return self.run(overlap)

    @property
    def ns(self) -> OwnerwiseNewtonSchulz | None:
        return self._ns


def default_replicated_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """Group over which plain (non-DTensor) parameters are replicated, if any.

    With torch.distributed initialized and more than one rank, plain tensors are taken to be
    replicated (DDP); owners then share the NS work and broadcast results through all_to_all.
    """
    if group is not None:
        return group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None
