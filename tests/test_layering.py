"""The package's layering, checked on the source (every import, also those inside functions).

The developers' guide in one table: optim is pure math (it may use distributed's plumbing),
distributed imports nothing from optim, data imports no torch, anytime (the run folder) no
torchtitan and no torch at import, titan is the torchtitan glue, and the CLIs are thin: nothing
imports them. No module imports itself back through others (no import circles), and the two
import-free facts are checked in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests._titan import REPO

pytestmark = pytest.mark.unit

PACKAGE = REPO / "amuse_dist"
CLIS = ("train", "eval", "plot", "prepare_data", "tokenizer")
# the CLIs whose functions nothing but their own tests may call (plot also serves read_scalars)
ENTRY_POINTS = {"amuse_dist.train", "amuse_dist.eval"}

# part of amuse_dist -> what of amuse_dist it may import (a part, or one module of a part).
# A part is a subpackage (amuse_dist/<part>/) or a CLI module (amuse_dist/<cli>.py).
ALLOWED: dict[str, frozenset[str]] = {
    "data": frozenset(),
    "distributed": frozenset(),
    "optim": frozenset({"distributed"}),
    # the resume contract reads the optimizers' hyper-parameter metadata (stdlib only)
    "anytime": frozenset({"data", "optim.hparams"}),
    "titan": frozenset({"anytime", "data", "distributed", "optim"}),
    **{cli: frozenset({"anytime", "data", "optim", "titan"}) for cli in CLIS},
}
# part -> third-party top-level packages it must never import, not even inside a function
FORBIDDEN: dict[str, frozenset[str]] = {
    "data": frozenset({"torch", "torchtitan"}),
    "anytime": frozenset({"torchtitan"}),
    "distributed": frozenset({"torchtitan"}),
    "optim": frozenset({"torchtitan"}),
}
# the packages whose every module imports without torch (subprocess check below)
TORCH_FREE = ("amuse_dist.data", "amuse_dist.anytime")


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, names: bool = False) -> set[str]:
    """Every module name ``path`` imports, at any depth (absolute; relative imports resolved;
    ``from package import module`` names the module; ``names``: ``from m import f`` gives
    ``m.f``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if names or sub in MODULES else base)
    return out


def _part(module: str) -> str | None:
    """``amuse_dist.titan.spec`` -> "titan"; None for the root package and outside modules."""
    parts = module.split(".")
    return parts[1] if parts[0] == "amuse_dist" and len(parts) > 1 else None


def _allowed(part: str, target: str) -> bool:
    rest = target.removeprefix("amuse_dist.")
    return any(rest == a or rest.startswith(a + ".") for a in ALLOWED[part] | {part})


def test_every_part_is_in_the_table() -> None:
    parts = {_part(m) for m in MODULES} - {None}
    assert parts == set(ALLOWED), (
        f"add {parts - set(ALLOWED)} to ALLOWED, drop {set(ALLOWED) - parts}"
    )


def test_import_directions_follow_the_table() -> None:
    offenders: dict[str, list[str]] = {}
    for module, path in MODULES.items():
        part = _part(module)
        if part is None:
            continue
        ours = {m for m in _imports(path) if m.startswith("amuse_dist.")}
        bad = sorted(m for m in ours if not _allowed(part, m))
        bad += sorted(
            m for m in _imports(path) if m.split(".")[0] in FORBIDDEN.get(part, frozenset())
        )
        if bad:
            offenders[module] = bad
    assert not offenders, f"imports against the layering table: {offenders}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles() -> None:
    """Module-level and function-level imports alike: a circle closed inside a function is
    still two modules that cannot be understood (or moved) one without the other."""
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in MODULES.items():
        graph[module] = {m for m in _imports(path) if m in MODULES and m != module}
    assert not _cycles(graph), _cycles(graph)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_distributed_imports_nothing_from_optim() -> None:
    bad = {
        m: sorted(i for i in _imports(p) if i.startswith("amuse_dist.optim"))
        for m, p in MODULES.items()
        if _part(m) == "distributed"
    }
    assert not {k: v for k, v in bad.items() if v}, bad


def test_data_and_anytime_import_without_torch() -> None:
    """The guide's two import-free facts, in a fresh interpreter: the packages, and then every
    module in them."""
    code = "import amuse_dist.data, amuse_dist.anytime, sys; assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = sorted(m for m in MODULES if m.startswith(TORCH_FREE))
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "    bad = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'torchtitan'))\n"
        "    assert not bad, f'{m} imports {bad[:3]}'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_nothing_imports_the_cli_modules() -> None:
    """train.py and eval.py are entry points: shared code lives in amuse_dist.titan (``run.train``,
    ``launch``) and amuse_dist.anytime, so the package, the benchmarks and the tests import those
    instead and call a CLI only as a process (``python -m amuse_dist.train``)."""
    roots = (PACKAGE, REPO / "tests", REPO / "benchmarks")
    offenders = {}
    for p in sorted(p for root in roots for p in root.rglob("*.py")):
        module = ".".join(p.relative_to(REPO).with_suffix("").parts)
        if module in ENTRY_POINTS:
            continue
        name = str(p.relative_to(REPO))
        hits = {
            m
            for m in _imports(p, names=True)
            if m in ENTRY_POINTS or m.rsplit(".", 1)[0] in ENTRY_POINTS
        }
        if hits:
            offenders[name] = sorted(hits)
    assert not offenders, offenders
