"""What one optimizer step costs: op counts, elementwise time, and owner-wise NS under FSDP2.

Model shapes come from torchtitan's Llama 3 flavors (``amuse_dist.titan.model.FLAVORS``):
``tiny`` = "tiny", ``debug`` = "debugmodel", ``124m`` = "124M", ``1.3b`` = "1.3B", ``8b`` = "8B".

Sections (``--sections``, all by default), one process unless noted:

* ``ops``   top-level, non-view aten ops per step (torch.profiler; an op is counted unless it is a
            view or runs inside another counted op) for AMUSE with Newton-Schulz replaced by the
            identity (``amuse``), AMUSE with real bf16 NS (``amuse+ns``, one process: NS is
            batched per shape), torch AdamW(foreach) and AdamW(fused), at the flavor's depth
            and at half of it (the count must not grow with the number of parameters). Counted
            on the meta device (the same top-level dispatch without the math, so 8B fits; fused
            AdamW, which has no meta kernel, runs on the CPU where the shapes fit).
* ``time``  the elementwise step: AMUSE with identity NS vs torch AdamW(foreach=True) and
            AdamW(fused=True) on the same parameters and gradients, same process, interleaved
            rounds, median ms (shapes that fit in memory: not 8B on CPU).
* ``dist``  one ``torchrun`` per world size (gloo on CPU, OMP_NUM_THREADS=1 per rank; NCCL on
            CUDA): the FSDP2-sharded model's step for ``amuse`` (owner-wise NS), ``replicated``
            (every rank all-gathers every update and runs NS on everything, built here),
            ``muon`` and ``adamw``; per-rank NS time (the optimizer's orthogonalizer, timed by
            ``TimedNS``: thread CPU time on CPU, synchronized wall time on CUDA) and NS bytes sent (``all_to_all_single``
            wrapped). Acceptance (CPU): AMUSE's NS time, max over ranks, <= 0.6x the replicated
            variant's at world size 2 and <= 0.35x at world size 4.

* ``passes`` issue 20's targets per dispatched op on the third step: bytes per Muon-/AdamW-branch
            element (<= 32 / <= 28), copies, host reads, allocations, ops at two depths.
* ``plan``  exchange-plan overhead per step at 8/64/256/1024 fake ranks (``--fake-ranks``) (8B shapes, a fake process
            group, identity NS), from benchmarks/exchange_plan.py.
* ``memory`` the owner's peak extra memory for 8B at 8 ranks (meta tensors, real NS), default
            wave size vs unpipelined vs one wave.

Usage: python benchmarks/optimizer_step.py [--sections ops time dist passes plan memory] [--shapes debug 124m 8b]
       [--dist-shapes debug] [--world-sizes 1 2 4] [--device auto|cpu|cuda] [--warmup 2]
       [--repeats 7] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from amuse_dist.titan.launch import setup_device, torchrun_command

OPTIMIZERS = ("amuse", "replicated", "muon", "adamw")
SECTIONS = ("ops", "time", "dist", "plan", "memory", "passes")
# Tiny arguments per section for tests/test_benchmarks.py (seconds each; figures not checked).
SMOKE = {
    "ops": ["--sections", "ops", "--shapes", "debug"],
    "time": ["--sections", "time", "--shapes", "debug", "--warmup", "1", "--repeats", "1"],
    "dist": [
        "--sections", "dist", "--world-sizes", "2", "--warmup", "1", "--repeats", "1",
        "--no-timing-checks",
    ],
    "plan": ["--sections", "plan", "--fake-ranks", "8", "--repeats", "1"],
    "memory": ["--sections", "memory"],
    "passes": ["--sections", "passes", "--shapes", "debug", "--device", "cpu"],
}  # fmt: skip
THRESHOLDS = {2: 0.6, 4: 0.35}  # AMUSE NS time (max over ranks) / replicated's, acceptance
ELEMENTWISE_LIMIT = 1.3  # AMUSE elementwise step / AdamW(foreach), 124m shapes (issue 10)

# shape name -> torchtitan flavor (amuse_dist.titan.model.FLAVORS); shapes derive from it
FLAVOR_OF = {"tiny": "tiny", "debug": "debugmodel", "124m": "124M", "1.3b": "1.3B", "8b": "8B"}
FITS_ON_CPU = ("tiny", "debug", "124m", "1.3b")


def flavor_args(shapes: str, n_layers: int | None = None) -> Any:
    """The torchtitan model args of ``shapes`` (optionally with another depth)."""
    setup_device()  # as every entry point does, before torchtitan is imported
    from amuse_dist.titan.model import FLAVORS

    args = FLAVORS[FLAVOR_OF[shapes]]
    return dataclasses.replace(args, n_layers=n_layers) if n_layers is not None else args


def build_model(shapes: str, n_layers: int | None = None) -> nn.Module:
    """torchtitan's Llama 3 of that flavor on the meta device (only the parameters matter)."""
    args = flavor_args(shapes, n_layers)
    from torchtitan.models.llama3 import Transformer

    with torch.device("meta"):
        return Transformer(args)


