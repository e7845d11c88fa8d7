"""NorMuon (Li et al. 2025; zichongli5/NorMuon): Muon with a per-row second moment after NS.

The baseline on the Muon baseline's machinery (``muon.Muon`` with a ``direction``): the same
momentum, AdamW branch and owner-wise exchange; the row normalization runs on each rank's rows
after the return (``directions.NorMuonDirection``, formulas and source lines there). Meant to run
under an external LR schedule, like Muon.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from amuse_dist.distributed.plan import HSDP_MODES
from amuse_dist.optim import hparams
from amuse_dist.optim.base import check_range
from amuse_dist.optim.directions import NORMUON_SCALES
from amuse_dist.optim.hparams import hparam
from amuse_dist.optim.muon import Muon
from amuse_dist.optim.newton_schulz import NS_KERNELS


@dataclass
class NorMuonHParams:
    """NorMuon's hyper-parameters (lr from ``[optimizer] lr``, its schedule from
    ``[lr_scheduler]``): the ``[normuon]`` TOML section. Defaults: the authors'
    (normuon.py: momentum 0.95, beta2 0.95, weight decay 0; auxiliary Adam betas (0.9, 0.95),
    eps 1e-10), except the scale (see ``scale``)."""

    momentum: float = hparam(
        0.95, lo=0, hi=1, hi_open=True, why="the momentum buffer just decays at the new rate"
    )
    """Muon-branch momentum, in [0, 1)."""
    nesterov: bool = hparam(True, why="how each next update reads the momentum")
    """Nesterov momentum for the Muon branch."""
    beta2: float = hparam(
        0.95, lo=0, hi=1, hi_open=True, why="decay of the per-row second moment from the next step"
    )
    """Decay of the per-row (neuron-wise) second moment of the orthogonalized update, in [0, 1)."""
    scale: str = hparam("muon", choices=NORMUON_SCALES)
    """Update scale after the norm-keeping normalization: "muon" (0.2 sqrt(max(rows, cols)), the
    Muon baseline's, so one lr serves both branches) or "authors" (max(1, rows/cols)^0.5, for
    their lr 0.02 with a separate Adam lr)."""
    weight_decay: float = hparam(0.0, lo=0, why="applied to each next update")
    """Decoupled weight decay (both branches), >= 0."""
    adamw_beta1: float = hparam(
        0.9, lo=0, hi=1, hi_open=True, why="decay of the AdamW branch's first moment"
    )
    """AdamW branch (embeddings, head, norms): first-moment decay, in [0, 1)."""
    adamw_beta2: float = hparam(
        0.95, lo=0, hi=1, hi_open=True, why="decay of the AdamW branch's second moment"
    )
    """AdamW branch: second-moment decay, in [0, 1)."""
    adamw_eps: float = hparam(
        1e-10, lo=0, lo_open=True, why="a denominator guard of each next update"
    )
    """AdamW branch: epsilon, > 0."""
    ns_steps: int = hparam(
        5, lo=1, integer=True, why="Newton-Schulz iterations of each next update"
    )
    """Newton-Schulz iterations, >= 1."""
    ns_kernel: str = hparam("eager", choices=NS_KERNELS)
    """Newton-Schulz kernel: "eager", "triton" or "auto" (as ``[muon] ns_kernel``)."""
    hsdp_mode: str = hparam("auto", choices=HSDP_MODES)
    """HSDP: "split", "per_replica" or "auto" (as ``[muon] hsdp_mode``)."""


_D = NorMuonHParams()


class NorMuon(Muon):
    """NorMuon for the ``use_muon`` groups, AdamW for the rest (groups from ``param_groups``).

    State per Muon matrix: the momentum (like the parameter) and ``normuon_v``, one value per
    row, sharded like the parameter's rows.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        momentum: float = _D.momentum,
        nesterov: bool = _D.nesterov,
        beta2: float = _D.beta2,
        scale: str = _D.scale,
        weight_decay: float = _D.weight_decay,
        adamw_beta1: float = _D.adamw_beta1,
        adamw_beta2: float = _D.adamw_beta2,
        adamw_eps: float = _D.adamw_eps,
        ns_steps: int = _D.ns_steps,
        ns_dtype: torch.dtype = torch.bfloat16,
        ns_kernel: str = _D.ns_kernel,
        process_group: dist.ProcessGroup | None = None,
        hsdp_mode: str = _D.hsdp_mode,
    ):
        check_range("lr", lr, 0.0, float("inf"), lo_open=True, hi_open=True)
        hparams.check(NorMuonHParams, locals())
        super().__init__(
            params,
            direction="normuon",
            direction_options={"beta2": beta2, "scale": scale},
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            adamw_beta1=adamw_beta1,
            adamw_beta2=adamw_beta2,
            adamw_eps=adamw_eps,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            ns_kernel=ns_kernel,
            process_group=process_group,
            hsdp_mode=hsdp_mode,
        )
