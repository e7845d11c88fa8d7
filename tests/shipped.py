"""What the shipped-config test changes in a config from train_configs/: only the size.

Every config users run is trained on 2 CPU ranks as it ships (compile, activation checkpointing,
mixed precision, parallelism, optimizer sections as written), with a tiny model, 4 steps, a
checkpoint every 2 steps, validation every 2 steps on fixed token shards, and the compile backend
``aot_eager`` (inductor is too slow on 2 cores). A config added to the folder is picked up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from tests._titan import REPO

CONFIG_DIR = REPO / "train_configs"
STEPS = 4
SEQ = 32
VAL_BATCH = 4  # token shards: the GLOBAL validation batch, the same on any rank count


def shipped_configs() -> list[Path]:
    return sorted(CONFIG_DIR.glob("*.toml"))


def read(config: Path) -> dict[str, Any]:
    return tomllib.loads(config.read_text())


def shrunk_args(
    config: Path,
    dump: Path,
    shards: Path,
    tokenizer: Path,
    nproc: int,
    steps: int = STEPS,
    extra: Sequence[str] = (),
) -> list[str]:
    """``--job.config_file config`` with only its size shrunk to CPU (see the module docstring)."""
    toml = read(config)
    training = toml.get("training", {})
    local = 2
    args = [
        "--job.config_file", str(config),
        "--job.dump_folder", str(dump),
        "--model.flavor", "tiny",
        "--model.hf_assets_path", str(tokenizer),
        "--training.dataset", "token_shards", "--training.dataset_path", str(shards),
        "--validation.enable",
        "--validation.dataset", "token_shards", "--validation.dataset_path", str(shards),
        "--training.steps", str(steps),
        "--training.seq_len", str(SEQ), "--validation.seq_len", str(SEQ),
        "--training.local_batch_size", str(local),
        "--validation.local_batch_size", str(VAL_BATCH),
        "--validation.steps", "2", "--validation.freq", "2",
        "--checkpoint.enable", "--checkpoint.interval", "2",
        "--metrics.log_freq", "1",
    ]  # fmt: skip
    # keep gradient accumulation where the config accumulates (8B: 1024 sequences of 2 a rank)
    if training.get("global_batch_size", -1) > 0:
        accumulates = training["global_batch_size"] > training.get("local_batch_size", 8)
        args += ["--training.global_batch_size", str(local * nproc * (2 if accumulates else 1))]
    if toml.get("compile", {}).get("enable", False):
        args += ["--compile.backend", "aot_eager"]
    warmup = toml.get("lr_scheduler", {}).get("warmup_steps", 0)
    if warmup >= steps:  # torchtitan's warmup must fit in the run; a schedule is still exercised
        args += ["--lr_scheduler.warmup_steps", "1"]
    if "--compile.enable" in extra and "--compile.backend" not in args:
        args += ["--compile.backend", "aot_eager"]
    return [*args, *extra]


@dataclass(frozen=True)
class Job:
    """One run of the shipped-config test: a config, extra flags, a rank count."""

    name: str
    config: Path
    nproc: int = 2
    extra: tuple[str, ...] = ()

    def worker_jobs(self, root: Path, shards: Path, tokenizer: Path) -> list[dict[str, Any]]:
        """What tests/workers/trainer_jobs.py runs: the straight run (then amuse-eval of its
        steps), and the resume from a copy of its step-2."""
        straight, resumed = root / self.name / "straight", root / self.name / "resumed"
        step2 = "checkpoint/step-2"
        args = (shards, tokenizer, self.nproc)
        return [
            {
                "name": self.name,
                "args": shrunk_args(self.config, straight, *args, extra=self.extra),
                "eval": True,
            },
            {
                "name": f"{self.name}/resumed",
                "args": shrunk_args(self.config, resumed, *args, extra=self.extra),
                "copy": [str(straight / step2), str(resumed / step2)],
            },
        ]


# The reproduction: debug_cpu.toml with compile and each activation-checkpointing mode,
# on 2 ranks and on 1 (names are wrapped differently with and without FSDP).
AC_MODES = ("none", "full", "selective")
COMPILE_AC = [
    Job(
        f"debug_cpu-compile-ac_{mode}-{n}rank",
        CONFIG_DIR / "debug_cpu.toml",
        n,
        ("--compile.enable", "--activation_checkpoint.mode", mode),
    )
    for n in (1, 2)
    for mode in AC_MODES
]


def jobs() -> list[Job]:
    """Every config of the folder as it ships, then the compile/AC reproduction."""
    return [Job(c.stem, c) for c in shipped_configs()] + COMPILE_AC
