"""Canonical parameter names: the torchtitan FQN of a parameter, whatever wraps its module.

``torch.compile`` (``_orig_mod.``), activation checkpointing (``_checkpoint_wrapped_module.``),
FSDP1 (``_fsdp_wrapped_module.``) and DDP (``module.``) add prefixes to ``named_parameters()``.
Checkpoints, the X/Y state dicts, the HF export (torchtitan's state-dict adapter), amuse-eval,
metrics and parameter grouping must all see the names of the bare model, so every place that
takes a name from a module goes through ``named_parameters`` here. It asks the same helper that
``torch.distributed.checkpoint.state_dict`` uses for its keys, so our names and DCP's agree.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

try:  # the helper DCP's get_model_state_dict names keys with (private; stable since torch 2.2)
    from torch.distributed.checkpoint.state_dict import _get_fqns
except ImportError:  # pragma: no cover - an older or newer torch without it
    _get_fqns = None

# The wrapper segments torch and torchtitan insert between a module and its children.
WRAPPER_SEGMENTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")
_WRAPPER_RE = re.compile(r"(^|\.)(" + "|".join(WRAPPER_SEGMENTS) + r")(?=\.|$)")


def strip_wrappers(name: str) -> str:
    """``name`` without wrapper segments (the fallback and the check of ``canonical_name``)."""
    return _WRAPPER_RE.sub("", name).lstrip(".")


def canonical_name(model: nn.Module, name: str) -> str:
    """The FQN of ``model``'s parameter ``name`` as DCP keys it (no wrapper prefixes)."""
    if _get_fqns is not None:
        fqns = _get_fqns(model, name)
        if len(fqns) == 1:
            return strip_wrappers(next(iter(fqns)))
    return strip_wrappers(name)


def named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``model.named_parameters()`` under canonical names (a name seen twice is an error: two
    wrappers would otherwise silently map two parameters to one key)."""
    seen: dict[str, str] = {}
    for raw, p in model.named_parameters():
        name = canonical_name(model, raw)
        if name in seen:
            raise ValueError(f"parameters {seen[name]!r} and {raw!r} both map to {name!r}")
        seen[name] = raw
        yield name, p
