"""One command for a GPU machine: the ``gpu`` tests, then the GPU figures, in one process tree.

    python benchmarks/gpu_check.py --out DIR [--budget 360] [--dry-run]

On a bare machine with torch + CUDA and no network (the missing wheels carried, docs/usage.md),
in this order, each part time-boxed inside ``--budget`` seconds (a part that does not fit is
recorded as skipped, with the reason):

1. data: the offline corpus (Python's stdlib sources), a BPE tokenizer trained on it (vocab 8192)
   and its token shards, built with the project's own code under ``DIR/data`` (no download);
2. ``pytest -m gpu tests/test_gpu.py`` (AMUSE on CUDA vs the reference; the trainer on one GPU
   with compile + bf16 through checkpoint, X export, amuse-eval, HF generate and resume);
3. Newton-Schulz TF/s per shape group (every Muon matrix of the 124M, 1.3B and 8B models, batched
   by shape, as the optimizer runs them) next to a bf16 matmul's TF/s;
4. the optimizer step alone (no process group) for AMUSE, AMUSE with identity NS, Muon and fused
   AdamW on the 124M and 1.3B shapes, median ms, and its peak memory;
5. the trainer (``train_configs/llama3_124m.toml``, ``muon_124m.toml``, ``adamw_124m.toml`` as
   shipped: compile on, bf16 parameters) on one GPU at 32 x 512 and 16 x 2048: tokens/s (median of
   the logged steps after the first ``--skip-logs``) and peak reserved memory.

Writes ``DIR/gpu_check.json`` (everything, with what was skipped) and ``DIR/gpu_check.md`` (the
tables for docs/benchmarks.md). ``--dry-run`` is the CPU version the suite runs: tiny shapes, the
tiny model for 4 steps without compile (only the AMUSE run trains; the Muon and AdamW commands are
parsed by the trainer's parser), the gpu tests collected and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (str(REPO), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# Tiny arguments for tests/test_benchmarks.py ({tmp}: scratch, {assets}: corpus/tokenizer folder).
SMOKE = {"main": ["--dry-run", "--out", "{tmp}", "--assets", "{assets}"]}

CONFIGS = {
    "AMUSE": "llama3_124m.toml",
    "Muon": "muon_124m.toml",
    "AdamW (fused)": "adamw_124m.toml",
}
# (local batch, seq_len, steps); the first logged steps include compile and are skipped
GPU_SHAPES = ((32, 512, 60), (16, 2048, 40))
DRY_SHAPES = ((2, 64, 4),)
# rough seconds per part on one H100/H200 (start-up and compile included), for the time-box
EXPECTED_S = {"tests": 150, "ns": 20, "step": 40, "trainer": 35}


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Clock:
    """The overall time-box: every part asks for its share before it starts."""

    budget: float
    start: float = field(default_factory=time.perf_counter)
    skipped: list[str] = field(default_factory=list)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def fits(self, what: str, need: float) -> bool:
        if self.left() >= need:
            return True
        self.skipped.append(f"{what}: needs ~{need:.0f} s, {max(0.0, self.left()):.0f} s left")
        log(f"skipped {self.skipped[-1]}")
        return False


def env_for_children(data: dict[str, str]) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), e.get("PYTHONPATH", "")) if p)
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **data)
    return e


# ------------------------------------------------------------------------------------- 1. data
def build_data(root: Path, vocab: int, assets: Path | None) -> dict[str, str]:
    """Corpus, tokenizer and token shards from the project's offline code; their paths."""
    from amuse_dist.data.corpus import build_builtin

    built = build_builtin(assets or root / "assets", vocab)  # reused when already built
    return {"AMUSE_GPU_TOKENIZER": str(built.tokenizer), "AMUSE_GPU_SHARDS": str(built.shards)}


