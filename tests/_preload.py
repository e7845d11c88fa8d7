"""``run_cmd``: ``subprocess.run`` for the suite's Python launches, served by a preloaded
interpreter (``tests/workers/preload_server.py``) when it can be.

Every trainer, amuse-eval or worker launch in the suite used to spend 5-7 s importing torch,
torchtitan, inductor, datasets and transformers (twice for torchrun: the launcher and each rank)
before doing a second of work; 100 launches made the suite. The server pays the imports once per
session and forks a fresh child per rank instead. The command is the same list
``subprocess.run`` would get (``python -m torch.distributed.run --standalone --nproc_per_node N
[--local-ranks-filter=0] TARGET`` or ``python TARGET``), and so are the result's returncode,
stdout and stderr: rank 0's output (or every rank's), torchrun's status (1 when a rank failed),
the exact status of a plain ``python -m`` launch.

What a fork cannot reproduce runs as a real process, the command unchanged:
- anything but those two shapes (``-c`` code, other launcher options, non-Python programs);
- any launch on a machine with CUDA (a forked child cannot use a device its parent checked);
- an environment that differs from the server's in a variable read at import time (TORCH*,
  TRITON*, OMP_*, HF_*, HOME, TMPDIR, PYTHONPATH ...: the child has the server's imports);
- ``fresh=True``: the tests whose subject is the process itself (what a fresh interpreter imports,
  signals to a process group, the ``--nproc`` launcher, the shipped configs as users start them);
- ``AMUSE_TEST_FRESH_PROCESSES=1``: the whole suite with real processes (slower, same tests).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FRESH_ENV = "AMUSE_TEST_FRESH_PROCESSES"
IMPORT_TIME = (
    "TORCH",
    "PYTORCH_",
    "TRITON",
    "OMP_",
    "MKL",
    "KMP_",
    "PYTHON",
    "LD_",
    "HF_",
    "HUGGINGFACE_",
    "TRANSFORMERS",
    "XDG_",
    "HOME",
    "TMPDIR",
    "AMUSE_DEVICE",
    "CUDA",
)
"""Prefixes of variables a module may read while the server imports it."""

TORCHRUN_FLAGS = ("--standalone", "--nnodes=1", "--local-ranks-filter=0")


class _Server:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.dir = tempfile.mkdtemp(prefix="amuse-preload-")
        self.path = os.path.join(self.dir, "s")
        self.log = open(os.path.join(self.dir, "server.log"), "w")  # noqa: SIM115
        cmd = [sys.executable, "-m", "tests.workers.preload_server", self.path]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 300)
        line = self.proc.stdout.readline() if ready else "(not ready after 300 s)"
        hello = json.loads(line) if line.startswith("{") else {}
        self.ok = bool(hello.get("ready")) and not hello.get("printed")
        if not self.ok:  # a child would not print what a fresh interpreter prints
            print(f"tests/_preload.py: preloading not used: {hello or line!r}", file=sys.stderr)
            self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def differs(self, env: dict[str, str]) -> list[str]:
        """The import-time variables whose value ``env`` changes."""
        keys = {k for k in (*env, *self.env) if k.startswith(IMPORT_TIME)}
        keys.discard("CUDA_VISIBLE_DEVICES")  # no device to hide: CUDA hosts never preload
        return sorted(k for k in keys if env.get(k) != self.env.get(k))

    def run(self, req: dict[str, Any], cmd: list[str], timeout: float | None) -> Any:
        """The launch's result; None when the server is gone (the caller runs it for real)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            self.ok = False
            return None
        sock.sendall((json.dumps(req) + "\n").encode())
        sock.settimeout(timeout)
        reader = sock.makefile("r")
        pid = None
        try:
            pid = json.loads(reader.readline())["pid"]
            line = reader.readline()
        except BaseException as e:  # a timeout, Ctrl-C, pytest stopping: no rank outlives it
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            if isinstance(e, TimeoutError):
                raise subprocess.TimeoutExpired(cmd, timeout or 0) from None
            raise
        finally:
            reader.close()
            sock.close()
        if not line:
            raise RuntimeError(f"the preload server dropped {cmd}: see {self.log.name}")
        out = json.loads(line)
        return subprocess.CompletedProcess(cmd, out["returncode"], out["stdout"], out["stderr"])


_server: _Server | None = None
STATS: dict[str, int] = {}
"""Launches by how they ran ("preloaded", or "fresh: <why>"), for the session's summary line."""


@functools.cache
def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _request(cmd: list[str]) -> dict[str, Any] | None:
    """The launch ``cmd`` describes, or None when it is not one the server can fork."""
    if not cmd or cmd[0] != sys.executable or len(cmd) < 2 or _has_cuda():
        return None  # CUDA: a fork after the server's CUDA check could not use the device
    rest = list(cmd[1:])
    req: dict[str, Any] = {"torchrun": False, "nproc": 1, "rank0_output": False}
    if rest[:2] == ["-m", "torch.distributed.run"]:
        rest = rest[2:]
        req["torchrun"] = True
        while rest and rest[0].startswith("--"):
            opt = rest.pop(0)
            if opt.startswith("--nproc_per_node="):
                if not opt.split("=", 1)[1].isdigit():
                    return None
                req["nproc"] = int(opt.split("=", 1)[1])
            elif opt == "--local-ranks-filter=0":
                req["rank0_output"] = True
            elif opt not in TORCHRUN_FLAGS:
                return None
    if not rest or rest[0] == "-c" or (rest[0] == "-m" and len(rest) < 2):
        return None
    if rest[0].startswith("-") and rest[0] != "-m":
        return None
    req["target"] = rest
    return req


def run_cmd(
    cmd: list[str],
    *,
    env: dict[str, str],
    cwd: str | Path = REPO,
    timeout: float | None = None,
    fresh: bool = False,
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)``,
    through the preloaded interpreter when the launch allows it (module doc)."""
    global _server
    why = "asked" if fresh else FRESH_ENV if os.environ.get(FRESH_ENV) == "1" else ""
    req = None if why else _request(cmd)
    if req is not None:
        if _server is None:
            _server = _Server(dict(env))
            atexit.register(_server.close)
        differs = _server.differs(env) if _server.ok else []
        if _server.ok and not differs:
            req.update(env=dict(env), cwd=str(cwd))
            result = _server.run(req, cmd, timeout)
            if result is not None:
                STATS["preloaded"] = STATS.get("preloaded", 0) + 1
                return result
        why = f"environment ({', '.join(differs)})" if differs else "preloading off"
    why = why or "not a python/torchrun launch"
    STATS[f"fresh: {why}"] = STATS.get(f"fresh: {why}", 0) + 1
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
