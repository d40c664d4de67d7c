"""Staff authentication: argon2 password hashes, signed session cookies, CSRF, login throttling."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from collections import defaultdict, deque

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from cloud_trainer import signing

SESSION_COOKIE = "booth_session"
SESSION_MAX_AGE_S = 12 * 3600  # one conference day

_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    return _hasher.hash(password)


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


class LoginThrottle:
    """At most ``per_minute`` failed logins per (client, username) in any 60 s window."""

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.per_minute = per_minute
        self._clock = clock
        self._failures: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _window(self, key: tuple[str, str]) -> deque[float]:
        q = self._failures[key]
        cutoff = self._clock() - 60.0
        while q and q[0] < cutoff:
            q.popleft()
        return q

    def retry_after_s(self, client: str, username: str) -> float:
        with self._lock:
            q = self._window((client, username.lower()))
            if len(q) < self.per_minute:
                return 0.0
            return max(0.0, q[0] + 60.0 - self._clock())

    def failed(self, client: str, username: str) -> None:
        with self._lock:
            self._window((client, username.lower())).append(self._clock())

    def succeeded(self, client: str, username: str) -> None:
        with self._lock:
            self._failures.pop((client, username.lower()), None)
