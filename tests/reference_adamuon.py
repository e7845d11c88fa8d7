"""A plain single-process AdaMuon, written from the paper and the authors' code for testing.

Paper (arXiv 2507.11005, abstract and Theorem 1): the momentum is sign-transformed before the
polar step. Chongjie-Si/AdaMuon adamuon.py (commit 3b84e03, ``AdaMuon.step`` lines 73-103 and
``update_prev`` lines 58-63): O <- NS5(.); v <- beta2 v + (1 - beta2) O^2 (element-wise);
O' <- O / (sqrt(v / (1 - beta2^t)) + eps); O' <- O' sqrt(min(m, n)) / (||O'|| + eps); the update
is O' 0.2 sqrt(max(m, n)). One matrix at a time, float64 except NS. Shares no code with amuse_dist.
"""

from __future__ import annotations

import math

import torch

from tests.reference_amuse import ns5


class ElementNormalizer:
    """AdaMuon's sign, NS and post-NS normalization with its element-wise state;
    ``__call__(i, u, t)`` is the ``direction`` hook of ``ReferenceAMUSE`` too."""

    def __init__(
        self, shapes, beta2=0.999, eps=1e-8, sign=True, ns_steps=5, ns_dtype=torch.float32
    ):
        self.v = {i: torch.zeros(s, dtype=torch.float64) for i, s in shapes.items()}
        self.beta2, self.eps, self.sign = beta2, eps, sign
        self.ns_steps, self.ns_dtype = ns_steps, ns_dtype

    def __call__(self, i: int, u: torch.Tensor, t: int) -> torch.Tensor:
        if self.sign:
            u = torch.sign(u)
        o = ns5(u, self.ns_steps, self.ns_dtype).to(torch.float64)
        rows, cols = o.shape
        self.v[i] = self.beta2 * self.v[i] + (1 - self.beta2) * o * o
        o = o / ((self.v[i] / (1 - self.beta2**t)).sqrt() + self.eps)
        o = o * math.sqrt(min(rows, cols)) / (torch.linalg.matrix_norm(o) + self.eps)
        return o * 0.2 * math.sqrt(max(rows, cols))


class ReferenceAdaMuon:
    def __init__(
        self,
        params,
        *,
        lr,
        momentum=0.95,
        beta2=0.999,
        eps=1e-8,
        sign=True,
        weight_decay=0.01,
        adamw_betas=(0.9, 0.95),
        adamw_eps=1e-8,
        ns_dtype=torch.float32,
    ):
        self.params, self.lr, self.mu, self.wd = params, lr, momentum, weight_decay
        self.betas, self.adamw_eps = adamw_betas, adamw_eps
        self.m = [torch.zeros_like(p) for p, _ in params]
        self.v = [torch.zeros_like(p) for p, _ in params]
        shapes = {i: tuple(p.shape) for i, (p, muon) in enumerate(params) if muon}
        self.norm = ElementNormalizer(shapes, beta2, eps, sign, ns_dtype=ns_dtype)
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
                o = mhat / (vhat.sqrt() + self.adamw_eps)
            p.mul_(1 - self.lr * self.wd).sub_(self.lr * o)
