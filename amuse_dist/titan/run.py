"""The body of ``amuse-train``: check the config before any process group, then torchtitan's real
Trainer (``AmuseTrainer``), and say in ``train.log`` why the run stopped; or, with ``--nproc N``,
the single-node launcher around torchrun.

Without CUDA it runs on CPU with gloo (the three CPU fixes in ``amuse_dist.titan.cpu``); on GPUs it
is plain torchtitan + NCCL. The config is validated before any process group starts, so bad
configs fail fast with a message naming the key. Here rather than in the CLI module so the tests
and the test workers run it in-process without importing a CLI.
"""

import os
import sys
from pathlib import Path
from typing import Any

from amuse_dist.anytime.run_format import DivergenceError, RunError
from amuse_dist.anytime.run_records import stop_line
from amuse_dist.data import DataError
from amuse_dist.titan import launch
from amuse_dist.titan.config import ConfigError, load_job_config


def _warn_missing_tokenizer(config: object, logger: object) -> None:
    """torchtitan's own warning is silenced (it fires for the built-in corpus, whose tokenizer is
    built before start-up); say it once the data is resolved and the folder is still missing."""
    path = config.model.hf_assets_path  # type: ignore[attr-defined]
    if path and not os.path.exists(path):
        logger.warning(  # type: ignore[attr-defined]
            f"[model] hf_assets_path = {path!r} does not exist: the tokenizer is read from there"
        )


def checked_config(args: list[str], world_size: int | None = None) -> tuple[Any, list[str]]:
    """The job config of ``args`` with its data resolved and checked, before any process group
    (offline datasets become token shards here), and its batch split checked for ``world_size``
    ranks when given; raises ConfigError naming the key or file. Returns (config, notes to log)."""
    from amuse_dist.titan import model, spec
    from amuse_dist.titan.loaders.datasets import resolve_datasets
    from amuse_dist.titan.loaders.token_shards import check_job_config

    spec.register()
    config = load_job_config(args)
    vocab = model.model_vocab_size(config)
    try:  # offline datasets -> token shards, built or prepared on first use
        notes = resolve_datasets(config, vocab)
    except DataError as e:
        raise ConfigError(str(e)) from None
    data_errors = check_job_config(config, vocab)  # shards, tokenizer, vocab, sizes
    if data_errors:
        raise ConfigError("invalid data:\n  " + "\n  ".join(data_errors))
    if world_size is not None:
        errors = launch.batch_errors(config, world_size)
        if errors:
            raise ConfigError(f"invalid config for {world_size} ranks:\n  " + errors[0])
    return config, notes


def _checked_or_exit(args: list[str], world_size: int | None) -> tuple[Any, list[str]]:
    try:
        return checked_config(args, world_size)
    except ConfigError as e:
        print(f"amuse-train: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def launch_local(opts: dict[str, str], args: list[str]) -> int:
    """``amuse-train --nproc N [--nnodes M ...]``: check the config for the ranks it will
    have, then torchrun on this node; the failing rank's exit status."""
    nproc, nnodes = int(opts["nproc"]), int(opts.get("nnodes", "1"))
    launch.setup_device()
    from amuse_dist.titan import cpu

    cpu.quiet_known_noise()  # the ranks say what matters; the check here stays quiet
    config, _ = _checked_or_exit(args, nproc * nnodes)
    env = dict(os.environ, AMUSE_QUIET_RANKS="1")
    if "OMP_NUM_THREADS" not in env and not launch.has_cuda():
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    log = Path(config.job.dump_folder) / "torchrun.log"
    cmd = launch.torchrun_command(
        nproc,
        "-m",
        "amuse_dist.train",
        *args,
        rank0_output=False,  # the launcher shows each rank's error once
        nnodes=nnodes,
        rdzv_endpoint=opts.get("rdzv-endpoint"),
        rdzv_id=opts.get("rdzv-id"),
    )
    return launch.run_torchrun(cmd, log, env)


def train(args: list[str]) -> None:
    """Check the config, build the trainer and train (or dump the initial state, or save a seed
    checkpoint); a bad config or bad data ends the process with exit 2 and one message; the last
    line of ``train.log`` says why the run stopped."""

    device = launch.setup_device()  # before anything imports torchtitan

    from torchtitan.tools.logging import init_logger, logger

    from amuse_dist.titan import cpu

    init_logger()
    launch.console_logging()
    cpu.quiet_known_noise()
    world = os.environ.get("WORLD_SIZE", "")
    config, notes = _checked_or_exit(args, int(world) if world.isdigit() else None)
    from amuse_dist.titan.config import disk_space_warning

    low_disk = disk_space_warning(config)
    if low_disk:
        logger.warning(low_disk)
    if os.environ.get("AMUSE_CHECK_ONLY") == "1":  # the launchers' pre-check: exit 2 survives
        print(f"amuse-train: config OK ({config.job.dump_folder})")
        return

    for note in notes:
        logger.info(note)
    _warn_missing_tokenizer(config, logger)
    launch.offline_hub_defaults(launch.job_datasets(config))
    launch.single_process_env()
    from amuse_dist.titan.trainer import AmuseTrainer, dump_full_state

    logger.info(f"amuse_dist: device {device}, optimizer {config.optimizer.name}")
    trainer: AmuseTrainer | None = None

    def stop(kind: str, detail: str, error: bool = False, tokens: int | None = None) -> None:
        """Close the trainer, then say why the run stopped (the last line of train.log)."""
        started = trainer is not None and getattr(trainer, "_started", False)
        step = trainer.step if started and kind != "refused" else None
        if trainer is not None:
            try:
                trainer.close()
            except Exception as e:  # closing must not hide why the run stopped
                detail += f" (and closing failed: {type(e).__name__}: {e})"
        if int(os.environ.get("RANK", "0")) == 0:
            (logger.error if error else logger.info)(stop_line(kind, step, detail, tokens))
        if trainer is not None:
            trainer.close_run_log()

    try:
        trainer = AmuseTrainer(config)
        dump = os.environ.get("AMUSE_DUMP_INIT_STATE")
        if dump:
            dump_full_state(trainer, dump)
        elif config.checkpoint.create_seed_checkpoint:
            trainer.checkpointer.save(curr_step=0, last_step=True)
        else:
            trainer.train()
    except DataError as e:  # names the file or both values: no traceback
        stop("refused", str(e), error=True)
        print(f"amuse-train: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except DivergenceError as e:
        stop("diverged", str(e), error=True)
        print(f"amuse-train: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except RunError as e:  # already names the path or key and the problem: no traceback
        stop("refused", str(e), error=True)
        print(f"amuse-train: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except BaseException as e:
        stop("crashed", f"{type(e).__name__}: {e}", error=True)
        raise
    kind, detail = trainer.stop_reason or ("stopped early", "the data ran out")
    if dump or config.checkpoint.create_seed_checkpoint:
        kind, detail = "finished", "state dumped" if dump else "seed checkpoint written"
    tokens = trainer.tokens.sync()  # every rank is here: the collective is safe
    stop(kind, detail, tokens=tokens)
    if kind in ("interrupted", "preempted"):
        print(f"amuse-train: {kind} at step {trainer.step}: {detail}", file=sys.stderr)
    launch.leave_process_group()
