"""Hyper-parameter dataclasses with range metadata: the one source of every optimizer setting.

Each optimizer keeps a frozen dataclass next to it (``AmuseHParams`` beside ``AMUSE``). Its fields
carry the default, the valid range, the documentation, and whether a resume may change the value.
The optimizer's constructor checks its arguments with ``check``; the TOML section of the same name
is that dataclass (torchtitan extends its config by dataclass), and config validation reports
``range_errors`` for it. So a default or a range is written once, and the Python and TOML paths
cannot disagree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

RANGE = "amuse_range"
CHOICES = "amuse_choices"
RESUME = "amuse_resume"
WHY = "amuse_resume_why"

# How a resume treats a changed value: applied from the next step, or refused (the saved state
# depends on it; see docs/checkpoints.md).
OnResume = Literal["apply", "refuse"]


@dataclass(frozen=True)
class Range:
    """A numeric interval, or "an integer >= lo" (``integer``)."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False

    def ok(self, value: Any) -> bool:
        if isinstance(value, bool):
            return False
        if self.integer:
            if not isinstance(value, int):
                return False
        elif not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def describe(self) -> str:
        """What is expected, e.g. "a float in (0, 1)" or "an int >= 1"."""
        if self.integer:
            return f"an int >= {self.lo:g}"
        left, right = ("(" if self.lo_open else "["), (")" if self.hi_open else "]")
        hi = "inf" if math.isinf(self.hi) else f"{self.hi:g}"
        return f"a float in {left}{self.lo:g}, {hi}{right}"


def hparam(
    default: Any,
    *,
    lo: float = -math.inf,
    hi: float = math.inf,
    lo_open: bool = False,
    hi_open: bool = False,
    integer: bool = False,
    choices: tuple[str, ...] = (),
    on_resume: OnResume = "apply",
    why: str = "",
) -> Any:
    """A dataclass field with its valid range (or string ``choices``) and its resume rule: may a
    resume change it, and ``why`` (document the field with a docstring below it, as
    torchtitan's config does)."""
    rng = None
    if integer or lo != -math.inf or hi != math.inf:
        rng = Range(lo, hi, lo_open, hi_open, integer)
    return field(
        default=default,
        metadata={RANGE: rng, CHOICES: tuple(choices), RESUME: on_resume, WHY: why},
    )


def ranges(cls: type) -> dict[str, Range]:
    """{field name: Range} of a hyper-parameter dataclass (fields without a range left out)."""
    return {f.name: f.metadata[RANGE] for f in dataclasses.fields(cls) if f.metadata.get(RANGE)}


def on_resume(cls: type) -> dict[str, tuple[OnResume, str]]:
    """{field name: ("apply" | "refuse", why)}: what a resume may do with a changed value."""
    return {
        f.name: (
            f.metadata.get(RESUME, "apply"),
            f.metadata.get(WHY) or "used as it comes from the next step",
        )
        for f in dataclasses.fields(cls)
    }


def range_errors(cls: type, values: Mapping[str, Any]) -> list[tuple[str, Any, str]]:
    """(key, value, expected) for every value of ``values`` outside its field's range."""
    out = []
    for key, rng in ranges(cls).items():
        if key in values and not rng.ok(values[key]):
            out.append((key, values[key], rng.describe()))
    for f in dataclasses.fields(cls):
        choices = f.metadata.get(CHOICES)
        if choices and f.name in values and values[f.name] not in choices:
            out.append((f.name, values[f.name], "one of " + ", ".join(map(repr, choices))))
    return out


def check(cls: type, values: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first argument outside its range (the constructors' check)."""
    for key, value, expected in range_errors(cls, values):
        raise ValueError(f"{key} = {value!r}: expected {expected}")


def defaults(cls: type) -> dict[str, Any]:
    """The dataclass's defaults as keyword arguments."""
    return dataclasses.asdict(cls())
