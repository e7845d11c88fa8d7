"""How every entry point starts and ends a process: one home for the rules train, eval,
benchmarks and tests share.

- ``setup_device()`` before anything imports torchtitan (torchtitan copies its device type at
  import; on a CUDA-less machine it must be "cpu", see ``amuse_dist.titan.cpu``);
- ``offline_hub_defaults()`` so a job whose data and tokenizer are local never reaches a hub,
  whether it was started as ``python -m`` or as a console script;
- ``single_process_env()`` so an entry point works without torchrun (one rank);
- ``leave_process_group()`` so every rank leaves together and without an abort at exit.

This module imports neither torch.distributed nor torchtitan at import time.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterable
from typing import Any

from amuse_dist.titan.loaders.datasets import is_offline


def setup_device() -> str:
    """Fix torchtitan's device type before it is imported; returns "cpu" or "cuda"."""
    from amuse_dist.titan import cpu

    return cpu.setup_device()


def offline_hub_defaults(datasets: Iterable[str | None]) -> bool:
    """Default the Hugging Face hub to offline when every dataset named is local.

    A user's explicit ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` always wins. Returns whether the
    defaults were applied.
    """
    if any(d and not is_offline(d) for d in datasets):
        return False
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # huggingface_hub and datasets read these variables once, at import: a module already
    # imported (torchtitan's dataset registry imports both) gets the value set here too.
    offline = os.environ["HF_HUB_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE")
    for module, names in (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
    ):
        mod = sys.modules.get(module)
        for name in names if mod is not None else ():
            if hasattr(mod, name):
                setattr(mod, name, offline)
    return offline


def job_datasets(config: Any) -> list[str]:
    """The datasets a job reads: training, and validation when it is enabled."""
    out = [config.training.dataset]
    if config.validation.enable:
        out.append(config.validation.dataset)
    return out


def single_process_env() -> None:
    """Let an entry point run without torchrun: one rank on a free local port."""
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


def leave_process_group(code: int = 0) -> None:
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
    os._exit(code)
