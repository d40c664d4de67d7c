"""A crash between upload and publish delays a training job; it never loses one."""

from __future__ import annotations

import time

import transport_helpers as th
from sqlalchemy import update

from cloud_trainer import dispatch
from cloud_trainer.config import SqliteDatabase, SqliteQueue
from cloud_trainer.dispatch import enqueue_training, publish_pending
from cloud_trainer.queue import create_job_queue
from cloud_trainer.repository import Repository
from cloud_trainer.repository.schema import job_beats, jobs


def uploaded_session(repo: Repository) -> str:
    sid = th.new_session(repo, booth_id="booth-1")
    repo.transition(sid, "capturing")
    repo.transition(sid, "uploaded")
    return sid


def capturing_session(repo: Repository) -> str:
    """A 15 s take on cam0 and cam1, capturing since now."""
    sid = repo.create_session(
        booth_id="booth-1",
        name="A",
        email="a@example.org",
        consent=True,
        reference_name="r",
        take_s=15,
        cameras=["cam0", "cam1"],
    )
    repo.transition(sid, "capturing")
    return sid


def test_uploaded_session_without_a_job_is_queued_at_start_up(tmp_path):
    repo = Repository.from_config(SqliteDatabase(path=tmp_path / "b.db"))
    queue = create_job_queue(SqliteQueue(path=tmp_path / "q.db"))
    sid = uploaded_session(repo)  # the server died before its upload hook ran
    assert publish_pending(repo, queue) == 1
    lease = queue.receive(timeout_s=1)
    assert lease is not None and lease.payload == {"session_id": sid}
    assert repo.job_for_session(sid)["published_at"] is not None
    assert publish_pending(repo, queue) == 0


def test_job_created_but_never_published_is_published_once(tmp_path):
    repo = Repository.from_config(SqliteDatabase(path=tmp_path / "b.db"))
    queue = create_job_queue(SqliteQueue(path=tmp_path / "q.db"))
    sid = uploaded_session(repo)
    job_id = repo.create_job(sid)  # died between create and publish
    assert publish_pending(repo, queue) == 1
    assert queue.receive(timeout_s=1).job_id == job_id
    assert enqueue_training(repo, queue, sid) == job_id  # idempotent on the session


def test_a_capture_that_never_finishes_uploading_fails_with_the_missing_camera(tmp_path):
    from cloud_trainer.dispatch import fail_overdue_captures

    repo = Repository.from_config(SqliteDatabase(path=tmp_path / "b.db"))
    sid = capturing_session(repo)
    started = repo.get_session(sid)["capture_started_at"]
    assert fail_overdue_captures(repo, 600, now=started + 60) == []  # still within its deadline
    assert repo.get_session(sid)["state"] == "capturing"
    assert fail_overdue_captures(repo, 600, now=started + 700) == [sid]
    s = repo.get_session(sid)
    assert s["state"] == "failed" and "cam0, cam1" in s["failure_reason"]


async def test_a_periodic_sweeper_survives_a_failed_round():
    import asyncio

    from cloud_trainer.service import every

    rounds: list[str] = []
    third = asyncio.Event()

    def sweep():
        rounds.append("fail" if not rounds else "ok")
        if len(rounds) == 1:
            raise RuntimeError("database is locked")
        if len(rounds) == 3:
            third.set()

    task = asyncio.create_task(every(0.001, sweep, "checking for overdue captures"))
    try:
        async with asyncio.timeout(30):
            await third.wait()  # it went on after the failure
    finally:
        task.cancel()
    assert rounds[:3] == ["fail", "ok", "ok"]


def test_a_running_job_whose_worker_died_and_whose_message_is_gone_is_queued_again(tmp_path):
    """Its one delivery was acknowledged (as a duplicate, while its worker still lived);
    then that worker died. Without a beat for the quiet time, the job goes back on the
    queue, once per quiet time, and a worker resumes it."""
    from cloud_trainer.dispatch import republish_stalled

    repo = Repository.from_config(SqliteDatabase(path=tmp_path / "b.db"))
    queue = create_job_queue(SqliteQueue(path=tmp_path / "q.db"))
    sid = uploaded_session(repo)
    job_id = enqueue_training(repo, queue, sid)
    queue.receive(timeout_s=1).ack()  # the delivery is gone
    repo.start_job(job_id, "worker-a", busy_within_s=60)
    assert republish_stalled(repo, queue, 300) == 0  # it beat just now: it may well live
    assert queue.receive(timeout_s=0.1) is None

    with repo.engine.begin() as conn:  # queued 500 s ago; worker-a died 400 s ago
        conn.execute(update(jobs).values(published_at=time.time() - 500))
        conn.execute(update(job_beats).values(beat_at=time.time() - 400))
    assert republish_stalled(repo, queue, 300) == 1
    assert republish_stalled(repo, queue, 300) == 0  # once per quiet time
    lease = queue.receive(timeout_s=1)
    assert lease is not None and (lease.job_id, lease.payload) == (job_id, {"session_id": sid})
    job = repo.start_job(job_id, "worker-b", busy_within_s=60)
    assert (job["worker"], job["attempts"]) == ("worker-b", 2)
    assert republish_stalled(repo, queue, 300) == 0  # worker-b beats now


