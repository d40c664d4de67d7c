"""The worker around a job: a deletion mid-job, a lost lease, a crash in one job.

Real pieces throughout: the repository (SQLite and PostgreSQL), a local blob store,
the SQLite queue, the front desk's own delete, and ``train_job`` on a tiny synthetic
take. The repository is subclassed only to do something at a chosen progress stage
(delete the session, lose the lease, fail once), as a second process would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import pytest  # noqa: E402
import transport_helpers as th  # noqa: E402

from cloud_trainer.config import (  # noqa: E402
    BoothConfig,
    LocalStorage,
    SqliteQueue,
    TrainerConfig,
    load_config,
)
from cloud_trainer.corpus import TakeData  # noqa: E402
from cloud_trainer.front_desk import FrontDesk  # noqa: E402
from cloud_trainer.pretrain import synth_frame_size  # noqa: E402
from cloud_trainer.queue import create_job_queue  # noqa: E402
from cloud_trainer.repository import Repository  # noqa: E402
from cloud_trainer.session import State  # noqa: E402
from cloud_trainer.storage.local import LocalBlobStore  # noqa: E402
from cloud_trainer.worker import Worker  # noqa: E402
from edge_agent.config import ConfigError  # noqa: E402

SIZE_PX = 32


class StagedRepository(Repository):
    """The real repository, calling ``on_stage(session_id, stage)`` after each progress write."""

    on_stage: Callable[[str, str], None] = staticmethod(lambda sid, stage: None)

    def set_progress(self, session_id: str, **fields: Any) -> None:
        super().set_progress(session_id, **fields)
        self.on_stage(session_id, fields.get("stage") or "")


@pytest.fixture
def booth(db_config, tmp_path: Path):
    """A worker with its repository, store, queue and front desk; tiny training settings."""
    settings = BoothConfig(
        models_dir=tmp_path / "no-models",  # no pose model: scoring stays quick
        storage=LocalStorage(root=tmp_path / "blobs"),
        database=db_config,
        queue=SqliteQueue(path=tmp_path / "queue.db", visibility_timeout_s=30.0, heartbeat_s=5.0),
        trainer=TrainerConfig(
            size_px=SIZE_PX,
            batch=2,
            budget_s=600,
            max_steps=2,
            checkpoint_every_steps=1,
            work_dir=tmp_path / "jobs",
        ),
    )
    repo = StagedRepository.from_config(settings.database)
    store = LocalBlobStore(settings.storage.root)
    queue = create_job_queue(settings.queue)
    desk = FrontDesk(
        repo,
        booth_id=th.BOOTH,
        take_s=1.0,
        cameras=lambda: ["cam0"],
        delete_blobs=lambda sid: store.delete_prefix(f"sessions/{sid}/"),
    )
    worker = Worker(settings, repo, store, queue, worker_id="test-worker")
    yield worker, desk
    queue.close()
    repo.close()


def uploaded_session(
    worker: Worker, *, frames: bool = True, cameras: dict[str, float] | None = None
) -> str:
    """A session in ``uploaded`` whose take ingest stored (one shard, poses), with its job
    queued. ``cameras``: seconds of take per camera (default: cam0, 3 s)."""
    repo = worker.repo
    cameras = cameras or {"cam0": 3.0}
    sid = th.new_session(repo, tuple(cameras))
    # A built-in dance: the worker checks the reference before it trains.
    repo.update_session(sid, reference_name="synthetic:warmup")
    repo.transition(sid, State.CAPTURING)
    for camera, seconds in cameras.items():
        repo.open_take(sid, camera, fps=8.0)
        if frames:
            _store_take(worker, sid, camera, seconds)
        repo.mark_take_uploaded(sid, camera)
    repo.transition(sid, State.UPLOADED)
    job_id = repo.create_job(sid)
    worker.queue.publish(job_id, {"session_id": sid})
    return sid


def _store_take(worker: Worker, sid: str, camera: str, seconds: float) -> None:
    """A synthetic take at 8 fps, stored as ingest stores one: a shard, its index, poses."""
    repo, store = worker.repo, worker.store
    take = TakeData.from_synth(2, 5, seconds=seconds, fps=8, size=synth_frame_size(SIZE_PX))
    key = f"sessions/{sid}/frames/{camera}/000000.shard"
    rows, poses, blob, offset = [], [], b"", 0
    for seq, rgb in enumerate(take.frames):
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        assert ok
        jpeg = buf.tobytes()
        rows.append(
            {
                "seq": seq,
                "capture_ts_ns": seq * 125_000_000,
                "shard_key": key,
                "offset": offset,
                "length": len(jpeg),
                "sha256": hashlib.sha256(jpeg).hexdigest(),
            }
        )
        poses.append(
            {
                "seq": seq,
                "keypoints": take.poses[seq].astype("<f4").tobytes(),
                "imputed": False,
                "glitch": False,
            }
        )
        blob += jpeg
        offset += len(jpeg)
    store.put(key, blob)
    repo.commit_shard(
        sid, camera, rows, poses, durable_seq=len(rows) - 1, pose_durable_seq=len(rows) - 1
    )
    repo.end_take(sid, camera, len(rows))


def blobs_of(worker: Worker, sid: str) -> list[str]:
    return list(worker.store.list(f"sessions/{sid}/"))


def work_dir_of(worker: Worker, sid: str) -> Path:
    return Path(worker.settings.trainer.work_dir) / sid


def assert_next_job_runs(worker: Worker) -> None:
    """The worker takes the next job (one with no frames: it fails with its reason)."""
    sid = uploaded_session(worker, frames=False)
    assert worker.run_once(timeout_s=5.0) is True
    session = worker.repo.get_session(sid)
    assert session["state"] == State.FAILED.value
    assert "stored no frames" in (session["failure_reason"] or "")
    assert worker.repo.job_for_session(sid)["state"] == "failed"
    assert not work_dir_of(worker, sid).exists()


@pytest.mark.parametrize("stage", ["training", "done", "rendering"])
def test_a_session_deleted_mid_job_stops_it_quietly_and_leaves_nothing_behind(booth, stage):
    """Deleted while it trains (the next progress write finds no job row), once training
    ended (the worker still uploads its plot), or while it renders (the video is written
    after the deletion): acknowledged, no blob, no email, no work directory."""
    worker, desk = booth
    sid = uploaded_session(worker)
    worker.repo.update_session(sid, reference_name="synthetic:warmup")  # renders for real
    deleted: list[str] = []

    def delete_at(session_id: str, at: str) -> None:
        if session_id == sid and at == stage and not deleted:
            deleted.append(at)
            desk.delete(sid)

    worker.repo.on_stage = delete_at
    lease = worker.queue.receive(timeout_s=5.0)
    assert lease is not None
    worker.handle(lease)  # returns normally

    assert deleted == [stage]
    assert lease.settled == "acked"
    assert worker.repo.job_for_session(sid) is None
    assert worker.repo.claim_emails(time.time() + 3600, lease_s=60) == []  # nobody is mailed
    assert worker.repo.session_deleted(sid)
    assert blobs_of(worker, sid) == []
    assert not work_dir_of(worker, sid).exists()
    assert worker.queue.receive(timeout_s=0.1) is None  # not handed out again
    assert_next_job_runs(worker)


def test_a_blob_a_worker_writes_while_the_front_desk_deletes_does_not_survive(booth):
    """The desk deletes the blobs, then the rows: a worker's write in between (a checkpoint
    mirror) lands before the tombstone, where the worker's own checks cannot see it."""
    worker, desk = booth
    sid = uploaded_session(worker, frames=False)
    sweeps: list[int] = []

    def delete_blobs(session_id: str) -> int:
        n = worker.store.delete_prefix(f"sessions/{session_id}/")
        if not sweeps:
            worker.store.put(f"sessions/{session_id}/checkpoints/state.json", b"{}")
        sweeps.append(n)
        return n

    desk.delete_blobs = delete_blobs
    desk.delete(sid)
    assert worker.repo.session_deleted(sid)
    assert blobs_of(worker, sid) == []


