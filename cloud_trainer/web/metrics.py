"""Prometheus metrics, read from the metadata store at scrape time.

Ingest, workers and the mail sender run in different processes; the database
is the one place that sees all of them, so the collector derives every number
from it instead of keeping in-process counters that a restart would reset.
The counters come from ``Repository.counter_values``, which keeps them
monotonic when an attendee's data (the rows they were read from) is deleted.
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from cloud_trainer.repository import Repository
from cloud_trainer.repository.counters import (
    EMAILS,
    FRAMES_INGESTED,
    FRAMES_LOST,
    JOB_STAGE_RUNS,
    JOB_STAGE_SECONDS,
)
from cloud_trainer.repository.jobs import JOBS_WITH_BEATS, LAST_BEAT
from cloud_trainer.repository.outbox import FINAL
from cloud_trainer.repository.schema import agents, jobs, outbox, sessions

log = logging.getLogger(__name__)


# An agent counts as online if it reported within this many seconds.
ONLINE_S = 15.0
LIVE_JOB_STATES = ("queued", "running")


class BoothCollector:
    """One booth's numbers (several booths may share a database): ``booth_id`` scopes
    the live gauges; the counters are the database's totals."""

    def __init__(self, repo: Repository, booth_id: str | None = None):
        self.repo = repo
        self.booth_id = booth_id

    def collect(self):
        frames = CounterMetricFamily(
            "booth_frames_ingested", "Frames stored durably by ingest", labels=["camera"]
        )
        lost = CounterMetricFamily(
            "booth_frames_lost",
            "Frames a camera delivered corrupt, stored as empty records so takes complete",
            labels=["camera"],
        )
        drops = GaugeMetricFamily(
            "booth_camera_drops",
            "Frames dropped by each consumer on a camera (last status)",
            labels=["camera", "consumer"],
        )
        online = GaugeMetricFamily("booth_agents_online", f"Agents seen in the last {ONLINE_S:g} s")
        agent_up, seen_age, behind, spool = (
            GaugeMetricFamily(f"booth_agent_{name}", text, labels=["camera"])
            for name, text in (
                ("up", f"1 if the camera's agent reported in the last {ONLINE_S:g} s (alert on 0)"),
                ("last_seen_age_seconds", "Seconds since the camera's agent last reported"),
                (
                    "upload_behind",
                    "1 if the camera's spool is over budget: capture goes on to local MP4 only",
                ),
                ("spool_bytes", "Bytes waiting in the camera's upload spool (last status)"),
            )
        )
        depth = GaugeMetricFamily(
            "booth_queue_depth", "Training jobs waiting or running", labels=["state"]
        )
        oldest_job = GaugeMetricFamily(
            "booth_job_oldest_queued_age_seconds",
            "Age of the oldest job still waiting for a worker (0: none waits)",
        )
        quietest_job = GaugeMetricFamily(
            "booth_job_running_quiet_seconds",
            "Longest a running job's worker has gone without a heartbeat (0: none runs; "
            "a worker beats every few seconds, so minutes mean it died)",
        )
        stage = CounterMetricFamily(
            "booth_job_stage_seconds", "Seconds spent per job stage", labels=["stage"]
        )
        stage_n = CounterMetricFamily(
            "booth_job_stage_runs", "Job stages completed", labels=["stage"]
        )
        emails = CounterMetricFamily(
            "booth_emails",
            "Emails by final outcome (sent, failed, bounced); bounced_later: sent ones whose "
            "failure report came back afterwards",
            labels=["state"],
        )
        # Pending and sending rows come and go: a gauge, not a counter.
        emails_waiting = GaugeMetricFamily(
            "booth_emails_waiting", "Emails not yet sent, by state", labels=["state"]
        )
        oldest_email = GaugeMetricFamily(
            "booth_email_oldest_waiting_age_seconds",
            "Age of the oldest email not yet sent (retries during an SMTP outage show here)",
        )
        by_state = GaugeMetricFamily("booth_sessions", "Sessions by state", labels=["state"])
        db_up = GaugeMetricFamily(
            "booth_database_up", "1 if the metrics could be read from the database"
        )
        # What is true now, read from the live rows (``_gauges``), by name.
        gauges = SimpleNamespace(
            drops=drops,
            online=online,
            agent_up=agent_up,
            seen_age=seen_age,
            behind=behind,
            spool=spool,
            depth=depth,
            oldest_job=oldest_job,
            quietest_job=quietest_job,
            emails_waiting=emails_waiting,
            oldest_email=oldest_email,
            by_state=by_state,
        )
        try:
            counts = self.repo.counter_values()
            for family, name in (
                (frames, FRAMES_INGESTED),
                (lost, FRAMES_LOST),
                (stage, JOB_STAGE_SECONDS),
                (stage_n, JOB_STAGE_RUNS),
                (emails, EMAILS),
            ):
                for label, value in sorted(counts.get(name, {}).items()):
                    family.add_metric([label], value)
            self._gauges(gauges)
            db_up.add_metric([], 1)
        except SQLAlchemyError as e:
            # No samples would silence every threshold alert: say the database is down.
            log.warning("metrics: database unavailable: %s", e)
            db_up.add_metric([], 0)
        yield from (frames, lost, stage, stage_n, emails, *vars(gauges).values(), db_up)

    def _gauges(self, g: SimpleNamespace) -> None:
        """What is true now (live rows): deletions may and should lower these."""
        ours = (lambda c: c == self.booth_id) if self.booth_id else (lambda c: c.is_not(None))
        booth_sessions = select(sessions.c.id).where(ours(sessions.c.booth_id))
        with self.repo.engine.connect() as conn:
            now = time.time()
            n_online = 0
            for row in conn.execute(
                select(agents.c.camera_id, agents.c.status, agents.c.last_seen).where(
                    ours(agents.c.booth_id)
                )
            ):
                status = row.status or {}
                cam = [row.camera_id]
                for consumer in ("capture", "pose", "stream"):
                    g.drops.add_metric(
                        [row.camera_id, consumer],
                        float(status.get(f"{consumer}_dropped", 0) or 0),
                    )
                up = bool(row.last_seen and now - row.last_seen < ONLINE_S)
                n_online += up
                g.agent_up.add_metric(cam, float(up))
                if row.last_seen:
                    g.seen_age.add_metric(cam, max(0.0, now - row.last_seen))
                g.behind.add_metric(cam, float(bool(status.get("upload_behind"))))
                g.spool.add_metric(cam, float(status.get("spool_bytes") or 0))
            g.online.add_metric([], n_online)
            live = {state: 0 for state in LIVE_JOB_STATES}
            for state, n in conn.execute(
                select(jobs.c.state, func.count())
                .where(jobs.c.state.in_(LIVE_JOB_STATES), jobs.c.session_id.in_(booth_sessions))
                .group_by(jobs.c.state)
            ):
                live[state] = n
            for state, n in live.items():
                g.depth.add_metric([state], n)
            first = conn.execute(
                select(func.min(jobs.c.created_at)).where(
                    jobs.c.state == "queued", jobs.c.session_id.in_(booth_sessions)
                )
            ).scalar()
            g.oldest_job.add_metric([], max(0.0, now - first) if first else 0.0)
            last_beat = conn.execute(
                select(func.min(LAST_BEAT))
                .select_from(JOBS_WITH_BEATS)
                .where(jobs.c.state == "running", jobs.c.session_id.in_(booth_sessions))
            ).scalar()
            g.quietest_job.add_metric([], max(0.0, now - last_beat) if last_beat else 0.0)
            waiting = outbox.c.state.not_in(FINAL) & outbox.c.session_id.in_(booth_sessions)
            for state, n in conn.execute(
                select(outbox.c.state, func.count()).where(waiting).group_by(outbox.c.state)
            ):
                g.emails_waiting.add_metric([state], n)
            first = conn.execute(select(func.min(outbox.c.created_at)).where(waiting)).scalar()
            g.oldest_email.add_metric([], max(0.0, now - first) if first else 0.0)
            for state, n in conn.execute(
                select(sessions.c.state, func.count())
                .where(ours(sessions.c.booth_id))
                .group_by(sessions.c.state)
            ):
                g.by_state.add_metric([state], n)


def make_registry(repo: Repository, booth_id: str | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BoothCollector(repo, booth_id))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
