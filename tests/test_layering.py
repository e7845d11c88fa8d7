"""The package's layering, checked on the source: distributed/ never reaches up into optim/, and
nothing imports the CLI modules (train, eval) except their own console entry points."""

from __future__ import annotations

import ast
from pathlib import Path

from tests._titan import REPO

PACKAGE = REPO / "amuse_dist"
ENTRY_POINTS = {"amuse_dist.train", "amuse_dist.eval"}


def _imports(path: Path) -> set[str]:
    """Every module name ``path`` imports (absolute; relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _sources(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*.py"))


def test_distributed_imports_nothing_from_optim() -> None:
    bad = {
        str(p.relative_to(REPO)): sorted(m for m in _imports(p) if m.startswith("amuse_dist.optim"))
        for p in _sources(PACKAGE / "distributed")
    }
    assert not {k: v for k, v in bad.items() if v}, bad


def test_nothing_imports_the_cli_modules() -> None:
    """train.py and eval.py are entry points: shared code lives in amuse_dist.titan.launch and
    friends, so the package, the benchmarks and the test helpers and workers import those instead.
    (The tests of a CLI, tests/test_*.py, may call its functions.)"""
    roots = (PACKAGE, REPO / "tests", REPO / "benchmarks")
    offenders = {}
    for p in _sources(*roots):
        module = ".".join(p.relative_to(REPO).with_suffix("").parts)
        if module in ENTRY_POINTS or (p.parent.name == "tests" and p.name.startswith("test_")):
            continue
        hits = {m for m in _imports(p) if m in ENTRY_POINTS or m.rsplit(".", 1)[0] in ENTRY_POINTS}
        # a test worker may call an entry point's main() to run it as the console script does
        hits = {m for m in hits if not m.endswith(".main")}
        if hits:
            offenders[str(p.relative_to(REPO))] = sorted(hits)
    assert not offenders, offenders
