"""Data loader benchmark: per-rank tokens read per step and loader throughput at W simulated ranks.

    python benchmarks/data_loader.py [--ranks 1 2 4 8 64] [--global-batch 64] [--seq-len 256]
        [--steps 20] [--workers 2] [--json PATH]

For each data-parallel degree W it builds rank 0's training loader as the trainer would (no
process group: the loaders only need their rank and W) and draws ``steps`` optimizer steps of
micro-batches (``G / W`` sequences per step for rank 0, one sequence per micro-batch):

- ``token_shards`` (memory-mapped shards, read by global index), with 0 and ``--workers``
  DataLoader workers;
- ``global_stream``: the old world-size-independent loader (every rank tokenizes the whole stream
  and keeps its 1/W), in the same run.

Reported per rank: tokens read per step (the shard reader counts the tokens it touches; the global
stream tokenizes all G sequences) against ``G * seq_len / W``, and loader throughput, the rank's
own tokens delivered per second of loader time. Data: the offline corpus (Python stdlib) and its
BPE, prepared into token shards under ``--work`` on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# Tiny arguments for tests/test_benchmarks.py (seconds; figures not checked). {tmp}: a scratch
# folder, {assets}: the offline corpus/tokenizer folder (built on first use).
SMOKE = {
    "main": [
        "--ranks", "1", "2", "--global-batch", "4", "--seq-len", "32", "--steps", "2",
        "--workers", "1", "--repeats", "1", "--min-micro-batches", "4",
        "--work", "{tmp}", "--assets", "{assets}",
    ]
}  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 64])
    p.add_argument("--global-batch", type=int, default=64, help="G, sequences per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps timed per W")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the 2nd run")
    p.add_argument(
        "--min-micro-batches",
        type=int,
        default=4096,
        help="token_shards: time at least this many micro-batches at every W (so W = 64, one "
        "sequence per step, is not timed on a handful of reads)",
    )
    p.add_argument("--repeats", type=int, default=5, help="token_shards: best of N timings")
    p.add_argument("--work", default=str(REPO / "outputs" / "bench_data"))
    p.add_argument("--assets", default=None, help="corpus/tokenizer folder (default: WORK/assets)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    return p.parse_args(argv)


def build_data(work: Path, assets: Path | None = None) -> tuple[Path, Path, Path]:
    """(train jsonl folder, tokenizer, shards) of the built-in offline corpus."""
    from amuse_dist.data.corpus import build_builtin

    built = build_builtin(assets or work / "assets", 2048)
    return built.corpus / "train", built.tokenizer, built.shards


def job_config(args: argparse.Namespace, dataset: str, path: Path, tok: Path, w: int, workers: int):
    from amuse_dist.titan.config import parse_job_config

    return parse_job_config(
        [
            "--job.config_file", str(REPO / "train_configs" / "debug_cpu.toml"),
            "--training.dataset", dataset, "--training.dataset_path", str(path),
            "--model.hf_assets_path", str(tok),
            "--training.seq_len", str(args.seq_len),
            "--training.local_batch_size", "1",
            "--training.global_batch_size", str(args.global_batch),
            "--training.dataloader.num_workers", str(workers),
        ]
    )  # fmt: skip


def time_loader(loader: Any, micro_batches: int) -> tuple[float, int]:
    """Seconds to draw ``micro_batches`` micro-batches (after one warm-up), tokens delivered."""
    it = iter(loader)
    next(it)  # warm-up: workers started, maps opened, first permutation drawn
    tokens = 0
    t0 = time.perf_counter()
    for _ in range(micro_batches):
        _, labels = next(it)
        tokens += labels.numel()
    return time.perf_counter() - t0, tokens


def bench_shards(args: argparse.Namespace, shards: Path, tok: Path, w: int, workers: int) -> dict:
    from amuse_dist.titan.loaders.token_shards import build_token_shard_dataloader

    jc = job_config(args, "token_shards", shards, tok, w, workers)
    loader = build_token_shard_dataloader(w, 0, None, jc)
    per_step = args.global_batch // w
    reader = loader.dataset.reader
    n = max(args.steps * per_step, args.min_micro_batches)
    secs, tokens = time_loader(loader, n)
    for _ in range(args.repeats - 1):
        loader = build_token_shard_dataloader(w, 0, None, jc)
        secs = min(secs, time_loader(loader, n)[0])
    # workers read in their own processes: their reads are counted in the workers = 0 row
    read = reader.tokens_read / (n + 1) * per_step if workers == 0 else None
    return {
        "loader": "token_shards",
        "workers": workers,
        "W": w,
        "tokens_read_per_step": read,
        "throughput_tok_s": tokens / secs,
    }


def bench_stream(args: argparse.Namespace, corpus: Path, tok: Path, w: int) -> dict:
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from torchtitan.hf_datasets.text_datasets import DATASETS

    from amuse_dist.titan.loaders.global_batches import build_global_batch_dataloader
    from amuse_dist.titan.loaders.hub import jsonl_dataset_config

    DATASETS.setdefault("jsonl_stream", jsonl_dataset_config(corpus))  # a hub stream stand-in
    jc = job_config(args, "jsonl_stream", corpus, tok, w, 0)
    loader = build_global_batch_dataloader(w, 0, HuggingFaceTokenizer(str(tok)), jc)
    per_step = args.global_batch // w
    n = args.steps * per_step
    secs, tokens = time_loader(loader, n)
    read = loader.dataset.sequences * (args.seq_len + 1) / (n + 1) * per_step
    return {
        "loader": "global_stream",
        "workers": 0,
        "W": w,
        "tokens_read_per_step": read,
        "throughput_tok_s": tokens / secs,
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from amuse_dist.titan import cpu

    cpu.setup_device()
    corpus, tok, shards = build_data(Path(args.work), args.assets and Path(args.assets))
    rows = []
    for w in args.ranks:
        if args.global_batch % w:
            raise SystemExit(f"--global-batch {args.global_batch} is not divisible by W = {w}")
        rows.append(bench_shards(args, shards, tok, w, 0))
        if args.workers:
            rows.append(bench_shards(args, shards, tok, w, args.workers))
        rows.append(bench_stream(args, corpus, tok, w))
    ideal = {w: args.global_batch * args.seq_len / w for w in args.ranks}
    print(f"G = {args.global_batch} sequences x seq_len {args.seq_len}, {args.steps} steps, rank 0")
    print(
        f"{'loader':>14} {'workers':>7} {'W':>4} {'read/step':>10} {'G*L/W':>9} {'tok/s/rank':>11}"
    )
    for r in rows:
        r["ideal_tokens_per_step"] = ideal[r["W"]]
        read = r["tokens_read_per_step"]
        read_s = "-" if read is None else f"{read:.0f}"
        print(
            f"{r['loader']:>14} {r['workers']:>7} {r['W']:>4} {read_s:>10} "
            f"{ideal[r['W']]:>9.0f} {r['throughput_tok_s']:>11,.0f}"
        )
    for loader, workers in sorted({(r["loader"], r["workers"]) for r in rows}):
        by_w = {
            r["W"]: r["throughput_tok_s"]
            for r in rows
            if (r["loader"], r["workers"]) == (loader, workers)
        }
        lo, hi = min(by_w), max(by_w)
        print(
            f"{loader} (workers {workers}): throughput at W={hi} / W={lo} = {by_w[hi] / by_w[lo]:.2f}"
        )
    if args.json:
        meta = {"global_batch": args.global_batch, "seq_len": args.seq_len, "steps": args.steps}
        Path(args.json).write_text(json.dumps({"config": meta, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
