"""Training jobs: resume after a kill, the wall-clock budget, warm start, NaN rollback, export.

Everything runs at 32 px on a 3-second synthetic take, a handful of steps per job.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from cloud_trainer.cli import main as booth
from cloud_trainer.config import TrainerConfig
from cloud_trainer.corpus import Corpus, TakeData, TrainingFailed, build_corpus
from cloud_trainer.model import ModelSpec
from cloud_trainer.storage.local import LocalBlobStore
from cloud_trainer.train import (
    Budget,
    JobSpec,
    Pix2Pix,
    Runtime,
    TrainHooks,
    _inner,
    read_export,
    require_label_map,
    resolve_base,
    restore_base,
    select_runtime,
    train_job,
)
from edge_agent import skeleton as sk

SIZE = 32


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs (no final checkpoint, no export)."""


class KillAt(TrainHooks):
    def __init__(self, step: int) -> None:
        self.at = step

    def after_step(self, step: int, model: Pix2Pix) -> None:
        if step == self.at:
            raise Killed()


class PoisonAt(TrainHooks):
    """Turns the generator's weights to NaN once at each of ``steps``, or at every step
    from ``every_after`` on (a run that keeps diverging)."""

    def __init__(self, *steps: int, every_after: int | None = None) -> None:
        self.steps, self.every_after, self.poisoned = set(steps), every_after, []

    def after_step(self, step: int, model: Pix2Pix) -> None:
        once = step in self.steps and step not in self.poisoned
        if once or (self.every_after is not None and step >= self.every_after):
            v = model.generator.trainable_variables[0]
            v.assign(tf.fill(v.shape, float("nan")))
            self.poisoned.append(step)


@pytest.fixture(scope="module")
def take() -> TakeData:
    return TakeData.from_synth(3, 7, seconds=3, fps=8, size=(64, 48))


def config(work: Path, **kw) -> TrainerConfig:
    base = {
        "size_px": SIZE,
        "batch": 2,
        "budget_s": 600,
        "max_steps": 6,
        "checkpoint_every_steps": 2,
        "work_dir": work,
    }
    return TrainerConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def resumed(take: TakeData, tmp_path_factory):
    """A job killed at step 5 on one machine and finished on another through the blob store,
    where its weights turn NaN once at step 5 (one job run covers both stories: jobs are
    the slowest thing these tests do)."""
    root = tmp_path_factory.mktemp("resume")
    store = LocalBlobStore(root / "blobs")
    job = JobSpec("sess-1", [take])
    with pytest.raises(Killed):
        train_job(job, config(root / "machine-a"), store, hooks=KillAt(5), models_dir=None)
    seen = []
    poison = PoisonAt(5)
    result = train_job(
        job, config(root / "machine-b"), store, seen.append, hooks=poison, models_dir=None
    )
    assert poison.poisoned == [5]
    return result, store, seen


def test_killed_job_resumes_from_its_last_checkpoint_not_from_step_0(resumed) -> None:
    result, _, seen = resumed
    assert result.resumed_from == 4  # checkpoints every 2 steps; killed at 5
    assert result.steps == 6 and result.stopped == "max_steps"
    training = [p.step for p in seen if p.stage == "training"]
    assert training and min(training) >= 4
    assert [e["step"] for e in result.evals][-1] == 6


def test_checkpoints_and_export_are_mirrored_to_the_blob_store(resumed) -> None:
    _, store, _ = resumed
    keys = set(store.list("sessions/sess-1/"))
    assert "sessions/sess-1/checkpoints/ckpt/checkpoint" in keys
    assert "sessions/sess-1/checkpoints/state.json" in keys
    assert {
        "sessions/sess-1/model/generator.json",
        "sessions/sess-1/model/generator.tflite",
    } <= keys
    assert "sessions/sess-1/model/saved_model/saved_model.pb" in keys
    assert "sessions/sess-1/corpus/corpus.json" in keys
    # Old checkpoints are pruned in the store as on disk.
    assert len([k for k in keys if k.endswith(".index") and "/ckpt/" in k]) <= 2


