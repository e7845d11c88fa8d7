"""The "llama3_amuse" model: torchtitan's Llama 3 plus the paper's model sizes (FLAVORS) and the
model options (tied embeddings, init std, RoPE theta), with an init that does not depend on the
world size on CPU.

A leaf: it imports nothing of ``amuse_dist.titan`` but ``cpu``, so the loaders, the config checks
and amuse-eval read FLAVORS without pulling in the train spec (``titan.spec``), the FSDP layout
(``titan.parallelize``) or the optimizers.
"""

import dataclasses
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torchtitan.models.llama3 import Transformer, TransformerModelArgs, llama3_args
from torchtitan.models.llama3.model.args import RoPEScalingArgs

from amuse_dist.titan import cpu

NAME = "llama3_amuse"
"""The ``[model] name`` of this model (its torchtitan train spec, ``titan.spec``)."""


@dataclasses.dataclass
class AmuseModelArgs(TransformerModelArgs):
    """Llama 3 args plus the ``[model]`` options of :class:`amuse_dist.titan.config.Model`,
    read from the job config by ``update_from_config`` (the trainer, amuse-eval and the tests all
    build the model through it)."""

    tie_embeddings: bool = False
    init_std: float | None = None
    rope_scaling: bool = True
    init_seed: int = 0
    """``[debug] seed``: the CPU init draws the full model from it (see AmuseTransformer)."""

    def update_from_config(self, job_config: Any, **kwargs: Any) -> None:
        super().update_from_config(job_config, **kwargs)
        opts = job_config.model
        seed = getattr(getattr(job_config, "debug", None), "seed", None)
        self.init_seed = 0 if seed is None else int(seed)
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


def model_vocab_size(job_config: Any) -> int | None:
    """vocab_size of the configured model flavor (None when it is not a known llama flavor).
    The data checks get it from here, passed in: the loaders never import the model."""
    if job_config.model.name not in (NAME, "llama3"):
        return None
    flavor = FLAVORS.get(job_config.model.flavor)
    return None if flavor is None else int(flavor.vocab_size)


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
            torch.manual_seed(int(getattr(self.model_args, "init_seed", 0)))
            dtype = next(self.parameters()).dtype
            with torch.device("cpu"):
                full = Transformer(self.model_args).to(dtype)
                if tied:
                    tie(full)
            init_params(full)
        set_model_state_dict(
            self, full.state_dict(), options=StateDictOptions(full_state_dict=True, strict=False)
        )
