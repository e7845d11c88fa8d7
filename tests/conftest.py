"""Shared end-to-end runs: one offline corpus/tokenizer build and one straight AMUSE run of the
real trainer (2 CPU ranks) serve every test that only reads their results."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from amuse_dist.titan import launch

launch.setup_device()  # as every entry point does, before any test imports torchtitan

from tests._titan import run_args, torchrun  # noqa: E402

TIERS = ("unit", "dist", "e2e")
"""Every test has exactly one (pyproject.toml lists them): ``pytestmark`` for a module of one
tier, a decorator per test in a mixed module."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test without a tier or with two: ``make test-fast`` (``-m unit``) must not pick up
    a process launch by accident, nor miss a test."""
    bad = []
    for item in items:
        tiers = {m.name for m in item.iter_markers() if m.name in TIERS}
        if len(tiers) != 1:
            bad.append(f"{item.nodeid}: {sorted(tiers) or 'no tier'}")
    if bad:
        raise pytest.UsageError(
            "each test needs exactly one of the markers "
            + ", ".join(TIERS)
            + ":\n  "
            + "\n  ".join(bad)
        )


@pytest.fixture(scope="session", autouse=True)
def _offline_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test may reach a hub: offline flags and a private, empty HF cache."""
    hf_home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HOME", str(hf_home))
        mp.setenv("HF_DATASETS_CACHE", str(hf_home / "datasets"))
        # the checkpoint signing key of this test session (never the user's own)
        mp.setenv("AMUSE_DIST_KEY_FILE", str(hf_home / "amuse_checkpoint.key"))
        yield


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("assets")


@pytest.fixture(scope="session")
def straight(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Path:
    """20 AMUSE steps on 2 ranks: checkpoints (with X) at 10 and 20, validation every 5."""
    dump = tmp_path_factory.mktemp("straight")
    torchrun(2, run_args(dump, assets), dump)
    return dump


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How the session's Python launches ran: preloaded, or fresh and why (tests/_preload.py)."""
    from tests import _preload

    if _preload.STATS:
        counts = ", ".join(f"{n} {how}" for how, n in sorted(_preload.STATS.items()))
        terminalreporter.write_line(f"python launches: {counts}")