def test_export_serves_the_same_images_from_savedmodel_and_tflite(resumed) -> None:
    from ai_edge_litert.interpreter import Interpreter

    result, _, _ = resumed
    meta = read_export(result.export_dir)
    assert meta["label_map"] == "skeleton" and meta["size_px"] == SIZE
    assert meta["framing"][0]["side"] > 0 and meta["step"] == result.best_step
    labels = np.random.default_rng(0).integers(0, 255, (1, SIZE, SIZE, 3), dtype=np.uint8)
    served = tf.saved_model.load(str(result.export_dir / "saved_model"))
    ref = served.signatures["serving_default"](label=tf.constant(labels))["image"].numpy()
    interp = Interpreter(model_path=str(result.export_dir / "generator.tflite"))
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], labels)
    interp.invoke()
    out = interp.get_tensor(interp.get_output_details()[0]["index"])
    assert out.dtype == np.uint8 and out.shape == ref.shape
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 2


def test_renderer_check_refuses_a_generator_of_another_label_map(resumed) -> None:
    meta = read_export(resumed[0].export_dir)
    require_label_map(meta, "skeleton")
    with pytest.raises(TrainingFailed, match="trained on skeleton label maps but parts"):
        require_label_map(meta, "parts")


def test_job_stores_a_score_and_a_progress_plot(resumed) -> None:
    result = resumed[0]
    for key in ("ssim", "psnr", "nn_ssim", "nn_psnr", "frames", "beats_nn"):
        assert key in result.score
    assert 0 <= result.score["ssim"] <= 1
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        json.loads((result.export_dir / "score.json").read_text())["ssim"] == result.score["ssim"]
    )


def test_finished_job_delivered_again_returns_its_result_without_training(
    resumed, tmp_path: Path
) -> None:
    result, store, _ = resumed
    again = train_job(JobSpec("sess-1", []), config(result.export_dir.parent.parent), store)
    assert again.stopped == "done-before" and again.steps == result.steps
    # On a third machine, from the store alone.
    elsewhere = train_job(JobSpec("sess-1", []), config(tmp_path), store)
    assert elsewhere.stopped == "done-before" and elsewhere.score == result.score
    assert read_export(elsewhere.export_dir)["label_map"] == "skeleton"


# A base in seconds: tiny images, short synthetic takes, a small batch.
SMALL_PRETRAIN = (
    "--size",
    str(SIZE),
    "--seconds",
    "3",
    "--fps",
    "8",
    "--batch",
    "2",
    "--no-progress",
)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    top = tmp_path_factory.mktemp("base")
    out = top / "base"
    # Published to the blob store a booth config names, as a deployment would; the
    # config also names that base as the workers' (deploy/config/booth.cloud.yaml does),
    # which pretrain, building it, must not try to start from.
    (top / "booth.yaml").write_text(
        f"storage:\n  type: local\n  root: {top / 'blobs'}\n"
        "trainer:\n  base_checkpoint: blob:base/booth-1\n"
    )
    code = booth(
        [
            "pretrain",
            *("--config", str(top / "booth.yaml"), "--publish", "blob:base/booth-1"),
            *("--out", str(out), "--attendees", "1..2", "--steps", "2"),
            *SMALL_PRETRAIN,
        ]
    )
    assert code == 0
    return out


def test_booth_pretrain_writes_a_base_checkpoint(base: Path) -> None:
    meta = json.loads((base / "base.json").read_text())
    assert meta["label_map"] == "skeleton" and meta["takes"] == 2 and meta["steps"] == 2
    assert meta["continued_from"] is None  # from scratch, whatever the config's base says
    assert ModelSpec.from_dict(meta["spec"]) == ModelSpec.for_size(SIZE)
    assert tf.train.latest_checkpoint(str(base)) is not None
    assert (base / "export" / "generator.tflite").exists() or Path(meta["export"]).exists()


