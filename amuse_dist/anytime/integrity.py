"""Trust and integrity of a checkpoint: a signed manifest of its files, written at save.

``amuse_manifest.json`` in each ``step-N`` lists every file of the step (DCP shards, the pickled
``.metadata``, ``amuse_meta.json``, the export files) with its size and SHA-256, and an HMAC of
that list under the user's key (``$AMUSE_DIST_KEY_FILE``, default
``~/.config/amuse_dist/checkpoint.key``, created 0600 on the first save). Why a key: a manifest
or an ``amuse_meta.json`` copied from another run, or written by hand next to a crafted pickle,
cannot carry a valid HMAC, so "written by amuse_dist" cannot be faked by whoever shares a folder.

- trust (``verify_trusted``): the HMAC must match, else the step is untrusted (loading it would
  unpickle its ``.metadata`` and objects in its shards) unless the user says
  ``--anytime.trust_checkpoints`` / ``--trust``;
- integrity (``verify_files``): every listed file must have its size and digest; a changed byte
  is a named error even for a trusted folder. Files are split among ranks (``files[r::W]``), so
  each rank reads about 1/W of the checkpoint at save and at load.

Imports neither torch nor torchtitan.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

MANIFEST = "amuse_manifest.json"
KEY_ENV = "AMUSE_DIST_KEY_FILE"
_CHUNK = 1 << 22

PathLike = str | os.PathLike[str]


class IntegrityError(RuntimeError):
    """A file of a checkpoint differs from what its manifest recorded (exit 2)."""

    exit_code = 2


def key_path() -> Path:
    env = os.environ.get(KEY_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "amuse_dist" / "checkpoint.key"


def user_key(create: bool) -> bytes | None:
    """The user's signing key; created once (race-free: link of a finished temp file)."""
    path = key_path()
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        if not create:
            return None
    except (OSError, ValueError):
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)  # fails if another process made it first: use theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        return None


def step_files(step_dir: PathLike) -> list[str]:
    """Relative paths of every regular file under ``step_dir`` but the manifest, sorted."""
    root = Path(step_dir)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel != MANIFEST and p.is_file() and not p.is_symlink():
                out.append(rel)
    return sorted(out)


def digest(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_share(step_dir: PathLike, files: list[str], rank: int, world: int) -> dict[str, Any]:
    """{rel: [size, sha256]} for this rank's share of ``files``."""
    root = Path(step_dir)
    return {rel: [(root / rel).stat().st_size, digest(root / rel)] for rel in files[rank::world]}


def _mac(key: bytes, files: dict[str, Any]) -> str:
    body = json.dumps(files, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def write_manifest(step_dir: PathLike, files: dict[str, Any]) -> bool:
    """Write the manifest (signed when a key can be had); True when signed."""
    key = user_key(create=True)
    record = {"version": 1, "files": files, "hmac": _mac(key, files) if key else None}
    path = Path(step_dir) / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return key is not None


def read_manifest(step_dir: PathLike) -> dict[str, Any] | None:
    path = Path(step_dir) / MANIFEST
    if not path.is_file() or path.is_symlink():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data.get("files"), dict):
            return None
        return data
    except (OSError, ValueError, AttributeError):
        return None


def trust_problem(step_dir: PathLike) -> str | None:
    """None if ``step_dir`` carries a manifest signed by this user's key, else why not."""
    data = read_manifest(step_dir)
    if data is None:
        return f"no valid {MANIFEST}, so amuse_dist did not write it (or a version before 0.3 did)"
    key = user_key(create=False)
    if key is None:
        return f"no signing key at {key_path()} on this machine (written by another user?)"
    if not data.get("hmac") or not hmac.compare_digest(str(data["hmac"]), _mac(key, data["files"])):
        return (
            f"its {MANIFEST} is not signed with this user's key {key_path()} (written by another "
            "user or machine, or altered)"
        )
    return None


def untrusted_message(step_dir: PathLike, why: str, flag: str) -> str:
    return (
        f"checkpoint {step_dir} is untrusted: {why}. Its DCP .metadata and shards hold pickles "
        f"that can run code when loaded; pass {flag} only if you trust whoever wrote it"
    )


def verify_files(
    step_dir: PathLike, files: dict[str, Any], rank: int = 0, world: int = 1, under: str = ""
) -> str | None:
    """Check this rank's share of the listed files (those under ``under``); the first problem."""
    root = Path(step_dir)
    names = sorted(r for r in files if r.startswith(under))
    for rel in names[rank::world]:
        size, want = files[rel]
        p = root / rel
        if not p.is_file():
            return f"{p} is missing (listed in {root / MANIFEST}); resume or evaluate another step"
        got_size = p.stat().st_size
        if got_size != size:
            return (
                f"{p} has {got_size} bytes, {size} when saved (truncated or altered); resume or "
                "evaluate another step (--checkpoint.load_step)"
            )
        if digest(p) != want:
            return (
                f"{p} is corrupt: its SHA-256 differs from the one recorded at save in "
                f"{root / MANIFEST} (a changed byte); resume or evaluate another step "
                "(--checkpoint.load_step)"
            )
    return None
