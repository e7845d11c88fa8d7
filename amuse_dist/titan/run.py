"""The body of ``amuse-train``: check the config before any process group, then torchtitan's real
Trainer (``AmuseTrainer``).

Without CUDA it runs on CPU with gloo (the three CPU fixes in ``amuse_dist.titan.cpu``); on GPUs it
is plain torchtitan + NCCL. The config is validated before any process group starts, so bad
configs fail fast with a message naming the key. Here rather than in the CLI module so the tests
and the test workers run it in-process without importing a CLI.
"""

import os
import sys
from typing import Any

from amuse_dist.anytime.run_format import RunError
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


def checked_config(args: list[str]) -> tuple[Any, list[str]]:
    """The job config of ``args`` with its data resolved and checked, before any process group
    (offline datasets become token shards here); raises ConfigError naming the key or file.
    Returns (config, notes to log)."""
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
    return config, notes


def train(args: list[str]) -> None:
    """Check the config, build the trainer and train (or dump the initial state, or save a seed
    checkpoint); a bad config or bad data ends the process with exit 2 and one message."""

    device = launch.setup_device()  # before anything imports torchtitan

    from torchtitan.tools.logging import init_logger, logger

    from amuse_dist.titan import cpu

    init_logger()
    cpu.quiet_known_noise()
    try:
        config, notes = checked_config(args)
    except ConfigError as e:
        print(f"amuse-train: {e}", file=sys.stderr)
        raise SystemExit(2) from None
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
        if trainer is not None:
            trainer.close()
        print(f"amuse-train: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunError as e:  # already names the path or key and the problem: no traceback
        if trainer is not None:
            trainer.close()
        print(f"amuse-train: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except Exception:
        if trainer is not None:
            trainer.close()
        raise
    trainer.close()
    launch.leave_process_group()
