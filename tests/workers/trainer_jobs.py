"""Run under torchrun (gloo): a list of trainer jobs in this one process tree (each torchrun
launch costs ~12 s of start-up, so e2e tests batch their runs per rank count).

A job is ``{"name", "args", "copy": [src, dst] | None, "eval": bool}``: optionally copy a
checkpoint step folder first (a resume, or a reshard when it was written on another rank count),
then train as ``amuse-train`` does (``run.checked_config``, then AmuseTrainer), then optionally
evaluate every step of the run the way ``amuse-eval RUN --source dcp|export`` does
(``anytime.targets`` finds and checks the steps, ``titan.evaluate`` evaluates them) on these
same ranks, since with bf16 compute the loss follows the per-rank batch shape. Each job's result
(its error, or the eval rows) is saved for the test to compare with what the runs logged.
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
from amuse_dist.titan.evaluate import EvalOptions, evaluate_targets, prepare  # noqa: E402
from amuse_dist.titan.run import checked_config  # noqa: E402
from amuse_dist.titan.trainer import AmuseTrainer  # noqa: E402
from tests._titan import finish_worker  # noqa: E402


def train(args: list[str]) -> Path:
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
    p.add_argument("--jobs", required=True, help="JSON: [{name, args, copy, eval}]")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    init_logger()
    cpu.quiet_known_noise()
    launch.single_process_env()
    dist.init_process_group("gloo")  # the trainers reuse it (torchtitan skips its own init)
    results: dict[str, dict] = {}
    for job in json.loads(Path(a.jobs).read_text()):
        try:
            if job.get("copy"):
                if dist.get_rank() == 0:
                    shutil.copytree(*job["copy"])
                dist.barrier()
            run = train(job["args"])
            rows = amuse_eval(run) if job.get("eval") else None
            results[job["name"]] = {"error": None, "eval": rows}
        except Exception:  # the test names the job and shows its traceback
            results[job["name"]] = {"error": traceback.format_exc()[-6000:]}
            dist.barrier()
    finish_worker(results, a.out)


if __name__ == "__main__":
    main()
