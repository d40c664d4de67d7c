"""Deliver: mark the session delivered, give it a link, and email the attendee exactly once.

Two halves, in different processes:

1. ``Deliverer.deliver`` (the worker, after rendering) writes, in ONE database
   transaction, the session's move to ``delivered`` with its video keys, the new
   link's hash and the email as an outbox row. Either all of it happened or none.
2. ``OutboxSender`` (``python -m cloud_trainer.deliver``, or a thread of
   ``booth serve``/``booth demo``) sends due outbox rows through the configured
   mailer, retries temporary failures with exponential backoff, and records
   sent, bounced (a 5xx reply: the reason is shown on the session, staff correct
   the address and resend) and failed (too many attempts).

Exactly once, and where it is only "at most one duplicate"
-----------------------------------------------------------
A row is moved to ``sending`` and committed *before* SMTP (a lease until
``next_attempt_at``). After the relay accepts the message its Message-ID is
appended and fsynced to a local **sent-log** file, and only then is the row
marked ``sent``. A sender that finds a row whose lease expired while
``sending`` (its sender died) consults the sent-log: a Message-ID there was
accepted and is marked ``sent`` without a second send; one not there was never
accepted, or was accepted in the few microseconds between the relay's 250 reply
and the sent-log's fsync. That last window cannot be closed from the sending
side (SMTP has no way to ask "did you get Message-ID X?"); a message resent
from it carries the *same* Message-ID, which receiving systems use to drop
duplicates. ``tests/cloud_trainer/test_deliver.py`` demonstrates both sides.

The sent-log is local to the machine that sends, so run one sender per outbox
database (the embedded default does), or give several senders a shared sent-log.

Test hook (documented, in the real code path): with ``BOOTH_MAIL_CRASH_POINT``
set to ``after_accept`` or ``after_sent_log``, the sender SIGKILLs itself right
after the mailer accepted a message, before (or after) writing the sent-log and
always before updating the row, so tests can crash it exactly there.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jinja2

from cloud_trainer import links as links_mod
from cloud_trainer import mail
from cloud_trainer.session import State
from edge_agent.errors import BadInput, BoothError

log = logging.getLogger(__name__)

CRASH_ENV = "BOOTH_MAIL_CRASH_POINT"
TEMPLATES = Path(__file__).parent / "templates" / "email"
# The maildir mailer has no retry settings of its own; a full disk is the only
# temporary failure it knows, and these are generous for that.
_DEFAULT_MAX_ATTEMPTS = 8
_DEFAULT_BACKOFF_S = (30.0, 3600.0)
# A claimed row is leased this much longer than the SMTP timeout allows for a send.
_LEASE_MARGIN_S = 60.0


def _crash_point(name: str) -> None:
    """Test hook: die here, uncleanly, if the environment asks for it (see module doc)."""
    if os.environ.get(CRASH_ENV) == name:
        log.warning("test hook %s=%s: killing the sender", CRASH_ENV, name)
        os.kill(os.getpid(), signal.SIGKILL)


# ---- the sent-log ------------------------------------------------------------------


class SentLog:
    """Append-only, fsynced file of Message-IDs the mailer accepted, one per line.

    A few hundred lines a day; the whole file is read when a sender starts.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._ids: set[str] | None = None
        self._lock = threading.Lock()

    def _load(self) -> set[str]:
        if self._ids is None:
            try:
                text = self.path.read_text(encoding="utf-8")
            except FileNotFoundError:
                text = ""
            # A torn last line (crash mid-append) is not a Message-ID: they end with '>'.
            self._ids = {ln for ln in text.splitlines() if ln.startswith("<") and ln.endswith(">")}
        return self._ids

    def __contains__(self, message_id: str) -> bool:
        with self._lock:
            return message_id in self._load()

    def record(self, message_id: str) -> None:
        with self._lock:
            ids = self._load()
            new_file = not self.path.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                # A leading newline ends a torn line a crash may have left.
                os.write(fd, f"\n{message_id}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            if new_file:
                dfd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            ids.add(message_id)


# ---- the sender ------------------------------------------------------------------------


@dataclass
class SendReport:
    sent: int = 0
    retried: int = 0
    bounced: int = 0
    failed: int = 0
    recovered: int = 0
    errors: list[str] = field(default_factory=list)


class OutboxSender:
    def __init__(
        self,
        repo: Any,
        mail_cfg: Any,
        *,
        mailer: mail.Mailer | None = None,
        clock: Any = time.time,
        batch: int = 20,
        store: Any = None,
    ):
        self.repo = repo
        # Where the sessions' posters are, to carry each inside its email (None: the
        # email shows only the poster's alt text).
        self.store = store
        self.cfg = mail_cfg
        self.mailer = mailer if mailer is not None else mail.create_mailer(mail_cfg)
        self.sent_log = SentLog(mail_cfg.sent_log)
        self.clock = clock
        self.batch = batch
        self.max_attempts = getattr(mail_cfg, "max_attempts", _DEFAULT_MAX_ATTEMPTS)
        self.backoff_initial_s = getattr(mail_cfg, "backoff_initial_s", _DEFAULT_BACKOFF_S[0])
        self.backoff_max_s = getattr(mail_cfg, "backoff_max_s", _DEFAULT_BACKOFF_S[1])
        self.lease_s = getattr(mail_cfg, "timeout_s", 10.0) * 4 + _LEASE_MARGIN_S

    def backoff_s(self, attempts: int) -> float:
        """Exponential backoff with +-20% jitter so many queued emails do not retry in lockstep."""
        base = min(self.backoff_initial_s * 2 ** max(0, attempts - 1), self.backoff_max_s)
        return base * random.uniform(0.8, 1.2)

    def recover(self, now: float | None = None) -> int:
        """Settle rows left ``sending`` by a sender that died (lease expired). See module doc."""
        now = self.clock() if now is None else now
        n = 0
        for row in self.repo.expired_sending(now):
            if row["message_id"] in self.sent_log:
                if self.repo.mark_email_sent(row["id"], now):
                    log.info(
                        "recovered email already accepted; not sending again",
                        extra={"message_id": row["message_id"], "session_id": row["session_id"]},
                    )
                    n += 1
            elif self.repo.release_email(
                row["id"], now, "the previous send attempt was interrupted; sending again"
            ):
                log.warning(
                    "recovered interrupted email; it was never accepted, sending again",
                    extra={"message_id": row["message_id"], "session_id": row["session_id"]},
                )
                n += 1
        return n

    def run_once(self, now: float | None = None) -> SendReport:
        """Recover expired leases, then send every due row once. Never raises for one bad row."""
        now = self.clock() if now is None else now
        report = SendReport(recovered=self.recover(now))
        for row in self.repo.claim_emails(now, self.lease_s, self.batch):
            self._send_row(row, now, report)
        return report

    def _send_row(self, row: dict[str, Any], now: float, report: SendReport) -> None:
        mid, row_id = row["message_id"], row["id"]
        where = {
            "message_id": mid,
            "session_id": row["session_id"],
            "to": mail.redact(row["to_addr"]),
        }
        if mid in self.sent_log:  # accepted before, but the row update never happened
            self.repo.mark_email_sent(row_id, now)
            report.sent += 1
            return
        try:
            msg = mail.build_message(
                sender=self.cfg.sender,
                to_name=row.get("to_name") or "",
                to_email=row["to_addr"],
                subject=row["subject"],
                text=row["body_text"],
                html=row["body_html"],
                message_id=mid,
                reply_to=getattr(self.cfg, "reply_to", None),
                poster_jpeg=self._poster(row),
            )
            self.mailer.send(msg)
        except BadInput as e:  # an address no mail server could take
            self.repo.mark_email_failed(row_id, str(e), bounced=True)
            report.bounced += 1
            report.errors.append(str(e))
            log.warning("email refused before sending: %s", mail.redact(e), extra=where)
            return
        except mail.PermanentFailure as e:
            self.repo.mark_email_failed(row_id, str(e), bounced=True)
            report.bounced += 1
            report.errors.append(str(e))
            log.warning("email bounced: %s", mail.redact(e), extra=where)
            return
        except Exception as e:  # a bug or an unexpected library error: keep the row alive
            if not isinstance(e, mail.TemporaryFailure):
                log.exception("unexpected error sending an email", extra=where)
                e = mail.TemporaryFailure(f"unexpected error: {type(e).__name__}: {e}")
            report.errors.append(str(e))
            if row["attempts"] >= self.max_attempts:
                self.repo.mark_email_failed(
                    row_id, f"gave up after {row['attempts']} attempts: {e}"
                )
                report.failed += 1
                log.error("email failed for good: %s", mail.redact(e), extra=where)
            else:
                delay = self.backoff_s(row["attempts"])
                self.repo.mark_email_retry(row_id, str(e), now + delay)
                report.retried += 1
                log.info("email deferred %.0fs: %s", delay, mail.redact(e), extra=where)
            return
        _crash_point("after_accept")
        self.sent_log.record(mid)
        _crash_point("after_sent_log")
        self.repo.mark_email_sent(row_id, self.clock())
        report.sent += 1
        log.info("email sent", extra=where)

    def _poster(self, row: dict[str, Any]) -> bytes | None:
        """The session's poster, if its email's HTML shows it inline and it can be had."""
        if self.store is None or f"cid:{mail.poster_cid(row['message_id'])}" not in (
            row.get("body_html") or ""
        ):
            return None
        try:
            key = self.repo.get_session(row["session_id"]).get("poster_key")
            return self.store.get(key) if key else None
        except Exception as e:  # the email goes without its picture rather than not at all
            log.warning(
                "email sent without its poster: %s",
                e,
                extra={"message_id": row["message_id"], "session_id": row["session_id"]},
            )
            return None

    def run_forever(self, stop: threading.Event, poll_s: float = 2.0) -> None:
        """Send until ``stop`` is set. Database outages are logged and retried."""
        while not stop.is_set():
            try:
                self.run_once()
            except Exception as e:  # a database outage must not end the sender thread
                log.error("outbox pass failed, retrying in %.0fs: %s", poll_s, e)
            stop.wait(poll_s)


# ---- composing and queueing ---------------------------------------------------------------


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=lambda name: bool(name) and name.endswith(".html.j2"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def email_time(ts: float, tz: str) -> str:
    """``26 December 2026, 18:30 (Europe/Berlin)``."""
    when = datetime.fromtimestamp(ts, tz=ZoneInfo(tz))
    return f"{when.day} {when:%B %Y, %H:%M} ({tz})"


def compose(
    *,
    name: str,
    booth: str,
    dance: str,
    base_url: str,
    token: str,
    expires_at: float,
    expiry_days: float,
    poster_width: int = 480,
    tz: str = "UTC",
    poster_cid: str | None = None,
) -> dict[str, str]:
    """Subject, text and HTML of the delivery email.

    ``poster_cid``: the HTML shows the poster carried inside the message (see
    ``mail.build_message``); without it, from the link's poster URL.
    """
    env = _env()
    ctx = {
        # The body shows the name as typed (Jinja escapes it in HTML); only control
        # characters go. Header-safety (clean_display_name) is for the To: line.
        "name": " ".join(mail.CONTROL_CHARS.sub(" ", name or "").split()) or "there",
        "booth": booth,
        "dance": dance,
        "watch_url": links_mod.watch_url(base_url, token),
        "poster_src": (
            f"cid:{poster_cid}" if poster_cid else links_mod.poster_url(base_url, token)
        ),
        # The moment it stops, in the booth's zone: a date alone read as "all of that day".
        "expires": email_time(expires_at, tz),
        "expiry_days": f"{expiry_days:g}",
        "poster_width": poster_width,
    }
    return {
        "subject": f"Your dance video from {booth}",
        "body_text": env.get_template("delivered.txt.j2").render(ctx),
        "body_html": env.get_template("delivered.html.j2").render(ctx),
    }


class Deliverer:
    """Delivery and resend, as the worker and the staff tablet call them."""

    def __init__(self, repo: Any, store: Any, settings: Any):
        self.repo = repo
        self.store = store
        self.settings = settings

    def _email(self, session: dict[str, Any], link: links_mod.Link) -> dict[str, Any]:
        from cloud_trainer.reference import title  # numpy and OpenCV: delivery only

        s = self.settings
        message_id = mail.new_message_id(s.mail.sender)
        body = compose(
            name=session["name"],
            booth=s.booth.name,
            # As the tablet names it ("dance #3 (synthetic)", "salsa basic"), not its key.
            dance=title(session["reference_name"]),
            base_url=s.web.base_url,
            token=link.token,
            expires_at=link.expires_at,
            expiry_days=s.links.expiry_days,
            tz=s.booth.timezone,
            poster_cid=mail.poster_cid(message_id),
        )
        # Refuse an address with CR/LF now, not in the sender: staff see it at once.
        mail.address(session["name"], session["email"])
        return {
            "message_id": message_id,
            "to_addr": session["email"].strip(),
            **body,
        }

    @staticmethod
    def _link_row(link: links_mod.Link) -> dict[str, Any]:
        return {
            "token_sha256": links_mod.hash_token(link.token),
            "created_at": link.created_at,
            "expires_at": link.expires_at,
        }

    def deliver(
        self,
        session_id: str,
        *,
        video_key: str,
        poster_key: str,
        side_by_side_key: str | None = None,
        now: float | None = None,
    ) -> links_mod.Link:
        """Session -> delivered + link + queued email, in one transaction. Returns the link."""
        session = self.repo.get_session(session_id)
        link = links_mod.new_link(session_id, self.settings.links.expiry_days, now)
        self.repo.deliver_session(
            session_id,
            email=self._email(session, link),
            link=self._link_row(link),
            detail="video rendered; email queued",
            video_key=video_key,
            poster_key=poster_key,
            side_by_side_key=side_by_side_key,
        )
        log.info("session delivered", extra={"session_id": session_id})
        return link

    def resend(self, session_id: str, new_email: str | None = None) -> str:
        """Queue a NEW message (new Message-ID, fresh link), to a corrected address if given.

        Returns the new Message-ID. A plain resend leaves the old links valid until they
        expire. A corrected address revokes them and cancels unsent emails: they went
        (or would go) to a mailbox that is not the attendee's, and each link can delete
        the attendee's data.
        """
        session = self.repo.get_session(session_id)
        if session["state"] != State.DELIVERED.value:
            raise BoothError(f"there is nothing to resend yet: the session is {session['state']}")
        link = links_mod.new_link(session_id, self.settings.links.expiry_days)
        corrected = (new_email or "").strip()
        if corrected and corrected.lower() != (session["email"] or "").strip().lower():
            mail.address(session["name"], corrected)  # refuse before changing anything
            email = self._email({**session, "email": corrected}, link)
            self.repo.readdress_email(session_id, corrected, email=email, link=self._link_row(link))
        else:
            email = self._email(session, link)
            self.repo.enqueue_email(session_id, email=email, link=self._link_row(link))
        log.info(
            "email queued again",
            extra={"session_id": session_id, "to": mail.redact(email["to_addr"])},
        )
        return email["message_id"]


# ---- python -m cloud_trainer.deliver ---------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the outbox sender alone: ``python -m cloud_trainer.deliver CONFIG [--once]``."""
    from cloud_trainer.config import load_config, refuse_placeholders
    from cloud_trainer.repository import Repository

    p = argparse.ArgumentParser(prog="python -m cloud_trainer.deliver", description=__doc__)
    p.add_argument("config")
    p.add_argument("--once", action="store_true", help="send what is due, then exit")
    p.add_argument("--poll-s", type=float, default=2.0)
    args = p.parse_args(argv)
    from cloud_trainer.cli import configure_logging

    configure_logging(0)
    try:
        cfg = load_config(args.config)
        refuse_placeholders(cfg, ("mail",))
        repo = Repository.from_config(cfg.database)
        from cloud_trainer.storage import create_blob_store

        sender = OutboxSender(repo, cfg.mail, store=create_blob_store(cfg.storage))
        if args.once:
            r = sender.run_once()
            print(
                f"sent {r.sent}, retried {r.retried}, bounced {r.bounced}, failed {r.failed}, "
                f"recovered {r.recovered}"
            )
            return 0
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        sender.run_forever(stop, args.poll_s)
        return 0
    except (BoothError, ValueError) as e:
        print(f"outbox sender: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
