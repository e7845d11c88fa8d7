"""The real trainer on 2-D meshes (4 CPU ranks, gloo): HSDP 2x2 and FSDP+TP 2x2.

Both layouts train on the same global batch of 8 sequences from the same init, so they give the
same losses; checkpoints resume on their own mesh and across meshes (HSDP 2x2 -> 1-D FSDP 2 ->
HSDP 2x2) to the straight run's losses; the X export of each loads in transformers with
amuse-eval's loss. Five torchrun launches (two straight runs of 8 steps, three resumes) and two
amuse-eval runs share every assertion.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from amuse_dist.titan.config import check_parallelism, parse_job_config
from amuse_dist.titan.export import row_pieces
from tests._titan import (
    DEBUG_TOML,
    amuse_eval,
    debug_args,
    fresh_llama_losses,
    read_x,
    tb_by_step,
    torchrun,
)

STEPS = 8
GLOBAL_BATCH = 8
LOSS = "loss_metrics/global_avg_loss"
# AMUSE (averaging, Muon and AdamW branches): X export, validation at X and the owner-wise exchange
# on each mesh. X_REL bounds the relative Frobenius distance between X exports of different
# layouts: bf16 Newton-Schulz amplifies the layouts' different reduction orders (measured: 1.1e-2
# at step 3, 2.1e-2 at step 8, HSDP vs FSDP+TP, in o_proj; 1-D FSDP 2 differs from both by as much)
# while the losses agree to 1e-5. With ScheduleFreeAdamW (no Muon branch) 1e-4 holds.
OPTIMIZER = {"optimizer__name": "AMUSE", "amuse__warmup_steps": 3}
X_REL = 5e-2
HSDP = {
    "parallelism__data_parallel_replicate_degree": 2,
    "parallelism__data_parallel_shard_degree": 2,
    "training__local_batch_size": GLOBAL_BATCH // 4,
}
FSDP_TP = {
    "parallelism__tensor_parallel_degree": 2,
    "training__local_batch_size": GLOBAL_BATCH // 2,
}
FSDP2 = {"training__local_batch_size": GLOBAL_BATCH // 2}


def mesh_args(dump: Path, assets: Path, mesh: dict, steps: int = STEPS, **extra: object) -> list:
    """debug_cpu.toml on ``mesh``: global batch 8, checkpoints (with X) at 3, 6 and the end."""
    overrides: dict[str, object] = dict(
        training__global_batch_size=GLOBAL_BATCH,
        checkpoint__interval=3,
        validation__freq=4,
        **OPTIMIZER,
        **mesh,
    )
    overrides.update(extra)
    return debug_args(dump, assets, steps=steps, **overrides)


def resume(src: Path, step: int, dump: Path, assets: Path, nproc: int, mesh: dict, steps: int):
    """Copy ``src``'s step-N checkpoint into a fresh run folder and continue it on ``mesh``."""
    shutil.copytree(src / "checkpoint" / f"step-{step}", dump / "checkpoint" / f"step-{step}")
    torchrun(nproc, mesh_args(dump, assets, mesh, steps=steps, validation__enable=False), dump)
    return tb_by_step(dump, LOSS)


