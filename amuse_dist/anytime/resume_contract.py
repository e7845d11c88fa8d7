"""The resume contract: which hyper-parameters a resume may change, and which it refuses.

One table keyed by (section, key): torchtitan's keys here, the optimizers' keys from the field
metadata of their hyper-parameter dataclasses. A resume compares the checkpoint's saved config
(``amuse_meta.json``) with the new one for every key listed here:

- ``CHANGEABLE``: the new value is applied from the next step (the optimizer's param groups and
  the LR schedule are reset to the new config after loading) and a log line says so;
- ``REFUSED``: the saved optimizer state was built with the old value, so the resume stops with
  an error naming the key, both values and the override (``--anytime.resume_override
  section.key``, or a fresh optimizer from the weights via ``checkpoint.initial_load_path``).

The model's identity (name, flavor, tied embeddings, RoPE), the optimizer name and the parameter
dtype are refused too: a change would drop or reinterpret trained state. Keys not listed (data,
logging) do not touch the saved state.

Imports neither torchtitan nor torch: the optimizers' sections are passed in by the caller as
``{section: hyper-parameter dataclass}`` (``amuse_dist.optim.registry.hparam_sections()``); their
metadata is read with ``amuse_dist.optim.hparams`` (stdlib only).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from amuse_dist.optim import hparams

CHANGEABLE, REFUSED = "changeable", "refused"

# torchtitan's own sections: (section, key) -> (policy, why). The optimizers' sections come
# from their hyper-parameter dataclasses (``hparam(on_resume=..., why=...)``), see ``contract()``.
TITAN_CONTRACT: dict[tuple[str, str], tuple[str, str]] = {
    ("optimizer", "lr"): (
        CHANGEABLE,
        "scales the next updates; the schedule-free weights use each step's lr as it comes",
    ),
    ("optimizer", "weight_decay"): (CHANGEABLE, "applied to each next update"),
    ("optimizer", "eps"): (CHANGEABLE, "a denominator guard of each next update"),
    ("optimizer", "beta2"): (CHANGEABLE, "decay of the second moment from the next step"),
    ("optimizer", "beta1"): (
        REFUSED,
        "the saved first moment (AdamW) or the X/Y interpolation (ScheduleFreeAdamW) was built with it",
    ),
    ("lr_scheduler", "warmup_steps"): (CHANGEABLE, "the schedule is rebuilt from the config"),
    ("lr_scheduler", "decay_ratio"): (CHANGEABLE, "the schedule is rebuilt from the config"),
    ("lr_scheduler", "decay_type"): (CHANGEABLE, "the schedule is rebuilt from the config"),
    ("lr_scheduler", "min_lr_factor"): (CHANGEABLE, "the schedule is rebuilt from the config"),
    ("training", "max_norm"): (CHANGEABLE, "gradient clipping of each next step"),
    # what the saved tensors are: a change would drop or reinterpret trained state
    ("model", "name"): (REFUSED, "the saved weights belong to this model"),
    ("model", "flavor"): (REFUSED, "the saved weights have this model's shapes"),
    ("model", "tie_embeddings"): (
        REFUSED,
        "tying drops the trained output head, untying starts one from the embedding",
    ),
    ("model", "rope_theta"): (REFUSED, "the trained attention expects these positions"),
    ("model", "rope_scaling"): (REFUSED, "the trained attention expects these positions"),
    ("optimizer", "name"): (REFUSED, "the saved optimizer state is this optimizer's"),
    ("training", "mixed_precision_param"): (REFUSED, "the dtype the weights were trained in"),
}


def contract(sections: Mapping[str, type]) -> dict[tuple[str, str], tuple[str, str]]:
    """The whole contract: torchtitan's keys, and each optimizer section of ``sections``
    ({section: hyper-parameter dataclass}) as its dataclass says (one source: the field
    metadata)."""
    out = dict(TITAN_CONTRACT)
    for section, cls in sections.items():
        for key, (policy, why) in hparams.on_resume(cls).items():
            out[(section, key)] = (REFUSED if policy == "refuse" else CHANGEABLE, why)
    return out


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


def changes(
    saved: dict[str, Any], new: dict[str, Any], sections: Mapping[str, type]
) -> list[Change]:
    """Every contract key whose value differs between two ``dataclasses.asdict`` configs
    (``sections``: the optimizers' hyper-parameter dataclasses, see ``contract``)."""
    out = []
    for (section, key), (policy, why) in contract(sections).items():
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
