"""Owner-wise Newton-Schulz at scale: load balance and exchange volume, computed (no GPU needed).

For the Muon matrices of Llama-3 8B and 70B (every hidden 2-D weight: wq, wk, wv, wo, w1, w2, w3
per layer; embeddings, output head and norms stay on AdamW) and a range of rank counts, report:

* the NS5 FLOPs load per rank under AMUSE's owner assignment (LPT on ``ns_flops``, the same call
  ``OwnerwiseNewtonSchulz`` makes) as max/mean, and under naive round-robin for comparison;
* the largest single matrix's cost as a share of the mean load, a lower bound on max/mean
  whenever it exceeds 1 (one matrix cannot be split between owners);
* the bytes each rank sends plus receives per optimizer step for the owner-wise exchange (bf16):
  every rank sends its FSDP shard (dim 0, torch.chunk sizes) of each matrix to the matrix's
  owner and gets its shard of the result back, so an owner receives and sends whole matrices.
  A rank's own shard never leaves the rank and is not counted. For reference, the per-rank volume
  of the "replicated" scheme (all-gather every update in bf16, every rank runs NS on everything).

Usage: python benchmarks/ns_balance.py [--ranks 8 64 256 1024] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from amuse_dist.distributed.layout import chunk_sizes
from amuse_dist.distributed.owners import assign_owners, load_per_rank, round_robin_owners
from amuse_dist.optim.newton_schulz import ns_flops

BF16_BYTES = 2


@dataclass(frozen=True)
class LlamaShape:
    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn: int

    def matrices(self) -> list[tuple[int, int]]:
        """(out, in) shapes of the Muon matrices, in model parameter order (torchtitan Llama)."""
        kv = self.dim // self.n_heads * self.n_kv_heads
        d, f = self.dim, self.ffn
        layer = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (d, f), (f, d)]  # wq wk wv wo w1 w2 w3
        return layer * self.n_layers


MODELS = {
    "llama3-8b": LlamaShape("llama3-8b", 4096, 32, 32, 8, 14336),
    "llama3-70b": LlamaShape("llama3-70b", 8192, 80, 64, 8, 28672),
}


def exchange_bytes(
    shapes: Sequence[tuple[int, int]], owners: Sequence[int], world_size: int, elem: int = 2
) -> list[int]:
    """Bytes sent + received by each rank in one owner-wise step (self-traffic excluded).

    Gather: rank r sends shard_r(i) to owner(i); return: owner(i) sends shard_d(i) to each d.
    Shards follow FSDP2's dim-0 torch.chunk layout.
    """
    sent = [0] * world_size
    recv = [0] * world_size
    for (rows, cols), owner in zip(shapes, owners, strict=True):
        pieces = [n * cols * elem for n in chunk_sizes(rows, world_size)]
        for r, nbytes in enumerate(pieces):
            if r == owner:
                continue
            # gather: r -> owner ; return: owner -> r
            sent[r] += nbytes
            recv[owner] += nbytes
            sent[owner] += nbytes
            recv[r] += nbytes
    return [s + r for s, r in zip(sent, recv, strict=True)]


def allgather_bytes(shapes: Sequence[tuple[int, int]], world_size: int, elem: int = 2) -> list[int]:
    """Bytes sent + received per rank when every rank all-gathers every update (replicated NS)."""
    out = [0] * world_size
    for rows, cols in shapes:
        pieces = [n * cols * elem for n in chunk_sizes(rows, world_size)]
        total = sum(pieces)
        for r, nbytes in enumerate(pieces):
            out[r] += nbytes * (world_size - 1) + (total - nbytes)  # send own to all, get others
    return out


@dataclass
class Row:
    model: str
    ranks: int
    matrices: int
    total_tflop: float
    lpt_max_over_mean: float
    largest_share: float
    lower_bound: float
    rr_max_over_mean: float
    lpt_max_tflop: float
    lpt_bytes_mean: float
    lpt_bytes_max: float
    rr_bytes_mean: float
    rr_bytes_max: float
    allgather_bytes_mean: float


def analyse(model: LlamaShape, ranks: int) -> Row:
    shapes = model.matrices()
    costs = [float(ns_flops(r, c)) for r, c in shapes]
    total = sum(costs)
    mean = total / ranks
    lpt = assign_owners(costs, ranks)
    rr = round_robin_owners(len(costs), ranks)
    lpt_loads = load_per_rank(costs, lpt, ranks)
    rr_loads = load_per_rank(costs, rr, ranks)
    lpt_bytes = exchange_bytes(shapes, lpt, ranks, BF16_BYTES)
    rr_bytes = exchange_bytes(shapes, rr, ranks, BF16_BYTES)
    share = max(costs) / mean
    return Row(
        model=model.name,
        ranks=ranks,
        matrices=len(shapes),
        total_tflop=total / 1e12,
        lpt_max_over_mean=max(lpt_loads) / mean,
        largest_share=share,
        lower_bound=max(1.0, share),
        rr_max_over_mean=max(rr_loads) / mean,
        lpt_max_tflop=max(lpt_loads) / 1e12,
        lpt_bytes_mean=statistics.fmean(lpt_bytes),
        lpt_bytes_max=float(max(lpt_bytes)),
        rr_bytes_mean=statistics.fmean(rr_bytes),
        rr_bytes_max=float(max(rr_bytes)),
        allgather_bytes_mean=statistics.fmean(allgather_bytes(shapes, ranks, BF16_BYTES)),
    )


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def table(rows: Sequence[Row]) -> str:
    head = (
        "| model | ranks | mats | NS TFLOP/step | LPT max/mean | largest/mean | RR max/mean "
        "| LPT max TFLOP/rank | LPT GiB/rank mean | LPT GiB/rank max | RR GiB/rank mean "
        "| RR GiB/rank max | all-gather GiB/rank |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.ranks} | {r.matrices} | {r.total_tflop:.1f} "
            f"| {r.lpt_max_over_mean:.3f} | {r.largest_share:.3f} | {r.rr_max_over_mean:.3f} "
            f"| {r.lpt_max_tflop:.3f} | {gib(r.lpt_bytes_mean)} | {gib(r.lpt_bytes_max)} "
            f"| {gib(r.rr_bytes_mean)} | {gib(r.rr_bytes_max)} | {gib(r.allgather_bytes_mean)} |"
        )
    return "\n".join(lines)


NOTE = (
    "Note: a matrix is orthogonalized whole on one owner, so max/mean >= max(1, largest/mean).\n"
    "When ranks > matrices some ranks own nothing and max/mean is bounded below by the largest\n"
    "matrix's share of the mean load (largest/mean), however good the assignment.\n"
    "Bytes: bf16, per optimizer step, sent + received by one rank, own shard not counted;\n"
    "owner-wise = gather shards to owners + return result shards; all-gather = the replicated\n"
    "scheme's update all-gather (every rank then runs NS on every matrix)."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 256, 1024])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    rows = [analyse(MODELS[m], n) for m in args.models for n in args.ranks]
    print(table(rows))
    print()
    print(NOTE)
    for r in rows:
        if r.ranks > r.matrices:
            print(
                f"  {r.model} at {r.ranks} ranks: {r.ranks} ranks > {r.matrices} matrices, "
                f"LPT max/mean {r.lpt_max_over_mean:.3f} vs bound {r.lower_bound:.3f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [asdict(r) for r in rows], "note": NOTE}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
