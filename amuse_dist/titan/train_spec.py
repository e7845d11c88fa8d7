"""The "llama3_amuse" train spec: torchtitan's Llama 3 plus the paper's model sizes, the
AMUSE/Muon/SF-AdamW optimizers, optimizer metrics, and the CPU fixes for FSDP on gloo."""

from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torchtitan.models.llama3 import Transformer, TransformerModelArgs, llama3_args
from torchtitan.models.llama3 import get_train_spec as llama3_train_spec
from torchtitan.models.llama3.infra.parallelize import parallelize_llama
from torchtitan.protocols.train_spec import TrainSpec, get_train_spec, register_train_spec

from amuse_dist.titan import cpu
from amuse_dist.titan.metrics import build_amuse_metrics_processor
from amuse_dist.titan.optimizers import make_build_optimizers
from amuse_dist.titan.token_shards import build_dataloader
from amuse_dist.titan.validator import build_anytime_validator

NAME = "llama3_amuse"


def _args(
    dim: int, n_layers: int, n_heads: int, vocab_size: int, **kw: Any
) -> TransformerModelArgs:
    return TransformerModelArgs(
        dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=vocab_size, rope_theta=500000, **kw
    )


# The paper's sizes (seq 512, GPT-2 sized vocab), a tiny CPU model, and llama3's own flavors.
FLAVORS: dict[str, TransformerModelArgs] = {
    **llama3_args,
    "tiny": _args(128, 4, 4, 2048, max_seq_len=512),
    "124M": _args(768, 12, 12, 50304, max_seq_len=512),
    "720M": _args(2048, 12, 16, 50304, max_seq_len=512),
    "1.3B": _args(2048, 24, 32, 50304, max_seq_len=512),
}

_JOB_CONFIG: list[Any] = []


def set_job_config(job_config: Any) -> None:
    """Give builders that torchtitan hands only one section (optimizer) the whole config."""
    _JOB_CONFIG[:] = [job_config]


def get_job_config() -> Any:
    if not _JOB_CONFIG:
        raise RuntimeError("job config not set: construct amuse_dist.train.AmuseTrainer")
    return _JOB_CONFIG[0]


def init_seed() -> int:
    cfg = _JOB_CONFIG[0] if _JOB_CONFIG else None
    seed = getattr(getattr(cfg, "debug", None), "seed", None)
    return 0 if seed is None else int(seed)


class AmuseTransformer(Transformer):
    """Llama 3 whose init does not depend on the world size on CPU meshes.

    On a CPU mesh DTensor has no RNG tracker, so ``init_weights`` on sharded params draws the
    same numbers on every rank (identical shards). Instead every rank builds the full model
    from the seed and loads its shard of it (also unsharded, so 1 rank == N ranks bitwise).
    """

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        super().init_weights(buffer_device=buffer_device)  # buffers (RoPE); params redone below
        if not cpu.on_cpu():
            return  # CUDA meshes have DTensor's RNG tracker: stock init is fine
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed())
            dtype = next(self.parameters()).dtype
            with torch.device("cpu"):
                full = Transformer(self.model_args).to(dtype)
            full.init_weights()
        set_model_state_dict(
            self, full.state_dict(), options=StateDictOptions(full_state_dict=True, strict=False)
        )


def parallelize(model: nn.Module, parallel_dims: Any, job_config: Any) -> nn.Module:
    """llama3's parallelize, plus sum-reduction of FSDP grads on gloo (no PREMUL_SUM)."""
    model = parallelize_llama(model, parallel_dims, job_config)
    if cpu.on_cpu():
        cpu.force_sum_reduction(model)
    return model


def get_amuse_train_spec() -> TrainSpec:
    base = llama3_train_spec()
    return TrainSpec(
        model_cls=AmuseTransformer,
        model_args=FLAVORS,
        parallelize_fn=parallelize,
        pipelining_fn=base.pipelining_fn,
        build_optimizers_fn=make_build_optimizers(get_job_config),
        build_lr_schedulers_fn=base.build_lr_schedulers_fn,
        build_dataloader_fn=build_dataloader,
        build_tokenizer_fn=base.build_tokenizer_fn,
        build_loss_fn=base.build_loss_fn,
        build_validator_fn=build_anytime_validator,
        build_metrics_processor_fn=build_amuse_metrics_processor,
        state_dict_adapter=base.state_dict_adapter,
    )


def register() -> None:
    """Register "llama3_amuse" once (torchtitan raises on a second registration)."""
    try:
        get_train_spec(NAME)
    except ValueError:
        register_train_spec(NAME, get_amuse_train_spec())
