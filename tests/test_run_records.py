"""Runs that tell the truth (issue 21): tokens seen as training state across reshards, a
config.toml that reruns the run, the stop reason at the end of train.log, Ctrl-C that saves,
the single-node launcher's errors and exit status, the SLURM script, bf16 master weights."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._preload import run_cmd
from tests._titan import REPO, env, run_args, tb_by_step, torchrun

TOKENS = "progress/tokens_seen"
SEQ = 256  # debug_cpu.toml's training.seq_len


def _last_line(dump: Path) -> str:
    return (dump / "train.log").read_text().rstrip("\n").splitlines()[-1]


def _train(
    args: list[str], tmp: Path, nproc: int | None = None, **kw: object
) -> subprocess.CompletedProcess[str]:
    """``python -m amuse_dist.train [--nproc N] args`` (the launcher when ``nproc``)."""
    launcher = ["--nproc", str(nproc)] if nproc else []
    cmd = [sys.executable, "-m", "amuse_dist.train", *launcher, *args]
    e = env(tmp)
    e["CUDA_VISIBLE_DEVICES"] = ""
    if nproc or kw:  # the --nproc launcher is the subject: a real process tree
        return subprocess.run(
            cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=600, **kw
        )
    return run_cmd(cmd, env=e, timeout=600)


# ------------------------------------------------------------------------------ units
@pytest.mark.unit
def test_console_filter_keeps_the_rank_error_and_its_status() -> None:
    from amuse_dist.titan.launch import ConsoleFilter

    report = """\
12:00:01 Training starts at step 1
amuse-train: checkpoint /x/step-4: [amuse] beta1 changed 0.6 -> 0.5: refused
amuse-train: checkpoint /x/step-4: [amuse] beta1 changed 0.6 -> 0.5: refused
E1204 12:00:02 123 torch/distributed/elastic/multiprocessing/api.py:900] failed (exitcode: 2)
Traceback (most recent call last):
  File "/bin/torchrun", line 8, in <module>
    sys.exit(main())
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
amuse_dist.train FAILED
------------------------------------------------------------
Failures:
[1]:
  exitcode  : 2 (pid: 12)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : 2 (pid: 11)
