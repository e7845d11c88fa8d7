"""Never lose a run, round 3 (issue 23), through the real CLIs on CPU.

Nothing outside the run folder is deleted, overwritten or trusted: every security and data-loss
case snapshots the files it could touch and checks them byte-identical afterwards. The cases that
fail before any model is built run in-process (``run_cli``, as ``python -m``); the ones decided at
load run the trainer under torchrun (one rank each) or amuse-eval as a process.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from amuse_dist.anytime import integrity
from amuse_dist.anytime.run_format import (
    LOCK_FILE,
    MANIFEST,
    META_FILE,
    RunError,
    RunLock,
    complete_steps,
    os_error_message,
    purge_plan,
    strip_to_exports,
)
from amuse_dist.anytime.targets import default_out, find_targets, result_paths
from tests._preload import run_cmd
from tests._titan import REPO, env, run_args, run_cli, torchrun_cmd


# ------------------------------------------------------------------------------ helpers
def _snapshot(*roots: Path) -> dict[str, str]:
    """{path: sha256} of every file under ``roots`` (links not followed): to compare after."""
    out = {}
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for n in names:
                p = Path(dirpath) / n
                if p.is_file() and not p.is_symlink():
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


pytestmark = pytest.mark.e2e


def _train(args: list[str], tmp: Path) -> tuple[int, str]:
    cmd = torchrun_cmd(1, "-m", "amuse_dist.train", *args)
    proc = run_cmd(cmd, env=env(tmp), timeout=400)
    return proc.returncode, proc.stdout + proc.stderr


def _eval(args: list[str], tmp: Path, extra_env: dict[str, str] | None = None) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "amuse_dist.eval", *args, "--steps", "2", "--batch-size", "4"]
    e = env(tmp)
    e.update(extra_env or {})
    proc = run_cmd([*cmd, "--no-progress"], env=e, timeout=400)
    return proc.returncode, proc.stdout + proc.stderr


class _Evil:
    """Unpickling this writes ``marker``: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _forge(straight: Path, dest: Path, marker: Path) -> Path:
    """step-10 of the straight run with its DCP .metadata replaced by a code-running pickle;
    amuse_meta.json and the manifest copied as they were (a copied meta), the manifest's
    digests even recomputed for the new file: only the signature cannot be forged."""
    shutil.copytree(straight / "checkpoint" / "step-10", dest)
    (dest / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    data = json.loads((dest / MANIFEST).read_text())
    data["files"][".metadata"] = [(dest / ".metadata").stat().st_size,
                                  integrity.digest(dest / ".metadata")]  # fmt: skip
    (dest / MANIFEST).write_text(json.dumps(data))
    return dest


def _resign(step_dir: Path) -> None:
    """Re-sign a step after the test edited it (as our own writer would have written it)."""
    files = integrity.hash_share(step_dir, integrity.step_files(step_dir), 0, 1)
    integrity.write_manifest(step_dir, files)


def _copy_step(straight: Path, dump: Path, step: int) -> Path:
    dest = dump / "checkpoint" / f"step-{step}"
    shutil.copytree(straight / "checkpoint" / f"step-{step}", dest)
    return dest


# ------------------------------------------------------------------------------ security
def test_untrusted_pickles_never_run(
    straight: Path, assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A forged step (pickled .metadata beside a copied meta and manifest) is refused by every
    path that unpickles: amuse-eval, a resume and --checkpoint.initial_load_path. A genuine step
    signed by another user's key is refused too; --trust / trust_checkpoints overrides."""
    marker = tmp_path / "pwned"
    forged = _forge(straight, tmp_path / "forged" / "checkpoint" / "step-10", marker)
    before = _snapshot(forged.parent)

    assert run_cli("amuse_dist.eval", [str(forged), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "untrusted" in err and "not signed" in err and "--trust" in err, err[-2000:]

    other_key = {integrity.KEY_ENV: str(tmp_path / "someone_else.key")}
    genuine = _copy_step(straight, tmp_path / "shared", 10)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(integrity.KEY_ENV, other_key[integrity.KEY_ENV])
        integrity.user_key(create=True)
        assert run_cli("amuse_dist.eval", [str(genuine), "--no-progress"]) == 2
    assert "not signed with this user's key" in capsys.readouterr().err

    # a resume of the forged folder, and a fresh run starting from it
    code, out = _train(run_args(forged.parent.parent, assets, steps=12), tmp_path)
    assert code != 0 and "untrusted" in out and "--anytime.trust_checkpoints" in out, out[-3000:]
    fresh = tmp_path / "fresh"
    args = run_args(fresh, assets, steps=2, checkpoint__initial_load_path=forged)
    code, out = _train([*args, "--checkpoint.initial_load_model_only"], tmp_path)
    assert code != 0 and "untrusted" in out and str(forged) in out, out[-3000:]
    assert not marker.exists()
    assert _snapshot(forged.parent) == before


def test_eval_imports_nothing_and_writes_only_its_own_files(straight: Path, tmp_path: Path) -> None:
    """The meta of a shared export names a custom_import: amuse-eval never imports it. Results go
    to ``--out D/results.step6`` as ``results.step6.{csv,json}`` beside a foreign
    ``D/results.csv`` (untouched); a NaN export is evaluated with a warning."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    marker = tmp_path / "imported"
    (plugins / "amuse_evil_plugin.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    ck = tmp_path / "shared" / "checkpoint"
    s10, s20 = _copy_step(straight, ck.parent, 10), _copy_step(straight, ck.parent, 20)
    for step in (s10, s20):
        meta = json.loads((step / META_FILE).read_text())
        meta["config"]["experimental"]["custom_import"] = "amuse_evil_plugin"
        (step / META_FILE).write_text(json.dumps(meta))
    # NaN weights in step-20's export (the manifest updated: integrity holds, the loss is NaN)
    from safetensors import safe_open
    from safetensors.torch import save_file

    st = next((s20 / "x").glob("*.safetensors"))
    with safe_open(str(st), "pt") as f:
        meta_st = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    name = next(k for k in tensors if "norm" in k)
    tensors[name] = tensors[name] * float("nan")
    save_file(tensors, str(st), metadata=meta_st)
    _resign(s20)
    d = tmp_path / "D"
    d.mkdir()
    (d / "results.csv").write_text("my own results\n")
    before = _snapshot(d, s10, s20)
    code, out = _eval(
        [str(ck), "--source", "export", "--out", str(d / "results.step6")],
        tmp_path,
        {"PYTHONPATH": f"{plugins}{os.pathsep}{REPO}"},
    )
    assert code == 0, out[-4000:]
    assert not marker.exists()
    rows = json.loads((d / "results.step6.json").read_text())
    assert [r["step"] for r in rows] == [10, 20]
    assert "step 20" in out and "non-finite" in out, out[-2000:]
    after = _snapshot(d, s10, s20)
    assert {k: v for k, v in after.items() if k in before} == before
    assert sorted(set(after) - set(before)) == [str(d / "results.step6.csv"),
                                                 str(d / "results.step6.json")]  # fmt: skip


def test_a_changed_byte_is_a_named_error(straight: Path, assets: Path, tmp_path: Path) -> None:
    """One byte of a .distcp changed (same size): the resume and amuse-eval name the file."""
    dump = tmp_path / "run"
    step = _copy_step(straight, dump, 10)
    shard = step / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, out = _train(run_args(dump, assets, steps=12), tmp_path)
    assert code != 0 and f"{shard} is corrupt" in out and "SHA-256" in out, out[-3000:]
    assert complete_steps(dump / "checkpoint") == [10]  # nothing replaced
    code, out = _eval([str(step), "--out", str(tmp_path / "e")], tmp_path)
    assert code == 2 and f"{shard} is corrupt" in out, out[-3000:]


# ------------------------------------------------------------------------------ resumes
def test_resume_refuses_what_would_drop_state(straight: Path, assets: Path, tmp_path: Path) -> None:
    """tie_embeddings changed, a meta without its config, a damaged newer step, a symlinked
    train.log: each refused with a message naming it; nothing outside changes."""
    dump = tmp_path / "tie"
    _copy_step(straight, dump, 10)
    code, out = _train(run_args(dump, assets, steps=12, model__tie_embeddings=True), tmp_path)
    assert code != 0 and "[model] tie_embeddings: saved False, new True" in out, out[-3000:]

    dump = tmp_path / "noconfig"
    step = _copy_step(straight, dump, 10)
    meta = json.loads((step / META_FILE).read_text())
    del meta["config"]
    (step / META_FILE).write_text(json.dumps(meta))
    _resign(step)
    code, out = _train(run_args(dump, assets, steps=12, amuse__beta1=0.5), tmp_path)
    assert code != 0 and "has no config" in out, out[-3000:]

    dump = tmp_path / "damaged"
    _copy_step(straight, dump, 10)
    s20 = _copy_step(straight, dump, 20)
    (s20 / ".metadata").unlink()
    shutil.rmtree(s20 / "x")
    code, out = _train(run_args(dump, assets, steps=25), tmp_path)
    assert code != 0 and f"{s20} has no DCP .metadata" in out, out[-3000:]
    assert (s20 / META_FILE).is_file() and complete_steps(dump / "checkpoint") == [10]

    outside = tmp_path / "elsewhere.log"
    outside.write_text("someone else's log\n")
    dump = tmp_path / "log"
    _copy_step(straight, dump, 10)
    (dump / "train.log").symlink_to(outside)
    code, out = _train(run_args(dump, assets, steps=12), tmp_path)
    assert code != 0 and "train.log" in out and "symlink" in out, out[-3000:]
    assert outside.read_text() == "someone else's log\n"


# ------------------------------------------------------------------------------ pre-launch table
def test_pre_launch_table(
    straight: Path, assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """amuse-train refuses before any process group: exit 2, one line naming the path or key and
    the fix; nothing inside or outside is created or changed."""
    other = tmp_path / "other_run" / "checkpoint"
    shutil.copytree(straight / "checkpoint", other)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    behind = tmp_path / "behind"
    _copy_step(straight, behind, 20)
    garbage = tmp_path / "garbage_tok"
    garbage.mkdir()
    (garbage / "tokenizer.json").write_text("not a tokenizer")
    before = _snapshot(other, tmp_path / "behind", a_file)
    table = [
        (run_args(tmp_path / "thief", assets, checkpoint__folder=other), ["owned by run", str(other)]),
        (run_args(a_file, assets), ["[job] dump_folder", "a file"]),
        (run_args(tmp_path / "d1", assets, checkpoint__folder=a_file), ["[checkpoint] folder", "a file"]),
        (run_args(tmp_path / "d2", assets, anytime__export_y=True, anytime__export_folder="y"),
         ['export_folder = "y"', "export_y"]),
        (run_args(tmp_path / "d3", assets, anytime__export_folder="x" * 240), ["at most 200 bytes"]),
        (run_args(behind, assets, steps=12), ["[training] steps = 12", "step-20", "already beyond"]),
        (run_args(tmp_path / "d5", assets, model__hf_assets_path=garbage),
         ["[model] hf_assets_path", "cannot be loaded", "amuse-tokenizer"]),
        (run_args(tmp_path / "d6", assets, validation__local_batch_size=0),
         ["[validation] local_batch_size = 0"]),
    ]  # fmt: skip
    for args, needles in table:
        code = run_cli("amuse_dist.train", args)
        err = capsys.readouterr().err
        assert code == 2, (args, err[-2000:])
        for needle in needles:
            assert needle in err, (needle, err[-2000:])
    assert not any((tmp_path / n).exists() for n in ("thief", "d1", "d2", "d3", "d5", "d6"))
    assert _snapshot(other, tmp_path / "behind", a_file) == before

    # through the launcher too: its one-process pre-check keeps exit 2 (torchrun would say 1)
    proc = subprocess.run(
        ["bash", "launch/run_local.sh", *run_args(tmp_path / "d4", assets, amuse__beta1=2.0)],
        cwd=REPO, env={**env(tmp_path), "NPROC": "1"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-2000:]
    assert "[amuse] beta1 = 2.0" in proc.stderr
    # a read-only checkpoint folder (simulated: the tests run as root, who may write anywhere)
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "access", lambda p, m: False if Path(p) == ro else real(p, m))
        code = run_cli("amuse_dist.train", run_args(ro / "dump", assets))
    assert code == 2 and f"{ro} is not writable" in capsys.readouterr().err


def test_eval_refusals_before_any_model(
    straight: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A purged checkpoint is called purged (not corrupt); a read-only run folder is refused
    before evaluating with a hint to --out; a foreign results file is never overwritten."""
    ck = tmp_path / "run" / "checkpoint"
    step = _copy_step(straight, ck.parent, 10)
    strip_to_exports(step)
    foreign = tmp_path / "mine.csv"
    foreign.write_text("not amuse-eval's\n")
    before = _snapshot(step, foreign)
    cases = [
        ([str(step), "--source", "dcp"], ["purged by retention", "--source export"]),
        ([str(step / "x"), "--out", str(foreign)], [str(foreign), "did not write it"]),
    ]
    for args, needles in cases:
        assert run_cli("amuse_dist.eval", [*args, "--no-progress"]) == 2
        err = capsys.readouterr().err
        for needle in needles:
            assert needle in err, (needle, err[-2000:])
    real = os.access
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "access", lambda p, m: False if Path(p) == ck else real(p, m))
        assert run_cli("amuse_dist.eval", [str(step / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{ck} is not writable" in err and "--out" in err, err[-2000:]
    assert _snapshot(step, foreign) == before
    # results never inside a step folder; suffixes appended, never replacing a name's part
    assert default_out(step) == ck / "amuse_eval_step-10"
    assert default_out(step / "x") == ck / "amuse_eval_step-10_x"
    assert result_paths(tmp_path / "results.step6")[0].name == "results.step6.csv"
    assert [t.kind for t in find_targets(step)] == ["export"]


# ------------------------------------------------------------------------------ run-folder rules
def test_symlinks_in_the_run_folder_are_never_followed(tmp_path: Path) -> None:
    """A symlinked step-3 is neither a checkpoint nor purged through; a lock file symlinked
    elsewhere is refused; ``step-6.bad`` is not step 6."""
    outside = tmp_path / "outside" / "step-3"
    outside.mkdir(parents=True)
    for name in (".metadata", "__0_0.distcp", META_FILE):
        (outside / name).write_text(name)
    ck = tmp_path / "run" / "checkpoint"
    for s in (4, 5):
        (ck / f"step-{s}").mkdir(parents=True)
        (ck / f"step-{s}" / ".metadata").write_text("m")
    (ck / "step-3").symlink_to(outside)
    bad = ck / "step-6.bad"
    bad.mkdir()
    (bad / ".metadata").write_text("m")
    before = _snapshot(outside)
    assert complete_steps(ck) == [4, 5]
    strip, delete = purge_plan(ck, 1, 0)
    strip_to_exports(ck / "step-3")
    from amuse_dist.titan.checkpoint import AnytimeCheckpointManager

    q: Any = __import__("queue").Queue()
    manager = SimpleNamespace(
        keep_latest_k=1, keep_exports=0, folder=str(ck), purge_thread=True, purge_queue=q
    )
    AnytimeCheckpointManager._purge_stale_checkpoints(manager)  # type: ignore[arg-type]
    assert AnytimeCheckpointManager._find_load_step(manager) == 5  # type: ignore[arg-type]
    assert strip == [] and delete == [ck / "step-4"]
    assert q.get_nowait() == str(ck / "step-4") and q.empty()
    assert _snapshot(outside) == before

    run = tmp_path / "locked"
    run.mkdir()
    elsewhere = tmp_path / "victim"
    elsewhere.write_text("keep me")
    (run / LOCK_FILE).symlink_to(elsewhere)
    with pytest.raises(RunError, match="symlink"):
        RunLock(run).acquire()
    assert elsewhere.read_text() == "keep me"


def test_disk_full_is_one_line_with_the_fix(tmp_path: Path) -> None:
    import errno

    from torch.distributed.checkpoint.api import CheckpointException

    from amuse_dist.titan.checkpoint import _os_error

    e = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.distcp"))
    wrapped = CheckpointException("save", {0: e})
    assert _os_error(wrapped) is e
    msg = os_error_message(e, tmp_path, "saving checkpoint step-6")
    assert str(tmp_path / "x.distcp") in msg and "free space and resume" in msg
    assert "\n" not in msg


# ------------------------------------------------------------------------------ data CLIs
def test_data_clis_never_overwrite(
    straight: Path, assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """amuse-tokenizer over an existing tokenizer and amuse-prepare-data over shards made from
    other inputs refuse (exit 2) and leave the output byte-identical; identical reruns are
    no-ops."""
    tok_src = assets / "tokenizer-2048"  # the built-in corpus's BPE (built by the straight run)
    inputs = tmp_path / "texts"
    inputs.mkdir()
    for i in range(3):
        (inputs / f"{i}.txt").write_text(f"document {i} " * 200)
    tok = tmp_path / "tok"
    args = ["--input", str(inputs), "--out", str(tok), "--vocab-size", "300"]
    assert run_cli("amuse_dist.tokenizer", args) == 0
    assert run_cli("amuse_dist.tokenizer", args) == 0  # identical: kept
    foreign = tmp_path / "foreign_tok"
    shutil.copytree(tok_src, foreign)
    shards = tmp_path / "shards"
    prep = ["--input", str(inputs), "--tokenizer", str(tok_src), "--out", str(shards)]
    assert run_cli("amuse_dist.prepare_data", [*prep, "--no-progress"]) == 0
    capsys.readouterr()
    before = _snapshot(tok, foreign, shards)
    (inputs / "3.txt").write_text("a new document " * 100)
    assert run_cli("amuse_dist.tokenizer", args) == 2
    assert "other inputs or settings" in capsys.readouterr().err
    assert run_cli("amuse_dist.tokenizer", [*args[:3], str(foreign), *args[4:]]) == 2
    assert "not written by amuse-tokenizer" in capsys.readouterr().err
    assert run_cli("amuse_dist.prepare_data", [*prep, "--no-progress"]) == 2
    assert "added 3.txt" in capsys.readouterr().err
    assert _snapshot(tok, foreign, shards) == before
