"""``amuse-eval``: validation loss of checkpoints, at the averaged weights X by default.

    python -m amuse_dist.eval RUN_DIR | CHECKPOINT_DIR | STEP_DIR | X_EXPORT_DIR [options]
    torchrun --nproc_per_node N -m amuse_dist.eval ...

    amuse-eval X_EXPORT_DIR --lm-eval TASKS [--lm-eval-include DIR] [--lm-eval-limit N]

A run folder (or its ``checkpoint/``) is evaluated step by step in order. A ``step-N`` folder is a
DCP checkpoint: the model (Y) and optimizer state are loaded and X = z + (y - z)/beta_y computed
from them. An export folder (``step-N/x``) is loaded from its safetensors. The model, tokenizer and
validation data come from the checkpoint's ``amuse_meta.json`` (or ``--config``), so the loss is
measured on the same fixed batches the run validated on. Prints a table and writes CSV and JSON.

Checkpoints must be trusted: torch's DCP ``.metadata`` is a pickle, so loading a checkpoint can
run code its author put there. amuse-eval refuses step folders that amuse_dist did not write (no
``amuse_meta.json``) unless ``--trust`` is given; only evaluate folders from people you trust.

With ``--lm-eval`` the exports (X, or an export folder given directly) are evaluated instead by
lm-evaluation-harness (``pip install amuse_dist[lm_eval]``) through its Hugging Face model class
``HFLM``, one process, on the tasks named (its own, or YAML tasks under ``--lm-eval-include``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from amuse_dist.titan import launch

RESULT_FIELDS = ("step", "source", "weights", "loss", "perplexity", "tokens", "path")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="amuse-eval",
        description=__doc__.split("\n\n")[0],
        epilog="SECURITY: checkpoints must be trusted. A DCP checkpoint's .metadata is a pickle: "
        "loading it can run arbitrary code. Folders not written by amuse_dist (no "
        "amuse_meta.json) are refused unless --trust is given.",
    )
    p.add_argument("path", help="run folder, checkpoint folder, step-N folder or X export folder")
    p.add_argument(
        "--source",
        choices=("auto", "dcp", "export"),
        default="auto",
        help="for step-N folders: compute X from the DCP state (dcp) or read step-N/x (export); "
        "auto prefers dcp",
    )
    p.add_argument(
        "--weights", choices=("x", "y"), default="x", help="X (averaged, default) or Y (DCP only)"
    )
    p.add_argument("--steps", type=int, default=None, help="validation batches (validation.steps)")
    p.add_argument("--batch-size", type=int, default=None, help="validation.local_batch_size")
    p.add_argument("--seq-len", type=int, default=None, help="validation.seq_len")
    p.add_argument("--dataset", default=None, help="validation.dataset")
    p.add_argument("--dataset-path", default=None, help="validation.dataset_path")
    p.add_argument("--config", default=None, help="training TOML, for exports without metadata")
    p.add_argument("--out", default=None, help="write OUT.csv and OUT.json (default: next to PATH)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--trust",
        action="store_true",
        help="load step folders without amuse_meta.json (not written by amuse_dist); their "
        "pickled DCP .metadata can run code: only for checkpoints you trust",
    )

    lm = p.add_argument_group("lm-evaluation-harness (optional extra: amuse_dist[lm_eval])")
    lm.add_argument(
        "--lm-eval",
        metavar="TASKS",
        default=None,
        help="comma-separated lm-eval task names: evaluate the exports with lm-eval's HFLM",
    )
    lm.add_argument("--lm-eval-include", metavar="DIR", default=None, help="extra task YAMLs")
    lm.add_argument("--lm-eval-limit", type=float, default=None, help="documents per task")
    lm.add_argument("--lm-eval-batch-size", type=int, default=8, help="HFLM batch size")
    lm.add_argument(
        "--lm-eval-bootstrap",
        type=int,
        default=100,
        help="bootstrap iterations for stderr (0: none)",
    )
    lm.add_argument("--device", default=None, help="HFLM device (default: cuda if available)")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.seq_len is not None and args.seq_len < 1:
        p.error(f"--seq-len must be >= 1, got {args.seq_len}")
    return args


# ------------------------------------------------------------------------------------ targets
def find_targets(path: Path, source: str) -> list[tuple[int, str, Path]]:
    """(step, "dcp" | "export", folder) to evaluate, in step order."""
    from amuse_dist.anytime.run_format import (
        STEP_DIR,
        complete_steps,
        exported_steps,
        is_complete_export,
    )

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if is_complete_export(path):
        return [(_export_step(path), "export", path)]
    if STEP_DIR.match(path.name):
        if not (path / ".metadata").is_file():
            raise FileNotFoundError(
                f"{path} is not a complete checkpoint (no DCP .metadata): interrupted save?"
            )
        return [(int(STEP_DIR.match(path.name).group(1)), *_pick(path, source))]
    folder = path / "checkpoint" if (path / "checkpoint").is_dir() else path
    steps = complete_steps(folder)
    # purged checkpoints whose exports were kept ([anytime] keep_exports)
    export_only = [] if source == "dcp" else sorted(set(exported_steps(folder)) - set(steps))
    if not steps and not export_only:
        raise FileNotFoundError(
            f"{path}: no checkpoint found (expected step-N folders with DCP .metadata, an X "
            "export with amuse_export.json, or a run folder holding checkpoint/)"
        )
    targets = [(s, *_pick(folder / f"step-{s}", source)) for s in steps]
    targets += [(s, *_pick(folder / f"step-{s}", "export")) for s in export_only]
    return sorted(targets, key=lambda t: t[0])


def check_trusted(targets: list[tuple[int, str, Path]], trust: bool) -> None:
    """Refuse DCP folders amuse_dist did not write: their pickled .metadata can run code."""
    from amuse_dist.anytime.run_format import META_FILE, RunError

    for _, kind, path in targets:
        if kind == "dcp" and not (path / META_FILE).is_file() and not trust:
            raise RunError(
                f"{path}: no {META_FILE}, so amuse_dist did not write this checkpoint. Its DCP "
                ".metadata is a pickle that can run code when loaded: pass --trust (and "
                "--config with its training TOML) only if you trust its author"
            )


def check_weights(targets: list[tuple[int, str, Path]], weights: str) -> None:
    """Refuse ``--weights y`` for an export that holds X (it would silently evaluate X)."""
    from amuse_dist.anytime.run_format import ExportInfo, RunError

    for _, kind, path in targets:
        if kind == "export" and weights == "y":
            held = ExportInfo.read(path).weights
            if held != "y":
                raise RunError(
                    f"--weights y: {path} holds {held.upper()}, not Y; evaluate Y from the DCP "
                    f"state instead: amuse-eval {path.parent} --source dcp --weights y"
                )


def check_files(targets: list[tuple[int, str, Path]]) -> None:
    """Truncated DCP shards and safetensors files, named before any model is built."""
    from amuse_dist.anytime.run_format import check_export_files, check_shard_sizes

    for _, kind, path in targets:
        if kind == "dcp":
            check_shard_sizes(path)
        else:
            check_export_files(path)


def _pick(step_dir: Path, source: str) -> tuple[str, Path]:
    from amuse_dist.anytime.run_format import export_dir, is_complete_export, read_meta

    if source in ("auto", "dcp"):
        return "dcp", step_dir
    export = export_dir(step_dir, (read_meta(step_dir).get("export") or {}).get("folder", "x"))
    if not is_complete_export(export):
        raise FileNotFoundError(f"{export}: no complete X export in this checkpoint")
    return "export", export


def _export_step(path: Path) -> int:
    from amuse_dist.anytime.run_format import ExportInfo

    return int(ExportInfo.read(path).step)


def job_config_for(target: Path, kind: str, args: argparse.Namespace) -> Any:
    """The run's JobConfig (from the checkpoint's metadata or ``--config``), set up for eval."""
    from amuse_dist.anytime.run_format import META_FILE, RunError, read_meta
    from amuse_dist.titan.config import import_plugins, parse_job_config

    step_dir = target if kind == "dcp" else target.parent
    meta = read_meta(step_dir)
    import_plugins([], meta.get("config") or {})  # an optimizer registered by the run's plugin
    if args.config:
        config = parse_job_config(["--job.config_file", args.config])
    elif "config" in meta:
        config = parse_job_config([])
        _assign(config, meta["config"])
    else:
        raise FileNotFoundError(
            f"{step_dir / META_FILE} not found: pass --config with the training TOML"
        )
    ck = config.checkpoint
    ck.enable = True
    ck.folder = str(step_dir.parent.resolve())
    ck.exclude_from_loading = ["dataloader", "lr_scheduler", "train_state"]
    ck.keep_latest_k = 0
    ck.initial_load_path = None
    config.metrics.enable_tensorboard = False
    config.metrics.enable_wandb = False
    config.anytime.save_on_sigterm = False
    config.validation.enable = True
    # the training loader is built but never read: let it fit any number of eval ranks
    config.training.global_batch_size = -1
    _one_dimensional(config.parallelism)
    overrides = {
        "steps": args.steps,
        "local_batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "dataset": args.dataset,
        "dataset_path": args.dataset_path,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(config.validation, key, value)
    if config.validation.seq_len > config.training.seq_len:
        flag = "--seq-len" if args.seq_len is not None else "[validation] seq_len"
        raise RunError(
            f"{flag} = {config.validation.seq_len}: expected <= {config.training.seq_len}, the "
            f"model's context ([training] seq_len of the run in {step_dir.parent})"
        )
    return config


def _one_dimensional(par: Any) -> None:
    """Evaluate on 1-D FSDP over whatever ranks amuse-eval runs on: the run's mesh (HSDP, TP)
    needs its rank count, the loss does not depend on the layout, and DCP reshards on load."""
    par.data_parallel_replicate_degree = 1
    par.data_parallel_shard_degree = -1
    par.tensor_parallel_degree = 1
    par.pipeline_parallel_degree = 1
    par.context_parallel_degree = 1


def _assign(obj: Any, values: dict[str, Any]) -> None:
    """Copy a saved ``dataclasses.asdict`` back onto a JobConfig, section by section."""
    for key, value in values.items():
        if not hasattr(obj, key):
            continue  # a key this version does not know
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            _assign(current, value)
        else:
            setattr(obj, key, value)


# ------------------------------------------------------------------------------------ lm-eval
def lm_eval_export(
    export: Path,
    tasks: list[str],
    include: str | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    device: str | None = None,
    bootstrap_iters: int = 100,
) -> dict[str, dict[str, Any]]:
    """lm-evaluation-harness on one export folder: {task: {metric: value}}.

    The folder is a complete Hugging Face model (config, tokenizer adding BOS as in training,
    ``max_position_embeddings`` = trained context), so lm-eval's own ``HFLM`` loads it as is.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(
            "--lm-eval needs lm-evaluation-harness: pip install 'amuse_dist[lm_eval]'"
        ) from e
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = HFLM(pretrained=str(export), batch_size=batch_size, device=device, dtype="float32")
    manager = TaskManager(include_path=include) if include else TaskManager()
    out = simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        log_samples=False,
        bootstrap_iters=bootstrap_iters,
    )
    results: dict[str, dict[str, Any]] = {}
    for task, metrics in (out or {}).get("results", {}).items():
        results[task] = {
            k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"
        }
    return results


