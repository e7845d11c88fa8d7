"""Symmetric-aware Newton-Schulz products on the GPU: one Triton kernel, two uses.

Each NS5 iteration computes A = X X^T and B = b A + c A A, both symmetric. The eager path
(``newton_schulz5``, the CPU path and the reference) spends full matmuls on them; here one kernel
computes only the blocks on and above the diagonal of ``alpha * P P^T + beta * D`` and writes each
block twice (in place and mirrored), so those two products cost about half their FLOPs:

* A = X X^T          is ``sym_product(X, 1, 0)``        (P = X, m x n, no D)
* B = c A A + b A    is ``sym_product(A, c, b, D=A)``   (P = A: A A = A A^T since A is symmetric)

The third product, X <- a X + B X, has no symmetry and stays one ``baddbmm``.

Block sizes come from a fixed rule (no autotuning: the same shapes launch the same kernel on
every rank, and the interpreter, ``TRITON_INTERPRET=1``, runs it on CPU in the tests). Accumulation
is fp32; fp32 inputs use IEEE dots (no TF32), so the fp32 path is comparable with the eager one.
This module imports triton; ``newton_schulz`` imports it only when the kernel path is chosen.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sym_product_kernel(
    p_ptr,
    d_ptr,
    out_ptr,
    m,
    k,
    p_sb,
    p_sr,
    p_sc,
    d_sb,
    d_sr,
    d_sc,
    o_sb,
    o_sr,
    o_sc,
    alpha,
    beta,
    HAS_D: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    bi = tl.program_id(0)
    bj = tl.program_id(1)
    if bi > bj:  # below the diagonal: written by block (bj, bi) as its mirror
        return
    batch = tl.program_id(2).to(tl.int64)
    p_ptr += batch * p_sb
    out_ptr += batch * o_sb
    rows = bi * BLOCK + tl.arange(0, BLOCK)
    cols = bj * BLOCK + tl.arange(0, BLOCK)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        kk = k0 + ks
        left = tl.load(
            p_ptr + rows[:, None] * p_sr + kk[None, :] * p_sc,
            mask=(rows[:, None] < m) & (kk[None, :] < k),
            other=0.0,
        )
        right = tl.load(  # rows `cols` of P, read transposed: (P^T)[kk, cols]
            p_ptr + kk[:, None] * p_sc + cols[None, :] * p_sr,
            mask=(kk[:, None] < k) & (cols[None, :] < m),
            other=0.0,
        )
        if IEEE:
            acc = tl.dot(left, right, acc, input_precision="ieee")
        else:
            acc = tl.dot(left, right, acc)
    acc = acc * alpha
    inside = (rows[:, None] < m) & (cols[None, :] < m)
    if HAS_D:
        d = tl.load(
            d_ptr + batch * d_sb + rows[:, None] * d_sr + cols[None, :] * d_sc,
            mask=inside,
            other=0.0,
        )
        acc += beta * d.to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * o_sr + cols[None, :] * o_sc, out, mask=inside)
    if bi < bj:
        mirror = (cols[:, None] < m) & (rows[None, :] < m)
        tl.store(out_ptr + cols[:, None] * o_sr + rows[None, :] * o_sc, tl.trans(out), mask=mirror)


def blocks_for(m: int) -> tuple[int, int, int]:
    """(BLOCK, BLOCK_K, num_warps) for an m x m output: big tiles for big Gram matrices."""
    if m >= 1024:
        return 128, 64, 8
    if m >= 256:
        return 64, 64, 4
    return 32, 32, 4


def sym_product(
    p: torch.Tensor,
    alpha: float,
    beta: float = 0.0,
    d: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``alpha * p @ p^T + beta * d`` for a batch ``p`` [B, m, k] (``d`` symmetric [B, m, m]).

    Only the upper block triangle is computed; the result is exactly symmetric. ``out`` may be a
    persistent buffer ([B, m, m], ``p``'s dtype); ``block`` overrides (BLOCK, BLOCK_K) (tests).
    """
    if p.ndim != 3:
        raise ValueError(f"sym_product needs a batch [B, m, k], got shape {tuple(p.shape)}")
    nb, m, k = p.shape
    if out is None:
        out = torch.empty(nb, m, m, dtype=p.dtype, device=p.device)
    if d is not None and d.shape != out.shape:
        raise ValueError(f"sym_product: d has shape {tuple(d.shape)}, expected {tuple(out.shape)}")
    size, size_k, warps = blocks_for(m)
    if block is not None:
        size, size_k = block
    tiles = triton.cdiv(m, size)
    dd = d if d is not None else out  # never read when HAS_D is false
    _sym_product_kernel[(tiles, tiles, nb)](
        p,
        dd,
        out,
        m,
        k,
        *p.stride(),
        *dd.stride(),
        *out.stride(),
        float(alpha),
        float(beta),
        HAS_D=d is not None,
        BLOCK=size,
        BLOCK_K=size_k,
        IEEE=p.dtype in (torch.float32, torch.float64),
        num_warps=warps,
    )
    return out
