"""Validation loss vs step: AMUSE against AdamW, Schedule-Free AdamW and Muon, same model and data.

Every run goes through the real trainer (``amuse_dist.train``, torchtitan 0.2.2) with ``torchrun``
and the same config (``train_configs/debug_cpu.toml`` plus CLI overrides): same model, seed, data
order, batch size, sequence length, steps and validation batches; only the optimizer, its learning
rate and the LR schedule differ:

* ``adamw``          AdamW, betas (0.8, 0.999), wd 0.1, linear warmup then cosine decay to 0
* ``sf_adamw``       Schedule-Free AdamW, betas (0.9, 0.999), wd 0.1, warmup inside the optimizer,
                     constant LR schedule; evaluated at its averaged weights X
* ``muon_cosine``    Muon (Nesterov 0.95, 0.2 sqrt(max(m, n)) update scale, AdamW branch for
                     embeddings/head/norms), linear warmup then cosine decay to 0
* ``muon_constant``  the same Muon, linear warmup then constant LR
* ``amuse``          AMUSE, warmup inside the optimizer, no LR schedule; evaluated at X

All warmups are 10% of the steps. No checkpoints are written.
The validation loss is read from each run's TensorBoard event files: ``validation_x/loss`` (the
averaged weights X, AMUSE and SF-AdamW) and ``validation_y/loss`` (the training weights Y),
falling back to ``validation_metrics/loss`` when the trainer does not log them. X is what these
optimizers are meant to be evaluated at, so the headline curve of AMUSE and SF-AdamW is X (Y is
drawn dashed); the others have only Y. Every evaluation sees the same validation batches.

Writes ``convergence.csv`` (optimizer, step, tokens, val_loss, weights) and ``convergence.png``
into ``--out-dir`` and prints a table (final and best validation loss, wall time per run). A
failed run prints its log tail; the others still run, and the script exits non-zero.

Usage:
  python benchmarks/convergence.py                      # CPU: tiny Llama, 2 gloo ranks, ~10 min
  python benchmarks/convergence.py --gpu                # GPU: 124M Llama, all local GPUs
  python benchmarks/convergence.py --optimizers amuse adamw --steps 100
  python benchmarks/convergence.py --no-train           # re-read the runs, redo CSV and plot
  python benchmarks/convergence.py -- --training.dataset local_text --training.dataset_path D
Arguments after ``--`` go to every trainer run unchanged.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "train_configs" / "debug_cpu.toml"

Schedule = Literal["cosine", "constant", "none"]
X_TAG = "validation_x/loss"
Y_TAG = "validation_y/loss"
MAIN_TAG = "validation_metrics/loss"


@dataclass(frozen=True)
class RunSpec:
    """One optimizer run: trainer ``[optimizer] name``, lr, schedule and extra overrides."""

    key: str
    label: str
    optimizer: str
    schedule: Schedule
    cpu_lr: float
    gpu_lr: float
    extra: tuple[str, ...] = ()

    @property
    def averages(self) -> bool:
        """Evaluated at averaged weights X (schedule-free optimizers)."""
        return self.optimizer in ("AMUSE", "ScheduleFreeAdamW")


RUNS: dict[str, RunSpec] = {
    r.key: r
    for r in (
        RunSpec(
            "adamw",
            "AdamW (cosine)",
            "AdamW",
            "cosine",
            3e-3,
            1e-3,
            ("--optimizer.beta1", "0.8", "--optimizer.beta2", "0.999"),
        ),
        RunSpec(
            "sf_adamw",
            "SF-AdamW (constant)",
            "ScheduleFreeAdamW",
            "none",
            3e-3,
            2e-3,
            ("--optimizer.beta1", "0.9", "--optimizer.beta2", "0.999"),
        ),
        RunSpec(
            "muon_cosine",
            "Muon (cosine)",
            "Muon",
            "cosine",
            1e-2,
            2e-3,
            ("--optimizer.weight_decay", "0.0"),
        ),
        RunSpec(
            "muon_constant",
            "Muon (constant)",
            "Muon",
            "constant",
            1e-2,
            2e-3,
            ("--optimizer.weight_decay", "0.0"),
        ),
        RunSpec("amuse", "AMUSE (no schedule)", "AMUSE", "none", 1e-2, 1e-2),
    )
}
COLORS = {
    "adamw": "tab:blue",
    "sf_adamw": "tab:orange",
    "muon_cosine": "tab:green",
    "muon_constant": "tab:olive",
    "amuse": "tab:red",
}


@dataclass(frozen=True)
class Profile:
    """Model and batch shape shared by every run."""

    flavor: str
    steps: int
    val_freq: int
    val_steps: int
    local_batch_size: int
    seq_len: int
    extra: tuple[str, ...] = ()


CPU = Profile(flavor="tiny", steps=200, val_freq=25, val_steps=8, local_batch_size=4, seq_len=256)
GPU = Profile(
    flavor="124M",
    steps=3000,
    val_freq=100,
    val_steps=20,
    local_batch_size=16,
    seq_len=512,
    extra=("--training.mixed_precision_param", "bfloat16"),
)


@dataclass
class Result:
    spec: RunSpec
    dump: Path
    lr: float
    wall_s: float | None = None
    ok: bool = True
    error: str = ""
    x: dict[int, float] = field(default_factory=dict)
    y: dict[int, float] = field(default_factory=dict)

    @property
    def curve(self) -> dict[int, float]:
        """The headline curve: X where the run logged it, else Y."""
        return self.x or self.y

    @property
    def weights(self) -> str:
        return "x" if self.x else "y"


# ----------------------------------------------------------------------------------- launching
def trainer_args(
    spec: RunSpec, prof: Profile, steps: int, lr: float, dump: Path, passthrough: Sequence[str]
) -> list[str]:
    warmup = max(1, round(0.1 * steps))
    args = [
        "--job.config_file",
        str(CONFIG),
        "--job.dump_folder",
        str(dump),
        "--model.flavor",
        prof.flavor,
        "--optimizer.name",
        spec.optimizer,
        "--optimizer.lr",
        repr(lr),
        "--training.steps",
        str(steps),
        "--training.local_batch_size",
        str(prof.local_batch_size),
        "--training.seq_len",
        str(prof.seq_len),
        "--validation.local_batch_size",
        str(prof.local_batch_size),
        "--validation.seq_len",
        str(prof.seq_len),
        "--validation.freq",
        str(prof.val_freq),
        "--validation.steps",
        str(prof.val_steps),
        "--metrics.log_freq",
        str(max(1, min(10, prof.val_freq))),
        "--checkpoint.no-enable",  # pass -- --checkpoint.enable to keep the weights
        "--debug.seed",
        "0",
    ]
    if spec.schedule == "none":  # warmup inside the optimizer; the LR schedule must be constant
        args += ["--amuse.warmup_steps", str(warmup)]
        args += ["--lr_scheduler.warmup_steps", "0", "--lr_scheduler.decay_ratio", "0.0"]
    else:
        args += ["--lr_scheduler.warmup_steps", str(warmup)]
        # decay_ratio 1.0: decay over every step after the warmup (torchtitan clips it)
        ratio = "1.0" if spec.schedule == "cosine" else "0.0"
        args += ["--lr_scheduler.decay_ratio", ratio, "--lr_scheduler.decay_type", "cosine"]
        args += ["--lr_scheduler.min_lr_factor", "0.0"]
    return [*args, *spec.extra, *prof.extra, *passthrough]


def run_env(gpu: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    if not gpu:
        env["OMP_NUM_THREADS"] = "1"  # one core per rank
    return env


def launch(res: Result, args: list[str], nproc: int, gpu: bool, timeout: int) -> None:
    """Run the trainer on ``nproc`` ranks; rank 0's console goes to ``<dump>/train.log``."""
    if res.dump.exists():
        shutil.rmtree(res.dump)  # stale event files would mix with this run's
    res.dump.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc_per_node={nproc}",
        "--log-dir",
        str(res.dump / "ranks"),
        "--tee",
        "3",
        "--local-ranks-filter=0",
        "-m",
        "amuse_dist.train",
        *args,
    ]
    log = res.dump / "train.log"
    (res.dump / "command.txt").write_text(" ".join(cmd) + "\n")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(
                cmd, cwd=REPO, env=run_env(gpu), stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            )
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout} s"
    res.wall_s = time.perf_counter() - t0
    meta = {"lr": res.lr, "wall_s": res.wall_s, "rc": str(rc)}
    (res.dump / "convergence_run.json").write_text(json.dumps(meta) + "\n")
    if rc != 0:
        res.ok = False
        res.error = f"exit {rc}"


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


