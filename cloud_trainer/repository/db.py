"""Engines for the two backends behind the one repository layer."""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import time
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Table,
    create_engine,
    event,
    inspect,
    literal,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite

from cloud_trainer.repository.schema import metadata
from edge_agent.errors import BoothError, make_dirs

log = logging.getLogger(__name__)

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# pg_advisory_xact_lock key for creating the schema: any constant the booth uses for
# nothing else ("dnce" in ASCII).
_SCHEMA_LOCK_KEY = 0x646E6365


def create_db_engine(cfg) -> Engine:  # cfg: SqliteDatabase | PostgresDatabase
    if cfg.type == "sqlite":
        make_dirs(cfg.path.parent, "the folder of database.path")
        # hide_parameters: a database error's text must not carry the statement's values
        # into the logs (attendees' names and emails, the link token in an email body).
        engine = create_engine(
            f"sqlite:///{cfg.path}", connect_args={"timeout": 30}, hide_parameters=True
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            # WAL: readers never block the writer; the API reads while ingest writes.
            _journal_mode_wal(cur)
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
            # We issue BEGIN ourselves (below) instead of the driver's legacy mode.
            dbapi_conn.isolation_level = None

        _sqlite_write_locks(engine)
        # Under the write lock from before the first look at the catalog: processes
        # starting together (serve and its workers, on a new or upgraded database) would
        # otherwise all see a table missing, and all but one fail to create it.
        with engine.begin() as conn:
            _take_sqlite_write_lock(conn)
            metadata.create_all(conn)
            _upgrade_columns(conn, cfg.path)
        return engine

    engine = create_engine(
        cfg.url,
        pool_pre_ping=True,
        hide_parameters=True,  # as above
        # A database that stops answering fails a request (and /readyz) in seconds.
        connect_args={"connect_timeout": 5},
    )
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
        _upgrade_columns(conn, cfg.db_schema or "the database")
    return engine


def _upgrade_columns(conn: Connection, where: Any) -> None:
    """Add the columns this version has and the database lacks, or refuse, naming them.

    ``create_all`` adds missing tables, never missing columns. A column that may be
    NULL, or has a constant default, is added here (with that default for the rows
    already there), and so are the indexes on it: upgrading the booth's image keeps
    its database. A column no value can be invented for (NOT NULL without a default,
    or UNIQUE) is refused at start-up, by name, instead of failing the first query
    that needs it (mid-upload) with the database's own error.
    """
    inspector = inspect(conn)
    plan: list[tuple[Table, list[Column], list[str]]] = []
    refused = []
    for table in metadata.sorted_tables:
        have = {c["name"] for c in inspector.get_columns(table.name)}
        lacking = [c for c in table.columns if c.name not in have]
        ddls = [_add_column_ddl(conn, table, c) for c in lacking]
        refused += [
            f"{table.name}.{c.name}" for c, d in zip(lacking, ddls, strict=True) if d is None
        ]
        if lacking:
            plan.append((table, lacking, ddls))
    if refused:
        shown = ", ".join(refused[:6]) + (
            f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        )
        raise BoothError(
            f"{where} was made by an older version of dancebooth and lacks {shown}, which "
            "cannot be added to the rows it holds; point database.path (or "
            "database.db_schema) at a new one"
        )
    added = []
    for table, lacking, ddls in plan:
        for column, ddl in zip(lacking, ddls, strict=True):
            conn.exec_driver_sql(ddl)
            added.append(f"{table.name}.{column.name}")
        indexed = {i["name"] for i in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexed and any(c in lacking for c in index.columns):
                index.create(conn)
    if added:
        log.warning(
            "%s was made by an older version of dancebooth: added %s", where, ", ".join(added)
        )


def _add_column_ddl(conn: Connection, table: Table, column: Column) -> str | None:
    """``ALTER TABLE ... ADD COLUMN`` for ``column``, or None when it cannot be added."""
    if column.unique or column.primary_key:
        return None
    default = None
    if column.default is not None:
        arg = column.default.arg
        if callable(arg):
            # default=dict / default=list: SQLAlchemy wraps them as fn(ctx).
            try:
                arg = arg(None)
            except Exception:  # noqa: BLE001 - a default that needs its context: none here
                return None
        if isinstance(arg, dict | list):
            default = "'" + json.dumps(arg).replace("'", "''") + "'"
        elif isinstance(arg, bool | int | float | str):
            default = str(
                literal(arg, column.type).compile(
                    dialect=conn.dialect, compile_kwargs={"literal_binds": True}
                )
            )
        else:
            return None
    if default is None and not column.nullable:
        return None
    quote = conn.dialect.identifier_preparer
    spec = f"{quote.quote(column.name)} {column.type.compile(dialect=conn.dialect)}"
    if default is not None:
        spec += f" DEFAULT {default}"
    if not column.nullable:
        spec += " NOT NULL"
    for fk in column.foreign_keys:
        # Inline, as both backends take it in ADD COLUMN: without it, an upgraded
        # database would not cascade a deleted session's rows.
        target = fk.column
        spec += f" REFERENCES {quote.format_table(target.table)} ({quote.quote(target.name)})"
        if fk.ondelete:
            spec += f" ON DELETE {fk.ondelete}"
    return f"ALTER TABLE {quote.format_table(table)} ADD COLUMN {spec}"


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


def _take_sqlite_write_lock(conn: Connection) -> None:
    """``BEGIN IMMEDIATE`` now, in ``conn``'s transaction, as ``_lock_before_write`` does."""
    if not conn.info.get("sqlite_write_locked"):
        cursor = conn.connection.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE")
        finally:
            cursor.close()
        conn.info["sqlite_write_locked"] = True


def _journal_mode_wal(cursor: Any, within_s: float = 30.0) -> None:
    """``PRAGMA journal_mode=WAL``, waiting out the processes that switch it at the same time.

    The switch (once, on a new database file; WAL then stays) needs the file to itself
    and answers "database is locked" at once, without the busy timeout, while another
    connection holds it: processes that open a new database together retry a moment later.
    """
    deadline = time.monotonic() + within_s
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(2 * delay, 0.25)
