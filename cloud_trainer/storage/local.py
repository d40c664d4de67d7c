"""The ``local`` blob store: a directory on this machine (the embedded default).

Writes are atomic and durable: the bytes go to a temporary file in the key's own
directory, are fsynced, and are renamed over the key with ``os.replace``; the
directory is fsynced too, because ingest acknowledges a frame as durable only
after this returns. Temporary names contain ``~``, a character no key may hold,
so ``list()`` never shows a half-written object.

Local blobs have no signed URLs (``url()`` returns None): the web app streams
them itself, with range support, behind the attendee's link, which it checks on
every request, so a revoked link or deleted data stops at once (a URL that
outlived the check, as GCS needs, would not). The adapter's tokenized URLs are
``sign_blob_token`` / ``check_blob_token``: an expiring HMAC token bound to one
key, for a route that must hand out a blob without a login; the booth's own
pages do not need one.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from cloud_trainer import signing
from cloud_trainer.storage.base import BlobNotFound, register, validate_key, validate_prefix
from edge_agent.errors import BadInput, make_dirs

log = logging.getLogger(__name__)

_TMP_MARK = ".~tmp-"  # "~" is outside the key alphabet: never a key, never listed
# A concurrent delete_prefix may remove a directory between our mkdir and our
# temp-file creation; retrying a few times makes that race harmless.
_CREATE_RETRIES = 5


class LocalBlobStore:
    def __init__(self, root: str | os.PathLike[str]):
        self.root = make_dirs(Path(root).absolute(), "storage.root")

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root)!r})"

    # ---- paths ------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def local_path(self, key: str) -> Path:
        """The file holding ``key``, for serving it with range support. Raises BlobNotFound."""
        path = self._path(key)
        if not path.is_file():
            raise BlobNotFound(f"no blob {key!r}")
        return path

    # ---- writes -----------------------------------------------------------------------

    def _write_atomic(self, path: Path, write, *, exclusive: bool = False) -> bool:
        """Write through a temporary file; ``exclusive``: only if ``path`` does not exist
        (a hard link, which never replaces), returning False if it does."""
        for attempt in range(_CREATE_RETRIES):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}{_TMP_MARK}{secrets.token_hex(6)}")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:
                if attempt == _CREATE_RETRIES - 1:
                    raise
                continue
            try:
                with os.fdopen(fd, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
                if not exclusive:
                    os.replace(tmp, path)
                else:
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        return False
                    finally:
                        tmp.unlink(missing_ok=True)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(path.parent)
            return True
        raise AssertionError("unreachable")

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        # content_type is not stored: the app derives it from the key's extension.
        self._write_atomic(self._path(key), lambda f: f.write(data))

    def create(self, key: str, data: bytes, content_type: str | None = None) -> bool:
        return self._write_atomic(self._path(key), lambda f: f.write(data), exclusive=True)

    def put_file(self, key: str, path: str, content_type: str | None = None) -> None:
        with open(path, "rb") as src:
            self._write_atomic(self._path(key), lambda f: shutil.copyfileobj(src, f, 1 << 20))

    # ---- reads ------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BlobNotFound(f"no blob {key!r}") from None

    def get_range(self, key: str, start: int, end_inclusive: int) -> bytes:
        """Bytes ``start..end_inclusive``, clipped to the object's end (as HTTP ranges are)."""
        _check_range(start, end_inclusive)
        try:
            with open(self._path(key), "rb") as f:
                f.seek(start)
                return f.read(end_inclusive - start + 1)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BlobNotFound(f"no blob {key!r}") from None

    def download(self, key: str, path: str) -> None:
        src = self.local_path(key)
        dest = Path(path)
        tmp = dest.with_name(f"{dest.name}{_TMP_MARK}{secrets.token_hex(6)}")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            if not src.exists():  # deleted while we copied
                raise BlobNotFound(f"no blob {key!r}") from None
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            raise BlobNotFound(f"no blob {key!r}") from None
        if not stat.S_ISREG(st.st_mode):
            raise BlobNotFound(f"no blob {key!r}")
        return st.st_size

    def list(self, prefix: str = "") -> Iterator[str]:
        return iter(sorted(self._walk(validate_prefix(prefix))))

    def _walk(self, prefix: str) -> list[str]:
        # Start at the deepest directory the prefix names, not at the root.
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root.joinpath(*head.split("/")) if head else self.root
        if not start.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(start):
            rel = os.path.relpath(dirpath, self.root)
            base = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            for name in files:
                key = base + name
                if _TMP_MARK in name or not key.startswith(prefix):
                    continue
                keys.append(key)
        return keys

    # ---- deletes ----------------------------------------------------------------------

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return

    def delete_prefix(self, prefix: str) -> int:
        if not validate_prefix(prefix):
            raise BadInput("refusing to delete every blob: give a non-empty prefix")
        n = 0
        for key in self._walk(prefix):
            try:
                self._path(key).unlink()
                n += 1
            except FileNotFoundError:
                continue
        self._prune_empty_dirs(prefix)
        log.info("deleted blobs", extra={"prefix": prefix, "count": n})
        return n

    def _prune_empty_dirs(self, prefix: str) -> None:
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        top = self.root.joinpath(*head.split("/")) if head else self.root
        if not top.is_dir():
            return
        for dirpath, _dirs, _files in os.walk(top, topdown=False):
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            if rel != "." and (rel + "/").startswith(prefix):
                try:
                    os.rmdir(dirpath)
                except OSError:  # not empty: something else lives there, or was just written
                    continue

    # ---- urls -------------------------------------------------------------------------

    def url(
        self,
        key: str,
        expires_s: int,
        *,
        disposition: str | None = None,
        content_type: str | None = None,
    ) -> str | None:
        validate_key(key)
        return None  # streamed by the web app behind the attendee's link (module docstring)


@register("local")
def _create(cfg) -> LocalBlobStore:  # cfg: LocalStorage
    return LocalBlobStore(cfg.root)


def _check_range(start: int, end_inclusive: int) -> None:
    if start < 0 or end_inclusive < start:
        raise BadInput(f"invalid byte range {start}-{end_inclusive}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- tokenized URLs ------------------------------------------------------------------


def sign_blob_token(secret: str, key: str, expires_s: float, now: float | None = None) -> str:
    """An expiring token that grants GET on one key: ``<expires_at>.<hmac>``, URL-safe.

    The app appends it as ``?token=...`` to its blob route; ``check_blob_token``
    verifies it without any database lookup.
    """
    if not secret:
        raise BadInput("a blob token needs a non-empty secret")
    expires_at = int((time.time() if now is None else now) + expires_s)
    return f"{expires_at}.{signing.sign(secret.encode(), _message(validate_key(key), expires_at))}"


def check_blob_token(secret: str, key: str, token: str, now: float | None = None) -> bool:
    """True if ``token`` was made by ``sign_blob_token`` for this key and has not expired."""
    expires_text, _, mac = token.partition(".")
    # isascii: str.isdigit() accepts '²'.
    if not expires_text.isascii() or not expires_text.isdigit() or len(expires_text) > 18:
        return False
    expires_at = int(expires_text)
    if expires_at < (time.time() if now is None else now):
        return False
    return signing.verify(secret.encode(), _message(key, expires_at), mac)


def _message(key: str, expires_at: int) -> bytes:
    # The "blob:" prefix keeps these MACs apart from any other use of the same secret.
    return f"blob:{key}:{expires_at}".encode()
