"""TOML extensions (``[amuse]``, ``[muon]``, ``[local_data]``) and config validation.

Loaded by torchtitan through ``[job] custom_config_module = "amuse_dist.titan.config"``. The
dataclasses import nothing from torchtitan so validation can run before torchtitan is imported.
``validate_config`` checks a TOML file before any process group starts, so a typo fails in a
second with a message naming section, key and expected value rather than on N ranks later.
"""

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

try:
    import tomllib
except ModuleNotFoundError:  # python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

OPTIMIZERS = ("AMUSE", "AdamW", "Muon", "ScheduleFreeAdamW")
SCHEDULE_FREE = ("AMUSE", "ScheduleFreeAdamW")
LOCAL_DATASETS = ("local_corpus", "local_corpus_validation")


@dataclass
class Amuse:
    """AMUSE hyper-parameters (lr comes from ``[optimizer] lr``). Also used for the
    warmup of ScheduleFreeAdamW, whose warmup lives inside the optimizer."""

    warmup_steps: int = 2000
    """T0: linear warmup inside the optimizer (>= 1); no external LR schedule."""
    beta1: float = 0.6
    """Interpolation weight of X in Y during warmup, in (0, 1)."""
    rho: float = 0.8
    """Exponent of the post-warmup beta_t schedule, >= 0."""
    momentum: float = 0.95
    """Muon-branch Nesterov momentum mu, in [0, 1)."""
    weight_decay: float = 0.0
    """Decoupled weight decay applied to Z, >= 0."""
    betas2: float = 0.999
    """AdamW-branch second-moment decay, in [0, 1)."""
    eps: float = 1e-10
    """AdamW-branch epsilon, > 0."""
    weight_lr_power: float = 2.0
    """p in w_t = t**r * lr_t**p, >= 0."""
    r: float = 0.0
    """r in w_t = t**r * lr_t**p, >= 0."""
    ns_steps: int = 5
    """Newton-Schulz iterations, >= 1."""
    exact_x: bool = False
    """Recover X with the beta that built Y (exact) instead of beta_t (reference code)."""


@dataclass
class Muon:
    """Muon baseline settings (lr and weight decay come from ``[optimizer]``)."""

    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    adamw_beta1: float = 0.8
    adamw_beta2: float = 0.999
    adamw_eps: float = 1e-8


@dataclass
class LocalData:
    """Where the offline corpus and BPE tokenizer are built when a dataset is local_corpus."""

    assets_dir: str = "./outputs/assets"
    vocab_size: int = 2048


@dataclass
class Anytime:
    """Anytime evaluation: X export next to every checkpoint, validation at X and Y, preemption."""

    export_x: bool = True
    """Write the X weights (Y for optimizers without averaging) as HF safetensors into
    ``step-N/<export_folder>`` at every checkpoint."""
    export_folder: str = "x"
    """Name of the export folder inside each ``step-N`` checkpoint folder."""
    validate_x: bool = True
    """Validate at the averaged weights X (AMUSE, ScheduleFreeAdamW): tag validation_x/loss."""
    validate_y: bool = True
    """Also validate at the training weights Y: tag validation_y/loss."""
    save_on_sigterm: bool = True
    """On SIGTERM (SLURM preemption) finish the step, save a checkpoint and exit cleanly."""


