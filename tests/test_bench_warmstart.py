"""bench/warmstart.py's cached base: any change to how a base is made picks a new cache entry."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

from cloud_trainer.config import TrainerConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_warmstart", ROOT / "bench" / "warmstart.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def key(bench, attendees: int = 12, **trainer) -> str:
    args = argparse.Namespace(attendees=attendees, pretrain_steps=4000)
    cfg = TrainerConfig(size_px=64, batch=4, max_steps=4000, **trainer)
    return bench.base_key(args, cfg)[0]


def test_the_same_settings_and_code_give_the_same_key(bench) -> None:
    assert key(bench) == key(bench)
    assert key(bench).startswith("base-64-skeleton-a1-12-4000-b4-")


def test_any_pretraining_setting_changes_the_key(bench) -> None:
    keys = {
        key(bench),
        key(bench, attendees=13),
        key(bench, learning_rate=1e-3),
        key(bench, l1_weight=50),
        key(bench, holdout_fraction=0.2),
    }
    assert len(keys) == 5


def test_a_change_to_the_code_that_makes_a_base_changes_the_key(
    bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every file the bench hashes exists (a renamed module must not silently drop out).
    for rel in bench.PRETRAIN_SOURCES:
        assert (ROOT / rel).exists(), rel
    fake = tmp_path / "cloud_trainer" / "model.py"
    fake.parent.mkdir()
    fake.write_text("FILTERS = 32\n")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    monkeypatch.setattr(bench, "PRETRAIN_SOURCES", ("cloud_trainer/model.py",))
    before = key(bench)
    fake.write_text("FILTERS = 48\n")
    assert key(bench) != before
