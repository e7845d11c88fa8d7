"""The on-disk format of a run folder, in one place: names, markers, the export info record,
atomic publish, completeness checks, the run lock and rollback.

A run folder (``[job] dump_folder``) looks like::

    .amuse_run.lock                 run lock (held by rank 0 while a trainer runs)
    .amuse_run.json                 who holds it: host, pid, start time
    export_assets/tokenizer/        tokenizer files copied once at start; every export reads them
    checkpoint/step-N/              a complete checkpoint: DCP files + .metadata + amuse_meta.json
    checkpoint/step-N/x/            its X export: *.safetensors, config.json, amuse_export.json
    checkpoint/.saving-N/           a save in progress (renamed to step-N when complete)
    checkpoint/abandoned-after-N-T/ checkpoints later than a rollback to step N (kept, unreachable)

It imports neither torchtitan nor (at module level) torch, so the CLIs use it before the device
is set up. Every error it raises names the file or the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amuse_dist.anytime.integrity import MANIFEST

META_FILE = "amuse_meta.json"
EXPORT_MARKER = "amuse_export.json"
DCP_METADATA = ".metadata"
STEP_DIR = re.compile(r"^step-(\d+)$")
SAVING_PREFIX = ".saving-"
REPLACED_PREFIX = ".replaced-"
ABANDONED_PREFIX = "abandoned-after-"
LOCK_FILE = ".amuse_run.lock"
LOCK_INFO = ".amuse_run.json"
RUN_ID_FILE = ".amuse_run_id"
OWNER_FILE = ".amuse_checkpoints.json"
RUN_ASSETS = "export_assets"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_EXPORT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

PathLike = str | os.PathLike[str]


# ------------------------------------------------------------------------------------ errors
class RunError(RuntimeError):
    """A problem the CLIs report without a traceback; ``exit_code`` is the process status."""

    exit_code = 2


class CheckpointError(RunError):
    """A checkpoint that cannot be loaded into this run; the message names the path."""


class ExportError(RunError):
    """An export folder that cannot be read or does not fit the model; names the file."""


class RunLockError(RunError):
    """The dump folder is in use by another run."""


class DivergenceError(RunError):
    """A non-finite loss, gradient or state: the run stops, nothing non-finite is published."""

    exit_code = 3


# ------------------------------------------------------------------------------------ names
def step_name(step: int) -> str:
    return f"step-{step}"


def step_of(path: PathLike) -> int | None:
    """N for a ``step-N`` folder, else None."""
    m = STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def saving_dir(final: PathLike) -> Path:
    """Where a save of ``final`` (``step-N``) is written before it is published."""
    final = Path(final)
    return final.with_name(SAVING_PREFIX + final.name[len("step-") :])


def check_export_folder(export_folder: str) -> str:
    """Refuse an ``[anytime] export_folder`` that is not one plain folder name.

    An export folder equal to the step folder (``"."``) or outside it (``"../x"``, an absolute
    path) would have its publish delete DCP files or folders the run never created.
    """
    name = str(export_folder)
    reserved = {META_FILE, DCP_METADATA, EXPORT_MARKER, MANIFEST}
    if (
        not _EXPORT_NAME.match(name)
        or name in reserved
        or name.endswith(".distcp")
        or name.startswith((ABANDONED_PREFIX, "step-"))
        or len(name.encode()) > 200
    ):
        raise RunError(
            f'[anytime] export_folder = "{name}": expected one folder name inside step-N '
            '(letters, digits, "_", "-", "."; not ".", "..", a path, an absolute path, or a name '
            'the checkpoint itself uses; at most 200 bytes), e.g. "x"'
        )
    return name


def export_dir(step_dir: PathLike, export_folder: str) -> Path:
    """``step_dir/<export_folder>``, confined to ``step_dir`` (see ``check_export_folder``)."""
    step_dir = Path(step_dir)
    dest = step_dir / check_export_folder(export_folder)
    if dest.resolve().parent != step_dir.resolve():  # a symlinked name pointing elsewhere
        raise RunError(
            f'[anytime] export_folder = "{export_folder}": {dest} resolves outside {step_dir}'
        )
    return dest


# ------------------------------------------------------------------------------------ checks
def is_complete_checkpoint(path: PathLike) -> bool:
    """A ``step-N`` folder whose DCP save finished (its ``.metadata`` is written last); a
    symlinked step folder is never one (the run did not create what it points at)."""
    path = Path(path)
    return not path.is_symlink() and (path / DCP_METADATA).is_file()


def complete_steps(folder: PathLike) -> list[int]:
    """Steps with a finished checkpoint (``step-N`` holding DCP ``.metadata``), ascending."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    steps = []
    for child in folder.iterdir():
        n = step_of(child)
        if n is not None and is_complete_checkpoint(child):
            steps.append(n)
    return sorted(steps)


