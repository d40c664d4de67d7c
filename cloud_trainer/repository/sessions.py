"""Attendees and sessions, with every state change going through ``session.check_transition``."""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

from sqlalchemy import select, update

from cloud_trainer.repository.counters import retire_session_counts
from cloud_trainer.repository.schema import (
    attendees,
    session_events,
    session_successors,
    session_tombstones,
    sessions,
)
from cloud_trainer.session import State, check_transition
from edge_agent.errors import BadInput, BoothError


class SessionNotFound(BoothError):
    pass


def new_id() -> str:
    return secrets.token_hex(16)


_ID_RE = re.compile(r"[0-9a-f]{32}")


def known_id(session_id: str) -> str:
    """``session_id`` if it has the shape of our ids, else SessionNotFound.

    Ids come from URLs: one with a NUL byte would otherwise reach PostgreSQL as an error.
    """
    if not isinstance(session_id, str) or not _ID_RE.fullmatch(session_id):
        raise SessionNotFound(f"unknown session {session_id!r}")
    return session_id


class SessionsRepo:
    engine: Any

    def create_session(
        self,
        *,
        booth_id: str,
        name: str,
        email: str,
        consent: bool,
        reference_name: str,
        take_s: float,
        cameras: list[str],
        reference_version: int | None = None,
    ) -> str:
        """Create the attendee and their session in one transaction. Consent is mandatory."""
        if not consent:
            raise BadInput("the attendee must consent before anything is captured")
        now = time.time()
        attendee_id, session_id = new_id(), new_id()
        with self.engine.begin() as conn:
            conn.execute(
                attendees.insert().values(
                    id=attendee_id,
                    name=name,
                    email=email,
                    consent=True,
                    consent_at=now,
                    created_at=now,
                )
            )
            conn.execute(
                sessions.insert().values(
                    id=session_id,
                    booth_id=booth_id,
                    attendee_id=attendee_id,
                    reference_name=reference_name,
                    reference_version=reference_version,
                    state=State.CREATED.value,
                    take_s=take_s,
                    cameras=list(cameras),
                    created_at=now,
                    updated_at=now,
                    progress={},
                )
            )
            conn.execute(
                session_events.insert().values(
                    session_id=session_id, at=now, from_state=None, to_state=State.CREATED.value
                )
            )
        return session_id

    def get_session(self, session_id: str) -> dict[str, Any]:
        """The session joined with its attendee, as a plain dict."""
        known_id(session_id)
        with self.engine.connect() as conn:
            row = conn.execute(
                select(sessions, attendees.c.name, attendees.c.email)
                .join(attendees, attendees.c.id == sessions.c.attendee_id)
                .where(sessions.c.id == session_id)
            ).first()
        if row is None:
            raise SessionNotFound(f"unknown session {session_id}")
        return dict(row._mapping)

    def list_sessions(
        self, booth_id: str | None = None, since: float | None = None
    ) -> list[dict[str, Any]]:
        q = select(sessions, attendees.c.name, attendees.c.email).join(
            attendees, attendees.c.id == sessions.c.attendee_id
        )
        if booth_id is not None:
            q = q.where(sessions.c.booth_id == booth_id)
        if since is not None:
            q = q.where(sessions.c.created_at >= since)
        with self.engine.connect() as conn:
            return [
                dict(r._mapping) for r in conn.execute(q.order_by(sessions.c.created_at.desc()))
            ]

    def transition(
        self, session_id: str, target: State | str, detail: str | None = None, **fields: Any
    ) -> None:
        """Move a session to ``target``; raises InvalidTransition for moves the machine forbids.

        The row is locked (``FOR UPDATE`` on PostgreSQL; SQLite serialises writers) so two
        racing callers cannot both move it.
        """
        with self.engine.begin() as conn:
            self._transition_in(conn, session_id, target, detail, **fields)

    @staticmethod
    def _transition_in(
        conn: Any, session_id: str, target: State | str, detail: str | None = None, **fields: Any
    ) -> None:
        """``transition`` inside a caller's transaction (delivery writes its outbox row with it)."""
        target = State(target)
        now = time.time()
        row = _locked(conn, session_id, sessions.c.state)
        check_transition(session_id, row.state, target)
        values: dict[str, Any] = {"state": target.value, "updated_at": now, **fields}
        if target == State.FAILED:
            values["failure_reason"] = detail or "unknown failure"
        elif target == State.CAPTURING:
            values.setdefault("capture_started_at", now)
            values["failure_reason"] = None
        elif target == State.UPLOADED:
            values.setdefault("uploaded_at", now)
        elif target == State.DELIVERED:
            values.setdefault("delivered_at", now)
        conn.execute(update(sessions).where(sessions.c.id == session_id).values(**values))
        conn.execute(
            session_events.insert().values(
                session_id=session_id,
                at=now,
                from_state=row.state,
                to_state=target.value,
                detail=detail,
            )
        )

    def fail(
        self, session_id: str, reason: str, *, only_from: frozenset[State] | None = None
    ) -> bool:
        """Fail a session unless it already ended (a late failure must not undo a delivery).

        ``only_from``: fail it only while it is still in one of these states, checked
        under the row's lock (a sweep that read "capturing" must not fail a session
        whose upload completed since). True if the session was failed by this call.
        """
        with self.engine.begin() as conn:
            current = State(_locked(conn, session_id, sessions.c.state).state)
            if current in (State.DELIVERED, State.FAILED):
                return False
            if only_from is not None and current not in only_from:
                return False
            self._transition_in(conn, session_id, State.FAILED, detail=reason)
        return True

    def set_progress(self, session_id: str, **progress: Any) -> None:
        with self.engine.begin() as conn:
            # Locked: concurrent reporters (trainer, renderer) must not drop keys.
            row = _locked(conn, session_id, sessions.c.progress)
            merged = {**(row.progress or {}), **progress}
            conn.execute(
                update(sessions)
                .where(sessions.c.id == session_id)
                .values(progress=merged, updated_at=time.time())
            )

    def update_session(self, session_id: str, **fields: Any) -> None:
        """Set plain columns (quality, video keys, ...) without a state change."""
        with self.engine.begin() as conn:
            n = conn.execute(
                update(sessions)
                .where(sessions.c.id == session_id)
                .values(updated_at=time.time(), **fields)
            ).rowcount
        if n == 0:
            raise SessionNotFound(f"unknown session {session_id}")

    def update_attendee_email(self, session_id: str, email: str) -> None:
        with self.engine.begin() as conn:
            set_attendee_email(conn, session_id, email)

    def session_events(self, session_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(session_events)
                .where(session_events.c.session_id == session_id)
                .order_by(session_events.c.id)
            )
            return [dict(r._mapping) for r in rows]

    def delete_session_rows(self, session_id: str) -> None:
        """Remove the session, its attendee and everything hanging off them (cascades).

        The takes and the job go first, explicitly, so what they counted stays in the
        metrics' counters (``retire_session_counts``).
        """
        with self.engine.begin() as conn:
            delete_session_rows(conn, session_id)

    def record_successor(self, session_id: str, successor_id: str) -> None:
        """``successor_id`` replaces ``session_id`` (and whatever that one replaced)."""
        with self.engine.begin() as conn:
            booth_id = lock_session(conn, session_id).booth_id
            conn.execute(
                update(session_successors)
                .where(session_successors.c.successor_id == session_id)
                .values(successor_id=successor_id)
            )
            conn.execute(
                session_successors.insert().values(
                    session_id=session_id,
                    successor_id=successor_id,
                    booth_id=booth_id,
                    created_at=time.time(),
                )
            )

    def successor_of(self, session_id: str, booth_id: str) -> str | None:
        """The session of ``booth_id`` that replaced ``session_id``, if one did."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(session_successors.c.successor_id).where(
                    session_successors.c.session_id == session_id,
                    session_successors.c.booth_id == booth_id,
                )
            ).scalar()

    def session_deleted(self, session_id: str) -> bool:
        """Whether ``session_id`` existed and was deleted (its boards must drop their copies)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(session_tombstones.c.session_id).where(
                    session_tombstones.c.session_id == session_id
                )
            ).first()
        return row is not None


