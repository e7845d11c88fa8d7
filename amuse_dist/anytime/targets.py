"""What ``amuse-eval`` evaluates, found and checked before any model or process group exists.

A ``Target`` is one step to evaluate: its DCP state (``kind = "dcp"``, a ``step-N`` folder) or
an export (``kind = "export"``, ``step-N/x`` or an export folder given directly). Discovery
follows the run-folder format (``run_format``); the checks here are the ones that need no model:
trust (the signed manifest, see ``integrity``), completeness (truncated or changed files) and the
weights asked for. Where the results go is decided here too: never inside a step folder (retention
deletes those) and never over a file amuse-eval did not write.

Imports neither torch nor torchtitan.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amuse_dist.anytime import integrity
from amuse_dist.anytime.run_format import (
    DCP_METADATA,
    ExportInfo,
    RunError,
    check_export_files,
    check_shard_sizes,
    complete_steps,
    damaged_steps,
    export_dir,
    exported_steps,
    is_complete_export,
    purged,
    read_meta,
    step_of,
)

RESULT_FIELDS = ("step", "source", "weights", "loss", "perplexity", "tokens", "path")


class TargetError(RunError):
    """Nothing (or nothing usable) to evaluate at the path given; names it (exit 2)."""


@dataclass(frozen=True)
class Target:
    """One step to evaluate: ``path`` is the ``step-N`` folder (dcp) or the export folder."""

    step: int
    kind: str  # "dcp" | "export"
    path: Path

    @property
    def step_dir(self) -> Path:
        return self.path if self.kind == "dcp" else self.path.parent

    def export_folder(self) -> Path:
        """The X export of this target (itself for an export)."""
        if self.kind == "export":
            return self.path
        export = export_dir(
            self.path, (read_meta(self.path).get("export") or {}).get("folder", "x")
        )
        if not is_complete_export(export):
            raise TargetError(f"{export}: no complete X export in this checkpoint")
        return export


# ------------------------------------------------------------------------------------ discovery
def find_targets(path: Path, source: str = "auto") -> list[Target]:
    """The steps under ``path`` (a run folder, its ``checkpoint/``, a ``step-N`` or an export),
    in step order. ``source``: "dcp", "export", or "auto" (DCP where the state is kept)."""
    path = Path(path)
    if not path.exists():
        raise TargetError(f"{path}: no such file or folder")
    if path.is_symlink() and step_of(path) is not None:
        raise TargetError(f"{path} is a symlink: evaluate the folder it points to instead")
    if is_complete_export(path):
        return [Target(int(ExportInfo.read(path).step), "export", path)]
    if step_of(path) is not None:
        return [_pick(path, source)]
    folder = path / "checkpoint" if (path / "checkpoint").is_dir() else path
    steps = complete_steps(folder)
    export_only = [] if source == "dcp" else sorted(set(exported_steps(folder)) - set(steps))
    if not steps and not export_only:
        damaged = damaged_steps(folder)
        raise TargetError(
            f"{path}: no checkpoint found (expected step-N folders with DCP {DCP_METADATA}, an X "
            "export with amuse_export.json, or a run folder holding checkpoint/)"
            + (f"; {'; '.join(damaged.values())}" if damaged else "")
        )
    targets = [_pick(folder / f"step-{s}", source) for s in steps]
    targets += [_pick(folder / f"step-{s}", "export") for s in export_only]
    return sorted(targets, key=lambda t: t.step)


def _pick(step_dir: Path, source: str) -> Target:
    step = step_of(step_dir)
    assert step is not None
    has_state = (step_dir / DCP_METADATA).is_file()
    if source == "dcp" or (source == "auto" and has_state):
        if not has_state:
            raise TargetError(
                f"{step_dir}: its DCP state was purged by retention (keep_latest_k; the exports "
                "are kept): evaluate its export with --source export"
                if purged(step_dir)
                else f"{step_dir} is not a complete checkpoint (no DCP {DCP_METADATA}): an "
                "interrupted or damaged save; evaluate another step"
            )
        return Target(step, "dcp", step_dir)
    target = Target(step, "dcp", step_dir)
    return Target(step, "export", target.export_folder())


# ------------------------------------------------------------------------------------ checks
def check_trusted(targets: list[Target], trust: bool) -> None:
    """DCP targets must carry this user's signed manifest: loading unpickles their files."""
    for t in targets:
        if t.kind != "dcp":
            continue
        why = integrity.trust_problem(t.path)
        if why and not trust:
            raise TargetError(
                integrity.untrusted_message(t.path, why, "--trust")
                + " (and --config with its training TOML if it has no amuse_meta.json)"
            )


