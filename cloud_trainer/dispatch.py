"""Putting training jobs on the queue, without losing one when a process dies.

A job row is created (idempotently, one per session) before it is published,
and marked ``published_at`` after. ``publish_pending`` creates the job of an
``uploaded`` session that has none and re-publishes queued rows without the
mark. ``booth serve`` runs it when it starts and then every minute, so neither
a crash anywhere between the session's upload and the publish nor a queue that
refused the publish (an outage) leaves the session stuck in ``uploaded``. A
worker that hands a job back (``requeue_job``) clears the mark: if its own
message is gone (its lease had lapsed), the next sweep publishes the job again.
A crash between publish and mark publishes twice; workers ignore a job that is
running elsewhere or has ended, and the queue keeps one message per job where it
can (SQLite).
``republish_stalled`` (run by ``booth serve`` every minute) does the same for a
running job whose worker stopped beating and whose message is gone.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)


def enqueue_training(repo: Any, queue: Any, session_id: str) -> str:
    job_id = repo.create_job(session_id)
    _publish(repo, queue, job_id, session_id)
    log.info("training job queued", extra={"session_id": session_id, "job_id": job_id})
    return job_id


def _publish(repo: Any, queue: Any, job_id: str, session_id: str, at: float | None = None) -> None:
    """Put the job on the queue, then mark its row published (see the module doc)."""
    queue.publish(job_id, {"session_id": session_id})
    repo.mark_job_published(job_id, at=at)


def publish_pending(repo: Any, queue: Any, settle_s: float = 0.0, now: float | None = None) -> int:
    """Queue what a crash or a queue outage left unqueued; returns how many were published.

    That is: uploaded sessions without a job, and queued jobs not marked published.
    ``settle_s`` leaves alone what changed less than that long ago (the upload hook of
    this very process may be publishing it right now); 0 at start-up, when nothing is.
    """
    from sqlalchemy import select

    from cloud_trainer.repository.schema import jobs, sessions
    from cloud_trainer.session import State

    now = time.time() if now is None else now
    before = now - settle_s
    with repo.engine.connect() as conn:
        orphans = [
            r.id
            for r in conn.execute(
                select(sessions.c.id)
                .outerjoin(jobs, jobs.c.session_id == sessions.c.id)
                .where(
                    sessions.c.state == State.UPLOADED.value,
                    jobs.c.id.is_(None),
                    sessions.c.updated_at <= before,
                )
            )
        ]
    for session_id in orphans:
        log.warning("session %s was uploaded but never queued; queueing it now", session_id)
        enqueue_training(repo, queue, session_id)
    pending = repo.unpublished_jobs(quiet_since=before)
    for job in pending:
        _publish(repo, queue, job["id"], job["session_id"])
    if pending:
        log.warning("published %d job(s) that had not reached the queue", len(pending))
    return len(orphans) + len(pending)


def republish_stalled(repo: Any, queue: Any, quiet_s: float, now: float | None = None) -> int:
    """Queue again the running jobs nobody has beaten for ``quiet_s`` (nor re-queued since).

    Their worker died. Usually the queue delivers the job again by itself; this is for
    when it cannot: the delivery was acknowledged as a duplicate while that worker still
    lived, or the message was lost. A job published twice is harmless (the second
    delivery finds it running or finished), and ``published_at`` keeps this to once per
    ``quiet_s``.
    """
    now = time.time() if now is None else now
    stalled = [
        j
        for j in repo.stalled_jobs(quiet_s, now)
        if j["published_at"] is None or j["published_at"] < now - quiet_s
    ]
    for job in stalled:
        log.warning(
            "job %s of session %s has had no worker for %g s (last: %s); queueing it again",
            job["id"],
            job["session_id"],
            quiet_s,
            job["worker"] or "none",
        )
        _publish(repo, queue, job["id"], job["session_id"], at=now)
    return len(stalled)


def fail_overdue_captures(repo: Any, take_s_grace: float, now: float | None = None) -> list[str]:
    """Fail sessions still ``capturing`` ``take_s + take_s_grace`` seconds after they started.

    The reason names the cameras whose take never completed, so staff know which board to check.
    """
    import time

    from sqlalchemy import select

    from cloud_trainer.repository.schema import sessions
    from cloud_trainer.session import State

    now = time.time() if now is None else now
    with repo.engine.connect() as conn:
        rows = conn.execute(
            select(
                sessions.c.id, sessions.c.take_s, sessions.c.capture_started_at, sessions.c.cameras
            ).where(sessions.c.state == State.CAPTURING.value)
        ).all()
    failed = []
    for r in rows:
        started = r.capture_started_at or now
        if now - started < r.take_s + take_s_grace:
            continue
        missing = sorted(set(r.cameras or []) - repo.uploaded_cameras(r.id)) or ["(unknown)"]
        reason = (
            f"the take never finished uploading from {', '.join(missing)} "
            f"within {take_s_grace:.0f} s; check those boards, then start again"
        )
        # Only if still capturing: the upload may have completed since the read above.
        if repo.fail(r.id, reason, only_from=frozenset({State.CAPTURING})):
            log.warning("session %s failed: %s", r.id, reason)
            failed.append(r.id)
    return failed
