"""The distributed optimizers on 1-4 gloo ranks against the single-process optimizer.

Real processes (torchrun). The toy model has uneven shards, an empty shard and a matrix with fewer
rows than ranks (see tests/toy.py). Weights are fp64 with fp32 Newton-Schulz.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from amuse_dist import AMUSE, Muon, param_groups
from amuse_dist.distributed.layout import mesh_layout
from amuse_dist.distributed.owners import assign_owners, imbalance, round_robin_owners
from amuse_dist.distributed.plan import MatrixTask, build_group_plan, traffic
from amuse_dist.optim.base import NewtonSchulz
from amuse_dist.optim.newton_schulz import ns_flops
from benchmarks.model_shapes import llama3_muon_shapes
from tests._titan import run_worker
from tests.toy import DIRECTION_ARMS, HP, batch, direction_optimizer, loss_fn, make_model, rel

WORKER = Path(__file__).parent / "workers" / "dist_worker.py"
STEPS = 20
N_MUON = 4  # up, mid, tiny, back


@functools.cache
def single_process(optimizer: str, exact_x: bool = False, steps: int = STEPS) -> dict:
    model = make_model().double()
    if optimizer in DIRECTION_ARMS:
        opt = direction_optimizer(optimizer, param_groups(model))
    elif optimizer == "amuse":
        opt = AMUSE(param_groups(model), ns_dtype=torch.float32, exact_x=exact_x, **HP)
    else:
        opt = Muon(param_groups(model), lr=0.01, weight_decay=0.05, ns_dtype=torch.float32)
    losses = []
    for step in range(steps):
        loss = loss_fn(model, *batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    out = {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "losses": losses}
    out["direction_state"] = {
        n: s.clone()
        for n, p in model.named_parameters()
        for key, s in opt.state[p].items()
        if key in ("normuon_v", "adamuon_v")
    }
    if optimizer.startswith("amuse"):
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


def check_against_single(
    ranks: list, optimizer: str, exact_x: bool = False, steps: int = STEPS
) -> None:
    ref = single_process(optimizer, exact_x, steps)
    got = ranks[0]
    for name, p in ref["params"].items():
        assert rel(got["params"][name], p) <= 1e-5, (name, rel(got["params"][name], p))
    for a, b in zip(got["losses"], ref["losses"], strict=True):
        assert abs(a - b) <= 1e-5 * abs(b)
    if optimizer.startswith("amuse"):
        for name, x in ref["x"].items():
            assert rel(got["x"][name], x) <= 1e-5, name
    for other in ranks[1:]:  # every rank ends with the same full weights
        for name, p in got["params"].items():
            assert torch.equal(other["params"][name], p)


@pytest.mark.dist
@pytest.mark.parametrize("nproc", [1, 2, 3, 4])
def test_fsdp_amuse_matches_single_process(nproc: int, tmp_dir: str) -> None:
    ranks = _run("fsdp", nproc, "amuse", False, tmp_dir)
    assert all(v == "(Shard(dim=0),)" for v in ranks[0]["placements"].values())  # state sharded
    check_against_single(ranks, "amuse")


@pytest.mark.dist
def test_fsdp_amuse_exact_x_matches_single_process(tmp_dir: str) -> None:
    check_against_single(_run("fsdp", 3, "amuse", True, tmp_dir), "amuse", exact_x=True)


@pytest.mark.dist
@pytest.mark.parametrize("nproc", [2, 4])
def test_each_matrix_orthogonalized_exactly_once(nproc: int, tmp_dir: str) -> None:
    ranks = _run("fsdp", nproc, "amuse", False, tmp_dir)
    for step in range(STEPS):
        logs = [r["ns_logs"][step] for r in ranks]
        done = sorted(i for log in logs for i in log)
        assert done == list(range(N_MUON)), (step, logs)  # each once, none twice, none skipped
    assert sum(len(log) for r in ranks for log in r["ns_logs"]) == N_MUON * STEPS


@pytest.mark.dist
def test_replicated_amuse_matches_single_process(tmp_dir: str) -> None:
    ranks = _run("replicated", 2, "amuse", False, tmp_dir)
    assert ranks[0]["placements"]["up.weight"] == "plain"
    check_against_single(ranks, "amuse")
    assert sorted(i for r in ranks for i in r["ns_logs"][0]) == list(range(N_MUON))


@pytest.mark.dist
@pytest.mark.parametrize("nproc", [2, 3])
def test_fsdp_muon_matches_single_process(nproc: int, tmp_dir: str) -> None:
    check_against_single(_run("fsdp", nproc, "muon", False, tmp_dir), "muon")


@pytest.mark.dist
@pytest.mark.parametrize("nproc", [1, 2, 3, 4])
def test_fsdp_direction_arms_match_single_process(nproc: int, tmp_dir: str) -> None:
    """NorMuon, AdaMuon and AMUSE with their directions (carried by the AMUSE launches)."""
    arms = [r["arms"] for r in _run("fsdp", nproc, "amuse", False, tmp_dir)]
    for arm in DIRECTION_ARMS:
        ranks = [a[arm] for a in arms]
        check_against_single(ranks, arm)
        ref = single_process(arm)["direction_state"]
        got = ranks[0]["direction_state"]
        assert set(got) == set(ref) == {"up.weight", "mid.weight", "tiny.weight", "back.weight"}
        for name, (placements, value) in got.items():
            assert placements == "(Shard(dim=0),)", (arm, name, placements)  # rows / elements
            assert value.shape == ref[name].shape and rel(value, ref[name]) <= 1e-5, (arm, name)
        for step in range(STEPS):  # NS once per matrix per step
            assert sorted(i for r in ranks for i in r["ns_logs"][step]) == list(range(N_MUON))


@pytest.mark.dist
def test_replicated_direction_arms_match_single_process(tmp_dir: str) -> None:
    arms = [r["arms"] for r in _run("replicated", 2, "amuse", False, tmp_dir)]
    for arm in DIRECTION_ARMS:
        check_against_single([a[arm] for a in arms], arm)


@pytest.mark.dist
def test_partial_is_refused_by_name(tmp_dir: str) -> None:
    error = _run("refuse", 2, "amuse", False, tmp_dir)[0]["partial"]
    assert "layers.0.attention.wq.weight" in error and "Partial" in error


@pytest.mark.unit
def test_interleaved_strided_shard_is_refused_by_name() -> None:
    # S(0) then _StridedShard(0, sf=2) gives mesh rank (0, 0) rows {0, 2}: not a rectangle
    with pytest.raises(ValueError, match="'w1'.*non-contiguous"):
        mesh_layout((8, 4), (2, 2), (Shard(0), _StridedShard(0, split_factor=2)), "w1")


# ------------------------------------------------------------------ every mesh layout, 4 ranks
MESH_WORKER = Path(__file__).parent / "workers" / "mesh_worker.py"
MESH_STEPS = 10
LAYOUTS = ["fsdp", "hsdp", "tp", "fsdp_tp", "hsdp_per_replica"]


@pytest.fixture(scope="module")
def meshes(tmp_dir: str) -> list:
    """One torchrun: AMUSE and Muon on 1-D FSDP 4, HSDP 2x2 (both modes), TP 4, FSDP+TP 2x2."""
    out = Path(tmp_dir) / "meshes.pt"
    return run_worker(MESH_WORKER, 4, ["--suite", "meshes", "--steps", str(MESH_STEPS)], out)


@pytest.mark.dist
@pytest.mark.parametrize("optimizer", ["amuse", "muon", *DIRECTION_ARMS])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mesh_layouts_match_single_process(meshes: list, layout: str, optimizer: str) -> None:
    ranks = [r[f"{layout}/{optimizer}"] for r in meshes]
    check_against_single(ranks, optimizer, steps=MESH_STEPS)
    expected = {
        "fsdp": "(Shard(dim=0),)",
        "hsdp": "(Replicate(), Shard(dim=0))",
        "hsdp_per_replica": "(Replicate(), Shard(dim=0))",
        "tp": "(Shard(dim=0),)",
        "fsdp_tp": "(_StridedShard(dim=0, sf=2), Shard(dim=0))",
    }[layout]
    assert ranks[0]["placements"]["up.weight"] == expected
    # uneven pieces (13 rows, 4 ranks) and fewer rows than ranks (tiny: 3 rows) are in the model
    assert ranks[0]["params"]["tiny.weight"].shape[0] < 4


@pytest.mark.dist
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ns_runs_per_matrix_over_the_job(meshes: list, layout: str) -> None:
    once = 2 if layout == "hsdp_per_replica" else 1  # per_replica: once per replica group
    for optimizer in ("amuse", "muon", *DIRECTION_ARMS):
        ranks = [r[f"{layout}/{optimizer}"] for r in meshes]
        for step in range(MESH_STEPS):
            done = sorted(i for r in ranks for i in r["ns_logs"][step])
            assert done == sorted(list(range(N_MUON)) * once), (layout, step, done)


@pytest.mark.dist
def test_pipelined_waves_equal_unpipelined_bitwise(tmp_dir: str) -> None:
    out = Path(tmp_dir) / "pipeline.pt"
    ranks = run_worker(MESH_WORKER, 3, ["--suite", "pipeline", "--steps", "10"], out)
    piped, flat = ranks[0]["pipeline=True"], ranks[0]["pipeline=False"]
    assert piped["waves"][0] >= 2 and flat["waves"] == [1]  # waves: most matrices on an owner
    for key in ("params", "x"):
        for name, t in flat[key].items():
            assert torch.equal(piped[key][name], t), (key, name)
    assert piped["losses"] == flat["losses"]


# ------------------------------------------------------------------ plans at scale (no processes)
def hsdp_tasks(mesh: tuple[int, int]) -> list[MatrixTask]:
    shapes = llama3_muon_shapes("8B")
    return [MatrixTask(mesh_layout(s, mesh, (Replicate(), Shard(0)))) for s in shapes]


@pytest.mark.unit
def test_hsdp_split_8b_at_2x8_balanced_and_each_matrix_once() -> None:
    ns = NewtonSchulz(5, torch.bfloat16)
    tasks = hsdp_tasks((2, 8))
    plan = build_group_plan(range(len(tasks)), tasks, ns.flops, 2, "split", None)
    t = traffic(plan, tasks, ns.flops, 2)
    assert sorted(t.ns_runs) == list(range(224)) and set(t.ns_runs.values()) == {1}
    assert max(t.flops) / (sum(t.flops) / 16) <= 1.10
    # every piece reaches every replica, and the gather stays inside the owner's replica group
    assert all(src // 8 == job.owner // 8 for job in plan.jobs for src, _ in job.sources)
    assert plan.mode == "split"
    per = build_group_plan(range(len(tasks)), tasks, ns.flops, 2, "per_replica", None)
    assert set(traffic(per, tasks, ns.flops, 2).ns_runs.values()) == {2}


@pytest.mark.unit
def test_hsdp_default_mode_follows_the_cost_model() -> None:
    ns = NewtonSchulz(5, torch.bfloat16)
    tasks = hsdp_tasks((2, 8))
    assert build_group_plan(range(224), tasks, ns.flops, 2, "auto", None).mode == "split"
    small = [MatrixTask(mesh_layout((64, 64), (2, 2), (Replicate(), Shard(0))))] * 3
    assert build_group_plan(range(3), small, ns.flops, 2, "auto", None).mode == "per_replica"


def llama3_8b_shapes() -> list[tuple[int, int]]:
    return llama3_muon_shapes("8B")


@pytest.mark.unit
def test_owner_balance_llama3_8b_at_8_ranks() -> None:
    costs = [ns_flops(*s) for s in llama3_8b_shapes()]
    owners = assign_owners(costs, 8)
    assert imbalance(costs, owners, 8) <= 1.10
    assert sorted(set(owners)) == list(range(8))
    assert assign_owners(costs, 8) == owners  # deterministic


@pytest.mark.unit
def test_owner_assignment_beats_round_robin_at_64() -> None:
    costs = [ns_flops(*s) for s in llama3_8b_shapes()]
    assert imbalance(costs, assign_owners(costs, 64), 64) <= 1.10
    assert imbalance(costs, round_robin_owners(len(costs), 64), 64) > 1.5


# ns_balance's 8B table (docs/benchmarks.md) as it stood before the exchange was restructured:
# (layout, mesh, mode) -> (NS max/mean, GiB/rank mean, GiB/rank max)
NS_BALANCE_8B = {
    ("fsdp", (8,), "split"): (1.000, 5.69, 5.69),
    ("fsdp", (64,), "split"): (1.057, 0.80, 0.83),
    ("fsdp", (256,), "split"): (2.114, 0.20, 0.32),
    ("hsdp", (2, 8), "split"): None,
    ("hsdp", (2, 8), "per_replica"): None,
}


@pytest.mark.unit
def test_ns_balance_tables_unchanged_at_8_64_256() -> None:
    """The plan keeps today's balance and bytes: ns_balance's 8B rows at W = 8/64/256."""
    from benchmarks.ns_balance import analyse

    for (layout, mesh, mode), want in NS_BALANCE_8B.items():
        row = analyse("8B", layout, mesh, mode)
        if want is None:  # HSDP: each matrix once (split) or once per replica group
            assert row.ns_runs_per_matrix == (1 if mode == "split" else mesh[0])
            continue
        got = (round(row.ns_max_over_mean, 3), round(row.gib_mean, 2), round(row.gib_max, 2))
        assert got == want, (layout, mesh, got)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("mesh", "placements"), [((8,), (Shard(0),)), ((2, 8), (Replicate(), Shard(0)))]
)
def test_rank_plans_move_exactly_the_plan_traffic(mesh: tuple, placements: tuple) -> None:
    """Each rank's frozen wave parts send and receive exactly what ``traffic`` counts (own pieces
    never cross the collective but in direct waves, where they are its only copy), and every
    owned matrix is assembled from parts that tile it."""
    import dataclasses

    from amuse_dist.distributed.ownerwise_ns import rank_plan

    ns = NewtonSchulz(5, torch.bfloat16)
    shapes = llama3_muon_shapes("8B")
    base = [MatrixTask(mesh_layout(s, mesh, placements)) for s in shapes]
    plan = build_group_plan(range(len(base)), base, ns.flops, 2, "split")
    t = traffic(plan, base, ns.flops, 2)
    ws = base[0].layout.world_size
    for me in range(ws):
        tasks = [
            dataclasses.replace(task, layout=dataclasses.replace(task.layout, rank=me))
            for task in base
        ]
        rp = rank_plan(plan, tasks, me)
        sent = recv = 0
        for w in rp.waves:
            sent += sum(w.send_splits) - w.send_splits[me]
            sent += sum(w.return_send_splits) - w.return_send_splits[me]
            recv += sum(w.recv_splits) - w.recv_splits[me]
            recv += sum(w.return_recv_splits) - w.return_recv_splits[me]
            if not w.direct_in:
                assert w.send_splits[me] == 0 and w.recv_splits[me] == 0  # kept, not sent
            for b in w.batches:
                rows, cols, _ = b.signature
                for m in b.matrices:
                    assert sum(p.piece.numel for p in m.parts) == rows * cols
        assert (sent * 2, recv * 2) == (t.sent[me], t.recv[me]), me