def test_a_lost_lease_stops_training_without_failing_or_acknowledging_the_job(booth):
    worker, _ = booth
    sid = uploaded_session(worker)
    lease = worker.queue.receive(timeout_s=5.0)
    assert lease is not None

    def lose_lease(session_id: str, at: str) -> None:
        if at == "training":  # as a heartbeat would, on learning another worker holds it
            lease.lost.set()

    worker.repo.on_stage = lose_lease
    worker.handle(lease)

    assert lease.settled is None  # neither acked nor failed: the other worker's to finish
    assert worker.repo.get_session(sid)["state"] == State.TRAINING.value
    job = worker.repo.job_for_session(sid)
    assert (job["state"], job["error"]) == ("running", None)
    assert work_dir_of(worker, sid).exists()  # the holder may be on this machine


class StopAfterFirstStep(threading.Event):
    """A SIGTERM that arrives while the first training step runs.

    ``train_job`` asks ``should_stop`` once before building the corpus and then before
    every step; the third question comes after step 1.
    """

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    def is_set(self) -> bool:
        self.asked += 1
        return self.asked >= 3 or super().is_set()


def test_a_stopping_worker_checkpoints_and_hands_the_job_back_to_resume_from_there(booth, caplog):
    worker, _ = booth
    sid = uploaded_session(worker)
    worker.stop = StopAfterFirstStep()
    lease = worker.queue.receive(timeout_s=5.0)
    assert lease is not None and lease.attempt == 1
    worker.handle(lease)

    assert lease.settled == "released"  # neither failed nor acknowledged
    session = worker.repo.get_session(sid)
    assert session["state"] == State.TRAINING.value
    assert "paused at step 1" in session["progress"]["message"]
    assert worker.repo.job_for_session(sid)["state"] == "queued"
    state = json.loads(worker.store.get(f"sessions/{sid}/checkpoints/state.json"))
    assert state["step"] == 1 and state["done"] is None
    assert not work_dir_of(worker, sid).exists()

    # The next worker (here another machine's) gets it at once, on the same attempt,
    # and carries on from step 1.
    other = Worker(worker.settings, worker.repo, worker.store, worker.queue, worker_id="next")
    again = other.queue.receive(timeout_s=5.0)
    assert again is not None and (again.job_id, again.attempt) == (lease.job_id, 1)
    with caplog.at_level(logging.INFO, logger="cloud_trainer.train"):
        other.handle(again)
    assert again.settled == "acked"
    # Training finished, and the attendee got their video.
    assert worker.repo.get_session(sid)["state"] == State.DELIVERED.value
    resumed = [r for r in caplog.records if r.getMessage() == "resuming job"]
    assert [r.step for r in resumed] == [1]
    done = json.loads(worker.store.get(f"sessions/{sid}/checkpoints/state.json"))["done"]
    assert (done["resumed_from"], done["steps"]) == (1, 2)


def booth_worker_at_its_first_checkpoint(
    worker: Worker, settings: BoothConfig, sid: str, tmp_path: Path
) -> tuple[subprocess.Popen, Path]:
    """``booth worker`` (the real command) on ``settings``, once ``sid``'s job stored step 1."""
    config = tmp_path / "booth.yaml"
    config.write_text(json.dumps(settings.model_dump(mode="json")))  # JSON is YAML
    log_path = tmp_path / "worker.log"
    state_key = f"sessions/{sid}/checkpoints/state.json"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cloud_trainer.cli", "worker", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )
    try:
        deadline = time.monotonic() + 240
        while not (
            worker.store.exists(state_key) and json.loads(worker.store.get(state_key))["step"] >= 1
        ):
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, log_path


