"""The blob store interface and its registry.

Keys are ``/``-separated relative paths made of safe characters, e.g.
``sessions/<sid>/frames/cam0/shard-000000.bin``. ``validate_key`` rejects
anything else (absolute paths, ``..``, backslashes, control characters), so a
key can never escape the store.

Layout of keys used across the pipeline:
- ``sessions/<sid>/frames/<camera>/shard-<first_seq:08d>.bin``  frame shards
- ``sessions/<sid>/poses/<camera>/shard-<first_seq:08d>.npz``  pose shards (optional)
- ``sessions/<sid>/corpus/...``        training shards (TFRecord)
- ``sessions/<sid>/checkpoints/...``   job checkpoints
- ``sessions/<sid>/model/...``         exported generator
- ``sessions/<sid>/video/...``         rendered MP4s and poster
- ``references/<name>/v<version>/...`` reference dances
- ``base/<name>/...``                  base checkpoints
Deleting a session is ``delete_prefix(f"sessions/{sid}/")``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator
from typing import Protocol

from edge_agent.errors import BadInput, BoothError

_KEY_RE = re.compile(r"^[A-Za-z0-9._\-]+(/[A-Za-z0-9._\-]+)*$")


class BlobNotFound(BoothError):
    pass


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not key or len(key) > 1024 or not _KEY_RE.fullmatch(key):
        raise BadInput(f"invalid blob key {key!r}")
    if any(part in (".", "..") for part in key.split("/")):
        raise BadInput(f"invalid blob key {key!r}: path traversal")
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a key (or the start of one), optionally ending in ``/``."""
    if prefix == "":
        return prefix
    if not isinstance(prefix, str):
        raise BadInput(f"invalid blob prefix {prefix!r}")
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


class BlobStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Write atomically: readers see the old object or the whole new one, never a part."""

    def put_file(self, key: str, path: str, content_type: str | None = None) -> None: ...

    def create(self, key: str, data: bytes, content_type: str | None = None) -> bool:
        """``put`` only if no object ``key`` exists: True if this call made it, False if one
        was there. Of writers racing on one key exactly one gets True."""

    def get(self, key: str) -> bytes:
        """Raise BlobNotFound if absent."""

    def get_range(self, key: str, start: int, end_inclusive: int) -> bytes: ...

    def download(self, key: str, path: str) -> None: ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``prefix``, sorted."""

    def delete(self, key: str) -> None:
        """Idempotent: deleting a missing key is not an error."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with ``prefix`` (non-empty); returns how many were deleted."""

    def url(
        self,
        key: str,
        expires_s: int,
        *,
        disposition: str | None = None,
        content_type: str | None = None,
    ) -> str | None:
        """A signed URL where the backend supports one (gcs), else None (serve through the app).

        ``disposition`` and ``content_type`` are the Content-Disposition and Content-Type
        the URL's response carries (e.g. ``attachment`` so a browser downloads it).
        """


_MODULES = {"local": "cloud_trainer.storage.local", "gcs": "cloud_trainer.storage.gcs"}
_FACTORIES: dict[str, Callable[..., BlobStore]] = {}


def register(type_key: str) -> Callable[[Callable[..., BlobStore]], Callable[..., BlobStore]]:
    def deco(factory: Callable[..., BlobStore]) -> Callable[..., BlobStore]:
        _FACTORIES[type_key] = factory
        return factory

    return deco


def create_blob_store(cfg) -> BlobStore:  # cfg: LocalStorage | GcsStorage
    if cfg.type not in _FACTORIES:
        importlib.import_module(_MODULES[cfg.type])
    return _FACTORIES[cfg.type](cfg)
