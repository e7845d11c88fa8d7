"""TOML extensions (``[amuse]``, ``[muon]``, ``[local_data]``) and config validation.

Loaded by torchtitan through ``[job] custom_config_module = "amuse_dist.titan.config"``. The
dataclasses import nothing from torchtitan so validation can run before torchtitan is imported.
``validate_config`` checks a TOML file before any process group starts, so a typo fails in a
second with a message naming section, key and expected value rather than on N ranks later.
"""

import dataclasses
import difflib
import importlib
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Literal

try:
    import tomllib
except ModuleNotFoundError:  # python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

from amuse_dist.anytime.run_format import RunError, check_export_folder
from amuse_dist.optim import hparams, registry
from amuse_dist.titan.loaders import datasets as dataset_table

# [optimizer] keys that only torchtitan's own optimizers (AdamW, Adam) read
_TITAN_OPTIMIZER_KEYS = ("beta1", "beta2", "eps", "weight_decay", "implementation")


@dataclass
class LocalData:
    """Where offline data is built: the built-in corpus (``local_corpus``) as token shards with
    its own BPE, and ``local_text`` folders prepared to token shards. amuse_dist writes only into
    a folder it created (marked by ``.amuse_assets.json``); one holding other files is refused."""

    assets_dir: str = "./outputs/assets"
    vocab_size: int = 2048
    """The built-in corpus's BPE vocab (at most the model's vocab_size)."""


@dataclass
class Anytime:
    """Anytime evaluation: X export next to every checkpoint, validation at X and Y, preemption."""

    export_x: bool = True
    """Write the X weights (Y for optimizers without averaging) as HF safetensors into
    ``step-N/<export_folder>`` at every checkpoint."""
    export_folder: str = "x"
    """Name of the export folder inside each ``step-N`` checkpoint folder."""
    export_y: bool = False
    """Also export the training weights Y into ``step-N/y`` (AMUSE, ScheduleFreeAdamW)."""
    keep_exports: int = 0
    """Exports kept when ``[checkpoint] keep_latest_k`` purges old checkpoints: 0 keeps every
    export (the purged ``step-N`` keeps its export folders and ``amuse_meta.json``); k > 0 keeps
    the newest k exports and deletes older purged checkpoints whole."""
    max_position_embeddings: int = 0
    """config.json's ``max_position_embeddings`` in exports; 0: the trained ``training.seq_len``."""
    validate_x: bool = True
    """Validate at the averaged weights X (AMUSE, ScheduleFreeAdamW): tag validation_x/loss."""
    validate_y: bool = True
    """Also validate at the training weights Y: tag validation_y/loss."""
    save_on_sigterm: bool = True
    """On SIGTERM (SLURM preemption) finish the step, save a checkpoint and exit cleanly."""
    nonfinite_skips: int = 0
    """Divergence guard: steps with a non-finite loss or gradient that may be skipped (the
    optimizer step is not taken) before the run stops; 0 stops at the first one."""
    resume_override: list[str] = field(default_factory=list)
    """"section.key" entries a resume may change although the resume contract refuses them."""
    trust_checkpoints: bool = False
    """Load checkpoints your own runs did not write (no amuse_manifest.json signed with your key:
    another user's run, a plain torchtitan folder); their pickled DCP .metadata can run code."""
    allow_bf16_master_weights: bool = False
    """Let an averaging optimizer (AMUSE, SF-AdamW) run with ``training.dtype = "bfloat16"``
    (bf16 master weights). Off: refused, as X's small averaging steps round away in bf16."""
    sigterm_poll_steps: int = 10
    """Ranks agree on "did any rank get SIGTERM" (a small CPU collective) every this many steps;
    the run stops at the next such step, so allow this many steps of grace after the signal."""


def job_config_cls() -> type:
    """Our sections, merged into torchtitan's JobConfig by its ConfigManager: every registered
    optimizer's hyper-parameter dataclass as its own section ([amuse], [muon], [sf_adamw], and
    any registered by a custom_import), plus [anytime] and [local_data]."""
    sections: list[tuple[str, type, Any]] = [
        (spec.section, spec.hparams, field(default_factory=spec.hparams))
        for spec in registry.specs()
        if spec.section is not None and spec.hparams is not None
    ]
    sections += [
        ("model", ModelOptions, field(default_factory=ModelOptions)),
        ("anytime", Anytime, field(default_factory=Anytime)),
        ("local_data", LocalData, field(default_factory=LocalData)),
    ]
    choices = _choice_sections()  # its [model] extends ModelOptions
    replaced = {name for name, _, _ in choices}
    sections = [s for s in sections if s[0] not in replaced] + choices
    return make_dataclass("JobConfig", sections)