def test_booth_worker_on_sigterm_exits_cleanly_and_hands_its_job_back(booth, tmp_path):
    """The real command and signal: SIGTERM mid-training ends ``booth worker`` with exit 0
    within a step, the job back in the queue on the same attempt, its checkpoint stored."""
    worker, _ = booth
    trainer = worker.settings.trainer.model_copy(update={"max_steps": 100_000})
    settings = worker.settings.model_copy(update={"trainer": trainer})
    sid = uploaded_session(worker)
    state_key = f"sessions/{sid}/checkpoints/state.json"
    proc, log_path = booth_worker_at_its_first_checkpoint(worker, settings, sid, tmp_path)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "handed back" in log_path.read_text()
    assert worker.repo.job_for_session(sid)["state"] == "queued"
    step = json.loads(worker.store.get(state_key))["step"]
    assert 1 <= step < 100_000
    again = worker.queue.receive(timeout_s=5.0)
    assert again is not None and again.attempt == 1
    again.ack()


def test_booth_worker_killed_mid_training_is_resumed_from_its_checkpoint_by_the_next(
    booth, tmp_path
):
    """The real command, SIGKILLed (no hand-back, no goodbye): once its lease lapses the
    queue delivers the job again, and the next worker resumes it from the stored step."""
    worker, _ = booth
    queue_cfg = worker.settings.queue.model_copy(
        update={"visibility_timeout_s": 3.0, "heartbeat_s": 0.5}
    )
    trainer = worker.settings.trainer.model_copy(update={"max_steps": 100_000})
    settings = worker.settings.model_copy(update={"trainer": trainer, "queue": queue_cfg})
    sid = uploaded_session(worker)
    worker.repo.update_session(sid, reference_name="synthetic:warmup")  # a built-in dance
    state_key = f"sessions/{sid}/checkpoints/state.json"
    proc, _ = booth_worker_at_its_first_checkpoint(worker, settings, sid, tmp_path)
    proc.kill()
    proc.wait()
    # The newest checkpoint the kill left: the store's, or one this machine had written
    # and not yet uploaded (the next worker here resumes from the newer of the two).
    stored = json.loads(worker.store.get(state_key))["step"]
    local = Path(settings.trainer.work_dir) / sid / "checkpoints" / "state.json"
    killed_at = max(stored, json.loads(local.read_text())["step"] if local.exists() else 0)
    assert worker.repo.job_for_session(sid)["state"] == "running"  # nobody said otherwise

    finish = worker.settings.trainer.model_copy(update={"max_steps": killed_at + 1})
    queue = create_job_queue(queue_cfg)
    nxt = Worker(
        worker.settings.model_copy(update={"trainer": finish, "queue": queue_cfg}),
        worker.repo,
        worker.store,
        queue,
        worker_id="next-worker",
    )
    resumed: list[int] = []

    class Resumes(logging.Handler):
        def emit(self, record):
            if record.getMessage() == "resuming job":
                resumed.append(record.step)

    train_log = logging.getLogger("cloud_trainer.train")
    handler, level = Resumes(), train_log.level
    train_log.addHandler(handler)
    train_log.setLevel(logging.INFO)
    try:
        deadline = time.monotonic() + 60
        while not nxt.run_once(timeout_s=1.0):  # the killed worker's lease lapses first
            assert time.monotonic() < deadline, "the job was never delivered again"
    finally:
        train_log.removeHandler(handler)
        train_log.setLevel(level)
        queue.close()
    assert resumed == [killed_at]
    job = worker.repo.job_for_session(sid)
    assert (job["worker"], job["attempts"]) == ("next-worker", 2)
    assert job["state"] == "done", job
    assert worker.repo.get_session(sid)["state"] == State.DELIVERED.value


def test_a_starting_worker_removes_the_work_dirs_a_killed_worker_left_of_ended_jobs(booth):
    worker, desk = booth
    running = uploaded_session(worker, frames=False)
    worker.repo.start_job(worker.repo.job_for_session(running)["id"], "killed-worker")
    ended = uploaded_session(worker, frames=False)
    worker.repo.fail_job(worker.repo.job_for_session(ended)["id"], "it ended")
    deleted = uploaded_session(worker, frames=False)
    desk.delete(deleted)
    for sid in (running, ended, deleted):
        (work_dir_of(worker, sid) / "corpus").mkdir(parents=True)
        (work_dir_of(worker, sid) / "corpus" / "frame.jpg").write_bytes(b"attendee")
    not_ours = Path(worker.settings.trainer.work_dir) / "notes"
    not_ours.mkdir()

    assert worker.sweep_work_dirs() == 2
    assert work_dir_of(worker, running).exists()  # its job may resume here
    assert not work_dir_of(worker, ended).exists()
    assert not work_dir_of(worker, deleted).exists()
    assert not_ours.exists()


def test_a_running_worker_also_removes_work_dirs_of_jobs_that_ended_meanwhile(booth, monkeypatch):
    """A job this worker lost to another (its lease lapsed) left the attendee's frames
    here until the worker restarted; a running worker sweeps too."""
    import cloud_trainer.worker as worker_module

    worker, _ = booth
    monkeypatch.setattr(worker_module, "WORK_DIR_SWEEP_S", 0.0)
    ended = uploaded_session(worker, frames=False)
    job_id = worker.repo.job_for_session(ended)["id"]
    worker.repo.fail_job(job_id, "it ended elsewhere")
    worker.queue.receive(timeout_s=5.0).ack()  # nothing for this worker to run
    sweeps: list[int] = []
    real_sweep = worker.sweep_work_dirs
    monkeypatch.setattr(worker, "sweep_work_dirs", lambda: sweeps.append(1) or real_sweep())
    worker.stop.clear()
    thread = threading.Thread(target=worker.run_forever, kwargs={"poll_s": 0.05}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not sweeps:  # start-up's own sweep is done: what follows is the running one's
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.01)
        (work_dir_of(worker, ended) / "corpus").mkdir(parents=True)
        deadline = time.monotonic() + 20
        while work_dir_of(worker, ended).exists():
            assert time.monotonic() < deadline, "the running worker never swept it"
            time.sleep(0.05)
    finally:
        worker.stop.set()
        thread.join(10)