def describe(shapes: str) -> str:
    a = flavor_args(shapes)
    model = build_model(shapes)
    layer = model.layers["0"]
    n = sum(p.numel() for p in model.parameters())
    return (
        f"{shapes} (flavor {FLAVOR_OF[shapes]!r}): dim {a.dim}, {a.n_layers} layers, "
        f"wk {tuple(layer.attention.wk.weight.shape)}, w1 {tuple(layer.feed_forward.w1.weight.shape)}, "
        f"vocab {a.vocab_size}, {n / 1e6:.1f}M parameters"
    )


# ------------------------------------------------------------------------- in-process sections
class IdentityNS:
    """An orthogonalizer that returns its batch: isolates the elementwise step (the staging and
    the exchange's own work stay in; in one process that is no copy at all)."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16) -> None:
        self.dtype = dtype

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def flops(self, rows: int, cols: int) -> float:
        from amuse_dist.optim.newton_schulz import ns_flops

        return float(ns_flops(rows, cols))


def fill(model: nn.Module, device: torch.device | str, seed: int = 0) -> nn.Module:
    """Materialize ``model`` on ``device`` with random weights and gradients (meta stays meta)."""
    model = model.to_empty(device=device)
    if str(device) == "meta":
        for p in model.parameters():
            p.grad = torch.empty_like(p)
        return model
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
            p.grad = torch.randn(p.shape, generator=gen, device=p.device) * 1e-3
    return model


def local_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    """One process, no process group: amuse (identity NS), amuse_logging (identity NS, update
    RMS tracked), amuse+ns, amuse_bare (``AMUSE(param_groups(model))``), adamw_foreach/fused."""
    from amuse_dist import AMUSE, param_groups

    if name == "adamw_foreach":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, foreach=True)
    if name == "adamw_fused":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    if name == "amuse_bare":  # as the README builds it: update RMS tracked on every step
        return AMUSE(param_groups(model))
    opt = AMUSE(param_groups(model), lr=0.01, warmup_steps=2000, weight_decay=0.05)
    opt.track_update_rms = name == "amuse_logging"  # else a step whose metrics are not logged
    if name in ("amuse", "amuse_logging"):
        opt._muon.orthogonalizer = IdentityNS(opt._muon.ns_dtype)
    return opt


def _is_view(name: str) -> bool:
    """Does the aten op return an alias of an input (a view), per its schema?"""
    op = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    if op is None:
        return False
    for overload in op.overloads():
        rets = getattr(op, overload)._schema.returns
        if any(r.alias_info is not None and not r.alias_info.is_write for r in rets):
            return True
    return False


def count_ops(fn: Callable[[], Any]) -> Counter[str]:
    """Top-level non-view aten ops of one call of ``fn``: an aten op is counted unless it is a
    view or runs inside another counted op (so a view's real work still counts once)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counted: set[int] = set()
    out: Counter[str] = Counter()
    views: dict[str, bool] = {}
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        # amuse:: ops are the optimizer's fused passes (one op each, like a fused kernel)
        if not e.name.startswith(("aten::", "amuse::")):
            continue
        if e.name not in views:
            views[e.name] = _is_view(e.name)
        parent, inside = e.cpu_parent, False
        while parent is not None:
            if id(parent) in counted:
                inside = True
                break
            parent = parent.cpu_parent
        if not inside and not views[e.name]:
            counted.add(id(e))
            out[e.name] += 1
    return out


_NO_DATA_OPS = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")
COPY_OPS = ("copy_", "_foreach_copy_", "cat", "clone", "_to_copy", "contiguous", "stack")
SYNC_OPS = ("item", "_local_scalar_dense", "nonzero", "equal", "is_nonzero")


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _nbytes(ts: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


class StepCounter(TorchDispatchMode):
    """Per dispatched op (an aten op or one of the optimizer's fused ``amuse::`` passes, whose
    insides the mode does not see, as a fused kernel's): bytes moved, copies, allocations, syncs.

    Bytes of an op: every tensor it reads once (inputs), every tensor it writes once (fresh
    outputs and ``out`` arguments); an argument it mutates in place is read and written (twice).
    Views and uninitialized allocations move nothing. ``allocs`` counts ops that return a fresh
    tensor; ``copies`` the copy/cat/clone family; ``syncs`` host reads (``.item()``, nonzero).
    """

    def __init__(self) -> None:
        super().__init__()
        self.bytes: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        ns = func._schema.name.split("::")[0]
        key = f"{ns}::{name}"
        self.calls[key] += 1
        returns = func._schema.returns
        if any(r.alias_info is not None and not r.alias_info.is_write for r in returns):
            return out  # a view
        if name in _NO_DATA_OPS:
            self.calls["alloc"] += 1
            return out
        moved = 0
        schema_args = func._schema.arguments
        values = list(args) + [None] * (len(schema_args) - len(args))
        for k, a in enumerate(schema_args):
            value = kwargs.get(a.name, values[k] if k < len(values) else None)
            ts = _tensors(value)
            if a.alias_info is not None and a.alias_info.is_write:
                write_only = a.is_out or a.name == "out"
                moved += _nbytes(ts) * (1 if write_only else 2)
            else:
                moved += _nbytes(ts)
        if all(r.alias_info is None for r in returns):
            fresh = _tensors(out) if not isinstance(out, (list, tuple)) else _tensors(list(out))
            moved += _nbytes(fresh)
            if fresh:
                self.calls["alloc"] += 1
        self.bytes[key] += moved
        return out

    def count(self, names: Sequence[str]) -> int:
        return sum(n for op, n in self.calls.items() if op.split("::")[-1] in names)


def count_step(opt: torch.optim.Optimizer) -> StepCounter:
    """One ``opt.step()`` under a ``StepCounter``."""
    with StepCounter() as counter:
        opt.step()
    return counter


def ops_per_step(name: str, shapes: str, n_layers: int | None, device: str) -> Counter[str]:
    """Op counts of the third step (state exists, nothing is first-step only)."""
    model = fill(build_model(shapes, n_layers), device)
    opt = local_optimizer(name, model)
    opt.step()
    opt.step()
    return count_ops(opt.step)


def ops_section(shapes_list: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for shapes in shapes_list:
        depth = flavor_args(shapes).n_layers
        for name in ("amuse", "amuse+ns", "adamw_foreach", "adamw_fused"):
            # the meta device dispatches the same top-level ops without doing the math; fused
            # AdamW has no meta kernel, so it runs on the CPU where the shapes fit
            device = "cpu" if name == "adamw_fused" else "meta"
            if device == "cpu" and shapes not in FITS_ON_CPU:
                continue
            counts = [ops_per_step(name, shapes, n, device) for n in (depth, depth // 2)]
            rows.append(
                dict(
                    shapes=shapes,
                    device=device,
                    optimizer=name,
                    ops=sum(counts[0].values()),
                    ops_half_depth=sum(counts[1].values()),
                    item_ops=counts[0]["aten::item"],
                    by_op=dict(counts[0].most_common()),
                )
            )
            print(
                f"  ops {shapes} {name}: {rows[-1]['ops']} (half depth {rows[-1]['ops_half_depth']})"
            )
    return rows


def time_section(
    shapes_list: Sequence[str], warmup: int, repeats: int, device: str
) -> list[dict[str, Any]]:
    """Median step ms per optimizer, interleaved rounds on the same parameters and gradients."""
    names = ["amuse", "adamw_foreach", "adamw_fused"]
    rows = []
    for shapes in shapes_list:
        if device == "cpu" and shapes not in FITS_ON_CPU:
            continue
        models = {n: fill(build_model(shapes), device) for n in names}
        opts = {n: local_optimizer(n, models[n]) for n in names}
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(warmup + repeats):
            for n in names:
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                opts[n].step()
                if device == "cuda":
                    torch.cuda.synchronize()
                if r >= warmup:
                    times[n].append(time.perf_counter() - t0)
        med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
        rows.append(
            dict(
                shapes=shapes,
                device=device,
                ms=med,
                amuse_vs_foreach=med["amuse"] / med["adamw_foreach"],
                amuse_vs_fused=med["amuse"] / med["adamw_fused"],
            )
        )
        print(f"  time {shapes}: " + ", ".join(f"{n} {v:.1f} ms" for n, v in med.items()))
        del models, opts
    return rows


# Sections measured by the exchange's own code (benchmarks/exchange_plan.py): exchange-plan time at
# 8/64/256/1024 fake ranks and the owner's peak extra memory for the 8B shapes at 8 ranks.
def plan_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    import exchange_plan as xp  # benchmarks/ is on sys.path when this script runs

    rows = [
        xp.time_exchange(world, rank, args.repeats)
        for world in args.fake_ranks
        for rank in sorted({0, xp.heaviest_owner(world)})
    ]
    dist.destroy_process_group()
    print(
        "| fake ranks | rank | matrices owned | waves | plan build ms (once) | exchange ms/step |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['ranks']} | {r['rank']} | {r['owned']} | {r['waves']} "
            f"| {r['build_ms']:.0f} | {r['step_ms']:.2f} |"
        )
    return rows


def memory_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    import exchange_plan as xp

    from amuse_dist.distributed.plan import DEFAULT_WAVE_BYTES

    rows = [
        xp.owner_memory(8, DEFAULT_WAVE_BYTES, True),
        xp.owner_memory(8, DEFAULT_WAVE_BYTES, False),
        xp.owner_memory(8, None, True),
    ]
    dist.destroy_process_group()
    print("| 8B at 8 ranks | waves | owner peak extra GiB |")
    print("|---|---|---|")
    for m in rows:
        wave = "one wave" if m["wave_bytes"] is None else f"{m['wave_bytes'] / 2**20:.0f} MiB"
        label = f"{wave}, {'pipelined' if m['pipeline'] else 'unpipelined'}"
        print(f"| {label} | {m['waves']} | {m['peak_gib']:.2f} |")
    return rows


def passes_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Issue 20's step targets, per dispatched op (``StepCounter``), on the third step: bytes
    per Muon-/AdamW-branch element, copies, host reads and allocations, and top-level ops at the
    flavor's depth and half of it (meta). ``amuse``/``amuse_logging``: identity NS (the
    elementwise step and its staging); ``amuse_bare``: the README's optimizer, real NS (CPU:
    debug shapes only, NS5 on bigger ones takes minutes there)."""
    rows = []
    for shapes in args.shapes:
        if args.device == "cpu" and shapes not in FITS_ON_CPU[:2]:
            continue
        depth = flavor_args(shapes).n_layers
        for name in ("amuse", "amuse_logging", "amuse_bare"):
            if name == "amuse_bare" and args.device == "cpu" and shapes != "debug":
                continue
            model = fill(build_model(shapes), args.device)
            opt = local_optimizer(name, model)
            opt.step()
            opt.step()
            c = count_step(opt)
            numel = {
                m: sum(
                    p.numel() for g in opt.param_groups if g["use_muon"] == m for p in g["params"]
                )
                for m in (True, False)
            }
            muon = c.bytes["amuse::nesterov"] + c.bytes["amuse::muon_post"]
            ops = [sum(ops_per_step(name, shapes, n, "meta").values()) for n in (depth, depth // 2)]
            rows.append(
                dict(
                    shapes=shapes,
                    optimizer=name,
                    muon_bytes_per_elem=muon / numel[True],
                    adamw_bytes_per_elem=c.bytes["amuse::adamw_step"] / numel[False],
                    step_bytes_per_elem=sum(c.bytes.values()) / (numel[True] + numel[False]),
                    copies=c.count(COPY_OPS),
                    host_reads=c.count(SYNC_OPS),
                    allocs=c.calls["alloc"],
                    ops=ops[0],
                    ops_half_depth=ops[1],
                )
            )
            del model, opt
    print(
        "| shapes | optimizer | Muon B/elem | AdamW B/elem | whole step B/elem | copies "
        "| host reads | allocations | ops (depth) | ops (half depth) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shapes']} | {r['optimizer']} | {r['muon_bytes_per_elem']:.4f} "
            f"| {r['adamw_bytes_per_elem']:.4f} | {r['step_bytes_per_elem']:.1f} "
            f"| {r['copies']} | {r['host_reads']} "
            f"| {r['allocs']} | {r['ops']} | {r['ops_half_depth']} |"
        )
    return rows


EXTRA_SECTIONS: dict[str, Callable[[argparse.Namespace], list[dict[str, Any]]]] = {
    "passes": passes_section,
    "plan": plan_section,
    "memory": memory_section,
}


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


class TimedNS:
    """An ``Orthogonalizer`` that times the one it wraps into the probe: the optimizer's NS5 is
    passed in (``MuonBranch.orthogonalizer``), nothing is patched."""

    def __init__(self, inner: Any, probe: Probe) -> None:
        self.inner, self.probe, self.dtype = inner, probe, inner.dtype

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.probe.sync()
        c0, w0 = time.thread_time(), time.perf_counter()
        out = self.inner(batch)
        self.probe.sync()
        self.probe.ns_cpu += time.thread_time() - c0
        self.probe.ns_wall += time.perf_counter() - w0
        self.probe.ns_calls += 1
        return out

    def flops(self, rows: int, cols: int) -> float:
        return self.inner.flops(rows, cols)


def install_probes(probe: Probe) -> None:
    """Wrap all_to_all_single (owner-wise bytes); NS time comes from ``TimedNS``."""
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

    def __init__(self, orthogonalizer: Any, replicated_group: Any, probe: Probe):
        self.orthogonalizer = orthogonalizer
        self.ns_dtype = orthogonalizer.dtype
        self.replicated_group = replicated_group
        self.probe = probe
        self.ns = None  # AMUSE.ns_log reads this
        self._staged: tuple[list, list, list] | None = None

    def stage(self, params: Sequence[torch.Tensor], splits: Sequence[Sequence[int]]) -> list:
        """Plain NS-dtype tensors for the updates (this variant all-gathers them anyway)."""
        from amuse_dist.distributed.layout import local_view

        inputs = [torch.empty_like(local_view(p), dtype=self.ns_dtype) for p in params]
        self._staged = (list(params), list(splits), inputs)
        return inputs

    def run(self, overlap: Callable[[], None] | None = None) -> list[torch.Tensor]:
        assert self._staged is not None
        params, splits, inputs = self._staged
        return self.orthogonalize(params, splits, inputs, overlap)

    def orthogonalize(
        self,
        params: Sequence[torch.Tensor],
        splits: Sequence[Sequence[int]],
        updates: Sequence[torch.Tensor],
        overlap: Callable[[], None] | None = None,
    ) -> list[torch.Tensor]:
        from torch.distributed.tensor import DTensor, Shard

        if overlap is not None:
            overlap()

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
            fulls, [tuple(s) for s in splits], self.orthogonalizer
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
        opt = Muon(param_groups(model), lr=2e-3, weight_decay=0.1)
    else:
        opt = AMUSE(param_groups(model), lr=0.01, warmup_steps=2000, weight_decay=0.05)
    branch = opt._muon
    branch.orthogonalizer = TimedNS(branch.orthogonalizer, probe)  # before the plan is built
    if name == "replicated":
        opt._muon = ReplicatedMuonBranch(  # type: ignore[assignment]
            branch.orthogonalizer, branch.replicated_group, probe
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

    model = build_model(args.dist_shapes)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(1234 + rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            if name.endswith("norm.weight"):  # RMSNorm gains
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

    def planned_bytes(opt: torch.optim.Optimizer) -> list[int] | None:
        """Bytes sent + received per rank per step by the exchange plan the optimizer built
        (``plan.traffic``: the benchmarks' and tests' model), to compare with what was counted."""
        from amuse_dist.distributed.plan import traffic

        ns_obj = getattr(getattr(opt, "_muon", None), "ns", None)
        if ns_obj is None:
            return None
        elem = torch.empty(0, dtype=ns_obj.orth.dtype).element_size()
        total = [0] * ws
        for plan in ns_obj.plans:
            t = traffic(plan, [ns_obj.tasks[i] for i in plan.tasks], ns_obj.orth.flops, elem)
            for r in range(plan.world_size):
                total[r] += t.sent[r] + t.recv[r]
        return total

    results: dict[str, Any] = {}
    rounds = range(args.warmup + args.repeats)
    if args.sequential:  # one optimizer's state alive at a time (large shapes on one GPU)
        for name in args.optimizers:
            opt = make_optimizer(name, model, probe)
            steps = [timed_step(opt) for _ in rounds][args.warmup :]
            results[name] = dict(steps=steps, owners=owners_of(opt), planned=planned_bytes(opt))
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
            results[name] = dict(
                steps=log[name][args.warmup :], owners=owners_of(opt), planned=planned_bytes(opt)
            )

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
    """Do the counted owner-wise all_to_all bytes equal the exchange plan's own traffic model
    (``amuse_dist.distributed.plan.traffic`` on the plan the optimizer built), rank by rank?"""
    ws = raw["world_size"]
    amuse = raw["ranks"][0].get("amuse")
    if ws == 1 or amuse is None or amuse.get("planned") is None:
        return None
    counted = [
        r["amuse"]["steps"][0]["sent"] + r["amuse"]["steps"][0]["recv"] for r in raw["ranks"]
    ]
    return counted == amuse["planned"]


def launch(ws: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    env = {**os.environ}
    if args.device == "cpu":
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = torchrun_command(
        ws,
        str(Path(__file__).resolve()),
        "--worker",
        "--out",
        str(out),
        "--device",
        args.device,
        "--dist-shapes",
        args.dist_shapes,
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
        "--optimizers",
        *args.optimizers,
        *(["--sequential"] if args.sequential else []),
        rank0_output=False,
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"world size {ws} failed: {' '.join(cmd)}")
    with open(out) as f:
        return json.load(f)


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f}"


def dist_section(args: argparse.Namespace) -> dict[str, Any]:
    """The torchrun table (see the module docstring); returns its JSON and acceptance checks."""
    if args.device == "cuda":
        n_gpu = torch.cuda.device_count()
        skipped = [w for w in args.world_sizes if w > n_gpu]
        if skipped:
            print(f"skipping world sizes {skipped}: only {n_gpu} GPU(s)")
        args.world_sizes = [w for w in args.world_sizes if w <= n_gpu]
    cpu = args.device == "cpu"
    timer = "thread CPU time (time.thread_time)" if cpu else "wall time, CUDA-synchronized"
    ns_key = "ns_cpu" if cpu else "ns_wall"
    print(
        f"dist: {describe(args.dist_shapes)}; device {args.device} "
        f"({'gloo, OMP_NUM_THREADS=1 per rank' if cpu else 'nccl'}); warm-up {args.warmup}, "
        f"median of {args.repeats} ({'sequential' if args.sequential else 'interleaved rounds'})"
    )
    print(
        f"NS time = time inside the optimizer's orthogonalizer per rank per step, measured as {timer}"
    )

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
                f"{'match' if ok else 'DO NOT match'} the exchange plan's traffic model"
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
    return dict(
        ns_timer=timer,
        summary={str(k): v for k, v in summaries.items()},
        checks=checks,
        exchange_model_match={str(k): v for k, v in exchange_ok.items()},
        raw={str(k): v for k, v in raws.items()},
    )


def print_ops(rows: list[dict[str, Any]]) -> None:
    head = (
        "| shapes | device | optimizer | ops/step | ops/step at half depth | of which aten::item |"
    )
    print("\n" + head + "\n|" + "---|" * head.count(" | ") + "---|")
    for r in rows:
        print(
            f"| {r['shapes']} | {r['device']} | {r['optimizer']} | {r['ops']} "
            f"| {r['ops_half_depth']} | {r['item_ops']} |"
        )


def print_times(rows: list[dict[str, Any]]) -> None:
    head = (
        "| shapes | device | AMUSE (identity NS) ms | AdamW foreach ms | AdamW fused ms "
        "| AMUSE / foreach | AMUSE / fused |"
    )
    print("\n" + head + "\n|" + "---|" * head.count(" | ") + "---|")
    for r in rows:
        ms = r["ms"]
        print(
            f"| {r['shapes']} | {r['device']} | {ms['amuse']:.1f} | {ms['adamw_foreach']:.1f} "
            f"| {ms['adamw_fused']:.1f} | {r['amuse_vs_foreach']:.2f} | {r['amuse_vs_fused']:.2f} |"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument(
        "--shapes", nargs="+", choices=list(FLAVOR_OF), default=["debug", "124m", "8b"]
    )
    parser.add_argument("--dist-shapes", choices=list(FLAVOR_OF), default="debug")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="dist: time optimizers one after another (less memory) instead of interleaved",
    )
    parser.add_argument("--timeout", type=int, default=900, help="seconds per world size")
    parser.add_argument(
        "--fake-ranks", type=int, nargs="+", default=[8, 64, 256, 1024], help="plan: world sizes"
    )
    parser.add_argument(
        "--no-timing-checks",
        action="store_true",
        help="print the timing acceptance lines without failing on them (smoke runs on a loaded "
        "machine); the exact byte check still fails the run",
    )
    parser.add_argument("--json", metavar="PATH", help="also write summary + raw data as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, device {args.device}")
    for shapes in args.shapes:
        print(describe(shapes))
    report: dict[str, Any] = dict(
        config=dict(
            sections=args.sections,
            shapes=args.shapes,
            dist_shapes=args.dist_shapes,
            device=args.device,
            warmup=args.warmup,
            repeats=args.repeats,
            torch=torch.__version__,
            cpus=os.cpu_count(),
        )
    )
    failed = False
    if "ops" in args.sections:
        report["ops"] = ops_section(args.shapes)
        print_ops(report["ops"])
    if "time" in args.sections:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        report["time"] = time_section(args.shapes, args.warmup, args.repeats, args.device)
        print_times(report["time"])
        for r in report["time"]:
            if r["shapes"] == "124m":
                ok = r["amuse_vs_foreach"] <= ELEMENTWISE_LIMIT
                failed |= not ok and not args.no_timing_checks
                print(
                    f"124m: AMUSE elementwise step / AdamW(foreach) = {r['amuse_vs_foreach']:.2f} "
                    f"(<= {ELEMENTWISE_LIMIT}) {'PASS' if ok else 'FAIL'}"
                )
    for name, fn in EXTRA_SECTIONS.items():
        if name in args.sections:
            report[name] = fn(args)
    if "dist" in args.sections:
        report["dist"] = dist_section(args)
        if not args.no_timing_checks:
            failed |= any(not c["passed"] for c in report["dist"]["checks"])
        failed |= any(ok is False for ok in report["dist"]["exchange_model_match"].values())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
