"""A real SMTP server (aiosmtpd) on loopback that captures what it accepts.

Shared by test_mail.py and test_deliver.py. Addresses in ``reject`` get a
permanent 550 at RCPT time, like a relay refusing an unknown mailbox. ``replies``
sets a stage's reply (``"MAIL"``, ``"RCPT"``, ``"DATA"``), like a relay that refuses
the booth's sender, will not relay for it, or refuses the message itself.
"""

from __future__ import annotations

import email
import email.policy
import socket
import ssl
import threading
from email.message import EmailMessage

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CapturingHandler:
    def __init__(
        self,
        reject: set[str] | None = None,
        quit_reply: str | None = None,
        replies: dict[str, str] | None = None,
    ):
        self.reject = {a.lower() for a in (reject or set())}
        self.quit_reply = quit_reply
        self.replies = dict(replies or {})
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self._lock = threading.Lock()

    async def handle_MAIL(self, server, session, envelope, address, mail_options):  # noqa: N802
        if "MAIL" in self.replies:
            return self.replies["MAIL"]
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if "RCPT" in self.replies:
            return self.replies["RCPT"]
        if address.lower() in self.reject:
            return f"550 5.1.1 <{address}>: Recipient address rejected: mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_QUIT(self, server, session, envelope):  # noqa: N802
        return self.quit_reply or "221 Bye"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        if "DATA" in self.replies:
            return self.replies["DATA"]
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self._lock:
            self.messages.append(msg)
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 2.0.0 Message accepted for delivery"


class SmtpServer:
    """Start and stop an aiosmtpd server on a fixed port (so it can be 'down' and come back)."""

    def __init__(
        self,
        port: int | None = None,
        reject: set[str] | None = None,
        *,
        tls_context: ssl.SSLContext | None = None,
        credentials: tuple[str, str] | None = None,
        quit_reply: str | None = None,
        replies: dict[str, str] | None = None,
    ):
        self.port = port or free_port()
        self.handler = CapturingHandler(reject, quit_reply, replies)
        self.tls_context = tls_context
        self.credentials = credentials
        self._controller: Controller | None = None

    @property
    def messages(self) -> list[EmailMessage]:
        return self.handler.messages

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and self.credentials is not None
            and (auth_data.login.decode(), auth_data.password.decode()) == self.credentials
        )
        return AuthResult(success=ok, handled=False)

    def start(self) -> SmtpServer:
        kwargs: dict = {}
        if self.tls_context is not None:
            kwargs.update(tls_context=self.tls_context, require_starttls=True)
        if self.credentials is not None:
            kwargs.update(authenticator=self._authenticate, auth_required=True)
            kwargs["auth_require_tls"] = self.tls_context is not None
        self._controller = Controller(
            self.handler, hostname="127.0.0.1", port=self.port, ready_timeout=10, **kwargs
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