def test_a_second_delivery_while_the_jobs_worker_lives_is_dropped(booth):
    """Pub/Sub may deliver a job twice (or again after an ack deadline lapsed under a live
    worker): the worker that finds the job's worker beating all along leaves it to it."""
    worker, _ = booth
    worker.duplicate_wait_s = 1.5
    sid = uploaded_session(worker)
    job_id = worker.repo.job_for_session(sid)["id"]
    worker.repo.start_job(job_id, "worker-a")  # running elsewhere, and beating
    beating = threading.Event()

    def worker_a() -> None:
        while not beating.wait(0.2):
            worker.repo.beat_job(job_id, "worker-a")

    a = threading.Thread(target=worker_a)
    a.start()
    try:
        lease = worker.queue.receive(timeout_s=5.0)
        assert lease is not None
        worker.handle(lease)
    finally:
        beating.set()
        a.join()
    assert lease.settled == "acked"
    job = worker.repo.job_for_session(sid)
    assert (job["state"], job["worker"], job["attempts"]) == ("running", "worker-a", 1)
    assert worker.repo.get_session(sid)["state"] == State.UPLOADED.value  # untouched
    assert not work_dir_of(worker, sid).exists()


def test_a_second_delivery_takes_the_job_over_once_its_worker_goes_quiet(booth):
    """On the SQLite queue a redelivery takes the job's one message from the worker that
    ran it (its lease lapsed: a stalled heartbeat), which then stops at its next beat.
    Acknowledging the redelivery left the job to nobody until the stalled-job sweep."""
    worker, _ = booth
    worker.duplicate_wait_s = 60.0  # a bound, not a wait: the takeover comes first
    sid = uploaded_session(worker, frames=False)  # run, it fails fast with its own reason
    job_id = worker.repo.job_for_session(sid)["id"]
    worker.repo.start_job(job_id, "worker-a")  # beat once, then stopped (its lease lost)
    lease = worker.queue.receive(timeout_s=5.0)
    worker.handle(lease)
    assert lease.settled == "acked"
    job = worker.repo.job_for_session(sid)
    assert (job["worker"], job["state"]) == ("test-worker", "failed")
    assert "stored no frames" in worker.repo.get_session(sid)["failure_reason"]


def test_a_worker_stopping_while_it_waits_on_a_duplicate_hands_the_delivery_back(booth):
    """Acknowledged, it would delete the job's one message on the SQLite queue."""
    worker, _ = booth
    worker.duplicate_wait_s = 60.0
    sid = uploaded_session(worker)
    job_id = worker.repo.job_for_session(sid)["id"]
    worker.repo.start_job(job_id, "worker-a")
    lease = worker.queue.receive(timeout_s=5.0)
    worker.stop.set()  # SIGTERM
    worker.handle(lease)
    assert lease.settled == "released"
    assert worker.queue.receive(timeout_s=5.0).job_id == job_id  # still on the queue


def test_a_session_whose_failure_was_not_written_fails_with_the_jobs_reason_next_delivery(
    booth,
):
    """Failing a job writes the job, then the session. A worker that dies, or a database
    that blips, between the two left the session waiting on a failed job for good (each
    delivery found the job ended and acknowledged it)."""
    worker, _ = booth
    sid = uploaded_session(worker, frames=False)
    real_fail = worker.repo.fail

    def fail_once(session_id: str, reason: str) -> None:
        worker.repo.fail = real_fail
        raise RuntimeError("database connection reset")

    worker.repo.fail = fail_once
    lease = worker.queue.receive(timeout_s=5.0)
    with pytest.raises(RuntimeError, match="connection reset"):
        worker.handle(lease)
    assert worker.repo.job_for_session(sid)["state"] == "failed"
    assert worker.repo.get_session(sid)["state"] == State.TRAINING.value  # left waiting
    lease.release()  # unacknowledged: as its lease expiring would, the job comes back

    assert worker.run_once(timeout_s=5.0) is True
    session = worker.repo.get_session(sid)
    assert session["state"] == State.FAILED.value
    assert "stored no frames" in session["failure_reason"]
    assert worker.queue.receive(timeout_s=0.2) is None


def test_a_job_whose_worker_died_after_the_delivery_is_ended_not_queued_forever(booth):
    """The delivery commits, then the job's row is ended: a worker killed in between left
    the job 'running', and the stalled-job sweep published it again every round."""
    from cloud_trainer.deliver import Deliverer
    from cloud_trainer.dispatch import republish_stalled

    worker, _ = booth
    sid = uploaded_session(worker, frames=False)
    job_id = worker.repo.job_for_session(sid)["id"]
    worker.repo.start_job(job_id, "killed-worker")
    worker.repo.transition(sid, State.TRAINING)
    worker.repo.transition(sid, State.RENDERING)
    Deliverer(worker.repo, worker.store, worker.settings).deliver(
        sid, video_key=f"sessions/{sid}/video/final.mp4", poster_key=f"sessions/{sid}/p.jpg"
    )
    later = time.time() + 3600
    assert republish_stalled(worker.repo, worker.queue, quiet_s=60.0, now=later) == 1

    assert worker.run_once(timeout_s=5.0) is True
    job = worker.repo.job_for_session(sid)
    assert job["state"] == "done" and job["attempts"] == 1  # ended, not run again
    assert worker.repo.get_session(sid)["state"] == State.DELIVERED.value
    assert len(worker.repo.emails(sid)) == 1  # the attendee's one email, not sent again
    assert republish_stalled(worker.repo, worker.queue, quiet_s=60.0, now=later + 3600) == 0
    assert worker.queue.receive(timeout_s=0.2) is None


