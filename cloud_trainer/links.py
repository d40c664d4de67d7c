"""Hosted links to an attendee's video: unguessable, expiring, revocable.

A link is ``{base_url}/v/{token}``; the token carries 256 random bits
(``secrets.token_urlsafe(32)``, well over the 128 the booth promises) and only
its sha256 is stored, so a leaked database holds no working links.

``resolve`` tells a gone link (expired or revoked: HTTP 410) from one that never
existed (404), so an attendee with an old email learns the video was removed on
purpose rather than mistyped.

Serving: in ``gcs`` mode the app redirects to a short-lived signed URL from the
blob store (``signed_url``); in ``local`` mode it streams the object itself and
honours HTTP Range requests (``parse_range`` + ``serve_range``) so browsers can seek.
A signed URL cannot be revoked, so it lives a few minutes at most and never past
the link's expiry: each visit goes through the link again, which checks revocation.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import BoothError

# Bytes of randomness per token: 32 bytes = 256 bits (token_urlsafe gives 43 characters).
TOKEN_BYTES = 32
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-]{16,128}$")
# A signed URL outlives a revocation for as long as it lives, so sign for a few minutes
# (a booth video plays in well under that) and re-sign per visit through the link.
SIGNED_URL_MAX_S = 300
CHUNK_BYTES = 1 << 20


class LinkNotFound(BoothError):
    """No such link (HTTP 404)."""

    status = 404


class LinkGone(BoothError):
    """The link existed but expired or was revoked (HTTP 410)."""

    status = 410

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason  # "expired" | "revoked"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


@dataclass(frozen=True)
class Link:
    token: str
    session_id: str
    created_at: float
    expires_at: float


@dataclass(frozen=True)
class Resolution:
    """``resolve`` without exceptions: state is ok, not_found, expired or revoked."""

    state: str
    session_id: str | None = None
    expires_at: float | None = None


def create_link(repo: Any, session_id: str, expiry_days: float, now: float | None = None) -> Link:
    """A new link for a session's video (its own transaction; delivery uses ``new_link``)."""
    link = new_link(session_id, expiry_days, now)
    repo.insert_link(
        token_sha256=hash_token(link.token),
        session_id=session_id,
        created_at=link.created_at,
        expires_at=link.expires_at,
    )
    return link


def new_link(session_id: str, expiry_days: float, now: float | None = None) -> Link:
    """A link not yet stored: the caller inserts it in its own transaction."""
    now = time.time() if now is None else now
    return Link(new_token(), session_id, now, now + expiry_days * 86400.0)


def lookup(repo: Any, token: str, now: float | None = None) -> Resolution:
    """What a token is: ok, not_found, expired or revoked (no exceptions)."""
    now = time.time() if now is None else now
    # Malformed tokens are unknown tokens; no need to touch the database.
    if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
        return Resolution("not_found")
    row = repo.get_link(hash_token(token))
    if row is None:
        return Resolution("not_found")
    if row["revoked_at"] is not None:
        return Resolution("revoked", row["session_id"], row["expires_at"])
    if row["expires_at"] <= now:
        return Resolution("expired", row["session_id"], row["expires_at"])
    return Resolution("ok", row["session_id"], row["expires_at"])


@dataclass(frozen=True)
class Visit:
    """A link that works: the session behind it and when the link stops working."""

    session: dict[str, Any]
    link_expires_at: float


def resolve(repo: Any, token: str, now: float | None = None) -> dict[str, Any]:
    """The session behind a link, or LinkNotFound (404) / LinkGone (410)."""
    return visit(repo, token, now).session


def visit(repo: Any, token: str, now: float | None = None) -> Visit:
    """``resolve`` plus the link's expiry (to cap signed URLs), or LinkNotFound / LinkGone."""
    r = lookup(repo, token, now)
    if r.state == "not_found":
        raise LinkNotFound("no such video link")
    if r.state != "ok":
        raise LinkGone(
            f"this video link has {r.state}"
            if r.state == "expired"
            else "this video link was revoked",
            r.state,
        )
    try:
        session = repo.get_session(r.session_id)
    except BoothError:
        # The session was deleted (the attendee's right) after the link was made.
        raise LinkGone("this video was deleted", "deleted") from None
    return Visit(session, r.expires_at)


