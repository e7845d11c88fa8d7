"""Newton-Schulz quintic iteration (NS5): the orthogonalization at the heart of Muon and AMUSE.

Works on a single matrix or a batch of same-shape matrices (leading batch dimension), so an owner
rank can orthogonalize all its same-shape matrices in one call.
"""

from __future__ import annotations

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


def ns_flops(rows: int, cols: int, steps: int = 5) -> int:
    """Matmul FLOPs of NS5 on one rows x cols matrix (used to balance owners)."""
    m, n = min(rows, cols), max(rows, cols)
    # A = X X^T: 2 m^2 n ; A @ A: 2 m^3 ; (bA + cAA) @ X: 2 m^2 n
    return steps * (4 * m * m * n + 2 * m * m * m)


def newton_schulz5(
    g: torch.Tensor,
    steps: int = 5,
    dtype: torch.dtype = torch.bfloat16,
    scale: float = 1.0,
    contiguous: bool = True,
) -> torch.Tensor:
    """Approximately orthogonalize ``g`` (shape [..., rows, cols]) as in the spec, times ``scale``.

    Cast to ``dtype`` (bf16 by default), transpose tall matrices (so the Gram matrix is the small
    side), normalize by the Frobenius norm, then ``steps`` iterations of X <- a X + (b A + c A A) X
    with A = X X^T. Each iteration is three matmul calls in the addmm form: A = X X^T,
    B = b A + c A A (one baddbmm), X = a X + B X (one baddbmm), so the polynomial costs no
    separate elementwise passes; ``scale`` is folded into the last one. Returns ``dtype``;
    ``contiguous=False`` hands tall results back as the transposed view (no copy) for callers
    that read views.
    """
    if g.ndim < 2:
        raise ValueError(f"newton_schulz5 needs a matrix, got shape {tuple(g.shape)}")
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    batch_shape = x.shape[:-2]
    x = x.reshape(-1, *x.shape[-2:])  # baddbmm wants exactly one batch dimension
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + NS_EPS)
    for i in range(steps):
        s = scale if i == steps - 1 else 1.0
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a * s, alpha=s)
    x = x.reshape(*batch_shape, *x.shape[-2:])
    if tall:
        x = x.mT.contiguous() if contiguous else x.mT
    return x


def muon_scale(rows: int, cols: int) -> float:
    """The spec's update scale 0.2 * sqrt(max(rows, cols)) (matches AdamW's update RMS)."""
    return 0.2 * max(rows, cols) ** 0.5
