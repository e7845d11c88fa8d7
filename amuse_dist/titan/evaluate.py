"""Validation loss of checkpoints and exports (what ``amuse-eval`` runs once its targets are
found and checked, see ``amuse_dist.anytime.targets``): the run's config rebuilt from the
checkpoint's metadata or ``--config``, one trainer built in evaluation mode (no lock, no records),
each target loaded (DCP through the checked loader, or an export's safetensors) and validated.
Import after ``launch.setup_device()``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amuse_dist.anytime.run_format import META_FILE, ExportError, ExportInfo, RunError, read_meta
from amuse_dist.anytime.targets import Target
from amuse_dist.data import DataError
from amuse_dist.optim.names import named_parameters
from amuse_dist.titan import launch
from amuse_dist.titan.config import import_plugins, parse_job_config
from amuse_dist.titan.loaders.datasets import reads_token_shards, resolve_datasets
from amuse_dist.titan.loaders.token_shards import check_job_config
from amuse_dist.titan.model import FLAVORS, model_vocab_size


@dataclass
class EvalOptions:
    """What the command line says about the evaluation (amuse-eval's flags)."""

    weights: str = "x"
    steps: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    dataset: str | None = None
    dataset_path: str | None = None
    config: str | None = None
    custom_import: str | None = None
    trust: bool = False
    progress: bool = True


def job_config_for(target: Target, options: EvalOptions) -> Any:
    """The run's JobConfig (from the checkpoint's metadata or ``--config``), set up for eval.

    Nothing the folder says is imported or trusted: ``[experimental] custom_import`` comes only
    from ``--custom-import`` on the command line, and ``trust_checkpoints`` only from ``--trust``.
    """
    step_dir = target.step_dir
    meta = read_meta(step_dir)
    plugin = (
        ["--experimental.custom_import", options.custom_import] if options.custom_import else []
    )
    import_plugins(plugin, {})
    if options.config:
        config = parse_job_config(["--job.config_file", options.config])
    elif "config" in meta:
        config = parse_job_config([])
        _assign(config, meta["config"])
    else:
        raise RunError(f"{step_dir / META_FILE} not found: pass --config with the training TOML")
    config.experimental.custom_import = options.custom_import or ""
    if hasattr(config.experimental, "custom_args_module"):
        config.experimental.custom_args_module = ""
    config.anytime.trust_checkpoints = options.trust
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
        "steps": options.steps,
        "local_batch_size": options.batch_size,
        "seq_len": options.seq_len,
        "dataset": options.dataset,
        "dataset_path": options.dataset_path,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(config.validation, key, value)
    if config.validation.seq_len > config.training.seq_len:
        flag = "--seq-len" if options.seq_len is not None else "[validation] seq_len"
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


def prepare(targets: list[Target], options: EvalOptions) -> Any:
    """The evaluation's JobConfig, with every check that needs no model or process group:
    the validation seq_len within the model's, each export made for this model."""
    config = job_config_for(targets[0], options)
    config.training.steps = max(1, targets[0].step)
    for t in targets:
        if t.kind == "export":
            _check_export_config(t.path, config, ExportError)
    try:
        _resolve_data(config)
    except DataError as e:  # names the file or both values
        raise RunError(str(e)) from None
    return config


def _resolve_data(config: Any) -> None:
    """The validation data as token shards (the built-in corpus or a local_text folder built or
    prepared on first use), checked against the model before any process group starts."""
    vocab = model_vocab_size(config)
    resolve_datasets(config, vocab)
    v, t = config.validation, config.training
    if reads_token_shards(v.dataset):  # the training loader is built, never read: no 2nd dataset
        t.dataset, t.dataset_path = v.dataset, v.dataset_path
    errors = check_job_config(config, vocab)
    if errors:
        raise DataError("invalid data: " + "; ".join(errors))


def evaluate_targets(
    targets: list[Target], options: EvalOptions, config: Any = None
) -> list[dict[str, Any]]:
    """Validation loss of every target on the run's fixed batches (a collective)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from tqdm import tqdm

    from amuse_dist.optim.averaged import averaged_weights, weights_swapped
    from amuse_dist.titan.export import load_hf_export
    from amuse_dist.titan.trainer import AmuseTrainer

    config = prepare(targets, options) if config is None else config
    launch.offline_hub_defaults(launch.job_datasets(config))
    trainer = AmuseTrainer(config, evaluating=True)
    rank = dist.get_rank()
    rows: list[dict[str, Any]] = []
    try:
        model_parts = trainer.model_parts
        bar = tqdm(
            targets, desc="amuse-eval", unit="ckpt", disable=rank != 0 or not options.progress
        )
        for target in bar:
            step, kind, path = target.step, target.kind, target.path
            if kind == "dcp":
                trainer.checkpointer.folder = str(path.parent.resolve())
                trainer.checkpointer.load(step=step)
                xs = averaged_weights(trainer.optimizers) if options.weights == "x" else {}
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
        dist.barrier()
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
