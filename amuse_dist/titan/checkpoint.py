"""Anytime checkpoints: atomic full-state DCP saves with the X weights exported beside them.

``AnytimeCheckpointManager`` keeps torchtitan's CheckpointManager (DCP, the states it saves, its
folder naming and ``load``), and changes how a save lands on disk:

- every save is a full state (model Y, optimizer incl. AMUSE's scalars, LR schedulers,
  dataloader, train state), the last one too, so any checkpoint resumes;
- it is written into ``.saving-N`` and renamed to ``step-N`` only once DCP, the X export
  (``step-N/x``) and ``amuse_meta.json`` are all complete: a crash never leaves a ``step-N``
  folder that looks complete, and never touches the previous one;
- before loading it checks the folder (present, readable), the model shapes and the optimizer
  that wrote it, and fails with an error naming the path and the problem. Nothing is deleted.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torchtitan.components.checkpoint import AsyncMode, CheckpointManager
from torchtitan.tools.logging import logger

from amuse_dist.optim import registry
from amuse_dist.titan.run_format import (
    META_FILE,
    STEP_DIR,
    CheckpointError,
    complete_steps,
    publish,
    read_meta,
    recover_replaced,
    saving_dir,
    write_meta,
)

__all__ = [
    "META_FILE",
    "STEP_DIR",
    "AnytimeCheckpointManager",
    "CheckpointError",
    "complete_steps",
    "guess_optimizer",
    "read_meta",
]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _state_suffixes(keys: set[str], prefix: str = "optimizer.state.") -> dict[str, set[str]]:
    """{param fqn: {state names}} from flattened optimizer-state keys."""
    out: dict[str, set[str]] = {}
    for k in keys:
        if k.startswith(prefix):
            fqn, _, name = k[len(prefix) :].rpartition(".")
            out.setdefault(fqn, set()).add(name)
    return out


def guess_optimizer(keys: set[str]) -> str:
    """Name the optimizer whose state has these flattened keys (best effort)."""
    names = set().union(*_state_suffixes(keys).values()) if keys else set()
    return registry.guess_from_state(names)


class AnytimeCheckpointManager(CheckpointManager):
    """torchtitan's CheckpointManager with atomic saves, X export and checked loads."""

    def __init__(
        self,
        *args: Any,
        export_fn: Callable[[Path, int], dict[str, Any] | None] | None = None,
        meta: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.export_fn = export_fn
        self.meta = dict(meta or {})
        self.last_saved_step = -1
        if self.enable and self.async_mode != AsyncMode.DISABLED:
            raise ValueError(
                '[checkpoint] async_mode: only "disabled" is supported by amuse_dist\'s atomic '
                "checkpoints (the X export must finish before the folder is published)"
            )
        if self.enable and self.last_save_model_only:
            logger.info(
                "[checkpoint] last_save_model_only is ignored: the last checkpoint is a full "
                "state so it can be resumed; the weights for other tools are in step-N/x"
            )
        self.last_save_model_only = False
        self.last_save_in_hf = False

    # ----------------------------------------------------------------------------- save
    def save(self, curr_step: int, last_step: bool = False, force: bool = False) -> None:
        if not (force and self.enable and not self.load_only) and not self._should_save(
            curr_step, last_step
        ):
            return
        if curr_step == self.last_saved_step:
            return
        final = Path(self._create_checkpoint_id(curr_step))
        tmp = saving_dir(final)
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
        _barrier()
        logger.info(f"Saving checkpoint step-{curr_step} (full state) to {final}")
        states = self._flattened_model_states_sd()
        self.dcp_save(
            states,
            checkpoint_id=str(tmp),
            async_mode=AsyncMode.DISABLED,
            enable_garbage_collection=True,
        )
        export_info = self.export_fn(tmp, curr_step) if self.export_fn is not None else None
        if _rank() == 0:
            write_meta(tmp, {**self.meta, "step": curr_step, "export": export_info})
            publish(tmp, final)
        _barrier()
        self.last_saved_step = curr_step
        self._purge_stale_checkpoints()

    def _purge_stale_checkpoints(self) -> None:
        """Keep the newest ``keep_latest_k`` complete checkpoints; never touch anything else."""
        if self.keep_latest_k <= 0 or _rank() != 0:
            return
        steps = complete_steps(self.folder)
        for step in steps[: -self.keep_latest_k]:
            assert self.purge_thread is not None
            self.purge_queue.put(self._create_checkpoint_id(step))

    # ----------------------------------------------------------------------------- load
    def load(self, step: int = -1) -> bool:
        if not self.enable or not os.path.isdir(self.folder):
            return super().load(step)
        if _rank() == 0:
            recover_replaced(self.folder)
        _barrier()
        load_step = self._find_load_step() if step == -1 else step
        if load_step == -1:
            return super().load(step)
        path = self._create_checkpoint_id(load_step)
        if not os.path.isdir(path):
            raise CheckpointError(
                f"checkpoint {path} not found (checkpoint.load_step = {step}); complete "
                f"checkpoints in {self.folder}: {complete_steps(self.folder) or 'none'}"
            )
        self.check_compatible(path, model_only=load_step == 0)
        try:
            return super().load(load_step)
        except (Exception, CheckpointException) as e:  # DCP's errors name neither folder nor cause
            raise CheckpointError(
                f"checkpoint {path} could not be loaded (corrupt or incomplete files?): "
                f"{_describe(e)}"
            ) from e

    def check_compatible(self, path: str, model_only: bool = False) -> None:
        """Raise CheckpointError if ``path`` was written for another model or optimizer."""
        try:
            metadata = FileSystemReader(path).read_metadata()
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {path} is corrupt or incomplete: cannot read its DCP .metadata "
                f"({type(e).__name__}: {e})"
            ) from e
        saved = metadata.state_dict_metadata
        meta = read_meta(path)
        ours = self.states["model"].state_dict()
        for key, value in ours.items():
            if key not in saved:
                raise CheckpointError(
                    f"checkpoint {path} holds a different model: no entry for {key!r} "
                    f"(model {meta.get('model', '?')} there)"
                )
            their = tuple(getattr(saved[key], "size", ()))
            if isinstance(value, torch.Tensor) and their != tuple(value.shape):
                raise CheckpointError(
                    f"checkpoint {path} holds a different model shape: {key!r} is "
                    f"{list(their)} there and {list(value.shape)} here "
                    f"(model {meta.get('model', '?')} there, {self.meta.get('model', '?')} here)"
                )
        if model_only or "optimizer" not in self.states:
            return
        ours_opt = {f"optimizer.{k}" for k in self.states["optimizer"].state_dict()}
        theirs_opt = {k for k in saved if k.startswith("optimizer.state.")}
        needed = {k for k in ours_opt if k.startswith("optimizer.state.")}
        if needed - theirs_opt:
            writer = meta.get("optimizer") or guess_optimizer(theirs_opt)
            ours_name = self.meta.get("optimizer") or guess_optimizer(needed)
            missing = sorted(needed - theirs_opt)[0]
            raise CheckpointError(
                f"checkpoint {path} was written by optimizer {writer}, but this run uses "
                f"{ours_name}: its optimizer state lacks {missing!r}. Resume with the same "
                "[optimizer] name, or load the weights only (checkpoint.initial_load_path "
                "with initial_load_model_only = true)"
            )


def _describe(e: BaseException) -> str:
    """The first rank's underlying error for DCP's CheckpointException, else the error."""
    failures = getattr(e, "failures", None)
    if isinstance(e, CheckpointException) and failures:
        rank, failure = next(iter(failures.items()))
        return f"rank {rank}: {type(failure).__name__}: {failure}"
    return f"{type(e).__name__}: {e}"