def test_a_rerun_into_a_base_resumes_only_its_own_recipe(base: Path, tmp_path, capsys) -> None:
    """Another label map, size or attendee list would resume on the first run's corpus
    and checkpoints and label the result with the new settings: refused, saying why."""
    before = (base / "base.json").read_text()
    common = ["pretrain", "--out", str(base), "--seconds", "3", "--fps", "8", "--batch", "2"]
    common += ["--size", str(SIZE), "--no-progress"]
    for extra, says in (
        (["--attendees", "1..2", "--steps", "2", "--label-map", "parts"], "label_map"),
        (["--attendees", "1..3", "--steps", "2"], "'attendees': [1, 2]"),
        (["--attendees", "1..2", "--steps", "6"], "already finished after 2 steps"),
    ):
        assert booth([*common, *extra]) != 0
        err = capsys.readouterr().err
        assert says in err and "new --out" in err and "Traceback" not in err
    assert (base / "base.json").read_text() == before  # untouched
    (tmp_path / "afile").write_text("x")
    assert booth(["pretrain", "--out", str(tmp_path / "afile"), "--steps", "1"]) != 0
    assert "is a file" in capsys.readouterr().err


def test_a_published_base_is_what_a_worker_resolves_from_the_blob_store(
    base: Path, tmp_path: Path
) -> None:
    store = LocalBlobStore(base.parent / "blobs")
    keys = list(store.list("base/booth-1/"))
    assert "base/booth-1/base.json" in keys
    assert not [k for k in keys if k.startswith("base/booth-1/work/")]  # not the job's files
    local = resolve_base("blob:base/booth-1", store, tmp_path)
    assert json.loads((local / "base.json").read_text()) == json.loads(
        (base / "base.json").read_text()
    )
    assert tf.train.latest_checkpoint(str(local)) is not None


