"""Run under torchrun (gloo): the shipped-config test's jobs (tests/shipped.py) in this one
process tree, each a straight run with checkpoints at 2 and 4, then a resume from a copy of step-2.

One launch for all jobs of a rank count (each torchrun costs ~12 s of start-up): the trainer is
built the way ``amuse-train`` builds it (``run.checked_config``, then AmuseTrainer), and each
straight run is evaluated on the same ranks the way ``amuse-eval RUN --source dcp|export`` does it
(``anytime.targets`` finds and checks the steps, ``titan.evaluate`` evaluates them), since with bf16
compute the loss follows the per-rank batch shape. The test compares with what the runs logged.
"""

from __future__ import annotations

import argparse
import json
import shutil
import traceback
from pathlib import Path

from amuse_dist.titan import launch

launch.setup_device()  # before anything imports torchtitan

import torch.distributed as dist  # noqa: E402
from torchtitan.tools.logging import init_logger  # noqa: E402

from amuse_dist.anytime import targets as tg  # noqa: E402
from amuse_dist.titan import cpu  # noqa: E402
from amuse_dist.titan.config import load_job_config  # noqa: E402
from amuse_dist.titan.evaluate import EvalOptions, evaluate_targets, prepare  # noqa: E402
from amuse_dist.titan.run import checked_config  # noqa: E402
from amuse_dist.titan.trainer import AmuseTrainer  # noqa: E402
from tests._titan import finish_worker  # noqa: E402


def run(args: list[str]) -> Path:
    config, _ = checked_config(args)  # as amuse-train checks it, before start-up
    trainer = AmuseTrainer(config)
    try:
        trainer.train()
    finally:
        trainer.close()
        trainer.close_run_log()  # the next job logs into its own run folder
    return Path(config.job.dump_folder)


def amuse_eval(run: Path) -> list[dict]:
    """amuse-eval's rows for every step of ``run``, from the DCP state and from the X export."""
    targets = tg.find_targets(run, "dcp") + tg.find_targets(run, "export")
    tg.check_trusted(targets, False)
    tg.check_files(targets)
    options = EvalOptions(progress=False)
    return evaluate_targets(targets, options, prepare(targets, options))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", required=True, help="JSON: [{name, straight, resumed}]")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    init_logger()
    cpu.quiet_known_noise()
    launch.single_process_env()
    results: dict[str, dict] = {}
    for job in json.loads(Path(a.jobs).read_text()):
        try:
            straight = run(job["straight"])
            resumed = Path(load_job_config(job["resumed"]).job.dump_folder)
            if dist.get_rank() == 0:
                step2 = "checkpoint/step-2"
                shutil.copytree(straight / step2, resumed / step2)
            dist.barrier()
            run(job["resumed"])
            results[job["name"]] = {"error": None, "eval": amuse_eval(straight)}
        except Exception:  # the test names the job and shows its traceback
            results[job["name"]] = {"error": traceback.format_exc()[-6000:]}
            dist.barrier()
    finish_worker(results, a.out)


if __name__ == "__main__":
    main()
