"""Hosted links: unguessable tokens, expiry, revocation, and HTTP Range semantics."""

from __future__ import annotations

import time
import urllib.request

import pytest
import transport_helpers as th
from gcs_signing import service_account_credentials, signed_params, signed_url_ends_at

from cloud_trainer import links
from cloud_trainer.config import LocalStorage
from cloud_trainer.repository import Repository
from cloud_trainer.storage import create_blob_store
from edge_agent.errors import BadInput


@pytest.fixture
def repo(db_config):
    r = Repository.from_config(db_config)  # SQLite and PostgreSQL (conftest)
    yield r
    r.close()


@pytest.fixture
def store(tmp_path):
    return create_blob_store(LocalStorage(root=tmp_path / "blobs"))


def _session(repo) -> str:
    return th.new_session(repo, booth_id="booth-1")


def test_tokens_carry_at_least_128_random_bits_and_only_their_hash_is_stored(repo):
    sid = _session(repo)
    link = links.create_link(repo, sid, expiry_days=30)
    assert len(link.token) >= 43  # token_urlsafe(32): 256 bits in base64url
    assert links.TOKEN_BYTES * 8 >= 128
    stored = repo.list_links(sid)
    assert [r["token_sha256"] for r in stored] == [links.hash_token(link.token)]
    assert all(link.token not in str(v) for v in stored[0].values())
    assert links.create_link(repo, sid, 30).token != link.token


def test_link_lifecycle_valid_then_expired_revoked_or_unknown(repo):
    sid = _session(repo)
    now = time.time()
    link = links.create_link(repo, sid, expiry_days=30, now=now)
    assert links.resolve(repo, link.token, now=now + 60)["id"] == sid
    assert link.expires_at == pytest.approx(now + 30 * 86400)

    with pytest.raises(links.LinkGone) as gone:
        links.resolve(repo, link.token, now=now + 31 * 86400)
    assert gone.value.reason == "expired" and gone.value.status == 410

    other = links.create_link(repo, sid, expiry_days=30, now=now)
    links.revoke(repo, other.token, now=now + 1)
    with pytest.raises(links.LinkGone) as gone:
        links.resolve(repo, other.token, now=now + 2)
    assert gone.value.reason == "revoked"

    for unknown in (links.new_token(), "short", "../../etc/passwd", other.token[:-1] + "~"):
        with pytest.raises(links.LinkNotFound) as nf:
            links.resolve(repo, unknown, now=now)
        assert nf.value.status == 404
    with pytest.raises(links.LinkNotFound):
        links.revoke(repo, links.new_token())


def test_a_link_stops_working_at_its_expiry_instant_when_the_sweep_may_delete_it(repo):
    from cloud_trainer.front_desk import FrontDesk

    now = time.time()
    link = links.create_link(repo, _session(repo), expiry_days=1, now=now)
    assert links.lookup(repo, link.token, now=link.expires_at - 1).state == "ok"
    assert links.lookup(repo, link.token, now=link.expires_at).state == "expired"
    with pytest.raises(links.LinkGone):
        links.resolve(repo, link.token, now=link.expires_at)
    # The retention sweep takes the session at that same instant: link and sweep agree.
    desk = FrontDesk(repo, booth_id="booth-1", take_s=1.0, cameras=lambda: [])
    assert link.session_id in desk.expired(30 * 86400, now=link.expires_at)


@pytest.fixture
def gcs_stores(gcs_emulator):
    """(writer, signer) on one emulator bucket: the emulator cannot sign, a local key can."""
    from cloud_trainer.storage.gcs import GcsBlobStore

    bucket = gcs_emulator.new_bucket()
    writer = GcsBlobStore(bucket, endpoint=gcs_emulator.endpoint)
    signer = GcsBlobStore(
        bucket, endpoint=gcs_emulator.endpoint, credentials=service_account_credentials()
    )
    return writer, signer


def test_signed_urls_live_a_few_minutes_and_never_past_the_link(gcs_stores):
    writer, signer = gcs_stores
    key = "sessions/s1/video/final.mp4"
    writer.put(key, b"movie", content_type="video/mp4")
    assert 0 < links.SIGNED_URL_MAX_S <= 300  # minutes, not the hour it used to be

    # A link with a month left: the cap decides.
    now = time.time()
    url = links.signed_url(signer, key, now + 30 * 86400)
    assert int(signed_params(url)["X-Goog-Expires"]) == links.SIGNED_URL_MAX_S
    assert signed_url_ends_at(url) <= time.time() + links.SIGNED_URL_MAX_S

    # A link with 42.7 s left: the link decides, and the URL ends no later than it.
    link_expires_at = time.time() + 42.7
    url = links.signed_url(signer, key, link_expires_at)
    assert 0 < int(signed_params(url)["X-Goog-Expires"]) <= 42
    assert signed_url_ends_at(url) <= link_expires_at
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.read() == b"movie"

    # Under a second left is gone, not a 1 s URL (or a fall back to streaming it).
    with pytest.raises(links.LinkGone) as gone:
        links.signed_url(signer, key, time.time() + 0.5)
    assert gone.value.reason == "expired" and gone.value.status == 410
    with pytest.raises(links.LinkGone):
        links.signed_url(signer, key, time.time() - 60)


