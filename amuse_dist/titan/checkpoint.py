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

import json
import os
import re
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

META_FILE = "amuse_meta.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into this run; the message names the path."""


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


def read_meta(step_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's ``amuse_meta.json`` ({} for checkpoints written by plain torchtitan)."""
    path = Path(step_dir) / META_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {step_dir}: unreadable {META_FILE}: {e}") from e


def complete_steps(folder: str | os.PathLike[str]) -> list[int]:
    """Steps with a finished checkpoint (``step-N`` holding DCP ``.metadata``), ascending."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    steps = []
    for child in folder.iterdir():
        m = STEP_DIR.match(child.name)
        if m and (child / ".metadata").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def export_dirs(step_dir: Path) -> list[Path]:
    """The complete export folders (``x``, ``y``) inside a ``step-N`` folder."""
    if not step_dir.is_dir():
        return []
    return [
        c for c in sorted(step_dir.iterdir()) if c.is_dir() and (c / "amuse_export.json").is_file()
    ]


def exported_steps(folder: str | os.PathLike[str]) -> list[int]:
    """Steps whose ``step-N`` folder holds a complete export (checkpoint kept or purged)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    steps = []
    for child in folder.iterdir():
        m = STEP_DIR.match(child.name)
        if m and export_dirs(child):
            steps.append(int(m.group(1)))
    return sorted(steps)


def purge_plan(
    folder: Path, keep_latest_k: int, keep_exports: int
) -> tuple[list[Path], list[Path]]:
    """(step folders to strip to their exports, step folders to delete whole).

    Checkpoints beyond the newest ``keep_latest_k`` are purged. ``keep_exports`` = 0 keeps the
    export of every purged checkpoint; k > 0 keeps the newest k exports of the run (live
    checkpoints' included) and deletes older step folders whole, export-only ones too.
    """
    ckpts = complete_steps(folder)
    stale = ckpts[:-keep_latest_k] if keep_latest_k > 0 else []
    live = set(ckpts) - set(stale)
    exported = exported_steps(folder)
    kept = set(exported) if keep_exports <= 0 else set(exported[-keep_exports:])
    strip, delete = [], []
    for step in sorted(set(stale) | (set(exported) - live)):
        step_dir = folder / f"step-{step}"
        if step in kept:
            if step in stale:
                strip.append(step_dir)
        else:
            delete.append(step_dir)
    return strip, delete


def strip_to_exports(step_dir: Path) -> None:
    """Delete a checkpoint's DCP state but keep its exports and ``amuse_meta.json``.

    ``.metadata`` goes first, so an interrupted strip never leaves a folder that looks like a
    loadable checkpoint.
    """
    (step_dir / ".metadata").unlink(missing_ok=True)
    keep = {p.name for p in export_dirs(step_dir)} | {META_FILE}
    for child in step_dir.iterdir():
        if child.name in keep:
            continue
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


class AnytimeCheckpointManager(CheckpointManager):
    """torchtitan's CheckpointManager with atomic saves, X export and checked loads."""

    def __init__(
        self,
        *args: Any,
        export_fn: Callable[[Path, int], dict[str, Any] | None] | None = None,
        meta: dict[str, Any] | None = None,
        keep_exports: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.export_fn = export_fn
        self.keep_exports = keep_exports
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
        tmp = final.with_name(f".saving-{curr_step}")
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
            meta = {**self.meta, "step": curr_step, "export": export_info}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
            _publish(tmp, final)
        _barrier()
        self.last_saved_step = curr_step
        self._purge_stale_checkpoints()

    def _purge_stale_checkpoints(self) -> None:
        """Keep the newest ``keep_latest_k`` complete checkpoints; purged ones keep their
        exports as ``[anytime] keep_exports`` says. Never touches anything else."""
        if self.keep_latest_k <= 0 or _rank() != 0:
            return
        strip, delete = purge_plan(Path(self.folder), self.keep_latest_k, self.keep_exports)
        for step_dir in strip:
            logger.info(f"Checkpointer keeps the exports of {step_dir}, deletes its DCP state")
            strip_to_exports(step_dir)
        for step_dir in delete:
            assert self.purge_thread is not None
            self.purge_queue.put(str(step_dir))

    # ----------------------------------------------------------------------------- load
    def load(self, step: int = -1) -> bool:
        if not self.enable or not os.path.isdir(self.folder):
            return super().load(step)
        if _rank() == 0:
            _recover_replaced(Path(self.folder))
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


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` folder to ``final``, replacing an older one of that step."""
    replaced = final.with_name(f".replaced-{final.name}")
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        final.rename(replaced)
    tmp.rename(final)
    shutil.rmtree(replaced, ignore_errors=True)


def _recover_replaced(folder: Path) -> None:
    """Undo a publish that crashed between its two renames (the old folder is kept)."""
    for old in folder.glob(".replaced-step-*"):
        final = folder / old.name[len(".replaced-") :]
        if not final.exists():
            old.rename(final)
