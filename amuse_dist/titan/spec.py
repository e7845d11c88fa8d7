"""The "llama3_amuse" train spec: the model (``titan.model``), its parallelize
(``titan.parallelize``), the AMUSE/Muon/SF-AdamW optimizers, the token-shard loaders, the
anytime validator and the optimizer metrics, assembled for torchtitan's Trainer.

torchtitan looks a spec up by name and hands its optimizer builder only the ``[optimizer]``
section; an optimizer also reads its own section ([amuse], [muon], ...), so the spec is built for
one job config (``register(job_config)``) and the builder holds that config.
"""

from typing import Any

from torchtitan.models.llama3 import get_train_spec as llama3_train_spec
from torchtitan.protocols import train_spec as titan_specs

from amuse_dist.titan.loaders import hub
from amuse_dist.titan.loaders.token_shards import build_dataloader
from amuse_dist.titan.metrics import build_amuse_metrics_processor
from amuse_dist.titan.model import FLAVORS, NAME, AmuseTransformer, model_vocab_size
from amuse_dist.titan.optimizers import make_build_optimizers
from amuse_dist.titan.parallelize import parallelize
from amuse_dist.titan.validator import build_anytime_validator


def _build_dataloader(
    dp_world_size: int, dp_rank: int, tokenizer: Any, job_config: Any, infinite: bool = True
) -> Any:
    """The loaders get the model's vocab size passed in (they never import the model)."""
    return build_dataloader(
        dp_world_size, dp_rank, tokenizer, job_config, infinite, model_vocab_size(job_config)
    )


def _build_validator(job_config: Any, **kwargs: Any) -> Any:
    return build_anytime_validator(job_config, model_vocab_size(job_config), **kwargs)


def _no_job_config() -> Any:
    raise RuntimeError(
        f"the {NAME!r} train spec was registered without a job config: build the trainer with "
        "amuse_dist.titan.trainer.AmuseTrainer (it registers the spec for its config)"
    )


def amuse_train_spec(job_config: Any | None = None) -> titan_specs.TrainSpec:
    """The spec for ``job_config`` (None: everything but the optimizer builder works)."""
    base = llama3_train_spec()
    get_config = _no_job_config if job_config is None else lambda: job_config
    return titan_specs.TrainSpec(
        model_cls=AmuseTransformer,
        model_args=FLAVORS,
        parallelize_fn=parallelize,
        pipelining_fn=base.pipelining_fn,
        build_optimizers_fn=make_build_optimizers(get_config),
        build_lr_schedulers_fn=base.build_lr_schedulers_fn,
        build_dataloader_fn=_build_dataloader,
        build_tokenizer_fn=base.build_tokenizer_fn,
        build_loss_fn=base.build_loss_fn,
        build_validator_fn=_build_validator,
        build_metrics_processor_fn=build_amuse_metrics_processor,
        state_dict_adapter=base.state_dict_adapter,
    )


def register(job_config: Any | None = None) -> None:
    """Register "llama3_amuse" for ``job_config``.

    Without a config (the CLIs, before the config is parsed) an existing registration is kept;
    with one, the spec is (re)built for it, so a second job in the same process gets its own
    config. torchtitan 0.2.2 has no public way to replace a registration (its
    ``register_train_spec`` raises on a second one): its registry dict is updated directly.
    """
    hub.register_datasets()  # the hub datasets its loaders may stream (a per-process registry)
    registered = NAME in titan_specs._extra_train_specs
    if job_config is None and registered:
        return
    titan_specs._extra_train_specs.pop(NAME, None)
    titan_specs.register_train_spec(NAME, amuse_train_spec(job_config))
