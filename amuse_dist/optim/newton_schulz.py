"""Newton-Schulz quintic iteration (NS5): the orthogonalization at the heart of Muon and AMUSE.

Works on a single matrix or a batch of same-shape matrices (leading batch dimension), so an owner
rank can orthogonalize all its same-shape matrices in one call.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

NS_KERNELS = ("auto", "eager", "triton")
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


def ns_flops(rows: int, cols: int, steps: int = 5) -> int:
    """Matmul FLOPs of NS5 on one rows x cols matrix (used to balance owners)."""
    m, n = min(rows, cols), max(rows, cols)
    # A = X X^T: 2 m^2 n ; A @ A: 2 m^3 ; (bA + cAA) @ X: 2 m^2 n. The standard count: the
    # symmetric kernels do about half of the first two, and rates are quoted against this figure.
    return steps * (4 * m * m * n + 2 * m * m * m)


def newton_schulz5(
    g: torch.Tensor,
    steps: int = 5,
    dtype: torch.dtype = torch.bfloat16,
    scale: float = 1.0,
    contiguous: bool = True,
    kernel: str = "eager",
) -> torch.Tensor:
    """Approximately orthogonalize ``g`` (shape [..., rows, cols]) as in the spec, times ``scale``.

    Cast to ``dtype`` (bf16 by default), transpose tall matrices (so the Gram matrix is the small
    side), normalize by the Frobenius norm, then ``steps`` iterations of X <- a X + (b A + c A A) X
    with A = X X^T. Each iteration is three matmul calls in the addmm form: A = X X^T,
    B = b A + c A A (one baddbmm), X = a X + B X (one baddbmm), so the polynomial costs no
    separate elementwise passes; ``scale`` is folded into the last one. Returns ``dtype``;
    ``contiguous=False`` hands tall results back as the transposed view (no copy) for callers
    that read views.

    ``kernel`` picks how the two symmetric products (A and b A + c A A) run: "eager" (full
    matmuls; the CPU path and the reference), "triton" (``ns_triton``: one block triangle each,
    about 2/3 of NS5's FLOPs in all), "auto" (triton on CUDA when it imports, else eager).
    The default is "eager", as for the optimizers' ``ns_kernel``: the kernel is opt-in everywhere.
    """
    if g.ndim < 2:
        raise ValueError(f"newton_schulz5 needs a matrix, got shape {tuple(g.shape)}")
    sym = _symmetric_kernels(kernel, g.device)
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    batch_shape = x.shape[:-2]
    x = x.reshape(-1, *x.shape[-2:])  # baddbmm wants exactly one batch dimension
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + NS_EPS)
    gram = poly = None
    for i in range(steps):
        s = scale if i == steps - 1 else 1.0
        if sym is None:
            gram = torch.bmm(x, x.mT)
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        else:  # the same products, one triangle each, into buffers reused across iterations
            gram = sym.sym_product(x, 1.0, out=gram)
            poly = sym.sym_product(gram, c, b, d=gram, out=poly)
        x = torch.baddbmm(x, poly, x, beta=a * s, alpha=s)
    x = x.reshape(*batch_shape, *x.shape[-2:])
    if tall:
        x = x.mT.contiguous() if contiguous else x.mT
    return x


@functools.cache
def _triton_module() -> ModuleType | None:
    try:
        from amuse_dist.optim import ns_triton
    except ImportError:  # no triton (a CPU-only install): the eager path serves
        return None
    return ns_triton


def _symmetric_kernels(kernel: str, device: torch.device) -> ModuleType | None:
    """The ``ns_triton`` module when ``kernel`` asks for it (or "auto" on CUDA), else None."""
    if kernel not in NS_KERNELS:
        raise ValueError(f"Newton-Schulz kernel must be one of {NS_KERNELS}, got {kernel!r}")
    if kernel == "eager" or (kernel == "auto" and device.type != "cuda"):
        return None
    module = _triton_module()
    if module is None and kernel == "triton":
        raise RuntimeError(
            'Newton-Schulz kernel "triton" needs the triton package (pip install triton)'
        )
    return module


def muon_scale(rows: int, cols: int) -> float:
    """The spec's update scale 0.2 * sqrt(max(rows, cols)) (matches AdamW's update RMS)."""
    return 0.2 * max(rows, cols) ** 0.5
