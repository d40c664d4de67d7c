"""Fixtures of the chaos suite: one parent directory (so one cached base checkpoint) per run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FULL_ENV = "CHAOS_FULL"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The long scenarios run in bench/chaos.py, or here with CHAOS_FULL=1.
    if os.environ.get(FULL_ENV) == "1":
        return
    skip = pytest.mark.skip(
        reason=f"a long chaos scenario: set {FULL_ENV}=1 (or run bench/chaos.py)"
    )
    for item in items:
        if "chaos_full" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def chaos_parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every chaos booth's workdir lives here, so ``DemoBooth.base_checkpoint`` is built once."""
    return tmp_path_factory.mktemp("chaos")
