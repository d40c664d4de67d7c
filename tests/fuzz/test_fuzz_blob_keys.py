"""Fuzzing blob keys and reference names: traversal is refused, nothing escapes the store.

Keys come from ids and names that crossed a network or a form. Properties:
- ``validate_key`` refuses (BadInput) anything but ``/``-separated parts of
  ``[A-Za-z0-9._-]`` without ``.``/``..`` parts: ``../``, absolute paths,
  backslashes, URL-encoded and Unicode dots, NUL and other control characters;
- every operation of the local store, on any key, works or raises BadInput or
  BlobNotFound (or an OSError for a key the filesystem cannot hold), and after
  it nothing exists outside the store's root but what was there before;
- a reference name maps to one safe key part or is refused with BadInput.

Bugs this found are regression tests at the end of the file.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

import pytest
from fuzz_settings import fuzz_marks, fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from cloud_trainer.reference import ReferenceLibrary, storage_key
from cloud_trainer.storage.base import BlobNotFound, validate_key, validate_prefix
from cloud_trainer.storage.local import LocalBlobStore, check_blob_token, sign_blob_token
from edge_agent.errors import BadInput

pytestmark = fuzz_marks()

_SAFE_KEY = re.compile(r"[A-Za-z0-9._\-]+(/[A-Za-z0-9._\-]+)*")
# Errors the filesystem gives for a key it cannot hold although it is valid: a part over
# 255 bytes, or "a" and "a/b" both stored (a file where a directory must be, or the reverse).
_FS_LIMITS = {errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY}

_ATTACK_PARTS = [
    "..",
    ".",
    "",
    "...",
    "%2e%2e",
    "%2E%2E",
    "%2f",
    "..%2f..",
    "%00",
    "..\\..",
    "\\",
    "C:",
    "~",
    "~root",
    "\x00",
    "\n",
    "\r\n",
    "\t",
    " ",
    "\u2024\u2024",  # one dot leader, twice
    "\u2025",  # two dot leader
    "\uff0e\uff0e",  # fullwidth full stops
    "\u00b7\u00b7",
    ".\u200b.",  # a zero-width space between dots
    "etc",
    "passwd",
    "sessions",
    "frames",
    "cam0",
    "shard-00000000.bin",
    "a" * 300,
]
_part = st.sampled_from(_ATTACK_PARTS) | st.text(max_size=8)
KEYS = st.tuples(
    st.sampled_from(["", "", "/", "//", "./", "../", "\\"]),
    st.lists(_part, min_size=1, max_size=6),
    st.sampled_from(["", "", "/", "\n", "\x00", "/.."]),
).map(lambda t: t[0] + "/".join(t[1]) + t[2])


def _is_safe(key: str) -> bool:
    return (
        bool(_SAFE_KEY.fullmatch(key))
        and len(key) <= 1024
        and all(p not in (".", "..") for p in key.split("/"))
    )


@fuzz_settings(share=2.0)
@given(key=KEYS | st.text(max_size=40))
def test_validate_key_accepts_only_safe_relative_keys(key: str) -> None:
    try:
        validate_key(key)
    except BadInput as e:
        assert "invalid blob key" in str(e)
        return
    assert _is_safe(key), f"validate_key accepted {key!r}"


def _tree(top: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and directory under ``top``, symlinks not followed."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirs, files in os.walk(top):
        for d in dirs:
            out[os.path.join(dirpath, d)] = None
        for f in files:
            p = os.path.join(dirpath, f)
            out[p] = b"<symlink>" if os.path.islink(p) else Path(p).read_bytes()
    return out


def _attempt(fn, *args) -> object:
    try:
        return fn(*args)
    except (BadInput, BlobNotFound) as e:
        return e
    except OSError as e:
        assert e.errno in _FS_LIMITS, f"{fn.__name__}{args!r}: {e!r}"
        return e


@fuzz_settings(share=1.0)
@given(data=st.data())
def test_no_store_operation_on_any_key_escapes_the_store_root(
    data: st.DataObject, tmp_path: Path
) -> None:
    root = tmp_path / "store" / "blobs"
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.txt").write_bytes(b"do not touch")
    src = outside / "upload.bin"
    src.write_bytes(b"payload")
    dest_dir = tmp_path / "downloads"
    dest_dir.mkdir(exist_ok=True)
    (dest_dir / "copy.bin").unlink(missing_ok=True)  # the one file a download may write
    store = LocalBlobStore(root)
    before = {p: v for p, v in _tree(tmp_path).items() if not p.startswith(str(root))}
    # Absolute keys aimed at a real directory next to the store, and relative ones climbing to it.
    key = data.draw(
        KEYS
        | st.lists(
            st.sampled_from(["sessions", "s1", "cam0", "x.bin", "...", "a-b_c"]), min_size=1
        ).map("/".join)
        | st.sampled_from(
            [
                str(outside / "pwned"),
                f"{outside}/secret.txt",
                "../outside/pwned",
                "../../outside/pwned",
                "blobs/../../outside/pwned",
                "..%2f..%2foutside%2fpwned",
            ]
        ),
        label="key",
    )
    valid = not isinstance(_attempt(validate_key, key), BadInput)

    put = _attempt(store.put, key, b"fuzz")
    got = _attempt(store.get, key)
    if put is None:
        assert valid and got == b"fuzz" and store.exists(key) and store.size(key) == 4
        assert key in list(store.list(key))
        assert store.get_range(key, 1, 2) == b"uz"
    _attempt(store.put_file, key, str(src))
    _attempt(store.download, key, str(dest_dir / "copy.bin"))
    _attempt(store.exists, key)
    _attempt(store.size, key)
    _attempt(store.local_path, key)
    _attempt(store.url, key, 60)
    _attempt(lambda k: list(store.list(k)), key)
    _attempt(lambda k: list(store.list(k + "/")), key)
    _attempt(store.delete, key)
    _attempt(store.delete_prefix, key)
    if not valid:  # refused before any file is touched
        for fn, args in [
            (store.put, (key, b"x")),
            (store.get, (key,)),
            (store.exists, (key,)),
            (store.delete, (key,)),
            (store.local_path, (key,)),
        ]:
            assert isinstance(_attempt(fn, *args), BadInput), f"{fn.__name__}({key!r})"
    if isinstance(_attempt(validate_prefix, key), BadInput):
        assert isinstance(_attempt(store.delete_prefix, key), BadInput)

    after = {p: v for p, v in _tree(tmp_path).items() if not p.startswith(str(root))}
    after.pop(str(dest_dir / "copy.bin"), None)
    assert after == before, f"{key!r} changed files outside the store"
    for path in _tree(root):
        assert Path(path).resolve().is_relative_to(root.resolve()), path
    shutil.rmtree(root)  # the next example starts from an empty store


@fuzz_settings(share=2.0)
@given(name=st.lists(_part, min_size=1, max_size=3).map("/".join) | st.text(max_size=70))
def test_a_reference_name_is_one_safe_key_part_or_refused(name: str, tmp_path: Path) -> None:
    try:
        part = storage_key(name)
    except BadInput as e:
        assert "invalid" in str(e)
        return
    assert "/" not in part and part not in (".", "..")
    assert validate_key(f"references/{part}/v1/meta.json")
    library = ReferenceLibrary(LocalBlobStore(tmp_path / "blobs"))
    assert library.versions(name) == [] and not library.exists(name)


@fuzz_settings(share=1.0)
@given(prefix=KEYS | st.text(max_size=20))
def test_validate_prefix_refuses_what_validate_key_refuses(prefix: str) -> None:
    try:
        validate_prefix(prefix)
    except BadInput:
        return
    body = prefix[:-1] if prefix.endswith("/") else prefix
    assert prefix == "" or _is_safe(body)


# ---- bugs this found, kept as regression cases -------------------------------------------------------------------------------


@pytest.mark.parametrize("check", ["validate_key", "storage_key"])
def test_a_trailing_newline_is_refused_as_a_key(check: str) -> None:
    with pytest.raises(BadInput):
        if check == "validate_key":
            validate_key("sessions/abc\n")
        else:
            storage_key("warmup\n")


@pytest.mark.parametrize("token", ["1\u00b2.mac", "99999999999.\u00e9"])
def test_a_forged_non_ascii_blob_token_is_refused(token: str) -> None:
    assert check_blob_token("secret", "sessions/a/video.mp4", token) is False


@fuzz_settings(share=1.0)
@given(token=st.text(st.characters(max_codepoint=127), max_size=40))
def test_a_forged_ascii_blob_token_is_refused_never_raises(token: str) -> None:
    key = "sessions/a/video.mp4"
    assert check_blob_token("secret", key, sign_blob_token("secret", key, 60)) is True
    assert check_blob_token("secret", key, token) is False