# ------------------------------------------------------------------------------- 2. gpu tests
def gpu_tests(data: dict[str, str], out: Path, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-rs"]
    cmd += ["--junitxml", str(out / "gpu_tests.xml")]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            env=env_for_children(data),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout:.0f} s", -1
    (out / "gpu_tests.log").write_text(str(text))
    summary = [line for line in str(text).splitlines() if line.strip()][-1:] or [""]
    log(f"gpu tests: exit {rc}, {summary[0]}")
    return dict(returncode=rc, summary=summary[0], wall_s=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------- 3. NS TF/s
def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn`` (synchronized)."""
    times = []
    for i in range(warmup + repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def muon_shapes(shapes: str) -> list[tuple[int, int]]:
    """(out, in) of every Muon matrix of the optimizer_step shape set (amuse_dist's flavors)."""
    from optimizer_step import build_model

    from amuse_dist import param_groups

    model = build_model(shapes)
    return [tuple(p.shape) for g in param_groups(model) if g["use_muon"] for _, p in g["params"]]


def ns_section(device: str, shape_sets: Sequence[str], matmul_n: int, clock: Clock) -> dict:
    import torch

    from amuse_dist.optim.base import NewtonSchulz

    a = torch.randn(matmul_n, matmul_n, device=device, dtype=torch.bfloat16)
    b = torch.randn(matmul_n, matmul_n, device=device, dtype=torch.bfloat16)
    mm_s = timed(lambda: a @ b, device, 1 if device == "cpu" else 3, 2 if device == "cpu" else 10)
    matmul = dict(n=matmul_n, ms=mm_s * 1e3, tflops=2 * matmul_n**3 / mm_s / 1e12)
    log(f"bf16 matmul {matmul_n}^3: {matmul['tflops']:.3g} TF/s")
    kernels = ["eager", "triton"] if device == "cuda" else ["eager"]
    rows = []
    for kernel, shapes in ((k, s) for k in kernels for s in shape_sets):
        ns = NewtonSchulz(kernel=kernel)
        if clock.left() < 5:
            clock.skipped.append(f"NS {kernel} {shapes}: out of time")
            continue
        groups: dict[tuple[int, int], int] = {}
        for s in muon_shapes(shapes):
            groups[s] = groups.get(s, 0) + 1
        total_s, total_f = 0.0, 0.0
        for (r, c), count in sorted(groups.items()):
            batch = torch.randn(count, r, c, device=device, dtype=torch.bfloat16)
            sec = timed(lambda b=batch, f=ns: f(b), device, 1, 1 if device == "cpu" else 5)
            flops = ns.flops(r, c) * count
            total_s, total_f = total_s + sec, total_f + flops
            rows.append(
                dict(
                    kernel=kernel,
                    shapes=shapes,
                    matrix=f"{r}x{c}",
                    count=count,
                    ms=sec * 1e3,
                    tflops=flops / sec / 1e12,
                    vs_matmul=flops / sec / 1e12 / matmul["tflops"],
                )
            )
            del batch
        rows.append(
            dict(
                kernel=kernel,
                shapes=shapes,
                matrix="all",
                count=sum(groups.values()),
                ms=total_s * 1e3,
                tflops=total_f / total_s / 1e12,
                vs_matmul=total_f / total_s / 1e12 / matmul["tflops"],
            )
        )
        log(
            f"NS {kernel} {shapes}: all matrices once {total_s * 1e3:.1f} ms, {rows[-1]['tflops']:.3g} TF/s"
        )
    if device == "cuda":
        torch.cuda.empty_cache()
    return dict(matmul=matmul, groups=rows)


# ------------------------------------------------------------------------- 4. optimizer step
def make_step_optimizer(name: str, model: Any) -> Any:
    from optimizer_step import local_optimizer

    from amuse_dist import Muon, param_groups

    if name == "muon":
        return Muon(param_groups(model), lr=2e-3, weight_decay=0.1)
    if name == "amuse_identity_ns":
        return local_optimizer("amuse", model)
    return local_optimizer(name, model)  # "amuse+ns" (real NS), "adamw_fused"


STEP_OPTIMIZERS = ("amuse+ns", "amuse_identity_ns", "muon", "adamw_fused")


def step_section(device: str, shape_sets: Sequence[str], repeats: int, clock: Clock) -> list[dict]:
    """One optimizer alive at a time (the 1.3B states of four would crowd the GPU)."""
    import torch
    from optimizer_step import build_model, fill

    rows = []
    for shapes in shape_sets:
        for name in STEP_OPTIMIZERS:
            if clock.left() < 5:
                clock.skipped.append(f"step {shapes} {name}: out of time")
                continue
            model = fill(build_model(shapes), device)
            opt = make_step_optimizer(name, model)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sec = timed(opt.step, device, 1 if device == "cpu" else 3, repeats)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            rows.append(dict(shapes=shapes, optimizer=name, ms=sec * 1e3, peak_gib=peak))
            log(f"step {shapes} {name}: {sec * 1e3:.2f} ms")
            del model, opt
            if device == "cuda":
                torch.cuda.empty_cache()
        fused = next(
            (r["ms"] for r in rows if r["shapes"] == shapes and "fused" in r["optimizer"]), 0
        )
        for r in rows:
            if r["shapes"] == shapes and fused:
                r["vs_adamw_fused"] = r["ms"] / fused
    return rows


# ---------------------------------------------------------------------------------- 5. trainer
def trainer_argv(
    config: str,
    dump: Path,
    data: dict[str, str],
    batch: int,
    seq: int,
    steps: int,
    dry: bool,
) -> list[str]:
    """The shipped config as a user runs it, on the local tokenizer and shards, for ``steps``."""
    argv = ["--job.config_file", str(REPO / "train_configs" / config)]
    argv += ["--job.dump_folder", str(dump)]
    argv += ["--model.hf_assets_path", data["AMUSE_GPU_TOKENIZER"]]
    argv += ["--training.dataset_path", data["AMUSE_GPU_SHARDS"]]
    argv += ["--training.steps", str(steps), "--training.seq_len", str(seq)]
    argv += ["--training.local_batch_size", str(batch), "--training.global_batch_size", str(batch)]
    argv += ["--metrics.log_freq", "1" if dry else "5"]
    argv += ["--checkpoint.no-enable", "--validation.no-enable"]
    if dry:
        argv += ["--model.flavor", "tiny", "--compile.no-enable"]
    return argv


def trainer_run(argv: list[str], data: dict[str, str], timeout: float, dry: bool) -> dict:
    from amuse_dist.titan.launch import torchrun_command

    cmd = torchrun_command(1, "-m", "amuse_dist.train", *argv, rank0_output=False)
    env = env_for_children(data)
    if dry:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    dump = Path(argv[argv.index("--job.dump_folder") + 1])
    dump.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        with open(dump / "train.log", "w") as f:
            rc = subprocess.run(
                cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
    except subprocess.TimeoutExpired:
        rc = -1
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = (dump / "train.log").read_text(errors="replace").splitlines()[-15:]
        return dict(returncode=rc, wall_s=wall, error="\n".join(tail))
    from amuse_dist.plot import read_scalars

    tags = read_scalars(dump / "tb")
    tps = [v for _, v in sorted(tags.get("throughput(tps)", {}).items())]
    mem = tags.get("memory/max_reserved(GiB)", {})
    kept = tps[1:] if len(tps) > 1 else tps  # the first log holds the compile
    return dict(
        returncode=0,
        wall_s=wall,
        tokens_per_s=statistics.median(kept) if kept else None,
        tokens_per_s_all=tps,
        peak_reserved_gib=max(mem.values()) if mem else None,
    )


def trainer_section(data: dict[str, str], root: Path, dry: bool, clock: Clock) -> list[dict]:
    rows = []
    shapes = DRY_SHAPES if dry else GPU_SHAPES
    for batch, seq, steps in shapes:
        for opt, config in CONFIGS.items():
            dump = root / "runs" / f"{config.removesuffix('.toml')}_{batch}x{seq}"
            argv = trainer_argv(config, dump, data, batch, seq, steps, dry)
            row: dict[str, Any] = dict(optimizer=opt, config=config, batch=batch, seq_len=seq)
            if dry and opt != "AMUSE":  # the command must still parse
                from amuse_dist.titan.config import parse_job_config

                parse_job_config(argv)
                row["note"] = "dry run: command parsed, not trained"
                rows.append(row)
                continue
            if not clock.fits(f"trainer {opt} {batch}x{seq}", EXPECTED_S["trainer"]):
                continue
            row.update(trainer_run(argv, data, min(clock.left(), 300), dry))
            if row["returncode"] != 0:
                log(f"trainer {opt} {batch}x{seq} FAILED:\n{row['error']}")
            else:
                log(f"trainer {opt} {batch}x{seq}: {row['tokens_per_s']} tokens/s")
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ report
def fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"Device: {env['device']}; torch {env['torch']}; CUDA {env['cuda']}; "
        f"{env['cpus']} CPUs; {'DRY RUN (CPU, tiny shapes)' if report['dry_run'] else 'GPU'}; "
        f"total {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget.",
        "",
        f"gpu tests: {report.get('gpu_tests', {}).get('summary', 'not run')}",
        "",
        "| optimizer | config | batch x seq | tokens/s | peak reserved GiB |",
        "|---|---|---|---|---|",
    ]
    for r in report.get("trainer", []):
        tps = r.get("tokens_per_s")
        cell = fmt(tps, ",.0f") if r.get("returncode", 0) == 0 else "FAILED"
        if "note" in r:
            cell = r["note"]
        lines.append(
            f"| {r['optimizer']} | {r['config']} | {r['batch']} x {r['seq_len']} | {cell} "
            f"| {fmt(r.get('peak_reserved_gib'), '.2f')} |"
        )
    lines += [
        "",
        "| shapes | optimizer step | ms (median) | x fused AdamW | peak allocated GiB |",
        "|---|---|---|---|---|",
    ]
    for r in report.get("step", []):
        lines.append(
            f"| {r['shapes']} | {r['optimizer']} | {r['ms']:.2f} | {fmt(r.get('vs_adamw_fused'), '.2f')} "
            f"| {fmt(r.get('peak_gib'), '.2f')} |"
        )
    ns = report.get("ns")
    if ns:
        mm = ns["matmul"]
        lines += [
            "",
            f"bf16 matmul {mm['n']}^3: {mm['tflops']:.3g} TF/s ({mm['ms']:.2f} ms)",
            "",
            "NS5-equivalent rate: the standard NS5 FLOP count over the time, whichever kernel ran"
            " (the triton kernel does about 2/3 of those FLOPs).",
            "",
            "| kernel | shapes | NS5 matrix | count | ms (batched) | TF/s | x bf16 matmul |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in ns["groups"]:
            lines.append(
                f"| {r['kernel']} | {r['shapes']} | {r['matrix']} | {r['count']} "
                f"| {r['ms']:.2f} "
                f"| {r['tflops']:.3g} | {r['vs_matmul']:.2f} |"
            )
    if report["skipped"]:
        lines += ["", "Skipped: " + "; ".join(report["skipped"])]
    return "\n".join(lines) + "\n"


def environment(device: str) -> dict[str, Any]:
    import torch

    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "CPU"
    return dict(
        device=name,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        cpus=os.cpu_count(),
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON, table and logs")
    p.add_argument("--budget", type=float, default=360.0, help="seconds for everything")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (the suite runs it)")
    p.add_argument("--assets", type=Path, default=None, help="corpus/tokenizer folder to reuse")
    p.add_argument("--skip-tests", action="store_true", help="do not run the gpu tests")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from amuse_dist.titan import launch

    launch.setup_device()  # before torchtitan is imported
    import torch

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --dry-run on a CPU machine", file=sys.stderr)
        return 2
    device = "cpu" if dry else "cuda"
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.budget)
    report: dict[str, Any] = dict(
        dry_run=dry, budget_s=args.budget, environment=environment(device), skipped=clock.skipped
    )
    data = build_data(out / "data", 2048 if dry else 8192, args.assets)
    log(f"data ready: {data}")
    if args.skip_tests:
        clock.skipped.append("gpu tests: --skip-tests")
    elif clock.fits("gpu tests", 30 if dry else EXPECTED_S["tests"]):
        report["gpu_tests"] = gpu_tests(data, out, max(60.0, clock.left() - 150))
    # the trainer runs are the costliest part: NS and the optimizer step first, in-process
    if clock.fits("NS", 5 if dry else EXPECTED_S["ns"]):
        sets = ["tiny"] if dry else ["124m", "1.3b", "8b"]
        report["ns"] = ns_section(device, sets, 64 if dry else 8192, clock)
    if clock.fits("optimizer step", 5 if dry else EXPECTED_S["step"]):
        sets = ["tiny"] if dry else ["124m", "1.3b"]
        report["step"] = step_section(device, sets, 1 if dry else 10, clock)
    report["trainer"] = trainer_section(data, out, dry, clock)
    report["wall_s"] = time.perf_counter() - clock.start
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    table = markdown(report)
    (out / "gpu_check.md").write_text(table)
    print(table)
    log(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    failed = [r for r in report["trainer"] if r.get("returncode", 0) != 0]
    tests_failed = report.get("gpu_tests", {}).get("returncode", 0) != 0
    return 1 if failed or tests_failed else 0


if __name__ == "__main__":
    sys.exit(main())
