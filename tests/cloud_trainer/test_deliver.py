"""Delivery and the outbox: one transaction, exactly one email, bounces staff can fix.

The SMTP server is a real aiosmtpd on loopback; the crash test kills a real sender
process with SIGKILL at the documented hook in the sender's code path.
"""

from __future__ import annotations

import mailbox
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy
import yaml
from smtp_capture import SmtpServer, free_port

from cloud_trainer import deliver, links
from cloud_trainer.config import BoothConfig, LocalStorage, OutboxMail, SmtpMail
from cloud_trainer.repository import Repository
from cloud_trainer.session import State
from cloud_trainer.storage import create_blob_store
from edge_agent.errors import BadInput, BoothError

ROOT = Path(__file__).resolve().parents[2]
REJECTED = "typo@example.org"


@pytest.fixture
def settings(tmp_path, db_config) -> BoothConfig:
    """Embedded defaults on SQLite and on PostgreSQL (``db_config`` from conftest)."""
    cfg = BoothConfig()
    cfg.database = db_config
    cfg.storage = LocalStorage(root=tmp_path / "blobs")
    cfg.web.base_url = "https://booth.example"
    cfg.mail = OutboxMail(maildir=tmp_path / "maildir", sent_log=tmp_path / "sent.log")
    return cfg


@pytest.fixture
def repo(settings):
    r = Repository.from_config(settings.database)
    yield r
    r.close()


@pytest.fixture
def deliverer(settings, repo):
    return deliver.Deliverer(repo, create_blob_store(settings.storage), settings)


def smtp_cfg(tmp_path, port: int) -> SmtpMail:
    return SmtpMail(
        host="127.0.0.1",
        port=port,
        timeout_s=5,
        sender="dancebooth <booth@booth.example>",
        sent_log=tmp_path / "sent.log",
        max_attempts=4,
    )


def rendered_session(repo, email: str = "ada@example.org", name: str = "Ada Lovelace") -> str:
    sid = repo.create_session(
        booth_id="booth-1",
        name=name,
        email=email,
        consent=True,
        reference_name="synthetic:1",
        take_s=5,
        cameras=["cam0"],
    )
    for state in ("capturing", "uploaded", "training", "rendering"):
        repo.transition(sid, state)
    return sid


def deliver_one(deliverer, repo, **kw) -> tuple[str, links.Link]:
    sid = rendered_session(repo, **kw)
    link = deliverer.deliver(
        sid, video_key=f"sessions/{sid}/video/final.mp4", poster_key=f"sessions/{sid}/video/p.jpg"
    )
    return sid, link


def token_in(text: str) -> str:
    return re.search(r"/v/([A-Za-z0-9_\-]{43})", text).group(1)


def test_delivery_writes_state_link_and_email_in_one_transaction(deliverer, repo):
    sid, link = deliver_one(deliverer, repo)
    s = repo.get_session(sid)
    assert s["state"] == State.DELIVERED.value and s["video_key"].endswith("final.mp4")
    [row] = repo.emails(sid)
    assert row["state"] == "pending" and row["to_addr"] == "ada@example.org"
    assert links.watch_url("https://booth.example", link.token) in row["body_text"]
    assert f'src="cid:poster.{row["message_id"].strip("<>")}"' in row["body_html"]
    assert links.resolve(repo, link.token)["id"] == sid

    # If the outbox insert fails, the session is not delivered and no link exists.
    other = rendered_session(repo)
    dup = dict(row, to_addr="x@example.org")
    email = {k: dup[k] for k in ("message_id", "to_addr", "subject", "body_text", "body_html")}
    link_row = {"token_sha256": "0" * 64, "created_at": 1.0, "expires_at": 2.0}
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        repo.deliver_session(other, email=email, link=link_row, video_key="k")
    assert repo.get_session(other)["state"] == State.RENDERING.value
    assert repo.get_link("0" * 64) is None and repo.emails(other) == []


