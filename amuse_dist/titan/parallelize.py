"""The train spec's ``parallelize``: llama3's, with tied embeddings in one FSDP unit and the CPU
(gloo) fix for FSDP's gradient reduction.

llama3's ``parallelize_llama`` calls its module-level ``apply_fsdp``; for a tied model that
function is swapped for ``_apply_fsdp_tied`` while ``parallelize`` runs and restored after (a
scoped patch: nothing else sees it).
"""

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torchtitan.models.llama3.infra import parallelize as llama3_parallelize
from torchtitan.models.llama3.infra.parallelize import parallelize_llama

from amuse_dist.titan import cpu


def _apply_fsdp_tied(
    model: nn.Module,
    dp_mesh: Any,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    pp_enabled: bool,
    cpu_offload: bool = False,
    reshard_after_forward_policy: str = "default",
) -> None:
    """torchtitan's ``apply_fsdp`` with the tied embedding/head in one unit: each block is its
    own unit as usual; the embedding, final norm and head stay in the root unit (torchtitan would
    put the embedding and the head in two units, splitting the one parameter)."""
    if pp_enabled:
        raise ValueError("[model] tie_embeddings = true: pipeline parallelism is not supported")
    fsdp_kw: dict[str, Any] = {
        "mesh": dp_mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
    }
    if cpu_offload:
        fsdp_kw["offload_policy"] = CPUOffloadPolicy()
    reshard = reshard_after_forward_policy != "never"
    for block in model.layers.values():
        fully_shard(block, **fsdp_kw, reshard_after_forward=reshard)
    fully_shard(model, **fsdp_kw)
    llama3_parallelize.disable_fsdp_gradient_division(model)


@contextlib.contextmanager
def _tied_fsdp_layout(tied: bool) -> Iterator[None]:
    """While llama3's parallelize runs, use the tied layout for FSDP (its only FSDP call)."""
    if not tied:
        yield
        return
    stock = llama3_parallelize.apply_fsdp
    llama3_parallelize.apply_fsdp = _apply_fsdp_tied
    try:
        yield
    finally:
        llama3_parallelize.apply_fsdp = stock


def parallelize(model: nn.Module, parallel_dims: Any, job_config: Any) -> nn.Module:
    """llama3's parallelize (tied embeddings in one FSDP unit), plus sum-reduction of FSDP
    grads on gloo (no PREMUL_SUM)."""
    tied = getattr(model.model_args, "tie_embeddings", False)
    if tied and (parallel_dims.tp_enabled or parallel_dims.pp_enabled):
        raise ValueError(
            "[model] tie_embeddings = true supports data parallelism (FSDP/HSDP) only, not "
            "tensor or pipeline parallelism"
        )
    with _tied_fsdp_layout(tied):
        model = parallelize_llama(model, parallel_dims, job_config)
    if cpu.on_cpu():
        cpu.force_sum_reduction(model)
    return model
