"""One repository layer over SQLite (embedded default) and PostgreSQL.

``Repository`` is composed of one mixin per aggregate, each in its own module:
sessions and attendees, ingest (takes, frame index, poses, agents), jobs,
links, staff logins, the email outbox, and the metrics' counters. All share ``self.engine``.
"""

from __future__ import annotations

from sqlalchemy import Engine

from cloud_trainer.repository.counters import CountersRepo
from cloud_trainer.repository.db import create_db_engine
from cloud_trainer.repository.ingest import IngestRepo
from cloud_trainer.repository.jobs import JobsRepo
from cloud_trainer.repository.links import LinksRepo
from cloud_trainer.repository.outbox import OutboxRepo
from cloud_trainer.repository.sessions import SessionNotFound, SessionsRepo, new_id
from cloud_trainer.repository.staff_logins import StaffLoginsRepo


class Repository(
    SessionsRepo, IngestRepo, JobsRepo, LinksRepo, StaffLoginsRepo, OutboxRepo, CountersRepo
):
    def __init__(self, engine: Engine):
        self.engine = engine

    @classmethod
    def from_config(cls, cfg) -> Repository:  # cfg: DatabaseConfig
        return cls(create_db_engine(cfg))

    def close(self) -> None:
        self.engine.dispose()


__all__ = ["Repository", "SessionNotFound", "new_id"]
