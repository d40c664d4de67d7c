"""Training jobs: one per session, with the progress the tablet shows.

A job moves ``queued -> running -> done | failed``; a worker that picks up a
redelivered job calls ``start_job`` again (``running -> running``, attempts + 1).
While it runs, its worker beats (``beat_job``, table ``job_beats``): ``start_job``
refuses a job whose worker beat less than ``busy_within_s`` ago (``JobBusy``: a
duplicate delivery while its worker lives), and ``stalled_jobs`` lists running
jobs nobody beats any more (their worker died and their message may be gone).
``done`` and ``failed`` are final (a later finish or failure leaves them as they
are) until ``requeue_job`` puts the job back. The queue
carries only the job id; this table is the truth about what the job has done,
which is what lets a worker skip a redelivered job that already finished.

Read-modify-write updates (merging metrics) lock the row (``FOR UPDATE`` on
PostgreSQL; on SQLite the engine serialises writers) so concurrent updates
from a heartbeat and the training loop cannot lose each other's keys.
"""

from __future__ import annotations

import enum
import time
from typing import Any

from sqlalchemy import func, select, update

from cloud_trainer.repository.db import dialect_insert
from cloud_trainer.repository.schema import job_beats, jobs, sessions
from cloud_trainer.repository.sessions import SessionNotFound, new_id
from edge_agent.errors import BoothError

# When a job's worker last said it lives: its last beat, or its claim before any. Select
# it from JOBS_WITH_BEATS (the tablet shows a quiet trainer, /metrics the quietest).
LAST_BEAT = func.coalesce(job_beats.c.beat_at, jobs.c.started_at)
JOBS_WITH_BEATS = jobs.outerjoin(job_beats, job_beats.c.job_id == jobs.c.id)


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


FINISHED = frozenset({JobState.DONE, JobState.FAILED})


class JobNotFound(BoothError):
    pass


class JobFinished(BoothError):
    """The job already ended (a redelivery after done/failed): do not run it again."""


class JobBusy(BoothError):
    """Another worker runs the job and beat recently: this delivery is a duplicate."""


