"""Blob stores: one suite, run on ``local`` and on ``gcs`` (through gcp-storage-emulator)."""

from __future__ import annotations

import os
import threading
import urllib.request
from pathlib import Path

import pytest
from gcs_signing import service_account_credentials

from cloud_trainer.config import GcsStorage, LocalStorage
from cloud_trainer.storage import BlobNotFound, create_blob_store, validate_key
from cloud_trainer.storage.local import LocalBlobStore, check_blob_token, sign_blob_token
from edge_agent.errors import BadInput

BAD_KEYS = [
    "",
    "/etc/passwd",
    "../escape",
    "sessions/../../etc/passwd",
    "sessions/./x",
    "a//b",
    "a/b/",
    "a\\b",
    "a\x00b",
    "a b",
    "x" * 1025,
]


# ---- the same behaviour on every backend ------------------------------------------------


def test_put_then_get_returns_the_same_bytes(blob_store):
    data = bytes(range(256)) * 40
    blob_store.put("sessions/s1/frames/cam0/shard-00000000.bin", data)
    assert blob_store.get("sessions/s1/frames/cam0/shard-00000000.bin") == data
    assert blob_store.size("sessions/s1/frames/cam0/shard-00000000.bin") == len(data)
    assert blob_store.exists("sessions/s1/frames/cam0/shard-00000000.bin")


def test_put_replaces_an_existing_object_whole(blob_store):
    blob_store.put("a/obj.bin", b"old contents that are longer")
    blob_store.put("a/obj.bin", b"new")
    assert blob_store.get("a/obj.bin") == b"new"
    assert list(blob_store.list("a/")) == ["a/obj.bin"]


def test_missing_blob_raises_blob_not_found(blob_store):
    with pytest.raises(BlobNotFound):
        blob_store.get("nope/missing.bin")
    with pytest.raises(BlobNotFound):
        blob_store.size("nope/missing.bin")
    with pytest.raises(BlobNotFound):
        blob_store.get_range("nope/missing.bin", 0, 10)
    assert not blob_store.exists("nope/missing.bin")


def test_get_range_is_inclusive_and_clipped_to_the_end(blob_store):
    blob_store.put("r/obj", b"0123456789")
    assert blob_store.get_range("r/obj", 0, 0) == b"0"
    assert blob_store.get_range("r/obj", 2, 5) == b"2345"
    assert blob_store.get_range("r/obj", 8, 100) == b"89"
    assert blob_store.get_range("r/obj", 10, 20) == b""
    with pytest.raises(BadInput):
        blob_store.get_range("r/obj", 5, 4)
    with pytest.raises(BadInput):
        blob_store.get_range("r/obj", -1, 4)


def test_put_file_and_download_round_trip(blob_store, tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    src = work / "src.mp4"
    src.write_bytes(os.urandom(300_000))
    blob_store.put_file("sessions/s1/video/out.mp4", str(src), content_type="video/mp4")
    dest = work / "dest.mp4"
    dest.write_bytes(b"stale")
    blob_store.download("sessions/s1/video/out.mp4", str(dest))
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in work.iterdir()) == ["dest.mp4", "src.mp4"]


