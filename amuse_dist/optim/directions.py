"""Update directions after Newton-Schulz: Muon (as is), NorMuon (row-wise), AdaMuon (element-wise).

A direction turns the Nesterov momentum u of each Muon-branch matrix into the update O. It has
three hooks around the owner-wise exchange, which itself is unchanged:

- ``orthogonalizer``: what the owner runs on the whole matrix (Muon: NS5 times the Muon scale;
  NorMuon and AdaMuon: plain NS5, they scale after their normalization);
- ``pre_ns(u)``: elementwise on each rank's piece before the gather (AdaMuon: sign(u));
- ``post_ns(O)``: on each rank's piece after the return, with the direction's state sharded like
  the parameter (NorMuon: one value per row, AdaMuon: one per element). The Frobenius norms the
  rescaling needs are per-matrix scalars: each rank sums its piece, and one batched all-reduce
  per step and process group (``distributed/piece_sums.py``) completes them. A matrix whose
  pieces split its rows across ranks (TP row-wise, Shard(1)) needs NorMuon's per-row sums
  completed first: one more batched all-reduce of those rows' sums (docs/distributed.md has the
  bytes).

The formulas follow the authors' code:

- NorMuon (zichongli5/NorMuon, normuon.py, ``normuon_update``, lines 35-55 of commit e5aaaf4):
  v = lerp(v, mean_cols(O^2), 1 - beta2) per row (no bias correction); O' = O / (sqrt(v) + 1e-10);
  O' *= ||O||_F / (||O'||_F + 1e-10) (norm kept); then the scale: the authors'
  max(1, rows/cols)^0.5 (``scale = "authors"``) or this package's Muon scale 0.2 sqrt(max(rows,
  cols)) (``scale = "muon"``, default: one lr for both branches, as Muon and AMUSE here).
- AdaMuon (Chongjie-Si/AdaMuon, adamuon.py, ``AdaMuon.step``, lines 73-103 of commit 3b84e03):
  O = NS5(u) unscaled; v = beta2 v + (1 - beta2) O^2; O' = O / (sqrt(v / (1 - beta2^t)) + eps);
  O' *= sqrt(min(rows, cols)) / (||O'||_F + eps); the update is then scaled by
  0.2 sqrt(max(rows, cols)) (lines 58-63, ``update_prev``), so its RMS is 0.2 like Adam's. The sign
  before NS is the paper's (abstract; Theorem 1: f(x) = c sign(x)); that stored code does not
  apply it, so ``sign = false`` gives the code's variant.

Each NS block is a matrix here: a fused QKV weight (``ns_split``) is normalized block by block,
as it is orthogonalized. The math runs in at least fp32 whatever the NS dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from amuse_dist.distributed.layout import local_view
from amuse_dist.distributed.piece_sums import Geometry, sum_over_ranks
from amuse_dist.optim.base import NewtonSchulz
from amuse_dist.optim.newton_schulz import muon_scale, newton_schulz5, ns_flops

DIRECTIONS = ("muon", "normuon", "adamuon")
NORMUON_SCALES = ("muon", "authors")
NORMUON_EPS = 1e-10  # normuon.py: step_size = 1 / (sqrt(v) + 1e-10), vnorm_new + 1e-10


@dataclass(frozen=True)
class PlainNewtonSchulz:
    """NS5 without the Muon scale (the direction scales after its normalization)."""

    steps: int = 5
    dtype: torch.dtype = torch.bfloat16
    kernel: str = "eager"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return newton_schulz5(batch, self.steps, self.dtype, kernel=self.kernel)

    def flops(self, rows: int, cols: int) -> float:
        return float(ns_flops(rows, cols, self.steps))


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def row_state(p: torch.Tensor) -> torch.Tensor:
    """Zeros, one per row of ``p``, sharded like ``p``'s rows (a 1-D DTensor for a DTensor ``p``:
    row shardings kept, column shardings become Replicate), in ``p``'s dtype."""
    if not isinstance(p, DTensor):
        return torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
    placements = [
        pl if isinstance(pl, (Shard, _StridedShard)) and pl.dim == 0 else Replicate()
        for pl in p.placements
    ]
    local = torch.zeros(p.to_local().shape[0], dtype=p.dtype, device=p.to_local().device)
    return DTensor.from_local(
        local, p.device_mesh, placements, run_check=False, shape=(p.shape[0],), stride=(1,)
    )


class Direction:
    """Muon: the orthogonalized momentum as it is (NS5 times the Muon scale on the owner).

    ``prefix`` names the hyper-parameter keys in a param group (the baselines use bare names,
    AMUSE ``normuon_`` / ``adamuon_``).
    """

    name = "muon"
    state_key: str | None = None

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self._key: tuple[int, ...] | None = None
        self._geoms: list[Geometry] = []

    def orthogonalizer(self, steps: int, dtype: torch.dtype, kernel: str = "eager") -> Any:
        return NewtonSchulz(steps, dtype, kernel)

    def new_state(self, p: torch.Tensor) -> torch.Tensor | None:
        return None

    def pre_ns(self, groups: Sequence[dict[str, Any]], updates: list[torch.Tensor]) -> None:
        """Transform each rank's piece of u in place before the gather (elementwise only)."""

    def post_ns(
        self,
        tasks: Any,
        params: Sequence[torch.Tensor],
        groups: Sequence[dict[str, Any]],
        outs: list[torch.Tensor],
        states: Sequence[dict[str, Any]],
        steps: Sequence[int],
    ) -> list[torch.Tensor]:
        """Local pieces of the update O for each parameter. ``tasks()`` gives the exchange's
        ``MatrixTask``s (called only when the parameter set changed); ``steps`` is each
        parameter's step count t (bias corrections)."""
        return outs

    def geometries(self, tasks: Any, params: Sequence[torch.Tensor]) -> list[Geometry]:
        key = tuple(id(p) for p in params)
        if key != self._key:
            self._geoms = [Geometry.of(t) for t in tasks()]
            self._key = key
        return self._geoms

    def hp(self, group: dict[str, Any], key: str) -> Any:
        return group[self.prefix + key]


