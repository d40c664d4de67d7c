"""A full spool disk on the agent: the take completes from its MP4 segments (chaos_full).

Each agent's spool is a small tmpfs (mounting one needs root); the scenario
fills it mid-take while the link is down.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import harness
import pytest

pytestmark = [pytest.mark.timeout(1200), pytest.mark.chaos_full]


@pytest.fixture(scope="module")
def booth(chaos_parent: Path) -> Iterator[harness.ChaosBooth]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the spool needs root")
    b = harness.ChaosBooth(chaos_parent, harness.topology("tmpfs"))
    try:
        yield b.start()
    finally:
        b.stop()


def test_a_full_spool_disk_completes_the_take_from_the_recording(booth):
    v = harness.scenarios()["full_spool_disk"].run(booth)
    assert v.passed, v.explain() + f"\n{v.as_dict()}"
    assert v.details["saw_upload_behind"]
