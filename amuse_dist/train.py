"""Entry point: ``python -m amuse_dist.train --job.config_file train_configs/X.toml [overrides]``.

Runs torchtitan's real Trainer. Without CUDA it runs on CPU with gloo (the three CPU fixes in
``amuse_dist.titan.cpu``); on GPUs it is plain torchtitan + NCCL. The config is validated before
any process group starts, so bad configs fail fast with a message naming the key.

``amuse-train --nproc N ...`` is the single-node launcher: it checks the config for N ranks,
starts torchrun, shows each rank's one-line error (torchrun's report goes to the run folder's
``torchrun.log``) and exits with the rank's status (2 for bad input).
"""

import os
import sys

from amuse_dist.titan import launch

USAGE = """\
usage: amuse-train [--nproc N [--nnodes M --rdzv-endpoint HOST:PORT --rdzv-id ID]]
                   --job.config_file CONFIG.toml [--section.key value ...]

  amuse-train --job.config_file train_configs/debug_cpu.toml             one process
  amuse-train --nproc 2 --job.config_file train_configs/debug_cpu.toml   N ranks on this node
  amuse-train --job.config_file outputs/RUN/config.toml                  rerun a run's record

Every key of the TOML can be overridden as --section.key value; --help lists them all.
Configs: train_configs/ (debug_cpu, demo_cpu, llama3_124m ...); docs/usage.md explains them."""


def _warn_missing_tokenizer(config: object, logger: object) -> None:
    """torchtitan's own warning is silenced (it fires for the local corpus, whose tokenizer is
    built later); say it only where nothing will build the folder."""
    from amuse_dist.titan.config import LOCAL_DATASETS

    path = config.model.hf_assets_path  # type: ignore[attr-defined]
    if config.training.dataset not in LOCAL_DATASETS and path and not os.path.exists(path):  # type: ignore[attr-defined]
        logger.warning(  # type: ignore[attr-defined]
            f"[model] hf_assets_path = {path!r} does not exist: the tokenizer is read from there"
        )


LAUNCHER_OPTIONS = ("--nproc", "--nnodes", "--rdzv-endpoint", "--rdzv-id")


def _launcher_options(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """The launcher's own options (``--nproc N``, and for several nodes ``--nnodes M
    --rdzv-endpoint HOST:PORT --rdzv-id ID``; ``--opt=value`` too) and the trainer's arguments."""
    rest, opts = [], {}
    it = iter(args)
    for a in it:
        name = a.split("=", 1)[0]
        if name in LAUNCHER_OPTIONS:
            opts[name[2:]] = a.split("=", 1)[1] if "=" in a else next(it, "")
        else:
            rest.append(a)
    for key in ("nproc", "nnodes"):
        value = opts.get(key)
        if value is not None and not (value.isdigit() and int(value) >= 1):
            print(f"amuse-train: --{key} {value!r}: expected a positive number", file=sys.stderr)
            raise SystemExit(2)
    if opts and "nproc" not in opts:
        print("amuse-train: --nnodes/--rdzv-*: also give --nproc (ranks per node)", file=sys.stderr)
        raise SystemExit(2)
    return opts, rest


def _check(args: list[str], world_size: int | None) -> object:
    """The whole config check, before any process starts; exit 2 with the reasons."""
    from amuse_dist.titan.config import ConfigError, load_job_config

    try:
        config = load_job_config(args)
        from amuse_dist.titan.token_shards import check_job_config

        errors = check_job_config(config)  # shards, tokenizer, vocab, sizes
        if errors:
            raise ConfigError("invalid data:\n  " + "\n  ".join(errors))
        if world_size is not None:
            errors = launch.batch_errors(config, world_size)
            if errors:
                raise ConfigError(f"invalid config for {world_size} ranks:\n  " + errors[0])
    except ConfigError as e:
        print(f"amuse-train: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return config


def launch_local(opts: dict[str, str], args: list[str]) -> int:
    """``amuse-train --nproc N [--nnodes M ...]``: check the config for the ranks it will
    have, then torchrun on this node; the failing rank's exit status."""
    from pathlib import Path

    nproc, nnodes = int(opts["nproc"]), int(opts.get("nnodes", "1"))
    launch.setup_device()
    from amuse_dist.titan import cpu

    cpu.quiet_known_noise()  # the ranks say what matters; the check here stays quiet
    config = _check(args, nproc * nnodes)
    env = dict(os.environ, AMUSE_QUIET_RANKS="1")
    if "OMP_NUM_THREADS" not in env and not launch.has_cuda():
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    log = Path(config.job.dump_folder) / "torchrun.log"  # type: ignore[attr-defined]
    cmd = launch.torchrun_command(
        nproc,
        args,
        nnodes=nnodes,
        rdzv_endpoint=opts.get("rdzv-endpoint"),
        rdzv_id=opts.get("rdzv-id"),
    )
    return launch.run_torchrun(cmd, log, env)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    opts, args = _launcher_options(args)
    if opts:
        raise SystemExit(launch_local(opts, args))

    device = launch.setup_device()  # before anything imports torchtitan

    from torchtitan.tools.logging import init_logger, logger

    from amuse_dist.titan import cpu, train_spec

    init_logger()
    launch.console_logging()
    cpu.quiet_known_noise()
    train_spec.register()
    world = os.environ.get("WORLD_SIZE", "")
    config = _check(args, int(world) if world.isdigit() else None)

    _warn_missing_tokenizer(config, logger)
    launch.offline_hub_defaults(launch.job_datasets(config))
    launch.single_process_env()
    from amuse_dist.anytime.run_format import DivergenceError, RunError
    from amuse_dist.anytime.run_records import stop_line
    from amuse_dist.data import DataError
    from amuse_dist.titan.trainer import AmuseTrainer, dump_full_state

    logger.info(f"amuse_dist: device {device}, optimizer {config.optimizer.name}")  # type: ignore[attr-defined]
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

    try:
        trainer = AmuseTrainer(config)
        dump = os.environ.get("AMUSE_DUMP_INIT_STATE")
        if dump:
            dump_full_state(trainer, dump)
        elif config.checkpoint.create_seed_checkpoint:  # type: ignore[attr-defined]
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
    if dump or config.checkpoint.create_seed_checkpoint:  # type: ignore[attr-defined]
        kind, detail = "finished", "state dumped" if dump else "seed checkpoint written"
    tokens = trainer.tokens.sync()  # every rank is here: the collective is safe
    stop(kind, detail, tokens=tokens)
    if kind in ("interrupted", "preempted"):
        print(f"amuse-train: {kind} at step {trainer.step}: {detail}", file=sys.stderr)
    launch.leave_process_group()


if __name__ == "__main__":
    main()
