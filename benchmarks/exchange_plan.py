"""The owner-wise exchange at scale on a fake process group: plan cost per step and owner memory.

One process plays one rank of a W-rank job (``torch.testing._internal.distributed.fake_pg``:
collectives return at once and move nothing). Updates are meta tensors with the local shapes of
torchtitan's Llama-3 8B Muon matrices under 1-D FSDP (``model_shapes.llama3_muon_matrices``), so
every tensor op costs only its dispatch and no data moves. Two figures:

* **Exchange overhead per step** (W = 8, 64, 256, 1024): host time of one
  ``OwnerwiseNewtonSchulz.__call__`` with an identity orthogonalizer: everything the exchange does
  per step except the NS math and the data movement itself (split sizes, buffer layout, views,
  collective calls), median of ``--repeats``, measured as thread CPU time (the fake collectives
  run on the calling thread), so other load on the machine does not inflate it. The plan (owners, sources, batches, waves, split
  sizes) is built once, when the parameter set is built; its build time is reported separately.
  Reported for rank 0 and for the rank that owns the most pieces (the heaviest owner).
* **Owner peak extra memory** (W = 8): peak live bytes of every tensor the exchange and NS allocate
  during one call, including the returned local pieces ("outputs", which the optimizer needs
  whatever the design) (a dispatch mode counts storages as they are created and freed), with the real
  ``newton_schulz5`` run on meta tensors so its workspace counts, for the default wave size, for
  unpipelined waves, and for one wave holding all owned matrices (the former design).

Usage: python benchmarks/exchange_plan.py [--ranks 8 64 256 1024] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import Shard  # noqa: E402
from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from amuse_dist.distributed.layout import mesh_layout  # noqa: E402
from amuse_dist.distributed.ownerwise_ns import OwnerwiseNewtonSchulz  # noqa: E402
from amuse_dist.distributed.plan import DEFAULT_WAVE_BYTES, MatrixTask  # noqa: E402
from amuse_dist.optim.base import NewtonSchulz  # noqa: E402
from benchmarks.model_shapes import llama3_muon_matrices  # noqa: E402

DTYPE = torch.bfloat16


class Identity:
    """An orthogonalizer that does no math (same cost model as NS5, so the same owners)."""

    dtype = DTYPE

    def __init__(self) -> None:
        self._cost = NewtonSchulz(5, DTYPE)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def flops(self, rows: int, cols: int) -> float:
        return self._cost.flops(rows, cols)


def fake_world(world: int, rank: int) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


def tasks_and_updates(world: int, rank: int, flavor: str = "8B"):
    group = dist.group.WORLD
    tasks, updates = [], []
    for name, shape in llama3_muon_matrices(flavor):
        layout = mesh_layout(shape, (world,), (Shard(0),), name)
        layout = dataclasses.replace(
            layout, group=group, rank=rank, group_key=tuple(range(world)), kind="shard"
        )
        tasks.append(MatrixTask(layout))
        updates.append(torch.empty(layout.pieces[rank].shape, dtype=DTYPE, device="meta"))
    return tasks, updates


def heaviest_owner(world: int) -> int:
    """The rank receiving the most pieces (computed from the plan seen by rank 0)."""
    fake_world(world, 0)
    tasks, _ = tasks_and_updates(world, 0)
    ons = OwnerwiseNewtonSchulz(tasks, Identity())
    pieces = [0] * world
    for plan in ons.plans:
        for job in plan.jobs:
            pieces[job.owner] += len(job.sources)
    return max(range(world), key=lambda r: (pieces[r], -r))


def time_exchange(world: int, rank: int, repeats: int) -> dict:
    fake_world(world, rank)
    tasks, updates = tasks_and_updates(world, rank)
    t0 = time.thread_time()
    ons = OwnerwiseNewtonSchulz(tasks, Identity())
    build = time.thread_time() - t0
    ons(updates)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        ons(updates)
        times.append(time.thread_time() - t0)
    owned = sum(1 for plan in ons.plans for job in plan.jobs if job.owner == rank)
    return {
        "ranks": world,
        "rank": rank,
        "owned": owned,
        "waves": len(ons.plans[0].waves),
        "build_ms": build * 1e3,
        "step_ms": statistics.median(times) * 1e3,
    }


class LiveBytes(TorchDispatchMode):
    """Peak bytes of storages created inside the mode and still referenced by a live tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage key -> [nbytes, live tensor objects]

    def _drop(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage()._cdata
            if key in self._refs:
                self._refs[key][1] += 1
            elif t._base is None and not any(
                isinstance(a, torch.Tensor) and a.untyped_storage()._cdata == key
                for a in tree_leaves((args, kwargs))
            ):
                nbytes = t.untyped_storage().nbytes()
                self._refs[key] = [nbytes, 1]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            else:
                continue
            weakref.finalize(t, self._drop, key)
        return out


def owner_memory(world: int, wave_bytes: int | None, pipeline: bool) -> dict:
    fake_world(world, 0)
    tasks, updates = tasks_and_updates(world, 0)
    ons = OwnerwiseNewtonSchulz(
        tasks, NewtonSchulz(5, DTYPE), wave_bytes=wave_bytes, pipeline=pipeline
    )
    with LiveBytes() as mode:
        outs = ons(updates)
        local = sum(o.numel() * o.element_size() for o in outs)
    owned = [job for plan in ons.plans for job in plan.jobs if job.owner == 0]
    owned_bytes = sum(tasks[j.task].numel * 2 for j in owned)
    return {
        "ranks": world,
        "wave_bytes": wave_bytes,
        "pipeline": pipeline,
        "waves": len(ons.plans[0].waves),
        "owned_gib": owned_bytes / 2**30,
        "peak_gib": mode.peak / 2**30,
        "outputs_gib": local / 2**30,
    }


# Tiny arguments for tests/test_benchmarks.py (seconds; figures not checked).
SMOKE = {"main": ["--ranks", "8", "--repeats", "1"]}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    rows = []
    for world in args.ranks:
        for rank in sorted({0, heaviest_owner(world)}):
            rows.append(time_exchange(world, rank, args.repeats))
    print("| ranks | rank | matrices owned | waves | plan build ms (once) | exchange ms/step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['ranks']} | {r['rank']} | {r['owned']} | {r['waves']} "
            f"| {r['build_ms']:.0f} | {r['step_ms']:.2f} |"
        )
    mem = [
        owner_memory(8, DEFAULT_WAVE_BYTES, True),
        owner_memory(8, DEFAULT_WAVE_BYTES, False),
        owner_memory(8, None, True),
    ]
    print()
    print(
        "| ranks | wave MiB | pipelined | waves | owned GiB | owner peak GiB | of which outputs GiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for m in mem:
        wave = "all" if m["wave_bytes"] is None else f"{m['wave_bytes'] / 2**20:.0f}"
        print(
            f"| {m['ranks']} | {wave} | {m['pipeline']} | {m['waves']} | {m['owned_gib']:.2f} "
            f"| {m['peak_gib']:.2f} | {m['outputs_gib']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"timing": rows, "memory": mem}, f, indent=2)
        print(f"wrote {args.json}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