class JobsRepo:
    engine: Any

    def create_job(self, session_id: str) -> str:
        """The session's job id, creating the job (queued) if it has none. Idempotent.

        Two callers at once (two ``booth serve`` sweeping one database) both get the one
        job: the insert does nothing on the session's unique key, and the id is read after.
        """
        now = time.time()
        with self.engine.begin() as conn:
            if (
                conn.execute(select(sessions.c.id).where(sessions.c.id == session_id)).first()
                is None
            ):
                raise SessionNotFound(f"unknown session {session_id}")
            conn.execute(
                dialect_insert(conn, jobs)
                .values(
                    id=new_id(),
                    session_id=session_id,
                    state=JobState.QUEUED.value,
                    attempts=0,
                    step=0,
                    metrics={},
                    stage_seconds={},
                    created_at=now,
                )
                .on_conflict_do_nothing(index_elements=["session_id"])
            )
            return conn.execute(
                select(jobs.c.id).where(jobs.c.session_id == session_id)
            ).scalar_one()

    def get_job(self, job_id: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            raise JobNotFound(f"unknown job {job_id}")
        return dict(row._mapping)

    def job_for_session(self, session_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.session_id == session_id)).first()
        return None if row is None else dict(row._mapping)

    def list_jobs(self, state: JobState | str | None = None) -> list[dict[str, Any]]:
        q = select(jobs).order_by(jobs.c.created_at)
        if state is not None:
            q = q.where(jobs.c.state == JobState(state).value)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def start_job(
        self, job_id: str, worker: str, *, busy_within_s: float | None = None
    ) -> dict[str, Any]:
        """Claim the job for ``worker`` (attempts + 1) and record its first beat.

        Raises JobFinished if it already ended, and JobBusy if ``busy_within_s`` is given
        and another worker runs it and beat less than that many seconds ago.
        """
        now = time.time()
        with self.engine.begin() as conn:
            row = self._locked(conn, job_id, jobs.c.state, jobs.c.started_at)
            if JobState(row.state) in FINISHED:
                raise JobFinished(f"job {job_id} is already {row.state}")
            beat = conn.execute(
                select(job_beats.c.worker, job_beats.c.beat_at).where(job_beats.c.job_id == job_id)
            ).first()
            if (
                busy_within_s is not None
                and row.state == JobState.RUNNING.value
                and beat is not None
                and beat.worker != worker
                and now - beat.beat_at < busy_within_s
            ):
                raise JobBusy(
                    f"job {job_id} is running on {beat.worker} "
                    f"(its last heartbeat {now - beat.beat_at:.0f} s ago)"
                )
            claim = {"worker": worker, "beat_at": now}
            conn.execute(
                dialect_insert(conn, job_beats)
                .values(job_id=job_id, **claim)
                .on_conflict_do_update(index_elements=["job_id"], set_=claim)
            )
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(
                    state=JobState.RUNNING.value,
                    attempts=jobs.c.attempts + 1,
                    worker=worker,
                    started_at=row.started_at or now,
                    error=None,
                )
            )
        return self.get_job(job_id)

    def beat_job(self, job_id: str, worker: str) -> bool:
        """``worker`` still runs the job. False if another worker has claimed it since.

        Raises JobNotFound if the job is gone (its session was deleted).
        """
        with self.engine.begin() as conn:
            n = conn.execute(
                update(job_beats)
                .where(job_beats.c.job_id == job_id, job_beats.c.worker == worker)
                .values(beat_at=time.time())
            ).rowcount
            if n == 0:
                self._locked(conn, job_id, jobs.c.id)  # JobNotFound if the row went
        return n == 1

    def stalled_jobs(self, quiet_s: float, now: float | None = None) -> list[dict[str, Any]]:
        """Running jobs whose worker has not beaten for ``quiet_s``.

        Each as ``{id, session_id, worker, published_at}``. Quiet is measured from
        ``LAST_BEAT``, as the tablet and /metrics measure it: a job with no beat row (one
        claimed by a version that did not beat) counts from when it started.
        """
        now = time.time() if now is None else now
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(jobs.c.id, jobs.c.session_id, jobs.c.worker, jobs.c.published_at)
                .select_from(JOBS_WITH_BEATS)
                .where(
                    jobs.c.state == JobState.RUNNING.value,
                    LAST_BEAT.is_(None) | (LAST_BEAT < now - quiet_s),  # noqa: SIM300 (a column)
                )
            )
            return [dict(r._mapping) for r in rows]

    def update_job_progress(
        self,
        job_id: str,
        *,
        stage: str | None = None,
        step: int | None = None,
        total_steps: int | None = None,
        eta_s: float | None = None,
        metrics: dict[str, Any] | None = None,
        stage_seconds: dict[str, float] | None = None,
    ) -> None:
        """Set the given fields. ``metrics`` merges into what is stored; ``stage_seconds``
        adds to it (each attempt at a job reports the seconds it spent)."""
        with self.engine.begin() as conn:
            row = self._locked(conn, job_id, jobs.c.metrics, jobs.c.stage_seconds)
            values: dict[str, Any] = {
                k: v
                for k, v in {
                    "stage": stage,
                    "step": step,
                    "total_steps": total_steps,
                    "eta_s": eta_s,
                }.items()
                if v is not None
            }
            if metrics:
                values["metrics"] = {**(row.metrics or {}), **metrics}
            if stage_seconds:
                total = dict(row.stage_seconds or {})
                for stage, seconds in stage_seconds.items():
                    total[stage] = float(total.get(stage, 0.0)) + float(seconds)
                values["stage_seconds"] = total
            if values:
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))

    def finish_job(
        self, job_id: str, *, model_key: str | None = None, metrics: dict[str, Any] | None = None
    ) -> bool:
        """Mark the job done (its model exported), merging final metrics (scores)."""
        return self._end(job_id, JobState.DONE, model_key=model_key, metrics=metrics, error=None)

    def fail_job(self, job_id: str, error: str, worker: str | None = None) -> bool:
        """Mark the job failed with a reason a person can read. True if this call did.

        ``worker``: only while the job is that worker's (a worker that lost the job to
        another must not fail the run that other worker is doing).
        """
        return self._end(job_id, JobState.FAILED, error=error or "unknown failure", worker=worker)

    def mark_job_published(self, job_id: str, at: float | None = None) -> None:
        at = time.time() if at is None else at
        with self.engine.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(published_at=at))

    def unpublished_jobs(self, quiet_since: float | None = None) -> list[dict[str, Any]]:
        """Queued jobs not on the queue: their publisher died, the queue refused the
        publish, or a worker handed the job back (``requeue_job``).

        ``quiet_since``: only those created, and last beaten, no later than that time.
        """
        q = select(jobs.c.id, jobs.c.session_id).where(
            jobs.c.state == JobState.QUEUED.value, jobs.c.published_at.is_(None)
        )
        if quiet_since is not None:
            q = q.outerjoin(job_beats, job_beats.c.job_id == jobs.c.id).where(
                jobs.c.created_at <= quiet_since,
                job_beats.c.beat_at.is_(None) | (job_beats.c.beat_at <= quiet_since),
            )
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def requeue_job(self, job_id: str, worker: str | None = None) -> bool:
        """Back to queued; attempts and the last step are kept (it resumes). True if done.

        ``worker``: a worker handing back a job it ran, which happens only while the job
        is still running as that worker's (another may have claimed it since: then the
        row is theirs, and False). The job is left unpublished: the worker puts its own
        message back, and should that message be gone (its lease had lapsed), the
        pending-job sweep publishes the job again.
        """
        with self.engine.begin() as conn:
            row = self._locked(conn, job_id, jobs.c.state, jobs.c.worker)
            if worker is not None and (row.state, row.worker) != (JobState.RUNNING.value, worker):
                return False
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(
                    state=JobState.QUEUED.value,
                    error=None,
                    finished_at=None,
                    worker=None,
                    published_at=None,
                )
            )
        return True

    # ---- helpers ----------------------------------------------------------------------

    def _locked(self, conn, job_id: str, *columns):
        row = conn.execute(select(*columns).where(jobs.c.id == job_id).with_for_update()).first()
        if row is None:
            raise JobNotFound(f"unknown job {job_id}")
        return row

    def _end(
        self,
        job_id: str,
        state: JobState,
        *,
        error: str | None,
        model_key: str | None = None,
        metrics: dict[str, Any] | None = None,
        worker: str | None = None,
    ) -> bool:
        with self.engine.begin() as conn:
            row = self._locked(conn, job_id, jobs.c.metrics, jobs.c.state, jobs.c.worker)
            if JobState(row.state) in FINISHED:
                return False  # final: a late (or stale) report does not undo the outcome
            if worker is not None and row.worker != worker:
                return False
            values: dict[str, Any] = {
                "state": state.value,
                "error": error,
                "finished_at": time.time(),
            }
            if model_key is not None:
                values["model_key"] = model_key
            if metrics:
                values["metrics"] = {**(row.metrics or {}), **metrics}
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))
        return True
