"""AdaMuon (Si, Zhang, Shen 2025; Chongjie-Si/AdaMuon): sign before NS, an element-wise second
moment of the orthogonalized update after it, and an RMS aligned to Adam's.

The baseline on the Muon baseline's machinery (``muon.Muon`` with a ``direction``): the same
momentum, AdamW branch and owner-wise exchange; the sign runs on each rank's piece before the
gather, the normalization on each rank's piece after the return (``directions.AdaMuonDirection``,
formulas and source lines there). Meant to run under an external LR schedule, like Muon.
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
from amuse_dist.optim.hparams import hparam
from amuse_dist.optim.muon import Muon
from amuse_dist.optim.newton_schulz import NS_KERNELS


@dataclass
class AdaMuonHParams:
    """AdaMuon's hyper-parameters (lr from ``[optimizer] lr``, its schedule from
    ``[lr_scheduler]``): the ``[adamuon]`` TOML section. Defaults: the authors' (adamuon.py:
    momentum 0.95, Nesterov, beta2 0.999, eps 1e-8, weight decay 0.01; their GPT-2 script's
    AdamW betas (0.9, 0.95) for the other parameters)."""

    momentum: float = hparam(
        0.95, lo=0, hi=1, hi_open=True, why="the momentum buffer just decays at the new rate"
    )
    """Muon-branch momentum, in [0, 1)."""
    nesterov: bool = hparam(True, why="how each next update reads the momentum")
    """Nesterov momentum for the Muon branch."""
    sign: bool = hparam(True, why="how each next update reads the momentum")
    """Sign of the momentum before NS (the paper's sign stabilization; false: the stored code's
    variant without it)."""
    beta2: float = hparam(
        0.999, lo=0, hi=1, hi_open=True, why="decay of the element-wise second moment"
    )
    """Decay of the element-wise second moment of the orthogonalized update, in [0, 1)."""
    eps: float = hparam(1e-8, lo=0, lo_open=True, why="a denominator guard of each next update")
    """Epsilon of the second-moment denominator and of the RMS alignment, > 0."""
    weight_decay: float = hparam(0.01, lo=0, why="applied to each next update")
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
        1e-8, lo=0, lo_open=True, why="a denominator guard of each next update"
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


_D = AdaMuonHParams()


class AdaMuon(Muon):
    """AdaMuon for the ``use_muon`` groups, AdamW for the rest (groups from ``param_groups``).

    State per Muon matrix: the momentum and ``adamuon_v``, both shaped and sharded like the
    parameter.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        momentum: float = _D.momentum,
        nesterov: bool = _D.nesterov,
        sign: bool = _D.sign,
        beta2: float = _D.beta2,
        eps: float = _D.eps,
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
        hparams.check(AdaMuonHParams, locals())
        super().__init__(
            params,
            direction="adamuon",
            direction_options={"sign": bool(sign), "beta2": beta2, "eps": eps},
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
