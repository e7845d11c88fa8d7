"""The suite's preloaded interpreter: a process that has imported what the trainer, amuse-eval and
the test workers import (about 5 s of torch, torchtitan, inductor, datasets, transformers), then
forks a fresh copy of itself for each launch the tests ask for (``tests/_preload.py``).

A launch is what ``python -m torch.distributed.run --standalone --nproc_per_node N TARGET`` or
``python TARGET`` would run: each rank is a forked child with the request's environment (and, for
torchrun, the variables torchrun sets: RANK, WORLD_SIZE, MASTER_ADDR/PORT, TORCHELASTIC_RUN_ID
...), its own stdout/stderr, the request's working directory and ``sys.argv``; it runs the module
or script as ``__main__`` and exits the way an interpreter does (threads joined, atexit handlers,
streams flushed). When a rank fails, the others are stopped as torchrun's agent stops them
(SIGTERM, then SIGKILL). The server never runs a computation or starts a process group itself:
its children start from the state a fresh interpreter has right after those imports.

Protocol (one Unix-socket connection per launch, JSON lines): the request
``{"torchrun": bool, "nproc": N, "target": [...], "env": {...}, "cwd": str, "rank0_output": bool}``;
replies ``{"pid": P}`` (the launch's process group, for a timeout) and then
``{"returncode": rc, "stdout": str, "stderr": str}``.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import runpy
import select
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator

STOP_GRACE_S = 30.0  # torchrun's agent: SIGTERM the other ranks, SIGKILL 30 s later


@contextlib.contextmanager
def _fd_capture(path: str) -> Iterator[None]:
    """fds 1 and 2 into ``path`` for a while: what C code and Python print goes there, while
    ``sys.stdout``/``sys.stderr`` stay the objects every logging handler created now holds."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(f, 1)
    os.dup2(f, 2)
    os.close(f)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def preload(scratch: str) -> str:
    """Import what the entry points import; what the imports printed (must be nothing)."""
    path = os.path.join(scratch, "preload.out")
    with _fd_capture(path):
        from amuse_dist.titan import launch

        launch.setup_device()  # as every entry point does, before torchtitan is imported
        import safetensors.torch  # noqa: F401
        import torch.distributed.checkpoint  # noqa: F401
        import torchtitan.train  # noqa: F401
        import transformers  # noqa: F401

        import amuse_dist.titan.evaluate  # noqa: F401
        import amuse_dist.titan.export  # noqa: F401
        import amuse_dist.titan.run  # noqa: F401
        import amuse_dist.titan.trainer  # noqa: F401
        import tests._titan  # noqa: F401
    with open(path, errors="replace") as f:
        return f.read()


