"""Mailers: where the outbox sender hands a message. Chosen by ``mail.type`` in the config.

- ``smtp``: an SMTP relay (STARTTLS and auth configurable, with timeouts).
- ``outbox``: no SMTP at all; messages land in a local maildir (``mail.maildir``),
  which any mail client or ``ls`` can read. This is the embedded default.

A mailer either returns (the message was accepted), raises ``TemporaryFailure``
(try again later: the relay is down, a 4xx reply, or a refusal that is the booth's
own doing: its sender, its login, STARTTLS, a relay that will not relay for it) or
``PermanentFailure`` (the relay refused the *recipient* for good: staff must fix the
address). Only the latter is a bounce: a misconfigured relay refuses every message
with a 5xx too, and that must not send staff after addresses that are fine, nor
end the emails for good before ops have fixed it.

Messages are built with ``email.message.EmailMessage`` and
``email.headerregistry.Address`` only, never by formatting header strings: an
attendee name typed with a CR/LF cannot inject a header (control characters in
names are replaced by spaces, and an address containing them is refused). The name
is otherwise kept as typed (``O'Brien, Jr.``): the library quotes or encodes it, and
each address header is checked to read back as written (see ``address``).

Every part is 7-bit (quoted-printable text, base64 image): smtplib declares no
``BODY=8BITMIME``, and a relay may refuse or mangle 8-bit bytes it was not told of.
"""

from __future__ import annotations

import email.errors as email_errors
import email.policy as email_policy
import logging
import mailbox
import os
import re
import smtplib
import ssl
from collections.abc import Callable
from email import message_from_bytes
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from typing import Protocol

from edge_agent.errors import BadInput, BoothError

log = logging.getLogger(__name__)

CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]+")


class SendError(BoothError):
    permanent = False

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class TemporaryFailure(SendError):
    """Try again later (connection refused, timeout, 4xx)."""


class PermanentFailure(SendError):
    """The relay refused for good (5xx); the address or message must change first."""

    permanent = True


class Mailer(Protocol):
    def send(self, msg: EmailMessage) -> None:
        """Hand ``msg`` over; return only once it was accepted."""


_FACTORIES: dict[str, Callable[..., Mailer]] = {}


def register(type_key: str) -> Callable[[Callable[..., Mailer]], Callable[..., Mailer]]:
    def deco(factory: Callable[..., Mailer]) -> Callable[..., Mailer]:
        _FACTORIES[type_key] = factory
        return factory

    return deco


def create_mailer(cfg) -> Mailer:  # cfg: OutboxMail | SmtpMail
    return _FACTORIES[cfg.type](cfg)


# ---- messages ---------------------------------------------------------------------


# What is taken out of a display name: control characters (C0, DEL and C1), and the
# brackets of an RFC 2047 encoded word. A name written as an encoded word went out as
# typed and decoded back to CR/LF: a header injection, on CPython before the fix for
# gh-121650 (3.11.10, 3.12.5). Nobody's name holds "=?" or "?=".
_NAME_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ENCODED_WORD_BRACKETS = re.compile(r"=\?|\?=")
# RFC 5322 "specials": only for the fallback in ``_checked`` (a name holding none of
# them needs no quoting, so it cannot lose its quotes when folded).
_NAME_SPECIALS = re.compile(r'[()<>\[\]:;@\\,."]')


def clean_display_name(name: str) -> str:
    """The name as typed, for an address header: control characters and encoded-word
    brackets become spaces, runs of spaces one; commas, periods and quotes stay (the
    email package quotes or RFC 2047-encodes them)."""
    name = _NAME_CONTROLS.sub(" ", name or "")
    name = _ENCODED_WORD_BRACKETS.sub(" ", name)  # a space cannot make a new "=?"
    return " ".join(name.split())[:100]


def _reads_back(addr: Address) -> bool:
    """Whether ``addr`` as a header, folded for SMTP (78 columns) and unfolded (as the
    maildir writes it), parses back to this one address with this name.

    CPython's folding has lost the quotes of a long quoted name (gh-80222, fixed only in
    2025 releases; 3.11.10 still has it): ``"Doe, Jane ..., Jr."`` became several
    recipients. Whitespace is not compared: CPython's parser keeps the space between two
    encoded words of one name that RFC 2047 (and mail clients) drop.
    """
    probe = EmailMessage()
    probe["To"] = addr
    header = probe["To"]
    for policy in (email_policy.default, email_policy.default.clone(max_line_length=0)):
        raw = policy.fold_binary("To", header)
        lines = raw.split(b"\n")
        if any(line[:1] not in (b" ", b"\t") for line in lines[1:-1]):
            return False  # a line that is not a continuation: a header of its own
        parsed = message_from_bytes(raw + b"\n", policy=email_policy.default)
        try:
            addresses = parsed["To"].addresses if parsed.keys() == ["To"] else ()
        except Exception:  # what the folding broke can break the parser too (a Group, ...)
            return False
        if len(addresses) != 1:
            return False
        back = addresses[0]
        if back.addr_spec != addr.addr_spec or "".join(back.display_name.split()) != "".join(
            addr.display_name.split()
        ):
            return False
    return True


