"""End-to-end runs of torchtitan's real Trainer on 2 CPU ranks (gloo) through amuse_dist.train.

Each run is ~10 steps of the tiny debug model (about 20-30 s, mostly torchrun start-up).
"""

import math
from pathlib import Path

import pytest
import torch

from tests._titan import debug_args, tb_by_step, tb_scalars, torchrun

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def amuse_run(straight: Path) -> tuple[Path, dict]:
    """The shared straight AMUSE run (tests/conftest.py): 20 steps on 2 ranks."""
    return straight, tb_by_step(straight, "loss_metrics/global_avg_loss")


def test_amuse_loss_finite_and_decreasing(amuse_run: tuple[Path, dict]) -> None:
    _, loss = amuse_run
    assert sorted(loss) == list(range(1, 21)), loss
    assert all(math.isfinite(v) for v in loss.values()), loss
    first, last3 = loss[1], sum(loss[s] for s in (18, 19, 20)) / 3
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
        assert all(math.isfinite(v) for v in tags[tag].values()), (tag, tags[tag])
    assert len(tags["amuse/beta"]) == 20
    assert "validation_metrics/loss" in tags


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
