"""Engines for the two backends behind the one repository layer."""

from __future__ import annotations

import re

from sqlalchemy import Engine, create_engine, event, text

from cloud_trainer.repository.schema import metadata

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def create_db_engine(cfg) -> Engine:  # cfg: SqliteDatabase | PostgresDatabase
    if cfg.type == "sqlite":
        cfg.path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(f"sqlite:///{cfg.path}", connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            # WAL: readers never block the writer; the API reads while ingest writes.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

    else:
        engine = create_engine(cfg.url, pool_pre_ping=True)
        if cfg.db_schema:
            if not _SCHEMA_RE.match(cfg.db_schema):
                raise ValueError(f"database.db_schema {cfg.db_schema!r} is not a plain identifier")
            schema = cfg.db_schema
            with engine.begin() as conn:
                conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))

            @event.listens_for(engine, "connect")
            def _search_path(dbapi_conn, _record) -> None:
                cur = dbapi_conn.cursor()
                cur.execute(f'SET search_path TO "{schema}"')
                cur.close()
                dbapi_conn.commit()

    metadata.create_all(engine)
    return engine
