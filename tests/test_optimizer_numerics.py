"""AMUSE (single process) against the plain reference, and its invariants."""

from __future__ import annotations

import copy

import pytest
import torch

from amuse_dist import AMUSE, param_groups
from tests.reference_amuse import ReferenceAMUSE
from tests.toy import HP as TOY_HP
from tests.toy import batch, loss_fn, make_model, rel

pytestmark = pytest.mark.unit

HP = dict(TOY_HP, warmup_steps=10)


def train_pair(exact_x: bool, steps: int):
    # fp64 weights, fp32 Newton-Schulz: NS is then the only fp32 arithmetic. With fp32 weights both
    # runs still agree per step (~3e-8), but NS5 amplifies round-off in small singular directions
    # and the two trajectories drift apart by ~5e-6 over 50 steps.
    model = make_model().double()
    ref_model = copy.deepcopy(model)
    opt = AMUSE(param_groups(model), ns_dtype=torch.float32, exact_x=exact_x, **HP)
    muon_ids = {id(p) for g in param_groups(ref_model) if g["use_muon"] for _, p in g["params"]}
    ref = ReferenceAMUSE(
        [(p, id(p) in muon_ids) for p in ref_model.parameters()],
        lr=HP["lr"],
        warmup_steps=HP["warmup_steps"],
        beta1=HP["beta1"],
        rho=HP["rho"],
        momentum=HP["momentum"],
        weight_decay=HP["weight_decay"],
        exact_x=exact_x,
    )
    losses = []
    for step in range(steps):
        inputs, labels = batch(step)
        for m, o in ((model, opt), (ref_model, ref)):
            loss = loss_fn(m, inputs, labels)
            loss.backward()
            o.step()
            m.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return model, ref_model, opt, ref, losses


@pytest.mark.parametrize("exact_x", [False, True])
def test_matches_reference_50_steps(exact_x: bool) -> None:
    model, ref_model, opt, ref, losses = train_pair(exact_x, 50)
    assert losses[-1] < losses[0]  # it trains
    assert opt.beta() > HP["beta1"]  # past warmup beta_t has grown
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert rel(p, q) <= 1e-6, rel(p, q)
    xs = opt.x_tensors()
    for p, xr in zip(model.parameters(), ref.x(), strict=True):
        assert rel(xs[p], xr) <= 1e-6
    for p, z in zip(model.parameters(), ref.z, strict=True):
        assert rel(opt.state[p]["z"], z) <= 1e-6


def test_exact_x_changes_the_trajectory_after_warmup() -> None:
    a = train_pair(False, 15)[0]
    b = train_pair(True, 15)[0]
    assert any(rel(p, q) > 1e-6 for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_x_tensors_is_out_of_place_and_matches_formula() -> None:
    model = make_model()
    opt = AMUSE(param_groups(model), ns_dtype=torch.float32, **HP)
    twin = copy.deepcopy(model)
    twin_opt = AMUSE(param_groups(twin), ns_dtype=torch.float32, **HP)
    before = opt.x_tensors()
    for p in model.parameters():
        assert torch.equal(before[p], p) and before[p].data_ptr() != p.data_ptr()
    for step in range(14):
        inputs, labels = batch(step)
        for m, o in ((model, opt), (twin, twin_opt)):
            loss_fn(m, inputs, labels).backward()
            o.step()
            m.zero_grad()
        xs = opt.x_tensors()  # only the first run asks for X
        beta = opt.param_groups[0]["amuse_beta_y"]
        for p in model.parameters():
            z = opt.state[p]["z"]
            assert torch.allclose(xs[p], z + (p.detach() - z) / beta, rtol=1e-6, atol=1e-7)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)  # asking for X changed nothing


def test_zero_lr_step_creates_state_and_changes_nothing() -> None:
    model = make_model()
    opt = AMUSE(param_groups(model), **HP)
    before = [p.detach().clone() for p in model.parameters()]
    lrs = [g["lr"] for g in opt.param_groups]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for g in opt.param_groups:
        g["lr"] = 0.0
    groups_before = copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    )
    opt.step()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
        state = opt.state[p]
        assert set(state) in ({"z", "momentum"}, {"z", "exp_avg_sq"})
        assert torch.equal(state["z"], b)
    for g, gb in zip(opt.param_groups, groups_before, strict=True):
        assert {k: v for k, v in g.items() if k != "params"} == gb
    for g, lr in zip(opt.param_groups, lrs, strict=True):
        g["lr"] = lr