def test_serve_waits_several_leases_before_requeueing_a_silent_job():
    from cloud_trainer.config import PubSubQueue
    from cloud_trainer.service import stalled_after_s

    assert stalled_after_s(SqliteQueue(visibility_timeout_s=60, heartbeat_s=10)) == 300
    assert stalled_after_s(SqliteQueue(visibility_timeout_s=600, heartbeat_s=10)) == 3000
    assert stalled_after_s(PubSubQueue(ack_deadline_s=120)) == 600


class RefusingQueue:
    """The real SQLite queue, refusing publishes while ``down`` (a Pub/Sub outage)."""

    def __init__(self, queue):
        self.queue, self.down = queue, True

    def publish(self, job_id, payload):
        if self.down:
            raise TimeoutError("publish timed out")
        self.queue.publish(job_id, payload)


def test_a_publish_the_queue_refused_is_published_by_the_sweep(tmp_path):
    import pytest

    repo = Repository.from_config(SqliteDatabase(path=tmp_path / "b.db"))
    real = create_job_queue(SqliteQueue(path=tmp_path / "q.db"))
    queue = RefusingQueue(real)
    sid = uploaded_session(repo)
    with pytest.raises(TimeoutError):
        enqueue_training(repo, queue, sid)
    job_id = repo.job_for_session(sid)["id"]
    queue.down = False
    now = time.time()
    assert publish_pending(repo, queue, settle_s=30, now=now) == 0  # it may be publishing now
    assert publish_pending(repo, queue, settle_s=30, now=now + 60) == 1
    assert publish_pending(repo, queue, settle_s=30, now=now + 120) == 0
    lease = real.receive(timeout_s=1)
    assert lease is not None and (lease.job_id, lease.payload) == (job_id, {"session_id": sid})


def test_a_job_handed_back_after_its_message_was_lost_is_published_again(tmp_path):
    """Worker A's lease lapsed while it lived; B's duplicate delivery was acked (A beat).
    A then hands the job back: its nack reaches no message, so the sweep publishes one."""
    repo = Repository.from_config(SqliteDatabase(path=tmp_path / "b.db"))
    queue = create_job_queue(SqliteQueue(path=tmp_path / "q.db"))
    sid = uploaded_session(repo)
    job_id = enqueue_training(repo, queue, sid)
    queue.receive(timeout_s=1).ack()  # the only message is gone
    repo.start_job(job_id, "worker-a")
    assert repo.requeue_job(job_id, worker="worker-a")
    assert queue.receive(timeout_s=0.1) is None
    assert publish_pending(repo, queue, settle_s=30, now=time.time() + 60) == 1
    lease = queue.receive(timeout_s=1)
    assert lease is not None and lease.job_id == job_id


def test_the_overdue_sweep_leaves_a_session_whose_upload_completed_meanwhile(tmp_path):
    from cloud_trainer.dispatch import fail_overdue_captures

    class UploadLandsDuringTheSweep(Repository):
        def uploaded_cameras(self, session_id):
            # The last camera's take completes after the sweep read "capturing".
            self.transition(session_id, "uploaded")
            return {"cam0", "cam1"}

    repo = UploadLandsDuringTheSweep.from_config(SqliteDatabase(path=tmp_path / "b.db"))
    sid = capturing_session(repo)
    started = repo.get_session(sid)["capture_started_at"]
    assert fail_overdue_captures(repo, 600, now=started + 700) == []
    assert repo.get_session(sid)["state"] == "uploaded"


def test_an_overdue_capture_is_failed_only_after_its_take_and_the_grace(tmp_path):
    repo = Repository.from_config(SqliteDatabase(path=tmp_path / "b.db"))
    sid = capturing_session(repo)  # take_s 15
    started = repo.get_session(sid)["capture_started_at"]
    assert (
        dispatch.fail_overdue_captures(repo, 600, now=started + 610) == []
    )  # 15 + 600 not yet over
    assert repo.get_session(sid)["state"] == "capturing"
    assert dispatch.fail_overdue_captures(repo, 600, now=started + 616) == [sid]


def test_an_overdue_capture_names_only_the_cameras_whose_take_is_missing(tmp_path):
    repo = Repository.from_config(SqliteDatabase(path=tmp_path / "b.db"))
    sid = capturing_session(repo)  # cam0, cam1
    repo.open_take(sid, "cam0", fps=120.0)
    repo.mark_take_uploaded(sid, "cam0")
    started = repo.get_session(sid)["capture_started_at"]
    assert dispatch.fail_overdue_captures(repo, 600, now=started + 700) == [sid]
    reason = repo.get_session(sid)["failure_reason"]
    assert "uploading from cam1 within" in reason and "cam0" not in reason
