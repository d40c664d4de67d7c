"""Late bounces: a failure report that comes back after the relay accepted the email.

Real servers on loopback: an aiosmtpd relay that accepts everything (as a smarthost
does, bouncing later), and the booth's own bounce listener, to which the reports are
sent over SMTP as the relay's MTA would send them.
"""

from __future__ import annotations

import smtplib
from email.message import EmailMessage

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from smtp_capture import SmtpServer, free_port
from test_deliver import deliver_one, smtp_cfg

from cloud_trainer import deliver
from cloud_trainer.bounces import BounceServer, parse_report
from cloud_trainer.config import SmtpMail
from cloud_trainer.repository.counters import EMAILS
from edge_agent.errors import BoothError

# The fixtures settings, repo and deliverer come from test_deliver (SQLite and PostgreSQL).
from test_deliver import deliverer, repo, settings  # noqa: F401  isort: skip

BOUNCES = "bounces@booth.example"
DIAGNOSTIC = "550 5.1.1 <ada@example.org>: Recipient address rejected: User unknown"


def report(
    original: EmailMessage | bytes,
    *,
    action: str = "failed",
    status: str = "5.1.1",
    recipient: str = "ada@example.org",
    returned: str = "message/rfc822",
) -> bytes:
    """A DSN as Postfix writes one (RFC 3464), returning the original or its headers."""
    raw = original if isinstance(original, bytes) else original.as_bytes()
    if returned == "text/rfc822-headers":
        raw = raw.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0] + b"\n"
    return b"".join(
        [
            b"From: MAILER-DAEMON@relay.example (Mail Delivery System)\n",
            f"To: {BOUNCES}\n".encode(),
            b"Subject: Undelivered Mail Returned to Sender\n",
            b"MIME-Version: 1.0\n",
            b'Content-Type: multipart/report; report-type=delivery-status; boundary="B0"\n\n',
            b"--B0\nContent-Type: text/plain\n\nI'm sorry to have to inform you that your message "
            b"could not be delivered to one or more recipients.\n\n",
            b"--B0\nContent-Type: message/delivery-status\n\n",
            b"Reporting-MTA: dns; relay.example\nArrival-Date: Fri, 27 Nov 2026 10:00:00 +0000\n\n",
            f"Final-Recipient: rfc822; {recipient}\nOriginal-Recipient: rfc822;{recipient}\n".encode(),
            f"Action: {action}\nStatus: {status}\nRemote-MTA: dns; mx.example.org\n".encode(),
            f"Diagnostic-Code: smtp; {DIAGNOSTIC}\n\n".encode(),
            f"--B0\nContent-Type: {returned}\n\n".encode(),
            raw,
            b"\n--B0--\n",
        ]
    )


def send_to(port: int, raw: bytes, rcpt: str = BOUNCES) -> dict:
    wire = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # smtplib sends bytes as is
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        return smtp.sendmail("", [rcpt], wire)


@pytest.fixture
def relay():
    server = SmtpServer().start()
    yield server
    server.stop()


