"""Run under torchrun (gloo): the toy model on every mesh layout, AMUSE and Muon, in one launch.

``--suite meshes`` (4 ranks): 1-D FSDP 4, HSDP 2x2 (split and per_replica modes), TP 4 and
FSDP+TP 2x2, each with AMUSE, Muon, NorMuon, AdaMuon and AMUSE with the NorMuon and AdaMuon
directions. ``--suite pipeline`` (any rank count): 1-D FSDP with small
waves, pipelined and unpipelined. Saves, per run, the full parameters, losses, X and the Muon
matrices each rank orthogonalized per step.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from amuse_dist import AMUSE, Muon, param_groups
from tests._titan import finish_worker
from tests.toy import DIRECTION_ARMS, HP, batch, direction_optimizer, loss_fn, make_model

TP_PLAN = {
    "up": ColwiseParallel(use_local_output=False),  # uneven: keep the global shape
    "mid": RowwiseParallel(),
    "tiny": ColwiseParallel(use_local_output=False),
    "back": RowwiseParallel(),
}


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def build(layout: str):
    """The toy model on ``layout``; returns it and (data-parallel index, data-parallel size)."""
    rank, ws = dist.get_rank(), dist.get_world_size()
    model = make_model().double()
    if layout == "fsdp":
        mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("dp_shard",))
        for m in list(model.children()) + [model]:
            fully_shard(m, mesh=mesh)
        return model, (rank, ws)
    if layout == "hsdp":
        mesh = init_device_mesh("cpu", (2, ws // 2), mesh_dim_names=("dp_replicate", "dp_shard"))
        for m in list(model.children()) + [model]:
            fully_shard(m, mesh=mesh)
        return model, (rank, ws)
    if layout == "tp":
        mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("tp",))
        parallelize_module(model, mesh, TP_PLAN)
        return model, (0, 1)
    if layout == "fsdp_tp":
        mesh = init_device_mesh("cpu", (2, ws // 2), mesh_dim_names=("dp_shard", "tp"))
        parallelize_module(model, mesh["tp"], TP_PLAN)
        for m in list(model.children()) + [model]:
            fully_shard(m, mesh=mesh["dp_shard"])
        return model, (mesh.get_local_rank("dp_shard"), mesh.size(0))
    raise ValueError(layout)


def train(layout: str, optimizer: str, steps: int, **muon: object) -> dict:
    model, (dp, dp_size) = build(layout)
    groups = param_groups(model)
    mode = muon.pop("hsdp_mode", "split")
    if optimizer in DIRECTION_ARMS:
        opt = direction_optimizer(optimizer, groups, hsdp_mode=mode)
    elif optimizer == "amuse":
        opt = AMUSE(groups, ns_dtype=torch.float32, hsdp_mode=mode, **HP)
    else:
        opt = Muon(groups, lr=0.01, weight_decay=0.05, ns_dtype=torch.float32, hsdp_mode=mode)
    for key, value in muon.items():  # wave_bytes / pipeline: the branch's own knobs
        setattr(opt._muon, key, value)
    losses, ns_logs = [], []
    for step in range(steps):
        inputs, labels = batch(step)
        per = inputs.shape[0] // dp_size
        sl = slice(dp * per, (dp + 1) * per)
        loss = loss_fn(model, inputs[sl], labels[sl])
        loss.backward()
        for p in model.parameters():  # a TP weight used twice gets its grad back Replicate()
            if isinstance(p, DTensor) and p.grad.placements != p.placements:
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ns_logs.append(opt.ns_log)
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / dist.get_world_size())
    out = {
        "params": {n: full(p) for n, p in model.named_parameters()},
        "losses": losses,
        "ns_logs": ns_logs,
        "placements": {
            n: str(p.placements) if isinstance(p, DTensor) else "plain"
            for n, p in model.named_parameters()
        },
        "waves": [len(plan.waves) for plan in opt._muon.ns.plans] if opt._muon.ns else [],
        "modes": opt._muon.ns.hsdp_modes if opt._muon.ns else [],
    }
    if optimizer.startswith("amuse"):
        xs = opt.x_tensors()
        out["x"] = {n: full(xs[p]) for n, p in model.named_parameters()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", choices=["meshes", "pipeline"], required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    runs: dict[str, dict] = {}
    if args.suite == "meshes":
        for optimizer in ("amuse", "muon", *DIRECTION_ARMS):
            for layout in ("fsdp", "hsdp", "tp", "fsdp_tp"):
                runs[f"{layout}/{optimizer}"] = train(layout, optimizer, args.steps)
            runs[f"hsdp_per_replica/{optimizer}"] = train(
                "hsdp", optimizer, args.steps, hsdp_mode="per_replica"
            )
    else:
        for pipeline in (True, False):
            # 32 bytes per wave: every toy matrix (fp32) is its own batch and its own wave
            runs[f"pipeline={pipeline}"] = train(
                "fsdp", "amuse", args.steps, wave_bytes=32, pipeline=pipeline
            )
    finish_worker(runs, args.out)


if __name__ == "__main__":
    main()