def _checked(name: str, addr_spec: str) -> Address:
    """``Address(name, addr_spec)``; if this interpreter's email package would not write
    that back as it is (see ``_reads_back``), the name without specials, else no name."""
    for candidate in (name, " ".join(_NAME_SPECIALS.sub(" ", name).split()), ""):
        addr = Address(display_name=candidate, addr_spec=addr_spec)
        if _reads_back(addr):
            if candidate != name:
                log.info("the name in the To: line lost its punctuation: it did not read back")
            return addr
    raise BadInput(f"not a valid email address: {addr_spec!r} (it does not read back)")


def address(name: str, email: str) -> Address:
    """A safe ``Address``; BadInput for an address with control characters or no domain."""
    if CONTROL_CHARS.search(email or ""):
        raise BadInput("the email address contains a line break or control character")
    email = email.strip()
    try:
        addr = _checked(clean_display_name(name), email)
    # AttributeError: CPython's Address trips over some ("a@[b@example.org").
    except (ValueError, IndexError, AttributeError, email_errors.HeaderParseError) as e:
        raise BadInput(f"not a valid email address: {email!r} ({e})") from None
    if not addr.username or not addr.domain or "@" not in email:
        raise BadInput(f"not a valid email address: {email!r}")
    return addr


_EMAIL_RE = re.compile(r"([\w.+'-])[\w.+'-]*@([\w-]+(?:\.[\w-]+)+)")


def redact(text: object) -> str:
    """``text`` with every email address in it masked (``a***@example.com``), for logs.

    Logs outlive "delete my data", and a mail server's refusal usually quotes the
    recipient; the staff still see the whole reason on the session.
    """
    return _EMAIL_RE.sub(r"\1***@\2", str(text))


def sender_address(sender: str) -> Address:
    """Parse the configured ``"Name <addr@host>"`` sender."""
    name, addr = parseaddr(sender)
    return address(name, addr)


def new_message_id(sender: str) -> str:
    """A globally unique Message-ID on the sender's domain (the outbox's idempotency key)."""
    return make_msgid(idstring="dancebooth", domain=sender_address(sender).domain or "localhost")


def poster_cid(message_id: str) -> str:
    """The Content-ID of a message's inline poster (its HTML shows ``cid:<this>``)."""
    return "poster." + message_id.strip().strip("<>")


def build_message(
    *,
    sender: str,
    to_name: str,
    to_email: str,
    subject: str,
    text: str,
    html: str,
    message_id: str,
    reply_to: str | None = None,
    poster_jpeg: bytes | None = None,
) -> EmailMessage:
    """The message; ``poster_jpeg`` goes inside it (``multipart/related``), shown by the
    HTML as ``cid:`` + ``poster_cid(message_id)``: no remote image to block or to tell
    the sender when the mail was opened, and it still shows after the link expired."""
    msg = EmailMessage()
    msg["From"] = sender_address(sender)
    msg["To"] = address(to_name, to_email)
    if reply_to:
        msg["Reply-To"] = sender_address(reply_to)
    msg["Subject"] = CONTROL_CHARS.sub(" ", subject)
    msg["Message-ID"] = message_id
    msg["Date"] = formatdate(usegmt=True)
    # Sent by a program: out-of-office replies and autoresponders stay quiet (RFC 3834).
    msg["Auto-Submitted"] = "auto-generated"
    # Quoted-printable: 7-bit on the wire whatever the language (see the module doc).
    msg.set_content(text, cte="quoted-printable")
    msg.add_alternative(html, subtype="html", cte="quoted-printable")
    if poster_jpeg:
        html_part = msg.get_body(preferencelist=("html",))
        html_part.add_related(
            poster_jpeg,
            maintype="image",
            subtype="jpeg",
            cid=f"<{poster_cid(message_id)}>",
            disposition="inline",
            filename="poster.jpg",
        )
    return msg


# ---- backends ---------------------------------------------------------------------


