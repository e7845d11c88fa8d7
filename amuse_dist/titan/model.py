"""The "llama3_amuse" train spec: torchtitan's Llama 3 plus the paper's model sizes and model
options (tied embeddings, init std, RoPE theta), the AMUSE/Muon/SF-AdamW optimizers, optimizer
metrics, and the CPU fixes for FSDP on gloo."""

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torchtitan.models.llama3 import Transformer, TransformerModelArgs, llama3_args
from torchtitan.models.llama3 import get_train_spec as llama3_train_spec
from torchtitan.models.llama3.infra import parallelize as llama3_parallelize
from torchtitan.models.llama3.infra.parallelize import parallelize_llama
from torchtitan.models.llama3.model.args import RoPEScalingArgs
from torchtitan.protocols.train_spec import TrainSpec, get_train_spec, register_train_spec

from amuse_dist.titan import cpu
from amuse_dist.titan.metrics import build_amuse_metrics_processor
from amuse_dist.titan.optimizers import make_build_optimizers
from amuse_dist.titan.token_shards import build_dataloader
from amuse_dist.titan.validator import build_anytime_validator

NAME = "llama3_amuse"


@dataclasses.dataclass
class AmuseModelArgs(TransformerModelArgs):
    """Llama 3 args plus the ``[model]`` options of :class:`amuse_dist.titan.config.Model`,
    read from the job config by ``update_from_config`` (the trainer, amuse-eval and the tests all
    build the model through it)."""

    tie_embeddings: bool = False
    init_std: float | None = None
    rope_scaling: bool = True

    def update_from_config(self, job_config: Any, **kwargs: Any) -> None:
        super().update_from_config(job_config, **kwargs)
        opts = job_config.model
        self.tie_embeddings = bool(getattr(opts, "tie_embeddings", False))
        self.init_std = getattr(opts, "init_std", None)
        theta = getattr(opts, "rope_theta", None)
        if self.init_std is not None and not self.init_std > 0:
            raise ValueError(f"[model] init_std = {self.init_std}: expected a float > 0 or unset")
        if theta is not None:
            if not theta > 0:
                raise ValueError(f"[model] rope_theta = {theta}: expected a float > 0 or unset")
            self.rope_theta = float(theta)
        self.rope_scaling = bool(getattr(opts, "rope_scaling", True))
        if not self.rope_scaling:  # factor 1 makes Llama 3's scaling the identity (HF too)
            self.rope_scaling_args = RoPEScalingArgs(scaling_factor=1.0)


def _args(dim: int, n_layers: int, n_heads: int, vocab_size: int, **kw: Any) -> AmuseModelArgs:
    return AmuseModelArgs(
        dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=vocab_size, rope_theta=500000, **kw
    )


def _amuse_args(args: TransformerModelArgs) -> AmuseModelArgs:
    return AmuseModelArgs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args)})


# The paper's sizes (seq 512, GPT-2 sized vocab), a tiny CPU model, and llama3's own flavors.
FLAVORS: dict[str, AmuseModelArgs] = {
    **{name: _amuse_args(a) for name, a in llama3_args.items()},
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


def tie(model: Transformer) -> None:
    """Make the output head use the token embedding's parameter (one tensor, one gradient)."""
    model.output.weight = model.tok_embeddings.weight


def init_params(model: Transformer) -> None:
    """torchtitan's init, or with ``init_std`` the authors' (every weight N(0, std), norms 1).

    A tied weight is drawn once (the authors draw it as the embedding)."""
    std = getattr(model.model_args, "init_std", None)
    with torch.no_grad():
        if std is None:
            Transformer.init_weights(model)
            return
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.RMSNorm):
                module.reset_parameters()


class AmuseTransformer(Transformer):
    """Llama 3 with the ``[model]`` options, whose init does not depend on the world size on CPU.

    On a CPU mesh DTensor has no RNG tracker, so ``init_weights`` on sharded params draws the
    same numbers on every rank (identical shards). Instead every rank builds the full model
    from the seed and loads its shard of it (also unsharded, so 1 rank == N ranks bitwise).
    """

    def __init__(self, model_args: TransformerModelArgs) -> None:
        super().__init__(model_args)
        if getattr(model_args, "tie_embeddings", False):
            tie(self)

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        tied = getattr(self.model_args, "tie_embeddings", False)
        if tied and self.output.weight is not self.tok_embeddings.weight:
            tie(self)  # ``to_empty`` on a model without FSDP gives each module its own tensor
        # buffers (RoPE) and stock param init; params redone below
        super().init_weights(buffer_device=buffer_device)
        if not cpu.on_cpu():  # CUDA meshes have DTensor's RNG tracker: init in place
            if getattr(self.model_args, "init_std", None) is not None:
                init_params(self)
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed())
            dtype = next(self.parameters()).dtype
            with torch.device("cpu"):
                full = Transformer(self.model_args).to(dtype)
                if tied:
                    tie(full)
            init_params(full)
        set_model_state_dict(
            self, full.state_dict(), options=StateDictOptions(full_state_dict=True, strict=False)
        )


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
