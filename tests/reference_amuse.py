"""A plain single-process AMUSE, written straight from docs/the spec for testing.

Shares no code with amuse_dist on purpose: float64 scalars, explicit formulas, one matrix at a time.
"""

from __future__ import annotations

import math

import torch


def ns5(g: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    x = g.to(dtype)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    for _ in range(steps):
        a_mat = x @ x.T
        x = 3.4445 * x + (-4.7750 * a_mat + 2.0315 * (a_mat @ a_mat)) @ x
    if transposed:
        x = x.T
    return x


class ReferenceAMUSE:
    def __init__(
        self,
        params: list[tuple[torch.Tensor, bool]],
        *,
        lr,
        warmup_steps,
        beta1=0.6,
        rho=0.8,
        momentum=0.95,
        weight_decay=0.0,
        beta2=0.999,
        eps=1e-10,
        power=2.0,
        r=0.0,
        ns_steps=5,
        exact_x=False,
        ns_dtype=torch.float32,
        direction=None,
    ):
        self.params = params
        self.lr, self.T0, self.beta1, self.rho = lr, warmup_steps, beta1, rho
        self.mu, self.wd, self.beta2, self.eps = momentum, weight_decay, beta2, eps
        self.power, self.r, self.ns_steps, self.exact_x = power, r, ns_steps, exact_x
        self.ns_dtype = ns_dtype
        # direction(i, u, t) -> O for Muon-branch matrix i (tests/reference_normuon.py, ...);
        # None: Muon's NS5(u) * 0.2 sqrt(max(rows, cols))
        self.direction = direction
        self.t = 0
        self.A = 0.0
        self.c_T0 = 0.0
        self.beta_y = beta1
        self.z = [p.detach().clone() for p, _ in params]
        self.buf = [torch.zeros_like(p) for p, _ in params]
        self.beta = beta1

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        t = self.t
        lr_t = self.lr * min(1.0, t / self.T0)
        w = t**self.r * lr_t**self.power
        self.A += w
        c = w / self.A
        if t == self.T0:
            self.c_T0 = c
        if t <= self.T0:
            beta = self.beta1
        else:
            s = (c / (1 - c)) * ((1 - self.c_T0) / self.c_T0)
            beta = 1 - (1 - self.beta1) * s**self.rho
        beta_conv = self.beta_y if self.exact_x else beta
        for i, (p, use_muon) in enumerate(self.params):
            g = p.grad
            y, z = p.data, self.z[i]
            x = z + (y - z) / beta_conv
            if use_muon:
                m = self.buf[i]
                m.copy_(self.mu * m + (1 - self.mu) * g)
                u = (1 - self.mu) * g + self.mu * m
                if self.direction is not None:
                    o = self.direction(i, u, t).to(g.dtype)
                else:
                    o = ns5(u, self.ns_steps, self.ns_dtype).to(g.dtype)
                    o = o * 0.2 * math.sqrt(max(g.shape))
            else:
                v = self.buf[i]
                v.copy_(self.beta2 * v + (1 - self.beta2) * g * g)
                o = g / (torch.sqrt(v / (1 - self.beta2**t)) + self.eps)
            z.copy_(z * (1 - lr_t * self.wd) - lr_t * o)
            x = x + c * (z - x)
            p.data.copy_(x + (1 - beta) * (z - x))
        self.beta_y = beta
        self.beta = beta

    def x(self) -> list[torch.Tensor]:
        return [
            z + (p.data - z) / self.beta_y for (p, _), z in zip(self.params, self.z, strict=True)
        ]
