"""Test helpers, once each: launching the trainer and workers with torchrun (CPU, gloo), reading
what a run wrote (logs, TensorBoard, X exports), amuse-eval, and an export's loss in a fresh model."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from amuse_dist.titan import launch
from tests._preload import run_cmd

REPO = Path(__file__).resolve().parents[1]
DEBUG_TOML = REPO / "train_configs" / "debug_cpu.toml"
# "step  4/20  loss  7.12345" (a tqdm bar may follow the step on a terminal)
STEP_RE = re.compile(r"step:?\s+(\d+)(?:/\d+)?\s+(?:\|[^|]*\|\s+)?loss:?\s+([-+0-9.naife]+)")


def env(tmp: Path) -> dict[str, str]:
    """A launch's environment: offline, this checkout first on the path, one thread per rank; the
    session's private HF cache (conftest.py; the hub libraries fix its paths at import)."""
    e = dict(os.environ)
    e.update(
        PYTHONPATH=str(REPO) + os.pathsep + e.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=e.get("HF_HOME") or str(tmp / "hf_home"),
        OMP_NUM_THREADS="1",
        TORCH_NCCL_ASYNC_ERROR_HANDLING="3",
    )
    return e


def run_cli(module: str, argv: list[str]) -> int | str | None:
    """Run a console entry point in this process as ``python -m module argv`` does (a fresh
    module namespace, nothing imported from it by name); its exit status."""
    import runpy

    saved = sys.argv
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if e.code is not None else 0
    finally:
        sys.argv = saved
    return 0


def torchrun_cmd(nproc: int, *target: str) -> list[str]:
    """torchrun on one node with ``nproc`` ranks running ``target``; rank 0's output only."""
    return launch.torchrun_command(nproc, *target)


