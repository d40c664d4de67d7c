"""A camera's newer stream takes over from its older one: the older hears why, and the
newer resumes after everything the older made durable, even a shard still being written."""

from __future__ import annotations

import asyncio
import logging
import threading

import grpc
import pytest
import transport_helpers as th

from cloud_trainer.repository import Repository
from cloud_trainer.storage import create_blob_store
from protos import booth_pb2_grpc


@pytest.fixture
def booth(tmp_path):
    cfg = th.booth_config(tmp_path)
    repo = Repository.from_config(cfg.database)
    yield cfg, repo, create_blob_store(cfg.storage)
    repo.close()


def _open_stream(port: int):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = booth_pb2_grpc.IngestStub(channel)
    return channel, lambda: stub.Stream(
        metadata=(("authorization", f"Bearer {th.token_for('cam0')}"),)
    )


async def _status_after_reading_all(call) -> tuple[grpc.StatusCode, str]:
    """The status of a stream, read as the agent does: after the responses before it."""
    async with asyncio.timeout(30):
        try:
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details()
        return await call.code(), await call.details()


async def test_the_older_stream_of_a_camera_ends_aborted_saying_a_newer_one_took_over(booth):
    cfg, repo, store = booth
    async with th.running_server(cfg, repo=repo, store=store) as srv:
        sid = th.new_session(repo)
        channel, open_call = _open_stream(srv.port)
        older = open_call()
        await older.write(th.hello(sid))
        assert (await older.read()).hello_ack.resume_after_seq == -1
        for seq in range(3):
            await older.write(th.frame_req(seq))
        newer = open_call()
        await newer.write(th.hello(sid))
        resume = (await newer.read()).hello_ack.resume_after_seq
        code, details = await _status_after_reading_all(older)
        assert code == grpc.StatusCode.ABORTED
        assert f"a newer stream of camera cam0 for session {sid} took over" in details
        # The newer one goes on from where the store is, and the take completes.
        for seq in range(resume + 1, 3):
            await newer.write(th.frame_req(seq))
        await newer.write(th.end_req(3))
        async with asyncio.timeout(30):
            while not (await newer.read()).ack.take_complete:
                pass
        newer.cancel()
        await channel.close()
    assert sorted(th.stored_frames(repo, store, sid, "cam0")) == [0, 1, 2]


class _HeldStore:
    """The real store, whose shard puts wait until the test lets them through."""

    def __init__(self, inner):
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()

    def put(self, key, data, content_type=None):
        self.entered.set()
        assert self.release.wait(60), "the test never released the put"
        self.inner.put(key, data, content_type)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _OnRecord(logging.Handler):
    def __init__(self, text: str, then):
        super().__init__()
        self.text, self.then = text, then

    def emit(self, record):
        if self.text in record.getMessage():
            self.then()


async def test_a_reconnect_during_a_shard_write_resumes_after_that_shard(booth):
    """Before, the older stream's in-flight write was cancelled under it by the takeover:
    its thread still committed the shard, after the newer stream had been told -1."""
    cfg, repo, store = booth
    held = _HeldStore(store)
    on_takeover = _OnRecord("reconnected to session", held.release.set)
    server_log = logging.getLogger("cloud_trainer.ingest.server")
    server_log.addHandler(on_takeover)
    level = server_log.level
    server_log.setLevel(logging.INFO)
    try:
        async with th.running_server(cfg, repo=repo, store=held) as srv:
            sid = th.new_session(repo)
            channel, open_call = _open_stream(srv.port)
            older = open_call()
            await older.write(th.hello(sid))
            await older.read()
            for seq in range(10):
                await older.write(th.frame_req(seq))
            assert await asyncio.to_thread(held.entered.wait, 30)  # a shard is being put
            older.cancel()  # the Wi-Fi drops; the board reconnects
            newer = open_call()
            await newer.write(th.hello(sid))
            async with asyncio.timeout(30):
                ack = (await newer.read()).hello_ack
            durable = repo.take_position(sid, "cam0").durable_seq
            assert durable >= 0
            assert ack.resume_after_seq == durable
            newer.cancel()
            await channel.close()
    finally:
        server_log.removeHandler(on_takeover)
        server_log.setLevel(level)
        held.release.set()
