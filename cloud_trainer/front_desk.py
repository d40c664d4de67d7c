"""What staff do at the booth, independent of HTTP: enter an attendee, start, resend, delete.

The web app's routes are thin wrappers around ``FrontDesk``; the demo and the
tests drive the same code through the real HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import delete, exists, func, select

from cloud_trainer import email_typos, mail
from cloud_trainer.repository import Repository, SessionNotFound
from cloud_trainer.repository.db import dialect_insert
from cloud_trainer.repository.schema import link_tombstones, links, outbox, sessions
from cloud_trainer.repository.sessions import delete_session_rows, lock_session
from cloud_trainer.session import InvalidTransition, State
from edge_agent.errors import BadInput, BoothError

log = logging.getLogger(__name__)

# Deliberately strict: one @, a dot in the domain, no spaces or control characters.
# The SMTP server has the final word; a rejected address shows on the session.
# The local part is an RFC 5322 dot-atom (quoted forms such as "a b"@x are refused: mail
# libraries and clients disagree on them).
# Each domain label is 1-63 letters, digits or inner hyphens (no empty label: the mail
# code refuses ``gmail..com``, after training, where staff can no longer fix it).
_EMAIL_RE = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    # The last label: letters, or an internationalised one as browsers send it (punycode:
    # user@пример.рф arrives as user@xn--e1afmkfd.xn--p1ai).
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+(?:[A-Za-z]{2,63}|xn--[A-Za-z0-9-]{1,59})$"
)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class Conflict(BoothError):
    """The action does not fit the session's current state (HTTP 409)."""


class NoCameras(Conflict):
    pass


class TakeController(Protocol):
    """The control plane, as the front desk needs it (implemented by cloud_trainer.ingest.control)."""

    def online_agents(self, booth_id: str) -> list[dict[str, Any]]: ...

    async def start_take(
        self, booth_id: str, session_id: str, duration_s: float
    ) -> list[dict[str, Any]]: ...

    async def stop_take(self, booth_id: str, session_id: str) -> list[str]: ...


def clean_name(name: str) -> str:
    # Line breaks in a name are a header-injection attempt, not a typo: refuse them.
    if _CONTROL_RE.search(name or ""):
        raise BadInput("the name must not contain line breaks or control characters")
    name = " ".join((name or "").split())
    if not name:
        raise BadInput("enter the attendee's name")
    if len(name) > 100:
        raise BadInput("the name must be at most 100 characters")
    return name


def clean_email(email: str) -> str:
    email = (email or "").strip()
    local = email.rpartition("@")[0]
    if not local.isascii():
        # Valid (SMTPUTF8), but few relays carry it: say so, rather than "not valid".
        raise BadInput(
            f"“{email}”: letters beyond A-Z before the @ cannot be mailed from this booth; "
            "ask the attendee for another address"
        )
    if not email.isascii():
        try:  # an internationalised domain typed as such: its ASCII form (punycode)
            host = email.rpartition("@")[2].encode("idna").decode("ascii")
        except UnicodeError:
            raise BadInput(
                f"“{email}” is not a valid email address: check it with the attendee"
            ) from None
        email = f"{local}@{host}"
    if not _EMAIL_RE.match(email) or len(email) > 254:
        raise BadInput(f"“{email}” is not a valid email address: check it with the attendee")
    # And the check the email itself will pass, so that whatever the tablet takes can be
    # mailed: a refusal after training cannot be corrected (there is nothing to resend).
    try:
        mail.address("", email)
    except BadInput:
        raise BadInput(
            f"“{email}” is not a valid email address: check it with the attendee"
        ) from None
    return email


class EmailTypo(BadInput):
    """The address looks like a typo of a well-known domain: ask before sending to it."""

    def __init__(self, email: str, suggestion: str) -> None:
        super().__init__(
            f"did you mean {suggestion}? Check “{email}” with the attendee "
            "(send it again as typed to keep it)"
        )
        self.email, self.suggestion = email, suggestion