def _choices(name: str, values: list[str], default: str, doc: str) -> tuple[str, Any, Any]:
    """A str field typed as the Literal of its valid values, so ``--help`` lists them."""
    return (name, Literal[tuple(values)], field(default=default, metadata={"help": doc}))


def _choice_sections() -> list[tuple[str, type, Any]]:
    """``[optimizer] name``, ``[model] flavor`` and the dataset keys with their valid values as
    types (torchtitan merges same-named sections), so ``--help`` lists the choices and a wrong
    value names them. Empty where torchtitan has not been imported (nothing to merge into)."""
    if "torchtitan" not in sys.modules:
        return []
    from torchtitan.hf_datasets.text_datasets import DATASETS

    from amuse_dist.titan.loaders import hub
    from amuse_dist.titan.model import FLAVORS

    hub.register_datasets()
    datasets = sorted(set(DATASETS) | set(dataset_table.names()))
    optimizer = make_dataclass(
        "Optimizer",
        [
            _choices(
                "name",
                registry.names(),
                "AdamW",
                "The optimizer (any letter case); its hyper-parameters are in its own section.",
            )
        ],
    )
    model = make_dataclass(
        "Model",
        [_choices("flavor", list(FLAVORS), "debugmodel", "Model size (llama3 flavors).")],
        bases=(ModelOptions,),
    )
    training = make_dataclass(
        "Training", [_choices("dataset", datasets, "c4_test", "A registered dataset.")]
    )
    validation = make_dataclass(
        "Validation", [_choices("dataset", datasets, "c4_validation", "A registered dataset.")]
    )
    return [
        (name, cls, field(default_factory=cls))
        for name, cls in (
            ("optimizer", optimizer),
            ("model", model),
            ("training", training),
            ("validation", validation),
        )
    ]


