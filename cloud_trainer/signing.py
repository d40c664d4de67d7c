"""The HMAC primitive behind the booth's signed tokens: staff cookies and local blob tokens.

Each scheme keeps its own format, key and expiry rule (``web.security.CookieSigner``,
``storage.local.sign_blob_token``). What they share is the part that is easy to get
subtly wrong, so it lives here once: HMAC-SHA256, URL-safe base64 without padding,
and a constant-time check that answers False for a forged non-ASCII signature
(``hmac.compare_digest`` raises on one; the fuzz found that twice, once per scheme).
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def sign(key: bytes, message: bytes) -> str:
    """The HMAC-SHA256 of ``message``, URL-safe base64 without ``=`` padding (43 chars)."""
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def verify(key: bytes, message: bytes, signature: str) -> bool:
    """True if ``signature`` is ``sign(key, message)``, compared in constant time."""
    return signature.isascii() and hmac.compare_digest(signature, sign(key, message))
