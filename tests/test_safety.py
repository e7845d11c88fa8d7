"""Never lose a run (issue 12), through the real trainer and CLIs on CPU ranks.

Trainer runs start from a copy of the shared straight run's checkpoints (``straight``), so each
needs only a few steps: a rollback that a second run tries to join (lock, rollback, run assets,
a changed lr applied), a diverging run, and refused resumes. The unclear-message cases are a table
of CLI calls that fail before any model is built.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from amuse_dist.anytime.run_format import (
    EXPORT_MARKER,
    LOCK_INFO,
    MANIFEST,
    META_FILE,
    RunError,
    check_export_folder,
    complete_steps,
    export_dir,
)
from tests._preload import run_cmd
from tests._titan import REPO, env, run_args, run_cli, tb_by_step, torchrun_cmd


def _run(cmd: list[str], tmp: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return run_cmd(cmd, env=env(tmp), timeout=timeout)


def _train(nproc: int, args: list[str]) -> list[str]:
    return torchrun_cmd(nproc, "-m", "amuse_dist.train", *args)


def _holder(dump: Path) -> dict:
    try:
        return json.loads((dump / LOCK_INFO).read_text())
    except (OSError, ValueError):
        return {}


def _wait(ready: Callable[[], bool], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _copy_steps(straight: Path, dump: Path, *steps: int) -> None:
    for s in steps:
        src = straight / "checkpoint" / f"step-{s}"
        shutil.copytree(src, dump / "checkpoint" / f"step-{s}")


# ------------------------------------------------------------------------------ paths confined
@pytest.mark.unit
@pytest.mark.parametrize("bad", [".", "..", "../x", "/tmp/x", "a/b", "", "step-3", META_FILE])
def test_export_folder_must_be_one_name_inside_the_step(bad: str, tmp_path: Path) -> None:
    with pytest.raises(RunError, match="export_folder"):
        export_dir(tmp_path / "step-1", bad)


@pytest.mark.unit
def test_export_folder_symlink_out_is_refused(tmp_path: Path) -> None:
    step = tmp_path / "step-1"
    step.mkdir()
    (step / "x").symlink_to(tmp_path)
    with pytest.raises(RunError, match="resolves outside"):
        export_dir(step, "x")
    assert check_export_folder("x") == "x"


@pytest.mark.unit
def test_config_errors_exit_2_before_launch(
    tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """export_folder climbing out of the step folder and a validation seq_len beyond the
    training one: both named, exit 2, before any process group; nothing is created."""
    dump = tmp_path / "never"
    args = run_args(dump, assets, anytime__export_folder="../x", validation__seq_len=512)
    code = run_cli("amuse_dist.train", args)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "[anytime] export_folder" in err and "../x" in err
    assert "[validation] seq_len = 512" in err and "[training] seq_len" in err
    assert not dump.exists()


# ------------------------------------------------------------------------------ one run per folder
@pytest.mark.e2e
def test_busy_folder_rollback_run_assets_and_applied_lr(
    straight: Path, tmp_path: Path, assets: Path
) -> None:
    """Run 1 rolls back to step 10 (step-20 exists) with a new lr, on a folder whose lock record
    was left by a dead host, and its own tokenizer copy. Run 2 on the same folder is refused
    while run 1 goes on; run 1 finishes unharmed."""
    runs = tmp_path / "runs"
    dump = runs / "dump"
    _copy_steps(straight, dump, 10, 20)
    # the run's own tokenizer copy (as made at its start), told apart by a marker key
    tok = dump / "export_assets" / "tokenizer"
    shutil.copytree(straight / "export_assets" / "tokenizer", tok)
    tok_cfg = json.loads((tok / "tokenizer_config.json").read_text())
    tok_cfg["amuse_test_marker"] = "run copy"
    (tok / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (dump / LOCK_INFO).write_text(json.dumps({"host": "deadhost", "pid": 1, "started": "x"}))
    args1 = run_args(
        dump,
        assets,
        steps=1000,  # runs until the SIGTERM below (a preemption save, exit 0)
        validation__enable=False,
        checkpoint__interval=5,
        checkpoint__load_step=10,
        optimizer__lr=0.005,
    )
    first = subprocess.Popen(
        _train(2, args1),
        cwd=REPO,
        env=env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    ckpt = dump / "checkpoint"
    try:
        _wait(lambda: _holder(dump).get("host") not in (None, "deadhost"))
        holder = _holder(dump)
        t0 = time.monotonic()
        second = _run(_train(1, run_args(dump, assets, validation__enable=False)), tmp_path)
        refused_in = time.monotonic() - t0
        assert first.poll() is None, "run 1 ended before run 2 was refused"
        _wait(lambda: (ckpt / "step-15" / META_FILE).is_file() or first.poll() is not None)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGTERM)
        log1, _ = first.communicate(timeout=400)
    out2 = second.stdout + second.stderr
    assert second.returncode != 0, out2[-3000:]
    assert "another training run is using this folder" in out2, out2[-3000:]
    assert f"pid {holder['pid']}" in out2 and str(dump) in out2
    print(f"second run refused in {refused_in:.1f} s")

    # run 1 unharmed: it trained on and saved at the SIGTERM (torchrun itself reports the
    # signal it got as a failure, so its exit status says nothing here)
    assert "preempted: stopped after step" in log1, log1[-4000:]
    assert "previous run (host deadhost" in log1  # the stale record was reported
    # the rollback: old step-20 moved aside (kept), logged; a plain restart sees only new ones
    assert "rollback to step-10" in log1 and "abandoned" in log1, log1[-3000:]
    steps = complete_steps(ckpt)
    assert steps[:2] == [10, 15], steps
    (abandoned,) = ckpt.glob("abandoned-after-10-*")
    old = json.loads((abandoned / "step-20" / META_FILE).read_text())
    assert old["config"]["optimizer"]["lr"] == 0.01
    for s in steps[1:]:  # the metadata records the value used
        assert (
            json.loads((ckpt / f"step-{s}" / META_FILE).read_text())["config"]["optimizer"]["lr"]
            == 0.005
        )
    # the changed lr was applied (logged scalar) and said so
    assert "[optimizer] lr changed 0.01 -> 0.005, applied from step 11" in log1
    lr = tb_by_step(dump, "lr")
    assert min(lr) == 11 and all(v == pytest.approx(0.005) for v in lr.values()), lr
    # exports ship the run's own tokenizer copy
    shipped = json.loads((ckpt / "step-15" / "x" / "tokenizer_config.json").read_text())
    assert shipped.get("amuse_test_marker") == "run copy"
    # nothing outside the run folder; the lock released
    assert sorted(p.name for p in runs.iterdir()) == ["dump"]
    assert not (dump / LOCK_INFO).exists()


# ------------------------------------------------------------------------------ divergence
@pytest.mark.e2e
def test_diverging_run_stops_and_keeps_its_last_finite_checkpoint(
    tmp_path: Path, assets: Path
) -> None:
    """A huge lr (AdamW, 1e10): step 2's loss is NaN, that step is skipped once ([anytime]
    nonfinite_skips = 1), step 3 stops the run non-zero; every published checkpoint is finite.
    With lr 1e30 the state is already non-finite after step 1: its save is refused."""
    from safetensors.torch import load_file

    def diverge(name: str, lr: float) -> tuple[Path, str]:
        dump = tmp_path / name
        args = run_args(
            dump,
            assets,
            steps=6,
            validation__enable=False,
            optimizer__name="AdamW",
            optimizer__lr=lr,
            checkpoint__interval=1,
            checkpoint__keep_latest_k=2,
            anytime__nonfinite_skips=1,
        )
        proc = _run(_train(1, args), tmp_path)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out[-4000:]  # the trainer exits 3 (torchrun says 1)
        return dump / "checkpoint", out

    ckpt, out = diverge("skip_then_stop", 1e10)
    assert "step 2: non-finite loss or gradient, optimizer step skipped (1 of" in out, out[-4000:]
    assert "amuse-train: step 3: non-finite loss or gradient (diverged" in out
    assert "newest checkpoint: step-2, resume from it" in out
    assert complete_steps(ckpt) == [1, 2]
    for s in (1, 2):
        x = load_file(next((ckpt / f"step-{s}" / "x").glob("*.safetensors")))
        assert all(bool(t.isfinite().all()) for t in x.values()), s
    assert not list(ckpt.glob(".saving-*"))

    ckpt, out = diverge("non_finite_state", 1e30)
    assert "amuse-train: step 1: the model or optimizer state is not finite" in out, out[-4000:]
    assert "step-1 was not written" in out
    assert complete_steps(ckpt) == [] and not list(ckpt.glob(".saving-*"))


# ------------------------------------------------------------------------------ resume contract
@pytest.mark.e2e
def test_resume_refuses_unsafe_changes_and_untrusted_folders(
    straight: Path, tmp_path: Path, assets: Path
) -> None:
    dump = tmp_path / "refused"
    _copy_steps(straight, dump, 10)
    args = run_args(dump, assets, steps=12, validation__enable=False, amuse__beta1=0.5)
    proc = _run(_train(1, args), tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]  # the trainer exits 2 (torchrun says 1)
    assert "[amuse] beta1: saved 0.6, new 0.5" in out, out[-3000:]
    assert "--anytime.resume_override amuse.beta1" in out
    # not written by amuse_dist (no metadata, no signed manifest): refused unless trusted
    (dump / "checkpoint" / "step-10" / META_FILE).unlink()
    (dump / "checkpoint" / "step-10" / MANIFEST).unlink()
    proc = _run(_train(1, run_args(dump, assets, steps=12, validation__enable=False)), tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "amuse_dist did not write it" in out and "--anytime.trust_checkpoints" in out
    assert complete_steps(dump / "checkpoint") == [10]  # nothing deleted


# ------------------------------------------------------------------------------ unclear messages
def _truncate(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


@pytest.mark.unit
def test_amuse_eval_says_checkpoints_must_be_trusted(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("amuse_dist.eval", ["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "checkpoints must be trusted" in text and "--trust" in text
    docs = (REPO / "docs" / "checkpoints.md").read_text()
    assert "must be trusted" in docs and "What survives what" in docs


@pytest.mark.e2e
def test_unclear_message_table(
    straight: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """amuse-eval on each bad input exits 2 naming the file or the key, before any model or
    process group (in-process: its checks run before either)."""
    step = tmp_path / "ck" / "step-10"
    shutil.copytree(straight / "checkpoint" / "step-10", step)
    other_toml = tmp_path / "other.toml"
    toml = (REPO / "train_configs" / "debug_cpu.toml").read_text()
    other_toml.write_text(toml.replace('flavor = "tiny"', 'flavor = "124M"'))

    untrusted = tmp_path / "plain" / "step-10"
    shutil.copytree(step, untrusted)
    (untrusted / META_FILE).unlink()
    (untrusted / MANIFEST).unlink()
    broken_export = tmp_path / "broken" / "x"
    shutil.copytree(step / "x", broken_export)
    st = next(broken_export.glob("*.safetensors"))
    _truncate(st, st.stat().st_size // 2)
    truncated = tmp_path / "trunc" / "step-10"
    shutil.copytree(step, truncated)
    shard = _truncate(sorted(truncated.glob("*.distcp"))[0], 100)

    table = [  # (args, must appear in stderr)
        ([str(untrusted)], [str(untrusted), "--trust"]),
        ([str(step / "x"), "--weights", "y"], ["--weights y", str(step / "x"), "--source dcp"]),
        ([str(truncated)], [str(shard), "truncated"]),
        ([str(broken_export)], [str(st), "truncated safetensors"]),
        ([str(step / "x"), "--config", str(other_toml)], ["config.json", "hidden_size", "124M"]),
        ([str(step), "--seq-len", "512"], ["--seq-len = 512", "256"]),
    ]
    for args, needles in table:
        code = run_cli("amuse_dist.eval", [*args, "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2, (args, err[-3000:])
        for needle in needles:
            assert needle in err, (args, needle, err[-3000:])
    assert EXPORT_MARKER in {p.name for p in (step / "x").iterdir()}  # nothing touched
