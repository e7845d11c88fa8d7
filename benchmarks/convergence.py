"""A fair convergence study: AMUSE against Muon, AdamW and SF-AdamW under the paper's protocol.

Every run goes through the real trainer (``amuse_dist.train``, torchtitan 0.2.2) with ``torchrun``
on ``train_configs/debug_cpu.toml`` plus CLI overrides, with the paper's model options (tied
embeddings, init std 0.02, RoPE theta 1e4 without Llama 3 scaling). Same model, data order, batch,
sequence length and validation batches; the optimizer, its learning rate, its schedule and the
seed (which draws the initial weights) change. Arms (T = ``--steps``):

* ``amuse``          AMUSE, the paper's 124M setting: T0 = 0.375 T (6000 of 16000), beta1 0.6,
                     rho 0.8, wd 0.05, clip 0.5; no LR schedule; scored at X
* ``amuse_b``        AMUSE, the 720M/1.3B setting: T0 = 0.125 T (2000 of 16000), beta1 0.4,
                     rho 0.8, wd 0.1, clip 0.1; lr of ``amuse``; scored at X
* ``muon_cosine``    Muon (Nesterov 0.95, 0.2 sqrt(max(m, n)) scale, wd 0.1): linear warmup over
                     12.5% of the run, then cosine down to lr/100 (the authors' Muon baseline)
* ``muon_constant``  the same Muon, warmup then constant; lr of ``muon_cosine``
* ``adamw``          AdamW betas (0.8, 0.999), wd 0.1, the same warmup + cosine to lr/100
* ``sf_adamw``       Schedule-Free AdamW betas (0.9, 0.9999), wd 0.1, warmup 12.5% inside the
                     optimizer, constant schedule; scored at X
* ``normuon_cosine`` NorMuon (the authors' defaults, beta2 0.95; the Muon scale so one lr serves
                     both branches), wd 0.1, Muon's warmup + cosine to lr/100
* ``adamuon_cosine`` AdaMuon (the authors' defaults: sign, beta2 0.999, eps 1e-8), wd 0.1, the
                     same warmup + cosine
* ``amuse_normuon``  AMUSE (the ``amuse`` setting) with ``[amuse] direction = "normuon"``; X
* ``amuse_adamuon``  AMUSE (the ``amuse`` setting) with ``[amuse] direction = "adamuon"``; X

Protocol (each stage skips the runs the CSV already holds, so an interrupted study resumes):

1. LR sweep on seed 0: ``amuse``, ``muon_cosine`` and the four NorMuon / AdaMuon arms at every
   lr of their grid (``--sweep``);
   each arm's lr is the one with the lowest final validation loss among its seed-0 runs of
   length T (X for AMUSE). ``amuse_b`` and ``muon_constant`` reuse them.
2. Seeds: the AMUSE and Muon arms at seeds 0 .. ``--seeds``-1 with the picked lr.
3. Baselines: ``adamw`` and ``sf_adamw`` on seed 0 at each lr of their grid (``--sweep``; without
   one, a fixed lr); ``--baseline-seeds`` N > 1 adds seeds at the best of them.
4. Pareto: cosine Muon and cosine NorMuon trained to T/4 and T/2 (their own warmup and decay,
   every seed) against the X of the AMUSE runs (every direction) at the same steps (a
   schedule-free run can stop anywhere).

``--arms`` restricts every stage to some arms (e.g. only the NorMuon / AdaMuon ones).

Every finished run appends its validation losses to one CSV (``--csv``): optimizer, seed, step,
tokens, val_loss, lr, schedule_steps (the run's length T), weights (x or y), wall_s. A run is only
written once it has finished, so a killed study loses at most the run in flight; rerunning the
same command carries on. ``--report`` (implied at the end) reads the CSV and prints the tables
(mean and sample standard deviation over seeds) and draws the plot.

Usage:
  python benchmarks/convergence.py --jobs 2                # CPU study, tiny Llama, 2 gloo ranks
  python benchmarks/convergence.py --report                # tables and plot from the CSV only
  python benchmarks/convergence.py --gpu --csv outputs/convergence_gpu.csv --png docs/conv_gpu.png
  python benchmarks/convergence.py --sweep amuse=0.01,0.02,0.04 --seeds 3
  python benchmarks/convergence.py -- --training.dataset local_text --training.dataset_path D
  python benchmarks/convergence.py --dry-run               # seconds: parse every arm, train one
Arguments after ``--`` go to every trainer run unchanged.

``--dry-run`` (the suite's smoke test): every arm's trainer command is parsed by the trainer's own
config parser (a renamed flag fails here), one tiny AMUSE run (1 rank, 4 steps) goes through the
real trainer, and the CSV, tables and plot are written to a temporary folder (never the docs' CSV).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from amuse_dist.titan.launch import torchrun_command

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "train_configs" / "debug_cpu.toml"

Schedule = Literal["cosine", "constant", "none"]
X_TAG = "validation_x/loss"
Y_TAG = "validation_y/loss"
MAIN_TAG = "validation_metrics/loss"
FIELDS = (
    "optimizer",
    "seed",
    "step",
    "tokens",
    "val_loss",
    "lr",
    "schedule_steps",
    "weights",
    "wall_s",
)
# The paper's model options (the authors' Llama).
PAPER_MODEL = (
    "--model.tie_embeddings",
    "--model.init_std",
    "0.02",
    "--model.rope_theta",
    "10000",
    "--model.no-rope_scaling",
)


@dataclass(frozen=True)
class Arm:
    """One optimizer set-up: trainer ``[optimizer] name``, schedule, warmup fraction, extras."""

    key: str
    label: str
    optimizer: str
    schedule: Schedule
    warmup_frac: float
    extra: tuple[str, ...] = ()
    lr_from: str | None = None
    """Arm whose swept lr this arm uses; None: ``cpu_lr``/``gpu_lr`` (or its own sweep)."""
    cpu_lr: float = 0.0
    gpu_lr: float = 0.0

    @property
    def averages(self) -> bool:
        """Scored at the averaged weights X (schedule-free optimizers)."""
        return self.optimizer in ("AMUSE", "ScheduleFreeAdamW")


ARMS: dict[str, Arm] = {
    a.key: a
    for a in (
        Arm(
            "amuse",
            "AMUSE (T0 0.375T, beta1 0.6)",
            "AMUSE",
            "none",
            0.375,
            ("--amuse.beta1", "0.6", "--amuse.rho", "0.8", "--amuse.weight_decay", "0.05")
            + ("--training.max_norm", "0.5"),
            lr_from="amuse",
        ),
        Arm(
            "amuse_b",
            "AMUSE (T0 0.125T, beta1 0.4)",
            "AMUSE",
            "none",
            0.125,
            ("--amuse.beta1", "0.4", "--amuse.rho", "0.8", "--amuse.weight_decay", "0.1")
            + ("--training.max_norm", "0.1"),
            lr_from="amuse",
        ),
        Arm(
            "muon_cosine",
            "Muon (cosine to lr/100)",
            "Muon",
            "cosine",
            0.125,
            ("--muon.weight_decay", "0.1", "--training.max_norm", "0.5"),
            lr_from="muon_cosine",
        ),
        Arm(
            "muon_constant",
            "Muon (constant)",
            "Muon",
            "constant",
            0.125,
            ("--muon.weight_decay", "0.1", "--training.max_norm", "0.5"),
            lr_from="muon_cosine",
        ),
        Arm(
            "adamw",
            "AdamW (cosine to lr/100)",
            "AdamW",
            "cosine",
            0.125,
            ("--optimizer.beta1", "0.8", "--optimizer.beta2", "0.999")
            + ("--optimizer.weight_decay", "0.1", "--training.max_norm", "0.5"),
            cpu_lr=6e-3,
            gpu_lr=1e-3,
        ),
        Arm(
            "sf_adamw",
            "SF-AdamW (constant)",
            "ScheduleFreeAdamW",
            "none",
            0.125,
            ("--sf_adamw.beta1", "0.9", "--sf_adamw.betas2", "0.9999")
            + ("--sf_adamw.weight_decay", "0.1", "--training.max_norm", "0.5"),
            cpu_lr=1e-2,
            gpu_lr=2e-3,
        ),
        Arm(
            "normuon_cosine",
            "NorMuon (cosine to lr/100)",
            "NorMuon",
            "cosine",
            0.125,
            ("--normuon.weight_decay", "0.1", "--training.max_norm", "0.5"),
            lr_from="normuon_cosine",
        ),
        Arm(
            "adamuon_cosine",
            "AdaMuon (cosine to lr/100)",
            "AdaMuon",
            "cosine",
            0.125,
            ("--adamuon.weight_decay", "0.1", "--training.max_norm", "0.5"),
            lr_from="adamuon_cosine",
        ),
        Arm(
            "amuse_normuon",
            "AMUSE-normuon (T0 0.375T, beta1 0.6)",
            "AMUSE",
            "none",
            0.375,
            ("--amuse.direction", "normuon", "--amuse.beta1", "0.6", "--amuse.rho", "0.8")
            + ("--amuse.weight_decay", "0.05", "--training.max_norm", "0.5"),
            lr_from="amuse_normuon",
        ),
        Arm(
            "amuse_adamuon",
            "AMUSE-adamuon (T0 0.375T, beta1 0.6)",
            "AMUSE",
            "none",
            0.375,
            ("--amuse.direction", "adamuon", "--amuse.beta1", "0.6", "--amuse.rho", "0.8")
            + ("--amuse.weight_decay", "0.05", "--training.max_norm", "0.5"),
            lr_from="amuse_adamuon",
        ),
    )
}
DIRECTION_ARMS = ("normuon_cosine", "adamuon_cosine", "amuse_normuon", "amuse_adamuon")
SWEPT = ("amuse", "muon_cosine", *DIRECTION_ARMS)
SEEDED = ("amuse", "amuse_b", "muon_cosine", "muon_constant", *DIRECTION_ARMS)
BASELINES = ("adamw", "sf_adamw")
# cosine baselines a schedule-free run is compared with at T/4, T/2, T (trained to each length)
PARETO_BASES = ("muon_cosine", "normuon_cosine")
ANYTIME = ("amuse", "amuse_b", "amuse_normuon", "amuse_adamuon")
CPU_SWEEP = {
    "amuse": (0.005, 0.01, 0.02, 0.04),
    "muon_cosine": (0.005, 0.01, 0.02, 0.04),
    **{key: (0.005, 0.01, 0.02, 0.04) for key in DIRECTION_ARMS},
    "adamw": (0.001, 0.002, 0.006),
    "sf_adamw": (0.001, 0.003, 0.01),
}
GPU_SWEEP = {
    "amuse": (0.005, 0.01, 0.02),
    "muon_cosine": (0.002, 0.005, 0.01),
    "normuon_cosine": (0.002, 0.005, 0.01),
    "adamuon_cosine": (0.002, 0.005, 0.01),
    "amuse_normuon": (0.005, 0.01, 0.02),
    "amuse_adamuon": (0.005, 0.01, 0.02),
}
COLORS = {
    "amuse": "tab:red",
    "amuse_b": "tab:purple",
    "muon_cosine": "tab:green",
    "muon_constant": "tab:olive",
    "adamw": "tab:blue",
    "sf_adamw": "tab:orange",
    "normuon_cosine": "tab:cyan",
    "adamuon_cosine": "tab:gray",
    "amuse_normuon": "tab:pink",
    "amuse_adamuon": "tab:brown",
}


@dataclass(frozen=True)
class Profile:
    """Model, batch and validation shape shared by every run."""

    flavor: str
    steps: int
    val_freq: int
    val_steps: int
    local_batch_size: int
    seq_len: int
    extra: tuple[str, ...] = ()


# tiny: dim 128, 4 layers, vocab 2048; 2 ranks x 4 x 256 = 2048 tokens/step;
# validation: 16 global batches of 4 x ranks sequences (token shards: the same on any rank count).
CPU = Profile(flavor="tiny", steps=200, val_freq=25, val_steps=16, local_batch_size=4, seq_len=256)
# 124M at seq 512; 32 sequences per GPU is the paper's 124M share (256 over 8 GPUs).
GPU = Profile(
    flavor="124M",
    steps=2000,
    val_freq=100,
    val_steps=32,
    local_batch_size=32,
    seq_len=512,
    extra=(
        "--training.mixed_precision_param",
        "bfloat16",
        "--compile.enable",
        "--local_data.vocab_size",
        "8192",
    ),
)


@dataclass(frozen=True)
class Run:
    arm: Arm
    seed: int
    lr: float
    steps: int

    @property
    def name(self) -> str:
        return f"{self.arm.key}_s{self.seed}_lr{self.lr:g}_T{self.steps}"


# ----------------------------------------------------------------------------------- launching
def trainer_args(
    run: Run,
    prof: Profile,
    dump: Path,
    passthrough: Sequence[str],
    checkpoints: bool,
    nproc: int = 2,
) -> list[str]:
    warmup = max(1, round(run.arm.warmup_frac * run.steps))
    args = [
        "--job.config_file",
        str(CONFIG),
        "--job.dump_folder",
        str(dump),
        "--model.flavor",
        prof.flavor,
        *PAPER_MODEL,
        "--optimizer.name",
        run.arm.optimizer,
        "--optimizer.lr",
        repr(run.lr),
        "--training.steps",
        str(run.steps),
        "--training.local_batch_size",
        str(prof.local_batch_size),
        "--training.seq_len",
        str(prof.seq_len),
        "--validation.local_batch_size",  # token shards: the global validation batch
        str(prof.local_batch_size * nproc),
        "--validation.seq_len",
        str(prof.seq_len),
        "--validation.freq",
        str(prof.val_freq),
        "--validation.steps",
        str(prof.val_steps),
        "--metrics.log_freq",
        str(max(1, min(10, prof.val_freq))),
        "--checkpoint.enable" if checkpoints else "--checkpoint.no-enable",
        "--debug.seed",
        str(run.seed),
    ]
    if run.arm.averages:  # scored at X; Y would cost a second pass per evaluation
        args.append("--anytime.no-validate_y")
    if run.arm.schedule == "none":  # warmup inside the optimizer; the LR schedule is constant
        section = "amuse" if run.arm.optimizer == "AMUSE" else "sf_adamw"
        args += [f"--{section}.warmup_steps", str(warmup)]
        args += ["--lr_scheduler.warmup_steps", "0", "--lr_scheduler.decay_ratio", "0.0"]
    else:
        args += ["--lr_scheduler.warmup_steps", str(warmup)]
        # decay_ratio 1.0: decay over every step after the warmup (torchtitan clips it)
        ratio = "1.0" if run.arm.schedule == "cosine" else "0.0"
        args += ["--lr_scheduler.decay_ratio", ratio, "--lr_scheduler.decay_type", "cosine"]
        args += ["--lr_scheduler.min_lr_factor", "0.01"]
    return [*args, *run.arm.extra, *prof.extra, *passthrough]


def run_env(gpu: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    if not gpu:
        env["OMP_NUM_THREADS"] = "1"  # one core per rank
    return env


def launch(dump: Path, args: list[str], nproc: int, gpu: bool, timeout: int) -> tuple[str, float]:
    """Run the trainer on ``nproc`` ranks; (return code, wall seconds). Rank 0's console goes
    to ``<dump>/train.log``."""
    if dump.exists():
        shutil.rmtree(dump)  # a killed attempt's event files would mix with this run's
    dump.mkdir(parents=True)
    cmd = torchrun_command(nproc, "-m", "amuse_dist.train", *args, log_dir=dump / "ranks")
    (dump / "command.txt").write_text(" ".join(cmd) + "\n")
    t0 = time.perf_counter()
    with open(dump / "train.log", "w") as f:
        try:
            proc = subprocess.run(
                cmd, cwd=REPO, env=run_env(gpu), stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            )
            rc = str(proc.returncode)
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout} s"
    return rc, time.perf_counter() - t0


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"(no log: {e})"


def failure_report(dump: Path) -> str:
    """Tail of rank 0's console, and of every other rank's stderr that shows an error."""
    parts = [f"--- {dump / 'train.log'} (rank 0) ---", tail(dump / "train.log")]
    for err in sorted(dump.glob("ranks/**/stderr.log")):
        text = err.read_text(errors="replace")
        if "Traceback" in text and "/0/" not in str(err.relative_to(dump)):
            lines = text[text.index("Traceback") :].splitlines()
            parts += [f"--- {err} ---", *lines[-30:]]
    return "\n".join(parts)


def read_tb(dump: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} for the validation tags under ``<dump>/tb`` (amuse-plot's reader)."""
    from amuse_dist.plot import read_scalars

    try:
        scalars = read_scalars(dump / "tb")
    except FileNotFoundError:  # a run that died before logging
        return {}
    return {tag: scalars[tag] for tag in (X_TAG, Y_TAG, MAIN_TAG) if tag in scalars}