class NorMuonDirection(Direction):
    """NorMuon: a second moment per row (neuron) of O, then the norm of O restored and scaled."""

    name = "normuon"
    state_key = "normuon_v"

    def orthogonalizer(self, steps: int, dtype: torch.dtype, kernel: str = "eager") -> Any:
        return PlainNewtonSchulz(steps, dtype, kernel)

    def new_state(self, p: torch.Tensor) -> torch.Tensor | None:
        return row_state(p)

    def post_ns(self, tasks, params, groups, outs, states, steps):  # type: ignore[override]
        geoms = self.geometries(tasks, params)
        o = [x.to(_work_dtype(x)) for x in outs]
        rowsq = [x.pow(2).sum(dim=1) for x in o]
        # complete the row sums of matrices split by columns (TP row-wise): rows-long vectors
        split = [i for i, g in enumerate(geoms) if not g.full_width and g.group is not None]
        if split:
            vecs = []
            for i in split:
                g = geoms[i]
                full_rows = sum(n for _, n in g.blocks)
                vec = torch.zeros(full_rows, dtype=torch.float64, device=o[i].device)
                vec[g.row0 : g.row0 + g.rows] = rowsq[i]
                vecs.append(vec)
            summed = sum_over_ranks([geoms[i] for i in split], vecs)
            for i, vec in zip(split, summed, strict=True):
                g = geoms[i]
                rowsq[i] = vec[g.row0 : g.row0 + g.rows].to(rowsq[i].dtype)
        scales, sums = [], []
        for i, g in enumerate(geoms):
            v = local_view(states[i][self.state_key])
            beta2 = self.hp(groups[i], "beta2")
            v.lerp_((rowsq[i] / g.cols).to(v.dtype), 1.0 - beta2)
            inv = 1.0 / (v.sqrt() + NORMUON_EPS)
            scales.append(inv)
            # this piece's share of ||O||^2 and ||O'||^2 per block (rows held by several ranks
            # count once in the sum over ranks)
            parts = []
            for _, sl in g.local_blocks():
                r, d = rowsq[i][sl].to(torch.float64), inv[sl].to(torch.float64)
                parts.append(torch.stack([r.sum(), (r * d * d).sum()]) / g.row_copies)
            sums.append(torch.stack(parts))
        sums = sum_over_ranks(geoms, sums)
        result = []
        for i, g in enumerate(geoms):
            out = o[i] * scales[i].to(o[i].dtype).unsqueeze(1)
            mode = self.hp(groups[i], "scale")
            for (n, sl), (sq, sq_new) in zip(g.local_blocks(), sums[i], strict=True):
                size = max(1.0, n / g.cols) ** 0.5 if mode == "authors" else muon_scale(n, g.cols)
                keep = sq.sqrt() / (sq_new.sqrt() + NORMUON_EPS)
                out[sl] *= (keep * size).to(out.dtype)
            result.append(out)
        return result


class AdaMuonDirection(Direction):
    """AdaMuon: sign(u) before NS; an element-wise second moment of O; RMS aligned to Adam's."""

    name = "adamuon"
    state_key = "adamuon_v"

    def orthogonalizer(self, steps: int, dtype: torch.dtype, kernel: str = "eager") -> Any:
        return PlainNewtonSchulz(steps, dtype, kernel)

    def new_state(self, p: torch.Tensor) -> torch.Tensor | None:
        return torch.zeros_like(p)

    def pre_ns(self, groups: Sequence[dict[str, Any]], updates: list[torch.Tensor]) -> None:
        for group, u in zip(groups, updates, strict=True):
            if self.hp(group, "sign"):
                u.sign_()

    def post_ns(self, tasks, params, groups, outs, states, steps):  # type: ignore[override]
        geoms = self.geometries(tasks, params)
        ohat, sums = [], []
        for i, g in enumerate(geoms):
            o = outs[i].to(_work_dtype(outs[i]))
            v = local_view(states[i][self.state_key])
            beta2, eps = self.hp(groups[i], "beta2"), self.hp(groups[i], "eps")
            v.mul_(beta2).addcmul_(o, o, value=1.0 - beta2)
            denom = (v / (1.0 - beta2 ** steps[i])).sqrt_().add_(eps)
            h = o / denom
            ohat.append(h)
            parts = [
                h[sl].to(torch.float64).pow(2).sum().reshape(1) / g.copies
                for _, sl in g.local_blocks()
            ]
            sums.append(torch.cat(parts))
        sums = sum_over_ranks(geoms, sums)
        for i, g in enumerate(geoms):
            eps = self.hp(groups[i], "eps")
            for (n, sl), sq in zip(g.local_blocks(), sums[i], strict=True):
                # adamuon.py: scale = sqrt(min(m, n)) / (||O'|| + eps), then 0.2 sqrt(max(m, n))
                factor = min(n, g.cols) ** 0.5 / (sq.sqrt() + eps) * muon_scale(n, g.cols)
                ohat[i][sl] *= factor.to(ohat[i].dtype)
        return ohat


def make_direction(name: str, prefix: str = "") -> Direction:
    """The direction named ``name`` ("muon", "normuon", "adamuon")."""
    kinds = {"muon": Direction, "normuon": NorMuonDirection, "adamuon": AdaMuonDirection}
    if name not in kinds:
        raise ValueError(f"direction = {name!r}: expected one of {', '.join(map(repr, kinds))}")
    return kinds[name](prefix)