def checked_email(email: str, *, as_typed: bool = False) -> str:
    """``clean_email``, and refuse a likely domain typo unless staff kept it ``as_typed``."""
    email = clean_email(email)
    suggestion = None if as_typed else email_typos.suggest(email)
    if suggestion:
        raise EmailTypo(email, suggestion)
    return email


@dataclass
class FrontDesk:
    repo: Repository
    booth_id: str
    take_s: float
    cameras: Callable[[], list[str]]
    control: TakeController | None = None
    delete_blobs: Callable[[str], Awaitable[int] | int] | None = None
    resend_email: Callable[[str, str | None], Any] | None = None
    # Queues a session's training (booth serve's); without it the pending-job sweep does.
    enqueue: Callable[[str], Any] | None = None
    _starting: set[asyncio.Task] = field(default_factory=set, init=False, repr=False)

    def create_session(
        self, *, name: str, email: str, consent: bool, reference: str, email_as_typed: bool = False
    ) -> str:
        """``email_as_typed``: staff checked an address that looks like a typo (EmailTypo)."""
        if not consent:
            raise BadInput("no capture without consent: tick the consent box with the attendee")
        reference = (reference or "").strip()
        if not reference or len(reference) > 120 or _CONTROL_RE.search(reference):
            raise BadInput("pick a reference dance")
        return self.repo.create_session(
            booth_id=self.booth_id,
            name=clean_name(name),
            email=checked_email(email, as_typed=email_as_typed),
            consent=True,
            reference_name=reference,
            take_s=self.take_s,
            cameras=self.cameras(),
        )

    async def start(self, session_id: str, *, wait: bool = True) -> list[dict[str, Any]]:
        """Send StartTake to every camera of the booth. Pressing it twice is refused, not repeated.

        Returns the cameras' answers. ``wait=False`` (the tablet's Start button) returns
        once the session is capturing and leaves the answers to a background task: they
        come after the countdown (a camera reports once it films), and the tablet must
        show that countdown, not load after it.
        """
        session = self.repo.get_session(session_id)
        if session["state"] == State.FAILED.value:
            # The boards remember this session's take and would not film it again.
            raise Conflict("this take failed: use Start again, which makes a fresh session")
        if session["state"] != State.CREATED.value:
            raise Conflict(
                f"this session is already {session['state']}; start a new one for another take"
            )
        agents = self.control.online_agents(self.booth_id) if self.control else []
        offline = sorted(a["camera_id"] for a in agents if not a["online"])
        # Still filming another session: it would refuse this take.
        busy = sorted(
            a["camera_id"]
            for a in agents
            if a["online"] and a["state"] == "capturing" and a["session_id"] != session_id
        )
        cameras = sorted(
            a["camera_id"] for a in agents if a["online"] and a["camera_id"] not in busy
        )
        left_out = [f"{c} is offline" for c in offline] + [
            f"{c} is still filming another session" for c in busy
        ]
        if not cameras:
            why = "; ".join(left_out) or f"no camera of booth {self.booth_id} has connected"
            raise NoCameras(f"no cameras can film this take ({why}); check the boards")
        # The takes ingest waits for are these cameras' only: one left out would hold the
        # session in "capturing" until its upload deadline.
        detail = f"cameras {', '.join(cameras)}"
        if left_out:
            detail += f" (not filming: {'; '.join(left_out)})"
        # The transition is the lock: of two tablets pressing Start, one wins here.
        try:
            self.repo.transition(session_id, State.CAPTURING, detail=detail, cameras=cameras)
        except InvalidTransition:
            raise Conflict("this session was started already (by another tablet?)") from None
        run = self._start_cameras(session_id, session["take_s"], cameras, left_out)
        if wait:
            return await run
        task = asyncio.create_task(self._quietly(run, session_id))
        self._starting.add(task)  # held until done: the loop keeps only a weak reference
        task.add_done_callback(self._starting.discard)
        return []

    async def _start_cameras(
        self, session_id: str, take_s: float, cameras: list[str], left_out: list[str]
    ) -> list[dict[str, Any]]:
        assert self.control is not None
        try:
            answers = await self.control.start_take(self.booth_id, session_id, take_s)
        except BoothError as e:
            self.repo.fail(session_id, f"could not start the cameras: {e}")
            raise
        self._drop_refusing(session_id, cameras, answers, left_out)
        return answers

    @staticmethod
    async def _quietly(run: Awaitable[Any], session_id: str) -> None:
        """A background start: its failure is on the session already (the tablet shows it)."""
        try:
            await run
        except SessionNotFound:
            pass  # deleted meanwhile
        except BoothError as e:
            log.warning("session %s: the cameras did not start: %s", session_id, e)

    def _drop_refusing(
        self,
        session_id: str,
        cameras: list[str],
        answers: list[dict[str, Any]],
        left_out: list[str],
    ) -> None:
        """Cameras that answered the start with another session (or none) are not in the take."""
        refused = {
            a["camera_id"]: a.get("error") or "it did not start"
            for a in answers
            if a["camera_id"] in cameras and a["acked"] and a.get("session_id") != session_id
        }
        notes = left_out + [f"{c} refused the start: {why}" for c, why in sorted(refused.items())]
        kept = [c for c in cameras if c not in refused]
        if not kept:
            self.repo.fail(session_id, "no camera started: " + "; ".join(notes))
            raise NoCameras("no camera started this take: " + "; ".join(notes))
        if refused:
            self.repo.update_session(session_id, cameras=kept)
            log.warning("session %s: %s", session_id, "; ".join(notes))
        if notes:
            self.repo.set_progress(session_id, message="not filming: " + "; ".join(notes))

    async def stop(self, session_id: str) -> list[str]:
        """End the take early on every camera (the attendee had enough): what was filmed
        until now is uploaded and trained on as the take. Returns the cameras told."""
        session = self.repo.get_session(session_id)
        if session["state"] != State.CAPTURING.value:
            raise Conflict(f"there is no take to stop: the session is {session['state']}")
        if self.control is None:
            raise NoCameras("no control plane: the cameras cannot be reached from here")
        told = await self.control.stop_take(self.booth_id, session_id)
        if not told:
            raise NoCameras("no camera received the stop; each ends at its take length anyway")
        log.info("session %s: take stopped early on %s", session_id, ", ".join(told))
        return told

    def go_on_without_missing(self, session_id: str, now: float | None = None) -> list[str]:
        """The take is over, but a camera's upload never completed (its board went away):
        train on the cameras whose takes are in, instead of waiting out the upload
        deadline or filming the attendee again. Returns the cameras kept."""
        session = self.repo.get_session(session_id)
        if session["state"] != State.CAPTURING.value:
            raise Conflict(f"no take is waiting for uploads: the session is {session['state']}")
        now = time.time() if now is None else now
        started = session["capture_started_at"] or now
        if now < started + session["take_s"]:
            raise Conflict("the take is still being filmed: wait for it to end")
        expected = session["cameras"] or []
        done = sorted(self.repo.uploaded_cameras(session_id) & set(expected))
        if not done:
            raise Conflict(
                "no camera has finished uploading yet: wait, or delete the session and start again"
            )
        missing = sorted(set(expected) - set(done))
        try:
            self.repo.transition(
                session_id,
                State.UPLOADED,
                detail=f"went on without {', '.join(missing)}" if missing else None,
                cameras=done,
            )
        except InvalidTransition:
            raise Conflict("the session moved on meanwhile") from None
        log.info("session %s: going on with %s, without %s", session_id, done, missing)
        if self.enqueue is not None:
            self.enqueue(session_id)
        return done

    def again(self, session_id: str) -> str:
        """A failed session's attendee dances again: a fresh session with their name, email,
        consent and reference (the boards film a session once), and the failed one goes."""
        old = self.repo.get_session(session_id)
        if old["state"] != State.FAILED.value:
            raise Conflict(f"only a failed take is started again; this one is {old['state']}")
        new_id = self.repo.create_session(
            booth_id=self.booth_id,
            name=old["name"],
            email=old["email"],
            consent=True,  # given for this attendee's take, which this one replaces
            reference_name=old["reference_name"],
            take_s=self.take_s,
            cameras=self.cameras(),
        )
        with contextlib.suppress(SessionNotFound):  # a racing delete already took it
            # A tablet still showing the failed session follows to this one.
            self.repo.record_successor(session_id, new_id)
            self.delete(session_id)
        log.info("session %s failed; its attendee dances again as %s", session_id, new_id)
        return new_id

    def resend(
        self, session_id: str, new_email: str | None = None, *, email_as_typed: bool = False
    ) -> None:
        """Queue the delivery email again, to a corrected address if staff typed one."""
        session = self.repo.get_session(session_id)
        if session["state"] != State.DELIVERED.value:
            raise Conflict(f"there is nothing to resend yet: the session is {session['state']}")
        if self.resend_email is None:
            raise Conflict("email delivery is not configured on this server")
        # The deliverer stores a corrected address itself, after its own header checks.
        self.resend_email(
            session_id, checked_email(new_email, as_typed=email_as_typed) if new_email else None
        )

    def expired(self, keep_s: float, now: float | None = None) -> list[str]:
        """Sessions the booth may no longer keep: every link of theirs has expired, or
        (never delivered, so no link) they were created more than ``keep_s`` ago."""
        now = time.time() if now is None else now
        with self.repo.engine.connect() as conn:
            delivered = conn.execute(
                select(links.c.session_id)
                .join(sessions, sessions.c.id == links.c.session_id)
                .where(sessions.c.booth_id == self.booth_id)  # another booth's blobs are elsewhere
                .group_by(links.c.session_id)
                .having(func.max(links.c.expires_at) <= now)
            ).scalars()
            undelivered = conn.execute(
                select(sessions.c.id).where(
                    sessions.c.booth_id == self.booth_id,
                    sessions.c.created_at <= now - keep_s,
                    ~exists().where(links.c.session_id == sessions.c.id),
                )
            ).scalars()
            return sorted({*delivered, *undelivered})

    def delete_expired(self, keep_s: float, now: float | None = None) -> int:
        """Delete what ``expired`` lists (as the attendee's own delete would); how many."""
        n = 0
        for session_id in self.expired(keep_s, now):
            try:
                self.delete(session_id)
            except SessionNotFound:  # deleted meanwhile
                continue
            except Exception:  # noqa: BLE001 - one session must not keep the rest forever
                log.exception(
                    "could not delete a session whose retention ended; retrying next round",
                    extra={"session_id": session_id},
                )
                continue
            n += 1
        if n:
            log.info("deleted %d sessions whose retention ended", n)
        return n

    def delete(self, session_id: str) -> None:
        """Remove everything the booth holds about this attendee; their links then answer 410."""
        self.repo.get_session(session_id)  # 404 if it is already gone
        if self.delete_blobs is not None:
            self.delete_blobs(session_id)
        now = time.time()
        # One transaction, the session locked first: a delivery committing meanwhile has
        # its link tombstoned and its email deleted with the rest, or finds no session.
        with self.repo.engine.begin() as conn:
            lock_session(conn, session_id)
            hashes = [
                r.token_sha256
                for r in conn.execute(
                    select(links.c.token_sha256).where(links.c.session_id == session_id)
                )
            ]
            if hashes:  # a second delete racing this one finds them already there
                conn.execute(
                    dialect_insert(conn, link_tombstones).on_conflict_do_nothing(
                        index_elements=["token_sha256"]
                    ),
                    [{"token_sha256": h, "deleted_at": now} for h in hashes],
                )
            conn.execute(delete(outbox).where(outbox.c.session_id == session_id))
            delete_session_rows(conn, session_id)
        if self.delete_blobs is not None:
            # Again, now the tombstone is written: a worker may have written a checkpoint or
            # the video since the first pass. From here on it sees the tombstone and cleans up.
            self.delete_blobs(session_id)
        log.info("session deleted", extra={"session_id": session_id})