def test_a_worker_waits_for_a_missing_base_checkpoint_instead_of_failing_the_sessions(
    booth, caplog
):
    """Deploys start the workers before `booth pretrain --publish`: a job taken then would
    fail after the attendee danced. The worker waits, saying what is missing; the job stays
    queued; once the base is in the store the worker goes on."""
    worker, _ = booth
    worker.settings.trainer.base_checkpoint = "blob:base/booth-1"
    worker.base_poll_s = 0.05
    sid = uploaded_session(worker, frames=False)
    warned = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for it before taking jobs" in record.getMessage():
                warned.set()

    seen = Seen()
    logging.getLogger("cloud_trainer.worker").addHandler(seen)
    ended: list[str] = []
    runner = threading.Thread(target=lambda: ended.append(worker.run_forever(poll_s=0.05)))
    runner.start()
    try:
        assert warned.wait(30.0)
        assert worker.repo.get_session(sid)["state"] == State.UPLOADED.value
        assert worker.repo.job_for_session(sid)["state"] == "queued"
        # Published: the next check finds it and the queued job runs (and, having no
        # frames, fails with its own reason, not the base's).
        worker.store.put("base/booth-1/checkpoint", b"published")
        deadline = time.monotonic() + 60.0
        while worker.repo.get_session(sid)["state"] != State.FAILED.value:
            assert time.monotonic() < deadline, "the job never ran once the base appeared"
            worker.stop.wait(0.05)
    finally:
        worker.stop.set()
        runner.join(60.0)
        logging.getLogger("cloud_trainer.worker").removeHandler(seen)
    assert ended == ["stopped"]
    assert "stored no frames" in worker.repo.get_session(sid)["failure_reason"]
    msgs = [r.getMessage() for r in caplog.records if "waiting for it" in r.getMessage()]
    assert msgs[0].startswith("trainer.base_checkpoint blob:base/booth-1 is not there")
    assert "booth pretrain --out DIR --publish blob:base/booth-1" in msgs[0]
    assert len(msgs) == 1  # said once, not every poll


def test_a_worker_whose_job_another_worker_claimed_stops_without_settling_it(booth):
    worker, _ = booth
    sid = uploaded_session(worker)
    job_id = worker.repo.job_for_session(sid)["id"]
    # Beats every 50 ms, so the claim below is noticed within the job.
    worker.queue = create_job_queue(worker.settings.queue.model_copy(update={"heartbeat_s": 0.05}))
    lease = worker.queue.receive(timeout_s=5.0)
    assert lease is not None
    noticed: list[bool] = []

    def claim_at_training(session_id: str, at: str) -> None:
        if at == "training" and not noticed:
            worker.repo.start_job(job_id, "worker-b")  # as if worker-b thought us dead
            noticed.append(lease.lost.wait(30))

    worker.repo.on_stage = claim_at_training
    worker.handle(lease)
    assert noticed == [True]
    assert lease.settled is None  # worker-b's to finish; ours comes back and is dropped
    job = worker.repo.job_for_session(sid)
    assert (job["state"], job["worker"]) == ("running", "worker-b")
    assert worker.repo.get_session(sid)["state"] == State.TRAINING.value
    worker.queue.close()


def test_a_camera_that_stored_no_frames_does_not_fail_a_session_another_camera_carries(booth):
    worker, _ = booth
    sid = uploaded_session(worker)
    worker.repo.update_session(sid, reference_name="synthetic:warmup")
    worker.repo.open_take(sid, "cam1", fps=8.0)  # its agent died before its first frame
    worker.repo.end_take(sid, "cam1", 0)
    worker.repo.mark_take_uploaded(sid, "cam1")
    assert worker.run_once(timeout_s=5.0) is True
    session = worker.repo.get_session(sid)
    assert session["state"] == State.DELIVERED.value, session["failure_reason"]


def _cut_shard(worker: Worker, sid: str) -> None:
    key = f"sessions/{sid}/frames/cam0/000000.shard"
    worker.store.put(key, worker.store.get(key)[:1000])


def _bad_pose(worker: Worker, sid: str) -> None:
    from sqlalchemy import update

    from cloud_trainer.repository.schema import poses

    with worker.repo.engine.begin() as conn:
        conn.execute(update(poses).where(poses.c.session_id == sid).values(keypoints=b"\0" * 12))


def _no_head(worker: Worker, sid: str, camera: str = "cam0") -> None:
    """A camera that never framed the head (a tall attendee): every head score 0."""
    from edge_agent import skeleton as sk

    _blind(worker, sid, camera, range(sk.INDEX["right_ear"] + 1))  # nose, eyes, ears


def _blind(worker: Worker, sid: str, camera: str, joints) -> None:
    """Every pose of ``camera`` with these joints' scores 0 (out of its frame)."""
    import numpy as np
    from sqlalchemy import select, update

    from cloud_trainer.repository.schema import poses
    from edge_agent import skeleton as sk

    mine = (poses.c.session_id == sid) & (poses.c.camera_id == camera)
    with worker.repo.engine.begin() as conn:
        rows = conn.execute(select(poses.c.seq, poses.c.keypoints).where(mine)).all()
        for seq, blob in rows:
            kp = np.frombuffer(blob, dtype="<f4").reshape(sk.NUM_JOINTS, 3).copy()
            kp[list(joints), 2] = 0.0
            conn.execute(
                update(poses)
                .where(mine, poses.c.seq == seq)
                .values(keypoints=kp.astype("<f4").tobytes())
            )


def test_the_whole_body_check_counts_only_takes_the_training_will_keep(booth):
    """cam1 framed the attendee whole but is too short to train on; cam0 cut off the
    feet. The check passed on cam1, the model trained on cam0 alone, and rendering then
    failed for want of the feet, after the whole training budget."""
    from edge_agent import skeleton as sk

    worker, _ = booth
    sid = uploaded_session(worker, cameras={"cam0": 3.0, "cam1": 1.0})  # 24 and 8 frames
    feet = [
        j for name, j in sk.INDEX.items() if "ankle" in name or "heel" in name or "foot" in name
    ]
    _blind(worker, sid, "cam0", feet)
    assert worker.run_once(timeout_s=5.0) is True
    session = worker.repo.get_session(sid)
    assert session["state"] == State.FAILED.value
    assert "no camera saw the attendee whole" in session["failure_reason"]
    assert not list(worker.store.list(f"sessions/{sid}/checkpoints/"))  # never trained


