"""Run with TRITON_INTERPRET=1 (set by the test): the Triton symmetric NS kernels on CPU, fp32.

Checks, failing with an AssertionError naming the case: ``sym_product`` against
``tests.reference_ns`` (both uses: P P^T and c A A + b A; batched, non-contiguous, sizes that
are not a multiple of the block, exact symmetry), and ``newton_schulz5(kernel="triton")``
against the eager path and the symmetric reference (1e-5). The interpreter mishandles bf16, so
bf16 is left to the reference test in-process and the GPU test.
"""

from __future__ import annotations

import os

import torch

from amuse_dist.optim.newton_schulz import newton_schulz5
from amuse_dist.optim.ns_triton import sym_product
from tests.reference_ns import newton_schulz5_symmetric_reference, sym_product_reference


def close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"
    print(f"{name}: ok ({err:.2e})")


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.manual_seed(0)
    for shape, block in (((3, 40, 72), (16, 16)), ((1, 33, 20), (16, 16)), ((2, 50, 64), None)):
        p = torch.randn(*shape)
        gram = sym_product(p, 1.0, block=block)
        assert torch.equal(gram, gram.mT), f"P P^T {shape}: not exactly symmetric"
        close(f"P P^T {shape} block {block}", gram, sym_product_reference(p, 1.0))
        poly = sym_product(gram, -4.775, 2.0315, d=gram, block=block)
        assert torch.equal(poly, poly.mT), f"c A A + b A {shape}: not exactly symmetric"
        close(f"c A A + b A {shape}", poly, sym_product_reference(gram, -4.775, 2.0315, d=gram))
        pt = torch.randn(shape[0], shape[2], shape[1]).mT  # a transposed view: strides honoured
        close(f"P P^T non-contiguous {shape}", sym_product(pt, 1.0, block=block), pt @ pt.mT)
    out = torch.empty(3, 40, 40)
    assert sym_product(torch.randn(3, 40, 72), 1.0, out=out, block=(16, 16)) is out, "out= unused"
    for shape in ((3, 40, 72), (2, 72, 40), (1, 96, 96), (2, 17, 130)):
        g = torch.randn(*shape)
        new = newton_schulz5(g, dtype=torch.float32, kernel="triton")
        close(
            f"NS5 triton vs eager {shape}",
            new,
            newton_schulz5(g, dtype=torch.float32, kernel="eager"),
        )
        ref = newton_schulz5_symmetric_reference(g, dtype=torch.float32)
        close(f"NS5 triton vs symmetric reference {shape}", new, ref)
    print("ns kernel worker: all ok")


if __name__ == "__main__":
    main()
