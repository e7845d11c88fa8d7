"""NorMuon, AdaMuon and AMUSE with their directions through the real trainer (2 CPU ranks, gloo).

Per arm, one straight run (2 ranks, 6 steps, checkpoints at 2, 4, 6, validation at X every 2)
and three resumes: from step 2 on 2 ranks (bitwise), and the reshard chain 2 -> 1 -> 3 ranks
(step 2 resumed on 1 rank to step 4, that checkpoint resumed on 3 ranks to step 6). AMUSE arms
export X, and amuse-eval on the export (on the same 2 ranks) equals the trainer's validation at X.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests._titan import REPO, env, read_x, run_args, tb_by_step, torchrun, torchrun_cmd

pytestmark = pytest.mark.e2e

ARMS = {
    "NorMuon": {"optimizer__name": "NorMuon", "lr_scheduler__warmup_steps": 2},
    "AdaMuon": {"optimizer__name": "AdaMuon", "lr_scheduler__warmup_steps": 2},
    "AMUSE-normuon": {"optimizer__name": "AMUSE", "amuse__direction": "normuon"},
    "AMUSE-adamuon": {"optimizer__name": "AMUSE", "amuse__direction": "adamuon"},
}
LOSS = "loss_metrics/global_avg_loss"
STEPS = 6


def _args(arm: str, dump: Path, assets: Path, nproc: int, steps: int = STEPS) -> list[str]:
    return run_args(
        dump,
        assets,
        steps=steps,
        checkpoint__interval=2,
        validation__freq=2,
        validation__steps=2,
        training__global_batch_size=6,
        training__local_batch_size=6 // nproc,
        **ARMS[arm],
    )


@functools.cache
def _straight(arm: str, root: Path, assets: Path) -> Path:
    dump = root / arm / "straight"
    torchrun(2, _args(arm, dump, assets, 2), root)
    return dump


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("directions")


def _resume(src: Path, step: int, dump: Path, arm: str, assets: Path, nproc: int, steps: int):
    shutil.copytree(src / "checkpoint" / f"step-{step}", dump / "checkpoint" / f"step-{step}")
    torchrun(nproc, _args(arm, dump, assets, nproc, steps), dump.parent)
    return tb_by_step(dump, LOSS)


@pytest.mark.parametrize("arm", list(ARMS))
def test_trains_and_resumes_bitwise(arm: str, root: Path, assets: Path) -> None:
    straight = _straight(arm, root, assets)
    ref = tb_by_step(straight, LOSS)
    assert sorted(ref) == list(range(1, STEPS + 1)) and ref[STEPS] < ref[1], ref
    meta = json.loads((straight / "checkpoint" / "step-6" / "amuse_meta.json").read_text())
    assert meta["optimizer"] == ARMS[arm]["optimizer__name"]
    got = _resume(straight, 2, root / arm / "resumed", arm, assets, 2, STEPS)
    assert sorted(got) == list(range(3, STEPS + 1))
    for step in got:
        assert got[step] == ref[step], (step, got[step], ref[step])
    xa = read_x(straight / "checkpoint" / "step-6")
    xb = read_x(root / arm / "resumed" / "checkpoint" / "step-6")
    assert xa.keys() == xb.keys()
    for k in xa:
        assert torch.equal(xa[k], xb[k]), k


@pytest.mark.parametrize("arm", list(ARMS))
def test_reshard_2_to_1_to_3(arm: str, root: Path, assets: Path) -> None:
    straight = _straight(arm, root, assets)
    ref = tb_by_step(straight, LOSS)
    one = root / arm / "on1"
    got = _resume(straight, 2, one, arm, assets, 1, 4)
    assert sorted(got) == [3, 4]
    three = root / arm / "on3"
    got.update(_resume(one, 4, three, arm, assets, 3, STEPS))
    assert sorted(got) == list(range(3, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), (step, got, ref)


@pytest.mark.parametrize("arm", [a for a in ARMS if a.startswith("AMUSE")])
def test_x_export_evaluates_like_the_validator(arm: str, root: Path, assets: Path) -> None:
    straight = _straight(arm, root, assets)
    val = tb_by_step(straight, "validation_x/loss")
    y = tb_by_step(straight, "validation_y/loss")
    assert sorted(val) == [1, 2, 4, 6] and val[6] != y[6]
    out = root / arm / "eval"
    # on the training's 2 ranks: the local corpus is read per rank, as the validator reads it
    target = ["-m", "amuse_dist.eval", str(straight / "checkpoint" / "step-6")]
    cmd = torchrun_cmd(2, *target, "--out", str(out), "--no-progress")
    proc = subprocess.run(cmd, cwd=REPO, env=env(root), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (row,) = json.loads(out.with_suffix(".json").read_text())
    assert row["weights"] == "x"
    assert row["loss"] == pytest.approx(val[6], abs=1e-5), (row, val)
