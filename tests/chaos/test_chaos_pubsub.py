"""Pub/Sub redelivery of a finished job, on Google's emulator (chaos_full)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import harness
import pytest

pytestmark = [pytest.mark.timeout(1200), pytest.mark.chaos_full]


@pytest.fixture(scope="module")
def booth(chaos_parent: Path, pubsub_emulator) -> Iterator[harness.ChaosBooth]:
    b = harness.ChaosBooth(chaos_parent, harness.topology("pubsub", pubsub_emulator.host))
    try:
        yield b.start()
    finally:
        b.stop()


def test_a_redelivered_finished_job_runs_once_and_sends_one_email(booth):
    v = harness.scenarios()["pubsub_redelivery"].run(booth)
    assert v.passed, v.explain() + f"\n{v.as_dict()}"
    assert v.details["attempts_after"] == v.details["attempts_before"]