def check_weights(targets: list[Target], weights: str) -> None:
    """Refuse ``--weights y`` for an export that holds X (it would silently evaluate X)."""
    for t in targets:
        if t.kind == "export" and weights == "y":
            held = ExportInfo.read(t.path).weights
            if held != "y":
                raise TargetError(
                    f"--weights y: {t.path} holds {held.upper()}, not Y; evaluate Y from the DCP "
                    f"state instead: amuse-eval {t.path.parent} --source dcp --weights y"
                )


def check_files(targets: list[Target]) -> None:
    """Truncated DCP shards and safetensors files, and export files that differ from the
    manifest of their step (a changed byte), named before any model is built. The DCP files'
    digests are checked at load, split among the ranks."""
    for t in targets:
        if t.kind == "dcp":
            check_shard_sizes(t.path)
            continue
        check_export_files(t.path)
        data = integrity.read_manifest(t.step_dir)
        if data is not None:
            under = t.path.name + "/"
            problem = integrity.verify_files(t.step_dir, data["files"], under=under)
            if problem:
                raise TargetError(problem)


# ------------------------------------------------------------------------------------ results
def default_out(path: Path) -> Path:
    """Where results go without ``--out``: beside what was evaluated, never inside a step
    folder (retention deletes those) or an export folder (it stays as written)."""
    path = Path(path)
    if is_complete_export(path):
        parent = path.parent
        if step_of(parent) is not None:
            return parent.parent / f"amuse_eval_{parent.name}_{path.name}"
        return parent / f"amuse_eval_{path.name}"
    if step_of(path) is not None:
        return path.parent / f"amuse_eval_{path.name}"
    return path / "amuse_eval"


def result_paths(out: Path, tag: str = "") -> tuple[Path, Path]:
    """OUT.csv and OUT.json: suffixes are appended (``results.step6`` -> ``results.step6.csv``),
    a given ``.csv``/``.json`` suffix is replaced."""
    out = Path(out)
    if out.suffix in (".csv", ".json"):
        out = out.with_suffix("")
    base = out.name + tag
    return out.with_name(base + ".csv"), out.with_name(base + ".json")


def _ours(path: Path) -> bool:
    """A results file amuse-eval wrote (its CSV header or JSON rows), safe to replace."""
    try:
        if path.suffix == ".csv":
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            return bool(header) and header[0] == "step"
        rows = json.loads(path.read_text())
        return isinstance(rows, list) and all(isinstance(r, dict) and "step" in r for r in rows)
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def check_out(paths: tuple[Path, ...], given: bool) -> None:
    """Before evaluating: the results can be written, and replace only amuse-eval's own."""
    for p in paths:
        if p.is_symlink() or (p.exists() and (not p.is_file() or not _ours(p))):
            raise TargetError(
                f"{p} exists and amuse-eval did not write it: refusing to overwrite it; choose "
                "another --out"
            )
        probe = p.parent
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not os.access(probe, os.W_OK | os.X_OK):
            raise TargetError(
                f"{probe} is not writable, so the results cannot be written to {p}; "
                + ("choose a writable --out" if given else "pass --out DIR/results")
            )


def write_rows(
    rows: list[dict[str, Any]], paths: tuple[Path, Path], fields: tuple[str, ...]
) -> None:
    csv_path, json_path = paths
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=2) + "\n")
