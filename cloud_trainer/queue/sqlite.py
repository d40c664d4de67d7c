"""The ``sqlite`` job queue: one table in its own database file (the embedded default).

A message is *visible* when ``visible_at <= now``. Receiving one is a single
``UPDATE ... RETURNING`` inside ``BEGIN IMMEDIATE`` that pushes ``visible_at``
out by the visibility timeout and stamps a fresh lease token, so two
consumers (threads or processes) can never claim the same visible row. A
worker that dies simply stops heartbeating: its ``visible_at`` passes and the
next ``receive`` claims the job again with ``attempt`` + 1. Every later call
on the old lease carries the old token and matches no row, which is what
makes stale acks harmless.

Its own file, not the metadata database: the queue is polled constantly, and
this keeps its writes from queueing behind ingest's (and lets the metadata
store be PostgreSQL while the queue stays embedded).
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cloud_trainer.queue.base import Lease, register
from edge_agent.errors import make_dirs

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id      TEXT NOT NULL UNIQUE,
    payload     TEXT NOT NULL,
    state       TEXT NOT NULL,              -- ready | dead
    attempt     INTEGER NOT NULL DEFAULT 0, -- deliveries so far
    visible_at  REAL NOT NULL,
    lease_token TEXT,
    enqueued_at REAL NOT NULL,
    reason      TEXT
);
CREATE INDEX IF NOT EXISTS ix_messages_visible ON messages (state, visible_at);
"""

# How often receive() looks for work published by another process. Publishes in
# this process wake it at once.
_POLL_S = 0.2


class SqliteJobQueue:
    def __init__(
        self,
        path: str | Path,
        *,
        visibility_timeout_s: float = 60.0,
        heartbeat_s: float = 10.0,
        max_attempts: int = 3,
    ):
        self.path = Path(path)
        make_dirs(self.path.parent, "the folder of queue.path")
        self.visibility_timeout_s = visibility_timeout_s
        self.heartbeat_s = heartbeat_s
        self.max_attempts = max_attempts
        self._wakeup = threading.Condition()
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)

    def __repr__(self) -> str:
        return f"SqliteJobQueue({str(self.path)!r})"

    # A short-lived connection per operation: cheap for SQLite, and safe from any
    # thread (heartbeat threads included).
    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=30000")
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the write lock up front (no stale reads)."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _notify(self) -> None:
        with self._wakeup:
            self._wakeup.notify_all()

    # ---- the interface ----------------------------------------------------------------

    def publish(self, job_id: str, payload: dict[str, Any]) -> None:
        """Enqueue; a job already waiting or running is left alone, a dead one is revived."""
        body = json.dumps(payload)
        now = time.time()
        with self._write() as conn:
            conn.execute(
                "INSERT INTO messages (job_id, payload, state, attempt, visible_at, enqueued_at)"
                " VALUES (?, ?, 'ready', 0, ?, ?)"
                " ON CONFLICT (job_id) DO UPDATE SET payload = excluded.payload,"
                " state = 'ready', attempt = 0, visible_at = excluded.visible_at,"
                " lease_token = NULL, reason = NULL WHERE messages.state = 'dead'",
                (job_id, body, now, now),
            )
        log.info("job published", extra={"job_id": job_id})
        self._notify()

    def receive(self, timeout_s: float) -> SqliteLease | None:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            lease = self._claim()
            if lease is not None:
                return lease
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            wait = min(_POLL_S, remaining)
            next_visible = self._next_visible_at()
            if next_visible is not None:
                wait = min(wait, max(next_visible - time.time(), 0.0))
            with self._wakeup:
                self._wakeup.wait(wait)

    def _claim(self) -> SqliteLease | None:
        token = secrets.token_hex(16)
        now = time.time()
        with self._write() as conn:
            row = conn.execute(
                "UPDATE messages SET attempt = attempt + 1, lease_token = ?, visible_at = ?"
                " WHERE id = (SELECT id FROM messages WHERE state = 'ready' AND visible_at <= ?"
                "             ORDER BY visible_at, id LIMIT 1)"
                " RETURNING job_id, payload, attempt",
                (token, now + self.visibility_timeout_s, now),
            ).fetchone()
        if row is None:
            return None
        job_id, payload, attempt = row
        log.info("job leased", extra={"job_id": job_id, "attempt": attempt})
        return SqliteLease(self, token, job_id, json.loads(payload), attempt)

    def _next_visible_at(self) -> float | None:
        with self._connect() as conn:
            (t,) = conn.execute(
                "SELECT MIN(visible_at) FROM messages WHERE state = 'ready'"
            ).fetchone()
        return t

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT job_id, payload, reason, attempt FROM messages WHERE state = 'dead'"
                " ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            {"job_id": j, "payload": json.loads(p), "reason": r, "attempt": a}
            for j, p, r, a in rows
        ]

    def stats(self) -> dict[str, int]:
        """Counts for metrics: ready (visible now), leased, delayed and dead."""
        now = time.time()
        with self._connect() as conn:
            ready, waiting, dead = conn.execute(
                "SELECT"
                " COALESCE(SUM(state = 'ready' AND visible_at <= ?), 0),"
                " COALESCE(SUM(state = 'ready' AND visible_at > ?), 0),"
                " COALESCE(SUM(state = 'dead'), 0) FROM messages",
                (now, now),
            ).fetchone()
        return {"ready": ready, "leased_or_delayed": waiting, "dead": dead}

    def close(self) -> None:
        self._notify()  # nothing is held open between calls


class SqliteLease(Lease):
    def __init__(self, queue: SqliteJobQueue, token: str, job_id: str, payload: dict, attempt: int):
        super().__init__(job_id, payload, attempt, queue.max_attempts, queue.heartbeat_s)
        self._queue = queue
        self._token = token

    def _update(self, sql: str, params: tuple) -> bool:
        with self._queue._write() as conn:
            n = conn.execute(
                sql + " WHERE job_id = ? AND lease_token = ?", (*params, self.job_id, self._token)
            ).rowcount
        return n == 1

    def _extend(self) -> bool:
        # Still ours even if the timeout passed, as long as nobody claimed it since.
        return self._update(
            "UPDATE messages SET visible_at = ?",
            (time.time() + self._queue.visibility_timeout_s,),
        )

    def _ack(self) -> None:
        if not self._update("DELETE FROM messages", ()):
            log.warning(
                "stale ack ignored: the lease expired and the job went elsewhere",
                extra={"job_id": self.job_id, "attempt": self.attempt},
            )

    def _nack(self, retry_after_s: float) -> None:
        if self._update(
            "UPDATE messages SET lease_token = NULL, visible_at = ?",
            (time.time() + retry_after_s,),
        ):
            self._queue._notify()

    def _release(self) -> None:
        # The next claim adds 1 again: the handed-back delivery does not count.
        if self._update(
            "UPDATE messages SET lease_token = NULL, visible_at = ?, attempt = attempt - 1",
            (time.time(),),
        ):
            self._queue._notify()

    def _dead_letter(self, reason: str) -> None:
        self._update(
            "UPDATE messages SET state = 'dead', lease_token = NULL, reason = ?", (reason,)
        )


@register("sqlite")
def _create(cfg) -> SqliteJobQueue:  # cfg: SqliteQueue
    return SqliteJobQueue(
        cfg.path,
        visibility_timeout_s=cfg.visibility_timeout_s,
        heartbeat_s=cfg.heartbeat_s,
        max_attempts=cfg.max_attempts,
    )
