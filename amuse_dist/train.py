"""Entry point: ``python -m amuse_dist.train --job.config_file train_configs/X.toml [overrides]``.

Runs torchtitan's real Trainer. Without CUDA it runs on CPU with gloo (the three CPU fixes in
``amuse_dist.titan.cpu``); on GPUs it is plain torchtitan + NCCL. The config is validated before
any process group starts, so bad configs fail fast with a message naming the key.
"""

import os
import socket
import sys


def single_process_env() -> None:
    """Let ``python -m amuse_dist.train`` work without torchrun (one rank)."""
    if "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def leave_process_group() -> None:
    """Leave together and end the process without Python's interpreter finalization.

    Every rank waits at a barrier, destroys its process groups, flushes its output and exits.
    Skipping finalization avoids an abort (SIGABRT) seen at exit after all work was done: gloo's
    worker threads can still hold tensors while the interpreter tears down
    (pytorch/pytorch#179291). Call it only once everything is saved and closed.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _config_path(args: list[str]) -> str | None:
    for i, a in enumerate(args):
        for key in ("--job.config_file", "--job.config-file"):
            if a == key and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(key + "="):
                return a.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)

    from amuse_dist.titan import cpu

    device = cpu.setup_device()  # before anything imports torchtitan

    from torchtitan.tools.logging import init_logger, logger

    from amuse_dist.titan import train_spec
    from amuse_dist.titan.config import ConfigError, check_toml, check_values, parse_job_config

    init_logger()
    train_spec.register()
    path = _config_path(args)
    try:
        errors = check_toml(path) if path is not None else []
        if not errors:
            config = parse_job_config(args)
            errors = check_values(config)
        if errors:
            raise ConfigError(f"invalid config {path}:\n  " + "\n  ".join(errors))
    except ConfigError as e:
        print(f"amuse-train: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    single_process_env()
    from amuse_dist.titan.checkpoint import CheckpointError
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
    except CheckpointError as e:  # already names the path and the problem: no traceback
        if trainer is not None:
            trainer.close()
        print(f"amuse-train: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception:
        if trainer is not None:
            trainer.close()
        raise
    trainer.close()
    leave_process_group()


if __name__ == "__main__":
    main()
