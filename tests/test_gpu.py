"""CUDA tests (``pytest -m gpu``), skipped without CUDA: collected everywhere, run on a GPU machine
(``benchmarks/gpu_check.py`` runs them first).

* AMUSE's numerics on CUDA against the plain single-process reference (tests/reference_amuse.py,
  on the CPU in float64) on the same inputs.
* The trainer on one GPU from a shipped config (``train_configs/llama3_124m.toml``: compile on,
  bf16 parameters, token shards), shrunk to the tiny model: checkpoints with X exports at steps
  10 and 20, amuse-eval of the step-20 checkpoint equal to the validator's X loss, transformers
  ``generate`` from the export, and a resume from step 10 that reproduces step 20 (GPU kernels are
  not bitwise deterministic run to run: equal within 1e-3).

Data: the offline corpus, its BPE tokenizer and token shards; ``gpu_check`` passes the ones it
built (``AMUSE_GPU_TOKENIZER``, ``AMUSE_GPU_SHARDS``), else they are built here.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests._titan import REPO, read_x, tb_by_step, torchrun_cmd

# AMUSE_GPU_TESTS_DEVICE=cpu runs these tests on the CPU (compile backend aot_eager): a check of
# the tests themselves on a machine without CUDA, minutes long.
DEVICE = os.environ.get("AMUSE_GPU_TESTS_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.e2e,  # a tier too: `make test-fast` never runs them
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs CUDA"),
]


# (weights dtype, NS dtype, tolerance): fp64 weights with fp32 NS isolate the device's round-off
# (CPU: ~1e-8). The default bf16 NS is not compared step by step: on this toy model bf16 round-off
# alone moves the weights ~1.5e-2 apart over 30 steps between two implementations on the same CPU.
NUMERICS = [(torch.float64, torch.float32, 1e-5)]


@pytest.mark.parametrize(("weights", "ns_dtype", "tol"), NUMERICS, ids=["fp32-ns"])
def test_amuse_on_cuda_matches_reference(
    weights: torch.dtype, ns_dtype: torch.dtype, tol: float
) -> None:
    from amuse_dist import AMUSE, param_groups
    from tests.reference_amuse import ReferenceAMUSE
    from tests.toy import HP, batch, loss_fn, make_model, rel

    hp = dict(HP, warmup_steps=10)
    cpu_model = make_model().to(weights)
    model = copy.deepcopy(cpu_model).to(DEVICE)
    opt = AMUSE(param_groups(model), ns_dtype=ns_dtype, **hp)
    muon_ids = {id(p) for g in param_groups(cpu_model) if g["use_muon"] for _, p in g["params"]}
    ref = ReferenceAMUSE(
        [(p, id(p) in muon_ids) for p in cpu_model.parameters()],
        lr=hp["lr"],
        warmup_steps=hp["warmup_steps"],
        beta1=hp["beta1"],
        rho=hp["rho"],
        momentum=hp["momentum"],
        weight_decay=hp["weight_decay"],
        ns_dtype=ns_dtype,
    )
    for step in range(30):
        inputs, labels = batch(step)
        loss_fn(model, inputs.to(DEVICE), labels.to(DEVICE)).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        loss_fn(cpu_model, inputs, labels).backward()
        ref.step()
        cpu_model.zero_grad(set_to_none=True)
    for p, q in zip(model.parameters(), cpu_model.parameters(), strict=True):
        assert p.device.type == DEVICE
        assert rel(p.cpu(), q) <= tol, rel(p.cpu(), q)
    xs = opt.x_tensors()
    for p, xr in zip(model.parameters(), ref.x(), strict=True):
        assert rel(xs[p].cpu(), xr) <= tol, rel(xs[p].cpu(), xr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_symmetric_ns_kernel_on_cuda(dtype: torch.dtype) -> None:
    """The Triton symmetric NS (``ns_kernel = "triton"``) against its torch reference on the same
    device and dtype (fp32: 1e-4 of the largest entry; bf16: its rounding, 2e-2), and no worse in
    fp64 orthogonality error than the eager NS5, on 124M and 1.3B shapes, batched and tall."""
    if DEVICE != "cuda":
        pytest.skip("the Triton kernel needs CUDA (the interpreter test covers it on CPU)")
    from amuse_dist.optim.newton_schulz import newton_schulz5
    from tests.reference_ns import newton_schulz5_symmetric_reference, orthogonality_error

    torch.manual_seed(0)
    for shape in ((4, 768, 768), (2, 768, 2048), (2, 2048, 768), (1, 2048, 5632)):
        g = torch.randn(*shape, device="cuda")
        new = newton_schulz5(g, dtype=dtype, kernel="triton")
        ref = newton_schulz5_symmetric_reference(g, dtype=dtype)
        err = ((new.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        assert err <= (1e-4 if dtype == torch.float32 else 2e-2), (shape, err)
        eager = newton_schulz5(g, dtype=dtype, kernel="eager")
        e_new = orthogonality_error(new).max().item()
        e_old = orthogonality_error(eager).max().item()
        assert e_new <= e_old * 1.01, (shape, e_new, e_old)


@pytest.fixture(scope="module")
def gpu_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if os.environ.get("AMUSE_GPU_TOKENIZER") and os.environ.get("AMUSE_GPU_SHARDS"):
        return {k: os.environ[k] for k in ("AMUSE_GPU_TOKENIZER", "AMUSE_GPU_SHARDS")}
    from benchmarks.gpu_check import build_data

    return build_data(tmp_path_factory.mktemp("gpu_data"), 2048, None)


def gpu_run(dump: Path, data: dict[str, str], tmp: Path) -> str:
    """llama3_124m.toml as shipped, shrunk to the tiny model: 20 steps, checkpoints at 10, 20."""
    import subprocess

    from tests._titan import env

    args = ["--job.config_file", str(REPO / "train_configs" / "llama3_124m.toml")]
    args += ["--job.dump_folder", str(dump), "--model.flavor", "tiny"]
    args += ["--model.hf_assets_path", data["AMUSE_GPU_TOKENIZER"]]
    for sec in ("training", "validation"):
        args += [f"--{sec}.dataset_path", data["AMUSE_GPU_SHARDS"], f"--{sec}.seq_len", "256"]
        args += [f"--{sec}.local_batch_size", "8"]
    args += ["--training.global_batch_size", "8", "--training.steps", "20"]
    args += ["--validation.freq", "10", "--validation.steps", "2", "--metrics.log_freq", "1"]
    args += ["--checkpoint.interval", "10", "--checkpoint.keep_latest_k", "0"]
    args += ["--amuse.warmup_steps", "5"]
    if DEVICE == "cpu":
        args += ["--compile.backend", "aot_eager"]
    cmd = torchrun_cmd(1, "-m", "amuse_dist.train", *args)
    e = env(tmp)
    if DEVICE == "cpu":
        e["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def test_trainer_one_gpu_compile_bf16_checkpoint_export_eval_generate_resume(
    tmp_path: Path, gpu_data: dict[str, str]
) -> None:
    straight = tmp_path / "straight"
    gpu_run(straight, gpu_data, tmp_path)
    for step in (10, 20):
        assert read_x(straight / "checkpoint" / f"step-{step}"), step
    # amuse-eval of the step-20 checkpoint (the run's own validation settings) == the validator
    val_x = tb_by_step(straight, "validation_x/loss")
    rows = amuse_eval_default(straight / "checkpoint" / "step-20", tmp_path / "eval", tmp_path)
    assert rows[0]["step"] == 20
    assert rows[0]["loss"] == pytest.approx(val_x[20], rel=2e-3), (rows, val_x)
    # transformers loads the X export and generates on the GPU
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(straight / "checkpoint" / "step-20" / "x")
    hf = hf.to(DEVICE).eval()
    prompt = torch.tensor([[1, 2, 3, 4]], device=DEVICE)
    with torch.no_grad():
        out = hf.generate(prompt, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 12)
    # resume from step 10 reproduces step 20 (within GPU run-to-run noise)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoint" / "step-10", resumed / "checkpoint" / "step-10")
    gpu_run(resumed, gpu_data, tmp_path)
    a = tb_by_step(straight, "loss_metrics/global_avg_loss")
    b = tb_by_step(resumed, "loss_metrics/global_avg_loss")
    assert sorted(b) == list(range(11, 21)), sorted(b)
    assert b[20] == pytest.approx(a[20], rel=1e-3), (a[20], b[20])


def amuse_eval_default(target: Path, out: Path, tmp: Path) -> list[dict]:
    """amuse-eval with the run's own validation settings (what the validator measured)."""
    import json
    import subprocess
    import sys

    from tests._titan import env

    cmd = [sys.executable, "-m", "amuse_dist.eval", str(target), "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env(tmp), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.with_suffix(".json").read_text())
