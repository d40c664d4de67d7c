"""The ``gcs`` blob store: one Google Cloud Storage bucket (``google-cloud-storage``).

Atomic writes come from GCS itself: an object becomes visible only when its
upload (single-shot multipart, or resumable for big files) is finalised, so
readers see the old object or the whole new one.

Retries: the client retries uploads only when they carry an
``if_generation_match`` precondition, because an unconditional retry could
overwrite a newer object written by someone else. Each of our keys has one
writer and a retried write carries the same bytes, so we retry uploads
unconditionally (``DEFAULT_RETRY``). That also keeps us independent of the
emulator, which ignores preconditions.

``url()`` returns a V4 signed URL when the credentials can sign: a service
account key signs locally; Compute Engine / workload identity credentials sign
through the IAM ``signBlob`` API. Anonymous credentials (the emulator) cannot
sign, so ``url()`` returns None and the app serves the blob itself.

The endpoint comes from ``storage.endpoint`` or ``STORAGE_EMULATOR_HOST``;
either means "emulator": anonymous credentials unless some are given.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cloud_trainer.storage.base import BlobNotFound, register, validate_key, validate_prefix
from edge_agent.errors import BadInput, BoothError

log = logging.getLogger(__name__)

# V4 signed URLs live at most seven days (a GCS limit).
MAX_SIGNED_URL_S = 7 * 24 * 3600
_DEFAULT_CONTENT_TYPE = "application/octet-stream"


def credentials_error(service: str, e: Exception, emulator_hint: str) -> str:
    """What is wrong with the credentials, with google-auth's own reason: when
    GOOGLE_APPLICATION_CREDENTIALS is set, it says why its file did not do (missing, not
    readable by this user, not a key)."""
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if path:
        return (
            f"{service} cannot use the credentials in GOOGLE_APPLICATION_CREDENTIALS={path}: "
            f"{reason} (the file must be a service account key readable by this user)"
        )
    return (
        f"{service} needs credentials: set GOOGLE_APPLICATION_CREDENTIALS, run on GCP, or "
        f"{emulator_hint} ({reason})"
    )


class GcsBlobStore:
    def __init__(
        self,
        bucket: str,
        *,
        project: str = "dancebooth",
        endpoint: str | None = None,
        credentials: Any = None,
    ):
        # Imported here: the package must import on a board without the GCS client.
        from google.api_core.retry import Retry
        from google.cloud import storage

        self.endpoint = endpoint or os.environ.get("STORAGE_EMULATOR_HOST") or None
        if self.endpoint:
            if not self.endpoint.startswith(("http://", "https://")):
                self.endpoint = "http://" + self.endpoint
            if credentials is None:
                from google.auth.credentials import AnonymousCredentials

                credentials = AnonymousCredentials()
            self._client = storage.Client(
                project=project,
                credentials=credentials,
                client_options={"api_endpoint": self.endpoint},
            )
        else:
            from google.auth.exceptions import DefaultCredentialsError

            try:
                self._client = storage.Client(project=project, credentials=credentials)
            except DefaultCredentialsError as e:
                raise BoothError(
                    credentials_error("GCS", e, "point storage.endpoint at an emulator")
                ) from e
        self._bucket = self._client.bucket(bucket)
        self.bucket_name = bucket
        # Also retry 408/429/5xx and connection resets on uploads; see the module docstring.
        self._retry = Retry(initial=0.2, maximum=10.0, multiplier=2.0, timeout=120.0)

    def __repr__(self) -> str:
        return f"GcsBlobStore(bucket={self.bucket_name!r}, endpoint={self.endpoint!r})"

    # ---- writes -----------------------------------------------------------------------

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        blob = self._bucket.blob(validate_key(key))
        with _mapped(key):
            blob.upload_from_string(
                data, content_type=content_type or _DEFAULT_CONTENT_TYPE, retry=self._retry
            )

    def create(self, key: str, data: bytes, content_type: str | None = None) -> bool:
        """GCS's ``ifGenerationMatch=0`` precondition: the upload succeeds only if no live
        object has the name. (The emulator ignores preconditions: there it is a put.)"""
        from google.api_core import exceptions as gexc

        blob = self._bucket.blob(validate_key(key))
        try:
            with _mapped(key):
                blob.upload_from_string(
                    data,
                    content_type=content_type or _DEFAULT_CONTENT_TYPE,
                    if_generation_match=0,
                    retry=self._retry,
                )
        except gexc.PreconditionFailed:
            return False
        return True

    def put_file(self, key: str, path: str, content_type: str | None = None) -> None:
        blob = self._bucket.blob(validate_key(key))
        with _mapped(key):
            blob.upload_from_filename(
                path, content_type=content_type or _DEFAULT_CONTENT_TYPE, retry=self._retry
            )

    # ---- reads ------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        with _mapped(key):
            return self._bucket.blob(validate_key(key)).download_as_bytes()

    def get_range(self, key: str, start: int, end_inclusive: int) -> bytes:
        """Bytes ``start..end_inclusive``, clipped to the object's end (as HTTP ranges are)."""
        if start < 0 or end_inclusive < start:
            raise BadInput(f"invalid byte range {start}-{end_inclusive}")
        blob = self._bucket.blob(validate_key(key))
        from google.api_core import exceptions as gexc

        try:
            with _mapped(key):
                return blob.download_as_bytes(start=start, end=end_inclusive)
        except gexc.RequestRangeNotSatisfiable:
            self.size(key)  # BlobNotFound if the object vanished meanwhile
            return b""  # the range starts at or past the end

    def download(self, key: str, path: str) -> None:
        dest = Path(path)
        tmp = dest.with_name(f"{dest.name}.~tmp-{secrets.token_hex(6)}")
        blob = self._bucket.blob(validate_key(key))
        try:
            with _mapped(key):
                blob.download_to_filename(str(tmp))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        with _mapped(key):
            return self._bucket.blob(validate_key(key)).exists()

    def size(self, key: str) -> int:
        with _mapped(key):
            blob = self._bucket.get_blob(validate_key(key))
        if blob is None:
            raise BlobNotFound(f"no blob {key!r}")
        return int(blob.size)

    def list(self, prefix: str = "") -> Iterator[str]:
        with _mapped(prefix):
            names = [
                b.name
                for b in self._client.list_blobs(self._bucket, prefix=validate_prefix(prefix))
            ]
        return iter(sorted(names))

    # ---- deletes ----------------------------------------------------------------------

    def delete(self, key: str) -> None:
        from google.api_core import exceptions as gexc

        try:
            self._bucket.blob(validate_key(key)).delete()
        except gexc.NotFound:
            return

    def delete_prefix(self, prefix: str) -> int:
        from google.api_core import exceptions as gexc

        if not validate_prefix(prefix):
            raise BadInput("refusing to delete every blob: give a non-empty prefix")
        n = 0
        for key in self.list(prefix):
            try:
                self._bucket.blob(key).delete()
                n += 1
            except gexc.NotFound:  # deleted concurrently: the goal is reached anyway
                continue
        log.info("deleted blobs", extra={"bucket": self.bucket_name, "prefix": prefix, "count": n})
        return n

    # ---- urls -------------------------------------------------------------------------

    def url(
        self,
        key: str,
        expires_s: int,
        *,
        disposition: str | None = None,
        content_type: str | None = None,
    ) -> str | None:
        """A V4 signed GET URL, or None when the credentials cannot sign.

        Longer lifetimes than GCS allows (7 days) are shortened to 7 days.
        ``disposition`` / ``content_type`` become the ``response-content-disposition`` /
        ``response-content-type`` parameters, which GCS answers as response headers.
        """
        blob = self._bucket.blob(validate_key(key))
        expires_s = int(min(max(expires_s, 1), MAX_SIGNED_URL_S))
        creds = self._client._credentials
        kwargs: dict[str, Any] = {
            "version": "v4",
            "method": "GET",
            "expiration": dt.timedelta(seconds=expires_s),
        }
        for name, header in (("disposition", disposition), ("content_type", content_type)):
            if header is not None and (not header or not header.isprintable()):
                raise BadInput(f"invalid {name} {header!r}: give a printable header value")
        if disposition is not None:
            kwargs["response_disposition"] = disposition
        if content_type is not None:
            kwargs["response_type"] = content_type
        if self.endpoint:
            kwargs["api_access_endpoint"] = self.endpoint
        if callable(getattr(creds, "sign_bytes", None)):
            kwargs["credentials"] = creds
        elif getattr(creds, "service_account_email", None):
            # Compute Engine / workload identity: sign remotely through IAM signBlob.
            import google.auth.transport.requests

            if not creds.valid:
                creds.refresh(google.auth.transport.requests.Request())
            kwargs["service_account_email"] = creds.service_account_email
            kwargs["access_token"] = creds.token
        else:
            return None
        return blob.generate_signed_url(**kwargs)


@register("gcs")
def _create(cfg) -> GcsBlobStore:  # cfg: GcsStorage
    return GcsBlobStore(cfg.bucket, project=cfg.project, endpoint=cfg.endpoint)


@contextlib.contextmanager
def _mapped(key: str) -> Iterator[None]:
    """Turn the client's 404 into BlobNotFound and refusals into one readable line."""
    from google.api_core import exceptions as gexc

    try:
        yield
    except gexc.NotFound as e:
        raise BlobNotFound(f"no blob {key!r} ({e.message})") from None
    except (gexc.Forbidden, gexc.Unauthorized) as e:
        raise BoothError(f"GCS refused access to {key!r}: {e.message}") from e
