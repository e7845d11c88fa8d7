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
from amuse_dist.optim.directions import make_direction
from amuse_dist.optim.hparams import hparam
from amuse_dist.optim.newton_schulz import NS_KERNELS


@dataclass
class MuonHParams:
    """Muon's hyper-parameters (lr comes from ``[optimizer] lr``, its schedule from
    ``[lr_scheduler]``): the ``[muon]`` TOML section and the defaults and checks of ``Muon``."""

    momentum: float = hparam(
        0.95, lo=0, hi=1, hi_open=True, why="the momentum buffer just decays at the new rate"
    )
    """Muon-branch momentum, in [0, 1)."""
    nesterov: bool = hparam(True, why="how each next update reads the momentum")
    """Nesterov momentum for the Muon branch."""
    weight_decay: float = hparam(0.0, lo=0, why="applied to each next update")
    """Decoupled weight decay (both branches), >= 0."""
    adamw_beta1: float = hparam(
        0.8, lo=0, hi=1, hi_open=True, why="decay of the AdamW branch's first moment"
    )
    """AdamW branch (embeddings, head, norms): first-moment decay, in [0, 1)."""
    adamw_beta2: float = hparam(
        0.999, lo=0, hi=1, hi_open=True, why="decay of the AdamW branch's second moment"
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
    """Newton-Schulz kernel: "eager" (batched matmuls; the reference), "triton" (symmetric-aware:
    one triangle of X X^T and of b A + c A A, ``optim/ns_triton``), "auto" (triton on CUDA)."""
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
        ns_kernel: str = _D.ns_kernel,
        process_group: dist.ProcessGroup | None = None,
        hsdp_mode: str = _D.hsdp_mode,
        *,
        direction: str = "muon",
        direction_options: dict[str, Any] | None = None,
    ):
        """``direction``: what turns the orthogonalized momentum into the update ("muon": as it
        is; NorMuon and AdaMuon pass theirs, with their hyper-parameters in
        ``direction_options``, which go into the param groups)."""
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
            **(direction_options or {}),
        )
        groups, names = split_named(params)
        super().__init__(groups, defaults)
        for group in self.param_groups:
            # the step count is state, saved with the group, never a default: a resume puts
            # the run's hyper-parameters (the defaults' keys) back over the loaded groups
            group.setdefault("muon_t", 0)
        self.direction = make_direction(direction)
        self._muon = MuonBranch(
            names,
            ns_steps,
            ns_dtype,
            default_replicated_group(process_group),
            hsdp_mode=hsdp_mode,
            orthogonalizer=self.direction.orthogonalizer(ns_steps, ns_dtype, ns_kernel),
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step: a few ``torch._foreach_*`` calls per group, NS5 for the Muon groups, with
        the direction's ``pre_ns`` before the exchange and ``post_ns`` after it.

        The AdamW groups' math runs while the Muon exchange is in flight (``overlap``).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        key = self.direction.state_key
        muon, adamw = [], []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:
                    if group["use_muon"]:
                        state["momentum"] = torch.zeros_like(p)
                        if key is not None:
                            state[key] = self.direction.new_state(p)
                    else:
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
            if not params or float(group["lr"]) == 0.0:  # torch's DCP state init: change nothing
                continue
            group["muon_t"] += 1
            (muon if group["use_muon"] else adamw).append((group, params))

        def adamw_branch() -> None:
            for group, params in adamw:
                _adamw_step(group, params, self.state)

        if not muon:
            adamw_branch()
            return loss
        updates: list[torch.Tensor] = []
        for group, params in muon:
            g = [local_view(p.grad) for p in params]
            m = [local_view(self.state[p]["momentum"]) for p in params]
            mu = group["momentum"]
            torch._foreach_lerp_(m, g, 1.0 - mu)
            updates += (
                torch._foreach_lerp(g, m, mu) if group["nesterov"] else torch._foreach_mul(m, 1.0)
            )
        flat = [p for _, params in muon for p in params]
        groups = [group for group, params in muon for _ in params]
        splits = [tuple(group["ns_split"]) for group in groups]
        self.direction.pre_ns(groups, updates)
        outs = self._muon.orthogonalize(flat, splits, updates, overlap=adamw_branch)
        outs = self.direction.post_ns(
            lambda: self._muon.tasks(flat, splits),
            flat,
            groups,
            outs,
            [self.state[p] for p in flat],
            [group["muon_t"] for group in groups],
        )
        start = 0
        for group, params in muon:
            w = [local_view(p) for p in params]
            o = outs[start : start + len(params)]
            start += len(params)
            lr, wd = float(group["lr"]), group["weight_decay"]
            if wd != 0.0:
                torch._foreach_mul_(w, 1.0 - lr * wd)
            torch._foreach_add_(w, o, alpha=-lr)
        return loss

    @property
    def ns_log(self) -> list[int]:
        return list(self._muon.ns.owned_log) if self._muon.ns else []


def _adamw_step(group: dict[str, Any], params: list[torch.Tensor], state: Any) -> None:
    """AdamW with decoupled weight decay on ``params`` (one group), in foreach calls."""
    b1, b2 = group["adamw_betas"]
    t, lr, wd = group["muon_t"], float(group["lr"]), group["weight_decay"]
    w = [local_view(p) for p in params]
    g = [local_view(p.grad) for p in params]
    m = [local_view(state[p]["exp_avg"]) for p in params]
    v = [local_view(state[p]["exp_avg_sq"]) for p in params]
    torch._foreach_lerp_(m, g, 1.0 - b1)
    torch._foreach_mul_(v, b2)
    torch._foreach_addcmul_(v, g, g, value=1.0 - b2)
    denom = torch._foreach_div(v, 1.0 - b2**t)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, group["adamw_eps"])
    if wd != 0.0:
        torch._foreach_mul_(w, 1.0 - lr * wd)
    torch._foreach_addcdiv_(w, m, denom, value=-lr / (1.0 - b1**t))
