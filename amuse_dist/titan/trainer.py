"""torchtitan's Trainer with the hooks AMUSE runs need (import after ``cpu.setup_device()``)."""

import contextlib
import dataclasses
import logging
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.checkpoint.stateful import Stateful
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
from amuse_dist.anytime.run_records import config_text, stop_line, write_config_record
from amuse_dist.optim.averaged import averaged_weights, weights_swapped
from amuse_dist.optim.names import named_parameters
from amuse_dist.optim.protocols import averaging
from amuse_dist.titan import spec as train_spec
from amuse_dist.titan.checkpoint import AnytimeCheckpointManager
from amuse_dist.titan.export import export_hf
from amuse_dist.titan.launch import FULL_LOG_FORMAT


class GuardedStep:
    """Mixin for an optimizers container: ``step`` runs only when ``step_allowed()`` says so;
    a refused step drops the gradients instead (the divergence guard)."""

    step_allowed: Any = None

    def step(self, *args: Any, **kwargs: Any) -> Any:
        if self.step_allowed is not None and not self.step_allowed():
            self.zero_grad()  # type: ignore[attr-defined]
            return None
        return super().step(*args, **kwargs)  # type: ignore[misc]


_GUARDED: dict[type, type] = {}


def guarded_container_class(cls: type) -> type:
    """``GuardedStep`` over ``cls`` (one class per container class)."""
    if issubclass(cls, GuardedStep):
        return cls
    if cls not in _GUARDED:
        _GUARDED[cls] = type(f"Guarded{cls.__name__}", (GuardedStep, cls), {})
    return _GUARDED[cls]


PROGRESS = "progress"  # the checkpoint state that holds the tokens seen
_SAME_SIGNAL_S = 2.0  # a repeat of the stop signal within this is the same request (torchrun)


class TokensSeen(Stateful):
    """Tokens the run has trained on, over all ranks and every resume: training state.

    Each rank adds the tokens of the batches it consumes (``add``, no collective); ``sync``
    sums what the data-parallel ranks added since the last sync (one all-reduce, on the steps
    that log or save) onto the total restored from the checkpoint. The checkpoint holds that one
    global number, the same on every rank, so it restores at any rank count. Ranks that share a
    batch (tensor or context parallel) are one data-parallel rank: only the batch mesh is summed.
    """

    def __init__(self, mesh: Any = None, device: Any = "cpu") -> None:
        self.total = 0  # global tokens up to the last sync
        self.pending = 0  # this rank's tokens since the last sync
        self.restored = False  # loaded from a checkpoint (old checkpoints lack it)
        self.mesh = mesh
        self.device = device

    def add(self, n: int) -> None:
        self.pending += int(n)

    def sync(self) -> int:
        """The global count (a collective over the batch mesh when data parallel)."""
        if self.mesh is not None:
            t = torch.tensor([self.pending], dtype=torch.int64, device=self.device)
            dist.all_reduce(t, group=self.mesh.get_group())
            added = int(t.item())
        else:
            added = self.pending
        self.total += added
        self.pending = 0
        return self.total

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_seen": self.sync()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total = int(state_dict["tokens_seen"])
        self.pending = 0
        self.restored = True