def test_a_camera_that_sent_no_poses_is_named_not_blamed_on_the_framing(booth):
    from edge_agent import skeleton as sk

    worker, _ = booth
    sid = uploaded_session(worker)
    _blind(worker, sid, "cam0", range(sk.NUM_JOINTS))
    assert worker.run_once(timeout_s=5.0) is True
    reason = worker.repo.get_session(sid)["failure_reason"]
    assert "none of its 24 frames has a pose" in reason and "pose model" in reason, reason
    assert "frame the booth" not in reason


def _no_base(worker: Worker, sid: str) -> None:
    worker.settings.trainer.base_checkpoint = str(Path(worker.settings.trainer.work_dir) / "nope")


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (_cut_shard, "frame shard .* is cut short"),
        (_bad_pose, "the pose of frame 0 has 3 values"),
        (_no_base, "base checkpoint .*nope not found"),
        (_no_head, "no camera saw the attendee whole"),
    ],
    ids=["shard-cut-short", "pose-of-wrong-size", "missing-base", "head-never-framed"],
)
def test_bad_input_fails_the_job_with_its_reason_and_the_worker_goes_on(booth, spoil, reason):
    worker, _ = booth
    sid = uploaded_session(worker)
    spoil(worker, sid)
    assert worker.run_once(timeout_s=5.0) is True
    session = worker.repo.get_session(sid)
    assert session["state"] == State.FAILED.value
    assert re.search(reason, session["failure_reason"] or ""), session["failure_reason"]
    assert "on our side" not in session["failure_reason"]  # failed once, not retried
    assert worker.repo.job_for_session(sid)["state"] == "failed"
    worker.settings.trainer.base_checkpoint = None
    assert_next_job_runs(worker)


def test_a_reference_that_is_gone_fails_the_job_before_any_training(booth):
    """Found out at rendering, it used to cost the attendee's whole training budget."""
    worker, _ = booth
    sid = uploaded_session(worker)
    worker.repo.update_session(sid, reference_name="tango")  # deleted, or never there
    assert worker.run_once(timeout_s=5.0) is True
    session = worker.repo.get_session(sid)
    assert session["state"] == State.FAILED.value
    assert (
        "the reference dance cannot be used: no reference named 'tango'"
        in (session["failure_reason"])
    )
    assert not list(worker.store.list(f"sessions/{sid}/checkpoints/"))  # never trained
    assert_next_job_runs(worker)


def test_run_forever_survives_a_job_that_crashes_outside_its_own_handling(booth):
    """An error the job handling does not expect (here: the database, on the first
    lookup of a job) is logged and the worker goes on to the next job."""
    worker, _ = booth
    broken = uploaded_session(worker, frames=False)
    nxt = uploaded_session(worker, frames=False)
    real_get_session = worker.repo.get_session
    calls: list[str] = []

    def get_session(session_id: str) -> dict[str, Any]:
        calls.append(session_id)
        if session_id == broken and calls.count(broken) == 1:
            raise RuntimeError("database connection reset")
        return real_get_session(session_id)

    def fail(session_id: str, reason: str) -> None:
        Repository.fail(worker.repo, session_id, reason)
        if session_id == nxt:
            worker.stop.set()

    worker.repo.get_session = get_session
    worker.repo.fail = fail
    guard = threading.Timer(120.0, worker.stop.set)  # a broken worker must not hang the suite
    guard.start()
    try:
        worker.run_forever(poll_s=0.1)
    finally:
        guard.cancel()
    assert calls[0] == broken
    assert real_get_session(nxt)["state"] == State.FAILED.value


def test_a_worker_grown_past_its_memory_limit_exits_between_jobs(booth):
    """The first job ends, the worker sees its memory past the limit and returns for its
    supervisor to start a fresh one; the second job waits in the queue for that one."""
    worker, _ = booth
    first = uploaded_session(worker, frames=False)
    second = uploaded_session(worker, frames=False)
    worker.settings.trainer.worker_max_rss_mb = 1  # any real process is past 1 MB
    guard = threading.Timer(120.0, worker.stop.set)
    guard.start()
    try:
        assert worker.run_forever(poll_s=0.1) == "recycle"
    finally:
        guard.cancel()
    assert worker.repo.get_session(first)["state"] == State.FAILED.value  # it had no frames
    assert worker.repo.get_session(second)["state"] == State.UPLOADED.value
    # A fresh worker takes the job that was left.
    worker.settings.trainer.worker_max_rss_mb = 0  # never
    assert worker.run_once(timeout_s=5.0) is True
    assert worker.repo.get_session(second)["state"] == State.FAILED.value


def test_the_default_memory_limit_is_a_share_of_what_the_process_may_use():
    from cloud_trainer.worker import max_rss_mb, rss_mb

    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    assert 0 < max_rss_mb(None) <= 0.6 * total_mb + 1
    assert max_rss_mb(0) == 0 and max_rss_mb(5000) == 5000
    assert 0 < rss_mb() < total_mb


def test_a_heartbeat_not_shorter_than_the_lease_is_refused_with_both_numbers(tmp_path):
    with pytest.raises(ValueError, match=r"heartbeat_s \(60\) must be shorter than .*\(30\)"):
        SqliteQueue(path=tmp_path / "q.db", visibility_timeout_s=30, heartbeat_s=60)
    from cloud_trainer.config import parse_model

    with pytest.raises(ConfigError, match="queue"):
        parse_model(
            {"queue": {"type": "sqlite", "visibility_timeout_s": 5, "heartbeat_s": 5}},
            BoothConfig,
            source="booth.yaml",
        )