def test_state_dict_round_trip_resumes_exactly() -> None:
    model = make_model()
    opt = AMUSE(param_groups(model), **HP)
    for step in range(12):
        loss_fn(model, *batch(step)).backward()
        opt.step()
        opt.zero_grad()
    twin = copy.deepcopy(model)
    twin_opt = AMUSE(param_groups(twin), **HP)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for g in twin_opt.param_groups:
        for key in ("amuse_t", "amuse_weight_sum", "amuse_c_warmup", "amuse_beta_y"):
            assert key in g
    for step in range(12, 20):
        for m, o in ((model, opt), (twin, twin_opt)):
            loss_fn(m, *batch(step)).backward()
            o.step()
            o.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("warmup_steps", 0),
        ("beta1", 0.0),
        ("beta1", 1.0),
        ("rho", -0.1),
        ("lr", 0.0),
        ("lr", -1.0),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("weight_decay", float("nan")),
        ("eps", float("inf")),
        ("betas2", 1.0),
    ],
)
def test_bad_arguments_name_the_argument(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=key):
        AMUSE(param_groups(make_model()), **{**HP, key: value})


def test_bad_group_value_is_refused() -> None:
    groups = param_groups(make_model())
    groups[0]["beta1"] = 2.0
    with pytest.raises(ValueError, match="beta1"):
        AMUSE(groups, **HP)


def test_muon_group_refuses_non_matrix() -> None:
    model = make_model()
    opt = AMUSE([{"params": [("norm.weight", model.norm.weight)], "use_muon": True}], **HP)
    model.norm.weight.grad = torch.ones_like(model.norm.weight)
    with pytest.raises(ValueError, match="norm.weight"):
        opt.step()


def test_param_groups_split() -> None:
    model = make_model()
    groups = param_groups(model)
    names = {g["use_muon"]: [n for n, _ in g["params"]] for g in groups}
    assert names[True] == ["up.weight", "mid.weight", "tiny.weight", "back.weight"]
    assert set(names[False]) == {"embed.weight", "norm.weight", "norm.bias", "output.weight"}


def test_fused_qkv_orthogonalized_per_block() -> None:
    torch.manual_seed(0)
    fused = torch.nn.Module()
    fused.wqkv = torch.nn.Linear(6, 12, bias=False)  # Q 6, K 3, V 3 rows
    groups = param_groups(fused, qkv_split=(6, 3, 3))
    assert groups[0]["ns_split"] == (6, 3, 3)
    opt = AMUSE(groups, ns_dtype=torch.float32, lr=0.1, warmup_steps=1, beta1=0.999)
    g = torch.randn(12, 6)
    fused.wqkv.weight.grad = g.clone()
    w0 = fused.wqkv.weight.detach().clone()
    opt.step()
    # first step: z = w0 - lr * O; y = x + (1 - beta)(z - x) with x = z (c_1 = 1) so y = z
    o = (w0 - fused.wqkv.weight.detach()) / 0.1
    from reference_amuse import ns5

    u = 0.05 * g + 0.95 * (0.05 * g)
    for rows, start in ((6, 0), (3, 6), (3, 9)):
        block = ns5(u[start : start + rows], 5, torch.float32) * 0.2 * max(rows, 6) ** 0.5
        assert torch.allclose(o[start : start + rows], block, atol=1e-5)
    with pytest.raises(ValueError, match="wqkv"):
        bad = torch.nn.Module()
        bad.wqkv = torch.nn.Linear(6, 10, bias=False)
        param_groups(bad)


def test_lr_that_swamps_the_weight_sum_is_a_clear_error() -> None:
    """A resume with an enormous lr made c_t round to 1: a ZeroDivisionError before."""
    from amuse_dist.optim.schedule import step_scalars

    kw = dict(warmup_steps=2, beta1=0.6, rho=0.8, weight_lr_power=2.0, r=0.0)
    first = step_scalars(1, lr=0.01, weight_sum=0.0, c_warmup=0.0, **kw)
    second = step_scalars(2, lr=0.01, weight_sum=first.weight_sum, c_warmup=0.0, **kw)
    with pytest.raises(ValueError, match=r"step 3: the averaging weight c_t .* lower the lr"):
        step_scalars(3, lr=1e12, weight_sum=second.weight_sum, c_warmup=second.c_warmup, **kw)
