"""Every benchmark and every section of it runs on tiny shapes, so the benchmarks cannot rot.

A benchmark is a script in benchmarks/ with a ``__main__`` block; it declares ``SMOKE``
({section: argv}, "main" for a one-section script) and, when it has sections, ``SECTIONS``. The
cases are read from the sources at collection (no imports), so a new benchmark or section is picked
up without editing this file, and a benchmark without ``SMOKE`` fails here. Each case calls the
script's ``main(argv)`` in this process (only sections that are about torchrun launch one); the
figures are not checked, only that the run completes (a benchmark's own exact checks, such as the
exchange's byte count, still fail it).
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
# marker per (benchmark, section); the rest are in-process unit runs
KIND = {
    ("optimizer_step", "dist"): "dist",
    ("convergence", "main"): "e2e",
    ("gpu_check", "main"): "e2e",
}


def _literal(tree: ast.Module, name: str) -> Any:
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return ast.literal_eval(node.value)
    return None


def _is_script(tree: ast.Module) -> bool:
    return any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)


def benchmarks() -> dict[str, tuple[dict[str, list[str]] | None, tuple[str, ...] | None]]:
    """{script: (SMOKE, SECTIONS)} for every benchmark script."""
    out = {}
    for path in sorted(BENCH.glob("*.py")):
        tree = ast.parse(path.read_text())
        if _is_script(tree):
            out[path.stem] = (_literal(tree, "SMOKE"), _literal(tree, "SECTIONS"))
    return out


def cases() -> list[Any]:
    out = []
    for name, (smoke, _) in benchmarks().items():
        for section in smoke or {"<no SMOKE>": None}:
            mark = getattr(pytest.mark, KIND.get((name, section), "unit"))
            out.append(pytest.param(name, section, marks=mark, id=f"{name}-{section}"))
    return out


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(benchmarks()))
def test_smoke_covers_every_section(name: str) -> None:
    smoke, sections = benchmarks()[name]
    assert smoke, f"benchmarks/{name}.py declares no SMOKE = {{section: argv}}"
    assert set(smoke) == set(sections or ("main",)), (
        f"benchmarks/{name}.py: SMOKE covers {sorted(smoke)}, sections are {sections}"
    )


@pytest.mark.parametrize(("name", "section"), cases())
def test_benchmark_smoke(
    name: str, section: str, tmp_path: Path, assets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    smoke, _ = benchmarks()[name]
    assert smoke, f"benchmarks/{name}.py declares no SMOKE"
    argv = [a.format(tmp=tmp_path, assets=assets) for a in smoke[section]]
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import their siblings by bare name
    monkeypatch.setattr(sys, "argv", [str(BENCH / f"{name}.py"), *argv])
    module = importlib.import_module(f"benchmarks.{name}")
    try:
        rc = module.main(argv)
    except SystemExit as e:  # argparse or a failed check
        rc = e.code
    assert rc in (None, 0), f"benchmarks/{name}.py {' '.join(argv)} exited {rc}"