def test_templates_escape_the_name_in_html_and_refuse_cr_lf_addresses(deliverer, repo):
    sid, _ = deliver_one(deliverer, repo, name="<script>alert(1)</script>")
    [row] = repo.emails(sid)
    assert "<script>" not in row["body_html"] and "&lt;script&gt;" in row["body_html"]
    bad = rendered_session(repo, email="eve@example.org\r\nBcc: x@evil.example")
    with pytest.raises(BadInput):
        deliverer.deliver(bad, video_key="k", poster_key="p")
    assert repo.get_session(bad)["state"] == State.RENDERING.value


def test_embedded_default_lands_in_the_maildir_exactly_once(deliverer, repo, settings):
    sid, link = deliver_one(deliverer, repo)
    sender = deliver.OutboxSender(repo, settings.mail)
    assert sender.run_once().sent == 1
    assert sender.run_once().sent == 0
    [msg] = list(mailbox.Maildir(str(settings.mail.maildir), create=False))
    text = msg.get_payload()[0].get_payload(decode=True).decode()
    assert links.resolve(repo, token_in(text))["id"] == sid
    assert repo.email_status(sid)["state"] == "sent"


def test_smtp_outage_then_recovery_sends_exactly_one_email(deliverer, repo, tmp_path):
    port = free_port()
    server = SmtpServer(port)  # not started: the relay is down
    sid, _ = deliver_one(deliverer, repo)
    sender = deliver.OutboxSender(repo, smtp_cfg(tmp_path, port))
    t0 = time.time()
    r = sender.run_once(now=t0)
    assert r.retried == 1 and r.sent == 0
    status = repo.email_status(sid)
    assert status["state"] == "pending" and "unavailable" in status["reason"]
    [row] = repo.emails(sid)
    assert row["next_attempt_at"] > t0  # backing off
    assert sender.run_once(now=t0 + 1).sent == 0  # not due yet: no attempt
    server.start()
    try:
        later = t0 + sender.backoff_max_s * 2
        assert sender.run_once(now=later).sent == 1
        assert sender.run_once(now=later + 10**6).sent == 0
        assert len(server.messages) == 1
        assert server.messages[0]["Message-ID"] == row["message_id"]
        assert repo.email_status(sid)["state"] == "sent"
        # Sent: its body (with a working link) is no longer kept.
        [sent] = repo.emails(sid)
        assert token_in(row["body_text"]) and sent["body_text"] == sent["body_html"] == ""
    finally:
        server.stop()


def test_retries_give_up_as_failed_after_max_attempts(deliverer, repo, tmp_path):
    sid, _ = deliver_one(deliverer, repo)
    sender = deliver.OutboxSender(repo, smtp_cfg(tmp_path, free_port()))
    now = time.time()
    for _ in range(sender.max_attempts):
        sender.run_once(now=now)
        now += sender.backoff_max_s * 2
    status = repo.email_status(sid)
    assert status["state"] == "failed" and "gave up after 4 attempts" in status["reason"]