# -------------------------------------------------------------------------------------- CSV
def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != FIELDS:
            raise SystemExit(
                f"{path}: columns {reader.fieldnames} are not this study's {list(FIELDS)}; "
                "pass another --csv (nothing was changed)"
            )
        return list(reader)


def append_rows(path: Path, rows: Iterable[dict[str, object]]) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def run_key(optimizer: str, seed: int, lr: float, steps: int) -> tuple[str, int, float, int]:
    return optimizer, seed, float(f"{lr:g}"), steps


def done_runs(rows: list[dict[str, str]]) -> set[tuple[str, int, float, int]]:
    """Runs whose rows reached their last step (a run's rows are written at once)."""
    out = set()
    for r in rows:
        if int(r["step"]) == int(r["schedule_steps"]):
            out.add(
                run_key(r["optimizer"], int(r["seed"]), float(r["lr"]), int(r["schedule_steps"]))
            )
    return out


def curves(
    rows: list[dict[str, str]],
) -> dict[tuple[str, int, float, int], dict[int, float]]:
    """{(optimizer, seed, lr, T): {step: headline loss}}: X where logged, else Y."""
    by: dict[tuple[str, int, float, int], dict[str, dict[int, float]]] = defaultdict(dict)
    for r in rows:
        k = run_key(r["optimizer"], int(r["seed"]), float(r["lr"]), int(r["schedule_steps"]))
        by[k].setdefault(r["weights"], {})[int(r["step"])] = float(r["val_loss"])
    return {k: v.get("x") or v.get("y", {}) for k, v in by.items()}