def revoke(repo: Any, token: str, now: float | None = None) -> None:
    if not repo.revoke_link(hash_token(token), time.time() if now is None else now):
        raise LinkNotFound("no such video link")


def watch_url(base_url: str, token: str) -> str:
    """The attendee page (served by the web app)."""
    return f"{base_url.rstrip('/')}/v/{token}"


def video_url(base_url: str, token: str) -> str:
    return f"{watch_url(base_url, token)}/video.mp4"


def poster_url(base_url: str, token: str) -> str:
    return f"{watch_url(base_url, token)}/poster.jpg"


def signed_url(
    store: Any,
    key: str,
    link_expires_at: float,
    now: float | None = None,
    *,
    disposition: str | None = None,
    content_type: str | None = None,
) -> str | None:
    """A signed URL for ``key`` in gcs mode, else None (the app streams it, see ``serve_range``).

    It lives ``SIGNED_URL_MAX_S`` at most and never past ``link_expires_at``; a link
    with under a second left is gone (LinkGone) rather than streamed by the app.
    ``disposition`` and ``content_type`` are the headers the download should carry.
    """
    now = time.time() if now is None else now
    # The URL's life starts at the whole second it is signed in, which is at most
    # ceil(now) when signing takes under a second, so it ends by floor(link_expires_at).
    expires_s = min(SIGNED_URL_MAX_S, math.floor(link_expires_at) - math.ceil(now))
    if expires_s < 1:
        raise LinkGone("this video link has expired", "expired")
    return store.url(key, expires_s, disposition=disposition, content_type=content_type)


# ---- HTTP Range (RFC 9110 section 14) ---------------------------------------------

_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


class RangeNotSatisfiable(BoothError):
    """HTTP 416: send ``Content-Range: bytes */{size}``."""

    status = 416

    def __init__(self, size: int):
        super().__init__(f"requested range not satisfiable (size {size})")
        self.size = size


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one byte range a ``Range`` header asks for, or None to send the whole object.

    RFC 9110 lets a server ignore a Range header it does not support, so malformed
    headers and multi-range requests get the whole object (200) rather than an
    error. A well-formed range that lies outside the object raises
    RangeNotSatisfiable (416).
    """
    if not header:
        return None
    m = _RANGE_RE.match(header)
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if len(first) > 18 or len(last) > 18:  # past any real size; int() of 4300+ digits raises
        return None
    if first == "" and last == "":
        return None
    if first == "":  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return ByteRange(max(0, size - n), size - 1)
    start = int(first)
    if last != "" and int(last) < start:
        return None  # invalid syntax: ignore
    if start >= size:
        raise RangeNotSatisfiable(size)
    end = size - 1 if last == "" else min(int(last), size - 1)
    return ByteRange(start, end)


def read_range(
    store: Any, key: str, rng: ByteRange, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[bytes]:
    """The bytes of ``rng`` of a blob, in chunks (a video is never held whole in memory)."""
    pos = rng.start
    while pos <= rng.end:
        end = min(rng.end, pos + chunk_bytes - 1)
        yield store.get_range(key, pos, end)
        pos = end + 1


@dataclass
class RangeResponse:
    """What the app sends: status, headers and a body iterator."""

    status: int
    headers: dict[str, str]
    body: Iterator[bytes]


def serve_range(
    store: Any, key: str, range_header: str | None, content_type: str = "video/mp4"
) -> RangeResponse:
    """Plan a 200, 206 or 416 response for a blob; the app wraps it in a streaming response."""
    size = store.size(key)
    headers = {"Accept-Ranges": "bytes", "Content-Type": content_type}
    try:
        rng = parse_range(range_header, size)
    except RangeNotSatisfiable:
        headers["Content-Range"] = f"bytes */{size}"
        headers["Content-Length"] = "0"
        return RangeResponse(416, headers, iter(()))
    if rng is None:
        headers["Content-Length"] = str(size)
        body = read_range(store, key, ByteRange(0, size - 1)) if size else iter(())
        return RangeResponse(200, headers, body)
    headers["Content-Range"] = f"bytes {rng.start}-{rng.end}/{size}"
    headers["Content-Length"] = str(rng.length)
    return RangeResponse(206, headers, read_range(store, key, rng))