def export_folders(targets: list[tuple[int, str, Path]]) -> list[tuple[int, Path]]:
    """The export folder of each target (a checkpoint's X export)."""
    from amuse_dist.anytime.run_format import is_complete_export, read_meta

    out = []
    for step, kind, path in targets:
        if kind == "dcp":
            path = path / (read_meta(path).get("export") or {}).get("folder", "x")
            if not is_complete_export(path):
                raise FileNotFoundError(f"{path}: no complete X export for lm-eval")
        out.append((step, path))
    return out


def run_lm_eval(targets: list[tuple[int, str, Path]], args: argparse.Namespace) -> list[dict]:
    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    rows = []
    for step, export in export_folders(targets):
        results = lm_eval_export(
            export,
            tasks,
            include=args.lm_eval_include,
            limit=args.lm_eval_limit,
            batch_size=args.lm_eval_batch_size,
            device=args.device,
            bootstrap_iters=args.lm_eval_bootstrap,
        )
        for task, metrics in results.items():
            for metric, value in sorted(metrics.items()):
                rows.append(
                    {
                        "step": step,
                        "task": task,
                        "metric": metric,
                        "value": value,
                        "path": str(export),
                    }
                )
    return rows


# ------------------------------------------------------------------------------------ evaluation
def prepare(targets: list[tuple[int, str, Path]], args: argparse.Namespace) -> Any:
    """The evaluation's JobConfig, with every check that needs no model or process group:
    the validation seq_len within the model's, each export made for this model."""
    from amuse_dist.anytime.run_format import ExportError

    first_step, first_kind, first_path = targets[0]
    config = job_config_for(first_path, first_kind, args)
    config.training.steps = max(1, first_step)
    for _, kind, path in targets:
        if kind == "export":
            _check_export_config(path, config, ExportError)
    if not getattr(args, "lm_eval", None):
        _resolve_data(config)
    return config


