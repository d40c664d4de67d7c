"""The shared HMAC primitive, and the two token formats built on it (unchanged by sharing it)."""

from __future__ import annotations

import base64
import hashlib
import hmac

from cloud_trainer import signing
from cloud_trainer.storage.local import check_blob_token, sign_blob_token
from cloud_trainer.web.security import CookieSigner


def _reference_mac(key: bytes, message: bytes) -> str:
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def test_sign_is_urlsafe_unpadded_hmac_sha256():
    sig = signing.sign(b"k", b"message")
    assert sig == _reference_mac(b"k", b"message")
    assert len(sig) == 43 and "=" not in sig and "+" not in sig and "/" not in sig


def test_verify_refuses_other_keys_messages_and_non_ascii_without_raising():
    sig = signing.sign(b"k", b"message")
    assert signing.verify(b"k", b"message", sig)
    assert not signing.verify(b"other", b"message", sig)
    assert not signing.verify(b"k", b"messagE", sig)
    assert not signing.verify(b"k", b"message", sig[:-1])
    assert not signing.verify(b"k", b"message", "é" * 43)  # compare_digest would raise
    assert not signing.verify(b"k", b"message", "")


def test_cookies_signed_before_the_shared_primitive_still_log_in():
    secret = "s" * 32
    signer = CookieSigner(secret)
    payload, sig = signer.dumps({"user": "staff", "csrf": "c"}).split(".")
    key = hashlib.sha256(("dancebooth-cookie:" + secret).encode()).digest()
    assert sig == _reference_mac(key, payload.encode())
    assert signer.loads(f"{payload}.{sig}")["user"] == "staff"
    assert signer.loads(f"{payload}.{'é' * 43}") is None


def test_blob_tokens_keep_their_format():
    token = sign_blob_token("s3cret", "sessions/s1/video/out.mp4", 60, now=1000)
    assert token == "1060." + _reference_mac(b"s3cret", b"blob:sessions/s1/video/out.mp4:1060")
    assert check_blob_token("s3cret", "sessions/s1/video/out.mp4", token, now=1000)
    assert not check_blob_token("s3cret", "sessions/s1/video/out.mp4", "1060.é", now=1000)
    assert not check_blob_token("s3cret", "sessions/s1/video/out.mp4", "1²60." + token[5:], 0)
