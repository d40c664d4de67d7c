"""Mailers against a real SMTP server (aiosmtpd on loopback) and a real maildir."""

from __future__ import annotations

import datetime
import email
import email.policy
import ipaddress
import mailbox
import ssl
from email.header import decode_header, make_header
from email.headerregistry import Address
from email.message import EmailMessage

import pytest
from smtp_capture import SmtpServer, free_port

from cloud_trainer import mail
from cloud_trainer.config import OutboxMail, SmtpMail
from edge_agent.errors import BadInput

SENDER = "dancebooth <booth@booth.example>"


@pytest.fixture
def smtp():
    server = SmtpServer(reject={"nobody@example.org"}).start()
    yield server
    server.stop()


def _message(to_email="ada@example.org", to_name="Ada Lovelace") -> mail.EmailMessage:
    return mail.build_message(
        sender=SENDER,
        to_name=to_name,
        to_email=to_email,
        subject="Your dance video",
        text="watch: http://x/v/abc",
        html="<p><a href='http://x/v/abc'>watch</a></p>",
        message_id=mail.new_message_id(SENDER),
    )


def test_smtp_delivers_text_and_html_with_the_message_id(smtp):
    msg = _message()
    mail.create_mailer(SmtpMail(host="127.0.0.1", port=smtp.port)).send(msg)
    [got] = smtp.messages
    assert got["Message-ID"] == msg["Message-ID"]
    assert got["Message-ID"].endswith("@booth.example>")
    assert got["To"].addresses[0].addr_spec == "ada@example.org"
    assert got.get_body(("plain",)).get_content().strip() == "watch: http://x/v/abc"
    assert "href" in got.get_body(("html",)).get_content()


def test_a_rejected_address_is_a_permanent_failure_with_the_reason(smtp):
    mailer = mail.create_mailer(SmtpMail(host="127.0.0.1", port=smtp.port))
    with pytest.raises(mail.PermanentFailure) as e:
        mailer.send(_message(to_email="nobody@example.org"))
    assert e.value.code == 550 and "mailbox unavailable" in str(e.value)
    assert smtp.messages == []


def test_a_failed_quit_after_acceptance_is_still_a_success():
    """The relay accepted the message; a broken goodbye must not make us send it again."""
    server = SmtpServer(quit_reply="554 5.3.0 shutting down").start()
    try:
        mail.create_mailer(SmtpMail(host="127.0.0.1", port=server.port)).send(_message())
        assert len(server.messages) == 1
    finally:
        server.stop()


def test_a_server_that_is_down_is_a_temporary_failure():
    mailer = mail.create_mailer(SmtpMail(host="127.0.0.1", port=free_port(), timeout_s=2))
    with pytest.raises(mail.TemporaryFailure, match="unavailable"):
        mailer.send(_message())


def _self_signed(tmp_path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = tmp_path / "cert.pem"
    key_pem = tmp_path / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_pem, key_pem)
    client = ssl.create_default_context(cafile=str(cert_pem))
    return server, client


def test_starttls_and_auth_are_used_when_configured(tmp_path):
    server_ctx, client_ctx = _self_signed(tmp_path)
    server = SmtpServer(tls_context=server_ctx, credentials=("booth", "s3cret")).start()
    try:
        cfg = SmtpMail(
            host="127.0.0.1", port=server.port, starttls=True, username="booth", password="s3cret"
        )
        mail.SmtpMailer(cfg, ssl_context=client_ctx).send(_message())
        assert len(server.messages) == 1
        # Without STARTTLS the server refuses (require_starttls); wrong password is refused too.
        plain = cfg.model_copy(update={"starttls": False})
        with pytest.raises(mail.SendError):
            mail.SmtpMailer(plain, ssl_context=client_ctx).send(_message())
        wrong = cfg.model_copy(update={"password": "nope"})
        with pytest.raises(mail.TemporaryFailure, match="login refused"):
            mail.SmtpMailer(wrong, ssl_context=client_ctx).send(_message())
        assert len(server.messages) == 1
    finally:
        server.stop()


