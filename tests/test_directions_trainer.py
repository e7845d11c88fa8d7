"""NorMuon, AdaMuon and AMUSE with their directions through the real trainer (2 CPU ranks, gloo).

Per arm, one straight run (2 ranks, 6 steps, checkpoints at 2, 4, 6, validation at X every 2)
and three resumes: from step 2 on 2 ranks (bitwise), and the reshard chain 2 -> 1 -> 3 ranks
(step 2 resumed on 1 rank to step 4, that checkpoint resumed on 3 ranks to step 6). AMUSE arms
export X, and amuse-eval of each step (DCP and export, on the same 2 ranks) equals the trainer's
validation at X. All arms' runs take three torchrun launches, one per rank count.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests._titan import REPO, read_x, run_args, run_worker, tb_by_step

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


WORKER = REPO / "tests" / "workers" / "trainer_jobs.py"
STEP = "checkpoint/step-{}"


def _job(
    name: str, arm: str, dump: Path, assets: Path, nproc: int, steps: int, copy=None, ev=False
):
    job = {"name": name, "args": _args(arm, dump, assets, nproc, steps), "eval": ev}
    if copy is not None:
        src, step = copy
        job["copy"] = [str(src / STEP.format(step)), str(dump / STEP.format(step))]
    return job


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Path:
    """Every arm's runs in three launches (one per rank count, tests/workers/trainer_jobs.py):
    on 2 ranks the straight run (amuse-eval of its steps on the same ranks) and the resume from
    its step 2; on 1 rank step 2 resumed to step 4; on 3 ranks that step 4 resumed to step 6."""
    root = tmp_path_factory.mktemp("directions")
    plan: dict[int, list[dict]] = {2: [], 1: [], 3: []}
    for arm in ARMS:
        d = root / arm
        plan[2].append(_job(arm, arm, d / "straight", assets, 2, STEPS, ev=True))
        plan[2].append(
            _job(f"{arm}/resumed", arm, d / "resumed", assets, 2, STEPS, (d / "straight", 2))
        )
        plan[1].append(_job(f"{arm}/on1", arm, d / "on1", assets, 1, 4, (d / "straight", 2)))
        plan[3].append(_job(f"{arm}/on3", arm, d / "on3", assets, 3, STEPS, (d / "on1", 4)))
    results: dict[str, dict] = {}
    for nproc, jobs in plan.items():
        (root / f"jobs{nproc}.json").write_text(json.dumps(jobs))
        args = ["--jobs", str(root / f"jobs{nproc}.json")]
        results.update(run_worker(WORKER, nproc, args, root / f"worker{nproc}.pt", timeout=1200)[0])
    (root / "results.json").write_text(json.dumps(results))
    return root


def _ok(runs: Path, *names: str) -> dict:
    results = json.loads((runs / "results.json").read_text())
    for name in names:
        assert results[name]["error"] is None, f"{name}:\n{results[name]['error']}"
    return results


@pytest.mark.parametrize("arm", list(ARMS))
def test_trains_and_resumes_bitwise(arm: str, runs: Path) -> None:
    _ok(runs, arm, f"{arm}/resumed")
    straight = runs / arm / "straight"
    ref = tb_by_step(straight, LOSS)
    assert sorted(ref) == list(range(1, STEPS + 1)) and ref[STEPS] < ref[1], ref
    meta = json.loads((straight / "checkpoint" / "step-6" / "amuse_meta.json").read_text())
    assert meta["optimizer"] == ARMS[arm]["optimizer__name"]
    got = tb_by_step(runs / arm / "resumed", LOSS)
    assert sorted(got) == list(range(3, STEPS + 1))
    for step in got:
        assert got[step] == ref[step], (step, got[step], ref[step])
    xa = read_x(straight / "checkpoint" / "step-6")
    xb = read_x(runs / arm / "resumed" / "checkpoint" / "step-6")
    assert xa.keys() == xb.keys()
    for k in xa:
        assert torch.equal(xa[k], xb[k]), k


@pytest.mark.parametrize("arm", list(ARMS))
def test_reshard_2_to_1_to_3(arm: str, runs: Path) -> None:
    _ok(runs, arm, f"{arm}/on1", f"{arm}/on3")
    ref = tb_by_step(runs / arm / "straight", LOSS)
    got = tb_by_step(runs / arm / "on1", LOSS)
    assert sorted(got) == [3, 4]
    got.update(tb_by_step(runs / arm / "on3", LOSS))
    assert sorted(got) == list(range(3, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), (step, got, ref)


@pytest.mark.parametrize("arm", [a for a in ARMS if a.startswith("AMUSE")])
def test_x_export_evaluates_like_the_validator(arm: str, runs: Path) -> None:
    """amuse-eval of every step (DCP and export), on the training's 2 ranks, equals the
    trainer's validation at X."""
    rows = _ok(runs, arm)[arm]["eval"]
    straight = runs / arm / "straight"
    val = tb_by_step(straight, "validation_x/loss")
    y = tb_by_step(straight, "validation_y/loss")
    assert sorted(val) == [1, 2, 4, 6] and val[6] != y[6]
    assert sorted((r["source"], r["step"]) for r in rows) == [
        (source, step) for source in ("dcp", "export") for step in (2, 4, 6)
    ]
    for row in rows:
        assert row["weights"] == "x", row
        assert row["loss"] == pytest.approx(val[row["step"]], abs=1e-5), (row, val)
