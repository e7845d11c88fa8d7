"""How every entry point starts and ends a process: one home for the rules train, eval,
benchmarks and tests share.

- ``setup_device()`` before anything imports torchtitan (torchtitan copies its device type at
  import; on a CUDA-less machine it must be "cpu", see ``amuse_dist.titan.cpu``);
- ``offline_hub_defaults()`` so a job whose data and tokenizer are local never reaches a hub,
  whether it was started as ``python -m`` or as a console script;
- ``single_process_env()`` so an entry point works without torchrun (one rank);
- ``leave_process_group()`` so every rank leaves together and without an abort at exit;
- ``torchrun_command()``/``run_torchrun()``: the single-node launcher (``amuse-train --nproc N``)
  that checks the batch split first, shows each rank's one-line error without torchrun's
  failure report (kept in the run folder's ``torchrun.log``) and returns the rank's exit status.

This module imports neither torch.distributed nor torchtitan at import time.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from amuse_dist.titan.loaders.datasets import is_offline


def torchrun_command(
    nproc: int,
    *target: str,
    rank0_output: bool = True,
    log_dir: str | os.PathLike[str] | None = None,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The one torchrun command line (the launcher, the tests, the benchmarks and the study):
    ``nproc`` ranks per node running ``target`` (a script and its arguments, or ``-m module
    ...``) under this interpreter's ``torch.distributed.run``; standalone on one node, or a c10d
    rendezvous at ``rdzv_endpoint`` across ``nnodes`` nodes.

    ``rank0_output``: only rank 0 prints (a failing worker's traceback may be on any rank: off
    for workers); ``log_dir``: every rank's output also goes to files there (``--tee 3``).
    """
    cmd = [python, "-m", "torch.distributed.run", f"--nnodes={nnodes}"]
    cmd.append(f"--nproc_per_node={nproc}")
    if rdzv_endpoint:
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}"]
        cmd += [f"--rdzv_id={rdzv_id or 'amuse'}"]
    else:
        cmd.append("--standalone")
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


