"""Validation at the averaged weights X (and at Y), on the same fixed batches every time.

torchtitan's Validator evaluates the weights the model holds, Y for AMUSE. ``AnytimeValidator``
swaps each parameter's local shard to X (from ``optimizer.x_tensors()``), evaluates, and swaps Y
back bit for bit. FSDP2 modules are resharded before and after each swap so no unsharded copy of
the other weights is reused. The validation stream is rewound before every evaluation, so every
evaluation (X, Y, any step) sees the same batches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.components.validate import BaseValidator, Validator
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools import utils
from torchtitan.tools.logging import logger

from amuse_dist.optim.averaged import averaged_weights, reshard, weights_swapped
from amuse_dist.titan.loaders.token_shards import build_validation_dataloader


class AnytimeValidator(Validator):
    """Validator that reports the loss at X (``validation_x/loss``) and Y (``validation_y/loss``)."""

    def __init__(
        self,
        job_config: Any,
        dp_world_size: int,
        dp_rank: int,
        tokenizer: Any,
        parallel_dims: Any,
        loss_fn: Any,
        validation_context: Any,
        maybe_enable_amp: Any,
        metrics_processor: Any,
        pp_schedule: Any = None,
        pp_has_first_stage: bool | None = None,
        pp_has_last_stage: bool | None = None,
        validate_x: bool = True,
        validate_y: bool = True,
        model_vocab: int | None = None,
    ):
        # torchtitan's Validator.__init__ minus its hard-wired text loader: the validation
        # dataloader comes from amuse_dist (token shards read by global index, or torchtitan's)
        BaseValidator.__init__(self, job_config)
        self.tokenizer = tokenizer
        self.parallel_dims = parallel_dims
        self.loss_fn = loss_fn
        self.validation_dataloader = build_validation_dataloader(
            dp_world_size, dp_rank, tokenizer, job_config, model_vocab
        )
        self.validation_context = validation_context
        self.maybe_enable_amp = maybe_enable_amp
        self.metrics_processor = metrics_processor
        self.pp_schedule = pp_schedule
        self.pp_has_first_stage = pp_has_first_stage
        self.pp_has_last_stage = pp_has_last_stage
        self.validate_x = validate_x
        self.validate_y = validate_y
        self.optimizers: Any = None

    def rewind(self) -> None:
        """Restart the validation stream so each evaluation sees the same batches (the
        token-shard loader restarts at batch 0 on every ``iter()`` by itself)."""
        dataset = getattr(self.validation_dataloader, "dataset", None)
        if dataset is not None and hasattr(dataset, "_sample_idx"):
            dataset._sample_idx = 0
            dataset._token_buffer = []

    @torch.no_grad()
    def evaluate(self, model_parts: list[nn.Module]) -> tuple[float, int]:
        """(loss, tokens): the loss averaged over ``validation.steps`` batches of all
        data-parallel ranks, and how many tokens those batches hold."""
        if self.parallel_dims.pp_enabled or self.parallel_dims.cp_enabled:
            raise ValueError(
                "[validation] with pipeline or context parallelism: not supported by "
                "amuse_dist's validator yet; set [validation] enable = false"
            )
        self.rewind()
        for model in model_parts:
            model.eval()
        device_type = utils.device_type
        losses = []
        n_tokens = 0
        for num_steps, (input_dict, labels) in enumerate(self.validation_dataloader):
            if num_steps >= self.job_config.validation.steps:
                break
            self.metrics_processor.ntokens_since_last_log += labels.numel()
            input_dict = {k: v.to(device_type) for k, v in input_dict.items()}
            labels = labels.to(device_type)
            inputs, labels, extra_inputs, extra_kwargs = self.post_dataloading_process(
                input_dict, labels, model_parts
            )
            local_tokens = (labels != IGNORE_INDEX).sum()
            if self.parallel_dims.dp_enabled:
                tokens = dist_utils.dist_sum(
                    local_tokens, self.parallel_dims.get_mesh("batch"), None
                )
            else:
                tokens = local_tokens.float()
            n_tokens += int(tokens)
            with self.validation_context(), self.maybe_enable_amp:
                predictions = model_parts[0](inputs, **extra_inputs, **extra_kwargs)
                losses.append(self.loss_fn(predictions, labels).detach() / tokens)
        for model in model_parts:
            model.train()
        # FSDP2 keeps the last groups unsharded after a forward without backward: their modules
        # then hold other Parameter objects than the optimizer's (X lookups, optimizer state
        # dicts and exports keyed by parameter would miss them)
        reshard(model_parts)
        loss = torch.sum(torch.stack(losses)) / len(losses)
        if self.parallel_dims.dp_cp_enabled:
            loss = dist_utils.dist_sum(loss, self.parallel_dims.get_optional_mesh("loss"))
        return float(loss), n_tokens

    def validate(self, model_parts: list[nn.Module], step: int) -> None:
        xs = averaged_weights(self.optimizers) if self.validate_x else {}
        extra: dict[str, float] = {}
        if xs:
            with weights_swapped(model_parts, xs):
                extra["validation_x/loss"] = self.evaluate(model_parts)[0]
            del xs
        if self.validate_y or "validation_x/loss" not in extra:
            extra["validation_y/loss"] = self.evaluate(model_parts)[0]
        # X where it was evaluated (validate_y = false leaves no Y loss)
        main = (
            extra["validation_x/loss"]
            if "validation_x/loss" in extra
            else extra["validation_y/loss"]
        )
        self.metrics_processor.log_validation(loss=main, step=step, extra_metrics=extra)
        if len(extra) > 1:
            logger.info(
                f"validate step: {step:2}  loss at X: {extra['validation_x/loss']:7.4f}  "
                f"loss at Y: {extra['validation_y/loss']:7.4f}"
            )


def build_anytime_validator(
    job_config: Any, model_vocab: int | None = None, **kwargs: Any
) -> AnytimeValidator:
    """The train spec's ``build_validator_fn`` (``model_vocab``: the model's vocab_size, which the
    validation loader checks the data against; the train spec passes it)."""
    anytime = getattr(job_config, "anytime", None)
    return AnytimeValidator(
        job_config=job_config,
        validate_x=getattr(anytime, "validate_x", True),
        validate_y=getattr(anytime, "validate_y", True),
        model_vocab=model_vocab,
        **kwargs,
    )
