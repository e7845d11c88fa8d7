"""Plain torch references for the symmetric-aware Newton-Schulz kernels (``optim/ns_triton``).

``sym_product_reference`` is what the kernel computes: ``alpha * P P^T + beta * D`` accumulated in
fp32 from the input dtype, rounded once, the upper triangle mirrored (so exactly symmetric).
``newton_schulz5_symmetric_reference`` is NS5 with those two products, i.e. the numerics of
``newton_schulz5(kernel="triton")`` at any size, on CPU, in any dtype (the Triton interpreter runs
the kernel itself only at small sizes and not in bf16).
"""

from __future__ import annotations

import torch

from amuse_dist.optim.newton_schulz import NS_COEFFS, NS_EPS


def mirror_upper(full: torch.Tensor) -> torch.Tensor:
    return torch.triu(full) + torch.triu(full, 1).mT


def sym_product_reference(
    p: torch.Tensor, alpha: float, beta: float = 0.0, d: torch.Tensor | None = None
) -> torch.Tensor:
    work = torch.promote_types(p.dtype, torch.float32)
    full = alpha * (p.to(work) @ p.to(work).mT)
    if d is not None:
        full = full + beta * d.to(work)
    return mirror_upper(full).to(p.dtype)


def newton_schulz5_symmetric_reference(
    g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + NS_EPS)
    for _ in range(steps):
        gram = sym_product_reference(x, 1.0)
        poly = sym_product_reference(gram, c, b, d=gram)
        x = torch.baddbmm(x, poly, x, beta=a, alpha=1.0)
    return x.mT if tall else x


def orthogonality_error(o: torch.Tensor) -> torch.Tensor:
    """||O O^T - I||_F / sqrt(m) per matrix, in fp64 (O wide: m <= n)."""
    o = o.double()
    if o.size(-2) > o.size(-1):
        o = o.mT
    m = o.size(-2)
    eye = torch.eye(m, dtype=torch.float64, device=o.device)
    return (o @ o.mT - eye).norm(dim=(-2, -1)) / m**0.5
