"""The optimizer registry: one line per optimizer, read by config validation, the trainer's
optimizer builder, checkpoint checks and the benchmarks.

Adding an optimizer touches its own module and one ``register(OptimizerSpec(...))`` call; a
module outside the package can register one too and be loaded with
``[experimental] custom_import = "my.module"`` (imported before the config is parsed, so its
hyper-parameter section is part of the TOML schema).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn
from torch.optim import Optimizer

from amuse_dist.optim.adamuon import AdaMuon, AdaMuonHParams
from amuse_dist.optim.amuse import (
    AMUSE,
    AmuseHParams,
    ScheduleFreeAdamWHParams,
    schedule_free_adamw,
)
from amuse_dist.optim.groups import param_groups
from amuse_dist.optim.muon import Muon, MuonHParams
from amuse_dist.optim.normuon import NorMuon, NorMuonHParams

Builder = Callable[[nn.Module, float, Any], Optimizer]


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    """The ``[optimizer] name`` (matched case-insensitively)."""
    build: Builder | None
    """``build(model_part, lr, hparams)``; None: torchtitan's own builder from ``[optimizer]``."""
    hparams: type | None = None
    """Its hyper-parameter dataclass (see ``amuse_dist.optim.hparams``); also a TOML section."""
    section: str | None = None
    """The TOML section holding ``hparams`` (e.g. "amuse")."""
    averaging: bool = False
    """Keeps averaged weights X (implements ``protocols.AveragingOptimizer``)."""
    schedule_free: bool = False
    """Warms up inside the optimizer: the torchtitan LR schedule must be constant."""
    state_keys: tuple[frozenset[str], ...] = ()
    """The per-parameter state names its checkpoints hold (one set per possible mix of
    branches), to name the optimizer that wrote a checkpoint."""


_REGISTRY: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
    """Add ``spec``; registering the same name twice is an error unless it is the same spec."""
    key = spec.name.lower()
    old = _REGISTRY.get(key)
    if old is not None and old != spec:
        raise ValueError(f"optimizer {spec.name!r} is already registered")
    if spec.hparams is not None and spec.section is None:
        raise ValueError(f"optimizer {spec.name!r}: hparams without a TOML section name")
    _REGISTRY[key] = spec
    return spec


def names() -> list[str]:
    return [s.name for s in _REGISTRY.values()]


def specs() -> list[OptimizerSpec]:
    return list(_REGISTRY.values())


def hparam_sections() -> dict[str, type]:
    """{TOML section: hyper-parameter dataclass} of every registered optimizer that has one."""
    return {s.section: s.hparams for s in _REGISTRY.values() if s.section and s.hparams}


def find(name: str) -> OptimizerSpec | None:
    """The spec named ``name`` in any letter case, or None."""
    return _REGISTRY.get(str(name).lower())


def get(name: str) -> OptimizerSpec:
    """The spec named ``name``; a ValueError listing the valid names (and the closest) if none."""
    spec = find(name)
    if spec is None:
        raise ValueError(unknown_message(name))
    return spec


def unknown_message(name: str) -> str:
    close = difflib.get_close_matches(str(name).lower(), list(_REGISTRY), n=1)
    hint = f' (did you mean "{get(close[0]).name}"?)' if close else ""
    return f"unknown optimizer {name!r}{hint}; expected one of " + ", ".join(names())


def guess_from_state(state_names: set[str]) -> str:
    """Name the optimizer whose checkpoints hold exactly these per-parameter state names."""
    for spec in _REGISTRY.values():
        if frozenset(state_names) in spec.state_keys:
            return spec.name
    return "unknown (state names: " + ", ".join(sorted(state_names)) + ")"


def _amuse(model: nn.Module, lr: float, hp: AmuseHParams) -> Optimizer:
    return AMUSE(param_groups(model), lr=lr, **asdict(hp))


def _muon(model: nn.Module, lr: float, hp: MuonHParams) -> Optimizer:
    return Muon(param_groups(model), lr=lr, **asdict(hp))


def _normuon(model: nn.Module, lr: float, hp: NorMuonHParams) -> Optimizer:
    return NorMuon(param_groups(model), lr=lr, **asdict(hp))


def _adamuon(model: nn.Module, lr: float, hp: AdaMuonHParams) -> Optimizer:
    return AdaMuon(param_groups(model), lr=lr, **asdict(hp))


def _sf_adamw(model: nn.Module, lr: float, hp: ScheduleFreeAdamWHParams) -> Optimizer:
    return schedule_free_adamw(
        [p for p in model.parameters() if p.requires_grad], lr=lr, **asdict(hp)
    )


_ADAM_STATE = (frozenset({"exp_avg", "exp_avg_sq", "step"}),)
register(
    OptimizerSpec(
        "AMUSE",
        _amuse,
        AmuseHParams,
        "amuse",
        averaging=True,
        schedule_free=True,
        state_keys=tuple(
            frozenset({"z", "momentum", *adamw, *direction})
            for adamw in ((), ("exp_avg_sq",))
            for direction in ((), ("normuon_v",), ("adamuon_v",))
        ),
    )
)
register(OptimizerSpec("AdamW", None, state_keys=_ADAM_STATE))
register(OptimizerSpec("Adam", None, state_keys=_ADAM_STATE))
register(
    OptimizerSpec(
        "Muon",
        _muon,
        MuonHParams,
        "muon",
        state_keys=(frozenset({"momentum", "exp_avg", "exp_avg_sq"}), frozenset({"momentum"})),
    )
)
register(
    OptimizerSpec(
        "ScheduleFreeAdamW",
        _sf_adamw,
        ScheduleFreeAdamWHParams,
        "sf_adamw",
        averaging=True,
        schedule_free=True,
        state_keys=(frozenset({"z", "exp_avg_sq"}),),
    )
)
register(
    OptimizerSpec(
        "NorMuon",
        _normuon,
        NorMuonHParams,
        "normuon",
        state_keys=(
            frozenset({"momentum", "normuon_v", "exp_avg", "exp_avg_sq"}),
            frozenset({"momentum", "normuon_v"}),
        ),
    )
)
register(
    OptimizerSpec(
        "AdaMuon",
        _adamuon,
        AdaMuonHParams,
        "adamuon",
        state_keys=(
            frozenset({"momentum", "adamuon_v", "exp_avg", "exp_avg_sq"}),
            frozenset({"momentum", "adamuon_v"}),
        ),
    )
)
