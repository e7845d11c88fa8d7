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
import io
import json
import os
import runpy
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback

STOP_GRACE_S = 15.0  # torchrun's agent: SIGTERM the other ranks, SIGKILL after a grace period


def preload() -> str:
    """Import what the entry points import; what the imports printed (must be nothing)."""
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
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
    return captured.getvalue()


def _send(conn: socket.socket, obj: dict) -> None:
    conn.sendall((json.dumps(obj) + "\n").encode())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def _run_rank(req: dict, rank: int, port: int, logs: str) -> None:
    """In the forked child: become ``python TARGET`` (as rank ``rank``); never returns."""
    code = 1
    try:
        env = dict(req["env"])
        if req["torchrun"]:
            n = str(req["nproc"])
            env.setdefault("OMP_NUM_THREADS", "1")
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
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                TORCHELASTIC_RUN_ID="preloaded",
                TORCHELASTIC_RESTART_COUNT="0",
                TORCHELASTIC_MAX_RESTARTS="0",
            )
        os.environ.clear()
        os.environ.update(env)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, name in ((1, "out"), (2, "err")):
            f = os.open(f"{logs}/{rank}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(f, fd)
            os.close(f)
        os.chdir(req["cwd"])  # signals: the server never changes CPython's start-up handlers
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
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _supervise(conn: socket.socket, req: dict) -> None:
    """In the launch's own process group: fork the ranks, wait, reply; never returns."""
    os.setsid()
    _send(conn, {"pid": os.getpid()})
    n = int(req["nproc"]) if req["torchrun"] else 1
    port = _free_port() if req["torchrun"] else 0
    logs = tempfile.mkdtemp(prefix="preload-")
    ranks: dict[int, int] = {}
    sys.stdout.flush()
    sys.stderr.flush()
    for rank in range(n):
        pid = os.fork()
        if pid == 0:
            conn.close()
            _run_rank(req, rank, port, logs)
        ranks[pid] = rank
    codes: dict[int, int] = {}
    kill_at = None
    while len(codes) < n:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if kill_at is not None and time.monotonic() > kill_at:
                for p in ranks:
                    if ranks[p] not in codes:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(p, signal.SIGKILL)
                kill_at = None
            time.sleep(0.02)
            continue
        code = os.waitstatus_to_exitcode(status)
        codes[ranks[pid]] = code
        if code != 0 and kill_at is None and len(codes) < n:
            for p in ranks:
                if ranks[p] not in codes:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGTERM)
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
            "codes": [codes[r] for r in range(n)],
        },
    )
    conn.close()
    for rank in range(n):
        for name in ("out", "err"):
            os.unlink(f"{logs}/{rank}.{name}")
    os.rmdir(logs)
    os._exit(0)


def serve(path: str) -> None:
    printed = preload()
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
        if req.get("stop"):
            conn.close()
            break
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            server.close()
            _supervise(conn, req)
        conn.close()
    server.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


if __name__ == "__main__":
    serve(sys.argv[1])