@register("smtp")
class SmtpMailer:
    """One SMTP connection per message: a booth sends a few hundred emails a day."""

    def __init__(self, cfg, ssl_context: ssl.SSLContext | None = None):  # cfg: SmtpMail
        self.cfg = cfg
        # The system's trust store by default; a private relay's CA can be passed in.
        self.ssl_context = ssl_context

    def send(self, msg: EmailMessage) -> None:
        cfg = self.cfg
        try:
            smtp = smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout_s)
        except (smtplib.SMTPException, OSError) as e:  # OSError covers timeouts and refusals
            raise TemporaryFailure(f"SMTP {cfg.host}:{cfg.port} unavailable: {e}") from None
        try:
            smtp.ehlo()
            if cfg.starttls:
                smtp.starttls(context=self.ssl_context or ssl.create_default_context())
                smtp.ehlo()
            if cfg.username:
                smtp.login(cfg.username, cfg.password or "")
            # The envelope from the headers' Address objects, not from re-parsing their
            # text (which smtplib does otherwise): a quoted name must not add a recipient.
            # Bounces go to the envelope sender: mail.bounce_address where it is read.
            bounce_to = getattr(cfg, "bounce_address", None)
            refused = smtp.send_message(
                msg,
                from_addr=sender_address(bounce_to).addr_spec
                if bounce_to
                else msg["From"].addresses[0].addr_spec,
                to_addrs=[a.addr_spec for a in msg["To"].addresses],
            )
        except smtplib.SMTPRecipientsRefused as e:
            code, reason = next(iter(e.recipients.values()))
            raise _recipient_refused(code, reason) from None
        except smtplib.SMTPAuthenticationError as e:
            # Wrong credentials are an operator problem; keep the email and retry.
            raise TemporaryFailure(
                f"SMTP login refused: {e.smtp_code} {_text(e.smtp_error)}; check mail.username "
                "and mail.password"
            ) from None
        except smtplib.SMTPResponseException as e:
            # Not about the recipient: the sender (MAIL FROM), STARTTLS, the message
            # itself (DATA). The booth's settings, not the attendee's address.
            raise _relay_refused(e.smtp_code, e.smtp_error) from None
        except (smtplib.SMTPException, OSError) as e:
            raise TemporaryFailure(f"SMTP {cfg.host}:{cfg.port} failed: {e}") from None
        finally:
            _quit(smtp)
        if refused:  # one recipient per message, so this is the only one
            code, reason = next(iter(refused.values()))
            raise _recipient_refused(code, reason)


def _quit(smtp: smtplib.SMTP) -> None:
    """Say goodbye without letting a failed QUIT turn an accepted message into an error."""
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError) as e:
        log.debug("SMTP QUIT failed (the message, if accepted, stays accepted): %s", e)
        smtp.close()


def _text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)


# An enhanced status code (RFC 3463) at the start of a reply's text: 5.1.1, 4.7.0, ...
_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")


def _recipient_refused(code: int, reply: bytes | str) -> SendError:
    """RCPT TO refused: a bounce only when it is about the address (no such mailbox or
    domain, bad syntax, mailbox disabled). A policy refusal (5.7.x: relaying denied,
    not authenticated) is the booth's setup."""
    text = f"{code} {_text(reply)}"
    if not 500 <= code < 600:
        return TemporaryFailure(f"the mail server deferred the message: {text}", code)
    enhanced = _ENHANCED.match(_text(reply))
    if enhanced is not None and enhanced.group(2) == "7":
        return _relay_refused(code, reply)
    return PermanentFailure(f"the mail server refused the address: {text}", code)


def _relay_refused(code: int, reply: bytes | str) -> SendError:
    text = f"{code} {_text(reply)}"
    if 500 <= code < 600:
        return TemporaryFailure(
            f"the mail relay refused the message: {text}; check the booth's mail settings "
            "(mail.host, mail.sender, login, STARTTLS), then the email is sent again",
            code,
        )
    return TemporaryFailure(f"the mail server deferred the message: {text}", code)


@register("outbox")
class MaildirMailer:
    """Delivers into a maildir: ``mailbox.Maildir.add`` writes tmp/ then renames into new/."""

    def __init__(self, cfg):  # cfg: OutboxMail
        self.cfg = cfg

    def send(self, msg: EmailMessage) -> None:
        try:
            box = mailbox.Maildir(str(self.cfg.maildir), create=True)
            box.add(msg)  # fsyncs the file, then links it from tmp/ into new/
            # ... but not the directory; the sent-log written next must not outlive
            # the message it vouches for.
            _fsync(os.path.join(str(self.cfg.maildir), "new"))
        except OSError as e:
            raise TemporaryFailure(f"cannot write to maildir {self.cfg.maildir}: {e}") from None


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
