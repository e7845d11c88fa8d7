"""The distributed optimizers on 1-4 gloo ranks against the single-process optimizer.

Real processes (torchrun). The toy model has uneven shards, an empty shard and a matrix with fewer
rows than ranks (see tests/toy.py). Weights are fp64 with fp32 Newton-Schulz.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from amuse_dist import AMUSE, Muon, param_groups
from amuse_dist.distributed.owners import assign_owners, imbalance, round_robin_owners
from amuse_dist.optim.newton_schulz import ns_flops
from tests._titan import run_worker
from tests.toy import HP, batch, loss_fn, make_model, rel

WORKER = Path(__file__).parent / "dist_worker.py"
STEPS = 20
N_MUON = 4  # up, mid, tiny, back


@functools.cache
def single_process(optimizer: str, exact_x: bool = False) -> dict:
    model = make_model().double()
    if optimizer == "amuse":
        opt = AMUSE(param_groups(model), ns_dtype=torch.float32, exact_x=exact_x, **HP)
    else:
        opt = Muon(param_groups(model), lr=0.01, weight_decay=0.05, ns_dtype=torch.float32)
    losses = []
    for step in range(STEPS):
        loss = loss_fn(model, *batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    out = {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "losses": losses}
    if optimizer == "amuse":
        xs = opt.x_tensors()
        out["x"] = {n: xs[p] for n, p in model.named_parameters()}
    return out


@functools.cache
def _run(mode: str, nproc: int, optimizer: str, exact_x: bool, tmp: str) -> list:
    args = ["--mode", mode, "--optimizer", optimizer, "--steps", str(STEPS)]
    args += ["--exact-x"] if exact_x else []
    out = Path(tmp) / f"{mode}-{nproc}-{optimizer}-{exact_x}.pt"
    return run_worker(WORKER, nproc, args, out)


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("dist"))


def check_against_single(ranks: list, optimizer: str, exact_x: bool = False) -> None:
    ref = single_process(optimizer, exact_x)
    got = ranks[0]
    for name, p in ref["params"].items():
        assert rel(got["params"][name], p) <= 1e-5, (name, rel(got["params"][name], p))
    for a, b in zip(got["losses"], ref["losses"], strict=True):
        assert abs(a - b) <= 1e-5 * abs(b)
    if optimizer == "amuse":
        for name, x in ref["x"].items():
            assert rel(got["x"][name], x) <= 1e-5, name
    for other in ranks[1:]:  # every rank ends with the same full weights
        for name, p in got["params"].items():
            assert torch.equal(other["params"][name], p)


@pytest.mark.parametrize("nproc", [1, 2, 3, 4])
def test_fsdp_amuse_matches_single_process(nproc: int, tmp_dir: str) -> None:
    ranks = _run("fsdp", nproc, "amuse", False, tmp_dir)
    assert all(v == "(Shard(dim=0),)" for v in ranks[0]["placements"].values())  # state sharded
    check_against_single(ranks, "amuse")


def test_fsdp_amuse_exact_x_matches_single_process(tmp_dir: str) -> None:
    check_against_single(_run("fsdp", 3, "amuse", True, tmp_dir), "amuse", exact_x=True)


@pytest.mark.parametrize("nproc", [2, 4])
def test_each_matrix_orthogonalized_exactly_once(nproc: int, tmp_dir: str) -> None:
    ranks = _run("fsdp", nproc, "amuse", False, tmp_dir)
    for step in range(STEPS):
        logs = [r["ns_logs"][step] for r in ranks]
        done = sorted(i for log in logs for i in log)
        assert done == list(range(N_MUON)), (step, logs)  # each once, none twice, none skipped
    assert sum(len(log) for r in ranks for log in r["ns_logs"]) == N_MUON * STEPS


def test_replicated_amuse_matches_single_process(tmp_dir: str) -> None:
    ranks = _run("replicated", 2, "amuse", False, tmp_dir)
    assert ranks[0]["placements"]["up.weight"] == "plain"
    check_against_single(ranks, "amuse")
    assert sorted(i for r in ranks for i in r["ns_logs"][0]) == list(range(N_MUON))


@pytest.mark.parametrize("nproc", [2, 3])
def test_fsdp_muon_matches_single_process(nproc: int, tmp_dir: str) -> None:
    check_against_single(_run("fsdp", nproc, "muon", False, tmp_dir), "muon")


def test_hsdp_and_tp_are_refused_by_name(tmp_dir: str) -> None:
    errors = _run("refuse", 2, "amuse", False, tmp_dir)[0]
    assert "up.weight" in errors["hsdp"] and "HSDP" in errors["hsdp"]
    assert "layers.0.attention.wq.weight" in errors["tp"] and "tensor parallel" in errors["tp"]


def llama3_8b_shapes() -> list[tuple[int, int]]:
    dim, kv, ffn = 4096, 1024, 14336
    layer = [(dim, dim), (kv, dim), (kv, dim), (dim, dim), (ffn, dim), (dim, ffn), (ffn, dim)]
    return layer * 32


def test_owner_balance_llama3_8b_at_8_ranks() -> None:
    costs = [ns_flops(*s) for s in llama3_8b_shapes()]
    owners = assign_owners(costs, 8)
    assert imbalance(costs, owners, 8) <= 1.10
    assert sorted(set(owners)) == list(range(8))
    assert assign_owners(costs, 8) == owners  # deterministic


def test_owner_assignment_beats_round_robin_at_64() -> None:
    costs = [ns_flops(*s) for s in llama3_8b_shapes()]
    assert imbalance(costs, assign_owners(costs, 64), 64) <= 1.10
    assert imbalance(costs, round_robin_owners(len(costs), 64), 64) > 1.5