def test_download_of_a_missing_blob_leaves_no_file(blob_store, tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(BlobNotFound):
        blob_store.download("nope/missing.bin", str(work / "out.bin"))
    assert list(work.iterdir()) == []


def test_list_returns_sorted_keys_under_a_prefix(blob_store):
    for key in ["s/b/2", "s/a/1", "s/b/10", "t/x", "sx/y"]:
        blob_store.put(key, b"x")
    assert list(blob_store.list("s/")) == ["s/a/1", "s/b/10", "s/b/2"]
    assert list(blob_store.list("s/b/1")) == ["s/b/10"]
    assert list(blob_store.list("s")) == ["s/a/1", "s/b/10", "s/b/2", "sx/y"]
    assert list(blob_store.list()) == ["s/a/1", "s/b/10", "s/b/2", "sx/y", "t/x"]
    assert list(blob_store.list("nothing/")) == []


def test_delete_is_idempotent(blob_store):
    blob_store.put("d/one", b"1")
    blob_store.delete("d/one")
    blob_store.delete("d/one")
    assert not blob_store.exists("d/one")


def test_delete_prefix_removes_only_that_session(blob_store):
    for key in ["sessions/s1/frames/a", "sessions/s1/video/b.mp4", "sessions/s10/frames/a"]:
        blob_store.put(key, b"x")
    assert blob_store.delete_prefix("sessions/s1/") == 2
    assert list(blob_store.list("sessions/")) == ["sessions/s10/frames/a"]
    assert blob_store.delete_prefix("sessions/s1/") == 0


def test_delete_prefix_refuses_to_delete_everything(blob_store):
    blob_store.put("keep/me", b"x")
    with pytest.raises(BadInput):
        blob_store.delete_prefix("")
    assert blob_store.exists("keep/me")


@pytest.mark.parametrize("key", BAD_KEYS)
def test_every_operation_rejects_unsafe_keys(blob_store, key: str, tmp_path: Path):
    src = tmp_path / "f"
    src.write_bytes(b"x")
    calls = [
        lambda: blob_store.put(key, b"x"),
        lambda: blob_store.put_file(key, str(src)),
        lambda: blob_store.create(key, b"x"),
        lambda: blob_store.get(key),
        lambda: blob_store.get_range(key, 0, 1),
        lambda: blob_store.download(key, str(tmp_path / "out")),
        lambda: blob_store.exists(key),
        lambda: blob_store.size(key),
        lambda: blob_store.delete(key),
        lambda: blob_store.url(key, 60),
    ]
    for call in calls:
        with pytest.raises(BadInput):
            call()


def test_prefixes_with_traversal_are_rejected(blob_store):
    with pytest.raises(BadInput):
        list(blob_store.list("../"))
    with pytest.raises(BadInput):
        blob_store.delete_prefix("sessions/../")


def test_concurrent_readers_see_the_old_or_the_new_object_never_a_mix(blob_store):
    old, new = b"A" * 200_000, b"B" * 300_000
    blob_store.put("race/obj", old)
    torn: list[int] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            data = blob_store.get("race/obj")
            if data not in (old, new):
                torn.append(len(data))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(6):
            blob_store.put("race/obj", new if i % 2 == 0 else old)
    finally:
        stop.set()
        reader.join()
    assert torn == []


def test_create_makes_a_new_object(blob_store):
    assert blob_store.create("claims/v1/claim.json", b"first")
    assert blob_store.get("claims/v1/claim.json") == b"first"
    # Refusing an existing key is checked on local only: the emulator ignores GCS's
    # ifGenerationMatch precondition, which real GCS enforces.


def test_url_is_none_without_signing_credentials(blob_store):
    # local: served by the app; the emulator's anonymous credentials cannot sign.
    blob_store.put("u/obj", b"x")
    assert blob_store.url("u/obj", 60) is None


def test_factory_builds_the_configured_backend(storage_config):
    store = create_blob_store(storage_config)
    expected = "LocalBlobStore" if isinstance(storage_config, LocalStorage) else "GcsBlobStore"
    assert type(store).__name__ == expected


# ---- local ---------------------------------------------------------------------------------


def test_local_put_leaves_no_temporary_files(tmp_path: Path):
    store = LocalBlobStore(tmp_path / "root")
    store.put("a/b/c.bin", b"x" * 1000)
    store.put("a/b/c.bin", b"y" * 10)
    assert sorted(p.name for p in (tmp_path / "root" / "a" / "b").iterdir()) == ["c.bin"]


def test_local_create_refuses_an_existing_key_and_racers_get_one_winner(tmp_path: Path):
    store = LocalBlobStore(tmp_path / "root")
    store.put("c/taken", b"old")
    assert not store.create("c/taken", b"new")
    assert store.get("c/taken") == b"old"
    results: dict[int, bool] = {}
    barrier = threading.Barrier(8)

    def claim(i: int) -> None:
        barrier.wait()
        results[i] = store.create("c/race", f"writer {i}".encode())

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in results.items() if won]
    assert len(winners) == 1
    assert store.get("c/race") == f"writer {winners[0]}".encode()
    assert sorted(p.name for p in (tmp_path / "root" / "c").iterdir()) == ["race", "taken"]


def test_local_put_fsyncs_the_object_and_its_directory(tmp_path: Path, fsynced):
    # Ingest acks a frame as durable once put returns: the bytes and the name must be on disk.
    store = LocalBlobStore(tmp_path / "root")
    synced = fsynced
    store.put("sessions/s1/frames/cam0/shard-00000000.bin", b"x" * 100)
    leaf = str(tmp_path / "root" / "sessions" / "s1" / "frames" / "cam0")
    assert any(p.startswith(f"{leaf}/shard-00000000.bin") for p in synced), synced  # its temp file
    assert leaf in synced, synced  # the directory holding its name


