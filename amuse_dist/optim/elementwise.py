"""AMUSE's elementwise math as one pass per branch and dtype group: three custom ops.

Everything but Newton-Schulz is elementwise. Each branch's math is one ``torch.library`` op over
lists of tensors, so a step dispatches a fixed number of ops whatever the depth, and what one op
reads and writes is exactly one pass over its tensors:

* ``amuse::nesterov``   reads g, m; writes m and u (u already in the NS dtype, straight into the
                        exchange/NS buffer the caller hands in): 4 + 4 + 4 + 2 = 14 bytes per
                        fp32 element with bf16 NS;
* ``amuse::muon_post``  reads y, z, O; writes z, y (x is never stored): 4 + 4 + 2 + 4 + 4 = 18;
* ``amuse::adamw_step`` reads g, v, y, z; writes v, z, y: 28.

So 32 bytes per Muon-branch element and 28 per AdamW-branch element, where the previous chain of
foreach calls moved about 68 and 92. The update RMS (sum of O^2 per branch, weighted by 1/replicas
per tensor) is accumulated inside the same op, into a persistent accumulator (shape [1]: dynamo
treats a 0-dim CPU tensor as a constant and drops its mutation), with foreach norms: no
per-parameter ops on logging steps either.

Implementations: on CUDA one ``torch.compile(fullgraph=True)`` graph over the lists (inductor fuses
each op into one horizontal pass; per-step scalars travel as one tensor, so nothing recompiles);
everywhere else the eager foreach chain, which is the bitwise reference the numerics tests pin.
``compiled_impl(backend)`` exposes the compiled form so CPU tests check it against the reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

Tensors = list[torch.Tensor]


# ------------------------------------------------------------------------------- eager reference
def _accumulate_sq(o: Tensors, sq: torch.Tensor | None, weights: torch.Tensor | None) -> None:
    """sq += sum_i w_i |o_i|^2 with one foreach norm (fp32 or better) and one reduction."""
    if sq is None or not o:
        return
    dtype = torch.promote_types(o[0].dtype, torch.float32)
    norms = torch.stack(torch._foreach_norm(o, 2, dtype=dtype)).to(torch.float64)
    norms = norms.square()
    if weights is not None:
        norms = norms * weights
    sq.add_(norms.sum())


def nesterov_eager(g: Tensors, m: Tensors, u: Tensors, mu: float) -> None:
    """m <- mu m + (1 - mu) g in place; u <- (1 - mu) g + mu m, written into ``u`` (any dtype).

    With a momentum dtype other than the gradient's (bf16 momentum), g is first rounded to the
    momentum's dtype and u computed there, then cast into ``u``: the same rounding as before the
    fused op existed.
    """
    if not g:
        return
    if all(mi.dtype == gi.dtype for mi, gi in zip(m, g, strict=True)):
        torch._foreach_lerp_(m, g, 1.0 - mu)
        torch._foreach_copy_(u, torch._foreach_lerp(g, m, mu))
        return
    if all(ui.dtype == mi.dtype for ui, mi in zip(u, m, strict=True)):
        tmp = u  # u's own dtype is the momentum's: compute in place in the NS buffer
    else:
        tmp = [torch.empty_like(mi) for mi in m]
    torch._foreach_copy_(tmp, g)
    torch._foreach_lerp_(m, tmp, 1.0 - mu)
    torch._foreach_lerp_(tmp, m, mu)
    if tmp is not u:
        torch._foreach_copy_(u, tmp)


def _xzy(y: Tensors, z: Tensors, s: list[float]) -> None:
    """y <- x = z + (y - z) / beta_conv (s[0] = 1 - 1/beta_conv); z <- z (1 - lr wd) (s[1])."""
    torch._foreach_lerp_(y, z, s[0])  # y now holds x
    if s[1] != 1.0:
        torch._foreach_mul_(z, s[1])


def muon_post_eager(
    y: Tensors,
    z: Tensors,
    o: Tensors,
    s: list[float],
    sq: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> None:
    """x from (y, z); z <- z (1 - lr wd) - lr O; y <- lerp(x, z', 1 - beta (1 - c)).

    ``s`` = [1 - 1/beta_conv, 1 - lr wd, lr, 1 - beta (1 - c)].
    """
    if not y:
        return
    _accumulate_sq(o, sq, weights)
    _xzy(y, z, s)
    if z[0].is_cuda and o[0].dtype != z[0].dtype:  # CUDA's multi-tensor kernels want one dtype
        o = [oi.to(zi.dtype) for oi, zi in zip(o, z, strict=True)]
    torch._foreach_add_(z, o, alpha=-s[2])
    torch._foreach_lerp_(y, z, s[3])


def adamw_step_eager(
    y: Tensors,
    z: Tensors,
    g: Tensors,
    v: Tensors,
    s: list[float],
    sq: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> None:
    """v <- b2 v + (1 - b2) g^2; O = g / (sqrt(v / (1 - b2^t)) + eps); then as ``muon_post``.

    ``s`` = [1 - 1/beta_conv, 1 - lr wd, lr, 1 - beta (1 - c), b2, 1 - b2^t, eps, 1 - b2]
    (every coefficient computed on the host in float64).
    """
    if not y:
        return
    b2, bias, eps = s[4], s[5], s[6]
    torch._foreach_mul_(v, b2)
    torch._foreach_addcmul_(v, g, g, value=s[7])
    denom = torch._foreach_div(v, bias)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    if sq is not None:
        _accumulate_sq(torch._foreach_div(g, denom), sq, weights)
    _xzy(y, z, s)
    torch._foreach_addcdiv_(z, g, denom, value=-s[2])
    torch._foreach_lerp_(y, z, s[3])


# ------------------------------------------------------------------------- compiled (one graph)
def _sq_of(o: Tensors, weights: torch.Tensor) -> torch.Tensor:
    parts = [oi.float().square().sum(dtype=torch.float64) for oi in o]
    return (torch.stack(parts) * weights).sum()


def nesterov_math(g: Tensors, m: Tensors, u: Tensors, mu: float) -> None:
    """The Nesterov pass as a graph (m, u mutated): the compiled form."""
    for gi, mi, ui in zip(g, m, u, strict=True):
        m_new = mi.float() * mu + gi.float() * (1.0 - mu)
        mi.copy_(m_new)
        ui.copy_(gi.float() * (1.0 - mu) + m_new * mu)


def muon_post_math(
    y: Tensors,
    z: Tensors,
    o: Tensors,
    s: torch.Tensor,
    sq: torch.Tensor | None,
    weights: torch.Tensor | None,
) -> None:
    """The Muon post-NS pass as a graph; ``s`` is a tensor (no recompiles as scalars change)."""
    if sq is not None and weights is not None:
        sq.add_(_sq_of(o, weights))
    for yi, zi, oi in zip(y, z, o, strict=True):
        x = yi + s[0] * (zi - yi)
        z_new = zi * s[1] - s[2] * oi.float()
        zi.copy_(z_new)
        yi.copy_(x + s[3] * (z_new - x))


def adamw_step_math(
    y: Tensors,
    z: Tensors,
    g: Tensors,
    v: Tensors,
    s: torch.Tensor,
    sq: torch.Tensor | None,
    weights: torch.Tensor | None,
) -> None:
    """The AdamW-branch pass as a graph."""
    o = []
    for yi, zi, gi, vi in zip(y, z, g, v, strict=True):
        v_new = vi * s[4] + s[7] * gi * gi
        vi.copy_(v_new)
        oi = gi / ((v_new / s[5]).sqrt() + s[6])
        o.append(oi)
        x = yi + s[0] * (zi - yi)
        z_new = zi * s[1] - s[2] * oi
        zi.copy_(z_new)
        yi.copy_(x + s[3] * (z_new - x))
    if sq is not None and weights is not None:
        sq.add_(_sq_of(o, weights))


@functools.cache
def compiled_impl(name: str, backend: str = "inductor") -> Callable[..., None]:
    """``torch.compile(fullgraph=True)`` of one pass (``nesterov``, ``muon_post``, ``adamw_step``).

    Built once per process and backend; shapes are fixed from step to step, so one graph per
    parameter set.
    """
    fn = {"nesterov": nesterov_math, "muon_post": muon_post_math, "adamw_step": adamw_step_math}
    return torch.compile(fn[name], fullgraph=True, dynamic=False, backend=backend)


def _scalars(s: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(s, dtype=torch.float32, device=like.device)


# --------------------------------------------------------------------------------- the ops
@torch.library.custom_op("amuse::nesterov", mutates_args=("m", "out"))
def nesterov(g: Tensors, m: Tensors, out: Tensors, mu: float) -> None:
    """One pass: momentum update and the Nesterov direction written into ``out`` (the NS
    buffer; write-only, as an aten ``out`` argument)."""
    nesterov_eager(g, m, out, mu)


@nesterov.register_kernel("cuda")
def _(g: Tensors, m: Tensors, out: Tensors, mu: float) -> None:
    if g:
        compiled_impl("nesterov")(g, m, out, mu)


@nesterov.register_fake
def _(g: Tensors, m: Tensors, out: Tensors, mu: float) -> None:
    return None


@torch.library.custom_op("amuse::muon_post", mutates_args=("y", "z", "sq"))
def muon_post(
    y: Tensors,
    z: Tensors,
    o: Tensors,
    s: list[float],
    sq: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> None:
    """One pass: x, z and y from the orthogonalized direction ``o`` (and its sum of squares)."""
    muon_post_eager(y, z, o, s, sq, weights)


@muon_post.register_kernel("cuda")
def _(y, z, o, s, sq=None, weights=None) -> None:  # type: ignore[no-untyped-def]
    if y:
        compiled_impl("muon_post")(y, z, o, _scalars(s, y[0]), sq, weights)


@muon_post.register_fake
def _(y, z, o, s, sq=None, weights=None) -> None:  # type: ignore[no-untyped-def]
    return None


@torch.library.custom_op("amuse::adamw_step", mutates_args=("y", "z", "v", "sq"))
def adamw_step(
    y: Tensors,
    z: Tensors,
    g: Tensors,
    v: Tensors,
    s: list[float],
    sq: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> None:
    """One pass: the AdamW-branch second moment, direction and the x, z, y update."""
    adamw_step_eager(y, z, g, v, s, sq, weights)


@adamw_step.register_kernel("cuda")
def _(y, z, g, v, s, sq=None, weights=None) -> None:  # type: ignore[no-untyped-def]
    if y:
        compiled_impl("adamw_step")(y, z, g, v, _scalars(s, y[0]), sq, weights)


@adamw_step.register_fake
def _(y, z, g, v, s, sq=None, weights=None) -> None:  # type: ignore[no-untyped-def]
    return None
