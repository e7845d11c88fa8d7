"""The optimizer step's shape: a bounded number of ops, no host sync, tracking that changes nothing.

Op counts use the benchmark's own counter (benchmarks/optimizer_step.py) on torchtitan's
"debugmodel" Llama at two depths.
"""

from __future__ import annotations

import copy
import sys
from collections import Counter

import pytest
import torch

from amuse_dist import AMUSE, param_groups
from amuse_dist.optim import elementwise
from amuse_dist.optim.newton_schulz import newton_schulz5
from benchmarks.optimizer_step import (
    COPY_OPS,
    build_model,
    count_step,
    fill,
    local_optimizer,
    ops_per_step,
)
from benchmarks.optimizer_step import (
    SYNC_OPS as HOST_READS,
)
from tests.reference_amuse import ns5
from tests.toy import batch, loss_fn, make_model

pytestmark = pytest.mark.unit

HP = dict(lr=0.02, warmup_steps=4, beta1=0.6, rho=0.8, momentum=0.95, weight_decay=0.05)
SYNC_OPS = {"aten::item", "aten::_local_scalar_dense"}


@pytest.fixture(scope="module")
def op_counts() -> dict[tuple[str, int], dict[str, int]]:
    return {
        (name, depth): dict(ops_per_step(name, "debug", depth, "cpu"))
        for name in ("amuse", "amuse+ns", "amuse_bare", "adamw_foreach")
        for depth in (2, 4)
    }


def test_amuse_ops_per_step_bounded_and_flat_in_depth(op_counts: dict) -> None:
    amuse2, amuse4 = (sum(op_counts["amuse", d].values()) for d in (2, 4))
    adamw4 = op_counts["adamw_foreach", 4]
    adamw_no_item = sum(n for op, n in adamw4.items() if op != "aten::item")
    assert amuse2 == amuse4, (op_counts["amuse", 2], op_counts["amuse", 4])
    # against AdamW(foreach) without its per-parameter .item() on the step counters (stricter
    # than its full count, which grows with the parameters)
    assert amuse4 <= 2 * adamw_no_item, (op_counts["amuse", 4], adamw4)
    assert sum(adamw4.values()) > sum(op_counts["adamw_foreach", 2].values())  # it does grow


def test_amuse_with_ns_ops_flat_in_depth(op_counts: dict) -> None:
    ns2, ns4 = (sum(op_counts["amuse+ns", d].values()) for d in (2, 4))
    assert ns2 == ns4, (op_counts["amuse+ns", 2], op_counts["amuse+ns", 4])


def test_bare_readme_optimizer_ops_flat_in_depth(op_counts: dict) -> None:
    """``AMUSE(param_groups(model))`` tracks the update RMS on every step: still flat."""
    bare2, bare4 = (sum(op_counts["amuse_bare", d].values()) for d in (2, 4))
    assert bare2 == bare4, (op_counts["amuse_bare", 2], op_counts["amuse_bare", 4])
    # tracking lives inside the fused passes: it adds only the zeroing of one accumulator per
    # branch
    extra = Counter(op_counts["amuse_bare", 4])
    extra.subtract(op_counts["amuse+ns", 4])
    assert +extra == Counter({"aten::zero_": 2}), extra


def _third_step(name: str, n_layers: int = 2):  # type: ignore[no-untyped-def]
    model = fill(build_model("debug", n_layers), "cpu")
    opt = local_optimizer(name, model)
    opt.step()
    opt.step()
    counter = count_step(opt)
    numel = {True: 0, False: 0}
    tensors = {True: 0, False: 0}
    for g in opt.param_groups:
        numel[g["use_muon"]] += sum(p.numel() for p in g["params"])
        tensors[g["use_muon"]] += len(g["params"])
    return counter, numel, tensors


@pytest.mark.parametrize("name", ["amuse", "amuse_bare"])
def test_elementwise_bytes_per_element(name: str) -> None:
    """One pass per branch: <= 32 bytes per Muon element (fp32 state, bf16 NS) and <= 28 per
    AdamW element (issue 20's targets), counted per dispatched op. On tracked steps the update
    RMS adds only its per-tensor weight and the accumulator (16 bytes per tensor per pass)."""
    counter, numel, tensors = _third_step(name)
    slack = {m: (16 * tensors[m] + 16 if name == "amuse_bare" else 0) for m in (True, False)}
    muon = counter.bytes["amuse::nesterov"] + counter.bytes["amuse::muon_post"]
    adamw = counter.bytes["amuse::adamw_step"]
    assert muon <= 32 * numel[True] + slack[True], muon / numel[True]
    assert adamw <= 28 * numel[False] + slack[False], adamw / numel[False]
    if name == "amuse":  # identity NS, one process: nothing else in the step moves data
        other = sum(n for op, n in counter.bytes.items() if not op.startswith("amuse::"))
        assert other == 0, counter.bytes