# ---------------------------------------------------------------------------------- the launcher
def batch_errors(config: Any, world_size: int) -> list[str]:
    """The global batch must split into ``local_batch_size`` micro-batches on every
    data-parallel rank: checked for ``world_size`` ranks before any process starts."""
    t, par = config.training, config.parallelism
    others = par.tensor_parallel_degree * max(1, par.pipeline_parallel_degree)
    others *= max(1, par.context_parallel_degree)
    if world_size % others:
        return []  # check_parallelism names the layout
    dp = world_size // others
    if t.global_batch_size < 0 or t.local_batch_size <= 0:
        return []
    per_step = t.local_batch_size * dp
    if t.global_batch_size == 0 or t.global_batch_size % per_step:
        lo = max(per_step, t.global_batch_size // per_step * per_step)
        return [
            f"[training] global_batch_size = {t.global_batch_size}: expected a multiple of "
            f"local_batch_size ({t.local_batch_size}) x {dp} data-parallel ranks = {per_step}; "
            f"use {lo} or {lo + per_step}, or another --training.local_batch_size"
        ]
    return []


_TRACEBACK = "Traceback (most recent call last):"
_CHAINED = (
    "The above exception was the direct cause",
    "During handling of the above exception",
)
_TIMESTAMP = re.compile(r"^(\[titan\] )?\d{2}:\d{2}:\d{2}|^\[titan\]")
_EXITCODE = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")


class ConsoleFilter:
    """What the console shows of torchrun's output: the ranks' lines, each one-line error once,
    and no Python traceback bodies or elastic failure report (the log file keeps them all).

    A traceback shows only its last line (the exception), except torchrun's own
    ``ChildFailedError``/``SignalException``, whose report is dropped whole."""

    def __init__(self) -> None:
        self.in_traceback = False
        self.in_report = False
        self.seen: set[str] = set()
        self.repeating = False
        self.exit_codes: list[int] = []
        self.root_cause_codes: list[int] = []
        self._root = False

    def feed(self, line: str) -> str | None:
        """The line to print, or None."""
        text = line.rstrip("\n")
        m = _EXITCODE.match(text)
        if m:
            (self.root_cause_codes if self._root else self.exit_codes).append(int(m.group(1)))
        if text.startswith("Root Cause"):
            self._root = True
        if self.in_report:
            return None
        if "torch/distributed/elastic" in text or "torch.distributed.elastic" in text:
            if "ChildFailedError" in text or "SignalException" in text:
                self.in_report = True
                self.in_traceback = False
            return None
        if text.startswith(_TRACEBACK):
            self.in_traceback = True
            return None
        if self.in_traceback:
            if not text or text[0].isspace() or text.startswith(_CHAINED) or text == "^":
                return None
            self.in_traceback = False
            return self._once(text)
        if text.startswith("amuse-train:"):
            return self._once(text)
        if self.repeating:  # the rest of an error another rank already reported
            if not _TIMESTAMP.match(text):
                return None
            self.repeating = False
        return text

    def _once(self, text: str) -> str | None:
        """The line the first time; a repeat (the same error from another rank) is dropped
        with the lines that continue it."""
        self.repeating = text in self.seen
        if self.repeating:
            return None
        self.seen.add(text)
        return text

    def rank_exit_code(self, torchrun_code: int) -> int:
        """The failing rank's own exit status (2 for bad input), else torchrun's."""
        if torchrun_code == 0:
            return 0
        codes = self.root_cause_codes or self.exit_codes
        if not codes:
            return torchrun_code
        code = codes[0]
        return 128 - code if code < 0 else code


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc; empty elsewhere)."""
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.split("/")[2]))
    return out


def run_torchrun(cmd: list[str], log_path: Path | None, env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` (torchrun) and return the failing rank's exit status.

    The console gets what ``ConsoleFilter`` keeps; ``log_path`` (appended) gets everything.
    SIGINT and SIGTERM go to the trainer processes only (torchrun runs in its own session, so
    the terminal's Ctrl-C reaches only this launcher): the ranks save at the next step and exit
    0, and torchrun ends normally instead of killing them after its shutdown timeout.
    """
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
        env=env,
    )

    def forward(signum: int, frame: Any) -> None:
        workers = _children(proc.pid)
        for pid in workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        if not workers:  # not started yet (or no /proc): torchrun stops them itself
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    filt = ConsoleFilter()
    log = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if log is not None:
                log.write(line)
            shown = filt.feed(line)
            if shown is not None:
                print(shown, flush=True)
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if log is not None:
            log.close()
    code = filt.rank_exit_code(rc)
    if code != 0:
        where = f"; torchrun's full report is in {log_path}" if log_path else ""
        print(f"amuse-train: the run stopped with exit status {code}{where}", file=sys.stderr)
    return code


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


FULL_LOG_FORMAT = "[titan] %(asctime)s - %(name)s - %(levelname)s - %(message)s"


class CompactFormatter(logging.Formatter):
    """The console line: ``HH:MM:SS message``, the level only when it is not INFO (the full
    format, with date, logger and level, is kept in ``train.log``)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno != logging.INFO:
            head, _, rest = text.partition(" ")
            text = f"{head} {record.levelname}: {rest}"
        return text


def console_logging() -> None:
    """After torchtitan's ``init_logger``: the compact console format, and on ranks other than
    0 only warnings and errors when the launcher asks (``AMUSE_QUIET_RANKS``; rank 0 speaks
    for all, every rank still reports its own problems)."""
    root = logging.getLogger()
    for h in root.handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.setFormatter(CompactFormatter())
    if os.environ.get("AMUSE_QUIET_RANKS") and os.environ.get("RANK", "0") != "0":
        root.setLevel(logging.WARNING)
