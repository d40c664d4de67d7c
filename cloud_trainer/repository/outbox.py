"""The email outbox: one row per message, written with the state change it announces.

Row states::

    pending --claim--> sending --accepted--> sent
       ^                  |  \\--5xx------> bounced   (reason in last_error)
       |                  |   \\--too many tries--> failed
       +---- 4xx/outage --+

    sent --a failure report comes back (cloud_trainer.bounces)--> bounced

A row in ``sending`` is leased until ``next_attempt_at``; the sender that claimed
it either finishes it or dies, and then the lease runs out and a sender recovers
it (see ``cloud_trainer.deliver`` for how recovery avoids a second send).
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection, and_, select, update

from cloud_trainer.repository.counters import EMAILS, add_counts
from cloud_trainer.repository.schema import attendees, links, outbox, sessions
from cloud_trainer.repository.sessions import set_attendee_email
from cloud_trainer.session import State

PENDING, SENDING, SENT, FAILED, BOUNCED = "pending", "sending", "sent", "failed", "bounced"
FINAL = frozenset({SENT, FAILED, BOUNCED})
BOUNCED_LATER = "bounced_later"  # the emails counter's label for a sent email bounced after


class OutboxRepo:
    engine: Any

    @staticmethod
    def _insert_email(conn: Connection, *, session_id: str | None, email: dict[str, Any]) -> int:
        now = time.time()
        return conn.execute(
            outbox.insert().values(
                message_id=email["message_id"],
                session_id=session_id,
                to_addr=email["to_addr"],
                subject=email["subject"],
                body_text=email["body_text"],
                body_html=email["body_html"],
                state=PENDING,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        ).inserted_primary_key[0]

    def deliver_session(
        self,
        session_id: str,
        *,
        email: dict[str, Any],
        link: dict[str, Any] | None = None,
        detail: str | None = None,
        **fields: Any,
    ) -> int:
        """Mark the session delivered, store its link and queue its email: all or nothing.

        ``email`` holds message_id, to_addr, subject, body_text and body_html;
        ``link`` holds token_sha256, created_at and expires_at; ``fields`` are session
        columns (video_key, poster_key, ...). Returns the outbox row id.
        """
        with self.engine.begin() as conn:
            self._transition_in(conn, session_id, State.DELIVERED, detail, **fields)
            if link is not None:
                self._insert_link(conn, session_id=session_id, **link)
            return self._insert_email(conn, session_id=session_id, email=email)

    def enqueue_email(
        self, session_id: str | None, *, email: dict[str, Any], link: dict[str, Any] | None = None
    ) -> int:
        """Queue a message outside a delivery (a resend), with its new link if it has one."""
        with self.engine.begin() as conn:
            if link is not None:
                self._insert_link(conn, session_id=session_id, **link)
            return self._insert_email(conn, session_id=session_id, email=email)

    def readdress_email(
        self,
        session_id: str,
        new_address: str,
        *,
        email: dict[str, Any],
        link: dict[str, Any],
        now: float | None = None,
    ) -> int:
        """A corrected address, in one transaction: the attendee's email becomes
        ``new_address``, the session's older links are revoked and its unsent emails
        cancelled (they went, or would go, to the wrong mailbox), and ``email`` is queued
        with its new ``link``. Returns the outbox row id.
        """
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            set_attendee_email(conn, session_id, new_address)
            conn.execute(
                update(links)
                .where(links.c.session_id == session_id, links.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            replaced = conn.execute(
                update(outbox)
                .where(outbox.c.session_id == session_id, outbox.c.state == PENDING)
                .values(
                    state=FAILED,
                    last_error="replaced by an email to a corrected address",
                    **self._SPENT,
                )
            ).rowcount
            if replaced:  # an outcome like any other: booth_emails_total counts it
                add_counts(conn, [(EMAILS, FAILED, replaced)])
            self._insert_link(conn, session_id=session_id, **link)
            return self._insert_email(conn, session_id=session_id, email=email)

    def claim_emails(self, now: float, lease_s: float, limit: int = 20) -> list[dict[str, Any]]:
        """Move due ``pending`` rows to ``sending`` (leased until now + lease_s) and return them.

        Each row is claimed with a compare-and-set on its state, so two senders never
        both claim one row. The rows carry the attendee's name for the To header.
        """
        with self.engine.connect() as conn:
            ids = [
                r.id
                for r in conn.execute(
                    select(outbox.c.id)
                    .where(outbox.c.state == PENDING, outbox.c.next_attempt_at <= now)
                    .order_by(outbox.c.next_attempt_at, outbox.c.id)
                    .limit(limit)
                )
            ]
        claimed = []
        for row_id in ids:
            with self.engine.begin() as conn:
                n = conn.execute(
                    update(outbox)
                    .where(outbox.c.id == row_id, outbox.c.state == PENDING)
                    .values(
                        state=SENDING,
                        attempts=outbox.c.attempts + 1,
                        next_attempt_at=now + lease_s,
                    )
                ).rowcount
            if n:
                claimed.append(self.get_email(row_id))
        return claimed

    def expired_sending(self, now: float) -> list[dict[str, Any]]:
        """Rows whose sender died mid-send: still ``sending`` after their lease ran out."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(outbox.c.id)
                .where(outbox.c.state == SENDING, outbox.c.next_attempt_at <= now)
                .order_by(outbox.c.id)
            )
            ids = [r.id for r in rows]
        return [self.get_email(i) for i in ids]

    def get_email(self, row_id: int) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(outbox, attendees.c.name.label("to_name"))
                .select_from(
                    outbox.outerjoin(sessions, sessions.c.id == outbox.c.session_id).outerjoin(
                        attendees, attendees.c.id == sessions.c.attendee_id
                    )
                )
                .where(outbox.c.id == row_id)
            ).first()
        if row is None:
            raise KeyError(f"no outbox row {row_id}")
        return dict(row._mapping)

    def _finish(self, row_id: int, from_state: str, **values: Any) -> bool:
        """Compare-and-set the row's state; a final outcome is counted in the same transaction."""
        with self.engine.begin() as conn:
            changed = bool(
                conn.execute(
                    update(outbox)
                    .where(and_(outbox.c.id == row_id, outbox.c.state == from_state))
                    .values(**values)
                ).rowcount
            )
            if changed and values["state"] in FINAL:
                add_counts(conn, [(EMAILS, values["state"], 1)])
            return changed

    # A finished email keeps its address and state (the tablet shows them) but not its
    # body: that holds a working link, which a copy of the database should not give away.
    _SPENT = {"body_text": "", "body_html": ""}

    def mark_email_sent(self, row_id: int, at: float) -> bool:
        return self._finish(row_id, SENDING, state=SENT, sent_at=at, last_error=None, **self._SPENT)

    def mark_email_retry(self, row_id: int, error: str, next_attempt_at: float) -> bool:
        return self._finish(
            row_id, SENDING, state=PENDING, last_error=error, next_attempt_at=next_attempt_at
        )

    def mark_email_failed(self, row_id: int, error: str, *, bounced: bool = False) -> bool:
        return self._finish(
            row_id, SENDING, state=BOUNCED if bounced else FAILED, last_error=error, **self._SPENT
        )

    def mark_email_bounced_after_sent(self, message_id: str, error: str) -> bool:
        """A ``sent`` email's failure report came back: it is ``bounced`` after all.

        False if no sent email has that Message-ID (unknown, forged, already bounced, or
        its session deleted). Counted as ``bounced_later``: its ``sent`` stays counted.
        """
        with self.engine.begin() as conn:
            changed = bool(
                conn.execute(
                    update(outbox)
                    .where(and_(outbox.c.message_id == message_id, outbox.c.state == SENT))
                    .values(state=BOUNCED, last_error=error)
                ).rowcount
            )
            if changed:
                add_counts(conn, [(EMAILS, BOUNCED_LATER, 1)])
            return changed

    def release_email(self, row_id: int, now: float, note: str) -> bool:
        """Put a recovered ``sending`` row back to ``pending`` without counting a new attempt."""
        return self._finish(row_id, SENDING, state=PENDING, next_attempt_at=now, last_error=note)

    def emails(self, session_id: str | None = None) -> list[dict[str, Any]]:
        q = select(outbox).order_by(outbox.c.id)
        if session_id is not None:
            q = q.where(outbox.c.session_id == session_id)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def email_status(self, session_id: str) -> dict[str, Any] | None:
        """The newest email of a session: state, to_addr, attempts and the reason it failed."""
        rows = self.emails(session_id)
        if not rows:
            return None
        r = rows[-1]
        return {
            "state": r["state"],
            "to_addr": r["to_addr"],
            "attempts": r["attempts"],
            "reason": r["last_error"],
            "message_id": r["message_id"],
            "sent_at": r["sent_at"],
        }