def test_one_process_step_has_no_staging_copies_and_no_host_reads() -> None:
    """Bare optimizer, real NS, one process: u lands in the NS batch buffer and muon_post reads
    NS's result in place (tall matrices as a transposed view): no copy/cat/clone at all."""
    counter, _, _ = _third_step("amuse_bare")
    assert counter.count(COPY_OPS) == 0, counter.calls
    assert counter.count(HOST_READS) == 0, counter.calls


def test_identity_ns_step_allocates_nothing_after_warmup() -> None:
    """Persistent staging buffers, accumulators and weights: after warm-up the elementwise step
    and its staging allocate no tensor (what a CUDA graph capture of the step needs)."""
    counter, _, _ = _third_step("amuse")
    assert counter.calls["alloc"] == 0, counter.calls
    model = fill(build_model("debug", 2), "cpu")
    opt = local_optimizer("amuse", model)
    opt.track_update_rms = True
    opt.step()
    opt.step()
    assert count_step(opt).calls["alloc"] == 0


def _lists(seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype) for shape in [(7, 5), (3,), (16, 9)]]


@pytest.mark.parametrize("name", ["nesterov", "muon_post", "adamw_step"])
def test_compiled_pass_equals_the_reference(name: str) -> None:
    """The one-graph form (what CUDA runs; here through aot_eager on the CPU) equals the eager
    reference to 1e-6 in fp32, the update RMS accumulator included."""
    s = [0.37, 1.0 - 0.02 * 0.05, 0.02, 0.71, 0.999, 1.0 - 0.999**7, 1e-10, 1.0 - 0.999]
    ref = [_lists(k) for k in range(5)]
    ref[3] = [t.abs() for t in ref[3]]  # the second moment
    got = [[t.clone() for t in ts] for ts in ref]
    w = torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64)
    sq_ref, sq_got = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    fn = elementwise.compiled_impl(name, backend="aot_eager")
    if name == "nesterov":
        ref[2] = [torch.empty_like(t) for t in ref[2]]
        got[2] = [torch.empty_like(t) for t in got[2]]
        elementwise.nesterov_eager(ref[0], ref[1], ref[2], 0.95)
        fn(got[0], got[1], got[2], 0.95)
    elif name == "muon_post":
        elementwise.muon_post_eager(ref[0], ref[1], ref[2], s[:4], sq_ref, w)
        fn(got[0], got[1], got[2], torch.tensor(s[:4]), sq_got, w)
    else:
        elementwise.adamw_step_eager(ref[0], ref[1], ref[2], ref[3], s, sq_ref, w)
        fn(got[0], got[1], got[2], got[3], torch.tensor(s), sq_got, w)
    for a, b in zip(ref, got, strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sq_got, sq_ref, rtol=1e-6, atol=0)


def test_non_logged_step_reads_nothing_back_to_the_host(op_counts: dict) -> None:
    for name in ("amuse", "amuse+ns"):
        assert not SYNC_OPS & set(op_counts[name, 4]), op_counts[name, 4]


def _run(track: set[int], steps: int = 8) -> tuple[torch.nn.Module, AMUSE, list, dict]:
    """AMUSE on the toy model, tracking the update RMS on the steps in ``track``.

    Returns the model, the optimizer, update_rms() after every step and z before/after step 5.
    """
    model = make_model().double()
    opt = AMUSE(param_groups(model), ns_dtype=torch.float32, **HP)
    rms, z5 = [], {}
    for step in range(steps):
        opt.track_update_rms = step in track
        loss_fn(model, *batch(step)).backward()
        if step == 5:
            z5 = {p: [opt.state[p]["z"].clone()] for p in model.parameters()}
        opt.step()
        opt.zero_grad()
        if step == 5:
            for p in model.parameters():
                z5[p].append(opt.state[p]["z"].clone())
        rms.append(opt.update_rms())
    return model, opt, rms, z5


