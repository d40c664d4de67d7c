"""A throwaway service account key, so a ``GcsBlobStore`` on the emulator can sign URLs.

The emulator's anonymous credentials cannot sign (``url()`` returns None); these sign
locally with a fresh RSA key and never talk to Google (only signing uses them: write
through an anonymous store on the same bucket).
"""

from __future__ import annotations

import datetime as dt
import urllib.parse
from typing import Any


def service_account_credentials() -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from google.oauth2 import service_account

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return service_account.Credentials.from_service_account_info(
        {
            "type": "service_account",
            "project_id": "dancebooth-test",
            "private_key_id": "test",
            "private_key": pem,
            "client_email": "booth@dancebooth-test.iam.gserviceaccount.com",
            "client_id": "1",
            "token_uri": "https://oauth2.googleapis.com/token",
        }
    )


def signed_params(url: str) -> dict[str, str]:
    """The query parameters of a V4 signed URL (each appears once)."""
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query, strict_parsing=True))


def signed_url_ends_at(url: str) -> float:
    """When a V4 signed URL stops working: X-Goog-Date plus X-Goog-Expires (Unix seconds)."""
    params = signed_params(url)
    signed_at = dt.datetime.strptime(params["X-Goog-Date"], "%Y%m%dT%H%M%SZ")
    return signed_at.replace(tzinfo=dt.UTC).timestamp() + int(params["X-Goog-Expires"])