def damaged_steps(folder: PathLike) -> dict[int, str]:
    """{N: why} for ``step-N`` entries that are not loadable checkpoints and not purged ones
    (a purged step keeps ``amuse_meta.json`` and its exports): named, never skipped silently."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    out = {}
    for child in folder.iterdir():
        n = step_of(child)
        if n is None:
            continue
        if child.is_symlink():
            out[n] = f"{child} is a symlink (to {os.readlink(child)}); never read or deleted"
        elif not child.is_dir():
            out[n] = f"{child} is not a folder"
        elif not (child / DCP_METADATA).is_file() and not export_dirs(child):
            out[n] = f"{child} has no DCP {DCP_METADATA} (an interrupted or damaged save)"
    return out


def purged(step_dir: PathLike) -> bool:
    """A ``step-N`` whose DCP state retention removed (its exports kept): not "corrupt"."""
    p = Path(step_dir)
    return p.is_dir() and not (p / DCP_METADATA).exists() and bool(export_dirs(p))


# ------------------------------------------------------------------ retention (keep_exports)
def export_dirs(step_dir: PathLike) -> list[Path]:
    """The complete export folders (``x``, ``y``) inside a ``step-N`` folder."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir() or step_dir.is_symlink():
        return []
    return [
        c
        for c in sorted(step_dir.iterdir())
        if c.is_dir() and not c.is_symlink() and (c / EXPORT_MARKER).is_file()
    ]