def _resolve_data(config: Any) -> None:
    """The validation data as token shards (the built-in corpus or a local_text folder built or
    prepared on first use), checked against the model before any process group starts."""
    from amuse_dist.data import DataError
    from amuse_dist.titan.loaders.datasets import reads_token_shards, resolve_datasets
    from amuse_dist.titan.loaders.token_shards import check_job_config
    from amuse_dist.titan.model import model_vocab_size

    vocab = model_vocab_size(config)
    resolve_datasets(config, vocab)
    v, t = config.validation, config.training
    if reads_token_shards(v.dataset):  # the training loader is built, never read: no 2nd dataset
        t.dataset, t.dataset_path = v.dataset, v.dataset_path
    errors = check_job_config(config, vocab)
    if errors:
        raise DataError("invalid data: " + "; ".join(errors))


def evaluate_targets(
    targets: list[tuple[int, str, Path]], args: argparse.Namespace, config: Any = None
) -> list[dict[str, Any]]:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from tqdm import tqdm

    from amuse_dist.anytime.run_format import ExportError, ExportInfo
    from amuse_dist.optim.averaged import averaged_weights, weights_swapped
    from amuse_dist.titan.export import load_hf_export
    from amuse_dist.titan.trainer import AmuseTrainer

    config = prepare(targets, args) if config is None else config
    launch.offline_hub_defaults(launch.job_datasets(config))
    trainer = AmuseTrainer(config, evaluating=True)
    rank = dist.get_rank()
    rows: list[dict[str, Any]] = []
    try:
        model_parts = trainer.model_parts
        bar = tqdm(targets, desc="amuse-eval", unit="ckpt", disable=rank != 0 or args.no_progress)
        for step, kind, path in bar:
            if kind == "dcp":
                trainer.checkpointer.folder = str(path.parent.resolve())
                trainer.checkpointer.load(step=step)
                xs = averaged_weights(trainer.optimizers) if args.weights == "x" else {}
                if xs:
                    with weights_swapped(model_parts, xs):
                        loss, tokens = trainer.validator.evaluate(model_parts)
                else:
                    loss, tokens = trainer.validator.evaluate(model_parts)
                weights = "x" if xs else "y"
            else:
                state = load_hf_export(path, trainer.checkpointer.sd_adapter)
                _check_export_shapes(path, state, model_parts[0], config, ExportError)
                set_model_state_dict(
                    model_parts[0], state, options=StateDictOptions(full_state_dict=True)
                )
                loss, tokens = trainer.validator.evaluate(model_parts)
                weights = ExportInfo.read(path).weights
            rows.append(
                {
                    "step": step,
                    "source": kind,
                    "weights": weights,
                    "loss": loss,
                    "perplexity": math.exp(min(loss, 700.0)),
                    "tokens": tokens,
                    "path": str(path),
                }
            )
            bar.set_postfix(step=step, loss=f"{loss:.4f}")
        torch.distributed.barrier()
    finally:
        trainer.close()
    return rows


