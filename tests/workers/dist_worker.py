"""Run under torchrun (gloo): train the toy model with a distributed optimizer, save what happened.

Modes: "fsdp" (fully_shard on every submodule and the root), "replicated" (plain tensors, gradients
all-reduced by hand as DDP would), "refuse" (a Partial layout must be refused by name).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial

from amuse_dist import AMUSE, Muon, param_groups
from tests._titan import finish_worker
from tests.toy import DIRECTION_ARMS, HP, batch, direction_optimizer, loss_fn, make_model


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def build(mode: str, optimizer: str, exact_x: bool):
    model = make_model().double()
    if mode == "fsdp":
        for module in list(model.children()):
            fully_shard(module)
        fully_shard(model)
    groups = param_groups(model)
    if optimizer in DIRECTION_ARMS:
        opt = direction_optimizer(optimizer, groups)
    elif optimizer == "amuse":
        opt = AMUSE(groups, ns_dtype=torch.float32, exact_x=exact_x, **HP)
    else:
        opt = Muon(groups, lr=0.01, weight_decay=0.05, ns_dtype=torch.float32)
    return model, opt


def train(mode: str, optimizer: str, steps: int, exact_x: bool) -> dict:
    rank, ws = dist.get_rank(), dist.get_world_size()
    model, opt = build(mode, optimizer, exact_x)
    losses, ns_logs, xs_mid = [], [], None
    for step in range(steps):
        inputs, labels = batch(step)
        per = inputs.shape[0] // ws
        sl = slice(rank * per, (rank + 1) * per)
        loss = loss_fn(model, inputs[sl], labels[sl])
        loss.backward()
        if mode == "replicated":
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= ws
        opt.step()
        opt.zero_grad(set_to_none=True)
        ns_logs.append(opt.ns_log)
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / ws)
        if optimizer.startswith("amuse") and step == steps // 2:
            xs_mid = x_by_name(model, opt)
    out = {
        "params": {n: full(p) for n, p in model.named_parameters()},
        "losses": losses,
        "ns_logs": ns_logs,
        "x_mid": xs_mid,
        # the direction's state (NorMuon per row, AdaMuon per element): placements and values
        "direction_state": {
            n: (str(s.placements) if isinstance(s, DTensor) else "plain", full(s))
            for n, p in model.named_parameters()
            for key, s in opt.state[p].items()
            if key in ("normuon_v", "adamuon_v")
        },
    }
    if optimizer.startswith("amuse"):
        out["x"] = x_by_name(model, opt)
        out["z"] = {n: full(opt.state[p]["z"]) for n, p in model.named_parameters()}
        out["placements"] = {
            n: str(opt.state[p]["z"].placements) if isinstance(p, DTensor) else "plain"
            for n, p in model.named_parameters()
        }
        out["update_rms"] = opt.update_rms()
    return out


def x_by_name(model: torch.nn.Module, opt: AMUSE) -> dict[str, torch.Tensor]:
    xs = opt.x_tensors()
    return {n: full(xs[p]) for n, p in model.named_parameters()}


def refuse() -> dict:
    """A Partial parameter (a pending reduction) cannot be cut into pieces: refused by name."""
    errors = {}
    ws = dist.get_world_size()
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("dp_shard",))
    w = torch.nn.Parameter(DTensor.from_local(torch.randn(8, 8), mesh, [Partial()]))
    w.grad = torch.zeros_like(w)
    opt = AMUSE([{"params": [("layers.0.attention.wq.weight", w)], "use_muon": True}], **HP)
    try:
        opt.step()
    except ValueError as e:
        errors["partial"] = str(e)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["fsdp", "replicated", "refuse"], required=True)
    parser.add_argument("--optimizer", choices=["amuse", "muon"], default="amuse")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--exact-x", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    if args.mode == "refuse":
        result = refuse()
    else:
        result = train(args.mode, args.optimizer, args.steps, args.exact_x)
        if args.optimizer == "amuse" and not args.exact_x:
            # the NorMuon / AdaMuon arms ride on the AMUSE launches (one launch per rank count)
            result["arms"] = {
                arm: train(args.mode, arm, args.steps, False) for arm in DIRECTION_ARMS
            }
    finish_worker(result, args.out)


if __name__ == "__main__":
    main()