def test_signed_url_carries_the_download_headers(gcs_stores):
    writer, signer = gcs_stores
    key = "sessions/s1/video/final.mp4"
    writer.put(key, b"movie")  # stored as application/octet-stream
    disposition = 'attachment; filename="dancebooth.mp4"'
    url = links.signed_url(
        signer, key, time.time() + 3600, disposition=disposition, content_type="video/mp4"
    )
    params = signed_params(url)
    assert params["response-content-disposition"] == disposition
    assert params["response-content-type"] == "video/mp4"
    # The emulator answers the disposition as GCS does (it ignores the content type).
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["Content-Disposition"] == disposition and r.read() == b"movie"
    # Without them, the URL asks for nothing the object does not say itself.
    plain = signed_params(links.signed_url(signer, key, time.time() + 3600))
    assert "response-content-disposition" not in plain
    assert "response-content-type" not in plain


@pytest.mark.parametrize("bad", ['attachment; filename="x"\r\nSet-Cookie: a=b', "", "a\x00b"])
def test_signed_url_refuses_header_values_that_are_not_one_printable_line(gcs_stores, bad):
    _, signer = gcs_stores
    with pytest.raises(BadInput, match="invalid disposition"):
        signer.url("sessions/s1/video/final.mp4", 60, disposition=bad)
    with pytest.raises(BadInput, match="invalid content_type"):
        signer.url("sessions/s1/video/final.mp4", 60, content_type=bad)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-99", (0, 99)),  # first
        ("bytes=1000-1999", (1000, 1999)),  # middle
        ("bytes=-16", (10224, 10239)),  # suffix
        ("bytes=10000-", (10000, 10239)),  # open-ended
        ("bytes=10000-99999", (10000, 10239)),  # end clamped to the size
        ("bytes=-99999", (0, 10239)),  # suffix longer than the object
        (None, None),
        ("bytes=0-1,5-6", None),  # multi-range: we may send everything (RFC 9110)
        ("items=0-1", None),
        ("bytes=9-3", None),  # malformed: ignored
    ],
)
def test_parse_range(header, expected):
    rng = links.parse_range(header, 10240)
    assert (None if rng is None else (rng.start, rng.end)) == expected


@pytest.mark.parametrize("header", ["bytes=10240-", "bytes=99999-100000", "bytes=-0"])
def test_unsatisfiable_ranges_raise_416(header):
    with pytest.raises(links.RangeNotSatisfiable):
        links.parse_range(header, 10240)


def test_range_requests_return_the_right_bytes(blob_store):
    """Against the local store and the GCS emulator (``blob_store`` from conftest)."""
    store = blob_store
    data = bytes(range(256)) * 40 + b"tail"
    key = "sessions/s1/video/final.mp4"
    store.put(key, data)
    size = len(data)
    cases = {
        "bytes=0-99": data[:100],
        "bytes=5000-5099": data[5000:5100],
        "bytes=-16": data[-16:],
        "bytes=10000-": data[10000:],
    }
    for header, want in cases.items():
        resp = links.serve_range(store, key, header)
        body = b"".join(resp.body)
        assert resp.status == 206 and body == want, header
        assert resp.headers["Content-Length"] == str(len(want))
        first = size - len(want) if header.startswith("bytes=-") else int(header[6:].split("-")[0])
        assert resp.headers["Content-Range"] == f"bytes {first}-{first + len(want) - 1}/{size}"
    whole = links.serve_range(store, key, None)
    assert whole.status == 200 and b"".join(whole.body) == data
    assert whole.headers["Accept-Ranges"] == "bytes"
    bad = links.serve_range(store, key, f"bytes={size}-")
    assert bad.status == 416 and bad.headers["Content-Range"] == f"bytes */{size}"
    assert b"".join(bad.body) == b""
    # Chunked reads stitch together exactly.
    rng = links.ByteRange(3, size - 2)
    assert b"".join(links.read_range(store, key, rng, chunk_bytes=7)) == data[3 : size - 1]