def exported_steps(folder: str | os.PathLike[str]) -> list[int]:
    """Steps whose ``step-N`` folder holds a complete export (checkpoint kept or purged)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    steps = []
    for child in folder.iterdir():
        m = STEP_DIR.match(child.name)
        if m and not child.is_symlink() and export_dirs(child):
            steps.append(int(m.group(1)))
    return sorted(steps)


def purge_plan(
    folder: PathLike, keep_latest_k: int, keep_exports: int
) -> tuple[list[Path], list[Path]]:
    """(step folders to strip to their exports, step folders to delete whole).

    Checkpoints beyond the newest ``keep_latest_k`` are purged. ``keep_exports`` = 0 keeps the
    export of every purged checkpoint; k > 0 keeps the newest k exports of the run (live
    checkpoints' included) and deletes older step folders whole, export-only ones too.
    """
    folder = Path(folder)
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


def strip_to_exports(step_dir: PathLike) -> None:
    """Delete a checkpoint's DCP state but keep its exports and ``amuse_meta.json``.

    ``.metadata`` goes first, so an interrupted strip never leaves a folder that looks like a
    loadable checkpoint.
    """
    step_dir = Path(step_dir)
    if step_dir.is_symlink():
        return  # never through a symlink: the run did not create what it points at
    (step_dir / DCP_METADATA).unlink(missing_ok=True)
    keep = {p.name for p in export_dirs(step_dir)} | {META_FILE, MANIFEST}
    for child in step_dir.iterdir():
        if child.name in keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)  # a symlink: the link goes, never its target


def remove_tree(path: PathLike) -> bool:
    """Delete a folder the run created; a symlink (or a non-folder) is left alone: False.

    ``shutil.rmtree`` never follows symlinks inside the tree, so only the top needs the check.
    """
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def is_complete_export(path: PathLike) -> bool:
    """A folder that an export finished writing (its marker is written last)."""
    p = Path(path)
    return (p / EXPORT_MARKER).is_file() and any(p.glob("*.safetensors"))


def written_by_amuse(path: PathLike) -> bool:
    """A step folder with ``amuse_meta.json`` or an export folder with ``amuse_export.json``."""
    p = Path(path)
    return (p / META_FILE).is_file() or (p / EXPORT_MARKER).is_file()


def check_shard_sizes(step_dir: PathLike) -> None:
    """Raise CheckpointError naming the first DCP file shorter than its ``.metadata`` says.

    A truncated ``.distcp`` otherwise fails inside DCP's reader with an internal tuple.
    """
    from torch.distributed.checkpoint import FileSystemReader

    step_dir = Path(step_dir)
    try:
        metadata = FileSystemReader(str(step_dir)).read_metadata()
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {step_dir} is corrupt or incomplete: cannot read its DCP "
            f"{DCP_METADATA} ({type(e).__name__}: {e})"
        ) from e
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is None:
            continue
        end = int(info.offset) + int(info.length)
        needed[rel] = max(needed.get(rel, 0), end)
    for rel, end in sorted(needed.items()):
        f = step_dir / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {step_dir} is incomplete: {f} is missing")
        size = f.stat().st_size
        if size < end:
            raise CheckpointError(
                f"checkpoint {step_dir} is corrupt: {f} is truncated ({size} bytes, "
                f"{DCP_METADATA} expects at least {end}); resume from another step with "
                "--checkpoint.load_step"
            )


def check_export_files(export: PathLike) -> None:
    """Raise ExportError naming the first ``*.safetensors`` file that is truncated or corrupt.

    Reads only each file's header (8-byte length + JSON with every tensor's data offsets) and
    compares the end of the last tensor with the file size; safetensors' own error names no file.
    """
    export = Path(export)
    files = sorted(export.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{export}: no *.safetensors files (not an X export?)")
    for f in files:
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if n <= 0 or 8 + n > size:
                    raise ValueError(f"header of {n} bytes in a file of {size}")
                header = json.loads(fh.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise ExportError(f"{f}: corrupt safetensors file (unreadable header: {e})") from e
        need = 8 + n + max(ends, default=0)
        if size < need:
            raise ExportError(
                f"{f}: truncated safetensors file ({size} bytes, its header needs {need}); "
                f"evaluate the checkpoint's DCP state instead: amuse-eval {export.parent} "
                "--source dcp"
            )


# ------------------------------------------------------------------------------------ records
@dataclass
class ExportInfo:
    """``amuse_export.json``: what an export holds. Written by the trainer, read by eval."""

    step: int
    weights: str  # "x" (averaged) or "y" (the training weights)
    optimizer: str
    model: dict[str, Any] = field(default_factory=dict)
    beta_y: float | None = None
    folder: str = "x"
    # what the model card tells a reader (filled in by the trainer; None where unknown)
    tokens_seen: int | None = None
    n_params: int | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] | None = None
    command: str | None = None
    world_size: int | None = None
    y_folder: str | None = None  # the Y export beside it ([anytime] export_y)

    def write(self, export: PathLike) -> None:
        text = json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"
        (Path(export) / EXPORT_MARKER).write_text(text)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportInfo:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def read(cls, export: PathLike) -> ExportInfo:
        path = Path(export) / EXPORT_MARKER
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise ExportError(f"{path}: unreadable export record ({e})") from e


def read_meta(step_dir: PathLike) -> dict[str, Any]:
    """The checkpoint's ``amuse_meta.json`` ({} for checkpoints written by plain torchtitan)."""
    path = Path(step_dir) / META_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {step_dir}: unreadable {META_FILE}: {e}") from e


