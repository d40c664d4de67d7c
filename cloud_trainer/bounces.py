"""Late bounces: a relay that accepted an email may return it hours later.

A relay (the booth's smarthost, a provider's gateway) takes the message with a 250
and only then tries the attendee's mailbox; a mistyped address comes back as a
delivery status notification (DSN, RFC 3464) to the envelope sender, long after the
outbox marked the email ``sent``. Unread, the attendee never gets their video and
staff never learn why.

With ``mail.bounce_address`` set, emails go out with it as their envelope sender
(Return-Path), and ``mail.bounces_listen`` runs a small SMTP server (aiosmtpd) that
takes mail for that address only: point the bounce domain's MX record at it, or
forward the mailbox's bounces to it. Each report is read, and for every recipient
whose ``Action`` is ``failed`` the original email is found by the Message-ID in the
returned headers. A ``sent`` email becomes ``bounced`` with the server's reason,
which the tablet shows with the Resend form, as for a bounce at sending time.

What is not a failure report is accepted and dropped with a log line: a ``delayed``
or ``delivered`` report, an out-of-office reply, a bounce in a non-standard format,
or one for a Message-ID the outbox does not hold (an old or forged one). Mail for any
other address is refused at RCPT.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import re
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from typing import Any

from cloud_trainer import mail
from edge_agent.errors import BoothError

log = logging.getLogger(__name__)

MAX_REPORT_BYTES = 10 << 20  # the report may quote the whole email, poster included
_MSGID_RE = re.compile(r"<[^<>\s]+@[^<>\s]+>")


@dataclass(frozen=True)
class Failure:
    """One recipient a DSN says the message could not be delivered to."""

    message_id: str | None
    recipient: str
    status: str
    diagnostic: str

    @property
    def reason(self) -> str:
        why = self.diagnostic or (f"status {self.status}" if self.status else "no reason given")
        return f"returned by the recipient's mail server after it was sent: {why}"


def _field(block: Message, name: str) -> str:
    value = block.get(name)
    return " ".join(str(value).split()) if value is not None else ""


def _address(value: str) -> str:
    """``rfc822; ada@example.org`` -> ``ada@example.org``."""
    return value.split(";", 1)[-1].strip().strip("<>")


def _original_message_id(report: Message) -> str | None:
    """The Message-ID of the returned message: its headers ride in the report's third part."""
    for part in report.walk():
        ctype = part.get_content_type()
        if ctype == "message/rfc822":
            inner = part.get_payload()
            inner = inner[0] if isinstance(inner, list) and inner else inner
            if isinstance(inner, Message) and inner.get("Message-ID"):
                return str(inner["Message-ID"]).strip()
        elif ctype == "text/rfc822-headers":
            raw = part.get_payload(decode=True) or b""
            headers = BytesHeaderParser(policy=email.policy.default).parsebytes(raw)
            if headers.get("Message-ID"):
                return str(headers["Message-ID"]).strip()
    return None


def parse_report(raw: bytes) -> list[Failure] | None:
    """The failed recipients of a DSN; None if ``raw`` is not a delivery status report."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    if msg.get_content_type() != "multipart/report":
        return None
    status_part = next(
        (p for p in msg.walk() if p.get_content_type() == "message/delivery-status"), None
    )
    if status_part is None:
        return None
    blocks = status_part.get_payload()
    if not isinstance(blocks, list):
        return None
    message_id = _original_message_id(msg)
    if message_id is not None:
        found = _MSGID_RE.search(message_id)
        message_id = found.group(0) if found else None
    failures = []
    # The per-message fields come first, then one block per recipient; only recipient
    # blocks carry Action (some MTAs leave the per-message block out).
    for block in blocks:
        if _field(block, "Action").lower() != "failed":
            continue
        failures.append(
            Failure(
                message_id=message_id,
                recipient=_address(_field(block, "Final-Recipient")),
                status=_field(block, "Status"),
                diagnostic=_field(block, "Diagnostic-Code").split(";", 1)[-1].strip(),
            )
        )
    return failures


class BounceHandler:
    """aiosmtpd handler: mail for ``address`` only; each failure report marks its email."""

    def __init__(self, repo: Any, address: str):
        self.repo = repo
        self.address = mail.sender_address(address).addr_spec.lower()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if address.lower() != self.address:
            return f"550 5.1.1 <{address}>: this server takes only bounces for {self.address}"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        peer = session.peer[0] if session.peer else "?"
        try:
            failures = parse_report(envelope.original_content or envelope.content)
        except Exception as e:  # a malformed message is the sender's problem, not ours
            log.info("bounce from %s not readable, dropped: %s", peer, e)
            return "250 OK: not readable"
        if not failures:
            log.info("mail from %s to the bounce address is not a failure report; dropped", peer)
            return "250 OK: nothing to do"
        try:
            marked = await asyncio.to_thread(self.record, failures)
        except Exception as e:  # the database is down: the sender's MTA tries again later
            log.warning("could not record a bounce yet: %s", e)
            return "451 4.3.0 cannot record the bounce now; try again later"
        return f"250 OK: {marked} email{'s' * (marked != 1)} marked bounced"

    def record(self, failures: list[Failure]) -> int:
        marked = 0
        for f in failures:
            if f.message_id is None:
                log.info("a bounce for %s carries no Message-ID; dropped", mail.redact(f.recipient))
                continue
            if self.repo.mark_email_bounced_after_sent(f.message_id, f.reason):
                marked += 1
                log.warning(
                    "email bounced after it was sent: %s",
                    mail.redact(f.reason),
                    extra={"message_id": f.message_id, "to": mail.redact(f.recipient)},
                )
            else:
                log.info(
                    "a bounce names %s, which is not a sent email of this booth; dropped",
                    f.message_id,
                )
        return marked


class BounceServer:
    """The bounce listener on ``host:port``, in its own thread (aiosmtpd's Controller)."""

    def __init__(self, repo: Any, address: str, host: str, port: int):
        from aiosmtpd.controller import Controller

        self.handler = BounceHandler(repo, address)
        self.port = port
        self._controller = Controller(
            self.handler,
            hostname=host,
            port=port,
            data_size_limit=MAX_REPORT_BYTES,
            server_hostname="dancebooth-bounces",
            ready_timeout=10.0,
        )

    def start(self) -> BounceServer:
        try:
            self._controller.start()
        except (OSError, RuntimeError, TimeoutError) as e:
            raise BoothError(
                f"mail.bounces_listen: cannot take bounces on "
                f"{self._controller.hostname}:{self.port}: {e}"
            ) from None
        log.info("taking bounces for %s on port %d", self.handler.address, self.port)
        return self

    def stop(self) -> None:
        self._controller.stop()
