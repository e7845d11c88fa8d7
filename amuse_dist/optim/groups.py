"""Split a model's parameters into the Muon branch and the AdamW branch.

Muon: 2-D hidden matrices. AdamW: embeddings, the output head, norm gains, biases, anything else.
A fused QKV weight goes to its own Muon group whose ``ns_split`` orthogonalizes Q, K and V apart.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from amuse_dist.optim.names import named_parameters

HEAD_PATTERN = re.compile(r"(^|\.)(output|lm_head|head|classifier|score)\.weight$")
FUSED_QKV_PATTERN = re.compile(r"(^|\.)(wqkv|qkv|qkv_proj|c_attn|in_proj)(\.weight|_weight)$")


def param_groups(
    model: nn.Module,
    *,
    qkv_split: Sequence[int] | None = None,
    muon_options: dict[str, Any] | None = None,
    adamw_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups for ``AMUSE``/``Muon``: each holds (name, param) pairs and ``use_muon``.

    ``qkv_split`` gives the Q, K, V row counts of fused QKV weights; without it they must split
    into equal thirds. ``*_options`` are merged into the groups (e.g. a different lr per branch).
    """
    embedding_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
        for p in m.parameters(recurse=False)
    }
    muon, fused, adamw = [], [], []
    split: tuple[int, ...] | None = tuple(qkv_split) if qkv_split is not None else None
    for name, p in named_parameters(model):
        if not p.requires_grad:
            continue
        if p.ndim != 2 or id(p) in embedding_ids or HEAD_PATTERN.search(name):
            adamw.append((name, p))
        elif FUSED_QKV_PATTERN.search(name):
            rows = p.shape[0]
            if split is None:
                if rows % 3:
                    raise ValueError(
                        f"fused QKV weight {name!r} has {rows} rows, not divisible by 3: pass "
                        "qkv_split=(q_rows, k_rows, v_rows)"
                    )
                split = (rows // 3,) * 3
            if sum(split) != rows:
                raise ValueError(f"qkv_split {split} does not sum to the {rows} rows of {name!r}")
            fused.append((name, p))
        else:
            muon.append((name, p))
    groups = []
    if muon:
        groups.append({"params": muon, "use_muon": True, **(muon_options or {})})
    if fused:
        groups.append(
            {"params": fused, "use_muon": True, "ns_split": split, **(muon_options or {})}
        )
    if adamw:
        groups.append({"params": adamw, "use_muon": False, **(adamw_options or {})})
    return groups