============================================================
"""
    f = ConsoleFilter()
    shown = [s for s in (f.feed(line) for line in report.splitlines()) if s is not None]
    assert shown == [
        "12:00:01 Training starts at step 1",
        "amuse-train: checkpoint /x/step-4: [amuse] beta1 changed 0.6 -> 0.5: refused",
    ]
    assert f.rank_exit_code(1) == 2 and f.rank_exit_code(0) == 0
    h = ConsoleFilter()  # the same multi-line error from two ranks: shown once
    lines = ["amuse-train: refused:", "  [amuse] beta1", "Resume with ...", "12:00:03 next"]
    shown = [h.feed(x) for x in [*lines[:3], *lines]]
    assert [x for x in shown if x is not None] == lines
    crash = ["Traceback (most recent call last):", '  File "a.py", line 1', "ValueError: bad"]
    g = ConsoleFilter()
    assert [g.feed(x) for x in crash] == [None, None, "ValueError: bad"]
    assert g.rank_exit_code(1) == 1  # no report parsed: torchrun's own status


@pytest.mark.unit
def test_batch_split_checked_for_the_ranks_launched() -> None:
    from amuse_dist.titan import launch

    launch.setup_device()
    from amuse_dist.titan.config import parse_job_config

    cfg = parse_job_config(
        ["--job.config_file", str(REPO / "train_configs" / "debug_cpu.toml")]
        + ["--training.global_batch_size", "6", "--training.local_batch_size", "2"]
    )
    assert launch.batch_errors(cfg, 3) == []
    (err,) = launch.batch_errors(cfg, 2)
    assert err.startswith("[training] global_batch_size = 6: expected a multiple of") and "4" in err
    cmd = launch.torchrun_command(2, "-m", "amuse_dist.train", "--job.config_file", "a.toml")
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in cmd
    assert cmd[-4:] == ["-m", "amuse_dist.train", "--job.config_file", "a.toml"]


@pytest.mark.unit
def test_stop_line_and_config_record(tmp_path: Path) -> None:
    from amuse_dist.anytime.run_records import config_text, stop_line, write_config_record

    assert (
        stop_line("finished", 10, "", 2560)
        == "run stopped: finished at step 10 (tokens seen 2,560)"
    )
    assert stop_line("refused", None, "why:\n  a\n  b") == "run stopped: refused: why: / a / b"
    a = config_text({"training": {"steps": 3, "x": None}}, "cmd one")
    path = write_config_record(tmp_path, a)
    assert "steps = 3" in path.read_text() and "x =" not in path.read_text()
    write_config_record(tmp_path, config_text({"training": {"steps": 3}}, "cmd two"))
    assert path.read_text() == a and not (tmp_path / "config.1.toml").exists()  # same settings
    write_config_record(tmp_path, config_text({"training": {"steps": 4}}, "cmd"))
    assert (tmp_path / "config.1.toml").read_text() == a and "steps = 4" in path.read_text()


@pytest.mark.unit
def test_plot_tokens_axis_reads_the_logged_count() -> None:
    from amuse_dist.plot import tokens_at

    logged = {2: 2048.0, 4: 4096.0, 6: 5120.0}  # the batch halved after step 4 (a reshard)
    assert tokens_at([2, 4, 5, 6, 8], logged) == [2048.0, 4096.0, 4608.0, 5120.0, 6144.0]


@pytest.mark.e2e
def test_no_arguments_print_usage_and_exit_2(tmp_path: Path) -> None:
    proc = _train([], tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: amuse-train"), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.unit
def test_bf16_master_weights_refused_for_averaging_optimizers(tmp_path: Path) -> None:
    from amuse_dist.titan import launch

    launch.setup_device()
    from amuse_dist.titan.config import ConfigError, load_job_config

    base = ["--job.config_file", str(REPO / "train_configs" / "debug_cpu.toml")]
    with pytest.raises(ConfigError, match=r'\[training\] dtype = "bfloat16": bf16 master weights'):
        load_job_config([*base, "--training.dtype", "bfloat16"])
    ok = load_job_config(
        [*base, "--training.dtype", "bfloat16", "--anytime.allow_bf16_master_weights"]
    )
    assert ok.training.dtype == "bfloat16"
    adamw = load_job_config([*base, "--optimizer.name", "AdamW", "--training.dtype", "bfloat16"])
    assert adamw.optimizer.name == "AdamW"
    proc = _train(
        [*base, "--job.dump_folder", str(tmp_path / "d"), "--training.dtype", "bfloat16"], tmp_path
    )
    assert proc.returncode == 2 and "allow_bf16_master_weights" in proc.stderr
    assert not (tmp_path / "d").exists()  # before start-up: nothing written


@pytest.mark.e2e
def test_run_local_bad_key_exits_2_in_a_few_lines(tmp_path: Path) -> None:
    e = env(tmp_path)
    proc = subprocess.run(
        [
            "bash",
            "launch/run_local.sh",
            "--job.config_file",
            "train_configs/debug_cpu.toml",
            "--training.stepz",
            "3",
        ],
        cwd=REPO,
        env=e,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) <= 5 and any("stepz" in x for x in lines), lines


# ------------------------------------------------------------------------------ runs
def _records(dump: Path, step: int) -> dict[str, float]:
    """The tokens seen at ``step`` as each record says it."""
    from amuse_dist.plot import read_scalars, tokens_at

    x = dump / "checkpoint" / f"step-{step}" / "x"
    info = json.loads((x / "amuse_export.json").read_text())
    card = re.search(r"tokens seen \| ([0-9,]+)", (x / "README.md").read_text())
    meta = json.loads((x.parent / "amuse_meta.json").read_text())
    scalars = read_scalars(dump / "tb")
    return {
        "amuse_export.json": info["tokens_seen"],
        "model card": int(card.group(1).replace(",", "")) if card else -1,
        "amuse_meta.json": meta["export"]["tokens_seen"],
        "tensorboard": scalars[TOKENS][step],
        "plot axis": tokens_at([step], scalars[TOKENS])[0],
    }


@pytest.mark.e2e
def test_tokens_seen_is_exact_across_2_1_3_ranks(tmp_path: Path, assets: Path) -> None:
    """The global batch follows the ranks (local 2 x ranks): 2 ranks for steps 1-2, 1 rank for
    3-4, 3 ranks for 5-6. Every record at step-2/4/6 says the sum of what was consumed."""
    dump = tmp_path / "run"
    consumed = 0
    expected = {}
    for nproc, until in ((2, 2), (1, 4), (3, 6)):
        args = run_args(
            dump,
            assets,
            steps=until,
            validation__enable=False,
            checkpoint__interval=2,
            training__local_batch_size=2,
            amuse__warmup_steps=2,
        )
        torchrun(nproc, args, tmp_path)
        consumed += 2 * 2 * nproc * SEQ  # two steps of local 2 sequences on each rank
        expected[until] = consumed
        assert _last_line(dump).endswith(f"finished at step {until} (tokens seen {consumed:,})")
    from amuse_dist.titan.metrics import format_count

    log = (dump / "train.log").read_text()
    for step, tokens in expected.items():
        got = _records(dump, step)
        assert set(got.values()) == {tokens}, (step, tokens, got)
        assert re.search(rf"step {step}/{step}\s.*tokens {re.escape(format_count(tokens))}\s", log)


@pytest.mark.e2e
def test_config_record_reruns_the_run_and_refusals_leave_it(tmp_path: Path, assets: Path) -> None:
    """demo-style run -> rerun from its config.toml: the same losses; a refused resume leaves
    config.toml byte-identical; train.log ends with why each run stopped."""
    first = tmp_path / "first"
    r = _train(
        run_args(first, assets, steps=4, checkpoint__interval=2, validation__enable=False), tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    record = (first / "config.toml").read_bytes()
    text = record.decode()
    assert "beta1 = 0.9" not in text.split("[optimizer]")[1].split("[")[0]  # not read by AMUSE
    assert re.search(r"\[amuse\][^\[]*weight_decay = ", text)  # the effective value
    assert _last_line(first).endswith("run stopped: finished at step 4 (tokens seen 4,096)")

    again = tmp_path / "again"
    r = _train(
        ["--job.config_file", str(first / "config.toml"), "--job.dump_folder", str(again)], tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    tag = "loss_metrics/global_avg_loss"
    assert tb_by_step(again, tag) == tb_by_step(first, tag) and len(tb_by_step(first, tag)) == 4

    # a refused resume (the resume contract refuses a changed beta1): record untouched
    r = _train(
        [*run_args(first, assets, steps=6, validation__enable=False), "--amuse.beta1", "0.5"],
        tmp_path,
    )
    assert r.returncode == 2 and "beta1" in r.stderr, r.stderr[-3000:]
    assert (first / "config.toml").read_bytes() == record
    assert not (first / "config.1.toml").exists()
    assert _last_line(first).split(" - ")[-1].startswith("run stopped: refused: ")

    # diverged: the guard stops the run, the last line says at which step
    div = tmp_path / "div"
    r = _train(
        run_args(div, assets, steps=4, validation__enable=False, optimizer__lr=1e10), tmp_path
    )
    assert r.returncode == 3, r.stderr[-3000:]
    assert re.search(r"run stopped: diverged at step \d+", _last_line(div)), _last_line(div)


@pytest.mark.e2e
def test_a_crash_is_the_last_line_of_train_log(tmp_path: Path, assets: Path) -> None:
    """An unexpected exception: the traceback stays, train.log ends with "crashed: <exception>"."""
    dump = tmp_path / "run"
    e = env(tmp_path)
    e.update(CUDA_VISIBLE_DEVICES="", AMUSE_DUMP_INIT_STATE="/proc/amuse-no-such-dir/init.pt")
    cmd = [sys.executable, "-m", "amuse_dist.train", *run_args(dump, assets, steps=2)]
    r = run_cmd(cmd, env=e, timeout=600)
    assert r.returncode == 1 and "Traceback" in r.stderr, r.stderr[-3000:]
    assert re.search(r"run stopped: crashed: \w+Error: ", _last_line(dump)), _last_line(dump)
    assert not (dump / "config.toml").exists()  # it never started


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file() and re.search(pattern, path.read_text()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}: {proc.stdout.read()[-3000:]}")  # type: ignore[union-attr]
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not in {path} after {timeout} s")


@pytest.mark.e2e
def test_ctrl_c_saves_on_2_ranks_and_a_second_aborts(tmp_path: Path, assets: Path) -> None:
    """``amuse-train --nproc 2``: Ctrl-C saves at the next step and exits 0 saying so; on the
    resumed run a second Ctrl-C (the ranks not yet agreed) aborts at once, saying what is lost."""
    dump = tmp_path / "run"
    e = env(tmp_path)
    e["CUDA_VISIBLE_DEVICES"] = ""

    def start(poll: int) -> subprocess.Popen:
        args = run_args(
            dump,
            assets,
            steps=100000,
            validation__enable=False,
            checkpoint__interval=100000,
            anytime__sigterm_poll_steps=poll,
        )
        return subprocess.Popen(
            [sys.executable, "-m", "amuse_dist.train", "--nproc", "2", *args],
            cwd=REPO,
            env=e,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    proc = start(poll=1)
    _wait_for(dump / "train.log", r"step\s+3/", proc)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-4000:]
    m = re.search(r"run stopped: interrupted at step (\d+)", _last_line(dump))
    assert m, _last_line(dump)
    step = int(m.group(1))
    assert (dump / "checkpoint" / f"step-{step}" / "x" / "amuse_export.json").is_file()
    assert f"amuse-train: interrupted at step {step}" in out and "Traceback" not in out, out[-3000:]
    assert "KeyboardInterrupt" not in out

    proc = start(poll=100000)  # resumes from step-N; the ranks would agree only much later
    _wait_for(dump / "train.log", rf"step\s+{step + 2}/", proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out[-4000:]
    assert re.search(
        rf"aborted at step \d+.*newest checkpoint is step-{step}, the \d+ steps", out
    ), out[-3000:]
    assert (dump / "checkpoint" / f"step-{step}").is_dir()

    # a refusal after start-up, through the launcher: the rank's status (2), its error once,
    # torchrun's report only in torchrun.log
    record = (dump / "config.toml").read_bytes()
    args = run_args(dump, assets, steps=100000, validation__enable=False, amuse__beta1=0.5)
    r = _train(args, tmp_path, nproc=2)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-4000:]
    assert out.count("amuse-train: checkpoint") == 1 and "beta1" in out, out[-4000:]
    assert "ChildFailedError" not in out and "Traceback" not in out, out[-4000:]
    assert "ChildFailedError" in (dump / "torchrun.log").read_text()
    assert (dump / "config.toml").read_bytes() == record
    assert _last_line(dump).split(" - ")[-1].startswith("run stopped: refused: checkpoint")


# ------------------------------------------------------------------------------ SLURM script
STUB = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
case "$(basename "$0")" in
  scontrol) [[ "$1" == show ]] && printf 'node1\\nnode2\\n'; exit 0 ;;
  srun)
    if [[ "$*" == *hostname* ]]; then echo 10.0.0.1; exit 0; fi
    trap 'echo "srun got TERM" >> "$STUB_LOG"; exit 0' TERM
    echo "srun env SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-}" >> "$STUB_LOG"
    touch "$STUB_LOG.started"; for _ in $(seq 100); do sleep 0.1; done; exit 0 ;;
esac
"""