def write_meta(step_dir: PathLike, meta: dict[str, Any]) -> None:
    (Path(step_dir) / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------------ publish
def publish(tmp: PathLike, final: PathLike) -> None:
    """Rename the finished ``tmp`` folder to ``final``, replacing an older one of that name.

    The old one is renamed aside first and deleted only after the new one is in place; a crash
    between the two renames is undone by ``recover_replaced``.
    """
    tmp, final = Path(tmp), Path(final)
    replaced = final.with_name(REPLACED_PREFIX + final.name)
    if final.is_symlink():
        raise CheckpointError(
            f"{final} is a symlink (to {os.readlink(final)}): amuse_dist never replaces or "
            "deletes through a link; move it away and resume"
        )
    if final.exists():
        remove_tree(replaced)
        final.rename(replaced)
    tmp.rename(final)
    remove_tree(replaced)


def recover_replaced(folder: PathLike) -> None:
    """Undo a publish that crashed between its two renames (the old folder is kept)."""
    for old in Path(folder).glob(REPLACED_PREFIX + "*"):
        final = old.with_name(old.name[len(REPLACED_PREFIX) :])
        if not final.exists():
            old.rename(final)


# ------------------------------------------------------------------------------------ rollback
def abandon_later_steps(folder: PathLike, step: int) -> tuple[Path | None, list[int]]:
    """Move every ``step-M`` (M > ``step``) into ``abandoned-after-<step>-<utc time>/``.

    After a rollback to ``step`` the later checkpoints belong to an abandoned history: a plain
    restart must not resume from them. They are kept (moved, never deleted), outside the names
    that resume, retention and amuse-eval look at.
    """
    folder = Path(folder)
    later = [s for s in _all_steps(folder) if s > step]
    if not later:
        return None, []
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = folder / f"{ABANDONED_PREFIX}{step}-{stamp}"
    n = 0
    while dest.exists():
        n += 1
        dest = folder / f"{ABANDONED_PREFIX}{step}-{stamp}-{n}"
    dest.mkdir()
    for s in later:
        (folder / step_name(s)).rename(dest / step_name(s))
    return dest, later


def _all_steps(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(n for c in folder.iterdir() if (n := step_of(c)) is not None)


# ------------------------------------------------------------------------------------ assets
def run_tokenizer_dir(dump_folder: PathLike) -> Path:
    return Path(dump_folder) / RUN_ASSETS / "tokenizer"


def copy_run_assets(src: PathLike | None, dump_folder: PathLike) -> Path | None:
    """Copy the tokenizer files into the run folder once; later calls keep the run's copy.

    Exports read the run's copy, so another run that rebuilds a shared assets folder cannot
    change what this run's exports ship. Returns the run's copy (None if there is nothing).
    """
    dest = run_tokenizer_dir(dump_folder)
    refuse_symlink(dest.parent, "the run's export assets")
    refuse_symlink(dest, "the run's tokenizer copy")
    if any((dest / name).is_file() for name in TOKENIZER_FILES):
        return dest
    if src is None or not any((Path(src) / n).is_file() for n in TOKENIZER_FILES):
        return None
    tmp = dest.with_name(dest.name + ".tmp")
    refuse_symlink(tmp, "a temporary copy")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, tmp / name)
    tmp.rename(dest)
    return dest


# ------------------------------------------------------------------------------------ guards
def refuse_symlink(path: PathLike, what: str) -> None:
    """RunError if ``path`` is a symlink: the run writes its records only into files it made."""
    path = Path(path)
    if path.is_symlink():
        raise RunError(
            f"{path} ({what}) is a symlink to {os.readlink(path)}: amuse_dist never writes "
            "through a link in the run folder; remove the link (keep its target) and rerun"
        )


def check_folder_path(path: PathLike, key: str) -> str | None:
    """An error line if the folder ``key`` = ``path`` cannot be created or written, else None."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        return f"{key} = {p}: a file, expected a folder; choose another path or move the file"
    probe = p
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{key} = {p}: {probe} is a file, so the folder cannot be created there"
    if not os.access(probe, os.W_OK | os.X_OK):
        return (
            f"{key} = {p}: {probe} is not writable by this user; make it writable or choose "
            "another folder"
        )
    return None


def os_error_message(e: OSError, path: PathLike, what: str) -> str:
    """One line for an OSError while writing ``path``: what failed, where, and the fix."""
    import errno

    where = getattr(e, "filename", None) or path
    if e.errno == errno.ENOSPC:
        return (
            f"{what}: no space left on the device holding {where}; free space and resume "
            "(the previous checkpoint is kept)"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what}: {where} is not writable ({e.strerror}); make it writable and resume"
    if e.errno == errno.ENAMETOOLONG:
        return f"{what}: a name under {where} is too long for the file system; choose a shorter one"
    return (
        f"{what}: {where}: {e.strerror or e}; fix it and resume (the previous checkpoint is kept)"
    )


# ------------------------------------------------------------------------------------ run id
def run_id(dump_folder: PathLike, create: bool = True) -> str | None:
    """This run's id (``.amuse_run_id`` in the dump folder), made once at the first start."""
    import uuid

    path = Path(dump_folder) / RUN_ID_FILE
    if path.is_file() and not path.is_symlink():
        return path.read_text().strip() or None
    if not create:
        return None
    refuse_symlink(path, "the run id")
    path.parent.mkdir(parents=True, exist_ok=True)
    value = uuid.uuid4().hex
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    tmp.write_text(value + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def owner_problem(ckpt_folder: PathLike, dump_folder: PathLike, this_run: str | None) -> str | None:
    """Why this run may not write into ``ckpt_folder`` (None when it may).

    A checkpoint folder inside the dump folder is the run's own. One outside belongs to the run
    named in its ``.amuse_checkpoints.json`` (or in its checkpoints' ``amuse_meta.json``):
    resuming there would load, and retention delete, another run's checkpoints.
    """
    ck, dump = Path(ckpt_folder).resolve(), Path(dump_folder).resolve()
    if ck == dump or dump in ck.parents:
        return None
    owner = None
    try:
        owner = json.loads((Path(ckpt_folder) / OWNER_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        pass
    steps = _all_steps(Path(ckpt_folder))
    if owner is None:
        ids = set()
        for s in steps:
            try:
                ids.add(read_meta(Path(ckpt_folder) / step_name(s)).get("run_id"))
            except CheckpointError:
                ids.add(None)
        if not steps and not (Path(ckpt_folder).exists() and any(Path(ckpt_folder).iterdir())):
            return None  # new or empty: this run takes it
        owner = next(iter(ids)) if len(ids) == 1 else None
    if owner is not None and owner == this_run:
        return None
    return (
        f"[checkpoint] folder = {ckpt_folder}: outside --job.dump_folder {dump_folder} and "
        + (f"owned by run {owner}" if owner else "holding checkpoints of an unknown run")
        + f", not this run ({this_run}): resuming would load, and retention delete, its "
        "checkpoints. Start from its weights with --checkpoint.initial_load_path <its step-N> "
        "and a checkpoint folder of your own"
    )


def claim_checkpoint_folder(ckpt_folder: PathLike, this_run: str) -> None:
    """Record this run as the owner of an (empty or own) checkpoint folder."""
    path = Path(ckpt_folder) / OWNER_FILE
    refuse_symlink(path, "the checkpoint folder's owner record")
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": this_run}) + "\n")


# ------------------------------------------------------------------------------------ run lock
class RunLock:
    """One run per dump folder: an exclusive OS file lock, held by rank 0 while it trains.

    The lock (``filelock``, fcntl on POSIX) is released by the kernel when the holder dies, even
    by kill -9, so a crashed run never blocks the next one. ``.amuse_run.json`` names the holder
    (host, pid, start); it is removed on a clean release, so one left behind when the lock is
    free marks a run that died (a stale record, reported and replaced).
    """

    def __init__(self, dump_folder: PathLike) -> None:
        from filelock import FileLock

        self.folder = Path(dump_folder)
        self.info_path = self.folder / LOCK_INFO
        self._lock = FileLock(str(self.folder / LOCK_FILE), timeout=0)
        self.stale: dict[str, Any] | None = None

    def acquire(self) -> None:
        from filelock import Timeout

        self.folder.mkdir(parents=True, exist_ok=True)
        for name in (LOCK_FILE, LOCK_INFO):
            refuse_symlink(self.folder / name, "the run lock")
        try:
            self._lock.acquire()
        except Timeout:
            raise RunLockError(self._busy_message()) from None
        self.stale = self._holder() or None
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        tmp = self.info_path.with_name(self.info_path.name + ".tmp")
        tmp.write_text(json.dumps(record) + "\n")
        tmp.replace(self.info_path)

    def _busy_message(self) -> str:
        holder = self._holder()
        who = (
            f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"
            if holder
            else "an unknown process"
        )
        return (
            f"[job] dump_folder = {self.folder}: another training run is using this folder "
            f"({who}). Wait for it to finish or choose another --job.dump_folder; if that "
            f"process is gone and the lock stays held (a dead host on a shared file system), "
            f"delete {self.folder / LOCK_FILE}"
        )

    def busy(self) -> str | None:
        """The busy message if another process holds the lock now, else None (a probe before
        launch: creates nothing, takes nothing)."""
        from filelock import Timeout

        path = self.folder / LOCK_FILE
        if not path.is_file() or path.is_symlink():
            return None
        try:
            self._lock.acquire()
        except Timeout:
            return self._busy_message()
        except OSError:
            return None
        self._lock.release()
        return None

    def release(self) -> None:
        if self._lock.is_locked:
            self.info_path.unlink(missing_ok=True)
            self._lock.release()

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.info_path.read_text())
        except (OSError, ValueError):
            return {}
