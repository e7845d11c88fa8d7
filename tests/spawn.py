"""Launch a worker script with torchrun on CPU/gloo and load what rank 0 saved."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def torchrun(script: Path, nproc: int, args: list[str], out: Path, timeout: int = 300) -> list:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(script),
        *args,
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return torch.load(out, weights_only=False)
