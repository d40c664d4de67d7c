"""One repository layer over SQLite (embedded default) and PostgreSQL.

``Repository`` is composed of one mixin per aggregate, each in its own module:
sessions and attendees, ingest (takes, frame index, poses, agents), jobs,
links, and the email outbox. All share ``self.engine``.
"""

from __future__ import annotations

from sqlalchemy import Engine

from cloud_trainer.repository.db import create_db_engine
from cloud_trainer.repository.sessions import SessionNotFound, SessionsRepo, new_id

_MIXINS: list[type] = [SessionsRepo]
# Aggregates built in their own modules join the Repository as they land.
for _name, _cls in (
    ("cloud_trainer.repository.ingest", "IngestRepo"),
    ("cloud_trainer.repository.jobs", "JobsRepo"),
    ("cloud_trainer.repository.links", "LinksRepo"),
    ("cloud_trainer.repository.outbox", "OutboxRepo"),
):
    try:
        _mod = __import__(_name, fromlist=[_cls])
    except ModuleNotFoundError as _e:
        if _e.name != _name:
            raise
        continue
    _MIXINS.append(getattr(_mod, _cls))


class Repository(*_MIXINS):  # type: ignore[misc]
    def __init__(self, engine: Engine):
        self.engine = engine

    @classmethod
    def from_config(cls, cfg) -> Repository:  # cfg: DatabaseConfig
        return cls(create_db_engine(cfg))

    def close(self) -> None:
        self.engine.dispose()


__all__ = ["Repository", "SessionNotFound", "new_id"]
