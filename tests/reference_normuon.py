"""A plain single-process NorMuon, written from the paper and the authors' code for testing.

zichongli5/NorMuon normuon.py ``normuon_update`` (commit e5aaaf4, lines 35-55), one matrix at a
time, float64 except NS: m <- lerp(m, g, 1 - mu); u <- lerp(g, m, mu); O <- NS5(u);
v <- lerp(v, mean over columns of O^2, 1 - beta2) (one value per row, no bias correction);
O' <- O / (sqrt(v) + 1e-10); O' <- O' ||O|| / (||O'|| + 1e-10); then the scale. The AdamW
branch is their ``adam_update`` with decoupled weight decay. Shares no code with amuse_dist.
"""

from __future__ import annotations

import math

import torch

from tests.reference_amuse import ns5


class RowNormalizer:
    """NorMuon's post-NS normalization with its per-row state; ``__call__(i, u, t)`` is the
    ``direction`` hook of ``ReferenceAMUSE`` too."""

    def __init__(self, shapes, beta2=0.95, scale="muon", ns_steps=5, ns_dtype=torch.float32):
        self.v = {i: torch.zeros(s[0], dtype=torch.float64) for i, s in shapes.items()}
        self.beta2, self.scale, self.ns_steps, self.ns_dtype = beta2, scale, ns_steps, ns_dtype

    def __call__(self, i: int, u: torch.Tensor, t: int) -> torch.Tensor:
        o = ns5(u, self.ns_steps, self.ns_dtype).to(torch.float64)
        rows, cols = o.shape
        norm = torch.linalg.matrix_norm(o)
        self.v[i] = self.beta2 * self.v[i] + (1 - self.beta2) * (o * o).mean(dim=1)
        o = o / (self.v[i].sqrt() + 1e-10)[:, None]
        o = o * norm / (torch.linalg.matrix_norm(o) + 1e-10)
        if self.scale == "authors":
            return o * max(1.0, rows / cols) ** 0.5
        return o * 0.2 * math.sqrt(max(rows, cols))


class ReferenceNorMuon:
    def __init__(
        self,
        params,
        *,
        lr,
        momentum=0.95,
        beta2=0.95,
        weight_decay=0.0,
        adamw_betas=(0.9, 0.95),
        adamw_eps=1e-10,
        scale="muon",
        ns_dtype=torch.float32,
    ):
        self.params, self.lr, self.mu, self.wd = params, lr, momentum, weight_decay
        self.betas, self.eps = adamw_betas, adamw_eps
        self.m = [torch.zeros_like(p) for p, _ in params]
        self.v = [torch.zeros_like(p) for p, _ in params]
        shapes = {i: tuple(p.shape) for i, (p, muon) in enumerate(params) if muon}
        self.norm = RowNormalizer(shapes, beta2, scale, ns_dtype=ns_dtype)
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        for i, (p, muon) in enumerate(self.params):
            g = p.grad
            if muon:
                self.m[i] = self.mu * self.m[i] + (1 - self.mu) * g
                o = self.norm(i, (1 - self.mu) * g + self.mu * self.m[i], self.t).to(p.dtype)
            else:
                self.m[i] = b1 * self.m[i] + (1 - b1) * g
                self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
                mhat, vhat = self.m[i] / (1 - b1**self.t), self.v[i] / (1 - b2**self.t)
                o = mhat / (vhat.sqrt() + self.eps)
            p.mul_(1 - self.lr * self.wd).sub_(self.lr * o)
