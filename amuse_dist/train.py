"""Entry point: ``python -m amuse_dist.train --job.config_file train_configs/X.toml [overrides]``.

Runs torchtitan's real Trainer through :func:`amuse_dist.titan.run.train` (the config is checked
before any process group starts, so bad configs fail fast with a message naming the key).

``amuse-train --nproc N ...`` is the single-node launcher: it checks the config for N ranks,
starts torchrun, shows each rank's one-line error (torchrun's report goes to the run folder's
``torchrun.log``) and exits with the rank's status (2 for bad input).
"""

import sys

from amuse_dist.titan.run import launch_local, train

USAGE = """\
usage: amuse-train [--nproc N [--nnodes M --rdzv-endpoint HOST:PORT --rdzv-id ID]]
                   --job.config_file CONFIG.toml [--section.key value ...]

  amuse-train --job.config_file train_configs/debug_cpu.toml             one process
  amuse-train --nproc 2 --job.config_file train_configs/debug_cpu.toml   N ranks on this node
  amuse-train --job.config_file outputs/RUN/config.toml                  rerun a run's record

Every key of the TOML can be overridden as --section.key value; --help lists them all.
Configs: train_configs/ (debug_cpu, demo_cpu, llama3_124m ...); docs/usage.md explains them."""


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


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    opts, args = _launcher_options(args)
    if opts:
        raise SystemExit(launch_local(opts, args))
    train(args)


if __name__ == "__main__":
    main()
