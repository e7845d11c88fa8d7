"""Time one optimizer step on an FSDP2 (fully_shard) Llama-shaped model, per world size.

Optimizers (all on the same sharded model, same random gradients):

* ``amuse``      AMUSE with owner-wise Newton-Schulz (each matrix orthogonalized once, on its owner)
* ``replicated`` AMUSE whose Muon branch does what a naive FSDP Muon does: every rank all-gathers
                 every update (``DTensor.full_tensor()``, in the NS dtype bf16), runs NS5 on every
                 matrix (``orthogonalize_full``), and keeps its own shard of the result
* ``muon``       amuse_dist.optim.Muon (owner-wise, same NS code)
* ``adamw``      torch.optim.AdamW(foreach=True, fused=False) on every parameter

Per optimizer and world size: the step time (median over repeats, warm-up excluded; each repeat
is the slowest rank's time), the per-rank time spent inside Newton-Schulz (every call of
``amuse_dist.distributed.ownerwise_ns.orthogonalize_full`` is wrapped; on CPU measured as thread CPU
time, robust to oversubscription; on CUDA as synchronized wall time), max and mean over ranks,
the payload bytes each rank sends per step for Newton-Schulz (owner-wise: counted by wrapping
``torch.distributed.all_to_all_single``, own chunk excluded; replicated: (world - 1) x the local
bf16 shard of every matrix, what its all-gather sends), and the step time relative to AdamW.

The parent process launches one ``torchrun`` per world size (gloo on CPU with OMP_NUM_THREADS=1
per rank, NCCL on CUDA) and prints one table. Acceptance (CPU default): AMUSE's NS time, max over
ranks, is <= 0.6x the replicated variant's at world size 2 and <= 0.35x at world size 4.

Usage: python benchmarks/optimizer_step.py [--world-sizes 1 2 4] [--shapes debug|124m|1.3b]
       [--device auto|cpu|cuda] [--warmup 2] [--repeats 7] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

OPTIMIZERS = ("amuse", "replicated", "muon", "adamw")
THRESHOLDS = {2: 0.6, 4: 0.35}  # AMUSE NS time (max over ranks) / replicated's, acceptance

# name: (dim, n_layers, ffn hidden, vocab)
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "debug": (256, 4, 768, 2048),
    "124m": (768, 12, 3072, 50304),
    "1.3b": (2048, 24, 5632, 50304),
}


# --------------------------------------------------------------------------------------- model
class Attention(nn.Module):
    def __init__(self, dim: int, kv_dim: int):
        super().__init__()
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, kv_dim, bias=False)
        self.wv = nn.Linear(dim, kv_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.attention = Attention(dim, dim)
        self.feed_forward = FeedForward(dim, hidden)
        self.attention_norm = nn.RMSNorm(dim)
        self.ffn_norm = nn.RMSNorm(dim)


class LlamaShaped(nn.Module):
    """Parameters of a Llama (names as in torchtitan); only the optimizer step is benchmarked."""

    def __init__(self, dim: int, n_layers: int, hidden: int, vocab: int):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, hidden) for _ in range(n_layers))
        self.norm = nn.RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)


# --------------------------------------------------------------------------------------- probes
class Probe:
    """Per-step counters filled by the wrappers below."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.reset()

    def reset(self) -> None:
        self.ns_cpu = 0.0
        self.ns_wall = 0.0
        self.ns_calls = 0
        self.sent = 0
        self.recv = 0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def install_probes(probe: Probe) -> None:
    """Wrap orthogonalize_full (NS time) and all_to_all_single (owner-wise bytes)."""
    from amuse_dist.distributed import ownerwise_ns

    orig_ns: Callable[..., Any] = ownerwise_ns.orthogonalize_full

    def timed_ns(*args: Any, **kwargs: Any) -> Any:
        probe.sync()
        c0, w0 = time.thread_time(), time.perf_counter()
        out = orig_ns(*args, **kwargs)
        probe.sync()
        probe.ns_cpu += time.thread_time() - c0
        probe.ns_wall += time.perf_counter() - w0
        probe.ns_calls += 1
        return out

    ownerwise_ns.orthogonalize_full = timed_ns  # OwnerwiseNewtonSchulz._run looks it up per call

    orig_a2a: Callable[..., Any] = dist.all_to_all_single

    def counted_a2a(
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: list[int] | None = None,
        input_split_sizes: list[int] | None = None,
        **kw: Any,
    ) -> Any:
        group = kw.get("group")
        rank, ws = dist.get_rank(group), dist.get_world_size(group)
        elem = input.element_size()
        ins = input_split_sizes or [input.numel() // ws] * ws
        outs = output_split_sizes or [output.numel() // ws] * ws
        probe.sent += (sum(ins) - ins[rank]) * elem
        probe.recv += (sum(outs) - outs[rank]) * elem
        return orig_a2a(output, input, output_split_sizes, input_split_sizes, **kw)

    dist.all_to_all_single = counted_a2a  # ownerwise_ns calls dist.all_to_all_single


# --------------------------------------------------------------------------- replicated variant
class ReplicatedMuonBranch:
    """Naive FSDP Muon: all-gather every update, NS5 on every matrix on every rank, keep shard."""

    def __init__(self, ns_steps: int, ns_dtype: torch.dtype, replicated_group: Any, probe: Probe):
        self.ns_steps = ns_steps
        self.ns_dtype = ns_dtype
        self.replicated_group = replicated_group
        self.probe = probe
        self.ns = None  # AMUSE.ns_log reads this

    def orthogonalize(
        self,
        params: Sequence[torch.Tensor],
        splits: Sequence[Sequence[int]],
        updates: Sequence[torch.Tensor],
    ) -> list[torch.Tensor]:
        from torch.distributed.tensor import DTensor, Shard

        from amuse_dist.distributed import ownerwise_ns
        from amuse_dist.distributed.layout import chunk_sizes

        fulls = []
        for p, u in zip(params, updates, strict=True):
            u = u.to(self.ns_dtype)
            if isinstance(p, DTensor):
                d = DTensor.from_local(
                    u,
                    p.device_mesh,
                    p.placements,
                    run_check=False,
                    shape=p.shape,
                    stride=p.stride(),
                )
                full = d.full_tensor()
                self.probe.sent += u.numel() * u.element_size() * (p.device_mesh.size() - 1)
                self.probe.recv += (full.numel() - u.numel()) * u.element_size()
                fulls.append(full)
            else:
                fulls.append(u)
        outs = ownerwise_ns.orthogonalize_full(
            fulls, [tuple(s) for s in splits], self.ns_steps, self.ns_dtype
        )
        local = []
        for p, o in zip(params, outs, strict=True):
            if isinstance(p, DTensor) and isinstance(p.placements[0], Shard):
                dim = p.placements[0].dim
                sizes = chunk_sizes(p.shape[dim], p.device_mesh.size())
                rank = p.device_mesh.get_local_rank(0)
                o = o.narrow(dim, sum(sizes[:rank]), sizes[rank])
            local.append(o)
        return local


def make_optimizer(name: str, model: nn.Module, probe: Probe) -> torch.optim.Optimizer:
    from amuse_dist import AMUSE, Muon, param_groups

    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True, fused=False)
    if name == "muon":
        return Muon(param_groups(model), lr=2e-3, weight_decay=0.1)
    opt = AMUSE(param_groups(model), lr=0.01, warmup_steps=2000, weight_decay=0.05)
    if name == "replicated":
        branch = opt._muon
        opt._muon = ReplicatedMuonBranch(  # type: ignore[assignment]
            branch.ns_steps, branch.ns_dtype, branch.replicated_group, probe
        )
    return opt


# --------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    mesh = init_device_mesh(device.type, (ws,))

    with torch.device("meta"):
        model = LlamaShaped(*SHAPES[args.shapes])
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(1234 + rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            if name.endswith("norm.weight"):
                local.fill_(1.0)
            else:
                local.normal_(0.0, 0.02, generator=gen)
            g = torch.randn(local.shape, generator=gen, device=device) * 1e-3
            p.grad = (
                DTensor.from_local(
                    g,
                    p.device_mesh,
                    p.placements,
                    run_check=False,
                    shape=p.shape,
                    stride=p.stride(),
                )
                if isinstance(p, DTensor)
                else g
            )

    probe = Probe(cuda)
    install_probes(probe)

    def timed_step(opt: torch.optim.Optimizer) -> dict[str, float]:
        probe.sync()
        dist.barrier()
        probe.reset()
        t0 = time.perf_counter()
        opt.step()
        probe.sync()
        dt = time.perf_counter() - t0
        return dict(
            step=dt,
            ns_cpu=probe.ns_cpu,
            ns_wall=probe.ns_wall,
            ns_calls=probe.ns_calls,
            sent=probe.sent,
            recv=probe.recv,
        )

    def owners_of(opt: torch.optim.Optimizer) -> list[int] | None:
        ns_obj = getattr(getattr(opt, "_muon", None), "ns", None)
        return list(ns_obj.owner) if ns_obj is not None else None

    results: dict[str, Any] = {}
    rounds = range(args.warmup + args.repeats)
    if args.sequential:  # one optimizer's state alive at a time (large shapes on one GPU)
        for name in args.optimizers:
            opt = make_optimizer(name, model, probe)
            steps = [timed_step(opt) for _ in rounds][args.warmup :]
            results[name] = dict(steps=steps, owners=owners_of(opt))
            del opt
            if cuda:
                torch.cuda.empty_cache()
    else:  # interleaved rounds: background load hits every optimizer alike
        opts = {name: make_optimizer(name, model, probe) for name in args.optimizers}
        log: dict[str, list[dict[str, float]]] = {name: [] for name in opts}
        for _ in rounds:
            for name, opt in opts.items():
                log[name].append(timed_step(opt))
        for name, opt in opts.items():
            results[name] = dict(steps=log[name][args.warmup :], owners=owners_of(opt))

    from amuse_dist import param_groups

    shapes = [tuple(p.shape) for g in param_groups(model) if g["use_muon"] for _, p in g["params"]]
    gathered: list[Any] = [None] * ws
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world_size": ws, "ranks": gathered, "muon_shapes": shapes}, f)
    from amuse_dist.titan.launch import leave_process_group

    leave_process_group()


# --------------------------------------------------------------------------------------- parent
def summarize(
    raw: dict[str, Any], names: Sequence[str], ns_key: str
) -> dict[str, dict[str, float]]:
    """Medians over repeats: step time (slowest rank per repeat), NS time per rank, bytes.

    ``ns_key`` is the NS timer the "NS ms" columns and the acceptance use: "ns_cpu" (thread CPU
    time, CPU runs) or "ns_wall" (synchronized wall time, CUDA runs).
    """
    ranks = raw["ranks"]
    out: dict[str, dict[str, float]] = {}
    for name in names:
        per_rank = [r[name]["steps"] for r in ranks]
        n = len(per_rank[0])
        step = statistics.median(max(pr[i]["step"] for pr in per_rank) for i in range(n))
        ns_t = [statistics.median(s[ns_key] for s in pr) for pr in per_rank]
        ns_wall = [statistics.median(s["ns_wall"] for s in pr) for pr in per_rank]
        sent = [statistics.median(s["sent"] for s in pr) for pr in per_rank]
        out[name] = dict(
            step_ms=step * 1e3,
            ns_max_ms=max(ns_t) * 1e3,
            ns_mean_ms=statistics.fmean(ns_t) * 1e3,
            ns_wall_max_ms=max(ns_wall) * 1e3,
            sent_mean=statistics.fmean(sent),
            sent_max=float(max(sent)),
        )
    if "adamw" in out:
        for name in names:
            out[name]["vs_adamw"] = out[name]["step_ms"] / out["adamw"]["step_ms"]
    return out


def check_exchange_model(raw: dict[str, Any]) -> bool | None:
    """Do the counted owner-wise bytes equal ns_balance's exchange model for these owners?"""
    sys.path.insert(0, str(Path(__file__).parent))
    from ns_balance import exchange_bytes

    ws = raw["world_size"]
    amuse = raw["ranks"][0].get("amuse")
    if ws == 1 or amuse is None or amuse["owners"] is None:
        return None
    model = exchange_bytes([tuple(s) for s in raw["muon_shapes"]], amuse["owners"], ws, 2)
    counted = [
        r["amuse"]["steps"][0]["sent"] + r["amuse"]["steps"][0]["recv"] for r in raw["ranks"]
    ]
    return counted == model


def launch(ws: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    env = {**os.environ}
    if args.device == "cpu":
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ws}",
        str(Path(__file__).resolve()),
        "--worker",
        "--out",
        str(out),
        "--device",
        args.device,
        "--shapes",
        args.shapes,
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
        "--optimizers",
        *args.optimizers,
        *(["--sequential"] if args.sequential else []),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"world size {ws} failed: {' '.join(cmd)}")
    with open(out) as f:
        return json.load(f)


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="debug")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="time optimizers one after another (less memory) instead of in interleaved rounds",
    )
    parser.add_argument("--timeout", type=int, default=900, help="seconds per world size")
    parser.add_argument("--json", metavar="PATH", help="also write summary + raw data as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda":
        n_gpu = torch.cuda.device_count()
        skipped = [w for w in args.world_sizes if w > n_gpu]
        if skipped:
            print(f"skipping world sizes {skipped}: only {n_gpu} GPU(s)")
        args.world_sizes = [w for w in args.world_sizes if w <= n_gpu]

    dim, layers, hidden, vocab = SHAPES[args.shapes]
    cpu = args.device == "cpu"
    timer = "thread CPU time (time.thread_time)" if cpu else "wall time, CUDA-synchronized"
    ns_key = "ns_cpu" if cpu else "ns_wall"
    print(
        f"shapes {args.shapes}: dim {dim}, {layers} layers, ffn {hidden}, vocab {vocab}; "
        f"device {args.device} ({'gloo, OMP_NUM_THREADS=1 per rank' if args.device == 'cpu' else 'nccl'}), "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}; warm-up {args.warmup}, "
        f"median of {args.repeats} "
        f"({'sequential' if args.sequential else 'interleaved rounds'})"
    )
    print(f"NS time = time inside orthogonalize_full per rank per step, measured as {timer}")

    summaries: dict[int, dict[str, dict[str, float]]] = {}
    raws: dict[int, Any] = {}
    exchange_ok: dict[int, bool | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ws in args.world_sizes:
            t0 = time.perf_counter()
            raw = launch(ws, args, Path(tmp) / f"ws{ws}.json")
            raws[ws] = raw
            summaries[ws] = summarize(raw, args.optimizers, ns_key)
            exchange_ok[ws] = check_exchange_model(raw)
            print(f"  world size {ws}: {time.perf_counter() - t0:.1f}s")

    head = (
        "| world | optimizer | step ms (median) | x AdamW | NS ms max rank | NS ms mean rank "
        "| NS wall ms max rank | NS MiB sent/rank mean | NS MiB sent/rank max |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for ws, summary in summaries.items():
        for name in args.optimizers:
            s = summary[name]
            ratio = f"{s['vs_adamw']:.2f}" if "vs_adamw" in s else "-"
            lines.append(
                f"| {ws} | {name} | {s['step_ms']:.1f} | {ratio} | {s['ns_max_ms']:.1f} "
                f"| {s['ns_mean_ms']:.1f} | {s['ns_wall_max_ms']:.1f} "
                f"| {fmt_bytes(s['sent_mean'])} | {fmt_bytes(s['sent_max'])} |"
            )
    print()
    print("\n".join(lines))
    print()
    for ws, ok in exchange_ok.items():
        if ok is not None:
            print(
                f"world size {ws}: counted owner-wise all_to_all bytes "
                f"{'match' if ok else 'DO NOT match'} the ns_balance exchange model"
            )

    checks = []
    if "amuse" in args.optimizers and "replicated" in args.optimizers:
        for ws, limit in THRESHOLDS.items():
            if ws not in summaries:
                continue
            s = summaries[ws]
            ratio = s["amuse"]["ns_max_ms"] / s["replicated"]["ns_max_ms"]
            ok = ratio <= limit
            checks.append(dict(world_size=ws, ratio=ratio, limit=limit, passed=ok))
            print(
                f"world size {ws}: AMUSE NS time (max over ranks) / replicated = {ratio:.3f} "
                f"(<= {limit}) {'PASS' if ok else 'FAIL'}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    config=dict(
                        shapes=args.shapes,
                        device=args.device,
                        warmup=args.warmup,
                        repeats=args.repeats,
                        sequential=args.sequential,
                        torch=torch.__version__,
                        cpus=os.cpu_count(),
                        ns_timer=timer,
                    ),
                    summary={str(k): v for k, v in summaries.items()},
                    checks=checks,
                    exchange_model_match={str(k): v for k, v in exchange_ok.items()},
                    raw={str(k): v for k, v in raws.items()},
                ),
                f,
                indent=1,
            )
        print(f"wrote {args.json}")
    if any(not c["passed"] for c in checks):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
