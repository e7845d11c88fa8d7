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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torchtitan.components.checkpoint import AsyncMode, CheckpointManager
from torchtitan.tools.logging import logger

from amuse_dist.anytime import integrity, resume_contract
from amuse_dist.anytime.run_format import (
    META_FILE,
    STEP_DIR,
    CheckpointError,
    DivergenceError,
    RunError,
    abandon_later_steps,
    check_shard_sizes,
    claim_checkpoint_folder,
    complete_steps,
    damaged_steps,
    os_error_message,
    owner_problem,
    publish,
    purge_plan,
    read_meta,
    recover_replaced,
    remove_tree,
    run_id,
    saving_dir,
    strip_to_exports,
    write_meta,
)
from amuse_dist.optim import registry
from amuse_dist.titan.dist_util import barrier as _barrier
from amuse_dist.titan.dist_util import rank as _rank

__all__ = [
    "META_FILE",
    "STEP_DIR",
    "AnytimeCheckpointManager",
    "CheckpointError",
    "complete_steps",
    "guess_optimizer",
    "read_meta",
]


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
        state_finite: Callable[[], bool] | None = None,
        trust: bool = False,
        resume_override: list[str] | tuple[str, ...] = (),
        keep_exports: int = 0,
        optional_states: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.dump_folder = str(kwargs.get("base_folder") or Path(self.folder).parent)
        # states a checkpoint written before they existed lacks: skipped on load, not an error
        self.optional_states = tuple(optional_states)
        self.export_fn = export_fn
        self.keep_exports = keep_exports
        self.meta = dict(meta or {})
        self.state_finite = state_finite
        self.trust = trust
        self.resume_override = set(resume_override)
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
        if self.state_finite is not None and not self.state_finite():
            newest = complete_steps(self.folder)
            raise DivergenceError(
                f"step {curr_step}: the model or optimizer state is not finite (diverged); "
                f"checkpoint {final} was not written. "
                + (
                    f"Newest finite checkpoint: step-{newest[-1]}, kept; resume from it"
                    if newest
                    else "No checkpoint to resume from; restart"
                )
                + " with a lower --optimizer.lr"
            )
        tmp = saving_dir(final)
        try:
            self._save_into(tmp, final, curr_step)
        except (OSError, CheckpointException) as e:
            err = _os_error(e)
            if err is None:
                raise
            what = f"saving checkpoint step-{curr_step}"
            raise CheckpointError(os_error_message(err, tmp, what)) from None
        self.last_saved_step = curr_step
        self._purge_stale_checkpoints()

    def _save_into(self, tmp: Path, final: Path, curr_step: int) -> None:
        """DCP state, exports, ``amuse_meta.json``, then the signed manifest of every file
        (each rank hashes 1/W of them), then the publish."""
        if _rank() == 0:
            if tmp.is_symlink():
                tmp.unlink()  # a link under our reserved name: the link goes, its target stays
            remove_tree(tmp)
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
        _barrier()
        files = integrity.step_files(tmp)
        world = dist.get_world_size() if dist.is_initialized() else 1
        share = integrity.hash_share(tmp, files, _rank(), world)
        shares: list[Any] = [share]
        if dist.is_initialized():
            shares = [None] * world
            dist.all_gather_object(shares, share)
        if _rank() == 0:
            signed = integrity.write_manifest(tmp, {k: v for d in shares for k, v in d.items()})
            if not signed:
                logger.warning(
                    f"no signing key at {integrity.key_path()}: step-{curr_step} is saved "
                    "unsigned and will need --anytime.trust_checkpoints to load"
                )
            publish(tmp, final)
        _barrier()

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
            if step_dir.is_symlink() or not step_dir.is_dir():
                logger.warning(f"retention leaves {step_dir} alone: not a folder this run made")
                continue
            assert self.purge_thread is not None
            self.purge_queue.put(str(step_dir))  # rmtree: never follows links inside

    def _find_load_step(self, folder: str = "") -> int:
        """The newest complete ``step-N`` (exact name, a real folder with ``.metadata``):
        ``step-6.bad`` or a symlinked ``step-6`` is never step 6."""
        steps = complete_steps(folder or self.folder)
        return steps[-1] if steps else -1

    # ----------------------------------------------------------------------------- load
    @property
    def resuming(self) -> bool:
        """A training resume (amuse-eval loads without the train state and changes nothing)."""
        return "train_state" not in self.exclude_from_loading

    def load(self, step: int = -1) -> bool:
        if not self.enable:
            return super().load(step)
        if self.resuming:
            self._claim_folder()
        if os.path.isdir(self.folder):
            if _rank() == 0:
                recover_replaced(self.folder)
            _barrier()
            self._refuse_damaged(self._find_load_step() if step == -1 else step, step)
        if not os.path.isdir(self.folder) or (step == -1 and self._find_load_step() == -1):
            if self.initial_load_path and not self.initial_load_in_hf:
                self._check_trusted(self.initial_load_path, "--checkpoint.initial_load_path")
                return self._load_initial()
            return super().load(step)
        load_step = self._find_load_step() if step == -1 else step
        if load_step == -1:
            return super().load(step)
        path = self._create_checkpoint_id(load_step)
        if not os.path.isdir(path) or Path(path).is_symlink():
            raise CheckpointError(
                f"checkpoint {path} not found (checkpoint.load_step = {step}); complete "
                f"checkpoints in {self.folder}: {complete_steps(self.folder) or 'none'}"
                + self._purged_note(path)
            )
        if not (Path(path) / ".metadata").is_file():
            raise CheckpointError(
                f"checkpoint {path} has no DCP .metadata: "
                + (
                    "its state was purged by retention (its exports are kept)"
                    if Path(path, META_FILE).is_file()
                    else "an interrupted or damaged save"
                )
                + f"; complete checkpoints in {self.folder}: {complete_steps(self.folder) or 'none'}"
            )
        self._check_trusted(path, "--anytime.trust_checkpoints")
        check_shard_sizes(path)
        self._check_steps_ahead(load_step)
        self.check_compatible(path, model_only=load_step == 0)
        changed = self._check_resume_contract(path) if self.resuming and load_step > 0 else []
        if step != -1 and self.resuming:
            self._abandon_after(load_step)
        fresh = self._hyper_parameters()
        absent = self._absent_optional_states(path) if load_step > 0 else []
        excluded = self.exclude_from_loading
        self.exclude_from_loading = [*excluded, *absent]
        try:
            loaded = super().load(load_step)
        except (Exception, CheckpointException) as e:  # DCP's errors name neither folder nor cause
            raise CheckpointError(
                f"checkpoint {path} could not be loaded (corrupt or incomplete files?): "
                f"{_describe(e)}"
            ) from e
        finally:
            self.exclude_from_loading = excluded
        if self.resuming:
            self._apply_hyper_parameters(fresh)
            for c in changed:
                logger.warning(
                    f"resume from step-{load_step}: {c.name} changed {c.saved!r} -> {c.new!r}, "
                    f"applied from step {load_step + 1}"
                    + (" (override of the resume contract)" if c.policy != "changeable" else "")
                    + f": {c.why}"
                )
        return loaded

    # ----------------------------------------------------------------------------- checks
    def _collective_error(self, problem: str | None) -> None:
        """Raise on every rank if any rank found a problem (the first rank's message)."""
        problems: list[Any] = [problem]
        if dist.is_initialized():
            problems = [None] * dist.get_world_size()
            dist.all_gather_object(problems, problem)
        first = next((p for p in problems if p), None)
        if first:
            raise CheckpointError(first)

    def _check_trusted(self, path: str, flag: str) -> None:
        """The one trust check before anything is unpickled: the step's manifest must carry this
        user's signature (rank 0 checks, every rank learns), and every file its digest (each
        rank checks 1/W of the files). A trusted folder is still checked for integrity."""
        record: list[Any] = [None, None]
        if _rank() == 0:
            why = integrity.trust_problem(path)
            data = integrity.read_manifest(path)
            if why and not self.trust:
                record = [integrity.untrusted_message(path, why, flag), None]
            else:
                if why:
                    logger.warning(f"checkpoint {path} loaded as trusted ({flag}): {why}")
                record = [None, (data or {}).get("files")]
        if dist.is_initialized():
            dist.broadcast_object_list(record, src=0)
        if record[0]:
            raise CheckpointError(record[0])
        files = record[1]
        if files:
            world = dist.get_world_size() if dist.is_initialized() else 1
            exports = {r.split("/", 1)[0] for r in files if "/" in r}
            dcp = {r: v for r, v in files.items() if r.split("/", 1)[0] not in exports}
            self._collective_error(integrity.verify_files(path, dcp, _rank(), world))

    def _load_initial(self) -> bool:
        """``--checkpoint.initial_load_path`` (a DCP step folder), checked like a resume."""
        path = str(self.initial_load_path)
        if not os.path.isdir(path) or not (Path(path) / ".metadata").is_file():
            raise CheckpointError(
                f"--checkpoint.initial_load_path = {path}: expected a step-N folder with DCP "
                ".metadata (a complete amuse_dist checkpoint)"
            )
        check_shard_sizes(path)
        model_only = self.initial_load_model_only
        self.check_compatible(path, model_only=model_only)
        logger.info(f"Loading the checkpoint from {path} (--checkpoint.initial_load_path)")
        try:
            self.dcp_load(
                self._states_to_load(model_only),
                checkpoint_id=path,
                from_hf=False,
                from_quantized=False,
            )
            return True
        except (Exception, CheckpointException) as e:
            raise CheckpointError(
                f"checkpoint {path} could not be loaded (corrupt or incomplete files?): "
                f"{_describe(e)}"
            ) from e

    def _claim_folder(self) -> None:
        """A training run writes only into its own checkpoint folder (see ``owner_problem``)."""
        problem = None
        if _rank() == 0:
            try:
                this_run = run_id(self.dump_folder)
                problem = owner_problem(self.folder, self.dump_folder, this_run)
                self.meta["run_id"] = this_run
                ck, dump = Path(self.folder).resolve(), Path(self.dump_folder).resolve()
                if problem is None and this_run and dump not in ck.parents:
                    claim_checkpoint_folder(self.folder, this_run)  # outside: record the owner
            except RunError as e:
                problem = str(e)
            except OSError as e:
                problem = os_error_message(e, self.folder, "[checkpoint] folder")
        self._collective_error(problem)

    def _refuse_damaged(self, load_step: int, step: int) -> None:
        """A ``step-N`` newer than the step to resume that is no checkpoint is named, never
        skipped silently (a later save would replace it)."""
        if step != -1 or not self.resuming:
            return
        damaged = {n: why for n, why in damaged_steps(self.folder).items() if n > load_step}
        if damaged:
            n = max(damaged)
            raise CheckpointError(
                f"{damaged[n]}; refusing to resume from "
                + (f"step-{load_step}" if load_step >= 0 else "scratch")
                + f" past it. Move {Path(self.folder) / f'step-{n}'} aside (e.g. rename it "
                "damaged-step-N) or resume from a step explicitly with --checkpoint.load_step"
            )

    def _purged_note(self, path: str) -> str:
        p = Path(path)
        if p.is_symlink():
            return f" ({p} is a symlink: never read)"
        return ""

    def _check_steps_ahead(self, load_step: int) -> None:
        """A resume whose ``--training.steps`` is already behind the checkpoint trains nothing."""
        if not self.resuming:
            return
        steps = ((self.meta.get("config") or {}).get("training") or {}).get("steps")
        if isinstance(steps, int) and load_step > steps:
            raise CheckpointError(
                f"--training.steps = {steps}, but checkpoint step-{load_step} in {self.folder} "
                "is already beyond it: nothing would be trained. Raise --training.steps above "
                f"{load_step}, or roll back with --checkpoint.load_step <= {steps}"
            )
        if isinstance(steps, int) and load_step == steps:
            logger.warning(
                f"checkpoint step-{load_step} already reached --training.steps = {steps}: "
                "nothing to train; raise --training.steps to continue"
            )

    def _absent_optional_states(self, path: str) -> list[str]:
        """The optional states this checkpoint does not hold (written before they existed)."""
        wanted = [n for n in self.optional_states if n in self.states]
        if not wanted or any(n in self.exclude_from_loading for n in wanted):
            return []
        keys = FileSystemReader(path).read_metadata().state_dict_metadata
        return [n for n in wanted if not any(k.startswith(f"{n}.") for k in keys)]

    def _abandon_after(self, load_step: int) -> None:
        """A rollback: move the later checkpoints aside so a plain restart cannot reach them."""
        moved: list[Any] = [None, []]
        if _rank() == 0:
            dest, later = abandon_later_steps(self.folder, load_step)
            moved = [str(dest) if dest else None, later]
        if dist.is_initialized():
            dist.broadcast_object_list(moved, src=0)
        if moved[0]:
            logger.warning(
                f"rollback to step-{load_step}: the later checkpoints "
                f"{', '.join(f'step-{s}' for s in moved[1])} are abandoned, moved to {moved[0]} "
                "(kept, not deleted; a plain restart resumes from this history)"
            )

    def _check_resume_contract(self, path: str) -> list[resume_contract.Change]:
        """Refuse the changes the contract refuses (unless overridden); the others, to log."""
        saved = read_meta(path).get("config")
        new = self.meta.get("config")
        if not saved and new and not self.trust:
            raise CheckpointError(
                f"checkpoint {path}: its {META_FILE} has no config, so the resume contract "
                "cannot be checked (not written by amuse_dist, or edited); resume with "
                "--anytime.trust_checkpoints only if you know it matches this config"
            )
        if not saved or not new:
            return []
        changed = resume_contract.changes(saved, new, registry.hparam_sections())
        refused = [
            c
            for c in changed
            if c.policy == resume_contract.REFUSED
            and f"{c.section}.{c.key}" not in self.resume_override
        ]
        if refused:
            raise CheckpointError(resume_contract.refusal(path, refused))
        return changed

    def _hyper_parameters(self) -> dict[str, Any]:
        """The hyper-parameters this run's config put into the optimizers and LR schedulers."""
        out: dict[str, Any] = {"groups": [], "base_lrs": []}
        opts = self.states.get("optimizer")
        for opt in getattr(opts, "optimizers", []):
            keys = [k for k in opt.defaults if k not in ("lr", "params")]
            out["groups"].append([{k: g[k] for k in keys if k in g} for g in opt.param_groups])
        scheds = self.states.get("lr_scheduler")
        for sched in getattr(scheds, "schedulers", []):
            out["base_lrs"].append(list(sched.base_lrs))
        return out

    def _apply_hyper_parameters(self, fresh: dict[str, Any]) -> None:
        """Put this run's hyper-parameters back after loading: the optimizer's state_dict
        restores the saved param groups, so without this a changed value would be ignored."""
        opts = self.states.get("optimizer")
        for opt, groups in zip(getattr(opts, "optimizers", []), fresh["groups"], strict=True):
            for group, values in zip(opt.param_groups, groups, strict=True):
                group.update(values)
        scheds = self.states.get("lr_scheduler")
        if "lr_scheduler" in self.exclude_from_loading or scheds is None:
            return
        for sched, base_lrs in zip(scheds.schedulers, fresh["base_lrs"], strict=True):
            if list(sched.base_lrs) == base_lrs:
                continue
            sched.base_lrs = list(base_lrs)
            lambdas = getattr(sched, "lr_lambdas", [lambda _: 1.0] * len(base_lrs))
            lrs = [base * f(sched.last_epoch) for f, base in zip(lambdas, base_lrs, strict=True)]
            for group, base, lr in zip(sched.optimizer.param_groups, base_lrs, lrs, strict=True):
                group["initial_lr"], group["lr"] = base, lr
            sched._last_lr = lrs

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


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind a save failure (DCP wraps each rank's error)."""
    if isinstance(e, OSError):
        return e
    for failure in (getattr(e, "failures", None) or {}).values():
        if isinstance(failure, tuple):  # DCP wraps (exception, traceback)
            failure = failure[0]
        seen: BaseException | None = failure
        while seen is not None:
            if isinstance(seen, OSError):
                return seen
            seen = seen.__cause__ or seen.__context__
    return None


def _describe(e: BaseException) -> str:
    """The first rank's underlying error for DCP's CheckpointException, else the error."""
    failures = getattr(e, "failures", None)
    if isinstance(e, CheckpointException) and failures:
        rank, failure = next(iter(failures.items()))
        return f"rank {rank}: {type(failure).__name__}: {failure}"
    return f"{type(e).__name__}: {e}"