def wall_times(rows: list[dict[str, str]]) -> dict[tuple[str, int, float, int], float]:
    return {
        run_key(r["optimizer"], int(r["seed"]), float(r["lr"]), int(r["schedule_steps"])): float(
            r["wall_s"]
        )
        for r in rows
    }


def pick_lr(rows: list[dict[str, str]], arm: str, steps: int) -> float | None:
    """The lr of ``arm``'s seed-0 length-``steps`` run with the lowest final loss."""
    finals = {
        k[2]: c[steps]
        for k, c in curves(rows).items()
        if k[0] == arm and k[1] == 0 and k[3] == steps and steps in c and math.isfinite(c[steps])
    }
    return min(finals, key=finals.__getitem__) if finals else None


# ---------------------------------------------------------------------------------- executing
@dataclass
class Study:
    prof: Profile
    nproc: int
    gpu: bool
    csv_path: Path
    runs_dir: Path
    timeout: int
    passthrough: list[str]
    keep_runs: bool
    failed: list[str]
    jobs: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ensure_all(self, runs: Sequence[Run]) -> None:
        """``ensure`` each run, ``jobs`` at a time (2-rank CPU runs are latency-bound on a
        shared machine; the CSV rows of a run are appended under a lock)."""
        if self.jobs <= 1:
            for run in runs:
                self.ensure(run)
            return
        with ThreadPoolExecutor(self.jobs) as pool:
            list(pool.map(self.ensure, runs))

    def ensure(self, run: Run) -> bool:
        """Train ``run`` unless the CSV already holds it; True when its rows are there."""
        rows = read_rows(self.csv_path)
        if run_key(run.arm.key, run.seed, run.lr, run.steps) in done_runs(rows):
            print(f"[{run.name}] in the CSV already", flush=True)
            return True
        dump = self.runs_dir / run.name
        args = trainer_args(
            run, self.prof, dump, self.passthrough, checkpoints=False, nproc=self.nproc
        )
        print(f"[{run.name}] {run.arm.label}, lr {run.lr:g}, {run.steps} steps ...", flush=True)
        rc, wall = launch(dump, args, self.nproc, self.gpu, self.timeout)
        tags = read_tb(dump)
        x = tags.get(X_TAG, {})
        y = tags.get(Y_TAG) or ({} if X_TAG in tags else tags.get(MAIN_TAG, {}))
        if rc != "0" or run.steps not in (x or y):
            print(
                f"[{run.name}] FAILED (exit {rc}); log tails:\n{failure_report(dump)}", flush=True
            )
            self.failed.append(run.name)
            return False
        tokens = self.prof.local_batch_size * self.prof.seq_len * self.nproc
        out = []
        for weights, curve in (("x", x), ("y", y)):
            for step in sorted(curve):
                out.append(
                    dict(
                        optimizer=run.arm.key,
                        seed=run.seed,
                        step=step,
                        tokens=step * tokens,
                        val_loss=f"{curve[step]:.6f}",
                        lr=f"{run.lr:g}",
                        schedule_steps=run.steps,
                        weights=weights,
                        wall_s=f"{wall:.1f}",
                    )
                )
        with self.lock:
            append_rows(self.csv_path, out)
        final = (x or y)[run.steps]
        print(
            f"[{run.name}] done in {wall:.0f} s: val loss {final:.4f} at step {run.steps}",
            flush=True,
        )
        if not self.keep_runs:
            shutil.rmtree(dump, ignore_errors=True)
        return True