def test_pretrain_from_a_published_base_continues_it(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "next"
    code = booth(
        [
            "pretrain",
            *("--config", str(base.parent / "booth.yaml"), "--from", "blob:base/booth-1"),
            *("--out", str(out), "--attendees", "3", "--steps", "3"),
            *SMALL_PRETRAIN,
        ]
    )
    assert code == 0
    meta = json.loads((out / "base.json").read_text())
    assert meta["continued_from"] == "blob:base/booth-1" and meta["takes"] == 1
    assert booth(["pretrain", "--out", str(tmp_path / "x"), "--from", str(tmp_path / "no")]) == 2


def _fresh_model(lr: float = 1e-4) -> Pix2Pix:
    return Pix2Pix(
        ModelSpec.for_size(SIZE),
        learning_rate=lr,
        l1_weight=100,
        global_batch=2,
        runtime=select_runtime(config(Path("/nonexistent"))),
    )


def test_warm_start_loads_the_base_generator_and_its_adam_moments_not_the_discriminator(
    base: Path,
) -> None:
    model = _fresh_model(lr=1e-4)
    restore_base(model, base, label_map="skeleton")
    prefix = tf.train.latest_checkpoint(str(base))
    names = [n for n, _ in tf.train.list_variables(prefix)]
    # The pretraining's best generator (its own checkpoint, read by variable name).
    best = tf.train.latest_checkpoint(str(base / "work" / "pretrain" / "checkpoints" / "best"))
    kernels = [n for n, _ in tf.train.list_variables(best) if "kernel" in n]
    assert kernels
    reader = tf.train.load_checkpoint(best)
    weights = model.generator.trainable_variables
    for name in kernels:
        assert any(np.array_equal(v.numpy(), reader.get_tensor(name)) for v in weights), name
    # The moments of the base's 2 steps, at the job's learning rate, not the base's.
    adam = model.g_opt
    assert int(adam.iterations.numpy()) == 2
    assert float(adam.learning_rate.numpy()) == pytest.approx(1e-4)
    slots = [v for v in adam.variables if v.shape.rank and v.shape.rank > 0]
    assert any(np.abs(v.numpy()).max() > 0 for v in slots)
    # A fine-tune starts its discriminator fresh: the base does not even hold one.
    assert not any(n.startswith(("discriminator/", "d_opt/")) for n in names)
    assert int(model.d_opt.iterations.numpy()) == 0


def test_warm_start_from_a_base_without_moments_restores_the_generator_alone(
    base: Path, tmp_path: Path
) -> None:
    donor = _fresh_model()
    restore_base(donor, base, label_map="skeleton")
    tf.train.Checkpoint(generator=donor.generator).save(str(tmp_path / "old" / "base"))
    model = _fresh_model()
    restore_base(model, tmp_path / "old", label_map="skeleton")
    for a, b in zip(model.generator.weights, donor.generator.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(model.g_opt.iterations.numpy()) == 0


def test_budget_is_honoured_within_a_few_seconds_by_a_warm_started_job(
    take: TakeData, base: Path, tmp_path: Path
) -> None:
    # 30 s: about twice what one step, scoring and export take here when other jobs
    # share the two cores, so the job trains rather than failing as too short.
    cfg = config(
        tmp_path, max_steps=None, budget_s=30, checkpoint_every_steps=50, checkpoint_every_s=4
    )
    t0 = time.monotonic()
    result = train_job(JobSpec("sess-b", [take], base_checkpoint=str(base)), cfg, models_dir=None)
    took = time.monotonic() - t0
    assert result.stopped == "budget" and result.warm_start
    assert result.steps > 0
    assert took <= cfg.budget_s + 5, f"{took:.1f} s for a {cfg.budget_s} s budget: {result.timings}"
    assert result.elapsed_s <= cfg.budget_s + 5


def test_tiny_budget_still_trains_and_ends_within_a_few_seconds_of_it(
    take: TakeData, tmp_path: Path
) -> None:
    # 15 s pays for scoring and export with room to spare, but not for the pessimistic
    # guess of a first step on a loaded machine: the job must train, not export step 0.
    cfg = config(tmp_path, max_steps=None, budget_s=15, checkpoint_every_steps=50)
    t0 = time.monotonic()
    result = train_job(JobSpec("sess-tiny", [take]), cfg, models_dir=None)
    took = time.monotonic() - t0
    assert result.steps >= 1 and result.stopped == "budget"
    assert took <= cfg.budget_s + 5, f"{took:.1f} s for a {cfg.budget_s} s budget: {result.timings}"


def test_budget_too_short_for_one_step_fails_the_job_with_the_reason_within_a_few_seconds(
    take: TakeData, base: Path, tmp_path: Path
) -> None:
    # 2 s cannot pay for one step plus scoring and export (a few seconds at least), so the
    # job must neither train zero steps and export the base as the attendee's model, nor
    # overrun its budget trying.
    cfg = config(tmp_path, max_steps=None, budget_s=2)
    t0 = time.monotonic()
    with pytest.raises(TrainingFailed) as failed:
        train_job(JobSpec("sess-t", [take], base_checkpoint=str(base)), cfg, models_dir=None)
    took = time.monotonic() - t0
    assert took <= cfg.budget_s + 5, f"{took:.1f} s to fail a {cfg.budget_s} s budget"
    reason = failed.value.reason
    assert "budget of 2 s is too short to train at all" in reason
    least = int(re.search(r"one training step needs a budget of about (\d+) s", reason).group(1))
    assert least > cfg.budget_s
    assert not (tmp_path / "sess-t" / "export").exists()


def test_nan_loss_rolls_back_once_to_the_last_checkpoint_at_half_the_learning_rate(
    resumed,
) -> None:
    result = resumed[0]
    assert result.nan_rollbacks == 1 and result.learning_rate == pytest.approx(1e-4)
    assert result.steps == 6 and np.isfinite(result.score["ssim"])
    # Rolled back to the step-4 checkpoint, not to the start: steps 2 and 4 ran once.
    assert [e["step"] for e in result.evals] == [0, 2, 4, 6]


def test_nan_losses_after_a_rollback_fail_the_job_with_a_readable_reason(
    take: TakeData, tmp_path: Path
) -> None:
    with pytest.raises(TrainingFailed, match=r"diverged \(NaN loss\).*again after rolling back"):
        train_job(
            JobSpec("sess-f", [take]),
            config(tmp_path, max_steps=8),
            hooks=PoisonAt(every_after=1),
            models_dir=None,
        )


def test_missing_base_checkpoint_fails_the_job(take: TakeData, tmp_path: Path) -> None:
    job = JobSpec("sess-m", [take], base_checkpoint=str(tmp_path / "no-such-base"))
    with pytest.raises(TrainingFailed, match="base checkpoint .*no-such-base not found"):
        train_job(job, config(tmp_path), models_dir=None)
    store = LocalBlobStore(tmp_path / "blobs")
    job = JobSpec("sess-m2", [take], base_checkpoint="blob:base/missing")
    with pytest.raises(TrainingFailed, match="blob:base/missing not found in the blob store"):
        train_job(job, config(tmp_path), store, models_dir=None)


def test_base_of_another_label_map_fails_the_job(
    take: TakeData, base: Path, tmp_path: Path
) -> None:
    job = JobSpec("sess-p", [take], base_checkpoint=str(base))
    with pytest.raises(TrainingFailed, match="trained on skeleton label maps, this job uses parts"):
        train_job(job, config(tmp_path, label_map="parts"), models_dir=None)


def test_a_corrupt_corpus_left_on_disk_is_built_again_from_the_takes(
    take: TakeData, tmp_path: Path, caplog
) -> None:
    """A shard cut short (a worker killed while writing or fetching it) used to fail the
    session, though the takes were there to build the corpus again."""
    c = build_corpus(
        [take],
        tmp_path / "sess-c" / "corpus",
        size_px=SIZE,
        label_map="skeleton",
        holdout_fraction=0.1,
    )
    shard = Path(c.files("train")[0])
    shard.write_bytes(shard.read_bytes()[:100] + b"\x00" * 200 + shard.read_bytes()[300:])
    with pytest.raises(TrainingFailed, match="corrupt"):
        Corpus.open(c.root).verify()
    with caplog.at_level("WARNING", logger="cloud_trainer.train"):
        result = train_job(JobSpec("sess-c", [take]), config(tmp_path), models_dir=None)
    assert result.steps > 0
    assert "corpus on disk unusable" in caplog.text
    Corpus.open(c.root).verify()  # whole again


def test_empty_take_and_no_person_fail_the_job(take: TakeData, tmp_path: Path) -> None:
    empty = TakeData("empty", [], np.zeros((0, sk.NUM_JOINTS, 3), np.float32))
    with pytest.raises(TrainingFailed, match="empty"):
        train_job(JobSpec("sess-e", [empty]), config(tmp_path), models_dir=None)
    nobody = TakeData("nobody", take.frames, np.zeros_like(take.poses))
    with pytest.raises(TrainingFailed, match="no person detected"):
        train_job(JobSpec("sess-e2", [nobody]), config(tmp_path), models_dir=None)


def test_a_stale_local_checkpoint_gives_way_to_the_newer_one_in_the_store(
    take: TakeData, tmp_path: Path
) -> None:
    """Machine A dies at step 3 (checkpoint 2), B takes over and dies at 7 (checkpoint 6),
    then A gets the job back with its old work directory still on disk."""
    store = LocalBlobStore(tmp_path / "blobs")
    job = JobSpec("sess-s", [take])
    a, b = tmp_path / "machine-a", tmp_path / "machine-b"
    with pytest.raises(Killed):
        train_job(job, config(a, max_steps=10), store, hooks=KillAt(3), models_dir=None)
    with pytest.raises(Killed):
        train_job(job, config(b, max_steps=10), store, hooks=KillAt(7), models_dir=None)
    assert json.loads(store.get("sessions/sess-s/checkpoints/state.json"))["step"] == 6

    result = train_job(job, config(a, max_steps=8), store, models_dir=None)
    assert result.resumed_from == 6  # not 2, from A's own stale tree
    assert result.steps == 8
    state = json.loads(store.get("sessions/sess-s/checkpoints/state.json"))
    assert state["step"] == 8 and state["done"] is not None


class PoisonThenKill(TrainHooks):
    """NaN weights after the first step 3; killed when step 3 comes round again."""

    def __init__(self) -> None:
        self.seen = 0

    def after_step(self, step: int, model: Pix2Pix) -> None:
        if step != 3:
            return
        self.seen += 1
        if self.seen == 1:
            v = model.generator.trainable_variables[0]
            v.assign(tf.fill(v.shape, float("nan")))
        else:
            raise Killed()


def test_a_rollback_is_remembered_by_a_job_killed_before_its_next_checkpoint(
    take: TakeData, tmp_path: Path
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    job = JobSpec("sess-r", [take])
    cfg = config(tmp_path / "machine-a", max_steps=6)
    with pytest.raises(Killed):
        train_job(job, cfg, store, hooks=PoisonThenKill(), models_dir=None)
    result = train_job(job, config(tmp_path / "machine-b", max_steps=6), store, models_dir=None)
    assert result.resumed_from == 2
    # The resumed run keeps the halved rate and has no second rollback in hand.
    assert result.nan_rollbacks == 1
    assert result.learning_rate == pytest.approx(cfg.learning_rate / 2)


class LoseLeaseAt(TrainHooks):
    def __init__(self, step: int, lost) -> None:
        self.at, self.lost = step, lost

    def after_step(self, step: int, model: Pix2Pix) -> None:
        if step == self.at:
            self.lost.set()


def test_a_worker_that_lost_its_lease_writes_nothing_more_to_the_store(
    take: TakeData, tmp_path: Path
) -> None:
    import threading

    from cloud_trainer.worker import HeldStore, LeaseLost

    store = LocalBlobStore(tmp_path / "blobs")
    lost = threading.Event()
    with pytest.raises(LeaseLost):
        train_job(
            JobSpec("sess-l", [take]),
            config(tmp_path, max_steps=6),
            HeldStore(store, lost),
            hooks=LoseLeaseAt(3, lost),
            models_dir=None,
        )
    # The step-4 checkpoint stayed on this machine; the store still says step 2.
    assert json.loads(store.get("sessions/sess-l/checkpoints/state.json"))["step"] == 2
    assert not any("ckpt-4" in k for k in store.list("sessions/sess-l/"))
    assert (tmp_path / "sess-l" / "checkpoints" / "ckpt").exists()


def test_a_base_given_as_a_checkpoint_prefix_warm_starts_the_job(
    take: TakeData, base: Path, tmp_path: Path
) -> None:
    prefix = tf.train.latest_checkpoint(str(base))
    job = JobSpec("sess-x", [take], base_checkpoint=prefix)
    result = train_job(job, config(tmp_path, max_steps=1), models_dir=None)
    assert result.warm_start and result.steps == 1


def test_a_base_with_an_unreadable_description_fails_the_job(
    take: TakeData, base: Path, tmp_path: Path
) -> None:
    import shutil

    broken = tmp_path / "broken-base"
    shutil.copytree(base, broken)
    (broken / "base.json").write_text('{"label_map": "skeleton"}')  # no "spec"
    job = JobSpec("sess-y", [take], base_checkpoint=str(broken))
    with pytest.raises(TrainingFailed, match="base.json is unreadable"):
        train_job(job, config(tmp_path), models_dir=None)


def test_a_job_loads_its_takes_one_at_a_time(take: TakeData, tmp_path: Path) -> None:
    """Takes given as loaders (what `booth pretrain` passes) are each loaded when the corpus
    reaches them and dropped once written, so memory holds one take, not all."""
    import dataclasses
    import gc
    import weakref

    refs: list[weakref.ref] = []
    most = [0]

    def load() -> TakeData:
        gc.collect()
        loaded = dataclasses.replace(take, name=f"take-{len(refs)}")
        refs.append(weakref.ref(loaded))
        most[0] = max(most[0], sum(r() is not None for r in refs))
        return loaded

    result = train_job(
        JobSpec("sess-lazy", [load, load, load]), config(tmp_path, max_steps=1), models_dir=None
    )
    assert len(refs) == 3  # every take was loaded
    assert most[0] == 1
    assert result.steps == 1


def test_budget_counts_time_spent_by_earlier_attempts() -> None:
    now = [100.0]
    b = Budget(60, spent_s=20, clock=lambda: now[0])
    assert b.remaining() == 40
    now[0] += 15
    assert b.elapsed() == 35 and b.remaining() == 25


def test_budget_counts_from_when_the_attempt_began() -> None:
    # The worker reads the take from ingest before training: that time is in the budget.
    now = [100.0]
    b = Budget(60, spent_s=20, clock=lambda: now[0], started_at=90.0)
    assert b.elapsed() == 30 and b.remaining() == 30
    assert Budget(60, clock=lambda: now[0], started_at=130.0).elapsed() == 0  # not the future


def test_train_step_runs_under_mirrored_strategy_with_float16_loss_scaling() -> None:
    # The GPU path (MirroredStrategy, mixed_float16, LossScaleOptimizer), exercised on the CPU.
    runtime = Runtime(tf.distribute.MirroredStrategy(), "cpu", "mixed_float16", False)
    model = Pix2Pix(
        ModelSpec.for_size(SIZE), learning_rate=2e-4, l1_weight=100, global_batch=2, runtime=runtime
    )
    x = tf.random.uniform((2, SIZE, SIZE, 3), -1, 1)
    before = model.generator.trainable_variables[0].numpy().copy()
    losses = [model.train_step(x, x) for _ in range(2)]
    assert all(np.isfinite(v) for step in losses for v in step.values())
    assert int(model.step.numpy()) == 2
    assert not np.array_equal(before, model.generator.trainable_variables[0].numpy())
    assert type(model.g_opt).__name__ == "LossScaleOptimizer"


@pytest.mark.parametrize(
    "first, then",
    [(None, "mixed_float16"), ("mixed_float16", None), ("mixed_bfloat16", "mixed_float16")],
)
def test_a_job_checkpoint_resumes_under_another_precision(first, then, tmp_path: Path) -> None:
    """A job checkpointed on a CPU worker (float32 or bfloat16) resumes on a GPU worker
    (float16, loss-scaled), and back."""

    def model(policy):
        runtime = Runtime(tf.distribute.OneDeviceStrategy("/cpu:0"), "cpu", policy, False)
        return Pix2Pix(
            ModelSpec.for_size(SIZE),
            learning_rate=2e-4,
            l1_weight=100,
            global_batch=2,
            runtime=runtime,
        )

    a = model(first)
    x = tf.random.uniform((2, SIZE, SIZE, 3), -1, 1)
    a.train_step(x, x)
    path = a.checkpoint.save(str(tmp_path / "ckpt"))
    b = model(then)
    b.checkpoint.restore(path).assert_existing_objects_matched()
    assert int(b.step.numpy()) == 1
    assert int(_inner(b.g_opt).iterations.numpy()) == 1
    for v, w in zip(a.generator.weights, b.generator.weights, strict=True):
        np.testing.assert_array_equal(v.numpy(), w.numpy())
    assert all(np.isfinite(v) for v in b.train_step(x, x).values())


def test_runtime_on_cpu_is_one_device_without_xla(tmp_path: Path) -> None:
    rt = select_runtime(config(tmp_path))
    assert rt.device == "cpu" and rt.replicas == 1 and not rt.jit_compile
    assert select_runtime(config(tmp_path, mixed_precision="off")).policy is None
    assert select_runtime(config(tmp_path, mixed_precision="on")).policy == "mixed_bfloat16"
    assert select_runtime(config(tmp_path, jit_compile="on")).jit_compile


def test_auto_xla_is_for_one_gpu_or_tpus_not_across_mirrored_gpus() -> None:
    from cloud_trainer.train import auto_jit

    assert auto_jit("gpu", 1) and auto_jit("tpu", 8)
    assert not auto_jit("gpu", 2)  # MirroredStrategy: the compiled step fails there
    assert not auto_jit("cpu", 1)