@dataclass
class JobConfig:
    """Sections merged into torchtitan's JobConfig by its ConfigManager."""

    amuse: Amuse = field(default_factory=Amuse)
    anytime: Anytime = field(default_factory=Anytime)
    muon: Muon = field(default_factory=Muon)
    local_data: LocalData = field(default_factory=LocalData)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config problem; the message lists every problem found, one per line."""


def merged_job_config_cls() -> type:
    """torchtitan's JobConfig with this module's sections added (imports torchtitan)."""
    from torchtitan.config import ConfigManager
    from torchtitan.config import JobConfig as TitanJobConfig

    return ConfigManager._merge_configs(TitanJobConfig, JobConfig)


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
            errors.append(f"{name}: unknown {kind}; valid {kind}s are: {valid}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                errors.append(f"{name}: expected a table (section), got {_fmt(value)}")
            else:
                _check_types(tp, value, f"{where}.{key}" if where else key, errors)
        elif not _type_ok(value, tp):
            section = f"[{where}] " if where else ""
            errors.append(f"{section}{key} = {_fmt(value)}: expected {_type_name(tp)}")


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
    ("amuse", "warmup_steps"): _int_at_least(1),
    ("amuse", "beta1"): _in(0, 1),
    ("amuse", "rho"): _in(0, math.inf, lo_open=False),
    ("amuse", "momentum"): _in(0, 1, lo_open=False),
    ("amuse", "weight_decay"): _in(0, math.inf, lo_open=False),
    ("amuse", "betas2"): _in(0, 1, lo_open=False),
    ("amuse", "eps"): _in(0, math.inf),
    ("amuse", "weight_lr_power"): _in(0, math.inf, lo_open=False),
    ("amuse", "r"): _in(0, math.inf, lo_open=False),
    ("amuse", "ns_steps"): _int_at_least(1),
    ("muon", "momentum"): _in(0, 1, lo_open=False),
    ("muon", "ns_steps"): _int_at_least(1),
    ("muon", "adamw_beta1"): _in(0, 1, lo_open=False),
    ("muon", "adamw_beta2"): _in(0, 1, lo_open=False),
    ("muon", "adamw_eps"): _in(0, math.inf),
    ("local_data", "vocab_size"): _int_at_least(256),
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
}


def check_values(cfg: Any) -> list[str]:
    """Range and cross-field checks on a parsed (merged) JobConfig; returns error lines."""
    errors: list[str] = []
    for (section, key), (ok, expected) in _RANGES.items():
        value = getattr(getattr(cfg, section), key)
        if not ok(value):
            errors.append(f"[{section}] {key} = {_fmt(value)}: expected {expected}")

    name = cfg.optimizer.name
    if name not in OPTIMIZERS:
        errors.append(
            f"[optimizer] name = {_fmt(name)}: expected one of " + ", ".join(map(_fmt, OPTIMIZERS))
        )
    if name in SCHEDULE_FREE:
        ls = cfg.lr_scheduler
        if ls.warmup_steps != 0:
            errors.append(
                f"[lr_scheduler] warmup_steps = {ls.warmup_steps}: expected 0 with "
                f'[optimizer] name = "{name}" (its warmup is [amuse] warmup_steps; the '
                "LR schedule must be constant)"
            )
        if ls.decay_ratio != 0.0:
            errors.append(
                f"[lr_scheduler] decay_ratio = {_fmt(ls.decay_ratio)}: expected 0.0 with "
                f'[optimizer] name = "{name}" (schedule-free averaging replaces LR decay; '
                "a decaying schedule is not supported)"
            )
    v = cfg.validation
    if v.enable and v.steps <= 0:
        errors.append(
            f"[validation] steps = {v.steps}: expected an int > 0 (with -1 ranks see "
            "different batch counts and the collectives hang or abort)"
        )
    if v.enable and v.freq < 1:
        errors.append(f"[validation] freq = {v.freq}: expected an int >= 1")
    uses_local = cfg.training.dataset in LOCAL_DATASETS or (
        v.enable and v.dataset in LOCAL_DATASETS
    )
    if uses_local and cfg.model.name == "llama3_amuse":
        from amuse_dist.titan.train_spec import FLAVORS

        flavor = FLAVORS.get(cfg.model.flavor)
        if flavor is not None and cfg.local_data.vocab_size > flavor.vocab_size:
            errors.append(
                f"[local_data] vocab_size = {cfg.local_data.vocab_size}: expected <= "
                f'{flavor.vocab_size}, the vocab of [model] flavor = "{cfg.model.flavor}"'
            )
    if cfg.model.name == "llama3_amuse":
        from amuse_dist.titan.train_spec import FLAVORS

        if cfg.model.flavor not in FLAVORS:
            errors.append(
                f"[model] flavor = {_fmt(cfg.model.flavor)}: expected one of "
                + ", ".join(map(_fmt, FLAVORS))
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
    """Parse CLI args (with ``--job.config_file``) into the merged JobConfig via torchtitan."""
    from torchtitan.config import ConfigManager

    return ConfigManager(config_cls=merged_job_config_cls()).parse_args(args)


def check_toml(path: str) -> list[str]:
    """Unknown sections/keys and wrong types in the raw TOML (torchtitan's own message for an
    unknown key names neither the file nor the section, and it does not check types)."""
    errors: list[str] = []
    _check_types(merged_job_config_cls(), load_toml(path), "", errors)
    return errors


def load_job_config(args: list[str]) -> Any:
    """Parse ``args`` (``--job.config_file`` and overrides) into a checked JobConfig.

    Checks keys and types on the raw TOML first, then value ranges and cross-field rules on the
    parsed config. Raises ConfigError naming section, key and expected value for every problem.
    Runs in-process before any process group, so every entry point fails fast with exit 2.
    """
    path = config_path(args)
    errors = check_toml(path) if path is not None else []
    config = None
    if not errors:
        config = parse_job_config(args)
        errors = check_values(config)
    if errors:
        raise ConfigError(f"invalid config {path}:\n  " + "\n  ".join(errors))
    return config


def validate_config(path: str, overrides: list[str] | None = None) -> Any:
    """``load_job_config`` for a TOML file and CLI ``overrides``; returns the JobConfig."""
    return load_job_config(["--job.config_file", path, *(overrides or [])])
