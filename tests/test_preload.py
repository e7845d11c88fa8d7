"""The preloaded launches (tests/_preload.py) against real ones: the same command gives the same
status, output, argv, sys.path, environment and process group, and a failing rank stops the
others as torchrun stops them."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests import _preload
from tests._preload import run_cmd
from tests._titan import REPO, env, torchrun_cmd

pytestmark = pytest.mark.dist

PROBE = REPO / "tests" / "workers" / "launch_probe.py"


def _both(cmd: list[str], tmp: Path) -> tuple:
    e = {**env(tmp), "PROBE": "here"}
    before = _preload.STATS.get("preloaded", 0)
    preloaded = run_cmd(cmd, env=e, timeout=120)
    assert _preload.STATS.get("preloaded", 0) == before + 1  # it was served, not run fresh
    return run_cmd(cmd, env=e, timeout=120, fresh=True), preloaded


def _info(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_plain_launches_match(tmp_path: Path) -> None:
    fresh, pre = _both([sys.executable, "-m", "tests.workers.launch_probe", "exit3"], tmp_path)
    assert fresh.returncode == pre.returncode == 3
    assert fresh.stdout == pre.stdout and "atexit ran" in pre.stdout
    (info,) = _info(pre.stdout)
    assert info["name"] == "__main__" and info["argv"] == ["exit3"] and info["probe"] == "here"
    assert info["RANK"] is None and not info["elastic"]
    assert fresh.stderr == pre.stderr == "stderr of rank None\n"

    fresh, pre = _both([sys.executable, str(PROBE), "raise"], tmp_path)
    assert fresh.returncode == pre.returncode == 1
    assert fresh.stdout == pre.stdout and _info(pre.stdout)[0]["path0"] == str(PROBE.parent)
    for proc in (fresh, pre):
        assert "Traceback" in proc.stderr and proc.stderr.endswith("ValueError: probe failure\n")


def test_torchrun_launches_match(tmp_path: Path) -> None:
    fresh, pre = _both(torchrun_cmd(2, str(PROBE), "ok"), tmp_path)
    assert fresh.returncode == pre.returncode == 0
    assert fresh.stdout == pre.stdout  # rank 0's only: --local-ranks-filter=0
    (info,) = _info(pre.stdout)
    assert info["sum"] == 3.0 and info["RANK"] == "0" and info["WORLD_SIZE"] == "2"
    assert info["LOCAL_WORLD_SIZE"] == "2" and info["elastic"]
    assert "stderr of rank 0" in fresh.stderr and "stderr of rank 0" in pre.stderr
    assert "rank 1" not in pre.stderr

    t0 = time.monotonic()
    fresh, pre = _both(torchrun_cmd(2, str(PROBE), "rank1_fails"), tmp_path)
    assert fresh.returncode == pre.returncode == 1  # torchrun's status when a rank failed
    assert time.monotonic() - t0 < 90  # rank 0 was stopped, not waited for (120 s)
