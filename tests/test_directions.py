"""NorMuon and AdaMuon (baselines and AMUSE directions), single process, against the plain
references written from the papers and the authors' code (tests/reference_*.py)."""

from __future__ import annotations

import pytest
import torch

from amuse_dist.optim.adamuon import AdaMuon
from amuse_dist.optim.amuse import AMUSE
from amuse_dist.optim.groups import param_groups
from amuse_dist.optim.normuon import NorMuon
from tests.reference_adamuon import ElementNormalizer, ReferenceAdaMuon
from tests.toy import HP, batch, loss_fn, make_model, rel

pytestmark = pytest.mark.unit

# the reference's names for the toy hyper-parameters
REF_HP = dict(HP)

STEPS = 30


def _pairs(model: torch.nn.Module) -> list[tuple[torch.Tensor, bool]]:
    muon = {id(p) for g in param_groups(model) if g["use_muon"] for _, p in g["params"]}
    return [(p, id(p) in muon) for p in model.parameters()]


def _train_both(opt_of, ref_of, steps: int = STEPS) -> float:
    """Worst relative difference of the parameters after each step."""
    model, twin = make_model().double(), make_model().double()
    opt, ref = opt_of(model), ref_of(_pairs(twin))
    worst = 0.0
    for step in range(steps):
        for m in (model, twin):
            loss_fn(m, *batch(step)).backward()
        opt.step()
        ref.step()
        for m in (model, twin):
            m.zero_grad()
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            worst = max(worst, rel(a, b))
    return worst


@pytest.mark.parametrize("scale", ["muon", "authors"])
def test_normuon_matches_reference(scale: str) -> None:
    from tests.reference_normuon import ReferenceNorMuon

    worst = _train_both(
        lambda m: NorMuon(
            param_groups(m), lr=0.01, weight_decay=0.05, scale=scale, ns_dtype=torch.float32
        ),
        lambda ps: ReferenceNorMuon(ps, lr=0.01, weight_decay=0.05, scale=scale),
    )
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("sign", [True, False])
def test_adamuon_matches_reference(sign: bool) -> None:
    worst = _train_both(
        lambda m: AdaMuon(
            param_groups(m), lr=0.01, weight_decay=0.05, sign=sign, ns_dtype=torch.float32
        ),
        lambda ps: ReferenceAdaMuon(ps, lr=0.01, weight_decay=0.05, sign=sign),
    )
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("direction", ["normuon", "adamuon"])
@pytest.mark.parametrize("exact_x", [False, True])
def test_amuse_direction_matches_reference(direction: str, exact_x: bool) -> None:
    from tests.reference_amuse import ReferenceAMUSE
    from tests.reference_normuon import RowNormalizer

    def reference(pairs: list) -> ReferenceAMUSE:
        shapes = {i: tuple(p.shape) for i, (p, muon) in enumerate(pairs) if muon}
        hook = RowNormalizer(shapes) if direction == "normuon" else ElementNormalizer(shapes)
        return ReferenceAMUSE(
            pairs, **REF_HP, exact_x=exact_x, ns_dtype=torch.float32, direction=hook
        )

    worst = _train_both(
        lambda m: AMUSE(
            param_groups(m), ns_dtype=torch.float32, exact_x=exact_x, direction=direction, **HP
        ),
        reference,
    )
    assert worst <= 1e-5, worst


def test_amuse_muon_direction_is_the_default_bitwise() -> None:
    """direction = "muon" is the paper's AMUSE: the same numbers as before the option existed."""
    runs = []
    for kwargs in ({}, {"direction": "muon"}):
        model = make_model().double()
        opt = AMUSE(param_groups(model), ns_dtype=torch.float32, **HP, **kwargs)
        for step in range(8):
            loss_fn(model, *batch(step)).backward()
            opt.step()
            opt.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()])
        assert set().union(*(s.keys() for s in opt.state.values())) == {
            "z",
            "momentum",
            "exp_avg_sq",
        }
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_direction_state_is_sharded_like_rows_or_elements() -> None:
    model = make_model().double()
    for direction, key in (("normuon", "normuon_v"), ("adamuon", "adamuon_v")):
        opt = AMUSE(param_groups(model), direction=direction, **HP)
        loss_fn(model, *batch(0)).backward()
        opt.step()
        opt.zero_grad()
        up = model.up.weight
        want = (up.shape[0],) if direction == "normuon" else tuple(up.shape)
        assert tuple(opt.state[up][key].shape) == want
        assert key not in opt.state[model.embed.weight]


def test_unknown_direction_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="direction = 'adam'.*'normuon'"):
        AMUSE(param_groups(make_model()), direction="adam", **HP)


@pytest.mark.parametrize("cls", [NorMuon, AdaMuon])
def test_step_count_is_not_a_hyper_parameter(cls: type) -> None:
    """A resume puts the config's hyper-parameters (``defaults`` keys) back into the groups; the
    step count (bias corrections) must not be one of them, or it restarts at 0."""
    model = make_model()
    opt = cls(param_groups(model), lr=0.01)
    for step in range(2):
        loss_fn(model, *batch(step)).backward()
        opt.step()
        opt.zero_grad()
    assert "muon_t" not in opt.defaults
    assert all(g["muon_t"] == 2 for g in opt.param_groups)


def test_resume_contract_refuses_a_direction_change() -> None:
    from amuse_dist.anytime import resume_contract
    from amuse_dist.optim import registry

    sections = registry.hparam_sections()
    table = resume_contract.contract(sections)
    assert table[("amuse", "direction")][0] == resume_contract.REFUSED
    assert table[("amuse", "normuon_beta2")][0] == resume_contract.CHANGEABLE
    assert table[("normuon", "beta2")][0] == resume_contract.CHANGEABLE
    assert table[("adamuon", "sign")][0] == resume_contract.CHANGEABLE
    saved, new = {"amuse": {"direction": "muon"}}, {"amuse": {"direction": "normuon"}}
    (change,) = resume_contract.changes(saved, new, sections)
    assert change.policy == resume_contract.REFUSED and change.name == "[amuse] direction"


def test_registry_names_the_new_optimizers_and_their_state() -> None:
    from amuse_dist.optim import registry

    assert registry.get("normuon").section == "normuon"
    assert registry.get("AdaMuon").hparams.__name__ == "AdaMuonHParams"
    assert (
        registry.guess_from_state({"momentum", "normuon_v", "exp_avg", "exp_avg_sq"}) == "NorMuon"
    )
    assert registry.guess_from_state({"z", "momentum", "adamuon_v", "exp_avg_sq"}) == "AMUSE"


@pytest.mark.parametrize("direction", ["normuon", "adamuon"])
def test_fused_qkv_is_normalized_block_by_block(direction: str) -> None:
    """A fused weight with ``ns_split`` steps like its Q, K, V blocks as separate matrices."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 8, dtype=torch.float64))
    blocks = [torch.nn.Parameter(b.detach().clone()) for b in w.split(4)]
    fused = AMUSE(
        [{"params": [w], "use_muon": True, "ns_split": (4, 4, 4)}],
        direction=direction,
        ns_dtype=torch.float32,
        **HP,
    )
    apart = AMUSE(
        [{"params": blocks, "use_muon": True}], direction=direction, ns_dtype=torch.float32, **HP
    )
    for step in range(5):
        g = torch.randn(12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        w.grad = g.clone()
        for b, gb in zip(blocks, g.split(4), strict=True):
            b.grad = gb.clone()
        fused.step()
        apart.step()
    assert rel(w.detach(), torch.cat([b.detach() for b in blocks])) <= 1e-12
