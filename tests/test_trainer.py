"""End-to-end runs of torchtitan's real Trainer on 2 CPU ranks (gloo) through amuse_dist.train.

Each run is ~10 steps of the tiny debug model (about 20-30 s, mostly torchrun start-up).
"""

import math
import shutil
from pathlib import Path

import pytest
import torch

from tests._titan import debug_args, losses, tb_scalars, torchrun


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One corpus + tokenizer build shared by every run in this module."""
    return tmp_path_factory.mktemp("assets")


@pytest.fixture(scope="module")
def amuse_run(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> tuple[Path, dict]:
    dump = tmp_path_factory.mktemp("amuse")
    proc = torchrun(2, debug_args(dump, assets, steps=10), dump)
    return dump, losses(proc.stdout + proc.stderr)


def test_amuse_loss_finite_and_decreasing(amuse_run: tuple[Path, dict]) -> None:
    _, loss = amuse_run
    assert sorted(loss) == list(range(1, 11)), loss
    assert all(math.isfinite(v) for v in loss.values()), loss
    first, last3 = loss[1], sum(loss[s] for s in (8, 9, 10)) / 3
    assert last3 < first - 0.1, loss


def test_amuse_tensorboard(amuse_run: tuple[Path, dict]) -> None:
    dump, _ = amuse_run
    tags = tb_scalars(dump)
    for tag in (
        "loss_metrics/global_avg_loss",
        "grad_norm",
        "lr",
        "throughput(tps)",
        "amuse/beta",
        "amuse/c",
        "amuse/update_rms_muon",
        "amuse/update_rms_adamw",
    ):
        assert tag in tags, sorted(tags)
        assert all(math.isfinite(v) for v in tags[tag]), (tag, tags[tag])
    assert len(tags["amuse/beta"]) == 10
    assert "validation_metrics/loss" in tags


def test_amuse_checkpoint_resume_matches(
    amuse_run: tuple[Path, dict], tmp_path: Path, assets: Path
) -> None:
    """Resume from the step-5 checkpoint and replay steps 6-10: same losses as the straight run
    (optimizer state goes through OptimizersContainer's get/set_optimizer_state_dict)."""
    dump, straight = amuse_run
    assert (dump / "checkpoint" / "step-5").is_dir(), list((dump / "checkpoint").iterdir())
    resumed_dump = tmp_path / "resumed"
    shutil.copytree(dump / "checkpoint" / "step-5", resumed_dump / "checkpoint" / "step-5")
    proc = torchrun(2, debug_args(resumed_dump, assets, steps=10), tmp_path)
    resumed = losses(proc.stdout + proc.stderr)
    assert sorted(resumed) == list(range(6, 11)), resumed
    for s in range(6, 11):
        assert resumed[s] == pytest.approx(straight[s], rel=1e-5, abs=1e-5), (s, resumed, straight)


@pytest.mark.parametrize("name", ["AdamW", "Muon", "ScheduleFreeAdamW"])
def test_baselines_run(name: str, tmp_path: Path, assets: Path) -> None:
    extra: dict[str, object] = {"optimizer__name": name, "checkpoint__enable": False}
    if name == "AdamW":
        extra.update(
            optimizer__lr=1e-3, lr_scheduler__warmup_steps=2, lr_scheduler__decay_ratio=0.5
        )
    elif name == "Muon":
        extra.update(
            optimizer__lr=2e-3, lr_scheduler__warmup_steps=2, lr_scheduler__decay_ratio=0.5
        )
    else:
        extra.update(optimizer__lr=2e-3, amuse__warmup_steps=5)
    proc = torchrun(2, debug_args(tmp_path, assets, steps=8, **extra), tmp_path)
    loss = losses(proc.stdout + proc.stderr)
    assert sorted(loss) == list(range(1, 9)), loss
    assert all(math.isfinite(v) for v in loss.values()), loss
    assert loss[8] < loss[1], loss
    assert tb_scalars(tmp_path)["loss_metrics/global_avg_loss"]


def test_init_independent_of_world_size(tmp_path: Path, assets: Path) -> None:
    """Full model after init is bitwise identical on 1 and 2 ranks, and shards differ (the CPU
    DTensor bug gave every rank the same shard)."""
    states = {}
    for n in (1, 2):
        out = tmp_path / f"init_{n}.pt"
        torchrun(
            n,
            debug_args(tmp_path / f"run{n}", assets, steps=1, checkpoint__enable=False),
            tmp_path,
            extra_env={"AMUSE_DUMP_INIT_STATE": str(out)},
        )
        states[n] = torch.load(out)
    assert states[1].keys() == states[2].keys()
    for k in states[1]:
        assert torch.equal(states[1][k], states[2][k]), k
    emb = states[2]["tok_embeddings.weight"]
    half = emb.shape[0] // 2
    assert not torch.equal(emb[:half], emb[half : 2 * half])
