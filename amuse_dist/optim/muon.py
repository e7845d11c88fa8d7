"""Distributed Muon baseline with the same owner-wise Newton-Schulz as AMUSE.

Muon for the ``use_muon`` groups (EMA momentum, Nesterov, NS5, 0.2 sqrt(max(m, n)) scale, decoupled
weight decay), AdamW for the rest. Meant to run under an external LR schedule (e.g. cosine), so
comparisons with AMUSE share every piece but the averaging.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from amuse_dist.distributed.layout import local_view
from amuse_dist.distributed.plan import HSDP_MODES
from amuse_dist.optim import hparams
from amuse_dist.optim.base import MuonBranch, check_range, default_replicated_group, split_named
from amuse_dist.optim.hparams import hparam


@dataclass
class MuonHParams:
    """Muon's hyper-parameters (lr comes from ``[optimizer] lr``, its schedule from
    ``[lr_scheduler]``): the ``[muon]`` TOML section and the defaults and checks of ``Muon``."""

    momentum: float = hparam(0.95, lo=0, hi=1, hi_open=True)
    """Muon-branch momentum, in [0, 1)."""
    nesterov: bool = hparam(True)
    """Nesterov momentum for the Muon branch."""
    weight_decay: float = hparam(0.0, lo=0)
    """Decoupled weight decay (both branches), >= 0."""
    adamw_beta1: float = hparam(0.8, lo=0, hi=1, hi_open=True)
    """AdamW branch (embeddings, head, norms): first-moment decay, in [0, 1)."""
    adamw_beta2: float = hparam(0.999, lo=0, hi=1, hi_open=True)
    """AdamW branch: second-moment decay, in [0, 1)."""
    adamw_eps: float = hparam(1e-8, lo=0, lo_open=True)
    """AdamW branch: epsilon, > 0."""
    ns_steps: int = hparam(5, lo=1, integer=True)
    """Newton-Schulz iterations, >= 1."""
    hsdp_mode: str = hparam("auto", choices=HSDP_MODES)
    """HSDP: "split" (each matrix once per job), "per_replica" (once per replica group) or
    "auto" (the cost model in docs/distributed.md)."""


_D = MuonHParams()


class Muon(Optimizer):
    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 2e-3,
        momentum: float = _D.momentum,
        nesterov: bool = _D.nesterov,
        weight_decay: float = _D.weight_decay,
        adamw_beta1: float = _D.adamw_beta1,
        adamw_beta2: float = _D.adamw_beta2,
        adamw_eps: float = _D.adamw_eps,
        ns_steps: int = _D.ns_steps,
        ns_dtype: torch.dtype = torch.bfloat16,
        process_group: dist.ProcessGroup | None = None,
        hsdp_mode: str = _D.hsdp_mode,
    ):
        check_range("lr", lr, 0.0, float("inf"), lo_open=True, hi_open=True)
        hparams.check(MuonHParams, locals())
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            # one tuple in the param groups (the saved state's format since the first release)
            adamw_betas=(adamw_beta1, adamw_beta2),
            adamw_eps=adamw_eps,
            use_muon=False,
            ns_split=(),
            muon_t=0,
        )
        groups, names = split_named(params)
        super().__init__(groups, defaults)
        self._muon = MuonBranch(
            names, ns_steps, ns_dtype, default_replicated_group(process_group), hsdp_mode=hsdp_mode
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        muon_params, splits, updates, lrs = [], [], [], []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if not self.state[p]:
                    if group["use_muon"]:
                        self.state[p]["momentum"] = torch.zeros_like(p)
                    else:
                        self.state[p]["exp_avg"] = torch.zeros_like(p)
                        self.state[p]["exp_avg_sq"] = torch.zeros_like(p)
            lr = float(group["lr"])
            if not params or lr == 0.0:  # torch's DCP state initialisation: change nothing
                continue
            group["muon_t"] += 1
            wd = group["weight_decay"]
            for p in params:
                g, w = local_view(p.grad), local_view(p)
                if group["use_muon"]:
                    mu = group["momentum"]
                    m = local_view(self.state[p]["momentum"])
                    m.lerp_(g, 1.0 - mu)
                    updates.append(torch.lerp(g, m, mu) if group["nesterov"] else m.clone())
                    muon_params.append(p)
                    splits.append(tuple(group["ns_split"]))
                    lrs.append((w, lr, wd))
                else:
                    b1, b2 = group["adamw_betas"]
                    t = group["muon_t"]
                    m = local_view(self.state[p]["exp_avg"])
                    v = local_view(self.state[p]["exp_avg_sq"])
                    m.lerp_(g, 1.0 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                    denom = (v / (1.0 - b2**t)).sqrt_().add_(group["adamw_eps"])
                    w.mul_(1.0 - lr * wd).addcdiv_(m, denom, value=-lr / (1.0 - b1**t))
        if muon_params:
            outs = self._muon.orthogonalize(muon_params, splits, updates)
            for (w, lr, wd), o in zip(lrs, outs, strict=True):
                w.mul_(1.0 - lr * wd).sub_(o, alpha=lr)
        return loss

    @property
    def ns_log(self) -> list[int]:
        return list(self._muon.ns.owned_log) if self._muon.ns else []
