"""Staff authentication: argon2 password hashes, signed session cookies, CSRF, login throttling."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import secrets
import threading
import time
from collections import deque

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from cloud_trainer import signing

SESSION_COOKIE = "booth_session"
SESSION_MAX_AGE_S = 12 * 3600  # one conference day

_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    return _hasher.hash(password)


MAX_USERNAME = 64
MAX_PASSWORD = 1024


@functools.cache
def dummy_hash() -> str:
    """Verified against when the username is unknown: the same work as a real check."""
    return _hasher.hash(secrets.token_urlsafe(16))


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


class CookieSigner:
    """HMAC-SHA256 signed, timestamped JSON cookies. Tampering or age invalidates them."""

    def __init__(self, secret_key: str, max_age_s: int = SESSION_MAX_AGE_S):
        # Derived, so the web secret never signs anything else as it is.
        self._key = hashlib.sha256(("dancebooth-cookie:" + secret_key).encode()).digest()
        self.max_age_s = max_age_s

    def dumps(self, data: dict) -> str:
        body = json.dumps({**data, "iat": int(time.time())}, separators=(",", ":")).encode()
        payload = base64.urlsafe_b64encode(body).decode().rstrip("=")
        return f"{payload}.{signing.sign(self._key, payload.encode())}"

    def loads(self, value: str | None) -> dict | None:
        # Ours are base64 on both sides of the dot: anything else is forged.
        if not value or value.count(".") != 1 or not value.isascii():
            return None
        payload, sig = value.split(".")
        if not signing.verify(self._key, payload.encode(), sig):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (ValueError, json.JSONDecodeError):
            return None
        if not isinstance(data, dict) or time.time() - data.get("iat", 0) > self.max_age_s:
            return None
        return data


def new_csrf_token() -> str:
    return secrets.token_urlsafe(24)


# A login id is 256 random bits (well over the 128 a guess must face), like a link token.
LOGIN_ID_BYTES = 32


def new_login_id() -> str:
    return secrets.token_urlsafe(LOGIN_ID_BYTES)


def hash_login_id(login_id: str) -> str:
    """The key a login is stored under: its id travels only in the cookie."""
    return hashlib.sha256(login_id.encode("utf-8")).hexdigest()


def password_hash_tag(password_hash: str) -> str:
    """What a login remembers of the password hash it was made with.

    A new hash in ``web.staff`` (a new password) no longer matches, so the user's
    older logins end when the booth restarts with it.
    """
    return hashlib.sha256(password_hash.encode("utf-8")).hexdigest()


class LoginThrottle:
    """At most ``per_minute`` failed logins per (client, username) in any 60 s window;
    ``per_minute`` x ``WIDE`` per username from all clients together (guessing from many
    addresses) and per client over all usernames (guessing names). Only failures are
    remembered, for a minute, in at most ``MAX_KEYS`` entries; when a flood fills the
    table, logins that would need a new entry wait (fail closed) rather than go unlimited.
    """

    WIDE = 10
    MAX_KEYS = 10_000

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.per_minute = per_minute
        self._clock = clock
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _window(self, key: tuple[str, str]) -> deque[float]:
        q = self._failures.get(key)
        if q is None:
            return deque()
        cutoff = self._clock() - 60.0
        while q and q[0] < cutoff:
            q.popleft()
        if not q:
            del self._failures[key]
        return q

    def _wait(self, q: deque[float], limit: int) -> float:
        return 0.0 if len(q) < limit else max(0.0, q[0] + 60.0 - self._clock())

    def _keys(self, client: str, username: str) -> list[tuple[tuple[str, str], int]]:
        name, wide = username.lower(), self.per_minute * self.WIDE
        return [((client, name), self.per_minute), (("*", name), wide), ((client, "*"), wide)]

    def retry_after_s(self, client: str, username: str) -> float:
        with self._lock:
            return self._retry_after_s(client, username)

    def _retry_after_s(self, client: str, username: str) -> float:
        keys = self._keys(client, username)
        if len(self._failures) >= self.MAX_KEYS:
            for key in list(self._failures):  # drop what the window already forgot
                self._window(key)
            if len(self._failures) >= self.MAX_KEYS and any(
                key not in self._failures for key, _ in keys
            ):
                return 60.0
        return max(self._wait(self._window(key), limit) for key, limit in keys)

    def attempt(self, client: str, username: str) -> tuple[float, float | None]:
        """Start a login: ``(seconds to wait, None)`` if throttled, else ``(0, stamp)``.

        The attempt counts as a failure from here on, in the same lock as the check:
        logins checked at once (a burst in the thread pool) would otherwise all pass
        the check before any of them failed. ``succeeded`` takes it back.
        """
        with self._lock:
            wait = self._retry_after_s(client, username)
            if wait > 0:
                return wait, None
            stamp = self._clock()
            self._record(client, username, stamp)
            return 0.0, stamp

    def _record(self, client: str, username: str, stamp: float) -> None:
        for key, _ in self._keys(client, username):
            if key in self._failures or len(self._failures) < self.MAX_KEYS:
                self._failures.setdefault(key, deque()).append(stamp)

    def succeeded(self, client: str, username: str, stamp: float | None = None) -> None:
        """Forget this client's failures for the name, and the attempt ``stamp`` counted."""
        with self._lock:
            self._failures.pop((client, username.lower()), None)
            if stamp is None:
                return
            for key, _ in self._keys(client, username)[1:]:
                q = self._failures.get(key)
                if q is not None and stamp in q:
                    q.remove(stamp)
                    if not q:
                        del self._failures[key]