def test_booth_worker_past_its_memory_limit_exits_75_and_the_demo_starts_a_fresh_one(tmp_path):
    """The real `booth worker` process: one job (for a deleted session, dropped at once),
    then past its 1 MB limit it exits with RECYCLE_EXIT; `booth demo`'s supervisor starts
    the worker again instead of failing, as compose's restart policy would."""
    import yaml

    from cloud_trainer.commands.worker import RECYCLE_EXIT
    from cloud_trainer.demo import DemoPlan, Processes
    from cloud_trainer.queue import create_job_queue

    cfg = {
        "database": {"type": "sqlite", "path": str(tmp_path / "booth.db")},
        "queue": {"type": "sqlite", "path": str(tmp_path / "queue.db")},
        "storage": {"type": "local", "root": str(tmp_path / "blobs")},
        "trainer": {"work_dir": str(tmp_path / "jobs"), "worker_max_rss_mb": 1},
    }
    path = tmp_path / "booth.yaml"
    path.write_text(yaml.safe_dump(cfg))
    queue = create_job_queue(load_config(path).queue)
    queue.publish("job-1", {"session_id": "no-such-session"})
    procs = Processes(tmp_path / "logs", DemoPlan(workdir=tmp_path))
    first = procs.start("worker", "worker", "--config", str(path))
    try:
        assert first.wait(timeout=120) == RECYCLE_EXIT, (
            tmp_path / "logs" / "worker.log"
        ).read_text()
        log = (tmp_path / "logs" / "worker.log").read_text()
        assert "worker memory is past its limit" in log
        procs.check()  # restarts it rather than raising DemoFailed
        assert procs.children["worker"] is not first
        assert procs.children["worker"].poll() is None
    finally:
        procs.stop()
    queue.close()


def test_the_dance_is_rendered_from_a_camera_that_saw_the_attendee_whole():
    """cam0 cut off the head, cam1 framed everyone: render from cam1 (it took cam0, and
    the render failed on the scaling after the whole training budget)."""
    from types import SimpleNamespace

    from cloud_trainer.worker import render_source

    take = TakeData.from_synth(2, 5, seconds=1, fps=8, size=synth_frame_size(SIZE_PX))
    headless = take.poses.copy()
    headless[:, :5, 2] = 0.0  # nose, eyes, ears
    cam0 = SimpleNamespace(camera="cam0", poses=headless)
    cam1 = SimpleNamespace(camera="cam1", poses=take.poses)
    framings = {"cam0": "framing-0", "cam1": "framing-1"}
    generator = SimpleNamespace(framing=framings.get)
    assert render_source([cam0, cam1], generator) == (cam1, "framing-1")
    # None whole: the first framed one, and render says why it cannot scale the dance.
    assert render_source([cam0], generator) == (cam0, "framing-0")


def test_a_job_message_naming_no_session_of_ours_leaves_the_queue_at_once(booth, caplog):
    """Someone else's message on the topic: redelivered, it would come back forever."""
    worker, _ = booth
    worker.queue.publish("job-x", {"session_id": "Session 42"})
    lease = worker.queue.receive(timeout_s=5.0)
    assert lease is not None
    with caplog.at_level("ERROR", logger="cloud_trainer.worker"):
        worker.handle(lease)
    assert lease.settled == "acked"
    assert "names no session of ours" in caplog.text
    assert worker.queue.receive(timeout_s=0.2) is None


def test_a_worker_that_lost_its_job_neither_hands_it_back_nor_fails_it(booth):
    """Its lease lapsed and worker-b runs the job now: a crash here is not worker-b's."""
    worker, _ = booth
    sid = uploaded_session(worker)
    job_id = worker.repo.job_for_session(sid)["id"]
    lease = worker.queue.receive(timeout_s=5.0)
    assert lease is not None

    def crash_after_worker_b_claims(session_id: str, at: str) -> None:
        if at == "training":
            worker.repo.start_job(job_id, "worker-b")
            raise RuntimeError("a passing outage")

    worker.repo.on_stage = crash_after_worker_b_claims
    worker.handle(lease)
    job = worker.repo.job_for_session(sid)
    assert (job["state"], job["worker"]) == ("running", "worker-b")
    assert worker.repo.get_session(sid)["state"] == State.TRAINING.value


def crashing_once_training(worker: Worker) -> str:
    """A session whose only attempt crashes (a bug, KeyError) as training starts."""
    worker.queue = create_job_queue(worker.settings.queue.model_copy(update={"max_attempts": 1}))
    sid = uploaded_session(worker)

    def crash(session_id: str, at: str) -> None:
        if at == "training":
            raise KeyError("left_ankle")

    worker.repo.on_stage = crash
    return sid


def test_a_crash_tells_staff_what_to_do_and_the_log_where_to_look(booth, caplog):
    """The tablet shows what to do and a reference, not a Python exception; the worker's
    log has the traceback under that reference."""
    worker, _ = booth
    sid = crashing_once_training(worker)
    with caplog.at_level(logging.ERROR, logger="cloud_trainer.worker"):
        assert worker.run_once(timeout_s=5.0) is True
    reason = worker.repo.get_session(sid)["failure_reason"]
    assert reason.startswith("processing failed on our side") and "Start again" in reason
    assert "KeyError" not in reason
    ref = re.search(r"ref ([0-9a-f]{8})", reason).group(1)
    logged = [r for r in caplog.records if ref in r.getMessage()]
    assert logged and logged[0].exc_info is not None
    worker.queue.close()


def test_a_failed_attempts_stage_seconds_are_recorded_too(booth):
    """``booth_job_stage_seconds`` is where the workers' time goes: an attempt that crashed
    spent its loading and training time as surely as one that delivered."""
    worker, _ = booth
    sid = crashing_once_training(worker)
    assert worker.run_once(timeout_s=5.0) is True
    job = worker.repo.job_for_session(sid)
    assert job["state"] == "failed"
    seconds = job["stage_seconds"]
    assert set(seconds) == {"loading", "training"}
    assert seconds["loading"] > 0
    worker.queue.close()


# ---- the database going away ------------------------------------------------------------


