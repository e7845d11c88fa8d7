"""Muon matrix shapes of torchtitan's Llama-3 flavors, read off the model itself (one helper).

The model is built on the meta device from ``torchtitan.models.llama3.llama3_args[flavor]`` (so
the FFN width follows torchtitan's own hidden-dim rule) and split with ``param_groups``: every
hidden 2-D weight is a Muon matrix; embeddings, output head and norms are not. Benchmarks and tests
use this instead of copying numbers.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def llama3_muon_matrices(flavor: str) -> tuple[tuple[str, tuple[int, int]], ...]:
    """(name, (out, in)) of every Muon matrix of ``llama3_args[flavor]`` ("8B", "70B", ...)."""
    from torchtitan.models.llama3 import llama3_args
    from torchtitan.models.llama3.model.model import Transformer

    from amuse_dist import param_groups

    with torch.device("meta"):
        model = Transformer(llama3_args[flavor])
    return tuple(
        (name, (int(p.shape[0]), int(p.shape[1])))
        for g in param_groups(model)
        if g["use_muon"]
        for name, p in g["params"]
    )


def llama3_muon_shapes(flavor: str) -> list[tuple[int, int]]:
    """(out, in) of every Muon matrix of the flavor, in model order."""
    return [shape for _, shape in llama3_muon_matrices(flavor)]


def tp_rowwise(name: str) -> bool:
    """torchtitan's Llama TP plan: wo and w2 are RowwiseParallel (Shard(1)), the rest colwise."""
    return name.endswith(("attention.wo.weight", "feed_forward.w2.weight"))
