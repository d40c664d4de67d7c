"""Engines for the two backends behind the one repository layer."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Connection, Engine, Table, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite

from cloud_trainer.repository.schema import metadata
from edge_agent.errors import make_dirs

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# pg_advisory_xact_lock key for creating the schema: any constant the booth uses for
# nothing else ("dnce" in ASCII).
_SCHEMA_LOCK_KEY = 0x646E6365


def create_db_engine(cfg) -> Engine:  # cfg: SqliteDatabase | PostgresDatabase
    if cfg.type == "sqlite":
        make_dirs(cfg.path.parent, "the folder of database.path")
        engine = create_engine(f"sqlite:///{cfg.path}", connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            # WAL: readers never block the writer; the API reads while ingest writes.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
            # We issue BEGIN ourselves (below) instead of the driver's legacy mode.
            dbapi_conn.isolation_level = None

        _sqlite_write_locks(engine)
        metadata.create_all(engine)  # SQLite's write lock serialises concurrent starts
        return engine

    engine = create_engine(cfg.url, pool_pre_ping=True)
    if cfg.db_schema:
        if not _SCHEMA_RE.match(cfg.db_schema):
            raise ValueError(f"database.db_schema {cfg.db_schema!r} is not a plain identifier")
        schema = cfg.db_schema

        # Registered before the first connection: a pooled connection opened
        # without it would keep the default search_path (public) for good.
        @event.listens_for(engine, "connect")
        def _search_path(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute(f'SET search_path TO "{schema}"')
            cur.close()
            dbapi_conn.commit()

    # The app and the workers start together on a fresh database: concurrent CREATEs of
    # one table collide in PostgreSQL's catalog (a unique violation, and a restart). One
    # transaction-scoped advisory lock makes them take turns; the later ones find it all.
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
        if cfg.db_schema:
            conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{cfg.db_schema}"'))
        metadata.create_all(conn)
    return engine


def dialect_insert(bind: Connection | Engine, table: Table) -> Any:
    """The backend's own INSERT, which has ``on_conflict_do_*`` (both spell it the same)."""
    if bind.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


_READ_PREFIXES = ("SELECT", "PRAGMA", "EXPLAIN")


def _sqlite_write_locks(engine: Engine) -> None:
    """Make ``SELECT ... FOR UPDATE`` mean something on SQLite.

    The repositories read a row ``with_for_update()`` and then change it (state
    transitions, merged JSON). PostgreSQL locks the row; SQLite has no row locks
    and the driver's legacy mode runs such a read outside any transaction, so two
    callers could both read "created" and both move the session. Here a
    transaction takes SQLite's write lock (``BEGIN IMMEDIATE``) before its first
    write or its first ``FOR UPDATE`` read; a read-first transaction runs its
    plain reads in autocommit until then, exactly as the legacy mode did.
    """

    @event.listens_for(engine, "begin")
    def _reset(conn) -> None:
        conn.info["sqlite_write_locked"] = False

    @event.listens_for(engine, "before_cursor_execute")
    def _lock_before_write(conn, cursor, statement, parameters, context, executemany) -> None:
        if not conn.in_transaction() or conn.info.get("sqlite_write_locked"):
            return
        compiled = getattr(context, "compiled", None)
        for_update = getattr(getattr(compiled, "statement", None), "_for_update_arg", None)
        if for_update is None and statement.lstrip()[:7].upper().startswith(_READ_PREFIXES):
            return
        cursor.execute("BEGIN IMMEDIATE")
        conn.info["sqlite_write_locked"] = True