def test_a_progress_write_the_database_refuses_does_not_stop_the_training(booth, caplog):
    """The tablet's progress is the only write mid-training; a database blip there used to
    crash the attempt (and use it up)."""
    from sqlalchemy.exc import OperationalError

    worker, _ = booth
    sid = uploaded_session(worker)
    refused = []

    def blip(session_id: str, at: str) -> None:
        if at == "training" and not refused:
            refused.append(at)
            raise OperationalError("UPDATE sessions ...", {}, Exception("server closed"))

    worker.repo.on_stage = blip
    with caplog.at_level(logging.WARNING, logger="cloud_trainer.worker"):
        assert worker.run_once(timeout_s=5.0) is True
    assert refused
    job = worker.repo.job_for_session(sid)
    assert job["state"] == "done" and job["attempts"] == 1, job
    assert worker.repo.get_session(sid)["state"] == State.DELIVERED.value
    assert "progress not recorded" in caplog.text


@pytest.fixture
def booth_behind_a_link(tmp_path: Path, pg_database_config):
    """The worker's PostgreSQL reached through a proxy that can cut the link for real."""
    from urllib.parse import urlsplit, urlunsplit

    url = urlsplit(pg_database_config.url)
    proxy = th.LinkProxy()
    proxy.set_upstream(url.port or 5432)
    netloc = url.netloc.rsplit(":", 1)[0] if url.port else url.netloc
    netloc = netloc.rsplit("@", 1)[0] + "@127.0.0.1" if "@" in netloc else "127.0.0.1"
    proxied = pg_database_config.model_copy(
        update={"url": urlunsplit(url._replace(netloc=f"{netloc}:{proxy.port}"))}
    )
    settings = BoothConfig(
        models_dir=tmp_path / "no-models",
        storage=LocalStorage(root=tmp_path / "blobs"),
        database=proxied,
        queue=SqliteQueue(path=tmp_path / "queue.db", visibility_timeout_s=30.0, heartbeat_s=5.0),
        trainer=TrainerConfig(size_px=SIZE_PX, batch=2, budget_s=600, max_steps=2),
    )
    repo = Repository.from_config(settings.database)
    queue = create_job_queue(settings.queue)
    worker = Worker(settings, repo, LocalBlobStore(tmp_path / "blobs"), queue, worker_id="w")
    yield worker, proxy
    proxy.close()
    queue.close()
    repo.close()


def test_a_job_whose_final_attempts_worker_died_is_failed_not_run_again(booth):
    """The delivery after the last attempt (lease.exhausted) is recorded as given up and
    acknowledged; the worker does not train it a further time."""
    worker, _ = booth
    worker.queue = create_job_queue(
        worker.settings.queue.model_copy(
            update={"max_attempts": 1, "visibility_timeout_s": 1.0, "heartbeat_s": 0.2}
        )
    )
    sid = uploaded_session(worker, frames=False)  # run, it would fail with "stored no frames"
    job_id = worker.repo.job_for_session(sid)["id"]
    only = worker.queue.receive(timeout_s=5.0)
    assert only is not None and only.final and not only.exhausted
    worker.repo.start_job(job_id, "dead-worker")  # claimed, then killed: no beat, no ack
    back = worker.queue.receive(timeout_s=30.0)  # returns once the dead lease lapses
    assert back is not None and back.exhausted
    worker.handle(back)
    assert back.settled == "acked"
    session = worker.repo.get_session(sid)
    assert session["state"] == State.FAILED.value
    assert "interrupted 1 times" in session["failure_reason"], session["failure_reason"]
    job = worker.repo.job_for_session(sid)
    assert job["state"] == "failed" and "interrupted" in job["error"]
    assert worker.queue.receive(timeout_s=0.2) is None
    worker.queue.close()


def test_a_training_worker_keeps_its_queue_lease_past_the_lease_length(booth):
    """While the job trains, the worker extends its queue lease (not only its claim row):
    another worker polling for three lease lengths never receives the job."""
    worker, _ = booth
    cfg = worker.settings.queue.model_copy(update={"visibility_timeout_s": 2.0, "heartbeat_s": 0.5})
    worker.queue = create_job_queue(cfg)
    other = create_job_queue(cfg)
    sid = uploaded_session(worker)
    stolen: list = []

    def poll_while_training(session_id: str, at: str) -> None:
        if at == "training" and not stolen and not polled:
            polled.append(True)
            got = other.receive(timeout_s=3 * cfg.visibility_timeout_s)
            if got is not None:
                stolen.append(got)

    polled: list[bool] = []
    worker.repo.on_stage = poll_while_training
    lease = worker.queue.receive(timeout_s=5.0)
    assert lease is not None
    worker.handle(lease)
    assert polled == [True]
    assert stolen == [], "the job was delivered again while its worker trained it"
    assert lease.settled == "acked" and not lease.lost.is_set()
    job = worker.repo.job_for_session(sid)
    assert (job["state"], job["attempts"]) == ("done", 1)
    assert worker.repo.get_session(sid)["state"] == State.DELIVERED.value
    assert other.receive(timeout_s=0.2) is None
    worker.queue.close()
    other.close()


def test_a_database_outage_hands_jobs_back_without_using_their_attempts(
    booth_behind_a_link, monkeypatch, caplog
):
    """Each delivery during an outage failed on its first read and counted as an attempt:
    a few minutes down failed sessions that never ran, 'the worker died 3 times'."""
    import cloud_trainer.worker as worker_mod

    monkeypatch.setattr(worker_mod, "DATABASE_DOWN_BACKOFF_S", 0.1)
    worker, link = booth_behind_a_link
    sid = uploaded_session(worker, frames=False)  # it fails fast, with its own reason, once run
    link.cut()
    link.reset()  # the pooled connections die; new ones get no answer
    with caplog.at_level(logging.WARNING, logger="cloud_trainer.worker"):
        for _ in range(2):
            lease = worker.queue.receive(timeout_s=5.0)
            assert lease is not None and lease.attempt == 1, lease
            worker.handle(lease)
            assert lease.settled == "released"
    assert "job handed back without using an attempt" in caplog.text
    link.restore()
    assert worker.run_once(timeout_s=5.0) is True
    session = worker.repo.get_session(sid)
    assert session["state"] == State.FAILED.value
    assert "stored no frames" in session["failure_reason"]  # run, not given up on
    assert worker.repo.job_for_session(sid)["attempts"] == 1