def __getattr__(name: str) -> Any:
    """``JobConfig`` is built on access, from the registry as it is then (torchtitan reads
    ``<custom_config_module>.JobConfig``)."""
    if name == "JobConfig":
        return job_config_cls()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class ModelOptions:
    """Keys added to torchtitan's ``[model]`` (ConfigManager merges same-named sections): the
    paper's model options. The defaults are torchtitan's Llama 3; the paper's Llama is
    ``tie_embeddings = true``, ``init_std = 0.02``, ``rope_theta = 10000.0``, ``rope_scaling = false``."""

    tie_embeddings: bool = False
    """One parameter for the token embedding and the output head (exports tie_word_embeddings)."""
    init_std: float | None = None
    """Unset: torchtitan's init. A float: every weight matrix drawn from N(0, init_std)."""
    rope_theta: float | None = None
    """RoPE base; unset keeps the flavor's (500000 for llama3_amuse flavors)."""
    rope_scaling: bool = True
    """Llama 3's long-context RoPE frequency scaling; the authors' Llama has none (false)."""


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config problem; the message lists every problem found, one per line."""


def merged_job_config_cls() -> type:
    """torchtitan's JobConfig with this module's sections added (imports torchtitan)."""
    from torchtitan.config import ConfigManager
    from torchtitan.config import JobConfig as TitanJobConfig

    return ConfigManager._merge_configs(TitanJobConfig, job_config_cls())


def _did_you_mean(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _fmt(value: Any) -> str:
    return (
        f'"{value}"'
        if isinstance(value, str)
        else repr(value).replace("True", "true").replace("False", "false")
    )


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(_fmt(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(inner)}"
    names = {int: "an int", float: "a float", bool: "a bool (true/false)", str: "a string"}
    if tp is type(None):
        return "unset"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if origin is list:
        args = typing.get_args(tp)
        return isinstance(value, list) and (not args or all(_type_ok(v, args[0]) for v in value))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # TOML ints are fine where floats are expected
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _check_types(cls: type, data: dict[str, Any], where: str, errors: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        name = f"[{where}] {key}" if where else f"[{key}]"
        if key not in known:
            valid = ", ".join(sorted(known))
            kind = "section" if not where else "key"
            hint = _did_you_mean(key, sorted(known))
            errors.append(f"{name}: unknown {kind}{hint}; valid {kind}s are: {valid}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                errors.append(f"{name}: expected a table (section), got {_fmt(value)}")
            else:
                _check_types(tp, value, f"{where}.{key}" if where else key, errors)
        elif not _type_ok(value, tp):
            section = f"[{where}] " if where else ""
            hint = ""
            if typing.get_origin(tp) is Literal and isinstance(value, str):
                hint = _did_you_mean(value, [str(v) for v in typing.get_args(tp)])
            errors.append(f"{section}{key} = {_fmt(value)}:{hint} expected {_type_name(tp)}")


def _in(lo: float, hi: float, lo_open: bool = True, hi_open: bool = True):
    def ok(v: float) -> bool:
        a = v > lo if lo_open else v >= lo
        b = v < hi if hi_open else v <= hi
        return a and b and math.isfinite(v)

    lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
    hi_s = "inf" if math.isinf(hi) else f"{hi:g}"
    return ok, f"a float in {lb}{lo:g}, {hi_s}{rb}"


def _int_at_least(n: int):
    return (lambda v: v >= n), f"an int >= {n}"


# (section, key) -> (predicate, expected description)
_RANGES: dict[tuple[str, str], tuple[Any, str]] = {
    ("local_data", "vocab_size"): _int_at_least(258),  # 256 bytes + BOS + EOS
    ("optimizer", "lr"): _in(0, math.inf),
    ("optimizer", "beta1"): _in(0, 1, lo_open=False),
    ("optimizer", "beta2"): _in(0, 1, lo_open=False),
    ("optimizer", "eps"): _in(0, math.inf),
    ("optimizer", "weight_decay"): _in(0, math.inf, lo_open=False),
    ("lr_scheduler", "warmup_steps"): _int_at_least(0),
    ("training", "steps"): _int_at_least(0),
    ("training", "local_batch_size"): _int_at_least(1),
    ("training", "seq_len"): _int_at_least(1),
    ("training", "max_norm"): _in(0, math.inf),
    ("metrics", "log_freq"): _int_at_least(1),
    ("checkpoint", "interval"): _int_at_least(1),
    ("checkpoint", "keep_latest_k"): (
        lambda v: v == 0 or v >= 2,
        "0 (keep every checkpoint) or an int >= 2 (torchtitan keeps at least 2)",
    ),
    ("anytime", "nonfinite_skips"): _int_at_least(0),
    ("anytime", "keep_exports"): _int_at_least(0),
    ("anytime", "max_position_embeddings"): _int_at_least(0),
    ("anytime", "sigterm_poll_steps"): _int_at_least(1),
}


def check_values(cfg: Any, explicit: set[tuple[str, str]] = frozenset()) -> list[str]:
    """Range and cross-field checks on a parsed (merged) JobConfig; returns error lines.

    ``explicit`` holds the (section, key) pairs the TOML or the command line set, so a setting
    the chosen optimizer would not read is an error rather than silently ignored.
    """
    errors: list[str] = []
    for (section, key), (ok, expected) in _RANGES.items():
        value = getattr(getattr(cfg, section), key)
        if not ok(value):
            errors.append(f"[{section}] {key} = {_fmt(value)}: expected {expected}")
    for spec in registry.specs():
        if spec.section is not None and spec.hparams is not None:
            values = dataclasses.asdict(getattr(cfg, spec.section))
            for key, value, expected in hparams.range_errors(spec.hparams, values):
                errors.append(f"[{spec.section}] {key} = {_fmt(value)}: expected {expected}")

    name = cfg.optimizer.name
    spec = registry.find(name)
    if spec is None:
        errors.append(f"[optimizer] name = {_fmt(name)}: {registry.unknown_message(name)}")
    else:
        errors += _optimizer_checks(cfg, spec, explicit)
    if spec is not None and spec.schedule_free:
        ls = cfg.lr_scheduler
        if ls.warmup_steps != 0:
            errors.append(
                f"[lr_scheduler] warmup_steps = {ls.warmup_steps}: expected 0 with "
                f'[optimizer] name = "{name}" (its warmup is [{spec.section}] warmup_steps; '
                "the LR schedule must be constant)"
            )
        if ls.decay_ratio != 0.0:
            errors.append(
                f"[lr_scheduler] decay_ratio = {_fmt(ls.decay_ratio)}: expected 0.0 with "
                f'[optimizer] name = "{name}" (schedule-free averaging replaces LR decay; '
                "a decaying schedule is not supported)"
            )
    errors += _prelaunch_checks(cfg)
    v = cfg.validation
    if v.enable and v.steps <= 0:
        errors.append(
            f"[validation] steps = {v.steps}: expected an int > 0 (with -1 ranks see "
            "different batch counts and the collectives hang or abort)"
        )
    if v.enable and v.local_batch_size < 1:
        errors.append(
            f"[validation] local_batch_size = {v.local_batch_size}: expected an int >= 1 "
            "(a validation batch of 0 sequences measures nothing)"
        )
    if v.enable and v.freq < 1:
        errors.append(f"[validation] freq = {v.freq}: expected an int >= 1")
    if cfg.anytime.export_x:
        try:
            check_export_folder(cfg.anytime.export_folder)
        except RunError as e:
            errors.append(str(e))
    if v.enable and v.seq_len > cfg.training.seq_len:
        errors.append(
            f"[validation] seq_len = {v.seq_len}: expected <= [training] seq_len = "
            f"{cfg.training.seq_len} (the model's context is the training sequence length)"
        )
    if dataset_table.uses_builtin(cfg) and cfg.model.name == "llama3_amuse":
        from amuse_dist.titan.model import FLAVORS

        flavor = FLAVORS.get(cfg.model.flavor)
        if flavor is not None and cfg.local_data.vocab_size > flavor.vocab_size:
            errors.append(
                f"[local_data] vocab_size = {cfg.local_data.vocab_size}: expected <= "
                f'{flavor.vocab_size}, the vocab of [model] flavor = "{cfg.model.flavor}"'
            )
    errors += check_parallelism(cfg.parallelism)
    if cfg.model.name == "llama3_amuse":
        from amuse_dist.titan.model import FLAVORS

        if cfg.model.flavor not in FLAVORS:
            errors.append(
                f"[model] flavor = {_fmt(cfg.model.flavor)}:"
                f"{_did_you_mean(cfg.model.flavor, list(FLAVORS))} expected one of "
                + ", ".join(map(_fmt, FLAVORS))
            )
    return errors


def _optimizer_checks(cfg: Any, spec: registry.OptimizerSpec, explicit: set) -> list[str]:
    """Settings the chosen optimizer cannot honour, found before any process group starts."""
    errors = []
    name = spec.name
    if spec.build is not None:
        for key in _TITAN_OPTIMIZER_KEYS:
            if ("optimizer", key) in explicit:
                where = f"[{spec.section}]" if spec.section else "its own section"
                errors.append(
                    f"[optimizer] {key} = {_fmt(getattr(cfg.optimizer, key))}: not read by {name} "
                    f"(only lr is read from [optimizer]; its hyper-parameters live in {where})"
                )
        if cfg.optimizer.early_step_in_backward:
            errors.append(f"[optimizer] early_step_in_backward = true: not supported by {name}")
        if (
            spec.averaging
            and cfg.training.dtype == "bfloat16"
            and not cfg.anytime.allow_bf16_master_weights
        ):
            errors.append(
                f'[training] dtype = "bfloat16": bf16 master weights with {name}, whose averaged '
                "weights X move by c_t ~ 1/t of a step (about 0.01): in bf16 (8 mantissa bits) "
                'X stops moving. Use dtype = "float32" (mixed_precision_param = "bfloat16" '
                "keeps bf16 compute), or set [anytime] allow_bf16_master_weights = true"
            )
        if cfg.fault_tolerance.enable:
            errors.append(f"[fault_tolerance] enable = true: not supported by {name}")
    return errors


def _prelaunch_checks(cfg: Any) -> list[str]:
    """Checks that torchtitan or amuse_dist would otherwise make on every rank after start-up."""
    errors = []
    ck = cfg.checkpoint
    if ck.enable and str(ck.async_mode).lower() != "disabled":
        errors.append(
            f'[checkpoint] async_mode = {_fmt(ck.async_mode)}: expected "disabled" (amuse_dist\'s '
            "checkpoints are atomic: the X export must finish before the folder is published)"
        )
    errors += _run_folder_checks(cfg)
    errors += _tokenizer_check(cfg)
    workers = cfg.training.dataloader.num_workers
    if workers != 0 and not dataset_table.is_offline(cfg.training.dataset):
        errors.append(
            f"[training.dataloader] num_workers = {workers}: expected 0 with [training] dataset = "
            f"{_fmt(cfg.training.dataset)} (the world-size-independent loader keeps its stream "
            "position in the training process; token_shards datasets allow workers)"
        )
    return errors


def disk_space_warning(cfg: Any) -> str | None:
    """A warning when the checkpoint folder's file system has less free space than two
    checkpoints (a save is written in full before the previous one may be purged).

    The size: the newest checkpoint's manifest when resuming, else an estimate from the model
    (about 12 L d^2 + 2 V d fp32 parameters, times 4 for the weights and three optimizer states,
    plus the X export)."""
    import os
    import shutil

    from amuse_dist.anytime import integrity
    from amuse_dist.anytime import run_format as rf

    ck = cfg.checkpoint
    if not ck.enable:
        return None
    folder = os.path.join(cfg.job.dump_folder, ck.folder)
    steps = rf.complete_steps(folder)
    data = integrity.read_manifest(os.path.join(folder, f"step-{steps[-1]}")) if steps else None
    if data:
        need = sum(int(v[0]) for v in data["files"].values())
    else:
        from amuse_dist.titan.model import FLAVORS

        args = FLAVORS.get(cfg.model.flavor) if cfg.model.name == "llama3_amuse" else None
        if args is None:
            return None
        n = 12 * args.n_layers * args.dim**2 + 2 * args.vocab_size * args.dim
        need = n * 4 * 5
    probe = folder
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if free >= 2 * need:
        return None
    return (
        f"[checkpoint] folder = {folder}: {free / 1e9:.1f} GB free, a checkpoint needs about "
        f"{need / 1e9:.1f} GB and a save needs room for two; free space before the first save "
        "(a full disk stops the run at the save, the previous checkpoint is kept)"
    )


def _tokenizer_check(cfg: Any) -> list[str]:
    """A ``tokenizer.json`` that does not load (garbage, truncated) is named before start-up,
    not as a traceback after it (the offline corpus builds its own: not checked here)."""
    import os

    path = cfg.model.hf_assets_path
    if not path or not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return []
    from amuse_dist.data import DataError
    from amuse_dist.data.tokenizer import Encoder

    try:
        Encoder(path)
    except DataError as e:
        return [
            f"[model] hf_assets_path = {path}: {e}; rebuild it with amuse-tokenizer or point "
            "--model.hf_assets_path at a tokenizer folder"
        ]
    return []


def _run_folder_checks(cfg: Any) -> list[str]:
    """What the run folder lets us know before start-up: folders that are files or not
    writable, an export folder that collides with the Y export, a checkpoint folder of another
    run, and a resume whose ``[training] steps`` is already behind the newest checkpoint."""
    import os

    from amuse_dist.anytime import run_format as rf

    errors = []
    dump = cfg.job.dump_folder
    problem = rf.check_folder_path(dump, "[job] dump_folder")
    if problem:
        return [problem]
    for name in (rf.LOCK_FILE, rf.LOCK_INFO, "train.log"):
        if os.path.islink(os.path.join(dump, name)):
            errors.append(
                f"{os.path.join(dump, name)} is a symlink to {os.readlink(os.path.join(dump, name))}: "
                "amuse_dist never writes through a link in the run folder; remove the link (keep "
                "its target) and rerun"
            )
    # rank 0 only: ranks probing together would see each other's probe as a busy folder
    busy = rf.RunLock(dump).busy() if int(os.environ.get("RANK", "0")) == 0 else None
    if busy:  # the run state below is the other run's to change: say only this
        return [busy]
    ck = cfg.checkpoint
    if not ck.enable:
        return errors
    folder = os.path.join(dump, ck.folder)
    problem = rf.check_folder_path(folder, "[checkpoint] folder")
    if problem:
        return [problem]
    a = cfg.anytime
    if a.export_x and a.export_y and a.export_folder == "y":
        errors.append(
            '[anytime] export_folder = "y": the Y export ([anytime] export_y = true) is written '
            'to step-N/y, so the X export would be replaced by it; choose another name, e.g. "x"'
        )
    try:
        problem = rf.owner_problem(folder, dump, rf.run_id(dump, create=False))
    except OSError:
        problem = None
    if problem:
        errors.append(problem)
    steps = rf.complete_steps(folder)
    if ck.load_step == -1 and steps and steps[-1] > cfg.training.steps and not problem:
        errors.append(
            f"[training] steps = {cfg.training.steps}: the newest checkpoint in {folder} is "
            f"step-{steps[-1]}, already beyond it (nothing would be trained); raise "
            f"--training.steps above {steps[-1]}, or roll back with --checkpoint.load_step"
        )
    return errors


def check_parallelism(par: Any, world_size: int | None = None) -> list[str]:
    """Mesh layouts the trainer cannot run, refused before any process group starts.

    Supported: 1-D FSDP, DDP, HSDP (``data_parallel_replicate_degree`` > 1), TP and FSDP+TP
    (``tensor_parallel_degree`` > 1 with ``data_parallel_shard_degree`` > 1). ``world_size``
    defaults to torchrun's WORLD_SIZE when set, so the degrees are checked against the ranks.
    """
    errors = []
    if par.pipeline_parallel_degree > 1:
        errors.append(
            f"[parallelism] pipeline_parallel_degree = {par.pipeline_parallel_degree}: expected 1; "
            "pipeline parallelism is not supported by amuse_dist's trainer (each rank would hold "
            "only its stages: the validator, X export and CPU init need the whole model)"
        )
    if par.context_parallel_degree > 1:
        errors.append(
            f"[parallelism] context_parallel_degree = {par.context_parallel_degree}: expected 1; "
            "context parallelism is not supported by amuse_dist's trainer (its validator does not "
            "shard sequences; on CPU, attention has no DTensor sharding rule)"
        )
    if world_size is None and os.environ.get("WORLD_SIZE", "").isdigit():
        world_size = int(os.environ["WORLD_SIZE"])
    rep, shard, tp = (
        par.data_parallel_replicate_degree,
        par.data_parallel_shard_degree,
        par.tensor_parallel_degree,
    )
    others = rep * tp * max(1, par.pipeline_parallel_degree) * max(1, par.context_parallel_degree)
    degrees = {
        "data_parallel_replicate_degree": rep,
        "data_parallel_shard_degree": shard,
        "tensor_parallel_degree": tp,
        "pipeline_parallel_degree": par.pipeline_parallel_degree,
        "context_parallel_degree": par.context_parallel_degree,
    }
    layout = ", ".join(f"{k} = {v}" for i, (k, v) in enumerate(degrees.items()) if i < 3 or v != 1)
    if world_size is not None and min(rep, tp) >= 1 and shard != 0:
        if shard < 0 and world_size % others == 0:
            shard = world_size // others
        if shard < 0 or shard * others != world_size:
            errors.append(
                f"[parallelism] {layout}: their product must equal the {world_size} ranks "
                "launched (data_parallel_shard_degree = -1 takes what the others leave)"
            )
    if rep > 1 and tp > 1 and shard == 1:
        errors.append(
            f"[parallelism] {layout}: DDP + TP is not supported by torchtitan; use "
            "data_parallel_shard_degree > 1 (HSDP + TP) or data_parallel_replicate_degree = 1"
        )
    return errors


def load_toml(path: str) -> dict[str, Any]:
    """Read a TOML file, turning every way it can be unreadable into a ConfigError naming it."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except IsADirectoryError as e:
        raise ConfigError(f"config file {path} is a directory: expected a TOML file") from e
    except PermissionError as e:
        raise ConfigError(f"config file {path} cannot be read: permission denied") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (a binary file?): {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e


def config_path(args: list[str]) -> str | None:
    """The value of ``--job.config_file`` (or ``--job.config-file``) in ``args``, if any."""
    for i, a in enumerate(args):
        for key in ("--job.config_file", "--job.config-file"):
            if a == key and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(key + "="):
                return a.split("=", 1)[1]
    return None


def parse_job_config(args: list[str]) -> Any:
    """Parse CLI args (with ``--job.config_file``) into the merged JobConfig via torchtitan.

    Optimizer names are written back in their registered spelling first, in the TOML and on the
    command line alike, so they match in any letter case.
    """
    from torchtitan.config import ConfigManager

    class Manager(ConfigManager):
        def _maybe_load_toml(self, args: list[str]) -> dict[str, Any] | None:
            toml = super()._maybe_load_toml(args)
            return _canonical_toml(toml) if toml else toml

    return Manager(config_cls=merged_job_config_cls()).parse_args(_canonical_optimizer(args))


def _canonical_toml(toml: dict[str, Any]) -> dict[str, Any]:
    """The TOML with ``[optimizer] name`` in its registered spelling (when it names one)."""
    section = toml.get("optimizer")
    name = section.get("name") if isinstance(section, dict) else None
    spec = registry.find(name) if isinstance(name, str) else None
    if spec is not None:
        section["name"] = spec.name
    return toml


def check_toml(path: str) -> list[str]:
    """Unknown sections/keys and wrong types in the raw TOML (torchtitan's own message for an
    unknown key names neither the file nor the section, and it does not check types)."""
    errors: list[str] = []
    _check_types(merged_job_config_cls(), _canonical_toml(load_toml(path)), "", errors)
    return errors


def check_cli_keys(args: list[str]) -> list[str]:
    """Unknown ``--section.key`` overrides, one line each (tyro's own message is a box of
    help text that hides which key was wrong)."""
    import dataclasses
    import typing

    errors = []
    root = merged_job_config_cls()
    for a in args:
        if not a.startswith("--") or "." not in a.split("=", 1)[0]:
            continue
        parts = a[2:].split("=", 1)[0].replace("-", "_").split(".")
        cls: Any = root
        for i, part in enumerate(parts):
            hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
            name = part[3:] if part.startswith("no_") and part[3:] in hints else part
            if name not in hints:
                flag, dym = a.split("=", 1)[0], _did_you_mean(part, list(hints))
                if i:
                    errors.append(f"{flag}: [{'.'.join(parts[:i])}] {part}: unknown key{dym}")
                else:
                    errors.append(f"{flag}: [{part}]: unknown section{dym}")
                break
            cls = hints[name]
    return errors


def _cli_value(args: list[str], key: str) -> str | None:
    """The value given to ``--key`` on the command line (last one wins), if any."""
    value = None
    for i, a in enumerate(args):
        if a == f"--{key}" and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(f"--{key}="):
            value = a.split("=", 1)[1]
    return value


def import_plugins(args: list[str], toml: dict[str, Any]) -> None:
    """Import ``[experimental] custom_import`` before parsing: a module that registers an
    optimizer (or a dataset) adds its section to the schema this way."""
    module = _cli_value(args, "experimental.custom_import")
    if module is None:
        module = (toml.get("experimental") or {}).get("custom_import")
    if module:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"[experimental] custom_import = {_fmt(module)}: {e}") from e


