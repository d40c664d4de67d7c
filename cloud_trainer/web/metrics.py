"""Prometheus metrics, read from the metadata store at scrape time.

Ingest, workers and the mail sender run in different processes; the database
is the one place that sees all of them, so the collector derives every number
from it instead of keeping in-process counters that a restart would reset.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from cloud_trainer.repository.schema import agents, jobs, outbox, sessions, takes

log = logging.getLogger(__name__)


class BoothCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        frames = CounterMetricFamily(
            "booth_frames_ingested", "Frames stored durably by ingest", labels=["camera"]
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
        emails = CounterMetricFamily("booth_emails", "Emails by outcome", labels=["state"])
        by_state = GaugeMetricFamily("booth_sessions", "Sessions by state", labels=["state"])
        try:
            with self.engine.connect() as conn:
                for cam, n in conn.execute(
                    select(takes.c.camera_id, func.sum(takes.c.durable_seq + 1)).group_by(
                        takes.c.camera_id
                    )
                ):
                    frames.add_metric([cam], float(n or 0))
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
                for state, n in conn.execute(
                    select(jobs.c.state, func.count()).group_by(jobs.c.state)
                ):
                    depth.add_metric([state], n)
                totals: dict[str, list[float]] = {}
                for (secs,) in conn.execute(select(jobs.c.stage_seconds)):
                    for name, s in (secs or {}).items():
                        t = totals.setdefault(name, [0.0, 0])
                        t[0] += float(s)
                        t[1] += 1
                for name, (s, n) in totals.items():
                    stage.add_metric([name], s)
                    stage_n.add_metric([name], n)
                for state, n in conn.execute(
                    select(outbox.c.state, func.count()).group_by(outbox.c.state)
                ):
                    emails.add_metric([state], n)
                for state, n in conn.execute(
                    select(sessions.c.state, func.count()).group_by(sessions.c.state)
                ):
                    by_state.add_metric([state], n)
        except SQLAlchemyError as e:
            log.warning("metrics: database unavailable: %s", e)
        yield from (frames, drops, online, depth, stage, stage_n, emails, by_state)


def make_registry(engine) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BoothCollector(engine))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