def test_header_injection_in_the_name_is_neutralised(smtp):
    msg = _message(to_name="Eve\r\nBcc: victim@evil.example\r\nX-Evil: 1")
    mail.create_mailer(SmtpMail(host="127.0.0.1", port=smtp.port)).send(msg)
    [got] = smtp.messages
    assert got["Bcc"] is None and got["X-Evil"] is None
    assert smtp.handler.envelopes[0][1] == ["ada@example.org"]
    assert "\n" not in got["To"].addresses[0].display_name
    with pytest.raises(BadInput, match="line break"):
        _message(to_email="ada@example.org\r\nBcc: victim@evil.example")
    for bad in ("not-an-address", "ada@", "", "a@[b@example.org"):
        with pytest.raises(BadInput):
            _message(to_email=bad)


def test_the_maildir_mailer_writes_a_readable_message(tmp_path):
    cfg = OutboxMail(maildir=tmp_path / "maildir", sender=SENDER)
    msg = _message()
    mail.create_mailer(cfg).send(msg)
    box = mailbox.Maildir(str(tmp_path / "maildir"), create=False)
    [got] = list(box)
    assert got["Message-ID"] == msg["Message-ID"]
    assert (tmp_path / "maildir" / "new").is_dir() and len(list(box.keys())) == 1


def _record_raw(server: SmtpServer) -> list[tuple[bytes, list[str]]]:
    """What the relay receives, byte for byte, with the MAIL FROM options it was given."""
    received: list[tuple[bytes, list[str]]] = []
    handle_data = server.handler.handle_DATA

    async def handle_data_and_record(srv, session, envelope):
        received.append((bytes(envelope.original_content), list(envelope.mail_options)))
        return await handle_data(srv, session, envelope)

    # aiosmtpd looks the hooks up on the handler for each new connection.
    server.handler.handle_DATA = handle_data_and_record
    return received


def _sent_to(smtp: SmtpServer, name: str, to_email: str = "ada@example.org"):
    mail.create_mailer(SmtpMail(host="127.0.0.1", port=smtp.port)).send(
        _message(to_email=to_email, to_name=name)
    )
    [got] = smtp.messages
    assert smtp.handler.envelopes[0][1] == [to_email]  # one recipient, the one typed
    [to] = got["To"].addresses
    assert to.addr_spec == to_email
    return got, to


@pytest.mark.parametrize(
    "name",
    [
        "José María O'Brien, Jr.",
        "Dr. Müller",
        'Ada "The Countess" Lovelace',
        "O'Neil (Pat)",
        "back\\slash",
        "Smith, Jane <jane@evil.example>",
        "a@b; c:d [e]",
        "Zoë, d'Arc",
        "张伟",
        '김민준 (Minjun), "MJ"',
        "Sir Maximilian Alexander von und zu Hohenzollern, Jr.",
        "Dr. Ana-Lucía Sánchez-Villalobos y Fernández de Córdoba, M.D.",
    ],
)
def test_the_name_in_the_to_line_is_the_name_as_typed(smtp, name):
    """Commas, periods and quotes were taken out ("O'Brien Jr", "Dr Müller"): the
    email package quotes or encodes them, and they come back unchanged."""
    got, to = _sent_to(smtp, name)
    assert to.display_name == name
    assert got["Bcc"] is None and got["Cc"] is None


@pytest.mark.parametrize(
    "name",
    [
        "María José Fernández-Rodríguez de la Concepción, PhD.",
        "Łukasz Żółćiński-Wąsowicz, Dipl.-Ing. (Kraków)",
    ],
)
def test_a_long_name_folded_into_encoded_words_decodes_as_typed(smtp, name):
    """Too long for one line: several RFC 2047 encoded words, which a mail client joins
    (RFC 2047 6.2; email.header does). CPython's address parser keeps a space between
    them, so it is compared without spaces."""
    got, to = _sent_to(smtp, name)
    [(_, raw)] = [(k, v) for k, v in got.raw_items() if k.lower() == "to"]
    assert "\n " in raw  # folded
    display = raw.rpartition("<")[0]
    assert str(make_header(decode_header(display))).strip() == name
    assert to.display_name.split() != [] and "".join(to.display_name.split()) == "".join(
        name.split()
    )


