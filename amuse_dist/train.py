"""Entry point: ``python -m amuse_dist.train --job.config_file train_configs/X.toml [overrides]``.

Runs torchtitan's real Trainer through :func:`amuse_dist.titan.run.train` (the config is checked
before any process group starts, so bad configs fail fast with a message naming the key).
"""

import sys

from amuse_dist.titan.run import train


def main(argv: list[str] | None = None) -> None:
    train(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
