"""MetricsProcessor that adds the optimizer's own scalars (beta_t, c_t, update RMS).

torchtitan's ``train_step`` calls ``metrics_processor.log`` on every rank, which is what
``update_rms()`` (a collective) needs; the extra scalars ride along in ``extra_metrics``, so
they reach TensorBoard/W&B through torchtitan's loggers on the logging rank.
"""

from typing import Any

from torchtitan.components.metrics import MetricsProcessor
from torchtitan.distributed import ParallelDims
from torchtitan.tools.logging import logger

from amuse_dist.optim.protocols import averaging


class AmuseMetricsProcessor(MetricsProcessor):
    def before_step(self, step: int) -> None:
        """Tell the optimizers whether ``step`` logs: the update RMS is only tracked then.

        Tracking costs an extra pass over the updates and a per-parameter loop, so optimizers
        that offer it (``track_update_rms``) skip it on the steps nobody reads it.
        """
        logs = self.should_log(step)
        for opt in getattr(self.optimizers, "optimizers", []):
            if hasattr(opt, "track_update_rms"):
                opt.track_update_rms = logs

    def optimizer_metrics(self) -> dict[str, float]:
        """``amuse/*`` scalars from the first averaging optimizer (AMUSE, SF-AdamW)."""
        opts = averaging(self.optimizers) if self.optimizers is not None else []
        if not opts:
            return {}
        opt = opts[0]
        out = {f"amuse/{k}": float(v) for k, v in opt.scalars().items()}
        for k, v in opt.update_rms().items():  # collective: every rank calls it
            out[f"amuse/update_rms_{k}"] = float(v)
        return out

    def log(
        self,
        step: int,
        global_avg_loss: float,
        global_max_loss: float,
        grad_norm: float,
        extra_metrics: dict[str, Any] | None = None,
    ) -> None:
        extra = dict(extra_metrics or {})
        opt_metrics = self.optimizer_metrics()
        extra.update(opt_metrics)
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra)
        if opt_metrics:
            logger.info(
                f"step: {step:2}  "
                + "  ".join(f"{k.split('/', 1)[1]}: {v:.4g}" for k, v in opt_metrics.items())
            )


def build_amuse_metrics_processor(
    job_config: Any, parallel_dims: ParallelDims, model_args: Any = None, tag: str | None = None
) -> MetricsProcessor:
    return AmuseMetricsProcessor(job_config, parallel_dims, tag)