class _TimeWithoutSleep:
    """``time`` for ``torchtitan.train`` with a no-op ``sleep``: torchtitan's ``train()`` ends with
    rank 0 sleeping 2 s "for other ranks to complete"; our stop path joins the ranks with a
    collective (``run.train``: ``tokens.sync()``) instead, so the sleep only costs every run 2 s."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        return None


@contextlib.contextmanager
def _without_closing_sleep() -> Iterator[None]:
    module = sys.modules[Trainer.__module__]
    saved = module.time
    module.time = _TimeWithoutSleep()
    try:
        yield
    finally:
        module.time = saved


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
        self._record_run = record_run
        self._started = False
        super().__init__(job_config)
        dims = self.parallel_dims
        self.tokens = TokensSeen(dims.get_mesh("batch") if dims.dp_enabled else None, self.device)
        self.metrics_processor.tokens_source = self.tokens.sync
        self._replace_checkpointer()
        self._guard_optimizer_step()
        if getattr(self, "validator", None) is not None:
            self.validator.optimizers = self.optimizers
        self._sigterm = False
        self.preempted = False
        self.stop_reason: tuple[str, str] | None = None  # (kind, detail) once training ended
        self._flag_group: dist.ProcessGroup | None = None
        if job_config.anytime.save_on_sigterm:
            self._install_stop_signals()
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
            states={"train_state": self, PROGRESS: self.tokens},
            optional_states=(PROGRESS,),
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
            tokens_seen=self.tokens.sync(),
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
        """Make the optimizers container a ``GuardedStep`` subclass of its own class whose
        ``step`` asks ``_step_allowed`` first (any container: ours or torchtitan's AdamW)."""
        self.optimizers.__class__ = guarded_container_class(type(self.optimizers))
        self.optimizers.step_allowed = self._step_allowed

    def _step_allowed(self) -> bool:
        """Take the optimizer step only when every gradient is finite; otherwise skip it (up to
        ``[anytime] nonfinite_skips`` times) or stop the run with DivergenceError.

        The check reads one flag back to the host, so it runs on every step only when skips are
        allowed; with ``nonfinite_skips = 0`` (the default) it runs on the steps that log (which
        read the loss back anyway), and the finite-state check before every save keeps a
        diverged state from being published in between. A non-logging step stays free of host
        syncs (issue 10)."""
        limit = self.job_config.anytime.nonfinite_skips
        if not (limit > 0 or self.metrics_processor.should_log(self.step)):
            return True
        grads = [p.grad for m in self.model_parts for p in m.parameters() if p.grad is not None]
        if self._all_ranks_true(self._finite(grads)):
            return True
        self._skipped_steps += 1
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
        return False

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

    def train(self) -> None:
        with _without_closing_sleep():
            super().train()

    def close_run_log(self) -> None:
        """Stop writing ``train.log`` (after the stop line): a later run in this process, or
        amuse-eval, logs elsewhere."""
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._run_lock is not None:
                self._run_lock.release()
                self._run_lock = None

    # ------------------------------------------------------------------ preemption and Ctrl-C
    def _install_stop_signals(self) -> None:
        """SIGTERM (preemption) and SIGINT (Ctrl-C): finish the step, save, exit 0.

        torchrun forwards the signal it gets to every worker, which the terminal has signalled
        already: a repeat within ``_SAME_SIGNAL_S`` is the same request. A second Ctrl-C after
        that aborts at once (exit 130) and says which steps are lost."""
        self._stop_signal: str | None = None
        self._stop_signal_at = 0.0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self._stop_signal is not None:
            if now - self._stop_signal_at < _SAME_SIGNAL_S or signum != signal.SIGINT:
                return
            self._abort_now()
        self._stop_signal, self._stop_signal_at = name, now
        self._sigterm = True
        what = "Ctrl-C" if signum == signal.SIGINT else name
        poll = self.job_config.anytime.sigterm_poll_steps
        logger.warning(
            f"{what}: finishing step {self.step + 1}, then saving a checkpoint and exiting "
            + (f"(ranks agree every {poll} steps) " if poll > 1 else "")
            + ("- press Ctrl-C again to abort without saving" if what == "Ctrl-C" else "")
        )

    def _abort_now(self) -> None:
        """The second Ctrl-C: leave at once; say what the newest checkpoint keeps."""
        folder = getattr(self.checkpointer, "folder", None)
        newest = complete_steps(folder) if folder and os.path.isdir(folder) else []
        kept = f"step-{newest[-1]}" if newest else "no checkpoint"
        lost = self.step - (newest[-1] if newest else 0)
        msg = stop_line(
            "aborted",
            self.step,
            f"second Ctrl-C, nothing saved; the newest checkpoint is {kept}, "
            f"the {lost} steps after it are lost",
        )
        if dist.get_rank() == 0:
            logger.error(msg)
        for h in logging.getLogger().handlers:
            h.flush()
        sys.stderr.flush()
        os._exit(130)

    def _preemption_requested(self) -> bool:
        """True on every rank once any rank got SIGTERM/SIGINT (all ranks must stop together).

        A collective, so it runs only every ``[anytime] sigterm_poll_steps`` steps (the same
        steps on every rank, as all ranks share ``self.step``): a rank that got the signal stops
        at the next multiple, at most that many steps later, together with all the others.
        """
        if self._flag_group is None or self.step % self.job_config.anytime.sigterm_poll_steps:
            return False
        flag = torch.tensor([int(self._sigterm)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._flag_group)
        return bool(flag.item())

    def batch_generator(self, data_iterable: Any) -> Any:
        """torchtitan's batches, each counted into the tokens seen as it is consumed."""
        for input_dict, labels in super().batch_generator(data_iterable):
            self.tokens.add(labels.numel())
            yield input_dict, labels

    def train_step(self, data_iterator: Any) -> None:
        self.metrics_processor.before_step(self.step)  # the optimizer learns if this step logs
        super().train_step(data_iterator)

    def _on_start(self) -> None:
        """Once, when training starts (the checkpoint, if any, loaded and accepted): fill in
        the tokens seen of a checkpoint that predates them, and write ``config.toml`` (never
        earlier, so a refused or failed launch leaves the record of the run that is there)."""
        self._started = True
        if self.step > 0 and not self.tokens.restored:
            self.tokens.total = self.step * self.metrics_processor.tokens_per_step
            logger.warning(
                f"the checkpoint of step {self.step} predates the tokens-seen record: tokens "
                f"seen estimated as step x the current global batch ({self.tokens.total:,})"
            )
        if self._record_run and dist.get_rank() == 0:
            folder = Path(self.job_config.job.dump_folder)
            try:
                path = write_resolved_config(self.job_config, folder)
                logger.info(f"resolved config saved to {path}; the log goes to train.log beside it")
            except (OSError, TypeError, ValueError) as e:  # a record, never a reason to stop
                logger.warning(f"could not write the resolved config.toml: {e}")

    def should_continue_training(self) -> bool:
        if not self._started:
            self._on_start()
        if self.step > 0 and self._preemption_requested():
            self.preempted = True
            saved = ""
            if self.checkpointer.enable:
                self.checkpointer.save(self.step, force=True)
                saved = f"checkpoint step-{self.step} saved in {self.checkpointer.folder}"
            local = getattr(self, "_stop_signal", None) or "a signal on another rank"
            kind = "interrupted" if local == "SIGINT" else "preempted"
            self.stop_reason = (kind, f"{'Ctrl-C' if local == 'SIGINT' else local}; {saved}")
            logger.warning(f"{kind}: stopped after step {self.step}; {saved or 'not saved'}")
            return False
        if not super().should_continue_training():
            self.stop_reason = ("finished", "")
            return False
        return True

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
    """Rank 0 appends everything it logs to ``<dump_folder>/train.log`` (resumes append), in
    the full format (date, logger, level), whatever the console shows."""
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
    handler.setFormatter(_PlainFormatter(FULL_LOG_FORMAT))
    root.addHandler(handler)
    return handler


def resolved_config(cfg: Any) -> dict[str, Any]:
    """The whole JobConfig as TOML tables, as the run used it and as ``--job.config_file``
    accepts it: local paths absolute, and the ``[optimizer]`` keys the chosen optimizer does not
    read left out (amuse_dist's optimizers read only ``lr`` there; their own values, such as the
    effective ``weight_decay``, are in their own section)."""
    from amuse_dist.optim import registry
    from amuse_dist.titan.config import _TITAN_OPTIMIZER_KEYS

    tables = _absolute_paths(dataclasses.asdict(cfg))
    spec = registry.find(cfg.optimizer.name)
    if spec is not None and spec.build is not None:
        for key in _TITAN_OPTIMIZER_KEYS:
            tables["optimizer"].pop(key, None)
    return tables


def write_resolved_config(cfg: Any, folder: Path) -> Path:
    """``folder/config.toml``: the resolved config, reusable as ``--job.config_file``."""
    return write_config_record(folder, config_text(resolved_config(cfg), run_command()))


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