@pytest.mark.e2e
def test_slurm_script_with_stub_commands(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol", "sbatch"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "stub.log"
    e = dict(os.environ)
    e.update(
        PATH=f"{bin_dir}:{e['PATH']}",
        STUB_LOG=str(log),
        SLURM_JOB_ID="77",
        SLURM_JOB_NAME="myrun",
        SLURM_JOB_NODELIST="node[1-2]",
        SLURM_NNODES="2",
        SLURM_CPUS_PER_TASK="24",
        SLURM_GPUS_ON_NODE="4",
        SLURM_SUBMIT_DIR=str(tmp_path),
        SLURM_RESTART_COUNT="0",
    )
    proc = subprocess.Popen(
        ["bash", str(REPO / "launch" / "slurm_multinode.sbatch"), "--training.steps", "5"],
        cwd=tmp_path,
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    end = time.monotonic() + 30
    while not Path(f"{log}.started").exists() and time.monotonic() < end:
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # SLURM's warning before the time limit / preemption
    out = proc.communicate(timeout=30)[0]
    calls = log.read_text()
    assert proc.returncode == 0, out + calls
    launch = next(
        line
        for line in calls.splitlines()
        if line.startswith("srun") and "amuse_dist.train" in line
    )
    assert "--cpus-per-task=24" in launch and "--nproc 4" in launch and "--nnodes 2" in launch
    assert "--rdzv-endpoint 10.0.0.1:29500" in launch
    assert f"--job.dump_folder {tmp_path}/outputs/runs/myrun" in launch
    assert "srun got TERM" in calls and "scontrol requeue 77" in calls, calls
    assert "SRUN_CPUS_PER_TASK=24" in calls


# ------------------------------------------------------------------------------ docs
DOCS = ("README.md", "launch/README.md", "docs/usage.md", "docs/data.md", "docs/checkpoints.md")
EXAMPLE_NAMES = {"my_hub_data"}  # the "Adding a dataset" example defines it


def _datasets_in_config(path: Path) -> tuple[str, str]:
    import tomllib

    toml = tomllib.loads(path.read_text())
    return toml["training"]["dataset"], toml["validation"]["dataset"]


@pytest.mark.unit
def test_docs_name_only_datasets_that_exist() -> None:
    """Every dataset name the docs use (in an option, a TOML line or the dataset table) is
    registered, and the shipped-configs table says what each config really trains on."""
    from amuse_dist.titan import launch

    launch.setup_device()
    from torchtitan.hf_datasets.text_datasets import DATASETS

    from amuse_dist.titan.loaders import datasets, hub

    hub.register_datasets()
    known = set(DATASETS) | set(datasets.names())
    named: dict[str, set[str]] = {}
    option = re.compile(r"(?:--(?:training|validation)\.dataset[ =]|dataset = \")([A-Za-z0-9_]+)")
    table = re.compile(r"^\| `([a-z0-9_]+)`(?: / `([a-z0-9_]+)`|, `([a-z0-9_]+)`)? \|", re.M)
    for doc in DOCS:
        text = (REPO / doc).read_text()
        names = set(option.findall(text))
        if doc == "docs/usage.md":
            section = text.split("Dataset names go in")[1].split("###")[0]
            names |= {n for row in table.findall(section) for n in row if n}
        named[doc] = names - EXAMPLE_NAMES
    unknown = {doc: sorted(n - known) for doc, n in named.items() if n - known}
    assert not unknown, unknown
    assert {"token_shards", "local_text", "fineweb_edu"} <= named["docs/usage.md"]

    usage = (REPO / "docs" / "usage.md").read_text()
    shipped = usage.split("### Shipped configs")[1].split("###")[0]
    previous = None
    rows = [r for r in shipped.splitlines() if re.match(r"\| `[a-z0-9_]+\.toml`", r)]
    listed = [r.split("`")[1] for r in rows]
    assert sorted(listed) == sorted(c.name for c in (REPO / "train_configs").glob("*.toml"))
    for row in rows:  # in table order: "same" means the row above
        config = REPO / "train_configs" / row.split("`")[1]
        data = row.split("|")[-3].strip()
        train, val = _datasets_in_config(config)
        if data.startswith("same"):
            assert previous == (train, val), (config.name, data, previous)
        else:
            assert f"`{train}`" in data and (val == train or f"`{val}`" in data), (
                config.name,
                data,
            )
        previous = (train, val)
    readme = (REPO / "launch" / "README.md").read_text()
    for config in re.findall(r"train_configs/([a-z0-9_]+\.toml)", readme):
        assert (REPO / "train_configs" / config).is_file(), config
    big = [_datasets_in_config(c) for c in (REPO / "train_configs").glob("llama3_[0-9]*.toml")]
    assert all(d == ("token_shards", "token_shards") for d in big)
    assert "configs train and validate on `token_shards`" in readme
