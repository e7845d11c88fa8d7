"""The preloaded launches (tests/_preload.py) against real ones: the same command gives the same
status, output, argv, sys.path, environment, loggers and process group; a failing rank stops the
others as torchrun stops them; a timeout leaves no process behind; an environment the server
cannot stand for runs for real."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import _preload
from tests._preload import FRESH_ENV, run_cmd
from tests._titan import REPO, env, torchrun_cmd

pytestmark = [
    pytest.mark.dist,
    pytest.mark.skipif(os.environ.get(FRESH_ENV) == "1", reason="every launch is fresh"),
]

PROBE = REPO / "tests" / "workers" / "launch_probe.py"
SEED = re.compile(r"^seed \d+\n", re.M)
LOG_PREFIX = re.compile(r"^[DIWE]\d{4} [0-9:.]+ \d+ ", re.M)  # torch's: time and pid differ


def _stable(stderr: str) -> str:
    return LOG_PREFIX.sub("", SEED.sub("", stderr))


def _served(cmd: list[str], e: dict[str, str], **kw: object) -> subprocess.CompletedProcess:
    before = _preload.STATS.get("preloaded", 0)
    proc = run_cmd(cmd, env=e, **kw)  # type: ignore[arg-type]
    assert _preload.STATS.get("preloaded", 0) == before + 1  # served, not run fresh
    return proc


def _both(cmd: list[str], tmp: Path) -> tuple:
    e = {**env(tmp), "PROBE": "here"}
    preloaded, again = _served(cmd, e, timeout=120), _served(cmd, e, timeout=120)
    seeds = SEED.findall(preloaded.stderr), SEED.findall(again.stderr)
    assert seeds[0] and seeds[0] != seeds[1]  # each launch draws its own random state
    return run_cmd(cmd, env=e, timeout=120, fresh=True), preloaded


def _info(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _logged(stderr: str) -> None:
    assert "probe: torch.distributed logger" in stderr and "probe: transformers logger" in stderr


def test_plain_launches_match(tmp_path: Path) -> None:
    fresh, pre = _both([sys.executable, "-m", "tests.workers.launch_probe", "exit3"], tmp_path)
    assert fresh.returncode == pre.returncode == 3
    assert fresh.stdout == pre.stdout  # argv (argv[0] too), __name__, sys.path[0], cwd, env
    assert "thread joined" in pre.stdout and pre.stdout.endswith("atexit ran\n")
    (info,) = _info(pre.stdout)
    assert info["name"] == "__main__" and info["argv"][1:] == ["exit3"] and info["probe"] == "here"
    assert info["RANK"] is None and not info["elastic"]
    assert _stable(fresh.stderr) == _stable(pre.stderr)
    _logged(pre.stderr)

    fresh, pre = _both([sys.executable, str(PROBE), "raise"], tmp_path)
    assert fresh.returncode == pre.returncode == 1
    assert fresh.stdout == pre.stdout and _info(pre.stdout)[0]["path0"] == str(PROBE.parent)
    for proc in (fresh, pre):
        assert "Traceback" in proc.stderr and proc.stderr.endswith("ValueError: probe failure\n")


def test_torchrun_launches_match(tmp_path: Path) -> None:
    fresh, pre = _both(torchrun_cmd(2, str(PROBE), "ok"), tmp_path)
    assert fresh.returncode == pre.returncode == 0
    assert fresh.stdout == pre.stdout  # rank 0's only (--local-ranks-filter=0), torchrun's env
    (info,) = _info(pre.stdout)
    assert info["sum"] == 3.0 and info["RANK"] == "0" and info["WORLD_SIZE"] == "2"
    assert info["TORCHELASTIC_USE_AGENT_STORE"] == "True" and info["elastic"]
    for proc in (fresh, pre):
        assert "stderr of rank 0" in proc.stderr and "rank 1" not in proc.stderr
        _logged(proc.stderr)

    t0 = time.monotonic()
    fresh, pre = _both(torchrun_cmd(2, str(PROBE), "rank1_fails"), tmp_path)
    assert fresh.returncode == pre.returncode == 1  # torchrun's status when a rank failed
    assert time.monotonic() - t0 < 90  # rank 0 was stopped, not waited for (120 s)


def test_a_timeout_leaves_no_process_and_odd_launches_run_for_real(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    e = {**env(tmp_path), "PROBE_PID_FILE": str(pids)}
    before = _preload.STATS.get("preloaded", 0)
    with pytest.raises(subprocess.TimeoutExpired):
        run_cmd(torchrun_cmd(2, str(PROBE), "sleep"), env=e, timeout=5)
    assert _preload.STATS.get("preloaded", 0) == before  # counted only when it finished
    ranks = [int(p) for p in pids.read_text().split()]
    assert len(ranks) == 2
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{p}") for p in ranks)

    # a variable read at import time (the server's imports could not see it): a real process
    fresh = dict(_preload.STATS)
    proc = run_cmd(
        [sys.executable, str(PROBE), "exit3"], env={**env(tmp_path), "PYTORCH_PROBE": "1"}
    )
    assert proc.returncode == 3
    gained = {k: v - fresh.get(k, 0) for k, v in _preload.STATS.items() if v != fresh.get(k, 0)}
    assert gained == {"fresh: environment (PYTORCH_PROBE)": 1}
