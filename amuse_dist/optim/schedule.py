"""AMUSE's per-group scalars: warmup LR, averaging weight c_t and interpolation beta_t.

Pure Python floats (float64), computed identically on every rank without communication.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepScalars:
    t: int
    lr: float  # lr_t, after the optimizer's internal linear warmup
    weight_sum: float  # A after this step
    c: float  # c_t = w_t / A, the averaging weight of z into x
    c_warmup: float  # c_T0 (0.0 until t reaches T0)
    beta: float  # beta_t, the interpolation of y between x and z


def step_scalars(
    t: int,
    *,
    lr: float,
    warmup_steps: int,
    beta1: float,
    rho: float,
    weight_lr_power: float,
    r: float,
    weight_sum: float,
    c_warmup: float,
) -> StepScalars:
    """Scalars of step ``t`` (1-based) given A and c_T0 after step t-1, as in the spec."""
    lr_t = lr * min(1.0, t / warmup_steps)
    w_t = (t**r) * (lr_t**weight_lr_power)
    a = weight_sum + w_t
    c_t = w_t / a
    if t == warmup_steps:
        c_warmup = c_t
    if t <= warmup_steps:
        beta = beta1
    else:
        if c_t >= 1.0:
            raise ValueError(
                f"step {t}: the averaging weight c_t = w_t / A rounds to 1 (w_t = "
                f"{w_t:.3g}, A = {a:.3g}): lr {lr:g} is far too large for the weights so far; "
                "lower the lr"
            )
        s = (c_t / (1.0 - c_t)) * ((1.0 - c_warmup) / c_warmup)
        beta = 1.0 - (1.0 - beta1) * s**rho
    return StepScalars(t, lr_t, a, c_t, c_warmup, beta)
