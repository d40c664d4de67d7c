"""A crash between upload and publish delays a training job; it never loses one."""

from __future__ import annotations

import transport_helpers as th

from cloud_trainer.config import SqliteDatabase, SqliteQueue
from cloud_trainer.dispatch import enqueue_training, publish_pending
from cloud_trainer.queue import create_job_queue
from cloud_trainer.repository import Repository


def uploaded_session(repo: Repository) -> str:
    sid = th.new_session(repo, booth_id="booth-1")
    repo.transition(sid, "capturing")
    repo.transition(sid, "uploaded")
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
