"""Training jobs: one per session, with the progress the tablet shows.

A job moves ``queued -> running -> done | failed``; a worker that picks up a
redelivered job calls ``start_job`` again (``running -> running``, attempts + 1).
``done`` and ``failed`` are final until staff ``requeue_job`` it. The queue
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

from sqlalchemy import select, update

from cloud_trainer.repository.schema import jobs, sessions
from cloud_trainer.repository.sessions import SessionNotFound, new_id
from edge_agent.errors import BoothError


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


class JobsRepo:
    engine: Any

    def create_job(self, session_id: str) -> str:
        """The session's job id, creating the job (queued) if it has none. Idempotent."""
        now = time.time()
        with self.engine.begin() as conn:
            if (
                conn.execute(select(sessions.c.id).where(sessions.c.id == session_id)).first()
                is None
            ):
                raise SessionNotFound(f"unknown session {session_id}")
            row = conn.execute(select(jobs.c.id).where(jobs.c.session_id == session_id)).first()
            if row is not None:
                return row.id
            job_id = new_id()
            conn.execute(
                jobs.insert().values(
                    id=job_id,
                    session_id=session_id,
                    state=JobState.QUEUED.value,
                    attempts=0,
                    step=0,
                    metrics={},
                    stage_seconds={},
                    created_at=now,
                )
            )
        return job_id

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

    def start_job(self, job_id: str, worker: str) -> dict[str, Any]:
        """Claim the job for ``worker`` (attempts + 1). Raises JobFinished if it already ended."""
        now = time.time()
        with self.engine.begin() as conn:
            row = self._locked(conn, job_id, jobs.c.state, jobs.c.started_at)
            if JobState(row.state) in FINISHED:
                raise JobFinished(f"job {job_id} is already {row.state}")
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
        """Set the given fields; ``metrics`` and ``stage_seconds`` merge into what is stored."""
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
                values["stage_seconds"] = {**(row.stage_seconds or {}), **stage_seconds}
            if values:
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))

    def finish_job(
        self, job_id: str, *, model_key: str | None = None, metrics: dict[str, Any] | None = None
    ) -> None:
        """Mark the job done (its model exported), merging final metrics (scores)."""
        self._end(job_id, JobState.DONE, model_key=model_key, metrics=metrics, error=None)

    def fail_job(self, job_id: str, error: str) -> None:
        """Mark the job failed with a reason a person can read."""
        self._end(job_id, JobState.FAILED, error=error or "unknown failure")

    def mark_job_published(self, job_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(published_at=time.time()))

    def unpublished_jobs(self) -> list[dict[str, Any]]:
        """Queued jobs that never reached the queue (their publisher died in between)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(jobs.c.id, jobs.c.session_id).where(
                    jobs.c.state == JobState.QUEUED.value, jobs.c.published_at.is_(None)
                )
            )
            return [dict(r._mapping) for r in rows]

    def requeue_job(self, job_id: str) -> None:
        """Staff retry: back to queued. Attempts and the last step are kept (it resumes)."""
        with self.engine.begin() as conn:
            self._locked(conn, job_id, jobs.c.state)
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(state=JobState.QUEUED.value, error=None, finished_at=None, worker=None)
            )

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
    ) -> None:
        with self.engine.begin() as conn:
            row = self._locked(conn, job_id, jobs.c.metrics)
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
