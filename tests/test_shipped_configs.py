"""Every config in train_configs/ as it ships (compile, activation checkpointing, mixed precision,
parallelism), shrunk to CPU size (tests/shipped.py), on 2 gloo ranks: it trains, writes step-2 and
step-4 with X exports, amuse-eval of each equals the validator's loss at X, and a resume from
step-2 reproduces step 4. One torchrun runs every config (tests/workers/shipped_worker.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from amuse_dist.optim import registry
from tests._titan import REPO, env, run_worker, tb_by_step, torchrun_cmd
from tests.shipped import STEPS, read, shipped_configs

pytestmark = pytest.mark.e2e

CONFIGS = shipped_configs()
WORKER = REPO / "tests" / "workers" / "shipped_worker.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Token shards of a small slice of the offline corpus, and its tokenizer (vocab 2048)."""
    from amuse_dist.data.prepare import prepare
    from amuse_dist.titan.data import prepare_assets

    root = tmp_path_factory.mktemp("shipped_data")
    corpus, tokenizer = prepare_assets(root / "assets", 2048, max_bytes=600_000)
    out = root / "shards"
    prepare(out, tokenizer, input_dir=corpus, shard_tokens=50_000, progress=False)
    return out, tokenizer


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, shards: tuple[Path, Path]) -> Path:
    root = tmp_path_factory.mktemp("shipped")
    args = ["--configs", *map(str, CONFIGS), "--root", str(root)]
    args += ["--shards", str(shards[0]), "--tokenizer", str(shards[1])]
    run_worker(WORKER, 2, args, root / "worker.pt", timeout=1500)
    return root


@pytest.fixture(scope="module")
def evals(runs: Path) -> dict[str, list[dict]]:
    """amuse-eval of every straight run's X exports (each step), on the training's 2 ranks: with
    bf16 compute the loss follows the per-rank batch shape, so the rank count must match for
    equality (fp32 configs match on any rank count, tests/test_token_shards.py)."""
    out: dict[str, list[dict]] = {}
    for config in CONFIGS:
        run, res = runs / config.stem / "straight", runs / config.stem / "amuse_eval"
        target = ["-m", "amuse_dist.eval", str(run), "--source", "export", "--out", str(res)]
        cmd = torchrun_cmd(2, *target, "--no-progress")
        proc = subprocess.run(cmd, cwd=REPO, env=env(runs), capture_output=True, text=True)
        if proc.returncode:
            out[config.stem] = [{"error": (proc.stdout + proc.stderr)[-4000:]}]
        else:
            out[config.stem] = json.loads(res.with_suffix(".json").read_text())
    return out


def test_the_folder_has_the_shipped_configs() -> None:
    names = {c.stem for c in CONFIGS}
    assert {"debug_cpu", "llama3_124m", "llama3_8b", "adamw_124m"} <= names, names


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_config(config: Path, runs: Path, evals: dict[str, list[dict]]) -> None:
    error = json.loads((runs / "results.json").read_text())[config.stem]
    assert error is None, f"{config.name}:\n{error}"
    straight, resumed = runs / config.stem / "straight", runs / config.stem / "resumed"
    ckpt = straight / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step-")) == [
        "step-2",
        "step-4",
    ]
    for step in (2, 4):
        info = json.loads((ckpt / f"step-{step}" / "x" / "amuse_export.json").read_text())
        assert info["step"] == step

    # amuse-eval of each step's export equals what the validator logged for those weights
    rows = evals[config.stem]
    assert "error" not in rows[0], rows[0].get("error")
    averaging = registry.get(read(config)["optimizer"]["name"]).averaging
    tag = "validation_x/loss" if averaging else "validation_y/loss"
    logged = tb_by_step(straight, tag)
    got = {r["step"]: r["loss"] for r in rows}
    assert set(got) == {2, 4}, rows
    for step in (2, 4):
        assert got[step] == pytest.approx(logged[step], rel=1e-5, abs=1e-5), (step, got, logged)

    # the resume from step-2 reproduces steps 3 and 4
    want = tb_by_step(straight, "loss_metrics/global_avg_loss")
    again = tb_by_step(resumed, "loss_metrics/global_avg_loss")
    for step in range(3, STEPS + 1):
        assert again[step] == pytest.approx(want[step], rel=1e-5), (step, again, want)
    assert (resumed / "checkpoint" / "step-4" / "x").is_dir()
