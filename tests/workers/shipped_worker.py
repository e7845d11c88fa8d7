"""Run under torchrun (gloo): every shipped config, shrunk (tests/shipped.py), trained in this one
process tree: a straight run with checkpoints at 2 and 4, then a resume from a copy of step-2.

One launch for all configs (each torchrun costs ~12 s of start-up); the trainer is built the way
``amuse-train`` builds it (config checks before start-up, then AmuseTrainer). The test reads what
the runs wrote (TensorBoard, exports) and runs amuse-eval on them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import traceback
from pathlib import Path

from amuse_dist.titan import launch

launch.setup_device()  # before anything imports torchtitan

import torch.distributed as dist  # noqa: E402
from torchtitan.tools.logging import init_logger  # noqa: E402

from amuse_dist.titan import cpu, train_spec  # noqa: E402
from amuse_dist.titan.config import load_job_config  # noqa: E402
from amuse_dist.titan.token_shards import check_job_config  # noqa: E402
from amuse_dist.titan.trainer import AmuseTrainer  # noqa: E402
from tests._titan import finish_worker  # noqa: E402
from tests.shipped import shrunk_args  # noqa: E402


def run(args: list[str]) -> None:
    config = load_job_config(args)
    errors = check_job_config(config)
    if errors:
        raise RuntimeError("; ".join(errors))
    trainer = AmuseTrainer(config)
    try:
        trainer.train()
    finally:
        trainer.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", nargs="+", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    init_logger()
    cpu.quiet_known_noise()
    train_spec.register()
    launch.single_process_env()
    nproc = int(os.environ["WORLD_SIZE"])
    root, shards, tok = Path(a.root), Path(a.shards), Path(a.tokenizer)
    results: dict[str, str | None] = {}
    for config in map(Path, a.configs):
        straight, resumed = root / config.stem / "straight", root / config.stem / "resumed"
        try:
            run(shrunk_args(config, straight, shards, tok, nproc))
            if dist.get_rank() == 0:
                src = straight / "checkpoint" / "step-2"
                shutil.copytree(src, resumed / "checkpoint" / "step-2")
            dist.barrier()
            run(shrunk_args(config, resumed, shards, tok, nproc))
            results[config.stem] = None
        except Exception:  # the test names the config and shows its traceback
            results[config.stem] = traceback.format_exc()[-6000:]
            dist.barrier()
    if dist.get_rank() == 0:
        (root / "results.json").write_text(json.dumps(results, indent=1))
    finish_worker(results, a.out)


if __name__ == "__main__":
    main()