def finish_worker(result: Any, out: str | Path) -> None:
    """The worker side of ``run_worker``: gather every rank's result, rank 0 saves the list to
    ``out``, all ranks leave together."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        torch.save(gathered, out)
    launch.leave_process_group()


def run_worker(
    script: Path, nproc: int, args: list[str], out: Path, timeout: int = 300, fresh: bool = False
) -> Any:
    """Run a worker script on ``nproc`` gloo ranks; return what it saved to ``out`` (torch.save).
    ``fresh``: real torchrun and interpreters, not the preloaded ones (``tests/_preload.py``)."""
    e = env(out.parent)
    e["CUDA_VISIBLE_DEVICES"] = ""
    cmd = launch.torchrun_command(nproc, str(script), *args, "--out", str(out), rank0_output=False)
    proc = run_cmd(cmd, env=e, timeout=timeout, fresh=fresh)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return torch.load(out, weights_only=False)


def torchrun(
    nproc: int,
    args: list[str],
    tmp: Path,
    extra_env: dict[str, str] | None = None,
    timeout: int = 600,
) -> subprocess.CompletedProcess[str]:
    """Run ``amuse_dist.train`` on ``nproc`` CPU ranks; rank 0's output is captured."""
    cmd = torchrun_cmd(nproc, "-m", "amuse_dist.train", *args)
    e = env(tmp)
    e.update(extra_env or {})
    proc = run_cmd(cmd, env=e, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def debug_args(dump: Path, assets: Path, steps: int = 10, **overrides: Any) -> list[str]:
    """debug_cpu.toml shortened for tests: ``steps`` steps, loss logged every step."""
    args = [
        "--job.config_file",
        str(DEBUG_TOML),
        "--job.dump_folder",
        str(dump),
        "--local_data.assets_dir",
        str(assets),
        "--training.steps",
        str(steps),
        "--metrics.log_freq",
        "1",
        "--checkpoint.interval",
        "5",
        "--checkpoint.keep_latest_k",
        "0",
        "--validation.freq",
        "5",
        "--validation.steps",
        "2",
    ]
    for key, value in overrides.items():
        section, name = key.split("__")
        if isinstance(value, bool):  # tyro flags: --sec.key / --sec.no-key
            args.append(f"--{section}.{name}" if value else f"--{section}.no-{name}")
        else:
            args += [f"--{section}.{name}", str(value)]
    return args


def losses(output: str) -> dict[int, float]:
    """{step: training loss} from the trainer's log (validation lines are skipped)."""
    out: dict[int, float] = {}
    for line in output.splitlines():
        if "validate step" in line:
            continue
        m = STEP_RE.search(line)
        if m:
            out[int(m.group(1))] = float(m.group(2))
    return out


def tb_scalars(dump: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from a run's TensorBoard files: amuse-plot's reader (the one there is;
    a resumed run's later write wins)."""
    from amuse_dist.plot import read_scalars

    return read_scalars(dump / "tb")


def tb_by_step(dump: Path, tag: str) -> dict[int, float]:
    """{step: value} of one TensorBoard tag ({} when the run never logged it)."""
    return tb_scalars(dump).get(tag, {})


STRAIGHT_STEPS = 20


def run_args(
    dump: Path, assets: Path, steps: int = STRAIGHT_STEPS, **overrides: object
) -> list[str]:
    """debug_cpu.toml for tests: checkpoints every 10 steps, validation every 5, warmup 6."""
    base: dict[str, object] = dict(
        checkpoint__interval=10,
        validation__freq=5,
        amuse__warmup_steps=6,
        training__local_batch_size=4,
    )
    base.update(overrides)
    return debug_args(dump, assets, steps=steps, **base)


# ------------------------------------------------------------------ reading what a run wrote
def builtin_data(assets: Path) -> Any:
    """The built-in corpus as token shards, with its tokenizer (what debug_cpu.toml trains on
    with ``--local_data.assets_dir assets``)."""
    from amuse_dist.data.corpus import build_builtin

    return build_builtin(assets, 2048)


def validation_config(assets: Path, batches: int) -> Any:
    """debug_cpu.toml validating on ``batches`` global batches of 4 of the built-in corpus: the
    fixed batches amuse-eval measures in these tests (``amuse_eval`` below)."""
    from amuse_dist.titan.config import parse_job_config

    built = builtin_data(assets)
    return parse_job_config(
        [
            "--job.config_file",
            str(DEBUG_TOML),
            "--validation.dataset",
            "token_shards",
            "--validation.dataset_path",
            str(built.shards),
            "--model.hf_assets_path",
            str(built.tokenizer),
            "--validation.local_batch_size",
            "4",
            "--validation.steps",
            str(batches),
        ]
    )


def eval_batches(assets: Path, batches: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """The (inputs, labels) batches amuse-eval validates on in these tests, on one process."""
    from amuse_dist.titan.loaders.token_shards import build_token_shard_validation_dataloader

    return list(build_token_shard_validation_dataloader(1, 0, validation_config(assets, batches)))


def read_x(step_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted((step_dir / "x").glob("*.safetensors"))
    assert files, f"no X export in {step_dir}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def amuse_eval(target: Path, out: Path, tmp_path: Path, *extra: str) -> list[dict]:
    """Run ``python -m amuse_dist.eval`` on 2 fixed batches of 4; its JSON rows."""
    cmd = [sys.executable, "-m", "amuse_dist.eval", str(target), *extra]
    cmd += ["--steps", "2", "--batch-size", "4", "--out", str(out), "--no-progress"]
    proc = run_cmd(cmd, env=env(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.with_suffix(".json").read_text())


def fresh_llama_losses(x_dir: Path, assets: Path, batches: int) -> tuple[float, float]:
    """Load the exported folder into a fresh torchtitan Llama and into transformers'
    LlamaForCausalLM; their validation losses on the fixed batches amuse-eval uses."""
    from safetensors.torch import load_file
    from torchtitan.models.llama3 import Transformer
    from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter
    from transformers import LlamaForCausalLM

    from amuse_dist.titan.model import FLAVORS

    cfg = validation_config(assets, batches)
    args = FLAVORS["tiny"]
    args.update_from_config(cfg)
    with torch.device("cpu"):
        model = Transformer(args)
    with torch.no_grad():
        model.init_weights()  # the RoPE buffer; the weights come from the export
    hf = {}
    for f in sorted(x_dir.glob("*.safetensors")):
        hf.update(load_file(f))
    model.load_state_dict(Llama3StateDictAdapter(args, None).from_hf(hf), strict=True)
    model.eval()
    hf_model = LlamaForCausalLM.from_pretrained(x_dir, torch_dtype=torch.float32).eval()
    loader = eval_batches(assets, batches)

    def mean_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
        ce = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(0, 1), reduction="sum"
        )
        return float(ce) / labels.numel()

    titan, hf_losses = [], []
    with torch.no_grad():
        for i, (inputs, labels) in enumerate(loader):
            if i == batches:
                break
            titan.append(mean_token_loss(model(inputs["input"]), labels))
            hf_losses.append(mean_token_loss(hf_model(inputs["input"]).logits, labels))
    return sum(titan) / len(titan), sum(hf_losses) / len(hf_losses)
