"""How every entry point starts and ends a process: one home for the rules train, eval,
benchmarks and tests share.

- ``setup_device()`` before anything imports torchtitan (torchtitan copies its device type at
  import; on a CUDA-less machine it must be "cpu", see ``amuse_dist.titan.cpu``);
- ``offline_hub_defaults()`` so a job whose data and tokenizer are local never reaches a hub,
  whether it was started as ``python -m`` or as a console script;
- ``single_process_env()`` so an entry point works without torchrun (one rank);
- ``leave_process_group()`` so every rank leaves together and without an abort at exit;
- ``torchrun_command()``: the one torchrun command line the tests, the benchmarks and the
  convergence study launch ranks with.

This module imports neither torch.distributed nor torchtitan at import time.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterable
from typing import Any

from amuse_dist.titan.loaders.datasets import is_offline


def torchrun_command(
    nproc: int,
    *target: str,
    rank0_output: bool = True,
    log_dir: str | os.PathLike[str] | None = None,
    python: str = sys.executable,
) -> list[str]:
    """torchrun on one node (``--standalone``) with ``nproc`` ranks running ``target`` (a script
    and its arguments, or ``-m module ...``), as this interpreter's ``torch.distributed.run``.

    ``rank0_output``: only rank 0 prints (a failing worker's traceback may be on any rank: off
    for workers); ``log_dir``: every rank's output also goes to files there (``--tee 3``).
    """
    cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nnodes=1"]
    cmd.append(f"--nproc_per_node={nproc}")
    if log_dir is not None:
        cmd += ["--log-dir", str(log_dir), "--tee", "3"]
    if rank0_output:
        cmd.append("--local-ranks-filter=0")
    return [*cmd, *target]


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
