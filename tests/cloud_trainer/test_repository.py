"""The metadata repository: every sessions and jobs operation, on SQLite and on PostgreSQL.

Schema management is ``metadata.create_all`` at engine creation (see
``cloud_trainer.repository.schema``); each test gets a fresh SQLite file or a
fresh PostgreSQL schema from the ``db_config`` fixture.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import transport_helpers as th
from sqlalchemy import delete, event, func, insert, select, update

from cloud_trainer.repository import Repository, SessionNotFound
from cloud_trainer.repository.jobs import JobBusy, JobFinished, JobNotFound, JobState
from cloud_trainer.repository.schema import (
    attendees,
    frames,
    job_beats,
    jobs,
    links,
    outbox,
    poses,
    session_events,
    takes,
)
from cloud_trainer.session import InvalidTransition, State
from edge_agent.errors import BadInput, BoothError


@pytest.fixture
def repo(db_config):
    r = Repository.from_config(db_config)
    yield r
    r.close()


def _new_session(repo: Repository, **overrides) -> str:
    fields = {
        "booth_id": "booth-1",
        "name": "Ada Lovelace",
        "email": "ada@example.com",
        "consent": True,
        "reference_name": "salsa",
        "take_s": 15.0,
        "cameras": ["cam0", "cam1"],
        **overrides,
    }
    return repo.create_session(**fields)


def _outbox_sent_row(session_id: str, at: float) -> dict:
    """An outbox row for a sent email, as a delivery leaves one."""
    return {
        "message_id": "<m1@booth>",
        "session_id": session_id,
        "to_addr": "ada@example.com",
        "subject": "your dance",
        "body_text": "t",
        "body_html": "h",
        "state": "sent",
        "next_attempt_at": at,
        "created_at": at,
    }


def _count(repo: Repository, table, **where) -> int:
    q = select(func.count()).select_from(table)
    for column, value in where.items():
        q = q.where(table.c[column] == value)
    with repo.engine.connect() as conn:
        return conn.execute(q).scalar_one()


def _walk(repo: Repository, session_id: str, *states: State) -> None:
    for state in states:
        repo.transition(session_id, state)


# ---- sessions and attendees ----------------------------------------------------------------


def test_create_session_with_consent_stores_attendee_and_session(repo):
    sid = _new_session(repo, reference_version=2)
    s = repo.get_session(sid)
    assert s["state"] == "created"
    assert (s["name"], s["email"], s["booth_id"]) == ("Ada Lovelace", "ada@example.com", "booth-1")
    assert (s["reference_name"], s["reference_version"], s["take_s"]) == ("salsa", 2, 15.0)
    assert s["cameras"] == ["cam0", "cam1"]
    assert s["progress"] == {}
    with repo.engine.connect() as conn:
        attendee = conn.execute(select(attendees).where(attendees.c.id == s["attendee_id"])).one()
    assert attendee.consent is True and attendee.consent_at is not None
    assert [(e["from_state"], e["to_state"]) for e in repo.session_events(sid)] == [
        (None, "created")
    ]


def test_create_session_without_consent_is_refused_and_stores_nothing(repo):
    with pytest.raises(BadInput, match="consent"):
        _new_session(repo, consent=False)
    assert _count(repo, attendees) == 0
    assert repo.list_sessions() == []


def test_unknown_session_raises_session_not_found(repo):
    with pytest.raises(SessionNotFound):
        repo.get_session("0" * 32)
    with pytest.raises(SessionNotFound):
        repo.transition("0" * 32, State.CAPTURING)
    with pytest.raises(SessionNotFound):
        repo.set_progress("0" * 32, stage="training")
    with pytest.raises(SessionNotFound):
        repo.update_session("0" * 32, video_key="x")


def test_list_sessions_filters_by_booth_and_time_newest_first(repo):
    first = _new_session(repo, booth_id="booth-1")
    time.sleep(0.01)  # distinct created_at, the sort key
    second = _new_session(repo, booth_id="booth-1")
    other = _new_session(repo, booth_id="booth-2")
    assert [s["id"] for s in repo.list_sessions(booth_id="booth-1")] == [second, first]
    assert [s["id"] for s in repo.list_sessions(booth_id="booth-2")] == [other]
    since = repo.get_session(second)["created_at"]
    assert {s["id"] for s in repo.list_sessions(since=since)} == {second, other}


def test_the_whole_happy_path_is_allowed_and_recorded(repo):
    sid = _new_session(repo)
    _walk(
        repo,
        sid,
        State.CAPTURING,
        State.UPLOADED,
        State.TRAINING,
        State.TRAINING,  # a retried job goes back through training
        State.RENDERING,
        State.DELIVERED,
    )
    s = repo.get_session(sid)
    assert s["state"] == "delivered"
    assert s["capture_started_at"] <= s["uploaded_at"] <= s["delivered_at"]
    assert [e["to_state"] for e in repo.session_events(sid)] == [
        "created",
        "capturing",
        "uploaded",
        "training",
        "training",
        "rendering",
        "delivered",
    ]


@pytest.mark.parametrize(
    ("path", "refused"),
    [
        ((), State.UPLOADED),
        ((), State.DELIVERED),
        ((State.CAPTURING,), State.TRAINING),
        ((State.CAPTURING, State.UPLOADED), State.CAPTURING),
        ((State.CAPTURING, State.UPLOADED, State.TRAINING, State.RENDERING), State.UPLOADED),
    ],
)
def test_transitions_the_machine_forbids_are_refused_and_change_nothing(repo, path, refused):
    sid = _new_session(repo)
    _walk(repo, sid, *path)
    before = repo.get_session(sid)
    with pytest.raises(InvalidTransition):
        repo.transition(sid, refused)
    after = repo.get_session(sid)
    assert after["state"] == before["state"]
    assert len(repo.session_events(sid)) == len(path) + 1


def test_delivered_is_final(repo):
    sid = _new_session(repo)
    _walk(repo, sid, State.CAPTURING, State.UPLOADED, State.TRAINING, State.RENDERING)
    repo.transition(sid, State.DELIVERED)
    for target in State:
        with pytest.raises(InvalidTransition):
            repo.transition(sid, target)


def test_failure_keeps_its_reason_and_staff_can_recapture(repo):
    sid = _new_session(repo)
    _walk(repo, sid, State.CAPTURING)
    repo.fail(sid, "camera cam1 disconnected")
    s = repo.get_session(sid)
    assert (s["state"], s["failure_reason"]) == ("failed", "camera cam1 disconnected")
    repo.transition(sid, State.CAPTURING)
    s = repo.get_session(sid)
    assert (s["state"], s["failure_reason"]) == ("capturing", None)


def test_a_late_failure_does_not_undo_a_delivery(repo):
    sid = _new_session(repo)
    _walk(
        repo, sid, State.CAPTURING, State.UPLOADED, State.TRAINING, State.RENDERING, State.DELIVERED
    )
    repo.fail(sid, "a late worker error")
    s = repo.get_session(sid)
    assert (s["state"], s["failure_reason"]) == ("delivered", None)


def test_racing_transitions_let_exactly_one_caller_win(repo):
    """Two threads move created -> capturing at the same moment: one wins, one is refused.

    A barrier after each thread's read of the state forces the worst interleaving
    (both read "created" before either writes) wherever the database lets both
    reads through; where the read locks the row, the second reader waits instead.
    """
    sid = _new_session(repo)
    both_read = threading.Barrier(2)

    @event.listens_for(repo.engine, "after_cursor_execute")
    def _pause_after_state_read(conn, cursor, statement, params, context, executemany):
        if statement.lstrip().upper().startswith("SELECT SESSIONS.STATE"):
            # Broken when the other reader is blocked on our row lock: that is the point.
            with contextlib.suppress(threading.BrokenBarrierError):
                both_read.wait(timeout=1)

    outcomes: list[str] = []

    def move() -> None:
        try:
            repo.transition(sid, State.CAPTURING)
            outcomes.append("won")
        except InvalidTransition:
            outcomes.append("refused")

    threads = [threading.Thread(target=move) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    event.remove(repo.engine, "after_cursor_execute", _pause_after_state_read)
    assert sorted(outcomes) == ["refused", "won"]
    assert [e["to_state"] for e in repo.session_events(sid)] == ["created", "capturing"]


def test_progress_merges_keys(repo):
    sid = _new_session(repo)
    repo.set_progress(sid, stage="training", step=10, total_steps=100)
    repo.set_progress(sid, step=20, eta_s=30.5, loss={"g": 1.5, "l1": 0.25})
    assert repo.get_session(sid)["progress"] == {
        "stage": "training",
        "step": 20,
        "total_steps": 100,
        "eta_s": 30.5,
        "loss": {"g": 1.5, "l1": 0.25},
    }


def test_concurrent_progress_updates_lose_no_keys(repo):
    """The trainer and the renderer report at once: neither overwrites the other's keys."""
    sid = _new_session(repo)
    both_read = threading.Barrier(2)

    @event.listens_for(repo.engine, "after_cursor_execute")
    def _pause_after_progress_read(conn, cursor, statement, params, context, executemany):
        if statement.lstrip().upper().startswith("SELECT SESSIONS.PROGRESS"):
            with contextlib.suppress(threading.BrokenBarrierError):
                both_read.wait(timeout=1)

    threads = [
        threading.Thread(target=repo.set_progress, args=(sid,), kwargs=kw)
        for kw in ({"step": 5}, {"render_frame": 7})
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    event.remove(repo.engine, "after_cursor_execute", _pause_after_progress_read)
    assert repo.get_session(sid)["progress"] == {"step": 5, "render_frame": 7}


def test_update_session_and_attendee_email(repo):
    sid = _new_session(repo)
    repo.update_session(sid, video_key="sessions/x/video/out.mp4", quality={"ssim": 0.5})
    repo.update_attendee_email(sid, "ada@analytical.engine")
    s = repo.get_session(sid)
    assert s["video_key"] == "sessions/x/video/out.mp4"
    assert s["quality"] == {"ssim": 0.5}
    assert s["email"] == "ada@analytical.engine"
    assert s["state"] == "created"


def test_deleting_a_session_removes_every_dependent_row(repo):
    sid = _new_session(repo)
    keep = _new_session(repo, name="Grace Hopper", email="grace@example.com")
    _walk(repo, sid, State.CAPTURING)
    repo.create_job(sid)
    repo.create_job(keep)
    now = time.time()
    with repo.engine.begin() as conn:
        for s in (sid, keep):
            conn.execute(takes.insert().values(session_id=s, camera_id="cam0", updated_at=now))
            conn.execute(
                frames.insert().values(
                    session_id=s,
                    camera_id="cam0",
                    seq=0,
                    capture_ts_ns=1,
                    shard_key=f"sessions/{s}/frames/cam0/shard-00000000.bin",
                    offset=0,
                    length=10,
                    sha256="0" * 64,
                )
            )
            conn.execute(
                poses.insert().values(session_id=s, camera_id="cam0", seq=0, keypoints=b"\0" * 276)
            )
            conn.execute(
                links.insert().values(
                    token_sha256=s * 2, session_id=s, created_at=now, expires_at=now + 60
                )
            )
        conn.execute(outbox.insert().values(**_outbox_sent_row(sid, now)))
    attendee_id = repo.get_session(sid)["attendee_id"]

    repo.delete_session_rows(sid)

    with pytest.raises(SessionNotFound):
        repo.get_session(sid)
    for table in (session_events, takes, frames, poses, links, jobs):
        assert _count(repo, table, session_id=sid) == 0, table.name
        assert _count(repo, table, session_id=keep) >= 1, table.name
    assert _count(repo, attendees, id=attendee_id) == 0
    # The email record survives for the audit trail, no longer tied to the session.
    with repo.engine.connect() as conn:
        assert conn.execute(select(outbox.c.session_id)).scalar_one() is None
    assert repo.get_session(keep)["name"] == "Grace Hopper"


# ---- jobs ------------------------------------------------------------------------------------


def test_create_job_is_one_per_session_and_idempotent(repo):
    sid = _new_session(repo)
    job_id = repo.create_job(sid)
    assert repo.create_job(sid) == job_id
    job = repo.get_job(job_id)
    assert (job["session_id"], job["state"], job["attempts"], job["step"]) == (sid, "queued", 0, 0)
    assert job["metrics"] == {} and job["error"] is None
    assert repo.job_for_session(sid)["id"] == job_id
    assert repo.job_for_session(_new_session(repo)) is None


def test_create_job_for_an_unknown_session_is_refused(repo):
    with pytest.raises(SessionNotFound):
        repo.create_job("0" * 32)


def test_unknown_job_raises_job_not_found(repo):
    with pytest.raises(JobNotFound):
        repo.get_job("missing")
    with pytest.raises(JobNotFound):
        repo.start_job("missing", "w1")
    with pytest.raises(JobNotFound):
        repo.update_job_progress("missing", step=1)
    with pytest.raises(JobNotFound):
        repo.fail_job("missing", "x")


def test_job_lifecycle_records_progress_and_result(repo):
    job_id = repo.create_job(_new_session(repo))
    job = repo.start_job(job_id, "worker-a")
    assert (job["state"], job["attempts"], job["worker"]) == ("running", 1, "worker-a")
    started = job["started_at"]
    assert started is not None

    repo.update_job_progress(job_id, stage="loading", stage_seconds={"loading": 1.5})
    repo.update_job_progress(
        job_id, stage="training", step=50, total_steps=200, eta_s=90.0, metrics={"loss_g": [1.0]}
    )
    repo.update_job_progress(job_id, step=100, metrics={"loss_l1": [0.5]})
    repo.update_job_progress(job_id, stage_seconds={"training": 60.0})
    job = repo.get_job(job_id)
    assert (job["stage"], job["step"], job["total_steps"], job["eta_s"]) == (
        "training",
        100,
        200,
        90.0,
    )
    assert job["metrics"] == {"loss_g": [1.0], "loss_l1": [0.5]}
    assert job["stage_seconds"] == {"loading": 1.5, "training": 60.0}
    # A second attempt's seconds add to the first's.
    repo.update_job_progress(job_id, stage_seconds={"training": 30.0})
    assert repo.get_job(job_id)["stage_seconds"] == {"loading": 1.5, "training": 90.0}

    repo.finish_job(job_id, model_key="sessions/s/model/generator", metrics={"ssim": 0.61})
    job = repo.get_job(job_id)
    assert (job["state"], job["model_key"], job["error"]) == (
        "done",
        "sessions/s/model/generator",
        None,
    )
    assert job["metrics"] == {"loss_g": [1.0], "loss_l1": [0.5], "ssim": 0.61}
    assert job["finished_at"] >= started
    assert [j["id"] for j in repo.list_jobs(JobState.DONE)] == [job_id]
    assert repo.list_jobs("running") == []


def test_a_redelivered_job_counts_attempts_and_keeps_its_progress(repo):
    job_id = repo.create_job(_new_session(repo))
    repo.start_job(job_id, "worker-a")
    repo.update_job_progress(job_id, step=40)
    job = repo.start_job(job_id, "worker-b")  # worker-a died; the queue redelivered
    assert (job["state"], job["attempts"], job["worker"], job["step"]) == (
        "running",
        2,
        "worker-b",
        40,
    )


def test_a_job_whose_worker_beats_is_busy_for_a_second_worker_until_the_beats_stop(repo):
    job_id = repo.create_job(_new_session(repo))
    t0 = time.time()
    repo.start_job(job_id, "worker-a", busy_within_s=60)
    assert repo.beat_job(job_id, "worker-a")
    with pytest.raises(JobBusy, match="running on worker-a"):
        repo.start_job(job_id, "worker-b", busy_within_s=60)  # a duplicate delivery
    assert repo.get_job(job_id)["attempts"] == 1
    assert repo.stalled_jobs(60) == []
    # worker-a stops beating (it died): after the quiet time the job is stalled, and
    # a worker may claim it; worker-a's next beat then learns it lost the job.
    assert [j["id"] for j in repo.stalled_jobs(60, now=t0 + 120)] == [job_id]
    with repo.engine.begin() as conn:
        conn.execute(update(job_beats).values(beat_at=t0 - 120))
    job = repo.start_job(job_id, "worker-b", busy_within_s=60)
    assert (job["worker"], job["attempts"]) == ("worker-b", 2)
    assert not repo.beat_job(job_id, "worker-a")
    assert repo.beat_job(job_id, "worker-b")
    assert repo.stalled_jobs(60) == []
    repo.finish_job(job_id)
    assert repo.stalled_jobs(0, now=t0 + 1e6) == []  # only running jobs stall
    with pytest.raises(JobNotFound):
        repo.beat_job("0" * 32, "worker-b")


def test_a_running_job_without_a_beat_row_is_quiet_from_when_it_started(repo):
    # A job claimed by a version that did not beat: the sweep, the tablet and /metrics
    # all count its quiet time from started_at (LAST_BEAT), not from forever.
    job_id = repo.create_job(_new_session(repo))
    repo.start_job(job_id, "worker-a")
    started = repo.get_job(job_id)["started_at"]
    with repo.engine.begin() as conn:
        conn.execute(delete(job_beats))
    assert repo.stalled_jobs(60, now=started + 30) == []
    assert [j["id"] for j in repo.stalled_jobs(60, now=started + 90)] == [job_id]


def test_failed_job_keeps_its_error_and_cannot_be_started_until_requeued(repo):
    job_id = repo.create_job(_new_session(repo))
    repo.start_job(job_id, "worker-a")
    repo.fail_job(job_id, "the take has no detected person")
    job = repo.get_job(job_id)
    assert (job["state"], job["error"]) == ("failed", "the take has no detected person")
    assert job["finished_at"] is not None
    with pytest.raises(JobFinished):
        repo.start_job(job_id, "worker-b")

    repo.requeue_job(job_id)
    job = repo.get_job(job_id)
    assert (job["state"], job["error"], job["finished_at"]) == ("queued", None, None)
    assert repo.start_job(job_id, "worker-b")["attempts"] == 2


def test_done_job_cannot_be_started_again(repo):
    job_id = repo.create_job(_new_session(repo))
    repo.start_job(job_id, "worker-a")
    repo.finish_job(job_id)
    with pytest.raises(JobFinished):
        repo.start_job(job_id, "worker-b")
    assert repo.get_job(job_id)["attempts"] == 1


def test_concurrent_metric_updates_lose_no_keys(repo):
    """Two writers merge metrics at once; the row lock makes the second see the first's keys."""
    job_id = repo.create_job(_new_session(repo))
    repo.start_job(job_id, "worker-a")
    both_read = threading.Barrier(2)

    @event.listens_for(repo.engine, "after_cursor_execute")
    def _pause_after_metrics_read(conn, cursor, statement, params, context, executemany):
        if statement.lstrip().upper().startswith("SELECT JOBS.METRICS"):
            with contextlib.suppress(threading.BrokenBarrierError):
                both_read.wait(timeout=1)

    threads = [
        threading.Thread(
            target=repo.update_job_progress, args=(job_id,), kwargs={"metrics": {k: 1}}
        )
        for k in ("loss_g", "loss_l1")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    event.remove(repo.engine, "after_cursor_execute", _pause_after_metrics_read)
    assert repo.get_job(job_id)["metrics"] == {"loss_g": 1, "loss_l1": 1}


# ---- the metrics' counters -----------------------------------------------------------------


def _frame_rows(seqs) -> list[dict]:
    return [
        {
            "seq": s,
            "capture_ts_ns": 1_700_000_000_000_000_000 + s,
            "shard_key": "shard",
            "offset": s * 10,
            "length": 10,
            "sha256": f"{s:064x}",
        }
        for s in seqs
    ]


def _store_frames(repo: Repository, sid: str, camera: str, n: int) -> None:
    repo.open_take(sid, camera)
    repo.commit_shard(
        sid, camera, _frame_rows(range(n)), [], durable_seq=n - 1, pose_durable_seq=-1
    )


def _sent_email(repo: Repository, sid: str, message_id: str) -> int:
    email = {
        "message_id": message_id,
        "to_addr": "ada@example.com",
        "subject": "your dance",
        "body_text": "t",
        "body_html": "h",
    }
    row_id = repo.enqueue_email(sid, email=email)
    assert [r["id"] for r in repo.claim_emails(time.time(), lease_s=60)] == [row_id]
    assert repo.mark_email_sent(row_id, time.time())
    return row_id


def _delete_like_the_front_desk(repo: Repository, sid: str) -> None:
    with repo.engine.begin() as conn:  # FrontDesk.delete removes the outbox rows itself
        conn.execute(outbox.delete().where(outbox.c.session_id == sid))
    repo.delete_session_rows(sid)


def test_counters_do_not_drop_when_a_session_is_deleted(repo):
    sid = _new_session(repo)
    keep = _new_session(repo, name="Grace Hopper", email="grace@example.com")
    _store_frames(repo, sid, "cam0", 7)
    _store_frames(repo, sid, "cam1", 5)
    _store_frames(repo, keep, "cam0", 3)
    job_id = repo.create_job(sid)
    repo.update_job_progress(job_id, stage_seconds={"training": 60.0, "rendering": 4.5})
    repo.update_job_progress(repo.create_job(keep), stage_seconds={"training": 30.0})
    _sent_email(repo, sid, "<m1@booth>")
    before = repo.counter_values()
    assert before == {
        "frames_ingested": {"cam0": 10.0, "cam1": 5.0},
        "job_stage_seconds": {"training": 90.0, "rendering": 4.5},
        "job_stage_runs": {"training": 2.0, "rendering": 1.0},
        "emails": {"sent": 1.0},
    }

    _delete_like_the_front_desk(repo, sid)

    assert _count(repo, takes, session_id=sid) == _count(repo, jobs, session_id=sid) == 0
    assert _count(repo, outbox) == 0
    assert repo.counter_values() == before
    # They keep counting on top of what the deleted session counted.
    repo.commit_shard(
        keep, "cam0", _frame_rows(range(3, 5)), [], durable_seq=4, pose_durable_seq=-1
    )
    assert repo.counter_values()["frames_ingested"] == {"cam0": 12.0, "cam1": 5.0}
    _delete_like_the_front_desk(repo, keep)
    assert repo.counter_values() == {**before, "frames_ingested": {"cam0": 12.0, "cam1": 5.0}}


def test_an_email_outcome_is_counted_once_when_it_is_recorded(repo):
    sid = _new_session(repo)
    row_id = _sent_email(repo, sid, "<m1@booth>")
    assert not repo.mark_email_sent(row_id, time.time())  # a second sender lost the race
    email = {"to_addr": "x@example.com", "subject": "s", "body_text": "t", "body_html": "h"}
    for n, bounced in enumerate((True, False, False)):
        row = repo.enqueue_email(sid, email={**email, "message_id": f"<b{n}@booth>"})
        repo.claim_emails(time.time(), lease_s=60)
        assert repo.mark_email_failed(row, "550 no such user", bounced=bounced)
    retry = repo.enqueue_email(sid, email={**email, "message_id": "<r@booth>"})
    repo.claim_emails(time.time(), lease_s=60)
    assert repo.mark_email_retry(retry, "421 try later", time.time() + 60)  # not an outcome
    assert repo.counter_values()["emails"] == {"sent": 1.0, "bounced": 1.0, "failed": 2.0}


def test_a_deleted_session_leaves_a_tombstone_that_tells_deleted_from_unknown(repo):
    sid = _new_session(repo)
    other = _new_session(repo, name="Grace Hopper", email="grace@example.com")
    assert not repo.session_deleted(sid)
    _delete_like_the_front_desk(repo, sid)
    assert repo.session_deleted(sid)
    assert not repo.session_deleted(other) and not repo.session_deleted("never-existed")
    assert repo.session_booth_and_cameras(sid) is None  # gone, as before


def test_services_starting_together_on_a_fresh_postgres_all_get_the_schema(pg_database_config):
    """The app and the workers start at once on a new database: concurrent CREATE TABLEs
    collided in the catalog (a unique violation), and a service crashed into a restart."""
    barrier, errors, repos = threading.Barrier(6), [], []

    def start() -> None:
        barrier.wait()
        try:
            repos.append(Repository.from_config(pg_database_config))
        except Exception as e:  # noqa: BLE001 - reported by the assert below
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        sid = th.new_session(repos[0], booth_id="b")
        assert repos[-1].get_session(sid)["booth_id"] == "b"  # one schema, seen by all
    finally:
        for r in repos:
            r.close()


def _create_jobs_at_once(repo: Repository, sid: str) -> tuple[list[str], list[BaseException]]:
    both = threading.Barrier(2)
    ids: list[str] = []
    errors: list[BaseException] = []

    def create() -> None:
        both.wait()
        try:
            ids.append(repo.create_job(sid))
        except Exception as e:  # noqa: BLE001 - the test asserts on it
            errors.append(e)

    threads = [threading.Thread(target=create) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ids, errors


def test_two_callers_creating_one_sessions_job_get_the_same_job(repo):
    """Two ``booth serve`` sweeping one database: neither dies on the unique key."""
    sid = _new_session(repo)
    for _ in range(10):
        with repo.engine.begin() as conn:
            conn.execute(jobs.delete())
        ids, errors = _create_jobs_at_once(repo, sid)
        assert errors == []
        assert len(ids) == 2 and ids[0] == ids[1]
        assert _count(repo, jobs, session_id=sid) == 1


def test_a_finished_job_keeps_its_outcome(repo):
    """A stale worker's late failure must not turn a delivered job into a failed one."""
    job_id = repo.create_job(_new_session(repo))
    repo.start_job(job_id, "worker-a")
    assert repo.finish_job(job_id)
    assert not repo.fail_job(job_id, "worker-b gave up")
    job = repo.get_job(job_id)
    assert (job["state"], job["error"]) == ("done", None)


def test_a_handed_back_job_keeps_its_attempts_and_its_last_step(repo):
    """requeue_job: 'attempts and the last step are kept (it resumes)'."""
    job_id = repo.create_job(_new_session(repo))
    repo.start_job(job_id, "worker-a")
    repo.update_job_progress(job_id, stage="training", step=40, total_steps=200)
    assert repo.requeue_job(job_id, worker="worker-a")
    job = repo.get_job(job_id)
    assert (job["state"], job["attempts"], job["step"]) == ("queued", 1, 40)
    job = repo.start_job(job_id, "worker-b")
    assert (job["attempts"], job["step"]) == (2, 40)


def test_only_the_worker_holding_a_job_can_hand_it_back_or_fail_it(repo):
    job_id = repo.create_job(_new_session(repo))
    repo.mark_job_published(job_id)
    repo.start_job(job_id, "worker-a")
    repo.start_job(job_id, "worker-b")  # worker-a's lease lapsed; worker-b took the job
    assert not repo.requeue_job(job_id, worker="worker-a")
    assert not repo.fail_job(job_id, "worker-a crashed", worker="worker-a")
    job = repo.get_job(job_id)
    assert (job["state"], job["worker"]) == ("running", "worker-b")

    assert repo.requeue_job(job_id, worker="worker-b")
    job = repo.get_job(job_id)
    # Handed back and unpublished: if worker-b's own message is gone, the sweep sends one.
    assert (job["state"], job["worker"], job["published_at"]) == ("queued", None, None)
    assert [j["id"] for j in repo.unpublished_jobs()] == [job_id]


def test_unpublished_jobs_leaves_alone_those_that_changed_lately(repo):
    job_id = repo.create_job(_new_session(repo))
    created = repo.get_job(job_id)["created_at"]
    assert repo.unpublished_jobs(quiet_since=created - 1) == []  # its publisher may be at it
    assert [j["id"] for j in repo.unpublished_jobs(quiet_since=created + 1)] == [job_id]
    repo.start_job(job_id, "worker-a")
    assert repo.requeue_job(job_id, worker="worker-a")
    beat = time.time()
    assert repo.unpublished_jobs(quiet_since=beat - 30) == []  # its worker beat just now
    assert [j["id"] for j in repo.unpublished_jobs(quiet_since=beat + 1)] == [job_id]


def test_failing_only_from_a_state_leaves_a_session_that_moved_on(repo):
    sid = _new_session(repo)
    repo.transition(sid, State.CAPTURING)
    repo.transition(sid, State.UPLOADED)
    assert not repo.fail(sid, "overdue", only_from=frozenset({State.CAPTURING}))
    assert repo.get_session(sid)["state"] == "uploaded"
    assert repo.fail(sid, "the worker gave up")
    assert not repo.fail(sid, "again")
    s = repo.get_session(sid)
    assert (s["state"], s["failure_reason"]) == ("failed", "the worker gave up")


def _open_sqlite(path: str, barrier, results) -> None:
    from pathlib import Path

    from cloud_trainer.config import SqliteDatabase

    barrier.wait()
    try:
        Repository.from_config(SqliteDatabase(path=Path(path))).close()
        results.put("ok")
    except Exception as e:  # noqa: BLE001 - the parent asserts on it
        results.put(f"{type(e).__name__}: {e}")


def test_processes_opening_a_new_sqlite_database_together_all_start(tmp_path):
    """``booth serve`` and its workers start at once on a new database (or one that a new
    version adds a table to): none may die on "table already exists" or "locked"."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    for trial in range(3):
        barrier, results = ctx.Barrier(4), ctx.Queue()
        path = str(tmp_path / f"booth-{trial}.db")
        procs = [ctx.Process(target=_open_sqlite, args=(path, barrier, results)) for _ in range(4)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        assert outcomes == ["ok"] * 4, outcomes


def test_a_database_an_older_version_made_gains_the_columns_it_lacks(db_config, caplog):
    """``create_all`` adds tables, not columns: the columns that can be added are added,
    with their defaults on the rows already there, and their indexes."""
    from sqlalchemy import MetaData, Table, inspect

    from cloud_trainer.repository.schema import agents, jobs, outbox, sessions

    repo = Repository.from_config(db_config)
    session_id = _new_session(repo)
    job_id = repo.create_job(session_id)
    repo.upsert_agent("booth-1", "cam0", state="online", last_seen=1.0)
    repo.close()
    engine = Repository.from_config(db_config).engine
    # An outbox before emails belonged to sessions (SQLite cannot drop a foreign key's
    # column, so the older table is made anew).
    older = MetaData()
    sessions.to_metadata(older)
    Table(
        "outbox",
        older,
        *(c._copy() for c in outbox.columns if c.name != "session_id"),
    )
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE outbox")
        older.tables["outbox"].create(conn)
        conn.exec_driver_sql("ALTER TABLE jobs DROP COLUMN published_at")  # nullable
        conn.exec_driver_sql("ALTER TABLE jobs DROP COLUMN stage_seconds")  # JSON, {}
        conn.exec_driver_sql("ALTER TABLE jobs DROP COLUMN attempts")  # integer, 0
        conn.exec_driver_sql("ALTER TABLE agents DROP COLUMN software_version")  # ''
    engine.dispose()

    with caplog.at_level("WARNING", logger="cloud_trainer.repository.db"):
        repo = Repository.from_config(db_config)
    for name in ("jobs.published_at", "jobs.stage_seconds", "outbox.session_id"):
        assert name in caplog.text
    with repo.engine.connect() as conn:
        job = conn.execute(select(jobs)).mappings().one()
        agent = conn.execute(select(agents)).mappings().one()
        outbox_indexes = {i["name"] for i in inspect(conn).get_indexes("outbox")}
    assert job["published_at"] is None
    assert job["stage_seconds"] == {} and job["attempts"] == 0
    assert agent["software_version"] == ""
    assert "ix_outbox_session_id" in outbox_indexes
    # The repository works on it: the added columns take new values.
    repo.update_job_progress(job_id, stage_seconds={"train": 1.5})
    repo.mark_job_published(job_id, at=2.0)
    job = repo.get_job(job_id)
    assert job["stage_seconds"] == {"train": 1.5} and job["published_at"] == 2.0
    # With its foreign key: a deleted session's emails still let go of it.
    with repo.engine.begin() as conn:
        conn.execute(insert(outbox).values(**_outbox_sent_row(session_id, 0.0)))
        conn.execute(delete(sessions).where(sessions.c.id == session_id))
        assert conn.execute(select(outbox.c.session_id)).scalar_one() is None
    repo.close()
    # Once upgraded, there is nothing more to add.
    caplog.clear()
    with caplog.at_level("WARNING", logger="cloud_trainer.repository.db"):
        Repository.from_config(db_config).close()
    assert "older version" not in caplog.text


def test_a_column_no_value_can_be_invented_for_is_refused_by_name(db_config):
    """NOT NULL without a default: say so at start-up, not mid-upload, and change nothing."""
    from sqlalchemy import inspect

    Repository.from_config(db_config).close()
    engine = Repository.from_config(db_config).engine
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE jobs DROP COLUMN published_at")
        conn.exec_driver_sql("ALTER TABLE outbox DROP COLUMN subject")  # NOT NULL, no default
    engine.dispose()
    with pytest.raises(BoothError, match=r"older version of dancebooth and lacks outbox\.subject"):
        Repository.from_config(db_config)
    with engine.connect() as conn:  # the refusal added nothing either
        assert "published_at" not in {c["name"] for c in inspect(conn).get_columns("jobs")}
    engine.dispose()


def test_a_database_error_does_not_carry_attendee_data_into_the_logs(repo):
    from sqlalchemy import insert, select
    from sqlalchemy.exc import IntegrityError

    from cloud_trainer.repository.schema import attendees

    _new_session(repo)
    with repo.engine.connect() as conn:
        row = dict(conn.execute(select(attendees)).mappings().first())
    row["email"] = "private.person@example.org"
    with pytest.raises(IntegrityError) as err, repo.engine.begin() as conn:
        conn.execute(insert(attendees).values(**row))  # the same id again
    assert "private.person@example.org" not in str(err.value)
