"""Bearer tokens and TLS on the ingest and control server."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import grpc
import pytest
import transport_helpers as th

from cloud_trainer.config import TlsServer
from cloud_trainer.ingest.auth import TokenBook
from cloud_trainer.ingest.errors import Unauthenticated
from cloud_trainer.repository import Repository
from cloud_trainer.storage import create_blob_store
from edge_agent.config import TlsClient
from edge_agent.stream import Streamer
from protos import booth_pb2, booth_pb2_grpc


def test_tokens_are_checked_against_their_hashes_with_expiry():
    now = [1000.0]
    book = TokenBook(
        th.BOOTH,
        [th.agent_entry("cam0"), th.agent_entry("cam1", expires_at=2000.0)],
        clock=lambda: now[0],
    )
    assert book.authenticate(f"Bearer {th.token_for('cam0')}").camera_id == "cam0"
    assert book.authenticate(f"bearer {th.token_for('cam1')}").camera_id == "cam1"
    now[0] = 2000.0
    with pytest.raises(Unauthenticated, match="expired"):
        book.authenticate(f"Bearer {th.token_for('cam1')}")
    for bad in (None, "", "Bearer", "Basic abc", f"Bearer {th.token_for('cam0')}x"):
        with pytest.raises(Unauthenticated):
            book.authenticate(bad)
    # The config never holds a token, only its sha256.
    assert (
        th.agent_entry("cam0").token_sha256
        == hashlib.sha256(th.token_for("cam0").encode()).hexdigest()
    )


async def _report(port: int, token: str, camera_id: str, channel=None) -> grpc.StatusCode:
    own = channel is None
    channel = channel or grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await booth_pb2_grpc.ControlStub(channel).Report(
            booth_pb2.AgentStatus(booth_id=th.BOOTH, camera_id=camera_id),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as e:
        return e.code()
    finally:
        if own:
            await channel.close()


async def test_control_refuses_bad_tokens_and_agents_speaking_for_other_cameras(
    tmp_path: Path, caplog
):
    cfg = th.booth_config(tmp_path, agents=[th.agent_entry("cam0"), th.agent_entry("old", 1.0)])
    repo = Repository.from_config(cfg.database)
    async with th.running_server(cfg, repo=repo, store=create_blob_store(cfg.storage)) as srv:
        assert await _report(srv.port, th.token_for("cam0"), "cam0") == grpc.StatusCode.OK
        assert await _report(srv.port, "guess", "cam0") == grpc.StatusCode.UNAUTHENTICATED
        # The log says where a refused token came from: an unknown one names no camera.
        refusal = next(r for r in caplog.records if "unknown token" in r.getMessage())
        assert "from ipv4:127.0.0.1:" in refusal.getMessage()
        assert (
            await _report(srv.port, th.token_for("old"), "old") == grpc.StatusCode.UNAUTHENTICATED
        )
        assert (
            await _report(srv.port, th.token_for("cam0"), "cam1")
            == grpc.StatusCode.PERMISSION_DENIED
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            call = booth_pb2_grpc.ControlStub(channel).Connect(
                booth_pb2.Register(booth_id=th.BOOTH, camera_id="cam0"),
                metadata=(("authorization", f"Bearer {th.token_for('old')}"),),
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "expired" in err.value.details()


@pytest.fixture
def tls_env(tmp_path: Path):
    server_cert = th.self_signed(tmp_path / "pki", "server", host="localhost")
    other_ca = th.self_signed(tmp_path / "pki", "other", host="localhost")
    cfg = th.booth_config(tmp_path, tls=TlsServer(cert=server_cert.cert, key=server_cert.key))
    repo = Repository.from_config(cfg.database)
    return cfg, repo, server_cert, other_ca


async def test_a_take_streams_over_tls_when_the_agent_trusts_the_server(tls_env, tmp_path):
    cfg, repo, server_cert, _ = tls_env
    store = create_blob_store(cfg.storage)
    sid = th.new_session(repo)
    sent = th.frames(20)
    async with th.running_server(cfg, repo=repo, store=store) as srv:
        uplink = th.uplink_config(
            f"localhost:{srv.port}",
            tmp_path / "spool",
            tls=TlsClient(ca_cert=server_cert.cert),
        )
        st = Streamer(uplink, booth_id=th.BOOTH, camera_id="cam0")
        await st.start()
        try:
            take = st.open_take(sid)
            take.add_frames(sent)
            take.end()
            await st.wait_uploaded(sid, timeout_s=30)
        finally:
            await st.stop()
    th.assert_exactly_once(repo, store, sid, "cam0", sent)


async def test_tls_failures_are_unavailable(tls_env):
    cfg, repo, _server_cert, other_ca = tls_env
    async with th.running_server(cfg, repo=repo, store=create_blob_store(cfg.storage)) as srv:
        token = th.token_for("cam0")
        # A client that trusts another CA refuses the server's certificate.
        creds = grpc.ssl_channel_credentials(root_certificates=other_ca.cert.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{srv.port}", creds) as channel:
            assert await _report(srv.port, token, "cam0", channel) == grpc.StatusCode.UNAVAILABLE
        # A plaintext client cannot talk to a TLS server.
        assert await _report(srv.port, token, "cam0") == grpc.StatusCode.UNAVAILABLE


async def test_a_stream_opened_before_its_token_expires_ends_when_it_does(tmp_path: Path):
    import asyncio
    import time

    expires_at = time.time() + 1.5
    cfg = th.booth_config(tmp_path, agents=[th.agent_entry("cam0", expires_at=expires_at)])
    repo = Repository.from_config(cfg.database)
    sid = th.new_session(repo)
    auth = (("authorization", f"Bearer {th.token_for('cam0')}"),)
    async with th.running_server(cfg, repo=repo, store=create_blob_store(cfg.storage)) as srv:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            control = booth_pb2_grpc.ControlStub(channel).Connect(
                booth_pb2.Register(booth_id=th.BOOTH, camera_id="cam0"), metadata=auth
            )
            ingest = booth_pb2_grpc.IngestStub(channel).Stream(metadata=auth)
            await ingest.write(th.hello(sid))
            assert (await ingest.read()).WhichOneof("body") == "hello_ack"  # accepted, open
            for call in (control, ingest):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async with asyncio.timeout(30):
                        while (await call.read()) is not grpc.aio.EOF:
                            pass
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "expired" in err.value.details()
                assert time.time() >= expires_at
        assert srv.registry.booth(th.BOOTH).online() == []


async def test_control_connect_refuses_a_token_speaking_for_another_camera(tmp_path: Path):
    cfg = th.booth_config(tmp_path)
    repo = Repository.from_config(cfg.database)
    async with th.running_server(cfg, repo=repo, store=create_blob_store(cfg.storage)) as srv:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            call = booth_pb2_grpc.ControlStub(channel).Connect(
                booth_pb2.Register(booth_id=th.BOOTH, camera_id="cam1"),
                metadata=(("authorization", f"Bearer {th.token_for('cam0')}"),),
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async with asyncio.timeout(5):
                    await call.read()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert srv.registry.booth(th.BOOTH).online() == []