def lock_session(conn: Any, session_id: str) -> Any:
    """In ``conn``'s transaction: the session's row, locked (``FOR UPDATE``; SQLite's write lock).

    A writer that references the session (a delivery adding a link or an email) then
    either committed before, or waits and finds the session as this transaction left it.
    """
    known_id(session_id)
    row = conn.execute(
        select(sessions.c.attendee_id, sessions.c.booth_id)
        .where(sessions.c.id == session_id)
        .with_for_update()
    ).first()
    if row is None:
        raise SessionNotFound(f"unknown session {session_id}")
    return row


def set_attendee_email(conn: Any, session_id: str, email: str) -> None:
    """In ``conn``'s transaction: the address of the session's attendee becomes ``email``."""
    known_id(session_id)
    attendee = select(sessions.c.attendee_id).where(sessions.c.id == session_id).scalar_subquery()
    n = conn.execute(update(attendees).where(attendees.c.id == attendee).values(email=email))
    if n.rowcount == 0:
        raise SessionNotFound(f"unknown session {session_id}")


def delete_session_rows(conn: Any, session_id: str) -> None:
    """In ``conn``'s transaction: ``Repository.delete_session_rows``."""
    row = lock_session(conn, session_id)
    retire_session_counts(conn, session_id)
    conn.execute(sessions.delete().where(sessions.c.id == session_id))
    conn.execute(attendees.delete().where(attendees.c.id == row.attendee_id))
    # Nothing points at a session that is gone (its own pointer, if it was replaced, stays).
    conn.execute(session_successors.delete().where(session_successors.c.successor_id == session_id))
    conn.execute(
        session_tombstones.insert().values(
            session_id=session_id, booth_id=row.booth_id, deleted_at=time.time()
        )
    )


def _locked(conn: Any, session_id: str, *columns: Any) -> Any:
    """The session's row (those columns), locked for this transaction; SessionNotFound if none."""
    row = conn.execute(
        select(*columns).where(sessions.c.id == session_id).with_for_update()
    ).first()
    if row is None:
        raise SessionNotFound(f"unknown session {session_id}")
    return row
