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
from torch.distributed.tensor import DTensor, Replicate
from torch.optim import Optimizer

from amuse_dist.distributed.layout import local_view
from amuse_dist.distributed.plan import HSDP_MODES
from amuse_dist.optim import hparams
from amuse_dist.optim.base import MuonBranch, check_range, default_replicated_group, split_named
from amuse_dist.optim.directions import DIRECTIONS, make_direction
from amuse_dist.optim.elementwise import adamw_step, muon_post, nesterov
from amuse_dist.optim.hparams import hparam
from amuse_dist.optim.newton_schulz import NS_KERNELS
from amuse_dist.optim.schedule import StepScalars, step_scalars

# per-group scalars kept in the param group (saved and restored with it)
_T, _A, _CT0, _BETA_Y = "amuse_t", "amuse_weight_sum", "amuse_c_warmup", "amuse_beta_y"
_LR_T, _BETA, _C = "amuse_lr_t", "amuse_beta", "amuse_c"


# the TOML names of the Muon momentum's storage dtype ("param": the parameter's own)
MOMENTUM_DTYPES: dict[str, torch.dtype | None] = {
    "param": None,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


@dataclass
class AmuseHParams:
    """AMUSE's hyper-parameters (lr comes from ``[optimizer] lr``): the ``[amuse]`` TOML section
    and the defaults and checks of ``AMUSE.__init__``."""

    warmup_steps: int = hparam(
        2000,
        lo=1,
        integer=True,
        on_resume="refuse",
        why="the warmup constant c and beta_t that built the saved Y and Z depend on T0; X recovery would be wrong",
    )
    """T0: linear warmup inside the optimizer (>= 1); no external LR schedule."""
    beta1: float = hparam(
        0.6,
        lo=0,
        hi=1,
        lo_open=True,
        hi_open=True,
        on_resume="refuse",
        why="the saved Y interpolates Z and X with the beta it defines",
    )
    """Interpolation weight of X in Y during warmup, in (0, 1)."""
    rho: float = hparam(
        0.8,
        lo=0,
        on_resume="refuse",
        why="beta_t after warmup depends on it; X recovery would be wrong",
    )
    """Exponent of the post-warmup beta_t schedule, >= 0."""
    momentum: float = hparam(
        0.95, lo=0, hi=1, hi_open=True, why="the momentum buffer just decays at the new rate"
    )
    """Muon-branch Nesterov momentum mu, in [0, 1)."""
    weight_decay: float = hparam(0.0, lo=0, why="applied to Z at each next update")
    """Decoupled weight decay applied to Z, >= 0."""
    betas2: float = hparam(
        0.999, lo=0, hi=1, hi_open=True, why="decay of the AdamW branch's second moment"
    )
    """AdamW-branch second-moment decay, in [0, 1)."""
    eps: float = hparam(1e-10, lo=0, lo_open=True, why="a denominator guard of each next update")
    """AdamW-branch epsilon, > 0."""
    weight_lr_power: float = hparam(
        2.0,
        lo=0,
        on_resume="refuse",
        why="the saved weight sum accumulated t**r * lr**p with the old p",
    )
    """p in w_t = t**r * lr_t**p, >= 0."""
    r: float = hparam(
        0.0,
        lo=0,
        on_resume="refuse",
        why="the saved weight sum accumulated t**r * lr**p with the old r",
    )
    """r in w_t = t**r * lr_t**p, >= 0."""
    ns_steps: int = hparam(
        5, lo=1, integer=True, why="Newton-Schulz iterations of each next update"
    )
    """Newton-Schulz iterations, >= 1."""
    ns_kernel: str = hparam("eager", choices=NS_KERNELS)
    """Newton-Schulz kernel: "eager" (batched matmuls; the reference), "triton" (symmetric-aware:
    one triangle of X X^T and of b A + c A A, ``optim/ns_triton``), "auto" (triton on CUDA)."""
    exact_x: bool = hparam(
        False, on_resume="refuse", why="changes which beta builds Y from Z and X"
    )
    """Recover X with the beta that built Y (exact) instead of beta_t (reference code)."""
    momentum_dtype: str = hparam("param", choices=tuple(MOMENTUM_DTYPES))
    """Muon momentum storage: "param" (the parameter's dtype) or "bfloat16" (half the memory;
    z and the AdamW second moment keep the parameter's dtype). See docs/algorithm.md."""
    hsdp_mode: str = hparam("auto", choices=HSDP_MODES)
    """HSDP: "split" orthogonalizes each matrix once per job (matrices split across replica
    groups), "per_replica" once per replica group (no cross-replica traffic), "auto" picks by
    the cost model in docs/distributed.md."""
    direction: str = hparam(
        "muon",
        choices=DIRECTIONS,
        on_resume="refuse",
        why="the saved state of the Muon branch (and Z, Y) was built by the old direction",
    )
    """The Muon branch's direction: "muon" (the paper's), "normuon" or "adamuon"
    (``amuse_dist.optim.directions``; docs/algorithm.md)."""
    normuon_beta2: float = hparam(
        0.95, lo=0, hi=1, hi_open=True, why="decay of the per-row second moment"
    )
    """direction = "normuon": decay of the per-row second moment, in [0, 1)."""
    adamuon_beta2: float = hparam(
        0.999, lo=0, hi=1, hi_open=True, why="decay of the element-wise second moment"
    )
    """direction = "adamuon": decay of the element-wise second moment, in [0, 1)."""
    adamuon_eps: float = hparam(
        1e-8, lo=0, lo_open=True, why="a denominator guard of each next update"
    )
    """direction = "adamuon": epsilon of the denominator and the RMS alignment, > 0."""
    adamuon_sign: bool = hparam(True, why="how each next update reads the momentum")
    """direction = "adamuon": sign of the momentum before NS (the paper's)."""


@dataclass
class ScheduleFreeAdamWHParams:
    """Schedule-Free AdamW (AMUSE without a Muon branch, rho = 0): the ``[sf_adamw]`` section."""

    warmup_steps: int = hparam(
        2000,
        lo=1,
        integer=True,
        on_resume="refuse",
        why="the saved weight sum and the X/Y interpolation were built with the old warmup",
    )
    """Linear warmup inside the optimizer (>= 1); no external LR schedule."""
    beta1: float = hparam(
        0.9,
        lo=0,
        hi=1,
        lo_open=True,
        hi_open=True,
        on_resume="refuse",
        why="the saved Y interpolates Z and X with it",
    )
    """Interpolation weight of X in Y (constant: rho = 0), in (0, 1)."""
    betas2: float = hparam(
        0.9999, lo=0, hi=1, hi_open=True, why="decay of the second moment from the next step"
    )
    """Second-moment decay, in [0, 1)."""
    eps: float = hparam(1e-8, lo=0, lo_open=True, why="a denominator guard of each next update")
    """Epsilon, > 0."""
    weight_decay: float = hparam(0.1, lo=0, why="applied to each next update")
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
    ``momentum_dtype`` (e.g. ``torch.bfloat16``) stores the Muon momentum in that dtype (z and the
    AdamW second moment keep the parameter's dtype); None keeps the parameter's dtype.
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
        ns_kernel: str = _D.ns_kernel,
        process_group: dist.ProcessGroup | None = None,
        hsdp_mode: str = _D.hsdp_mode,
        momentum_dtype: torch.dtype | str | None = _D.momentum_dtype,
        direction: str = _D.direction,
        normuon_beta2: float = _D.normuon_beta2,
        adamuon_beta2: float = _D.adamuon_beta2,
        adamuon_eps: float = _D.adamuon_eps,
        adamuon_sign: bool = _D.adamuon_sign,
    ):
        # the direction's hook object (docs/algorithm.md); its state is one more key per matrix
        self._direction = make_direction(direction, prefix=f"{direction}_")
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
            normuon_beta2=normuon_beta2,
            normuon_scale="muon",
            adamuon_beta2=adamuon_beta2,
            adamuon_eps=adamuon_eps,
            adamuon_sign=bool(adamuon_sign),
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
            orthogonalizer=self._direction.orthogonalizer(ns_steps, ns_dtype, ns_kernel),
        )
        if isinstance(momentum_dtype, str):
            if momentum_dtype not in MOMENTUM_DTYPES:
                raise ValueError(
                    f"momentum_dtype = {momentum_dtype!r}: expected one of {list(MOMENTUM_DTYPES)}"
                )
            momentum_dtype = MOMENTUM_DTYPES[momentum_dtype]
        self.momentum_dtype = momentum_dtype
        # update_rms() needs sum(O^2), an extra pass and a per-parameter loop: a trainer sets
        # this to False on steps whose metrics are not logged (AmuseMetricsProcessor does)
        self.track_update_rms = True
        self._sq_sums: dict[str, torch.Tensor] = {}  # persistent accumulators per branch
        self._numels: dict[str, int] = {}
        self._tracked: set[str] = set()  # the branches tracked on the last step
        self._weights: dict[tuple[int, ...], torch.Tensor] = {}

    # ----------------------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AMUSE step: per branch and dtype group one fused elementwise op (``elementwise``),
        NS5 for the Muon branch.

        Muon branch: ``amuse::nesterov`` writes u, cast to the NS dtype, straight into the
        exchange's buffers; NS; ``amuse::muon_post`` reads O where the exchange left it. The
        AdamW branch (``amuse::adamw_step``) runs while the Muon exchange is in flight.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        steps = [s for g in self.param_groups if (s := self._group_step(g)) is not None]
        batches = [b for s in steps for b in s.batches]
        muon = [b for b in batches if b.muon]
        self._start_tracking(batches)

        def adamw_branch() -> None:
            for b in batches:
                if not b.muon:
                    self._adamw_update(b)

        if muon:
            params = [p for b in muon for p in b.params]
            splits = [tuple(b.group["ns_split"]) for b in muon for _ in b.params]
            inputs = self._muon.stage(params, splits)
            start = 0
            for b in muon:
                u = inputs[start : start + len(b.params)]
                start += len(b.params)
                nesterov(b.g, b.buf, u, float(b.group["momentum"]))
            groups = [b.group for b in muon for _ in b.params]
            # the direction (AdaMuon: sign) on each rank's staged piece, in place, before the
            # gather; then its normalization of the returned pieces (one batched all-reduce)
            self._direction.pre_ns(groups, inputs)
            del inputs, u  # the staged views: each wave's send buffer is freed once sent
            outs = self._muon.run(overlap=adamw_branch)
            outs = self._direction.post_ns(
                lambda: self._muon.tasks(params, splits),
                params,
                groups,
                outs,
                [self.state[p] for p in params],
                [b.sc.t for b in muon for _ in b.params],
            )
            start = 0
            for b in muon:
                directions = outs[start : start + len(b.params)]
                start += len(b.params)
                sq, w = self._tracking(b)
                muon_post(b.y, b.z, directions, _post_scalars(b), sq, w)
        else:
            adamw_branch()
        for s in steps:
            s.commit()
        return loss

    def _group_step(self, group: dict[str, Any]) -> _GroupStep | None:
        """This step's scalars and tensors for ``group``; None when it does not step.

        torch's DCP helpers call step() once with zero grads and lr 0 to create the state: that
        call creates every key and changes nothing.
        """
        params = [p for p in group["params"] if p.grad is not None]
        key = "momentum" if group["use_muon"] else "exp_avg_sq"
        buf_dtype = self.momentum_dtype if group["use_muon"] else None
        for p in params:
            state = self.state[p]
            if not state:
                state["z"] = p.detach().clone()
                state[key] = torch.zeros_like(p, dtype=buf_dtype)
                if group["use_muon"] and self._direction.state_key is not None:
                    state[self._direction.state_key] = self._direction.new_state(p)
            elif buf_dtype is not None and state[key].dtype != buf_dtype:
                # a checkpoint loaded through Optimizer.load_state_dict comes back in the
                # parameter's dtype: return it to the configured momentum dtype once
                state[key] = state[key].to(buf_dtype)
        if not params or float(group["lr"]) == 0.0:
            return None
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
        by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in params:
            by_kind.setdefault((p.device, p.dtype), []).append(p)
        batches = []
        for members in by_kind.values():
            views = [
                (local_view(p), local_view(self.state[p]["z"]), local_view(p.grad)) for p in members
            ]
            batches.append(
                _Batch(
                    group=group,
                    sc=sc,
                    beta_conv=group[_BETA_Y] if group["exact_x"] else sc.beta,
                    params=members,
                    y=[v[0] for v in views],
                    z=[v[1] for v in views],
                    g=[v[2] for v in views],
                    buf=[local_view(self.state[p][key]) for p in members],
                )
            )
        return _GroupStep(group, sc, batches)

    def _adamw_update(self, b: _Batch) -> None:
        """Second moment, bias-corrected denominator and the x, z, y update: one fused op."""
        b2, t = b.group["betas2"], b.sc.t
        scalars = [*_post_scalars(b), b2, 1.0 - b2**t, b.group["eps"], 1.0 - b2]
        sq, w = self._tracking(b)
        adamw_step(b.y, b.z, b.g, b.buf, scalars, sq, w)

    def _start_tracking(self, batches: list[_Batch]) -> None:
        """Zero the persistent sum(O^2) accumulators of this step's branches (tracked steps)."""
        self._tracked = set()
        if not self.track_update_rms:
            return
        self._numels = {}
        for b in batches:
            branch = "muon" if b.muon else "adamw"
            acc = self._sq_sums.get(branch)
            device = b.y[0].device if b.y else torch.device("cpu")
            if acc is None or acc.device != device:
                self._sq_sums[branch] = torch.zeros(1, dtype=torch.float64, device=device)
            elif branch not in self._tracked:
                acc.zero_()
            self._tracked.add(branch)
            self._numels[branch] = self._numels.get(branch, 0) + sum(p.numel() for p in b.params)

    def _tracking(self, b: _Batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This batch's sum(O^2) accumulator and per-tensor weights 1/replicas (so the world sum
        counts every piece once), or (None, None) on untracked steps.

        The weights are built once per parameter list and kept (no per-step allocation).
        """
        if not self.track_update_rms:
            return None, None
        branch = "muon" if b.muon else "adamw"
        key = tuple(id(p) for p in b.params)
        w = self._weights.get(key)
        device = b.y[0].device if b.y else torch.device("cpu")
        if w is None or w.device != device:
            group = self._muon.replicated_group
            w = torch.tensor(
                [1.0 / _replicas(p, group) for p in b.params], dtype=torch.float64, device=device
            )
            self._weights[key] = w
        return self._sq_sums[branch], w

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
        branches = sorted(self._tracked)
        if not branches:
            return {}
        sums = torch.cat([self._sq_sums[b].cpu() for b in branches])
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


def _replicas(p: torch.Tensor, group: dist.ProcessGroup | None) -> int:
    """How many ranks hold a copy of this rank's piece of ``p`` (its Replicate mesh dims: the
    replicate dim of HSDP, the tp dim for norms under TP), so the world sum counts it once."""
    if isinstance(p, DTensor):
        n = 1
        for size, placement in zip(p.device_mesh.shape, p.placements, strict=True):
            n *= size if isinstance(placement, Replicate) else 1
        return n
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


@dataclass
class _Batch:
    """The tensors of one param group that step on this rank, all of one device and dtype.

    Lists of local views (a DTensor's shard or the tensor itself), so each line of the math is one
    ``torch._foreach_*`` call over the whole batch.
    """

    group: dict[str, Any]
    sc: StepScalars
    beta_conv: float  # the beta that recovers x from y this step
    params: list[torch.Tensor]
    y: list[torch.Tensor]
    z: list[torch.Tensor]
    g: list[torch.Tensor]
    buf: list[torch.Tensor]  # Muon momentum or AdamW second moment

    @property
    def muon(self) -> bool:
        return bool(self.group["use_muon"])


@dataclass
class _GroupStep:
    group: dict[str, Any]
    sc: StepScalars
    batches: list[_Batch]

    def commit(self) -> None:
        """Store the step's scalars in the group (state_dict and checkpoints carry them)."""
        sc, g = self.sc, self.group
        g[_T], g[_A], g[_CT0], g[_BETA_Y] = sc.t, sc.weight_sum, sc.c_warmup, sc.beta
        g[_LR_T], g[_BETA], g[_C] = sc.lr, sc.beta, sc.c


def _post_scalars(b: _Batch) -> list[float]:
    """[1 - 1/beta_conv, 1 - lr wd, lr, 1 - beta (1 - c)] for the fused x, z, y update.

    y holds x in between: y + (1 - 1/beta_conv)(z - y) = z + (y - z)/beta_conv. Then
    x' = x + c (z' - x) and y' = x' + (1 - beta)(z' - x') fold into one lerp of x towards z'
    with weight 1 - beta (1 - c).
    """
    sc = b.sc
    return [
        1.0 - 1.0 / b.beta_conv,
        1.0 - sc.lr * b.group["weight_decay"],
        sc.lr,
        1.0 - sc.beta * (1.0 - sc.c),
    ]
