"""Anytime checkpoints through the real trainer on CPU ranks (gloo): exact resume, X export and
evaluation, validation at X, preemption, crash safety, clear errors.

One straight 2-rank AMUSE run of 20 steps (checkpoints at 10 and 20, validation every 5) is shared
by most tests; each other run is a resume or a variant of it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests._preload import run_cmd
from tests._titan import (
    REPO,
    STEP_RE,
    amuse_eval,
    env,
    fresh_llama_losses,
    losses,
    read_x,
    run_args,
    tb_by_step,
    torchrun,
    torchrun_cmd,
)
from tests._titan import STRAIGHT_STEPS as STEPS

pytestmark = pytest.mark.e2e


def test_checkpoint_layout(straight: Path) -> None:
    ckpt = straight / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-10", "step-20"]
    for step in (10, 20):
        d = ckpt / f"step-{step}"
        assert (d / ".metadata").is_file()
        meta = json.loads((d / "amuse_meta.json").read_text())
        assert meta["step"] == step and meta["optimizer"] == "AMUSE"
        assert meta["model"] == {"name": "llama3_amuse", "flavor": "tiny"}
        assert meta["export"]["weights"] == "x"
        x = d / "x"
        for name in ("config.json", "tokenizer.json", "amuse_export.json"):
            assert (x / name).is_file(), name
        config = json.loads((x / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and config["hidden_size"] == 128
        assert not (x / "sharded").exists()
        tensors = read_x(d)
        assert tensors["model.embed_tokens.weight"].shape == (2048, 128)
        assert len(tensors) == 2 + 4 * 9 + 1
    assert not list(ckpt.glob(".saving-*"))


def test_resume_is_bitwise_identical(straight: Path, tmp_path: Path, assets: Path) -> None:
    """20 steps straight vs 10 steps + checkpoint + resume to 20: same losses, same final X."""
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoint" / "step-10", resumed / "checkpoint" / "step-10")
    torchrun(2, run_args(resumed, assets), tmp_path)
    a = tb_by_step(straight, "loss_metrics/global_avg_loss")
    b = tb_by_step(resumed, "loss_metrics/global_avg_loss")
    assert sorted(b) == list(range(11, STEPS + 1))
    for step in range(11, STEPS + 1):
        assert a[step] == b[step], (step, a[step], b[step])
    xa, xb = read_x(straight / "checkpoint" / "step-20"), read_x(resumed / "checkpoint" / "step-20")
    assert xa.keys() == xb.keys()
    for k in xa:
        assert torch.equal(xa[k], xb[k]), k


def test_x_and_y_validation_differ_and_x_eval_changes_nothing(
    straight: Path, tmp_path: Path, assets: Path
) -> None:
    x = tb_by_step(straight, "validation_x/loss")
    y = tb_by_step(straight, "validation_y/loss")
    assert sorted(x) == sorted(y) == [1, 5, 10, 15, 20]
    assert all(math.isfinite(v) for v in [*x.values(), *y.values()])
    assert all(x[s] != y[s] for s in (5, 10, 15, 20)), (x, y)
    quiet = tmp_path / "no_validation"
    torchrun(2, run_args(quiet, assets, validation__enable=False, checkpoint__enable=False), quiet)
    a = tb_by_step(straight, "loss_metrics/global_avg_loss")
    b = tb_by_step(quiet, "loss_metrics/global_avg_loss")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert all(a[s] == b[s] for s in a), (a, b)  # bitwise: evaluating X swapped nothing in


def test_export_loads_in_fresh_llama_and_matches_amuse_eval(
    straight: Path, tmp_path: Path, assets: Path
) -> None:
    step_dir = straight / "checkpoint" / "step-20"
    out = tmp_path / "eval"
    rows = amuse_eval(step_dir, out, tmp_path, "--source", "dcp")
    assert [(r["step"], r["source"], r["weights"]) for r in rows] == [(20, "dcp", "x")]
    assert out.with_suffix(".csv").read_text().startswith("step,source,weights,loss")
    titan, hf = fresh_llama_losses(step_dir / "x", assets, batches=2)
    assert titan == pytest.approx(rows[0]["loss"], rel=1e-4), (titan, rows[0])
    assert hf == pytest.approx(rows[0]["loss"], rel=1e-4), (hf, rows[0])
    # the whole run folder, in step order, from the exports
    rows_all = amuse_eval(straight, out, tmp_path, "--source", "export")
    assert [r["step"] for r in rows_all] == [10, 20]
    assert rows_all[1]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-5)


def test_sigterm_saves_a_resumable_checkpoint(tmp_path: Path, assets: Path) -> None:
    dump = tmp_path / "preempted"
    cmd = torchrun_cmd(
        2,
        "-m",
        "amuse_dist.train",
        *run_args(dump, assets, steps=1000, validation__enable=False, checkpoint__interval=500),
    )
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 240
    for line in proc.stdout:
        seen.append(line)
        m = STEP_RE.search(line)
        if (m and int(m.group(1)) >= 4) or time.monotonic() > deadline:
            break
    os.killpg(proc.pid, signal.SIGTERM)  # SLURM signals every process of the job
    rest, _ = proc.communicate(timeout=120)
    log = "".join(seen) + rest
    assert "preempted: stopped after step" in log, log[-3000:]
    steps = sorted(int(p.name.split("-")[1]) for p in (dump / "checkpoint").glob("step-*"))
    assert len(steps) == 1 and 4 <= steps[0] < 1000, steps
    meta = json.loads((dump / "checkpoint" / f"step-{steps[0]}" / "amuse_meta.json").read_text())
    assert meta["step"] == steps[0]
    resumed = torchrun(
        2, run_args(dump, assets, steps=steps[0] + 2, validation__enable=False), tmp_path
    )
    assert sorted(losses(resumed.stdout + resumed.stderr)) == [steps[0] + 1, steps[0] + 2]


def test_killed_export_leaves_previous_checkpoint_intact(
    straight: Path, tmp_path: Path, assets: Path
) -> None:
    dump = tmp_path / "crash"
    shutil.copytree(straight / "checkpoint" / "step-10", dump / "checkpoint" / "step-10")
    before = {p.name: p.stat().st_size for p in (dump / "checkpoint" / "step-10").rglob("*")}
    cmd = torchrun_cmd(
        2,
        str(REPO / "tests" / "workers" / "crash_export_worker.py"),
        "20",
        *run_args(dump, assets, validation__enable=False),
    )
    proc = run_cmd(cmd, env=env(tmp_path), timeout=300)
    assert proc.returncode != 0  # it died in the export of step 20
    names = sorted(p.name for p in (dump / "checkpoint").iterdir())
    assert names == [".saving-20", "step-10"], names  # no step-20 that looks complete
    after = {p.name: p.stat().st_size for p in (dump / "checkpoint" / "step-10").rglob("*")}
    assert after == before
    resumed = torchrun(2, run_args(dump, assets, validation__enable=False), tmp_path)
    assert sorted(losses(resumed.stdout + resumed.stderr)) == list(range(11, STEPS + 1))
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == ["step-10", "step-20"]


def _resume_error(dump: Path, assets: Path, tmp_path: Path, **overrides: object) -> str:
    cmd = torchrun_cmd(
        1,
        "-m",
        "amuse_dist.train",
        *run_args(dump, assets, steps=12, validation__enable=False, **overrides),
    )
    proc = run_cmd(cmd, env=env(tmp_path), timeout=300)
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


def test_clear_errors_and_nothing_deleted(straight: Path, tmp_path: Path, assets: Path) -> None:
    # a checkpoint written by AMUSE, resumed with another optimizer
    dump = tmp_path / "wrong_optimizer"
    shutil.copytree(straight / "checkpoint" / "step-10", dump / "checkpoint" / "step-10")
    err = _resume_error(
        dump, assets, tmp_path, optimizer__name="Muon", lr_scheduler__warmup_steps=2
    )
    assert "written by optimizer AMUSE" in err and "uses Muon" in err, err[-3000:]
    assert str(dump / "checkpoint" / "step-10") in err
    # a different model shape
    err = _resume_error(dump, assets, tmp_path, model__flavor="124M", local_data__vocab_size=2048)
    assert "different model shape" in err and "step-10" in err, err[-3000:]
    # a corrupt checkpoint: a shard file truncated
    shard = sorted((dump / "checkpoint" / "step-10").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    err = _resume_error(dump, assets, tmp_path)
    assert "truncated" in err and str(shard) in err, err[-3000:]
    # a missing step
    err = _resume_error(dump, assets, tmp_path, checkpoint__load_step=7)
    assert "step-7 not found" in err, err[-3000:]
    assert (dump / "checkpoint" / "step-10" / ".metadata").is_file()  # nothing deleted


def test_reshard_resume_on_1_and_3_ranks(tmp_path: Path, assets: Path) -> None:
    """A 2-rank checkpoint resumes on 1 and on 3 ranks with the 2-rank losses (global batch 6,
    the same sequences each step whatever the world size)."""

    def args(dump: Path, nproc: int, steps: int) -> list[str]:
        return run_args(
            dump,
            assets,
            steps=steps,
            validation__enable=False,
            checkpoint__interval=3,
            training__global_batch_size=6,
            training__local_batch_size=6 // nproc,
        )

    base = tmp_path / "two"
    torchrun(2, args(base, 2, 6), tmp_path)
    ref = tb_by_step(base, "loss_metrics/global_avg_loss")
    for nproc in (1, 3):
        dump = tmp_path / f"on{nproc}"
        shutil.copytree(base / "checkpoint" / "step-3", dump / "checkpoint" / "step-3")
        torchrun(nproc, args(dump, nproc, 6), tmp_path)
        got = tb_by_step(dump, "loss_metrics/global_avg_loss")
        assert sorted(got) == [4, 5, 6]
        for step in (4, 5, 6):
            assert got[step] == pytest.approx(ref[step], rel=1e-5), (nproc, step, got, ref)
        assert (dump / "checkpoint" / "step-6" / "x" / "amuse_export.json").is_file()
