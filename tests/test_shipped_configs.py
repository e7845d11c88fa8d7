"""Every config in train_configs/ as it ships (compile, activation checkpointing, mixed precision,
parallelism), shrunk to CPU size (tests/shipped.py), on 2 gloo ranks, and the issue's
reproduction (debug_cpu.toml with compile and each activation-checkpointing mode, on 1 and 2
ranks): each trains, writes step-2 and step-4 with X exports, amuse-eval of each export equals
the validator's loss at those weights (evaluated on the training's ranks, as amuse-eval does it),
and a resume from step-2 reproduces steps 3 and 4. One torchrun per rank count runs every job
(tests/workers/trainer_jobs.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from amuse_dist.optim import registry
from tests._titan import REPO, run_worker, tb_by_step
from tests.shipped import STEPS, Job, jobs, read, shipped_configs

pytestmark = pytest.mark.e2e

JOBS = jobs()
WORKER = REPO / "tests" / "workers" / "trainer_jobs.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Token shards of a small slice of the offline corpus, and its tokenizer (vocab 2048)."""
    from amuse_dist.data.corpus import build_builtin

    built = build_builtin(tmp_path_factory.mktemp("shipped_data"), 2048, max_bytes=600_000)
    return built.shards, built.tokenizer


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, shards: tuple[Path, Path]) -> Path:
    """Every job trained and resumed: one worker launch per rank count."""
    root = tmp_path_factory.mktemp("shipped")
    results: dict[str, dict] = {}
    for nproc in sorted({j.nproc for j in JOBS}):
        spec = [e for j in JOBS if j.nproc == nproc for e in j.worker_jobs(root, *shards)]
        (root / f"jobs{nproc}.json").write_text(json.dumps(spec))
        args = ["--jobs", str(root / f"jobs{nproc}.json")]
        gathered = run_worker(
            WORKER, nproc, args, root / f"worker{nproc}.pt", timeout=1800, fresh=True
        )  # as users start them: real torchrun and interpreters
        results.update(gathered[0])
    (root / "results.json").write_text(json.dumps(results, indent=1))
    return root


def test_the_folder_has_the_shipped_configs() -> None:
    names = {c.stem for c in shipped_configs()}
    assert {"debug_cpu", "llama3_124m", "llama3_8b", "adamw_124m"} <= names, names


@pytest.mark.parametrize("job", JOBS, ids=[j.name for j in JOBS])
def test_shipped_config(job: Job, runs: Path) -> None:
    results = json.loads((runs / "results.json").read_text())
    result = results[job.name]
    assert result["error"] is None, f"{job.name}:\n{result['error']}"
    resume_error = results[f"{job.name}/resumed"]["error"]
    assert resume_error is None, f"{job.name} resumed:\n{resume_error}"
    straight, resumed = runs / job.name / "straight", runs / job.name / "resumed"
    ckpt = straight / "checkpoint"
    steps = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step-"))
    assert steps == ["step-2", "step-4"]
    for step in (2, 4):
        info = json.loads((ckpt / f"step-{step}" / "x" / "amuse_export.json").read_text())
        assert info["step"] == step

    # amuse-eval of each step (its DCP state and its export) equals what the validator logged
    averaging = registry.get(read(job.config)["optimizer"]["name"]).averaging
    logged = tb_by_step(straight, "validation_x/loss" if averaging else "validation_y/loss")
    rows = result["eval"]
    assert sorted((r["source"], r["step"]) for r in rows) == [
        ("dcp", 2), ("dcp", 4), ("export", 2), ("export", 4)
    ], rows  # fmt: skip
    for r in rows:
        assert r["weights"] == ("x" if averaging else "y"), r
        assert r["loss"] == pytest.approx(logged[r["step"]], rel=1e-5, abs=1e-5), (r, logged)

    # the resume from step-2 reproduces steps 3 and 4
    want = tb_by_step(straight, "loss_metrics/global_avg_loss")
    assert sorted(want) == list(range(1, STEPS + 1)), want
    assert all(math.isfinite(v) for v in want.values()), want
    again = tb_by_step(resumed, "loss_metrics/global_avg_loss")
    for step in range(3, STEPS + 1):
        assert again[step] == pytest.approx(want[step], rel=1e-5), (step, again, want)
    assert (resumed / "checkpoint" / "step-4" / "x").is_dir()