def protocol(
    study: Study,
    steps: int,
    sweep: dict[str, tuple[float, ...]],
    seeds: int,
    baseline_seeds: int,
    fixed_lr: dict[str, float],
    stages: Sequence[str],
    arms: Sequence[str] = tuple(ARMS),
) -> None:
    """Stages 1-4 of the module docstring, each skipping runs already in the CSV; only the
    ``arms`` given (an arm that reuses another's lr needs that arm's sweep in the CSV)."""
    if "sweep" in stages:
        swept = [key for key in SWEPT if key in arms]
        study.ensure_all([Run(ARMS[key], 0, lr, steps) for key in swept for lr in sweep[key]])
    rows = read_rows(study.csv_path)
    lrs = {key: pick_lr(rows, key, steps) for key in SWEPT}
    print(f"picked learning rates (seed 0, T = {steps}): {lrs}", flush=True)
    todo: list[Run] = []
    if "seeds" in stages:
        for seed in range(seeds):
            for key in (k for k in SEEDED if k in arms):
                lr = lrs[ARMS[key].lr_from or key]
                if lr is None:
                    print(f"[{key}] no lr: its sweep has no finished run", file=sys.stderr)
                    continue
                todo.append(Run(ARMS[key], seed, lr, steps))
    if "baselines" in stages:  # seed 0 at each lr of the arm's grid (default: its fixed lr)
        for key in (k for k in BASELINES if k in arms):
            todo += [Run(ARMS[key], 0, lr, steps) for lr in sweep.get(key) or (fixed_lr[key],)]
    if "pareto" in stages:
        for base in (b for b in PARETO_BASES if b in arms and lrs[b] is not None):
            for seed in range(seeds):
                for frac in (4, 2):
                    todo.append(Run(ARMS[base], seed, lrs[base], steps // frac))
    study.ensure_all(todo)
    if "baselines" in stages and baseline_seeds > 1:  # more seeds at the best lr of seed 0
        rows = read_rows(study.csv_path)
        more = []
        for key in (k for k in BASELINES if k in arms):
            lr = pick_lr(rows, key, steps) or fixed_lr[key]
            more += [Run(ARMS[key], seed, lr, steps) for seed in range(1, baseline_seeds)]
        study.ensure_all(more)


# ------------------------------------------------------------------------------------ report
def mean_sd(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    return statistics.fmean(values), (statistics.stdev(values) if n > 1 else float("nan")), n


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    m, sd, n = mean_sd(values)
    return f"{m:.4f}" if n == 1 else f"{m:.4f} ± {sd:.4f} (n={n})"


def main_runs(rows: list[dict[str, str]], steps: int) -> dict[str, list[dict[int, float]]]:
    """{arm: [curve per seed]} for the study's length-T runs at each arm's picked lr."""
    out: dict[str, list[dict[int, float]]] = defaultdict(list)
    for (arm, _seed, lr, T), c in sorted(curves(rows).items()):
        if T != steps or arm not in ARMS:
            continue
        if lr != pick_lr(rows, ARMS[arm].lr_from or arm, steps):
            continue  # a sweep run at another lr
        out[arm].append(c)
    return out


def report(rows: list[dict[str, str]], steps: int, png: Path | None, title: str) -> str:
    lines: list[str] = []
    lrs = {key: pick_lr(rows, key, steps) for key in SWEPT}
    c = curves(rows)
    walls = wall_times(rows)
    lines.append(f"LR sweep (seed 0, T = {steps}; final validation loss, X for AMUSE):\n")
    lines.append("| arm | " + " | ".join("lr" for _ in range(1)) + " | final loss | wall |")
    lines.append("|---|---|---|---|")
    for key in (*SWEPT, *BASELINES):
        for k in sorted(k for k in c if k[0] == key and k[1] == 0 and k[3] == steps):
            mark = " (picked)" if k[2] == pick_lr(rows, key, steps) else ""
            lines.append(
                f"| {key} | {k[2]:g}{mark} | {c[k].get(steps, float('nan')):.4f} "
                f"| {walls.get(k, float('nan')):.0f} s |"
            )
    runs = main_runs(rows, steps)
    marks = [s for s in (steps // 4, steps // 2, 3 * steps // 4, steps) if s > 0]
    lines.append(
        "\nValidation loss at X (AMUSE, SF-AdamW) or Y (others): mean ± sample sd over seeds\n"
    )
    lines.append("| arm | lr | " + " | ".join(f"step {s}" for s in marks) + " | wall per run |")
    lines.append("|---|---|" + "---|" * len(marks) + "---|")
    for key in ARMS:
        if key not in runs:
            continue
        lr = next(k[2] for k in c if k[0] == key and k[3] == steps and c[k] in runs[key])
        cells = [fmt([r[s] for r in runs[key] if s in r]) for s in marks]
        w = [walls[k] for k in walls if k[0] == key and k[3] == steps and k[2] == lr]
        lines.append(
            f"| {ARMS[key].label} | {lr:g} | " + " | ".join(cells) + f" | {max(w):.0f} s max |"
        )
    # Pareto: cosine Muon trained to each length vs AMUSE's X at that step, per seed
    lines.append(
        "\nPareto check: cosine Muon trained to T' (its full warmup + decay) vs the X of one "
        "AMUSE run read at step T' (same seeds):\n"
    )
    lines.append("| T' | Muon cosine to T' | AMUSE X at T' | AMUSE - Muon | in seed sds |")
    lines.append("|---|---|---|---|---|")
    mu_lr = lrs["muon_cosine"]
    for t in (steps // 4, steps // 2, steps):
        muon = [v[t] for k, v in c.items() if k[0] == "muon_cosine" and k[2] == mu_lr and k[3] == t]
        amuse = [r[t] for r in runs.get("amuse", []) if t in r]
        lines.append(f"| {t} | {fmt(muon)} | {fmt(amuse)} | {diff_in_sd(amuse, muon)} |")
    for key in ("amuse_b",):
        amuse_b = runs.get(key, [])
        if amuse_b:
            lines.append(
                "\nSecond AMUSE arm vs the same Muon runs: "
                + ", ".join(
                    f"T'={t}: {diff_in_sd([r[t] for r in amuse_b if t in r], muon_at(c, mu_lr, t))}"
                    for t in (steps // 4, steps // 2, steps)
                )
            )
    lines += anytime_vs_cosine(runs, c, rows, steps)
    if png is not None:
        plot(runs, c, mu_lr, steps, png, title)
        lines.append(f"\nwrote {png}")
    return "\n".join(lines)


def anytime_vs_cosine(
    runs: dict[str, list[dict[int, float]]],
    c: dict[tuple[str, int, float, int], dict[int, float]],
    rows: list[dict[str, str]],
    steps: int,
) -> list[str]:
    """Every anytime arm's X at T/4, T/2, T against cosine Muon and cosine NorMuon trained to
    that length: mean difference (negative: the anytime arm is lower) and in seed sds."""
    bases = [b for b in PARETO_BASES if any(k[0] == b for k in c)]
    arms = [a for a in ANYTIME if runs.get(a)]
    if not bases or not arms:
        return []
    lengths = (steps // 4, steps // 2, steps)
    out = [
        "\nAnytime arms (X of one run read at T') minus cosine baselines trained to T' "
        "(mean difference | in seed sds):\n",
        "| anytime arm | baseline | " + " | ".join(f"T'={t} | sds" for t in lengths) + " |",
        "|---|---|" + "---|---|" * len(lengths),
    ]
    for arm in arms:
        for base in bases:
            lr = pick_lr(rows, base, steps)
            cells = []
            for t in lengths:
                a = [r[t] for r in runs[arm] if t in r]
                b = [v[t] for k, v in c.items() if k[0] == base and k[2] == lr and k[3] == t]
                cells.append(diff_in_sd(a, b))
            out.append(f"| {ARMS[arm].label} | {ARMS[base].label} | " + " | ".join(cells) + " |")
    return out


def muon_at(
    c: dict[tuple[str, int, float, int], dict[int, float]], lr: float | None, t: int
) -> list[float]:
    return [v[t] for k, v in c.items() if k[0] == "muon_cosine" and k[2] == lr and k[3] == t]


def diff_in_sd(a: list[float], b: list[float]) -> str:
    """mean(a) - mean(b), and that difference in seed standard deviations (the pooled sample
    sd, sqrt((sd_a^2 + sd_b^2) / 2)); two table cells."""
    if not a or not b:
        return "- | -"
    ma, sa, na = mean_sd(a)
    mb, sb, nb = mean_sd(b)
    d = ma - mb
    if na < 2 or nb < 2:
        return f"{d:+.4f} | -"
    sd = math.sqrt((sa * sa + sb * sb) / 2)
    return f"{d:+.4f} | {d / sd:+.1f}" if sd > 0 else f"{d:+.4f} | -"


def plot(
    runs: dict[str, list[dict[int, float]]],
    c: dict[tuple[str, int, float, int], dict[int, float]],
    mu_lr: float | None,
    steps: int,
    path: Path,
    title: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5), dpi=110, width_ratios=(3, 2))
    shown: list[float] = []
    for key, curves_ in runs.items():
        common = sorted(set.intersection(*(set(r) for r in curves_)))
        common = [s for s in common if s > 1]  # step 1 (~ln vocab) squashes the rest
        if not common:
            continue
        mean = [statistics.fmean(r[s] for r in curves_) for s in common]
        lo = [min(r[s] for r in curves_) for s in common]
        hi = [max(r[s] for r in curves_) for s in common]
        n = len(curves_)
        label = f"{ARMS[key].label}{' at X' if ARMS[key].averages else ''} (n={n})"
        ax.plot(common, mean, marker="o", ms=3, lw=1.6, color=COLORS[key], label=label)
        if n > 1:
            ax.fill_between(common, lo, hi, color=COLORS[key], alpha=0.2, lw=0)
        shown += [*lo, *hi]
    if shown:
        cut = sorted(shown)[int(0.9 * (len(shown) - 1))]  # keep the early, high losses off scale
        ax.set_ylim(min(shown) - 0.05, cut + 0.05)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (mean over seeds; band: min-max)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    # Pareto panel: final loss vs run length
    lengths = (steps // 4, steps // 2, steps)
    for key, marker in (("amuse", "o"), ("amuse_b", "s")):
        pts = [(t, [r[t] for r in runs.get(key, []) if t in r]) for t in lengths]
        pts = [(t, v) for t, v in pts if v]
        if pts:
            bx.errorbar(
                [t for t, _ in pts],
                [statistics.fmean(v) for _, v in pts],
                yerr=[
                    [statistics.fmean(v) - min(v) for _, v in pts],
                    [max(v) - statistics.fmean(v) for _, v in pts],
                ],
                marker=marker,
                color=COLORS[key],
                capsize=3,
                label=f"{ARMS[key].label}: one run, X read at step T'",
            )
    mu = [(t, muon_at(c, mu_lr, t)) for t in lengths]
    mu = [(t, v) for t, v in mu if v]
    if mu:
        bx.errorbar(
            [t for t, _ in mu],
            [statistics.fmean(v) for _, v in mu],
            yerr=[
                [statistics.fmean(v) - min(v) for _, v in mu],
                [max(v) - statistics.fmean(v) for _, v in mu],
            ],
            marker="^",
            color=COLORS["muon_cosine"],
            capsize=3,
            label="Muon cosine, a separate run to each T'",
        )
    bx.set_xlabel("run length T' (steps)")
    bx.set_ylabel("final validation loss")
    bx.set_title("Pareto check (mean, min-max over seeds)", fontsize=9)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- main
def parse_sweep(items: Sequence[str], base: dict[str, tuple[float, ...]]) -> dict[str, tuple]:
    out = dict(base)
    for item in items:
        name, _, values = item.partition("=")
        try:
            lrs = tuple(float(v) for v in values.split(",") if v)
        except ValueError:
            lrs = ()
        if name not in (*SWEPT, *BASELINES) or not lrs:
            raise SystemExit(
                f"--sweep {item}: expected NAME=LR,LR,... with NAME in {(*SWEPT, *BASELINES)}"
            )
        out[name] = lrs
    return out


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="124M, seq 512, bf16, compile, all GPUs")
    p.add_argument("--steps", type=int, default=None, help="T (CPU 200, GPU 2000)")
    p.add_argument("--val-freq", type=int, default=None, help="validate every K steps")
    p.add_argument("--val-steps", type=int, default=None, help="validation batches (global)")
    p.add_argument("--nproc", type=int, default=None, help="ranks (CPU 2, GPU: all GPUs)")
    p.add_argument("--flavor", default=None, help="model flavor (CPU tiny, GPU 124M)")
    p.add_argument("--seeds", type=int, default=2, help="seeds of the AMUSE and Muon arms")
    p.add_argument("--baseline-seeds", type=int, default=1, help="seeds of AdamW and SF-AdamW")
    p.add_argument(
        "--sweep", action="append", default=[], metavar="NAME=LR,LR", help="an arm's lr grid"
    )
    p.add_argument(
        "--stages",
        nargs="+",
        default=["sweep", "seeds", "baselines", "pareto"],
        choices=["sweep", "seeds", "baselines", "pareto"],
    )
    p.add_argument(
        "--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="run only these arms"
    )
    p.add_argument("--csv", type=Path, default=REPO / "docs" / "convergence.csv")
    p.add_argument("--png", type=Path, default=REPO / "docs" / "convergence.png")
    p.add_argument("--runs-dir", type=Path, default=REPO / "outputs" / "convergence")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses --nproc ranks)")
    p.add_argument("--keep-runs", action="store_true", help="keep each run's dump folder")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--report", action="store_true", help="only print tables and plot the CSV")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="parse every arm's command, train one tiny AMUSE run, report into a temp folder",
    )
    return p.parse_args(argv), passthrough


# Tiny arguments for tests/test_benchmarks.py ({assets}: the offline corpus/tokenizer folder).
SMOKE = {"main": ["--dry-run", "--", "--local_data.assets_dir", "{assets}"]}
DRY = Profile(flavor="tiny", steps=4, val_freq=2, val_steps=1, local_batch_size=2, seq_len=64)


def dry_run(passthrough: list[str], timeout: int) -> int:
    """Every arm's trainer command through the trainer's parser, then one real tiny AMUSE run and
    the report, all in a temporary folder."""
    import tempfile

    from amuse_dist.titan import launch as titan_launch

    titan_launch.setup_device()  # before torchtitan is imported
    from amuse_dist.titan.config import parse_job_config

    with tempfile.TemporaryDirectory(prefix="convergence_dry_") as tmp:
        root = Path(tmp)
        for arm in ARMS.values():
            run = Run(arm, 0, arm.cpu_lr or 0.01, DRY.steps)
            parse_job_config(trainer_args(run, DRY, root / run.name, passthrough, False))
        print(f"dry run: the trainer parsed the commands of {len(ARMS)} arms", flush=True)
        study = Study(
            prof=DRY,
            nproc=1,
            gpu=False,
            csv_path=root / "convergence.csv",
            runs_dir=root / "runs",
            timeout=timeout,
            passthrough=passthrough,
            keep_runs=False,
            failed=[],
        )
        if not study.ensure(Run(ARMS["amuse"], 0, 0.01, DRY.steps)):
            return 1
        print(report(read_rows(study.csv_path), DRY.steps, root / "convergence.png", "dry run"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args, passthrough = parse_args(argv)
    if args.dry_run:
        return dry_run(passthrough, args.timeout)
    prof = GPU if args.gpu else CPU
    prof = replace(
        prof,
        flavor=args.flavor or prof.flavor,
        steps=args.steps or prof.steps,
        val_freq=args.val_freq or prof.val_freq,
        val_steps=args.val_steps or prof.val_steps,
    )
    if args.nproc is not None:
        nproc = args.nproc
    elif args.gpu:
        import torch

        nproc = torch.cuda.device_count()
        if nproc == 0:
            print("--gpu: no CUDA device found", file=sys.stderr)
            return 2
    else:
        nproc = 2
    tokens = prof.local_batch_size * prof.seq_len * nproc
    device = "GPU" if args.gpu else "CPU"
    title = (
        f"Llama {prof.flavor} (tied, std 0.02, theta 1e4), {nproc} {device} ranks, "
        f"{prof.steps} steps x {tokens} tokens, {prof.val_steps * nproc} val batches"
    )
    if not args.report:
        print(f"convergence: {title}", flush=True)
        study = Study(
            prof=prof,
            nproc=nproc,
            gpu=args.gpu,
            csv_path=args.csv,
            runs_dir=args.runs_dir.resolve(),
            timeout=args.timeout,
            passthrough=passthrough,
            keep_runs=args.keep_runs,
            failed=[],
            jobs=args.jobs,
        )
        sweep = parse_sweep(args.sweep, GPU_SWEEP if args.gpu else CPU_SWEEP)
        fixed = {k: (ARMS[k].gpu_lr if args.gpu else ARMS[k].cpu_lr) for k in BASELINES}
        protocol(
            study,
            prof.steps,
            sweep,
            args.seeds,
            args.baseline_seeds,
            fixed,
            args.stages,
            args.arms,
        )
        if study.failed:
            print(f"failed: {', '.join(study.failed)}", file=sys.stderr)
    rows = read_rows(args.csv)
    if not rows:
        print(f"{args.csv}: no results", file=sys.stderr)
        return 1
    print(report(rows, prof.steps, args.png, title))
    return 1 if not args.report and study.failed else 0


if __name__ == "__main__":
    sys.exit(main())