def _config_source(config: Any) -> str:
    return (
        f"--config {config.job.config_file}"
        if getattr(config.job, "config_file", None)
        else "the checkpoint's amuse_meta.json"
    )


def _check_export_config(path: Path, config: Any, error: type[Exception]) -> None:
    """Refuse, before building any model, an export whose config.json describes another model
    than the one the evaluation config builds."""
    from amuse_dist.titan.model import FLAVORS

    args = FLAVORS.get(config.model.flavor) if config.model.name == "llama3_amuse" else None
    cfg_file = path / "config.json"
    if args is None or not cfg_file.is_file():
        return
    try:
        saved = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise error(f"{cfg_file}: unreadable ({e})") from e
    ours = {
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads or args.n_heads,
        "vocab_size": args.vocab_size,
    }
    for key, value in ours.items():
        if key in saved and saved[key] != value:
            raise error(
                f"{cfg_file}: {key} = {saved[key]}, but the model from {_config_source(config)} "
                f'([model] flavor = "{config.model.flavor}") has {value}: this export comes '
                "from another model; pass the training TOML of the run that wrote it"
            )


def _check_export_shapes(
    path: Path, state: dict[str, Any], model: Any, config: Any, error: type[Exception]
) -> None:
    """Refuse an export whose tensors do not match the model built from the config."""
    from amuse_dist.optim.names import named_parameters

    where = _config_source(config)
    for name, p in named_parameters(model):
        if name not in state:
            raise error(f"{path}: no tensor for {name!r}; the model comes from {where}")
        got, want = tuple(state[name].shape), tuple(p.shape)
        if got != want:
            raise error(
                f"{path}: {name!r} is {list(got)} there but {list(want)} in the model "
                f"[model] {config.model.name} flavor {config.model.flavor} from {where}: was it "
                "exported from another model?"
            )