def _run_sender_process(
    settings, tmp_path, port: int, crash_point: str
) -> subprocess.CompletedProcess:
    cfg_path = tmp_path / "booth.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "database": settings.database.model_dump(mode="json"),
                "mail": {
                    "type": "smtp",
                    "host": "127.0.0.1",
                    "port": port,
                    "timeout_s": 5,
                    "sender": "dancebooth <booth@booth.example>",
                    "sent_log": str(tmp_path / "sent.log"),
                },
            }
        )
    )
    env = dict(os.environ, **{deliver.CRASH_ENV: crash_point})
    return subprocess.run(
        [sys.executable, "-m", "cloud_trainer.deliver", str(cfg_path), "--once"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_sender_killed_after_smtp_accepted_does_not_send_twice(deliverer, repo, settings, tmp_path):
    server = SmtpServer().start()
    try:
        sid, _ = deliver_one(deliverer, repo)
        proc = _run_sender_process(settings, tmp_path, server.port, "after_sent_log")
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert len(server.messages) == 1
        assert repo.email_status(sid)["state"] == "sending"  # the row update never happened

        restarted = deliver.OutboxSender(repo, smtp_cfg(tmp_path, server.port))
        r = restarted.run_once()  # the dead sender's lease has not run out: hands off
        assert r.sent == 0 and r.recovered == 0
        r = restarted.run_once(now=time.time() + restarted.lease_s + 1)
        assert r.recovered == 1 and r.sent == 0
        assert len(server.messages) == 1
        assert repo.email_status(sid)["state"] == "sent"
    finally:
        server.stop()


def test_the_residual_window_resends_with_the_same_message_id(deliverer, repo, settings, tmp_path):
    """Killed between the relay's 250 and the sent-log write: the one case that duplicates.

    The duplicate carries the same Message-ID, so receiving systems can drop it.
    """
    server = SmtpServer().start()
    try:
        sid, _ = deliver_one(deliverer, repo)
        proc = _run_sender_process(settings, tmp_path, server.port, "after_accept")
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        restarted = deliver.OutboxSender(repo, smtp_cfg(tmp_path, server.port))
        r = restarted.run_once(now=time.time() + restarted.lease_s + 1)
        assert r.recovered == 1 and r.sent == 1
        ids = [m["Message-ID"] for m in server.messages]
        assert len(ids) == 2 and ids[0] == ids[1]
        assert repo.email_status(sid)["state"] == "sent"
    finally:
        server.stop()


def test_rejected_address_shows_the_reason_and_staff_can_fix_and_resend(
    deliverer, repo, tmp_path, caplog
):
    server = SmtpServer(reject={REJECTED}).start()
    try:
        sid, first_link = deliver_one(deliverer, repo, email=REJECTED)
        sender = deliver.OutboxSender(repo, smtp_cfg(tmp_path, server.port))
        with caplog.at_level("INFO"):
            r = sender.run_once()
        assert r.bounced == 1 and server.messages == []
        status = repo.email_status(sid)
        assert status["state"] == "bounced" and "550" in status["reason"]
        assert status["to_addr"] == REJECTED and REJECTED in status["reason"]
        # The relay quoted the address; the log (which outlives a delete) does not.
        records = [
            (r.getMessage(), getattr(r, "to", ""))
            for r in caplog.records
            if r.name.startswith("cloud_trainer")  # not the test's SMTP server
        ]
        assert any("email bounced" in m for m, _ in records)
        assert not [r for r in records if REJECTED in r[0] or REJECTED in r[1]]

        with pytest.raises(BadInput):
            deliverer.resend(sid, "still wrong\r\n@example.org")
        new_id = deliverer.resend(sid, "ada@example.org")
        assert new_id != repo.emails(sid)[0]["message_id"]
        assert sender.run_once().sent == 1
        [msg] = server.messages
        assert msg["Message-ID"] == new_id
        assert msg["To"].addresses[0].addr_spec == "ada@example.org"
        assert repo.get_session(sid)["email"] == "ada@example.org"
        token = token_in(msg.get_body(("plain",)).get_content())
        assert token != first_link.token and links.resolve(repo, token)["id"] == sid
        # The first link went to a stranger's mailbox: it no longer opens (or deletes) anything.
        with pytest.raises(links.LinkGone, match="revoked"):
            links.resolve(repo, first_link.token)
        assert [e["state"] for e in repo.emails(sid)] == ["bounced", "sent"]
    finally:
        server.stop()


def test_a_corrected_address_cancels_the_email_still_waiting_for_the_old_one(
    deliverer, repo, tmp_path
):
    port = free_port()
    server = SmtpServer(port)  # not started: the relay is down, the email waits to retry
    sid, first_link = deliver_one(deliverer, repo, email="ada@exmaple.org")
    sender = deliver.OutboxSender(repo, smtp_cfg(tmp_path, port))
    t0 = time.time()
    assert sender.run_once(now=t0).retried == 1
    deliverer.resend(sid, "ada@example.org")  # staff spot the typo meanwhile
    server.start()
    try:
        assert sender.run_once(now=t0 + sender.backoff_max_s * 2).sent == 1
        [msg] = server.messages
        assert msg["To"].addresses[0].addr_spec == "ada@example.org"
    finally:
        server.stop()
    assert [e["state"] for e in repo.emails(sid)] == ["failed", "sent"]
    # Both outcomes are counted (the cancelled one used to appear in no metric).
    assert repo.counter_values()["emails"] == {"failed": 1, "sent": 1}
    assert links.lookup(repo, first_link.token).state == "revoked"
    # The working link is in the email only: the booth keeps its hash, never the link.
    assert "link_url" not in repo.get_session(sid)["progress"]
    assert links.lookup(repo, token_in(msg.get_body(("plain",)).get_content())).state == "ok"
    # A plain resend (same address) leaves the links it sent before working.
    second = token_in(msg.get_body(("plain",)).get_content())
    deliverer.resend(sid)
    assert links.lookup(repo, second).state == "ok"


def test_resend_is_refused_before_delivery(deliverer, repo):
    sid = rendered_session(repo)
    with pytest.raises(BoothError, match="nothing to resend"):
        deliverer.resend(sid)


def test_the_email_says_when_the_link_stops_in_the_booths_time_zone():
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from cloud_trainer.deliver import compose

    # 23:30 on 15 December in California is already the 16th in UTC.
    ends = datetime(2026, 12, 15, 23, 30, tzinfo=ZoneInfo("America/Los_Angeles")).timestamp()
    common = dict(name="Ada", booth="b", dance="d", base_url="http://x", token="t", expiry_days=30)
    local = compose(**common, expires_at=ends, tz="America/Los_Angeles")["body_text"]
    assert "15 December 2026, 23:30 (America/Los_Angeles)" in local
    assert "16 December 2026, 07:30 (UTC)" in compose(**common, expires_at=ends)["body_text"]


def test_config_refuses_an_unknown_time_zone_and_an_image_size_the_model_cannot_use():
    import pytest

    from cloud_trainer.config import BoothSection, TrainerConfig

    assert BoothSection(timezone="Europe/Berlin").timezone == "Europe/Berlin"
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        BoothSection(timezone="Mars/Olympus")
    assert TrainerConfig(size_px=256).size_px == 256
    with pytest.raises(ValueError, match="power of two"):
        TrainerConfig(size_px=384)


@pytest.mark.parametrize(
    "stage, reply",
    [
        ("MAIL", "550 5.7.1 Sender address rejected: not owned by user"),
        ("RCPT", "554 5.7.1 Relay access denied"),
        ("DATA", "552 5.3.4 Message size exceeds fixed limit"),
    ],
    ids=["sender-refused", "relay-denied", "message-refused"],
)
def test_a_relay_that_refuses_the_booth_is_not_a_bounce_and_is_retried(
    deliverer, repo, tmp_path, stage, reply
):
    """A misconfigured relay refuses every message with a 5xx: that is the booth's
    settings, not the attendee's address. Staff must not be sent to correct addresses
    that are fine, and the emails must go once ops have fixed the relay."""
    server = SmtpServer(replies={stage: reply}).start()
    try:
        sid, _ = deliver_one(deliverer, repo)
        sender = deliver.OutboxSender(repo, smtp_cfg(tmp_path, server.port))
        t0 = time.time()
        r = sender.run_once(now=t0)
        assert (r.bounced, r.retried) == (0, 1) and server.messages == []
        [row] = repo.emails(sid)
        assert row["state"] == "pending"
        assert reply.split()[0] in row["last_error"] and "mail settings" in row["last_error"]
        server.handler.replies.clear()  # ops fixed the relay
        assert sender.run_once(now=t0 + sender.backoff_max_s * 2).sent == 1
        assert repo.email_status(sid)["state"] == "sent"
    finally:
        server.stop()


def test_the_email_carries_its_poster_names_the_dance_and_asks_for_no_auto_reply(
    deliverer, repo, tmp_path
):
    """The picture travels inside the message (no remote image to block, none that
    tells anyone the mail was opened, still there after the link expired)."""
    poster = b"\xff\xd8\xff\xe0" + b"poster-bytes" * 100 + b"\xff\xd9"
    sid, link = deliver_one(deliverer, repo)
    deliverer.store.put(f"sessions/{sid}/video/p.jpg", poster)
    server = SmtpServer().start()
    try:
        cfg = smtp_cfg(tmp_path, server.port).model_copy(
            update={"reply_to": "Booth team <team@booth.example>"}
        )
        sender = deliver.OutboxSender(repo, cfg, store=deliverer.store)
        assert sender.run_once().sent == 1
        [msg] = server.messages
    finally:
        server.stop()
    assert msg["Reply-To"].addresses[0].addr_spec == "team@booth.example"
    assert msg["Auto-Submitted"] == "auto-generated"
    text = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    assert "dance #1 (synthetic)" in text and "synthetic:1" not in text
    assert "poster" not in text  # no second copy of the secret link
    assert links.poster_url("https://booth.example", link.token) not in html
    cid = re.search(r'src="cid:([^"]+)"', html).group(1)
    [image] = [p for p in msg.walk() if p.get_content_type() == "image/jpeg"]
    assert image["Content-ID"].strip() == f"<{cid}>"
    assert image.get_content() == poster


def test_a_sender_or_reply_to_that_is_no_address_is_refused_with_the_config():
    """Found when the email is sent, it failed every email as if the attendee's address
    were wrong."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not an email address"):
        SmtpMail(sender="booth_mail_from-from-env-file")
    with pytest.raises(ValidationError, match="line break"):
        SmtpMail(reply_to="team@booth.example\r\nBcc: x@evil.example")
    assert SmtpMail(reply_to="").reply_to is None  # an empty env value: not set


def test_the_delivered_email_is_7bit_and_names_the_attendee_as_typed(
    deliverer, repo, settings, tmp_path
):
    """The To: line kept the name's punctuation out ("O'Brien Jr"), and the non-ASCII
    text went out 8-bit without BODY=8BITMIME, which a strict relay may refuse."""
    name = "José María O'Brien, Jr."
    settings.booth.name = "Köln"
    poster = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9"
    sid, _ = deliver_one(deliverer, repo, name=name)
    deliverer.store.put(f"sessions/{sid}/video/p.jpg", poster)
    [row] = repo.emails(sid)
    server = SmtpServer().start()
    received = []
    handle_data = server.handler.handle_DATA

    async def record(srv, session, envelope):  # the bytes as received, and MAIL FROM options
        received.append((bytes(envelope.original_content), list(envelope.mail_options)))
        return await handle_data(srv, session, envelope)

    server.handler.handle_DATA = record
    try:
        sender = deliver.OutboxSender(repo, smtp_cfg(tmp_path, server.port), store=deliverer.store)
        assert sender.run_once().sent == 1
        [msg] = server.messages
        [(raw, mail_options)] = received
        [(_, recipients)] = server.handler.envelopes
    finally:
        server.stop()
    assert max(raw) < 0x80 and "BODY=8BITMIME" not in mail_options
    [to] = msg["To"].addresses
    assert (to.display_name, to.addr_spec) == (name, "ada@example.org")
    assert recipients == ["ada@example.org"]
    assert msg["Subject"] == "Your dance video from Köln"
    text = msg.get_body(("plain",)).get_content().replace("\r\n", "\n")
    html = msg.get_body(("html",)).get_content().replace("\r\n", "\n")
    assert text == row["body_text"] and html == row["body_html"]
    assert f"Hi {name}," in text and "Köln" in text
    [image] = [p for p in msg.walk() if p.get_content_type() == "image/jpeg"]
    cid = re.search(r'src="cid:([^"]+)"', html).group(1)
    assert image["Content-ID"].strip() == f"<{cid}>"
    assert image.get_content() == poster


def test_an_email_given_up_or_bounced_keeps_no_body(deliverer, repo, tmp_path):
    """Its body holds a working link, which a copy of the database should not give away."""
    gave_up, _ = deliver_one(deliverer, repo)
    assert token_in(repo.emails(gave_up)[0]["body_text"])  # pending: it has its link
    sender = deliver.OutboxSender(repo, smtp_cfg(tmp_path, free_port()))  # the relay is down
    now = time.time()
    for _ in range(sender.max_attempts):
        sender.run_once(now=now)
        now += sender.backoff_max_s * 2
    server = SmtpServer(reject={REJECTED}).start()
    try:
        bounced, _ = deliver_one(deliverer, repo, email=REJECTED)
        assert deliver.OutboxSender(repo, smtp_cfg(tmp_path, server.port)).run_once().bounced == 1
    finally:
        server.stop()
    for sid, state in ((gave_up, "failed"), (bounced, "bounced")):
        [row] = repo.emails(sid)
        assert row["state"] == state and row["body_text"] == row["body_html"] == ""