def explicit_keys(args: list[str], toml: dict[str, Any]) -> set[tuple[str, str]]:
    """(section, key) pairs the TOML or the command line sets explicitly."""
    out = {
        (section, key)
        for section, table in toml.items()
        if isinstance(table, dict)
        for key in table
    }
    for a in args:
        if a.startswith("--") and "." in a:
            section, _, key = a[2:].split("=", 1)[0].partition(".")
            out.add((section, key.replace("-", "_")))
    return out


def _canonical_optimizer(args: list[str]) -> list[str]:
    """Optimizer names match in any letter case: write the registered spelling back."""
    args = list(args)
    for i, a in enumerate(args):
        if a == "--optimizer.name" and i + 1 < len(args):
            spec = registry.find(args[i + 1])
            args[i + 1] = spec.name if spec else args[i + 1]
        elif a.startswith("--optimizer.name="):
            spec = registry.find(a.split("=", 1)[1])
            args[i] = f"--optimizer.name={spec.name}" if spec else a
    return args


def load_job_config(args: list[str]) -> Any:
    """Parse ``args`` (``--job.config_file`` and overrides) into a checked JobConfig.

    Checks keys and types on the raw TOML first, then value ranges and cross-field rules on the
    parsed config. Raises ConfigError naming section, key and expected value for every problem.
    Runs in-process before any process group, so every entry point fails fast with exit 2.
    """
    path = config_path(args)
    toml = load_toml(path) if path is not None else {}
    import_plugins(args, toml)
    errors = check_toml(path) if path is not None else []
    errors += check_cli_keys(args)
    name = _cli_value(args, "optimizer.name")
    if name is not None and registry.find(name) is None:
        errors.append(f"--optimizer.name {name}: {registry.unknown_message(name)}")
    config = None
    if not errors:
        config = parse_job_config(args)
        errors = check_values(config, explicit_keys(args, toml))
    if errors:
        raise ConfigError(f"invalid config {path}:\n  " + "\n  ".join(errors))
    return config


def validate_config(path: str, overrides: list[str] | None = None) -> Any:
    """``load_job_config`` for a TOML file and CLI ``overrides``; returns the JobConfig."""
    return load_job_config(["--job.config_file", path, *(overrides or [])])