def test_a_name_the_library_would_fold_wrongly_keeps_one_recipient(smtp):
    """CPython's folding drops the quotes of a long quoted name (gh-80222; 3.11.10 does):
    the To: line would name several recipients. Such a name loses its punctuation."""
    name = "Smith, Jane; Doe, John <x@evil.example>, Roe, Richard (the one from accounting)"
    naive = EmailMessage()
    naive["To"] = Address(display_name=name, addr_spec="ada@example.org")
    parsed = email.message_from_bytes(
        naive.as_bytes(policy=email.policy.SMTP), policy=email.policy.default
    )
    library_folds_it_wrongly = len(parsed["To"].addresses) != 1
    got, to = _sent_to(smtp, name)
    plain = "Smith Jane Doe John x evil example Roe Richard the one from accounting"
    assert to.display_name == (plain if library_folds_it_wrongly else name)


def test_an_encoded_word_in_the_name_is_not_decoded_into_headers(smtp):
    """Before gh-121650 (3.11.10) a name written as an encoded word went out as typed and
    decoded to CR/LF; its brackets are all that is taken out."""
    got, to = _sent_to(smtp, "=?utf-8?q?Eve=0D=0ABcc:_victim@evil.example?=")
    assert got["Bcc"] is None
    assert "=?" not in to.display_name and "?=" not in to.display_name
    assert "Eve=0D=0ABcc:_victim@evil.example" in to.display_name
    assert mail.clean_display_name("a=?b?=c\tO'Brien,\x85Jr.") == "a b c O'Brien, Jr."


def test_the_message_is_7bit_and_its_text_and_html_decode_as_written():
    """smtplib declares no BODY=8BITMIME: 8-bit body bytes would reach a relay that was
    never told of them. Every part is quoted-printable or base64, whatever the language."""
    server = SmtpServer().start()
    received = _record_raw(server)
    text = "Hallo Jürgen, ¡hola José! 你好 — watch: http://x/v/abc?a=b\n" + "ü" * 120 + "\n"
    html = "<p>Hallo Jürgen, ¡hola José! 你好 — <a href='http://x/v/abc?a=b'>watch</a></p>\n"
    poster = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4 + b"\xff\xd9"
    message_id = mail.new_message_id(SENDER)
    try:
        msg = mail.build_message(
            sender=SENDER,
            to_name="Jürgen Müller",
            to_email="ada@example.org",
            subject="Dein Tanzvideo, Jürgen",
            text=text,
            html=html,
            message_id=message_id,
            poster_jpeg=poster,
        )
        mail.create_mailer(SmtpMail(host="127.0.0.1", port=server.port)).send(msg)
        [(raw, mail_options)] = received
        [got] = server.messages
    finally:
        server.stop()
    assert "BODY=8BITMIME" not in mail_options
    assert max(raw) < 0x80, "8-bit bytes sent without BODY=8BITMIME"
    # Line ends arrive as CRLF, as they travel (the 8-bit body did the same).
    assert got.get_body(("plain",)).get_content().replace("\r\n", "\n") == text
    assert got.get_body(("html",)).get_content().replace("\r\n", "\n") == html
    assert got["Subject"] == "Dein Tanzvideo, Jürgen"
    assert got["To"].addresses[0].display_name == "Jürgen Müller"
    # multipart/alternative: the text, then the HTML with its poster (multipart/related).
    assert got.get_content_type() == "multipart/alternative"
    plain_part, related = got.get_payload()
    assert plain_part.get_content_type() == "text/plain"
    assert related.get_content_type() == "multipart/related"
    html_part, image = related.get_payload()
    assert html_part.get_content_type() == "text/html"
    for part in (plain_part, html_part):
        assert part["Content-Transfer-Encoding"] == "quoted-printable"
        assert part.get_content_charset() == "utf-8"
    assert image.get_content_type() == "image/jpeg"
    assert image["Content-Transfer-Encoding"] == "base64"
    assert image["Content-ID"].strip() == f"<{mail.poster_cid(message_id)}>"
    assert image.get_content_disposition() == "inline"
    assert image.get_content() == poster
