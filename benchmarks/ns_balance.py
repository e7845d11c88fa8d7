"""Owner-wise Newton-Schulz at scale: NS load balance and exchange bytes per rank, computed.

No GPU and no process group: for the Muon matrices of torchtitan's Llama-3 8B and 70B flavors
(``model_shapes.llama3_muon_matrices``: the model built on the meta device) this script builds the
optimizer's own exchange plan (``amuse_dist.distributed.plan``: owners by LPT on NS FLOPs, sources,
batches) on synthetic layouts of each mesh and counts, per rank and optimizer step:

* NS FLOPs: max/mean over ranks and the busiest rank's TFLOP (``NewtonSchulz.flops``);
* bytes sent + received (bf16, own pieces not counted): the gather of pieces to owners plus the
  return of result pieces; "replicate GiB" is the part received from another replica group, i.e.
  what crosses the replicate (inter-node) dimension under HSDP;
* NS runs per matrix over the job (1 in the split mode, R in HSDP's per_replica mode).

Layouts: 1-D FSDP (Shard(0)) at 8/64/256/1024 ranks with round-robin owners and the naive
all-gather for comparison; HSDP (Replicate, Shard(0)) at 2x8, 8x8, 16x64 in both modes; TP 8
(Shard(0) colwise, Shard(1) for wo/w2) and FSDP+TP 8x8 (torchtitan's _StridedShard(0) + Shard(0)
colwise, Shard(0) + Shard(1) rowwise).

Usage: python benchmarks/ns_balance.py [--models 8B 70B] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.distributed.tensor import Replicate, Shard  # noqa: E402
from torch.distributed.tensor.placement_types import _StridedShard  # noqa: E402

from amuse_dist.distributed.layout import chunk_sizes, mesh_layout  # noqa: E402
from amuse_dist.distributed.owners import imbalance, round_robin_owners  # noqa: E402
from amuse_dist.distributed.plan import MatrixTask, build_group_plan, traffic  # noqa: E402
from amuse_dist.optim.base import NewtonSchulz  # noqa: E402
from benchmarks.model_shapes import llama3_muon_matrices, tp_rowwise  # noqa: E402

BF16 = 2
NS = NewtonSchulz(5, torch.bfloat16)


def placements_for(layout: str, name: str, mesh: tuple[int, ...]) -> tuple:
    if layout == "fsdp":
        return (Shard(0),)
    if layout == "hsdp":
        return (Replicate(), Shard(0))
    if layout == "tp":
        return (Shard(1),) if tp_rowwise(name) else (Shard(0),)
    if layout == "fsdp+tp":
        if tp_rowwise(name):
            return (Shard(0), Shard(1))
        return (_StridedShard(0, split_factor=mesh[1]), Shard(0))
    raise ValueError(layout)


def tasks_for(flavor: str, layout: str, mesh: tuple[int, ...]) -> list[MatrixTask]:
    return [
        MatrixTask(mesh_layout(shape, mesh, placements_for(layout, name, mesh), name))
        for name, shape in llama3_muon_matrices(flavor)
    ]


@dataclass
class Row:
    model: str
    layout: str
    mesh: str
    mode: str
    ranks: int
    ns_runs_per_matrix: float
    ns_tflop_total: float
    ns_max_over_mean: float
    ns_max_tflop: float
    gib_mean: float
    gib_max: float
    replicate_gib_mean: float
    note: str = ""


def analyse(flavor: str, layout: str, mesh: tuple[int, ...], mode: str = "split") -> Row:
    tasks = tasks_for(flavor, layout, mesh)
    plan = build_group_plan(range(len(tasks)), tasks, NS.flops, BF16, mode, None)
    t = traffic(plan, tasks, NS.flops, BF16)
    ranks = len(t.flops)
    moved = [s + r for s, r in zip(t.sent, t.recv, strict=True)]
    one_copy = sum(NS.flops(*task.layout.shape) for task in tasks)
    return Row(
        model=f"llama3-{flavor.lower()}",
        layout=layout,
        mesh="x".join(map(str, mesh)),
        mode=plan.mode,
        ranks=ranks,
        ns_runs_per_matrix=statistics.fmean(t.ns_runs.values()),
        ns_tflop_total=sum(t.flops) / 1e12,
        ns_max_over_mean=max(t.flops) / (one_copy / ranks),
        ns_max_tflop=max(t.flops) / 1e12,
        gib_mean=statistics.fmean(moved) / 2**30,
        gib_max=max(moved) / 2**30,
        replicate_gib_mean=statistics.fmean(t.replicate_bytes) / 2**30,
    )


def fsdp_extras(flavor: str, ranks: int) -> str:
    """Round-robin max/mean and the naive all-gather's GiB per rank, for the FSDP rows."""
    shapes = [s for _, s in llama3_muon_matrices(flavor)]
    costs = [NS.flops(*s) for s in shapes]
    rr = imbalance(costs, round_robin_owners(len(costs), ranks), ranks)
    gathered = 0.0  # mean over ranks of: own piece sent to every other rank + the rest received
    for rows, cols in shapes:
        pieces = [n * cols * BF16 for n in chunk_sizes(rows, ranks)]
        gathered += sum(p * (ranks - 1) + sum(pieces) - p for p in pieces) / ranks
    return f"RR {rr:.3f}; all-gather {gathered / 2**30:.2f} GiB"


def rows_for(flavors: Sequence[str]) -> list[Row]:
    rows = []
    for flavor in flavors:
        for ranks in (8, 64, 256, 1024):
            row = analyse(flavor, "fsdp", (ranks,))
            row.note = fsdp_extras(flavor, ranks)
            rows.append(row)
        for mesh in ((2, 8), (8, 8), (16, 64)):
            for mode in ("split", "per_replica"):
                rows.append(analyse(flavor, "hsdp", mesh, mode))
        rows.append(analyse(flavor, "tp", (8,)))
        rows.append(analyse(flavor, "fsdp+tp", (8, 8)))
    return rows


def table(rows: Sequence[Row]) -> str:
    head = (
        "| model | layout | mesh | mode | NS runs/matrix | NS max/mean | NS max TFLOP/rank "
        "| GiB/rank mean | GiB/rank max | replicate GiB/rank | note |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.layout} | {r.mesh} | {r.mode} | {r.ns_runs_per_matrix:.0f} "
            f"| {r.ns_max_over_mean:.3f} | {r.ns_max_tflop:.2f} | {r.gib_mean:.2f} "
            f"| {r.gib_max:.2f} | {r.replicate_gib_mean:.2f} | {r.note} |"
        )
    return "\n".join(lines)


NOTE = (
    "NS max/mean: busiest rank's NS FLOPs over (one copy of every matrix's FLOPs / ranks), so\n"
    "per_replica's R-fold repeated NS shows as R x. A matrix runs whole on one owner: max/mean >=\n"
    "largest matrix / mean once ranks approach the matrix count. GiB: bf16, per step, sent +\n"
    "received per rank, own pieces not counted; replicate GiB: received from another replica group."
)


# Tiny arguments for tests/test_benchmarks.py (seconds; figures not checked).
SMOKE = {"main": ["--models", "debugmodel"]}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["8B", "70B"])
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    rows = rows_for(args.models)
    print(table(rows))
    print()
    print(NOTE)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [asdict(r) for r in rows], "note": NOTE}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