def write_results(rows: list[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out.with_suffix(".csv"), out.with_suffix(".json")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=2) + "\n")
    return csv_path, json_path


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'step':>8}  {'source':>6}  {'weights':>7}  {'loss':>9}  {'ppl':>10}  {'tokens':>9}"]
    for r in rows:
        lines.append(
            f"{r['step']:>8}  {r['source']:>6}  {r['weights']:>7}  {r['loss']:>9.4f}  "
            f"{r['perplexity']:>10.2f}  {r['tokens']:>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    path = Path(args.path)
    from amuse_dist.anytime.run_format import RunError
    from amuse_dist.data import DataError

    launch.setup_device()  # before anything imports torchtitan
    try:
        targets = find_targets(path, args.source)
        check_trusted(targets, args.trust)
        check_weights(targets, args.weights)
        check_files(targets)
        config = prepare(targets, args)
    except (FileNotFoundError, RunError, DataError) as e:
        print(f"amuse-eval: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.lm_eval:
        main_lm_eval(targets, args, path)
        return

    from torchtitan.tools.logging import init_logger

    from amuse_dist.titan import cpu

    init_logger()
    cpu.quiet_known_noise()
    launch.single_process_env()
    try:
        rows = evaluate_targets(targets, args, config)
    except (FileNotFoundError, RunError) as e:
        print(f"amuse-eval: {e}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(getattr(e, "exit_code", 2))  # as leave_process_group: no finalization abort

    import torch.distributed as dist

    if dist.get_rank() == 0:
        out = Path(args.out) if args.out else _default_out(path)
        csv_path, json_path = write_results(rows, out)
        print(format_table(rows))
        print(f"wrote {csv_path} and {json_path}")
    launch.leave_process_group()


def main_lm_eval(
    targets: list[tuple[int, str, Path]], args: argparse.Namespace, path: Path
) -> None:
    """``--lm-eval``: one process, no process group; prints and writes OUT_lm_eval.{csv,json}."""
    try:
        rows = run_lm_eval(targets, args)
    except (ImportError, FileNotFoundError) as e:
        print(f"amuse-eval: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(args.out) if args.out else _default_out(path)
    out = out.with_name(out.name + "_lm_eval")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=("step", "task", "metric", "value", "path"))
        writer.writeheader()
        writer.writerows(rows)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    for r in rows:
        print(f"{r['step']:>8}  {r['task']:>20}  {r['metric']:>20}  {r['value']:.6g}")
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.json')}")


def _default_out(path: Path) -> Path:
    """Next to what was evaluated; never inside an export folder (it stays as written)."""
    from amuse_dist.anytime.run_format import is_complete_export

    if is_complete_export(path):
        return path.parent / f"amuse_eval_{path.name}"
    return path / "amuse_eval"


if __name__ == "__main__":
    main()
