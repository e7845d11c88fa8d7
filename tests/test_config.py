"""Config validation: bad TOMLs fail before any process group, naming section and key."""

import sys
from pathlib import Path
from typing import Any

import pytest

try:
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib

from amuse_dist.titan.config import ConfigError, validate_config
from tests._preload import run_cmd
from tests._titan import DEBUG_TOML, REPO, env

CONFIGS = sorted((REPO / "train_configs").glob("*.toml"))


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return repr(v)


def write_toml(path: Path, data: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_value(v)}" for k, v in table.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def debug_with(tmp_path: Path, **changes: Any) -> Path:
    """debug_cpu.toml with ``section__key=value`` changes (value None deletes the key)."""
    data = tomllib.loads(DEBUG_TOML.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        table = data.setdefault(section, {})
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    return write_toml(tmp_path / "bad.toml", data)


@pytest.mark.unit
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_are_valid(path: Path) -> None:
    validate_config(str(path))


@pytest.mark.unit
def test_paper_hyperparameters() -> None:
    """The AMUSE configs carry the spec's table."""
    expect = {  # flavor, T0, beta1, wd, clip, global batch, steps
        "llama3_124m.toml": ("124M", 6000, 0.6, 0.05, 0.5, 256, 16000),
        "llama3_720m.toml": ("720M", 2000, 0.4, 0.1, 0.1, 1984, 16000),
        "llama3_1b.toml": ("1.3B", 2000, 0.4, 0.1, 0.1, 2048, 24800),
    }
    for name, (flavor, t0, beta1, wd, clip, gbs, steps) in expect.items():
        c = tomllib.loads((REPO / "train_configs" / name).read_text())
        assert c["model"]["flavor"] == flavor
        assert c["optimizer"] == {"name": "AMUSE", "lr": 0.01}
        a = c["amuse"]
        assert (a["warmup_steps"], a["beta1"], a["weight_decay"]) == (t0, beta1, wd)
        assert (a["rho"], a["momentum"], a["betas2"], a["eps"]) == (0.8, 0.95, 0.999, 1e-10)
        t = c["training"]
        assert (t["max_norm"], t["global_batch_size"], t["steps"], t["seq_len"]) == (
            clip,
            gbs,
            steps,
            512,
        )
    from amuse_dist.titan.model import FLAVORS

    for flavor, dims in {
        "124M": (768, 12, 12),
        "720M": (2048, 16, 12),
        "1.3B": (2048, 32, 24),
    }.items():
        f = FLAVORS[flavor]
        assert (f.dim, f.n_heads, f.n_layers) == dims


BAD = [
    # (changes, substrings the message must contain)
    ({"amuse__beta1": 1.5}, ["[amuse] beta1 = 1.5", "expected a float in (0, 1)"]),
    ({"amuse__beta_1": 0.5}, ["[amuse] beta_1", "unknown key"]),
    ({"amuze__beta1": 0.5}, ["[amuze]", "unknown section"]),
    ({"amuse__warmup_steps": "100"}, ["[amuse] warmup_steps", "expected an int"]),
    ({"amuse__warmup_steps": 0}, ["[amuse] warmup_steps = 0", ">= 1"]),
    ({"amuse__exact_x": 1}, ["[amuse] exact_x", "bool"]),
    ({"amuse__rho": -0.1}, ["[amuse] rho = -0.1"]),
    ({"amuse__ns_steps": 2.5}, ["[amuse] ns_steps", "expected an int"]),
    ({"training__stepz": 10}, ["[training] stepz", "unknown key"]),
    ({"optimizer__name": "Adam2"}, ["[optimizer] name", "AMUSE"]),
    ({"optimizer__lr": -1.0}, ["[optimizer] lr = -1.0"]),
    ({"lr_scheduler__decay_ratio": 0.2}, ["[lr_scheduler] decay_ratio = 0.2", "AMUSE"]),
    ({"lr_scheduler__warmup_steps": 100}, ["[lr_scheduler] warmup_steps = 100", "constant"]),
    ({"lr_scheduler__decay_ratio": None}, ["[lr_scheduler] decay_ratio = None"]),
    ({"validation__steps": -1}, ["[validation] steps = -1"]),
    ({"model__flavor": "huge"}, ["[model] flavor", "tiny"]),
    ({"local_data__vocab_size": 4096}, ["[local_data] vocab_size = 4096", "2048"]),
    ({"training__dtype": "float16"}, ["[training] dtype", "bfloat16"]),
]


@pytest.mark.unit
@pytest.mark.parametrize("changes,needles", BAD, ids=[next(iter(c)) for c, _ in BAD])
def test_bad_config_names_key(tmp_path: Path, changes: dict, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(str(debug_with(tmp_path, **changes)))
    for needle in needles:
        assert needle in str(info.value), str(info.value)


@pytest.mark.unit
def test_sf_adamw_also_needs_constant_schedule(tmp_path: Path) -> None:
    bad = debug_with(tmp_path, optimizer__name="ScheduleFreeAdamW", lr_scheduler__decay_ratio=0.5)
    with pytest.raises(ConfigError, match=r"\[lr_scheduler\] decay_ratio = 0.5"):
        validate_config(str(bad))


@pytest.mark.unit
def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    bad = debug_with(tmp_path, amuse__beta1=2.0, amuse__momentum=1.0)
    with pytest.raises(ConfigError) as info:
        validate_config(str(bad))
    assert "[amuse] beta1" in str(info.value) and "[amuse] momentum" in str(info.value)


@pytest.mark.unit
def test_cli_override_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"\[amuse\] rho = -1.0"):
        validate_config(str(DEBUG_TOML), ["--amuse.rho", "-1.0"])


@pytest.mark.e2e
def test_entry_point_fails_fast_without_process_group(tmp_path: Path) -> None:
    """The real entry point rejects a bad config (exit 2) before torch.distributed starts."""
    bad = debug_with(tmp_path, amuse__beta1=1.5)
    proc = run_cmd(
        [sys.executable, "-m", "amuse_dist.train", "--job.config_file", str(bad)],
        env=env(tmp_path),
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "[amuse] beta1 = 1.5: expected a float in (0, 1)" in proc.stderr
    assert "init_process_group" not in proc.stderr


@pytest.mark.e2e
@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--checkpoint.async_mode", "async"], '[checkpoint] async_mode = "async"'),
        (["--checkpoint.keep_latest_k", "-1"], "[checkpoint] keep_latest_k = -1"),
    ],
    ids=["async_mode", "keep_latest_k"],
)
def test_prelaunch_checks_exit_2_before_any_process_group(
    tmp_path: Path, extra: list[str], needle: str
) -> None:
    """Settings the trainer cannot honour fail in seconds, before torch.distributed starts."""
    proc = run_cmd(
        [sys.executable, "-m", "amuse_dist.train", "--job.config_file", str(DEBUG_TOML), *extra],
        env=env(tmp_path),
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert needle in proc.stderr
    assert "init_process_group" not in proc.stderr and "Starting job" not in proc.stderr


@pytest.mark.unit
@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda d: d, "is a directory"),
        (lambda d: (d / "bin.toml").write_bytes(b"\xff\xfe\x00binary") and d / "bin.toml", "UTF-8"),
    ],
    ids=["directory", "binary"],
)
def test_unreadable_config_file_is_named(tmp_path: Path, make, needle: str) -> None:
    path = make(tmp_path)
    with pytest.raises(ConfigError, match=needle) as info:
        validate_config(str(path))
    assert str(path) in str(info.value)


@pytest.mark.unit
def test_typo_gets_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r'\[amuse\] betas_2: unknown key \(did you mean "betas2"\?\)'
    ):
        validate_config(str(debug_with(tmp_path, amuse__betas_2=0.9)))
