"""The resume contract: which hyper-parameters a resume may change, and which it refuses.

One table keyed by (section, key). A resume compares the checkpoint's saved config
(``amuse_meta.json``) with the new one for every key listed here:

- ``CHANGEABLE``: the new value is applied from the next step (the optimizer's param groups and
  the LR schedule are reset to the new config after loading) and a log line says so;
- ``REFUSED``: the saved optimizer state was built with the old value, so the resume stops with
  an error naming the key, both values and the override (``--anytime.resume_override
  section.key``, or a fresh optimizer from the weights via ``checkpoint.initial_load_path``).

Keys not listed (model shape, optimizer name, data) are checked elsewhere (checkpoint shapes and
optimizer-state signatures) or do not touch the saved state. Imports nothing from torchtitan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CHANGEABLE, REFUSED = "changeable", "refused"

# (section, key) -> (policy, why)
RESUME_CONTRACT: dict[tuple[str, str], tuple[str, str]] = {
    ("optimizer", "lr"): (
        CHANGEABLE,
        "scales the next updates; the schedule-free weights use each step's lr as it comes",
    ),
    ("optimizer", "weight_decay"): (CHANGEABLE, "applied to each next update"),
    ("optimizer", "eps"): (CHANGEABLE, "a denominator guard of each next update"),
    ("optimizer", "beta2"): (CHANGEABLE, "decay of the second moment from the next step"),
    ("optimizer", "beta1"): (
        REFUSED,
        "the saved first moment (AdamW) or the X/Y interpolation "
        "(ScheduleFreeAdamW) was built with it",
    ),
    ("lr_scheduler", "warmup_steps"): (CHANGEABLE, "the schedule is rebuilt from the config"),
    ("lr_scheduler", "decay_ratio"): (CHANGEABLE, "the schedule is rebuilt from the config"),
    ("lr_scheduler", "decay_type"): (CHANGEABLE, "the schedule is rebuilt from the config"),
    ("lr_scheduler", "min_lr_factor"): (CHANGEABLE, "the schedule is rebuilt from the config"),
    ("training", "max_norm"): (CHANGEABLE, "gradient clipping of each next step"),
    ("amuse", "momentum"): (CHANGEABLE, "the momentum buffer just decays at the new rate"),
    ("amuse", "weight_decay"): (CHANGEABLE, "applied to Z at each next update"),
    ("amuse", "betas2"): (CHANGEABLE, "decay of the AdamW branch's second moment"),
    ("amuse", "eps"): (CHANGEABLE, "a denominator guard of each next update"),
    ("amuse", "ns_steps"): (CHANGEABLE, "Newton-Schulz iterations of each next update"),
    ("amuse", "warmup_steps"): (
        REFUSED,
        "the warmup constant c and beta_t that built the saved "
        "Y and Z depend on T0; X recovery would be wrong",
    ),
    ("amuse", "beta1"): (REFUSED, "the saved Y interpolates Z and X with the beta it defines"),
    ("amuse", "rho"): (REFUSED, "beta_t after warmup depends on it; X recovery would be wrong"),
    ("amuse", "weight_lr_power"): (
        REFUSED,
        "the saved weight sum accumulated t**r * lr**p with the old p",
    ),
    ("amuse", "r"): (REFUSED, "the saved weight sum accumulated t**r * lr**p with the old r"),
    ("amuse", "exact_x"): (REFUSED, "changes which beta builds Y from Z and X"),
    ("muon", "weight_decay"): (CHANGEABLE, "applied to each next update"),
    ("sf_adamw", "warmup_steps"): (
        REFUSED,
        "the saved weight sum and the X/Y interpolation were built with the old warmup",
    ),
    ("sf_adamw", "beta1"): (REFUSED, "the saved Y interpolates Z and X with it"),
    ("sf_adamw", "betas2"): (CHANGEABLE, "decay of the second moment from the next step"),
    ("sf_adamw", "eps"): (CHANGEABLE, "a denominator guard of each next update"),
    ("sf_adamw", "weight_decay"): (CHANGEABLE, "applied to each next update"),
    ("muon", "momentum"): (CHANGEABLE, "the momentum buffer just decays at the new rate"),
    ("muon", "nesterov"): (CHANGEABLE, "how each next update reads the momentum"),
    ("muon", "ns_steps"): (CHANGEABLE, "Newton-Schulz iterations of each next update"),
    ("muon", "adamw_beta1"): (CHANGEABLE, "decay of the AdamW branch's first moment"),
    ("muon", "adamw_beta2"): (CHANGEABLE, "decay of the AdamW branch's second moment"),
    ("muon", "adamw_eps"): (CHANGEABLE, "a denominator guard of each next update"),
}


@dataclass
class Change:
    section: str
    key: str
    saved: Any
    new: Any
    policy: str
    why: str

    @property
    def name(self) -> str:
        return f"[{self.section}] {self.key}"


def changes(saved: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every contract key whose value differs between two ``dataclasses.asdict`` configs."""
    out = []
    for (section, key), (policy, why) in RESUME_CONTRACT.items():
        s, n = saved.get(section, {}), new.get(section, {})
        if key not in s or key not in n:
            continue
        if s[key] != n[key]:
            out.append(Change(section, key, s[key], n[key], policy, why))
    return out


def refusal(path: str, refused: list[Change]) -> str:
    """The error text for refused changes: key, saved and new value, why, how to override."""
    lines = [f"checkpoint {path}: the resume changes hyper-parameters its saved state depends on:"]
    for c in refused:
        lines.append(f"  {c.name}: saved {c.saved!r}, new {c.new!r} ({c.why})")
    keys = " ".join(f"--anytime.resume_override {c.section}.{c.key}" for c in refused)
    lines.append(
        "Resume with the saved values; or keep the saved state and apply the new values anyway "
        f"with {keys}; or start a fresh optimizer from the weights with "
        "--checkpoint.initial_load_path <step folder> --checkpoint.initial_load_model_only "
        "in a new --job.dump_folder"
    )
    return "\n".join(lines)
