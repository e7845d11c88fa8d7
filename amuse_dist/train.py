"""Entry point: ``python -m amuse_dist.train --job.config_file train_configs/X.toml [overrides]``.

Runs torchtitan's real Trainer. Without CUDA it runs on CPU with gloo (the three CPU fixes in
``amuse_dist.titan.cpu``); on GPUs it is plain torchtitan + NCCL. The config is validated before
any process group starts, so bad configs fail fast with a message naming the key.
"""

import os
import sys

from amuse_dist.titan import launch


def _warn_missing_tokenizer(config: object, logger: object) -> None:
    """torchtitan's own warning is silenced (it fires for the local corpus, whose tokenizer is
    built later); say it only where nothing will build the folder."""
    from amuse_dist.titan.config import LOCAL_DATASETS

    path = config.model.hf_assets_path  # type: ignore[attr-defined]
    if config.training.dataset not in LOCAL_DATASETS and path and not os.path.exists(path):  # type: ignore[attr-defined]
        logger.warning(  # type: ignore[attr-defined]
            f"[model] hf_assets_path = {path!r} does not exist: the tokenizer is read from there"
        )


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)

    device = launch.setup_device()  # before anything imports torchtitan

    from torchtitan.tools.logging import init_logger, logger

    from amuse_dist.titan import cpu, train_spec
    from amuse_dist.titan.config import ConfigError, load_job_config

    init_logger()
    cpu.quiet_known_noise()
    train_spec.register()
    try:
        config = load_job_config(args)
        from amuse_dist.titan.token_shards import check_job_config

        data_errors = check_job_config(config)  # shards, tokenizer, vocab, sizes
        if data_errors:
            raise ConfigError("invalid data:\n  " + "\n  ".join(data_errors))
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

    _warn_missing_tokenizer(config, logger)
    launch.offline_hub_defaults(launch.job_datasets(config))
    launch.single_process_env()
    from amuse_dist.anytime.run_format import RunError
    from amuse_dist.data import DataError
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


if __name__ == "__main__":
    main()