def _send(conn: socket.socket, obj: dict) -> None:
    conn.sendall((json.dumps(obj) + "\n").encode())


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def _run_rank(req: dict, rank: int, port_pipe: int | None, logs: str) -> None:
    """In the forked child: become ``python TARGET`` (as rank ``rank``); never returns."""
    code = 1
    try:
        env = dict(req["env"])
        if req["torchrun"]:
            n = str(req["nproc"])
            if req["nproc"] > 1:  # as torchrun does
                env.setdefault("OMP_NUM_THREADS", "1")
            assert port_pipe is not None
            with os.fdopen(port_pipe) as f:  # the store the supervisor hosts, as torchrun's agent
                port = int(f.read())
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                GROUP_RANK="0",
                ROLE_RANK=str(rank),
                ROLE_NAME="default",
                WORLD_SIZE=n,
                LOCAL_WORLD_SIZE=n,
                ROLE_WORLD_SIZE=n,
                GROUP_WORLD_SIZE="1",
                MASTER_ADDR="localhost",
                MASTER_PORT=str(port),
                TORCHELASTIC_RUN_ID="preloaded",
                TORCHELASTIC_RESTART_COUNT="0",
                TORCHELASTIC_MAX_RESTARTS="0",
                TORCHELASTIC_USE_AGENT_STORE="True",
            )
        os.environ.clear()
        os.environ.update(env)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        for fd, name in ((1, "out"), (2, "err")):
            f = os.open(f"{logs}/{rank}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(f, fd)
            os.close(f)
        os.chdir(req["cwd"])  # signals: the server never changes CPython's start-up handlers
        tempfile.tempdir = None  # TMPDIR as this launch has it
        _reseed()
        target = req["target"]
        try:
            if target[0] == "-m":
                sys.argv = ["-m", *target[2:]]
                sys.path[0] = req["cwd"]
                runpy.run_module(target[1], run_name="__main__", alter_sys=True)
            else:
                script = os.path.abspath(target[0])
                sys.argv = list(target)
                sys.path[0] = os.path.dirname(script)
                runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = _exit_code(e)
        except BaseException:  # as the interpreter reports an uncaught exception
            sys.excepthook(*sys.exc_info())
            code = 1
        threading._shutdown()  # type: ignore[attr-defined]  # join non-daemon threads
        atexit._run_exitfuncs()
        gc.collect()  # what finalizers a fresh interpreter's teardown would run
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reseed() -> None:
    """Fresh random state, as a new interpreter draws it (Python's ``random`` reseeds at fork)."""
    import numpy as np
    import torch

    torch.seed()
    np.random.seed()


def _client_gone(conn: socket.socket) -> bool:
    readable, _, _ = select.select([conn], [], [], 0)
    return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""


def _signal_running(ranks: dict[int, int], codes: dict[int, int], sig: int) -> None:
    """Send ``sig`` to every rank that has not exited yet."""
    for pid, rank in ranks.items():
        if rank not in codes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def _supervise(conn: socket.socket, req: dict, scratch: str) -> None:
    """In the launch's own process group: fork the ranks, wait, reply; never returns."""
    os.setsid()
    _send(conn, {"pid": os.getpid()})
    n = int(req["nproc"]) if req["torchrun"] else 1
    logs = tempfile.mkdtemp(prefix="launch-", dir=scratch)
    ranks: dict[int, int] = {}
    pipes: list[int] = []
    sys.stdout.flush()
    sys.stderr.flush()
    for rank in range(n):
        read_end, write_end = os.pipe() if req["torchrun"] else (None, None)
        pid = os.fork()
        if pid == 0:
            conn.close()
            for fd in (write_end, *pipes):
                if fd is not None:
                    os.close(fd)
            _run_rank(req, rank, read_end, logs)
        if read_end is not None:
            os.close(read_end)
            pipes.append(write_end)
        ranks[pid] = rank
    store = None
    if req["torchrun"]:  # after the forks: no child inherits the store's thread
        from torch.distributed import TCPStore

        store = TCPStore("localhost", 0, n, is_master=True, wait_for_workers=False)
        for fd in pipes:
            os.write(fd, str(store.port).encode())
            os.close(fd)
    codes: dict[int, int] = {}
    kill_at = None
    while len(codes) < n:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if kill_at is None and _client_gone(conn):  # pytest stopped or gave up: stop all
                _signal_running(ranks, codes, signal.SIGKILL)
                os._exit(1)
            if kill_at is not None and time.monotonic() > kill_at:
                _signal_running(ranks, codes, signal.SIGKILL)
                kill_at = None
            time.sleep(0.02)
            continue
        code = os.waitstatus_to_exitcode(status)
        codes[ranks[pid]] = code
        if code != 0 and kill_at is None and len(codes) < n:
            _signal_running(ranks, codes, signal.SIGTERM)
            kill_at = time.monotonic() + STOP_GRACE_S

    def read(rank: int, name: str) -> str:
        with open(f"{logs}/{rank}.{name}", errors="replace") as f:
            return f.read()

    shown = [0] if req["torchrun"] and req["rank0_output"] else range(n)
    if req["torchrun"]:
        rc = 0 if all(c == 0 for c in codes.values()) else 1
    else:
        rc = codes[0]
    _send(
        conn,
        {
            "returncode": rc,
            "stdout": "".join(read(r, "out") for r in shown),
            "stderr": "".join(read(r, "err") for r in shown),
        },
    )
    conn.close()
    for rank in range(n):
        for name in ("out", "err"):
            os.unlink(f"{logs}/{rank}.{name}")
    os.rmdir(logs)
    del store
    os._exit(0)


def serve(path: str) -> None:
    scratch = os.path.dirname(path)
    printed = preload(scratch)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    server.settimeout(1.0)
    parent = os.getppid()
    # the client reads this line: ready, and whether the preload was silent (a child must print
    # exactly what a fresh interpreter prints)
    print(json.dumps({"ready": True, "printed": printed}), flush=True)
    while os.getppid() == parent:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        line = b""
        while not line.endswith(b"\n"):
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            line += chunk
        if not line.strip():
            conn.close()
            continue
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            server.close()
            _supervise(conn, req, scratch)
        conn.close()
    server.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


if __name__ == "__main__":
    serve(sys.argv[1])