# ------------------------------------------------------------------------------------- reading
def read_tb(dump: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} for the validation tags of every event file under ``<dump>/tb``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for f in sorted(dump.glob("tb/**/events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in (X_TAG, Y_TAG, MAIN_TAG):
            if tag in acc.Tags()["scalars"]:
                out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def collect(res: Result) -> None:
    meta_path = res.dump / "convergence_run.json"
    if res.wall_s is None and meta_path.exists():  # --no-train: what the run was launched with
        meta = json.loads(meta_path.read_text())
        res.lr, res.wall_s = float(meta["lr"]), float(meta["wall_s"])
        if meta.get("rc", "0") != "0":
            res.ok, res.error = False, f"exit {meta['rc']}"
    tags = read_tb(res.dump)
    res.x = tags.get(X_TAG, {})
    res.y = tags.get(Y_TAG) or ({} if X_TAG in tags else tags.get(MAIN_TAG, {}))
    if not res.curve and res.ok:
        res.ok = False
        res.error = "no validation loss in the TensorBoard events"


# ------------------------------------------------------------------------------------- writing
def write_csv(results: list[Result], path: Path, tokens_per_step: int) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optimizer", "step", "tokens", "val_loss", "weights"])
        for r in results:
            for weights, curve in (("x", r.x), ("y", r.y)):
                for step in sorted(curve):
                    w.writerow(
                        [r.spec.key, step, step * tokens_per_step, f"{curve[step]:.6f}", weights]
                    )


def plot(results: list[Result], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    finite: list[float] = []  # every evaluation but each curve's first (step 1)
    first: list[float] = []
    for r in results:
        if not r.curve:
            continue
        color = COLORS.get(r.spec.key)
        steps = sorted(r.curve)
        vals = [r.curve[s] for s in steps]
        finite += [v for v in vals[1:] if math.isfinite(v)]
        first += [v for v in vals[:1] if math.isfinite(v)]
        label = r.spec.label + (" at X" if r.x else "")
        ax.plot(steps, vals, marker="o", ms=3, lw=1.8, color=color, label=label)
        if r.x and r.y:
            ys = sorted(r.y)
            ax.plot(
                ys,
                [r.y[s] for s in ys],
                ls="--",
                lw=1.0,
                alpha=0.7,
                color=color,
                label=r.spec.label + " at Y",
            )
    if finite:  # the step-1 evaluations (near ln(vocab)) would squash the rest of the plot
        lo, hi = min(finite), max(finite)
        pad = 0.05 * (hi - lo + 1e-3)
        ax.set_ylim(lo - pad, hi + pad)
        if first and max(first) > hi + pad:
            ax.annotate(
                f"step 1 (off scale): {min(first):.2f}-{max(first):.2f}",
                xy=(0.01, 0.99),
                xycoords="axes fraction",
                va="top",
                fontsize=8,
                color="0.3",
                bbox={"facecolor": "white", "edgecolor": "0.8", "pad": 2},
            )
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(results: list[Result]) -> str:
    head = (
        f"| {'optimizer':<20} | {'lr':>7} | {'weights':>7} | {'final val loss':>14} "
        f"| {'best val loss':>13} | {'final at Y':>10} | {'wall time':>9} |"
    )
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in results:
        curve = r.curve
        if curve:
            last = curve[max(curve)]
            final, best = f"{last:.4f}", f"{min(curve.values()):.4f}"
        else:
            final = best = "-"
        final_y = f"{r.y[max(r.y)]:.4f}" if r.x and r.y else "-"
        wall = f"{r.wall_s:.0f} s" if r.wall_s is not None else "-"
        if not r.ok:
            final = f"FAILED ({r.error})" if not curve else f"{final} (FAILED)"
        lines.append(
            f"| {r.spec.label:<20} | {r.lr:>7.0e} | {r.weights if curve else '-':>7} "
            f"| {final:>14} | {best:>13} | {final_y:>10} | {wall:>9} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="GPU-sized run (124M, all local GPUs)")
    p.add_argument("--steps", type=int, default=None, help="training steps (CPU 200, GPU 3000)")
    p.add_argument("--val-freq", type=int, default=None, help="validate every K steps")
    p.add_argument("--val-steps", type=int, default=None, help="validation batches per rank")
    p.add_argument("--nproc", type=int, default=None, help="ranks (CPU 2, GPU: all GPUs)")
    p.add_argument("--flavor", default=None, help="model flavor (CPU tiny, GPU 124M)")
    p.add_argument(
        "--optimizers", nargs="+", choices=list(RUNS), default=list(RUNS), help="subset to run"
    )
    p.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="NAME=LR",
        help="override one run's learning rate, e.g. --lr adamw=1e-3 (repeatable)",
    )
    p.add_argument("--out-dir", type=Path, default=REPO / "docs", help="CSV and PNG go here")
    p.add_argument(
        "--runs-dir",
        type=Path,
        default=REPO / "outputs" / "convergence",
        help="dump folders, one per run",
    )
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument(
        "--no-train", action="store_true", help="re-read existing runs; only write CSV and plot"
    )
    return p.parse_args(argv), passthrough


def main(argv: Sequence[str] | None = None) -> int:
    args, passthrough = parse_args(argv)
    prof = GPU if args.gpu else CPU
    if args.flavor:
        prof = Profile(**{**prof.__dict__, "flavor": args.flavor})
    steps = args.steps or prof.steps
    val_freq = args.val_freq or (prof.val_freq if args.steps is None else max(1, steps // 8))
    prof = Profile(
        **{**prof.__dict__, "val_freq": val_freq, "val_steps": args.val_steps or prof.val_steps}
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
    lrs: dict[str, float] = {}
    for item in args.lr:
        name, _, value = item.partition("=")
        if name not in RUNS or not value:
            print(f"--lr {item}: expected NAME=LR with NAME in {', '.join(RUNS)}", file=sys.stderr)
            return 2
        lrs[name] = float(value)
    tokens_per_step = prof.local_batch_size * prof.seq_len * nproc
    device = "GPU" if args.gpu else "CPU"
    print(
        f"convergence: flavor {prof.flavor}, {steps} steps, {nproc} {device} ranks, "
        f"{tokens_per_step} tokens/step, validation every {prof.val_freq} steps "
        f"({prof.val_steps} batches/rank)",
        flush=True,
    )

    results: list[Result] = []
    for key in args.optimizers:
        spec = RUNS[key]
        lr = lrs.get(key, spec.gpu_lr if args.gpu else spec.cpu_lr)
        res = Result(spec=spec, dump=args.runs_dir.resolve() / key, lr=lr)
        results.append(res)
        if not args.no_train:
            targs = trainer_args(spec, prof, steps, lr, res.dump, passthrough)
            print(f"[{key}] {spec.label}, lr {lr:g} ...", flush=True)
            launch(res, targs, nproc, args.gpu, args.timeout)
        collect(res)
        if not res.ok:
            print(f"[{key}] FAILED: {res.error}; log tails:")
            print(failure_report(res.dump), flush=True)
        elif res.curve:
            s = max(res.curve)
            wall = f"{res.wall_s:.0f} s" if res.wall_s is not None else "-"
            print(
                f"[{key}] done in {wall}: val loss {res.curve[s]:.4f} at step {s} "
                f"({res.weights.upper()})",
                flush=True,
            )

    args.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = args.out_dir / "convergence.csv", args.out_dir / "convergence.png"
    write_csv(results, csv_path, tokens_per_step)
    title = (
        f"Llama {prof.flavor}, {nproc} {device} ranks, {steps} steps x {tokens_per_step} tokens, "
        f"seed 0 (X: averaged weights, Y: training weights)"
    )
    plot(results, png_path, title)
    print(f"\nwrote {csv_path} and {png_path}\n")
    print(table(results))
    failed = [r.spec.key for r in results if not r.ok]
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
