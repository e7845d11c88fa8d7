"""The optimizer registry and the hyper-parameter dataclasses: one source for TOML and Python."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from amuse_dist.optim import hparams, registry
from amuse_dist.titan.config import ConfigError, validate_config
from tests._titan import DEBUG_TOML, debug_args, tb_scalars, torchrun
from tests.toy import make_model


def _bad_value(rng: hparams.Range) -> float:
    """A value just outside ``rng`` (its lower bound when open, else below it)."""
    if rng.integer:
        return int(rng.lo) - 1
    return rng.lo if rng.lo_open else rng.lo - 0.5


RANGE_CASES = [
    (spec, key, _bad_value(rng))
    for spec in registry.specs()
    if spec.hparams is not None
    for key, rng in hparams.ranges(spec.hparams).items()
]


@pytest.mark.unit
@pytest.mark.parametrize(
    "spec,key,bad", RANGE_CASES, ids=[f"{s.section}.{k}" for s, k, _ in RANGE_CASES]
)
def test_ranges_from_the_dataclass_on_both_paths(
    spec: registry.OptimizerSpec, key: str, bad: float
) -> None:
    """Each field's range is enforced by the TOML section and by the constructor alike."""
    with pytest.raises(ConfigError, match=rf"\[{spec.section}\] {key} = "):
        validate_config(str(DEBUG_TOML), [f"--{spec.section}.{key}", str(bad)])
    hp = dataclasses.replace(spec.hparams(), **{key: bad})
    with pytest.raises(ValueError, match=rf"{key} = "):
        spec.build(make_model(), 0.01, hp)
    # and the default is valid on both paths
    spec.build(make_model(), 0.01, spec.hparams())


@pytest.mark.unit
def test_defaults_live_once() -> None:
    """The constructors' defaults are the dataclasses' (no second copy to drift)."""
    import inspect

    from amuse_dist.optim import AMUSE, Muon, schedule_free_adamw

    for fn, spec in ((AMUSE, "AMUSE"), (Muon, "Muon"), (schedule_free_adamw, "ScheduleFreeAdamW")):
        sig = inspect.signature(fn)
        for key, value in hparams.defaults(registry.get(spec).hparams).items():
            assert sig.parameters[key].default == value, (spec, key)


@pytest.mark.unit
def test_names_are_case_insensitive_with_a_clear_list() -> None:
    assert registry.get("amuse").name == "AMUSE"
    assert validate_config(str(DEBUG_TOML), ["--optimizer.name", "adamw"]).optimizer.name == "AdamW"
    with pytest.raises(ConfigError, match='did you mean "AMUSE"') as info:
        validate_config(str(DEBUG_TOML), ["--optimizer.name", "AMUSEE"])
    assert "ScheduleFreeAdamW" in str(info.value)


@pytest.mark.unit
def test_optimizer_keys_the_chosen_optimizer_would_ignore() -> None:
    with pytest.raises(ConfigError, match=r"\[optimizer\] weight_decay = 0.2: not read by AMUSE"):
        validate_config(str(DEBUG_TOML), ["--optimizer.weight_decay", "0.2"])


@pytest.mark.e2e
def test_toy_optimizer_registered_from_a_test_trains_checkpoints_and_exports(
    tmp_path: Path, assets: Path
) -> None:
    """A new averaging optimizer, registered outside the package, runs through the real trainer:
    validation at X, a checkpoint naming it, and an X export (no titan/ module edited)."""
    args = debug_args(
        tmp_path,
        assets,
        steps=4,
        optimizer__name="toyaveraging",
        optimizer__lr=0.05,
        toy_avg__c=0.25,
        checkpoint__interval=4,
        validation__freq=4,
        validation__steps=1,
    )
    torchrun(2, [*args, "--experimental.custom_import", "tests.toy_optimizer"], tmp_path)
    step = tmp_path / "checkpoint" / "step-4"
    meta = json.loads((step / "amuse_meta.json").read_text())
    assert meta["optimizer"] == "ToyAveraging"
    info = json.loads((step / "x" / "amuse_export.json").read_text())
    assert (info["weights"], info["optimizer"]) == ("x", "ToyAveraging")
    tags = tb_scalars(tmp_path)
    x, y = tags["validation_x/loss"][4], tags["validation_y/loss"][4]
    assert math.isfinite(x) and math.isfinite(y) and x != y
    assert tags["amuse/c"][4] == 0.25
    from safetensors.torch import load_file

    exported = load_file(next((step / "x").glob("*.safetensors")))
    assert all(torch.isfinite(t).all() for t in exported.values())