@pytest.fixture(scope="module")
def hsdp(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Path:
    dump = tmp_path_factory.mktemp("hsdp")
    torchrun(4, mesh_args(dump, assets, HSDP), dump)
    return dump


@pytest.fixture(scope="module")
def fsdp_tp(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Path:
    dump = tmp_path_factory.mktemp("fsdp_tp")
    torchrun(4, mesh_args(dump, assets, FSDP_TP), dump)
    return dump


def assert_close(got: dict[int, float], ref: dict[int, float], steps: range, rel: float) -> None:
    assert sorted(got) == list(steps), got
    for s in steps:
        assert got[s] == pytest.approx(ref[s], rel=rel), (s, got, ref)


def assert_x_close(a: Path, b: Path) -> None:
    """Two checkpoints' X exports hold the same tensors within X_REL (relative Frobenius)."""
    xa, xb = read_x(a), read_x(b)
    assert xa.keys() == xb.keys()
    far = {k: float((xa[k] - xb[k]).norm() / xa[k].norm()) for k in xa}
    assert max(far.values()) <= X_REL, sorted(far.items(), key=lambda kv: -kv[1])[:4]


@pytest.mark.e2e
def test_layouts_train_alike(hsdp: Path, fsdp_tp: Path) -> None:
    """Same init, same global batch: HSDP 2x2 and FSDP+TP 2x2 give the same losses, the same
    optimizer metrics (update RMS counts replicated pieces once) and validate at X and Y."""
    a, b = tb_by_step(hsdp, LOSS), tb_by_step(fsdp_tp, LOSS)
    assert_close(a, b, range(1, STEPS + 1), rel=1e-5)
    assert a[STEPS] < a[1] - 0.1, a
    for branch, rel in (("adamw", 1e-4), ("muon", 2e-3)):  # muon: bf16 Newton-Schulz
        rms_a = tb_by_step(hsdp, f"amuse/update_rms_{branch}")
        rms_b = tb_by_step(fsdp_tp, f"amuse/update_rms_{branch}")
        if branch == "adamw" or rms_a or rms_b:
            assert_close(rms_a, rms_b, range(1, STEPS + 1), rel=rel)
    for dump in (hsdp, fsdp_tp):
        x = tb_by_step(dump, "validation_x/loss")
        y = tb_by_step(dump, "validation_y/loss")
        assert sorted(x) == sorted(y) == [1, 4, 8], (x, y)
        assert all(math.isfinite(v) for v in [*x.values(), *y.values()])
        assert x[8] != y[8]
    # the exported X of both layouts, q/k head permutation included
    assert_x_close(hsdp / "checkpoint" / "step-8", fsdp_tp / "checkpoint" / "step-8")


@pytest.mark.e2e
def test_fsdp_tp_resume(fsdp_tp: Path, tmp_path: Path, assets: Path) -> None:
    got = resume(fsdp_tp, 6, tmp_path / "resumed", assets, 4, FSDP_TP, STEPS)
    assert_close(got, tb_by_step(fsdp_tp, LOSS), range(7, STEPS + 1), rel=1e-6)


@pytest.mark.e2e
def test_hsdp_to_fsdp_and_back(hsdp: Path, tmp_path: Path, assets: Path) -> None:
    """HSDP 2x2 step 3 resumes on 1-D FSDP 2 to step 6; that checkpoint resumes on HSDP 2x2 to
    step 8: every step's loss is the straight HSDP run's within 1e-5."""
    ref = tb_by_step(hsdp, LOSS)
    fsdp = tmp_path / "on_fsdp2"
    assert_close(resume(hsdp, 3, fsdp, assets, 2, FSDP2, 6), ref, range(4, 7), rel=1e-5)
    back = tmp_path / "back_on_hsdp"
    assert_close(resume(fsdp, 6, back, assets, 4, HSDP, STEPS), ref, range(7, STEPS + 1), rel=1e-5)
    assert_x_close(hsdp / "checkpoint" / "step-8", back / "checkpoint" / "step-8")


@pytest.mark.e2e
@pytest.mark.parametrize("layout", ["hsdp", "fsdp_tp"])
def test_x_export_loads_in_transformers(
    layout: str, request: pytest.FixtureRequest, tmp_path: Path, assets: Path
) -> None:
    """amuse-eval (1 rank, X from the 4-rank DCP state) and transformers' LlamaForCausalLM on
    the exported folder agree to 1e-4."""
    step_dir = request.getfixturevalue(layout) / "checkpoint" / f"step-{STEPS}"
    rows = amuse_eval(step_dir, tmp_path / "eval", tmp_path, "--source", "dcp")
    assert [(r["step"], r["weights"]) for r in rows] == [(STEPS, "x")]
    titan, hf = fresh_llama_losses(step_dir / "x", assets, batches=2)
    assert titan == pytest.approx(rows[0]["loss"], rel=1e-4), (titan, rows[0])
    assert hf == pytest.approx(rows[0]["loss"], rel=1e-4), (hf, rows[0])


@pytest.mark.unit
@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("pipeline_parallel_degree", ["pipeline_parallel_degree = 2", "not supported"]),
        ("context_parallel_degree", ["context_parallel_degree = 2", "not supported"]),
    ],
)
def test_pipeline_and_context_parallel_refused(override: str, needles: list[str]) -> None:
    cfg = parse_job_config(["--job.config_file", str(DEBUG_TOML), f"--parallelism.{override}", "2"])
    errors = "\n".join(check_parallelism(cfg.parallelism, world_size=4))
    assert all(n in errors for n in needles), errors


@pytest.mark.unit
def test_degrees_checked_against_ranks() -> None:
    cfg = parse_job_config(["--job.config_file", str(DEBUG_TOML)])
    par = cfg.parallelism
    assert check_parallelism(par, world_size=4) == []
    par.data_parallel_replicate_degree, par.data_parallel_shard_degree = 2, 2
    assert check_parallelism(par, world_size=4) == []
    (err,) = check_parallelism(par, world_size=8)
    assert "their product must equal the 8 ranks" in err, err
    par.data_parallel_shard_degree, par.tensor_parallel_degree = 1, 2
    (err,) = check_parallelism(par, world_size=4)
    assert "DDP + TP" in err and "data_parallel_shard_degree = 1" in err, err
    par.data_parallel_replicate_degree, par.data_parallel_shard_degree = 1, -1
    assert check_parallelism(par, world_size=4) == []
    (err,) = check_parallelism(par, world_size=3)
    assert "tensor_parallel_degree = 2" in err and "3 ranks" in err, err


@pytest.mark.unit
def test_row_pieces_of_each_layout() -> None:
    """The X export gathers q/k only when a row piece would cut a head: pieces per layout."""
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    assert row_pieces((4,), (Shard(0),)) == 4  # 1-D FSDP
    assert (
        row_pieces((2, 4), (Replicate(), Shard(0))) == 4
    )  # HSDP: the replicate dim splits nothing
    assert row_pieces((2, 2), (_StridedShard(0, split_factor=2), Shard(0))) == 4  # FSDP+TP wq
    assert row_pieces((2, 2), (Shard(0), Shard(1))) == 2  # FSDP+TP wo: TP splits columns
    assert row_pieces((2, 2), (Shard(0), Replicate())) == 2
    assert row_pieces((2,), (Partial(),)) is None
