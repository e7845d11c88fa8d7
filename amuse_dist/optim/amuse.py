"""The AMUSE optimizer (Anytime Muon with Stable Gradient Evaluation), FSDP2/DTensor aware.

The parameter holds y (where gradients are taken). State per parameter: z, and either the Muon
momentum m or the AdamW second moment v, all shaped and sharded like the parameter. x is never
stored: x = z + (y - z) / beta recovers it. Every step is elementwise on local shards except
Newton-Schulz, which runs owner-wise (see ``amuse_dist.distributed.ownerwise_ns``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.optim import Optimizer

from amuse_dist.distributed.layout import local_view
from amuse_dist.distributed.plan import HSDP_MODES
from amuse_dist.optim import hparams
from amuse_dist.optim.base import MuonBranch, check_range, default_replicated_group, split_named
from amuse_dist.optim.hparams import hparam
from amuse_dist.optim.schedule import step_scalars

# per-group scalars kept in the param group (saved and restored with it)
_T, _A, _CT0, _BETA_Y = "amuse_t", "amuse_weight_sum", "amuse_c_warmup", "amuse_beta_y"
_LR_T, _BETA, _C = "amuse_lr_t", "amuse_beta", "amuse_c"


@dataclass
class AmuseHParams:
    """AMUSE's hyper-parameters (lr comes from ``[optimizer] lr``): the ``[amuse]`` TOML section
    and the defaults and checks of ``AMUSE.__init__``."""

    warmup_steps: int = hparam(2000, lo=1, integer=True, on_resume="refuse")
    """T0: linear warmup inside the optimizer (>= 1); no external LR schedule."""
    beta1: float = hparam(0.6, lo=0, hi=1, lo_open=True, hi_open=True, on_resume="refuse")
    """Interpolation weight of X in Y during warmup, in (0, 1)."""
    rho: float = hparam(0.8, lo=0, on_resume="refuse")
    """Exponent of the post-warmup beta_t schedule, >= 0."""
    momentum: float = hparam(0.95, lo=0, hi=1, hi_open=True)
    """Muon-branch Nesterov momentum mu, in [0, 1)."""
    weight_decay: float = hparam(0.0, lo=0)
    """Decoupled weight decay applied to Z, >= 0."""
    betas2: float = hparam(0.999, lo=0, hi=1, hi_open=True)
    """AdamW-branch second-moment decay, in [0, 1)."""
    eps: float = hparam(1e-10, lo=0, lo_open=True)
    """AdamW-branch epsilon, > 0."""
    weight_lr_power: float = hparam(2.0, lo=0, on_resume="refuse")
    """p in w_t = t**r * lr_t**p, >= 0."""
    r: float = hparam(0.0, lo=0, on_resume="refuse")
    """r in w_t = t**r * lr_t**p, >= 0."""
    ns_steps: int = hparam(5, lo=1, integer=True)
    """Newton-Schulz iterations, >= 1."""
    exact_x: bool = hparam(False, on_resume="refuse")
    """Recover X with the beta that built Y (exact) instead of beta_t (reference code)."""
    hsdp_mode: str = hparam("auto", choices=HSDP_MODES)
    """HSDP: "split" orthogonalizes each matrix once per job (matrices split across replica
    groups), "per_replica" once per replica group (no cross-replica traffic), "auto" picks by
    the cost model in docs/distributed.md."""


@dataclass
class ScheduleFreeAdamWHParams:
    """Schedule-Free AdamW (AMUSE without a Muon branch, rho = 0): the ``[sf_adamw]`` section."""

    warmup_steps: int = hparam(2000, lo=1, integer=True, on_resume="refuse")
    """Linear warmup inside the optimizer (>= 1); no external LR schedule."""
    beta1: float = hparam(0.9, lo=0, hi=1, lo_open=True, hi_open=True, on_resume="refuse")
    """Interpolation weight of X in Y (constant: rho = 0), in (0, 1)."""
    betas2: float = hparam(0.9999, lo=0, hi=1, hi_open=True)
    """Second-moment decay, in [0, 1)."""
    eps: float = hparam(1e-8, lo=0, lo_open=True)
    """Epsilon, > 0."""
    weight_decay: float = hparam(0.1, lo=0)
    """Decoupled weight decay applied to Z, >= 0."""


_D = AmuseHParams()
_SF = ScheduleFreeAdamWHParams()


def _validate_group(group: dict[str, Any]) -> None:
    check_range("lr", group["lr"], 0.0, float("inf"), lo_open=True, hi_open=True)
    hparams.check(AmuseHParams, group)


class AMUSE(Optimizer):
    """AMUSE: Muon (2-D hidden matrices) or AdamW-style steps on z, schedule-free averaging to x.

    Each param group sets ``use_muon``; build groups with ``amuse_dist.param_groups(model)``.
    ``exact_x`` recovers x with the beta that built y (exact) instead of the current beta_t (the
    reference code's choice, used for the paper's results). ``ns_dtype`` is the Newton-Schulz (and
    its communication) dtype: bf16 as in the spec, fp32 for testing. ``hsdp_mode`` ("auto",
    "split", "per_replica") chooses how HSDP replica groups share Newton-Schulz (docs/distributed.md).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.01,
        warmup_steps: int = _D.warmup_steps,
        beta1: float = _D.beta1,
        rho: float = _D.rho,
        momentum: float = _D.momentum,
        weight_decay: float = _D.weight_decay,
        betas2: float = _D.betas2,
        eps: float = _D.eps,
        weight_lr_power: float = _D.weight_lr_power,
        r: float = _D.r,
        ns_steps: int = _D.ns_steps,
        exact_x: bool = _D.exact_x,
        ns_dtype: torch.dtype = torch.bfloat16,
        process_group: dist.ProcessGroup | None = None,
        hsdp_mode: str = _D.hsdp_mode,
    ):
        defaults = dict(
            lr=lr,
            warmup_steps=warmup_steps,
            beta1=beta1,
            rho=rho,
            momentum=momentum,
            weight_decay=weight_decay,
            betas2=betas2,
            eps=eps,
            weight_lr_power=weight_lr_power,
            r=r,
            ns_steps=ns_steps,
            exact_x=bool(exact_x),
            use_muon=False,
            ns_split=(),
        )
        _validate_group(defaults)
        groups, self._names = split_named(params)
        super().__init__(groups, defaults)
        for group in self.param_groups:
            _validate_group(group)
            group.setdefault(_T, 0)
            group.setdefault(_A, 0.0)
            group.setdefault(_CT0, 0.0)
            group.setdefault(_BETA_Y, float(group["beta1"]))
            group.setdefault(_LR_T, 0.0)
            group.setdefault(_BETA, float(group["beta1"]))
            group.setdefault(_C, 0.0)
        self._muon = MuonBranch(
            self._names,
            ns_steps,
            ns_dtype,
            default_replicated_group(process_group),
            hsdp_mode=hsdp_mode,
        )
        self._sq_sums: dict[str, torch.Tensor] = {}
        self._numels: dict[str, int] = {}

    # ----------------------------------------------------------------------------- the step
    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            state["z"] = p.detach().clone()
            key = "momentum" if group["use_muon"] else "exp_avg_sq"
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # (group, scalars, params, directions) per group; Muon directions are filled in later
        plans: list[tuple[dict[str, Any], Any, list[torch.Tensor], list[Any]]] = []
        muon_params: list[torch.Tensor] = []
        muon_splits: list[tuple[int, ...]] = []
        muon_updates: list[torch.Tensor] = []
        muon_slots: list[tuple[list[Any], int]] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            states = [self._init_state(p, group) for p in params]
            if not params or float(group["lr"]) == 0.0:
                # torch's DCP helpers call step() once with zero grads and lr 0 to create the
                # state: that call must create every key and change nothing.
                continue
            sc = step_scalars(
                group[_T] + 1,
                lr=float(group["lr"]),
                warmup_steps=group["warmup_steps"],
                beta1=group["beta1"],
                rho=group["rho"],
                weight_lr_power=group["weight_lr_power"],
                r=group["r"],
                weight_sum=group[_A],
                c_warmup=group[_CT0],
            )
            directions: list[Any] = [None] * len(params)
            for j, (p, state) in enumerate(zip(params, states, strict=True)):
                g = local_view(p.grad)
                if group["use_muon"]:
                    m = local_view(state["momentum"])
                    mu = group["momentum"]
                    m.lerp_(g, 1.0 - mu)  # m = mu m + (1 - mu) g
                    muon_updates.append(torch.lerp(g, m, mu))  # Nesterov: (1 - mu) g + mu m
                    muon_params.append(p)
                    muon_splits.append(tuple(group["ns_split"]))
                    muon_slots.append((directions, j))
                else:
                    v = local_view(state["exp_avg_sq"])
                    b2 = group["betas2"]
                    v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                    denom = (v / (1.0 - b2**sc.t)).sqrt_().add_(group["eps"])
                    directions[j] = g / denom
            plans.append((group, sc, params, directions))

        if muon_params:
            outs = self._muon.orthogonalize(muon_params, muon_splits, muon_updates)
            for (directions, j), o in zip(muon_slots, outs, strict=True):
                directions[j] = o

        self._sq_sums, self._numels = {}, {}
        for group, sc, params, directions in plans:
            beta_conv = group[_BETA_Y] if group["exact_x"] else sc.beta
            branch = "muon" if group["use_muon"] else "adamw"
            for p, o in zip(params, directions, strict=True):
                state = self.state[p]
                y, z = local_view(p), local_view(state["z"])
                x = torch.lerp(z, y, 1.0 / beta_conv)  # x = z + (y - z) / beta_conv
                z.mul_(1.0 - sc.lr * group["weight_decay"]).sub_(o, alpha=sc.lr)
                x.lerp_(z, sc.c)  # x += c_t (z - x)
                y.copy_(x.lerp_(z, 1.0 - sc.beta))  # y = x + (1 - beta_t)(z - x)
                self._track(branch, p, o)
            group[_T] = sc.t
            group[_A] = sc.weight_sum
            group[_CT0] = sc.c_warmup
            group[_BETA_Y] = sc.beta
            group[_LR_T], group[_BETA], group[_C] = sc.lr, sc.beta, sc.c
        return loss

    def _track(self, branch: str, p: torch.Tensor, o: torch.Tensor) -> None:
        """Accumulate this rank's share of sum(O^2) for update_rms()."""
        sq = o.float().pow(2).sum(dtype=torch.float64)
        if not (isinstance(p, DTensor) and isinstance(p.placements[0], Shard)):
            sq = sq / _replicas(p, self._muon.replicated_group)
        prev = self._sq_sums.get(branch)
        self._sq_sums[branch] = sq if prev is None else prev + sq
        self._numels[branch] = self._numels.get(branch, 0) + p.numel()

    # ----------------------------------------------------------------------------- reading
    def x_tensors(self) -> dict[torch.Tensor, torch.Tensor]:
        """X weights for every parameter, out of place, in the parameter's own sharding.

        Uses the beta that built the current y (the latest beta_t), so the recovery is exact; the
        training state is not touched. Before the first step X equals the parameter.
        """
        out: dict[torch.Tensor, torch.Tensor] = {}
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state.get(p)
                    if not state or "z" not in state:
                        out[p] = p.detach().clone()
                    else:
                        out[p] = torch.lerp(state["z"], p.detach(), 1.0 / group[_BETA_Y])
        return out

    def group_scalars(self) -> list[dict[str, float]]:
        """The last step's scalars per group: t, lr (lr_t), beta (beta_t), c (c_t)."""
        return [
            {"t": float(g[_T]), "lr": g[_LR_T], "beta": g[_BETA], "c": g[_C]}
            for g in self.param_groups
        ]

    def scalars(self) -> dict[str, float]:
        """The first group's last-step scalars (all groups share them unless their lr differs)."""
        return self.group_scalars()[0]

    def beta(self) -> float:
        """beta_t of the last step (the weight of x in y)."""
        return self.param_groups[0][_BETA]

    def update_rms(self) -> dict[str, float]:
        """RMS of the last step's update direction O per branch ("muon", "adamw").

        A collective when torch.distributed is initialized: call it on every rank.
        """
        branches = sorted(self._sq_sums)
        if not branches:
            return {}
        sums = torch.stack([self._sq_sums[b].cpu() for b in branches])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = self._sq_sums[branches[0]].device
            sums = sums.to(device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        return {b: float((s / self._numels[b]).sqrt()) for b, s in zip(branches, sums, strict=True)}

    @property
    def ns_log(self) -> list[int]:
        """Indices (into the step's Muon parameter list) orthogonalized on this rank last step."""
        return list(self._muon.ns.owned_log) if self._muon.ns else []

    @property
    def ns_matrices_done(self) -> int:
        """Matrices this rank has orthogonalized since the Muon plan was last built."""
        return self._muon.ns.matrices_done if self._muon.ns else 0


def _replicas(p: torch.Tensor, group: dist.ProcessGroup | None) -> int:
    if isinstance(p, DTensor):
        return p.device_mesh.size()
    return dist.get_world_size(group) if group is not None else 1


def schedule_free_adamw(
    params: Iterable[Any],
    lr: float = 2e-3,
    warmup_steps: int = _SF.warmup_steps,
    beta1: float = _SF.beta1,
    betas2: float = _SF.betas2,
    eps: float = _SF.eps,
    weight_decay: float = _SF.weight_decay,
    **kwargs: Any,
) -> AMUSE:
    """Schedule-Free AdamW as a special case of AMUSE: no Muon branch, constant beta (rho = 0).

    Differs from Defazio et al.'s reference only in applying weight decay to z instead of y.
    """
    groups, names = split_named(params)
    for g in groups:
        g["use_muon"] = False
    named = [{**g, "params": [(names[id(p)], p) for p in g["params"]]} for g in groups]
    return AMUSE(
        named,
        lr=lr,
        warmup_steps=warmup_steps,
        beta1=beta1,
        rho=0.0,
        betas2=betas2,
        weight_decay=weight_decay,
        eps=eps,
        **kwargs,
    )