@pytest.fixture
def listener(repo):  # noqa: F811
    server = BounceServer(repo, f"Booth bounces <{BOUNCES}>", "127.0.0.1", free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def sent(deliverer, repo, relay, tmp_path):  # noqa: F811
    """A delivered session whose email the relay accepted, sent with the bounce address."""
    sid, _ = deliver_one(deliverer, repo)
    cfg = smtp_cfg(tmp_path, relay.port).model_copy(update={"bounce_address": BOUNCES})
    assert deliver.OutboxSender(repo, cfg).run_once().sent == 1
    [msg] = relay.messages
    return sid, msg


def test_a_failure_report_after_sending_marks_the_email_bounced(sent, repo, relay, listener):  # noqa: F811
    sid, msg = sent
    # The envelope sender is the bounce address, so the relay returns the email there;
    # the From: the attendee sees is still the booth's.
    assert relay.handler.envelopes[0][0] == BOUNCES
    assert msg["From"].addresses[0].addr_spec == "booth@booth.example"
    assert repo.email_status(sid)["state"] == "sent"
    sent_before = repo.counter_values()[EMAILS]["sent"]

    send_to(listener.port, report(msg))
    status = repo.email_status(sid)
    assert status["state"] == "bounced"
    assert "after it was sent" in status["reason"] and DIAGNOSTIC in status["reason"]
    counts = repo.counter_values()[EMAILS]
    assert counts["bounced_later"] == 1 and counts["sent"] == sent_before

    # The same report again (the relay retried) changes nothing and counts nothing.
    send_to(listener.port, report(msg))
    assert repo.counter_values()[EMAILS]["bounced_later"] == 1


def test_a_report_returning_only_the_headers_is_read_too(sent, repo, listener):  # noqa: F811
    sid, msg = sent
    send_to(listener.port, report(msg, returned="text/rfc822-headers"))
    assert repo.email_status(sid)["state"] == "bounced"


def test_what_is_not_a_failure_report_changes_nothing(sent, repo, listener):  # noqa: F811
    sid, msg = sent
    # "Delayed": the relay is still trying.
    send_to(listener.port, report(msg, action="delayed", status="4.4.1"))
    # An out-of-office reply quoting the email's Message-ID.
    ooo = EmailMessage()
    ooo["From"], ooo["To"], ooo["Subject"] = "ada@example.org", BOUNCES, "Out of office"
    ooo["In-Reply-To"] = msg["Message-ID"]
    ooo.set_content(f"I am away until Monday. Re: {msg['Message-ID']}")
    send_to(listener.port, ooo.as_bytes())
    # A report for an email this booth never sent (old, or forged).
    other = EmailMessage()
    other["Message-ID"] = "<1.2.3.dancebooth@booth.example>"
    other.set_content("x")
    send_to(listener.port, report(other))
    # Garbage.
    send_to(listener.port, b"\x00\xff not a message at all\n")
    assert repo.email_status(sid)["state"] == "sent"


def test_mail_for_any_other_address_is_refused(listener):
    with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
        send_to(listener.port, b"Subject: hi\n\nhello\n", rcpt="staff@booth.example")
    code, reason = e.value.recipients["staff@booth.example"]
    assert code == 550 and BOUNCES.encode() in reason


def test_parse_report_reads_the_failed_recipients_only():
    original = EmailMessage()
    original["Message-ID"] = "<42.dancebooth@booth.example>"
    original.set_content("hello")
    [failure] = parse_report(report(original))
    assert failure.message_id == "<42.dancebooth@booth.example>"
    assert (failure.recipient, failure.status) == ("ada@example.org", "5.1.1")
    assert failure.diagnostic == DIAGNOSTIC
    assert parse_report(report(original, action="delivered", status="2.0.0")) == []
    assert parse_report(b"Subject: hello\n\nnot a report\n") is None


def test_a_port_in_use_is_one_clear_error(repo):  # noqa: F811
    taken = BounceServer(repo, BOUNCES, "127.0.0.1", free_port()).start()
    try:
        with pytest.raises(BoothError, match="cannot take bounces on 127.0.0.1"):
            BounceServer(repo, BOUNCES, "127.0.0.1", taken.port).start()
    finally:
        taken.stop()


def test_config_takes_a_host_and_port_and_an_address():
    assert SmtpMail(bounce_address=BOUNCES, bounces_listen="0.0.0.0:2525").bounces_listen
    assert SmtpMail(bounce_address="", bounces_listen=" ").bounces_listen is None  # ${VAR:-}
    with pytest.raises(ValueError, match="not host:port"):
        SmtpMail(bounce_address=BOUNCES, bounces_listen="2525")
    with pytest.raises(ValueError, match="not an email address"):
        SmtpMail(bounce_address="bounces")


@hypothesis_settings(max_examples=150, deadline=None)
@given(
    st.binary(max_size=2000)
    | st.builds(
        lambda a, s, mid, junk: report(b"Message-ID: " + mid + b"\n\n" + junk, action=a, status=s),
        st.text("failedyAD \t", max_size=12),
        st.text("0123456789.x", max_size=8),
        st.binary(max_size=80),
        st.binary(max_size=300),
    )
)
def test_parse_report_never_raises(raw):
    out = parse_report(raw)
    assert out is None or all(isinstance(f.reason, str) for f in out)