def test_update_rms_tracking_changes_nothing_and_matches_the_step() -> None:
    every, opt, rms_every, z5 = _run(set(range(8)))
    some, _, rms_some, _ = _run({5})
    for p, q in zip(every.parameters(), some.parameters(), strict=True):
        assert torch.equal(p, q)  # tracking or not, the same trajectory bit for bit
    assert rms_some[4] == {} and rms_some[6] == {}  # untracked steps offer nothing
    assert rms_some[5] == rms_every[5]  # the same value whenever it is tracked
    assert set(rms_every[5]) == {"muon", "adamw"}
    # and it is the RMS of step 5's direction O, recovered from z' = z (1 - lr wd) - lr O
    lr = 0.02 * min(1.0, 6 / HP["warmup_steps"])
    for group in opt.param_groups:
        sq, n = 0.0, 0
        for p in group["params"]:
            z, z_new = z5[p]
            o = (z * (1 - lr * HP["weight_decay"]) - z_new) / lr
            sq, n = sq + float(o.pow(2).sum()), n + o.numel()
        branch = "muon" if group["use_muon"] else "adamw"
        assert rms_every[5][branch] == pytest.approx((sq / n) ** 0.5, rel=1e-6)


def test_bf16_momentum_keeps_z_fp32_and_survives_a_state_dict_round_trip() -> None:
    model = make_model()
    ref = copy.deepcopy(model)
    f32 = torch.float32  # fp32 NS: the only difference between the runs is the momentum dtype
    opt = AMUSE(param_groups(model), momentum_dtype=torch.bfloat16, ns_dtype=f32, **HP)
    ref_opt = AMUSE(param_groups(ref), ns_dtype=f32, **HP)
    for step in range(12):
        for m, o in ((model, opt), (ref, ref_opt)):
            loss_fn(m, *batch(step)).backward()
            if o is opt:
                grads = {p: p.grad.clone() for p in m.parameters()}
            o.step()
            o.zero_grad()
        if step == 0:  # m = (1 - mu) g in bf16 (g is rounded first: two roundings)
            for p, g in grads.items():
                if "momentum" in opt.state[p]:
                    want = ((1 - HP["momentum"]) * g).to(torch.bfloat16)
                    got = opt.state[p]["momentum"]
                    assert got.dtype == torch.bfloat16
                    torch.testing.assert_close(got, want, rtol=2**-6, atol=0)
    for p in model.parameters():
        state = opt.state[p]
        assert state["z"].dtype == torch.float32
        if "momentum" in state:
            assert state["momentum"].dtype == torch.bfloat16
        else:
            assert state["exp_avg_sq"].dtype == torch.float32
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        # bf16 rounding of m (0.4%), amplified by NS5 on the toy's small matrices: same method
        assert float((p - q).norm() / q.norm()) < 0.1
    # torch's load_state_dict casts state to the parameter dtype; the next step casts it back
    twin = copy.deepcopy(model)
    twin_opt = AMUSE(param_groups(twin), momentum_dtype=torch.bfloat16, ns_dtype=f32, **HP)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m, o in ((model, opt), (twin, twin_opt)):
        loss_fn(m, *batch(12)).backward()
        o.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
        if "momentum" in twin_opt.state[q]:
            assert twin_opt.state[q]["momentum"].dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (3, 40, 24)])
def test_newton_schulz_addmm_form(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    g = torch.randn(*shape, dtype=torch.float64)
    flat = g.reshape(-1, *shape[-2:])

    def plain(dtype: torch.dtype) -> torch.Tensor:
        return torch.stack([ns5(m, 5, dtype) for m in flat]).reshape(shape).double()

    truth = plain(torch.float64)
    got32 = newton_schulz5(g.float(), 5, torch.float32, scale=1.5).double()
    assert got32.dtype == torch.float64 and got32.shape == g.shape
    assert float((got32 - 1.5 * truth).norm() / (1.5 * truth).norm()) < 1e-5
    # bf16: no further from the truth than the plain form's own bf16 round-off
    err_plain = float((plain(torch.bfloat16) - truth).norm() / truth.norm())
    got16 = newton_schulz5(g.float(), 5, torch.bfloat16)
    assert got16.dtype == torch.bfloat16
    assert float((got16.double() - truth).norm() / truth.norm()) <= 1.5 * err_plain


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