def test_local_failed_write_keeps_the_old_object(tmp_path: Path, monkeypatch):
    store = LocalBlobStore(tmp_path / "root")
    store.put("k/obj", b"old")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        store.put("k/obj", b"new and longer")
    monkeypatch.undo()
    assert store.get("k/obj") == b"old"
    assert [p.name for p in (tmp_path / "root" / "k").iterdir()] == ["obj"]


def test_local_list_skips_files_that_are_not_keys(tmp_path: Path):
    store = LocalBlobStore(tmp_path / "root")
    store.put("a/ok", b"x")
    (tmp_path / "root" / "a" / "ok.~tmp-123").write_bytes(b"half")
    assert list(store.list()) == ["a/ok"]


def test_local_delete_prefix_removes_empty_directories(tmp_path: Path):
    store = LocalBlobStore(tmp_path / "root")
    store.put("sessions/s1/frames/cam0/shard", b"x")
    store.put("sessions/s2/frames/cam0/shard", b"x")
    store.delete_prefix("sessions/s1/")
    assert [p.name for p in (tmp_path / "root" / "sessions").iterdir()] == ["s2"]


def test_local_directory_is_not_a_blob(tmp_path: Path):
    store = LocalBlobStore(tmp_path / "root")
    store.put("dir/file", b"x")
    assert not store.exists("dir")
    with pytest.raises(BlobNotFound):
        store.get("dir")
    with pytest.raises(BlobNotFound):
        store.size("dir")
    with pytest.raises(BlobNotFound):
        store.local_path("dir")
    assert store.local_path("dir/file").read_bytes() == b"x"


def test_local_blob_token_grants_one_key_until_it_expires():
    token = sign_blob_token("s3cret", "sessions/s1/video/out.mp4", 60, now=1000)
    assert check_blob_token("s3cret", "sessions/s1/video/out.mp4", token, now=1059)
    assert not check_blob_token("s3cret", "sessions/s1/video/out.mp4", token, now=1061)
    assert not check_blob_token("s3cret", "sessions/s2/video/out.mp4", token, now=1001)
    assert not check_blob_token("other", "sessions/s1/video/out.mp4", token, now=1001)
    forged = f"9999999999.{token.split('.', 1)[1]}"
    assert not check_blob_token("s3cret", "sessions/s1/video/out.mp4", forged, now=1001)
    assert not check_blob_token("s3cret", "sessions/s1/video/out.mp4", "garbage", now=1001)


def test_validate_key_accepts_the_pipeline_layout():
    for key in [
        "sessions/0123abcd/frames/cam-0/shard-00000000.bin",
        "references/salsa/v2/poses.npz",
        "base/booth-1/ckpt-12.index",
    ]:
        assert validate_key(key) == key


# ---- gcs -------------------------------------------------------------------------------------


def test_gcs_signed_url_fetches_the_object(gcs_emulator):
    from cloud_trainer.storage.gcs import GcsBlobStore

    bucket = gcs_emulator.new_bucket()
    GcsBlobStore(bucket, endpoint=gcs_emulator.endpoint).put(
        "sessions/s1/video/out.mp4", b"movie", content_type="video/mp4"
    )
    signing = GcsBlobStore(
        bucket, endpoint=gcs_emulator.endpoint, credentials=service_account_credentials()
    )
    url = signing.url("sessions/s1/video/out.mp4", 3600)
    assert url is not None
    assert url.startswith(f"{gcs_emulator.endpoint}/{bucket}/sessions/s1/video/out.mp4?")
    assert "X-Goog-Signature=" in url and "X-Goog-Expires=3600" in url
    # The emulator does not check signatures, but it proves the URL names the object.
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.read() == b"movie"


def test_gcs_signed_url_lifetime_is_capped_at_seven_days(gcs_emulator):
    from cloud_trainer.storage.gcs import GcsBlobStore

    store = GcsBlobStore(
        gcs_emulator.new_bucket(),
        endpoint=gcs_emulator.endpoint,
        credentials=service_account_credentials(),
    )
    url = store.url("k/obj", 30 * 24 * 3600)
    assert url is not None and "X-Goog-Expires=604800" in url


def test_gcs_store_reads_what_another_client_wrote(gcs_emulator):
    cfg = GcsStorage(
        bucket=gcs_emulator.new_bucket(),
        project=gcs_emulator.project,
        endpoint=gcs_emulator.endpoint,
    )
    create_blob_store(cfg).put("x/y", b"shared")
    assert create_blob_store(cfg).get("x/y") == b"shared"
