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
from cloud_trainer.repository.outbox import FINAL
from cloud_trainer.repository.schema import agents, jobs, outbox, sessions

log = logging.getLogger(__name__)


class BoothCollector:
    def __init__(self, repo: Repository):
        self.repo = repo

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
        online = GaugeMetricFamily("booth_agents_online", "Agents seen in the last 15 s")
        depth = GaugeMetricFamily(
            "booth_queue_depth", "Training jobs waiting or running", labels=["state"]
        )
        stage = CounterMetricFamily(
            "booth_job_stage_seconds", "Seconds spent per job stage", labels=["stage"]
        )
        stage_n = CounterMetricFamily(
            "booth_job_stage_runs", "Job stages completed", labels=["stage"]
        )
        emails = CounterMetricFamily(
            "booth_emails", "Emails by final outcome (sent, failed, bounced)", labels=["state"]
        )
        # Pending and sending rows come and go: a gauge, not a counter.
        emails_waiting = GaugeMetricFamily(
            "booth_emails_waiting", "Emails not yet sent, by state", labels=["state"]
        )
        by_state = GaugeMetricFamily("booth_sessions", "Sessions by state", labels=["state"])
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
            self._gauges(drops, online, depth, emails_waiting, by_state)
        except SQLAlchemyError as e:
            log.warning("metrics: database unavailable: %s", e)
        yield from (
            frames,
            lost,
            drops,
            online,
            depth,
            stage,
            stage_n,
            emails,
            emails_waiting,
            by_state,
        )

    def _gauges(self, drops, online, depth, emails_waiting, by_state) -> None:
        """What is true now (live rows): deletions may and should lower these."""
        with self.repo.engine.connect() as conn:
            now = time.time()
            n_online = 0
            for row in conn.execute(
                select(agents.c.camera_id, agents.c.status, agents.c.last_seen)
            ):
                status = row.status or {}
                for consumer in ("capture", "pose", "stream"):
                    drops.add_metric(
                        [row.camera_id, consumer],
                        float(status.get(f"{consumer}_dropped", 0) or 0),
                    )
                n_online += bool(row.last_seen and now - row.last_seen < 15)
            online.add_metric([], n_online)
            for state, n in conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)):
                depth.add_metric([state], n)
            for state, n in conn.execute(
                select(outbox.c.state, func.count())
                .where(outbox.c.state.not_in(FINAL))
                .group_by(outbox.c.state)
            ):
                emails_waiting.add_metric([state], n)
            for state, n in conn.execute(
                select(sessions.c.state, func.count()).group_by(sessions.c.state)
            ):
                by_state.add_metric([state], n)


def make_registry(repo: Repository) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BoothCollector(repo))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
