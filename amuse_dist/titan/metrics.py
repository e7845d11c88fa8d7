"""MetricsProcessor with a progress line a person can read and the optimizer's own scalars.

The training line says where the run is, what it has seen and when it will end::

    step  40/100  loss  6.91234  grad_norm  0.4657  tokens 327.7K  elapsed 0:00:41  eta 0:01:02  ...

On an interactive terminal a tqdm bar is added after the step, and torchtitan's colours are used
unless ``[metrics] disable_color_printing``; in a file (SLURM logs, ``train.log``) the line is
plain. The optimizer's scalars (beta_t, c_t, update RMS) follow on a second line and go to
TensorBoard/W&B with ``progress/tokens_seen`` through ``extra_metrics``. The tokens seen are
the trainer's count (training state saved in every checkpoint, exact across resumes on other
rank counts), never step x the current global batch. torchtitan's
``train_step`` calls ``log`` on every rank, which ``update_rms()`` (a collective) needs.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from torchtitan.components.metrics import MetricsProcessor
from torchtitan.distributed import ParallelDims
from torchtitan.tools import utils
from torchtitan.tools.logging import logger
from tqdm import tqdm

from amuse_dist.optim.protocols import averaging
from amuse_dist.titan.loaders.global_batches import resolve_global_batch_size


def tokens_per_step(job_config: Any, parallel_dims: ParallelDims) -> int:
    """Tokens in one optimizer step over all ranks: global batch x seq_len."""
    t = job_config.training
    dp = parallel_dims.dp_replicate * parallel_dims.dp_shard
    return resolve_global_batch_size(t.global_batch_size, t.local_batch_size, dp) * t.seq_len


def log_stream_is_tty() -> bool:
    """True when the log lines reach an interactive terminal (never for files and SLURM)."""
    streams = [
        h.stream
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ] or [sys.stderr]
    return all(hasattr(s, "isatty") and s.isatty() for s in streams)


def format_count(n: float) -> str:
    """327680 -> '327.7K' (tqdm's SI format)."""
    return tqdm.format_sizeof(n, divisor=1000).strip()


def progress_text(
    step: int, total: int, tokens: int, elapsed: float, rate: float | None, bar: bool
) -> tuple[str, str]:
    """(``step  40/100``, ``tokens 327.7K  elapsed 00:41  eta 01:02``): the line's two ends.

    ``rate`` is steps per second in this process (None before two logged steps: no ETA yet).
    """
    width = len(str(total))
    eta = "?" if not rate else tqdm.format_interval((total - step) / rate)
    head = f"step {step:>{width}}/{total}"
    if bar:
        head += " " + tqdm.format_meter(step, total, elapsed, bar_format="|{bar:20}|")
    tail = f"tokens {format_count(tokens)}  elapsed {tqdm.format_interval(elapsed)}  eta {eta}"
    return head, tail


class AmuseMetricsProcessor(MetricsProcessor):
    def __init__(self, job_config: Any, parallel_dims: ParallelDims, tag: str | None = None):
        super().__init__(job_config, parallel_dims, tag)
        self.tty = log_stream_is_tty()
        if not self.tty:  # ANSI codes only where a terminal renders them
            self.color = utils.NoColor()
        self.tokens_per_step = tokens_per_step(job_config, parallel_dims)
        # the trainer's tokens seen (training state, a collective); None: step x global batch
        self.tokens_source: Callable[[], int] | None = None
        self.last_validation: dict[str, Any] = {}
        self._start: float | None = None  # wall time when training started in this process
        self._first: tuple[float, int] | None = None  # (time, step) of the first logged step

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

    def _rate(self, now: float, step: int) -> float | None:
        """Steps per second since the first step logged by this process (resumes included)."""
        if self._first is None:
            self._first = (now, step)
            return None
        t0, s0 = self._first
        return (step - s0) / (now - t0) if step > s0 and now > t0 else None

    def log(
        self,
        step: int,
        global_avg_loss: float,
        global_max_loss: float,
        grad_norm: float,
        extra_metrics: dict[str, Any] | None = None,
    ) -> None:
        """torchtitan's metrics (same names, same TensorBoard tags) with the progress line."""
        assert self.num_flops_per_token > 0, "num_flops_per_token must be set"
        now = time.perf_counter()
        time_delta = now - self.time_last_log
        if self._start is None:
            self._start = self.time_last_log
        tps = self.ntokens_since_last_log / (time_delta * self.parallel_dims.non_data_parallel_size)
        mfu = 100 * self.num_flops_per_token * tps / self.gpu_peak_flops
        tflops = self.num_flops_per_token * tps / 1e12
        time_data = sum(self.data_loading_times)
        mem = self.device_memory_monitor.get_peak_stats()
        tokens = self.tokens_source() if self.tokens_source else step * self.tokens_per_step
        metrics: dict[str, Any] = {
            "loss_metrics/global_avg_loss": global_avg_loss,
            "loss_metrics/global_max_loss": global_max_loss,
            "grad_norm": grad_norm,
            "throughput(tps)": tps,
            "tflops": tflops,
            "mfu(%)": mfu,
            "time_metrics/end_to_end(s)": time_delta / self.job_config.metrics.log_freq,
            "time_metrics/data_loading(s)": time_data / max(1, len(self.data_loading_times)),
            "time_metrics/data_loading(%)": 100 * time_data / time_delta,
            "memory/max_active(GiB)": mem.max_active_gib,
            "memory/max_active(%)": mem.max_active_pct,
            "memory/max_reserved(GiB)": mem.max_reserved_gib,
            "memory/max_reserved(%)": mem.max_reserved_pct,
            "memory/num_alloc_retries": mem.num_alloc_retries,
            "memory/num_ooms": mem.num_ooms,
            "progress/tokens_seen": tokens,
        }
        opt_metrics = self.optimizer_metrics()
        metrics.update(extra_metrics or {})
        metrics.update(opt_metrics)
        if "n_tokens_seen" in metrics:  # torchtitan's per-rank sum forgets earlier world sizes
            metrics["n_tokens_seen"] = tokens
        self.logger.log(metrics, step)

        c = self.color
        head, tail = progress_text(
            step,
            self.job_config.training.steps,
            tokens,
            now - self._start,
            self._rate(now, step),
            bar=self.tty,
        )
        logger.info(
            f"{c.red}{head}  {c.green}loss {global_avg_loss:8.5f}  "
            f"{c.orange}grad_norm {grad_norm:7.4f}  {c.yellow}{tail}  "
            f"{c.turquoise}memory {mem.max_reserved_gib:5.2f}GiB  "
            f"{c.blue}tps {round(tps):,}{c.reset}"
        )
        if opt_metrics:
            logger.info(
                f"step {step:>{len(str(self.job_config.training.steps))}}  "
                + "  ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in opt_metrics.items())
            )
        self.ntokens_since_last_log = 0
        self.data_loading_times.clear()
        self.time_last_log = time.perf_counter()
        self.device_memory_monitor.reset_peak_stats()

    def log_validation(
        self, loss: float, step: int, extra_metrics: dict[str, Any] | None = None
    ) -> None:
        """torchtitan's validation log; remembers the losses for the export's model card."""
        self.last_validation = {"step": step, "loss": loss, **(extra_metrics or {})}
        super().log_validation(loss, step, extra_metrics)


def build_amuse_metrics_processor(
    job_config: Any, parallel_dims: ParallelDims, model_args: Any = None, tag: str | None = None
) -> MetricsProcessor:
    return AmuseMetricsProcessor(job_config, parallel_dims, tag)
