"""torchtitan's Trainer with the hooks AMUSE runs need (import after ``cpu.setup_device()``)."""

import dataclasses
import logging
import os
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torchtitan.distributed import ParallelDims
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer

from amuse_dist.anytime.run_format import (
    DivergenceError,
    ExportInfo,
    RunLock,
    RunLockError,
    check_export_folder,
    complete_steps,
    copy_run_assets,
    export_dir,
    refuse_symlink,
    run_tokenizer_dir,
)
from amuse_dist.optim.averaged import averaged_weights, weights_swapped
from amuse_dist.optim.names import named_parameters
from amuse_dist.optim.protocols import averaging
from amuse_dist.titan import spec as train_spec
from amuse_dist.titan.checkpoint import AnytimeCheckpointManager
from amuse_dist.titan.export import export_hf


class AmuseTrainer(Trainer):
    """Adds: whole-config access for the optimizer builder, one run per dump folder (a lock
    held by rank 0), the divergence guard, the run's own copy of the export assets, and the run
    records (``train.log``, ``config.toml``) in the run folder.
    ``evaluating=True`` (amuse-eval) only reads the run folder: no lock, no copy, no records.
    """

    def __init__(self, job_config: Any, evaluating: bool = False) -> None:
        self.evaluating = evaluating
        self._run_lock: RunLock | None = None
        self._skipped_steps = 0
        if job_config.anytime.export_x:
            check_export_folder(job_config.anytime.export_folder)
        record_run = not evaluating
        train_spec.register(job_config)
        self._log_handler = start_run_log(job_config.job.dump_folder) if record_run else None
        super().__init__(job_config)
        if record_run and dist.get_rank() == 0:
            try:
                path = write_resolved_config(job_config, Path(job_config.job.dump_folder))
                logger.info(f"resolved config saved to {path}; the log goes to train.log beside it")
            except (OSError, TypeError, ValueError) as e:  # a record, never a reason to stop
                logger.warning(f"could not write the resolved config.toml: {e}")
        self._replace_checkpointer()
        self._guard_optimizer_step()
        if getattr(self, "validator", None) is not None:
            self.validator.optimizers = self.optimizers
        self._sigterm = False
        self.preempted = False
        self._flag_group: dist.ProcessGroup | None = None
        if job_config.anytime.save_on_sigterm:
            signal.signal(signal.SIGTERM, self._on_sigterm)
            # a CPU group: polling the flag every step must not sync the GPU stream
            self._flag_group = dist.new_group(backend="gloo")

    # ------------------------------------------------------------------ checkpoints and X export
    def _replace_checkpointer(self) -> None:
        """Swap torchtitan's CheckpointManager for the atomic one that also exports X."""
        old = self.checkpointer
        cfg = self.job_config
        adapter_cls = self.train_spec.state_dict_adapter
        sd_adapter = adapter_cls(self.model_args, cfg.model.hf_assets_path) if adapter_cls else None
        old.close()
        self.checkpointer = AnytimeCheckpointManager(
            dataloader=self.dataloader,
            model_parts=self.model_parts,
            optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers,
            states={"train_state": self},
            checkpoint_config=cfg.checkpoint,
            sd_adapter=sd_adapter,
            base_folder=cfg.job.dump_folder,
            export_fn=self.export_weights if cfg.anytime.export_x and sd_adapter else None,
            state_finite=None if self.evaluating else self.state_is_finite,
            trust=cfg.anytime.trust_checkpoints,
            resume_override=cfg.anytime.resume_override,
            keep_exports=cfg.anytime.keep_exports,
            meta={
                "optimizer": cfg.optimizer.name,
                "model": {"name": cfg.model.name, "flavor": cfg.model.flavor},
                "world_size": dist.get_world_size(),
                "config": _absolute_paths(dataclasses.asdict(cfg)),
            },
        )

    def x_state_dict(self) -> tuple[dict[str, torch.Tensor], bool]:
        """{fqn: X} in the parameters' own sharding (Y where the optimizer does not average)."""
        xs = averaged_weights(self.optimizers)
        out = {}
        for model in self.model_parts:
            for name, p in named_parameters(model):
                out[name] = xs.get(p, p.detach())
        return out, bool(xs)

    def export_weights(self, step_dir: Path, step: int) -> dict[str, Any]:
        """Write X (and Y when ``[anytime] export_y``) as Hugging Face model folders into
        ``step_dir`` (a collective)."""
        cfg = self.job_config
        averaged = bool(averaging(self.optimizers))
        folders = {"x": cfg.anytime.export_folder}
        if cfg.anytime.export_y and averaged:
            folders["y"] = "y"
        tokenizer = run_tokenizer_dir(cfg.job.dump_folder)
        result: dict[str, Any] = {}
        for which, folder in folders.items():
            info = self.export_info(step, "x" if which == "x" and averaged else "y", folder)
            state = self.x_state_dict()[0] if which == "x" else self.y_state_dict()
            export_hf(
                export_dir(step_dir, folder),
                state,
                self.checkpointer.sd_adapter,
                self.model_args,
                tokenizer if tokenizer.is_dir() else None,
                info,
                max_position_embeddings=cfg.anytime.max_position_embeddings or None,
            )
            del state
            if which == "x":
                result = dataclasses.asdict(info)
            else:
                result["y_folder"] = folder
        return result

    def y_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for m in self.model_parts for n, p in named_parameters(m)}

    def export_info(self, step: int, weights: str, folder: str) -> ExportInfo:
        """What the export's amuse_export.json and model card say about it."""
        cfg = self.job_config
        return ExportInfo(
            step=step,
            weights=weights,
            optimizer=cfg.optimizer.name,
            model={"name": cfg.model.name, "flavor": cfg.model.flavor},
            beta_y=_beta_y(self.optimizers),
            folder=folder,
            tokens_seen=step * self.metrics_processor.tokens_per_step,
            n_params=sum(p.numel() for m in self.model_parts for p in m.parameters()),
            hyperparameters=_hyperparameters(cfg),
            validation=self._validation_for_card(step, weights),
            command=run_command(),
            world_size=dist.get_world_size(),
        )

    def _validation_for_card(self, step: int, weights: str) -> dict[str, Any] | None:
        """The validation loss of the exported weights at ``step`` (a collective).

        torchtitan saves before it validates, so unless this step was validated already the
        exported weights are evaluated here, on the same fixed batches as validation."""
        validator = getattr(self, "validator", None)
        if validator is None or not self.job_config.validation.enable:
            return None
        v = self.job_config.validation
        tag = f"validation_{weights}/loss"
        last = getattr(self.metrics_processor, "last_validation", {})
        if last.get("step") == step and tag in last:
            loss = float(last[tag])
        elif weights == "x":
            xs = averaged_weights(self.optimizers)
            with weights_swapped(self.model_parts, xs):
                loss = validator.evaluate(self.model_parts)[0]
            del xs
        else:
            loss = validator.evaluate(self.model_parts)[0]
        return {
            "loss": loss,
            "step": step,
            "weights": weights,
            "dataset": v.dataset,
            "batches": v.steps,
            "seq_len": v.seq_len,
        }

    # ------------------------------------------------------------------ divergence guard
    def _all_ranks_true(self, ok: bool) -> bool:
        flag = torch.tensor([1.0 if ok else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    @staticmethod
    def _finite(tensors: list[torch.Tensor]) -> bool:
        """All local values finite: one norm per tensor, summed (NaN or inf survives the sum)."""
        from torch.distributed.tensor import DTensor

        local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
        local = [t for t in local if t.is_floating_point() and t.numel() > 0]
        if not local:
            return True
        return bool(torch.isfinite(torch.stack(torch._foreach_norm(local)).sum()))

    def state_is_finite(self) -> bool:
        """Model weights and optimizer state finite on every rank (checked before each save)."""
        tensors = [p.detach() for m in self.model_parts for p in m.parameters()]
        for opt in getattr(self.optimizers, "optimizers", []):
            for state in opt.state.values():
                tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        return self._all_ranks_true(self._finite(tensors))

    def _guard_optimizer_step(self) -> None:
        """Take the optimizer step only when every gradient is finite; otherwise skip it (up to
        ``[anytime] nonfinite_skips`` times) or stop the run with DivergenceError.

        The check reads one flag back to the host, so it runs on every step only when skips are
        allowed; with ``nonfinite_skips = 0`` (the default) it runs on the steps that log (which
        read the loss back anyway), and the finite-state check before every save keeps a
        diverged state from being published in between. A non-logging step stays free of host
        syncs (issue 10)."""
        container = self.optimizers
        real_step = container.step

        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            every_step = self.job_config.anytime.nonfinite_skips > 0
            if not (every_step or self.metrics_processor.should_log(self.step)):
                return real_step(*args, **kwargs)
            grads = [p.grad for m in self.model_parts for p in m.parameters() if p.grad is not None]
            if self._all_ranks_true(self._finite(grads)):
                return real_step(*args, **kwargs)
            self._skipped_steps += 1
            limit = self.job_config.anytime.nonfinite_skips
            if self._skipped_steps > limit:
                newest = complete_steps(self.checkpointer.folder) if self.checkpointer else []
                raise DivergenceError(
                    f"step {self.step}: non-finite loss or gradient (diverged; "
                    f"{self._skipped_steps - 1} of [anytime] nonfinite_skips = {limit} skips "
                    "used). Nothing non-finite was saved; "
                    + (
                        f"newest checkpoint: step-{newest[-1]}, resume from it"
                        if newest
                        else "no checkpoint yet, restart"
                    )
                    + " with a lower --optimizer.lr"
                )
            logger.warning(
                f"step {self.step}: non-finite loss or gradient, optimizer step skipped "
                f"({self._skipped_steps} of [anytime] nonfinite_skips = {limit})"
            )
            container.zero_grad()
            return None

        container.step = guarded_step  # type: ignore[method-assign]

    # ------------------------------------------------------------------ run folder
    def _lock_run_folder(self) -> None:
        """Rank 0 takes the dump folder's lock; every rank stops if another run holds it."""
        msg: list[Any] = [None]
        if dist.get_rank() == 0:
            lock = RunLock(self.job_config.job.dump_folder)
            try:
                lock.acquire()
                self._run_lock = lock
                if lock.stale:
                    logger.warning(
                        f"{lock.info_path}: the previous run (host {lock.stale.get('host')}, pid "
                        f"{lock.stale.get('pid')}, started {lock.stale.get('started')}) ended "
                        "without releasing the folder (killed?); taking it over"
                    )
            except RunLockError as e:
                msg = [str(e)]
        dist.broadcast_object_list(msg, src=0)
        if msg[0]:
            raise RunLockError(msg[0])

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._run_lock is not None:
                self._run_lock.release()
                self._run_lock = None
            if self._log_handler is not None:  # a later run in this process logs elsewhere
                logging.getLogger().removeHandler(self._log_handler)
                self._log_handler.close()
                self._log_handler = None

    # ------------------------------------------------------------------ preemption
    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._sigterm = True
        logger.warning("SIGTERM: finishing this step, then saving a checkpoint and exiting")

    def _preemption_requested(self) -> bool:
        """True on every rank once any rank got SIGTERM (all ranks must stop together).

        A collective, so it runs only every ``[anytime] sigterm_poll_steps`` steps (the same
        steps on every rank, as all ranks share ``self.step``): a rank that got the signal stops
        at the next multiple, at most that many steps later, together with all the others.
        """
        if self._flag_group is None or self.step % self.job_config.anytime.sigterm_poll_steps:
            return False
        flag = torch.tensor([int(self._sigterm)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._flag_group)
        return bool(flag.item())

    def train_step(self, data_iterator: Any) -> None:
        self.metrics_processor.before_step(self.step)  # the optimizer learns if this step logs
        super().train_step(data_iterator)

    def should_continue_training(self) -> bool:
        if self.step > 0 and self._preemption_requested():
            self.preempted = True
            if self.checkpointer.enable:
                self.checkpointer.save(self.step, force=True)
            logger.warning(f"preempted: stopped after step {self.step}, checkpoint saved")
            return False
        return super().should_continue_training()

    def init_distributed(self) -> ParallelDims:
        parallel_dims = super().init_distributed()
        if not self.evaluating:
            self._lock_run_folder()
            self._copy_run_assets()
        return parallel_dims

    def _copy_run_assets(self) -> None:
        """Copy the tokenizer into the run folder once (rank 0); exports read only that copy."""
        cfg = self.job_config
        if not (cfg.checkpoint.enable and cfg.anytime.export_x):
            return
        if dist.get_rank() == 0:
            copied = copy_run_assets(cfg.model.hf_assets_path, cfg.job.dump_folder)
            if copied is not None:
                logger.info(f"exports ship the tokenizer copied into the run folder: {copied}")
        dist.barrier()


_PATH_KEYS = (
    ("job", "dump_folder"),
    ("local_data", "assets_dir"),
    ("model", "hf_assets_path"),
    ("training", "dataset_path"),
    ("validation", "dataset_path"),
)


def _absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    """The config with its local paths absolute, so tools run elsewhere (amuse-eval) find them."""
    for section, key in _PATH_KEYS:
        value = config.get(section, {}).get(key)
        if value and "://" not in value and not os.path.isabs(value) and os.path.exists(value):
            config[section][key] = os.path.abspath(value)
    return config


def _hyperparameters(cfg: Any) -> dict[str, Any]:
    """The optimizer's settings as the run used them (for the model card): ``[optimizer] lr``
    and the optimizer's own TOML section, or torchtitan's ``[optimizer]`` keys (AdamW)."""
    from amuse_dist.optim import registry

    opt = cfg.optimizer
    spec = registry.find(opt.name)
    out: dict[str, Any] = {"lr": opt.lr}
    if spec is not None and spec.section is not None and hasattr(cfg, spec.section):
        out.update(dataclasses.asdict(getattr(cfg, spec.section)))
    else:
        out.update(
            {
                "beta1": opt.beta1,
                "beta2": opt.beta2,
                "eps": opt.eps,
                "weight_decay": opt.weight_decay,
            }
        )
    out["training.steps"] = cfg.training.steps
    out["training.seq_len"] = cfg.training.seq_len
    out["training.max_norm"] = cfg.training.max_norm
    return out


def run_command() -> str:
    """The launch command of this run, as a person would retype it."""
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    nnodes = int(os.environ.get("WORLD_SIZE", "1")) // max(
        1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    )
    nproc = os.environ.get("LOCAL_WORLD_SIZE", "1")
    module = "amuse_dist.train"
    if nnodes == 1 and nproc == "1" and "TORCHELASTIC_RUN_ID" not in os.environ:
        return f"python -m {module} {args}"
    return f"torchrun --nnodes {nnodes} --nproc_per_node {nproc} -m {module} {args}"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _PlainFormatter(logging.Formatter):
    """The console format without colour codes (a log file is read with less and grep)."""

    def format(self, record: logging.LogRecord) -> str:
        return _ANSI.sub("", super().format(record))


def start_run_log(dump_folder: str) -> logging.Handler | None:
    """Rank 0 appends everything it logs to ``<dump_folder>/train.log`` (resumes append)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    root = logging.getLogger()
    path = Path(dump_folder).resolve() / "train.log"
    refuse_symlink(path, "the run log")  # never append to a file outside the run folder
    for h in root.handlers:
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path:
            return h
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    console = next((h for h in root.handlers if h.formatter is not None), None)
    fmt = console.formatter._fmt if console is not None else "%(asctime)s %(levelname)s %(message)s"
    handler.setFormatter(_PlainFormatter(fmt))
    root.addHandler(handler)
    return handler


def resolved_config(cfg: Any) -> dict[str, Any]:
    """The whole JobConfig as TOML tables: every value the run used, unset (None) ones left out."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value if v is not None]
        return value

    return clean(_absolute_paths(dataclasses.asdict(cfg)))


def write_resolved_config(cfg: Any, folder: Path) -> Path:
    """``folder/config.toml``: the resolved config, reusable as ``--job.config_file``.

    A different earlier one (a resume with other settings) is kept as ``config.N.toml``.
    """
    import tomli_w

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    text = (
        "# Resolved config of this run (TOML + command-line overrides), written by amuse-train.\n"
        f"# Command: {run_command()}\n" + tomli_w.dumps(resolved_config(cfg))
    )
    if path.is_file():
        old = path.read_text()
        if old.split("\n", 2)[2:] == text.split("\n", 2)[2:]:
            return path
        n = 1
        while (folder / f"config.{n}.toml").exists():
            n += 1
        path.rename(folder / f"config.{n}.toml")
    tmp = folder / ".config.toml.tmp"
    tmp.unlink(missing_ok=True)  # a link there goes, its target is never written
    tmp.write_text(text)
    tmp.replace(path)
    return path


def _beta_y(optimizers: Any) -> float | None:
    opts = averaging(optimizers)
    return float(opts[0].beta()) if opts else None


def dump_full_state(trainer: Trainer, path: str) -> None:
    """Write the full (unsharded) model state dict from rank 0: used to check that init does
    not depend on the world size."""
    sd = get_model_state_dict(
        trainer.model_parts[0], options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save({k: v.clone() for k, v in sd.items()}, path)
    dist.barrier()
