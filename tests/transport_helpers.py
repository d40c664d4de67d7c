"""Shared pieces of the transport tests: configs, JPEGs, servers, a cuttable proxy, certs.

Also runnable: ``python tests/transport_helpers.py serve CONFIG`` is not needed (the
server runs as ``booth ingest``), but ``python tests/transport_helpers.py agent ...``
runs a streamer in its own process so a test can SIGKILL it (see ``agent_main``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import json
import socket
import struct
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # when run as a script
    sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from cloud_trainer.config import AgentToken, BoothConfig, IngestConfig, LocalStorage  # noqa: E402
from edge_agent.config import TlsClient, UplinkConfig  # noqa: E402
from edge_agent.frames import CapturedFrame  # noqa: E402

BOOTH = "booth-t"


def token_for(camera_id: str) -> str:
    return f"token-{camera_id}-0123456789abcdef"


def agent_entry(camera_id: str, expires_at: float | None = None) -> AgentToken:
    digest = hashlib.sha256(token_for(camera_id).encode()).hexdigest()
    return AgentToken(camera_id=camera_id, token_sha256=digest, expires_at=expires_at)


def booth_config(
    tmp: Path,
    *,
    cameras: tuple[str, ...] = ("cam0", "cam1"),
    port: int = 0,
    shard_mb: float = 0.05,
    flush_interval_s: float = 0.05,
    max_message_mb: int = 4,
    tls: Any = None,
    agents: list[AgentToken] | None = None,
) -> BoothConfig:
    from cloud_trainer.config import SqliteDatabase, SqliteQueue

    return BoothConfig(
        booth={"id": BOOTH},
        agent={"booth_id": BOOTH},
        ingest=IngestConfig(
            host="127.0.0.1",
            port=port,
            shard_mb=shard_mb,
            flush_interval_s=flush_interval_s,
            max_message_mb=max_message_mb,
            tls=tls,
            agents=agents if agents is not None else [agent_entry(c) for c in cameras],
        ),
        storage=LocalStorage(root=tmp / "blobs"),
        database=SqliteDatabase(path=tmp / "booth.db"),
        queue=SqliteQueue(path=tmp / "queue.db"),
    )


def uplink_config(
    address: str,
    spool_dir: Path,
    camera_id: str = "cam0",
    *,
    budget_mb: int = 64,
    tls: TlsClient | None = None,
    token: str | None = None,
) -> UplinkConfig:
    return UplinkConfig(
        address=address,
        token=token if token is not None else token_for(camera_id),
        tls=tls,
        spool_dir=spool_dir,
        spool_budget_mb=budget_mb,
        max_message_mb=4,
        backoff_initial_s=0.05,
        backoff_max_s=0.5,
    )


def make_jpeg(seq: int, size: tuple[int, int] = (64, 48), salt: int = 0) -> bytes:
    """A small real JPEG whose content depends on ``seq`` (and ``salt``)."""
    rng = np.random.default_rng(seq * 7919 + salt)
    img = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    img = cv2.resize(img, size, interpolation=cv2.INTER_NEAREST)
    cv2.putText(img, str(seq), (2, size[1] - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255))
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    return buf.tobytes()


def frames(n: int, start: int = 0, salt: int = 0) -> list[CapturedFrame]:
    return [
        CapturedFrame(
            seq=i, capture_ts_ns=1_000_000_000 + i * 8_333_333, jpeg=make_jpeg(i, salt=salt)
        )
        for i in range(start, n)
    ]


def new_session(repo: Any, cameras: tuple[str, ...] = ("cam0",), booth_id: str = BOOTH) -> str:
    return repo.create_session(
        booth_id=booth_id,
        name="Ada",
        email="ada@example.com",
        consent=True,
        reference_name="ref",
        take_s=1.0,
        cameras=list(cameras),
    )


def stored_frames(repo: Any, store: Any, session_id: str, camera_id: str) -> dict[int, bytes]:
    """Every indexed frame, read back from its shard (hash-checked)."""
    from cloud_trainer.ingest.shards import read_frame

    # The index cannot hold a seq twice (its primary key): shard_copies looks for copies.
    return {row["seq"]: read_frame(store, row) for row in repo.frame_index(session_id, camera_id)}


def shard_copies(store: Any, session_id: str, camera_id: str) -> dict[int, int]:
    """How many times each seq is in the take's shards, indexed or not."""
    from cloud_trainer.ingest.shards import decode_shard

    copies: dict[int, int] = {}
    for key in store.list(f"sessions/{session_id}/frames/{camera_id}/"):
        for frame in decode_shard(store.get(key)):
            copies[frame.seq] = copies.get(frame.seq, 0) + 1
    return copies


def assert_exactly_once(
    repo: Any, store: Any, session_id: str, camera_id: str, sent: list[CapturedFrame]
) -> None:
    """Every captured frame indexed, byte-identical, and in the store once: a copy in a
    shard the index forgot (a crash between put and index) counts as stored twice."""
    got = stored_frames(repo, store, session_id, camera_id)
    assert sorted(got) == [f.seq for f in sent], "stored seqs differ from the captured ones"
    for f in sent:
        assert hashlib.sha256(got[f.seq]).digest() == hashlib.sha256(f.jpeg).digest(), f.seq
    twice = {seq: n for seq, n in shard_copies(store, session_id, camera_id).items() if n != 1}
    assert not twice, f"frames stored other than once (seq: copies): {twice}"


# ---- a cuttable TCP proxy ------------------------------------------------------------------


def dead_port() -> int:
    """A loopback port nothing listens on (bound and released; connections are refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CutProxy:
    """Forwards 127.0.0.1:port to an upstream port; ``cut()`` drops every live connection."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = 0
        self.cuts = 0
        self.connections = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.bytes_up = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            try:
                while data := await src.read(65536):
                    if up:
                        self.bytes_up += len(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        self._writers -= {writer, up_writer}

    def cut(self) -> None:
        self.cuts += 1
        for w in list(self._writers):
            transport = w.transport
            transport.abort()  # RST, like a Wi-Fi link that vanished
        self._writers.clear()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


# ---- certificates --------------------------------------------------------------------------


@dataclass
class CertPair:
    cert: Path
    key: Path


def self_signed(directory: Path, name: str = "server", host: str = "localhost") -> CertPair:
    """A self-signed certificate for ``host`` and 127.0.0.1 (it is its own CA)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    pair = CertPair(directory / f"{name}.crt", directory / f"{name}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pair


# ---- servers ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_server(cfg: BoothConfig, **kwargs: Any) -> AsyncIterator[Any]:
    from cloud_trainer.ingest.server import serve

    srv = serve(cfg, **kwargs)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(0)


def write_yaml_config(cfg: BoothConfig, path: Path) -> Path:
    path.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    return path


@contextlib.contextmanager
def tail_on_failure(path: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        if path.exists():
            sys.stderr.write(path.read_text(errors="replace")[-4000:])
        raise


# ---- an agent in its own process (so a test can SIGKILL it) ----------------------------------


async def _agent(args: argparse.Namespace) -> None:
    from edge_agent.stream import Streamer

    uplink = uplink_config(args.address, Path(args.spool), args.camera)
    streamer = Streamer(uplink, booth_id=BOOTH, camera_id=args.camera)
    await streamer.start()
    take = streamer.open_take(args.session, width=64, height=48, fps=120)
    take.add_frames(frames(args.upload))
    while streamer.frames_acked < args.upload:  # the first part reaches the server...
        await asyncio.sleep(0.01)
    print(f"acked {streamer.frames_acked}", flush=True)
    await streamer.stop()  # ...then the link goes away, and the rest stays spooled
    take.add_frames(frames(args.total, start=args.upload))
    print("spooled", flush=True)
    await asyncio.Event().wait()  # wait for SIGKILL


def agent_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("address")
    p.add_argument("spool")
    p.add_argument("session")
    p.add_argument("--camera", default="cam0")
    p.add_argument("--upload", type=int, required=True)
    p.add_argument("--total", type=int, required=True)
    asyncio.run(_agent(p.parse_args(argv)))


if __name__ == "__main__":
    if sys.argv[1:2] == ["agent"]:
        agent_main(sys.argv[2:])


# ---- a raw Ingest client (any bytes, no retries) -------------------------------------------


@dataclass
class RawResult:
    responses: list[Any]
    code: Any
    details: str


async def raw_ingest(
    port: int, token: str | None, requests: list[Any], *, channel: Any = None
) -> RawResult:
    """Send ``requests`` (IngestRequest or raw bytes) on one stream, half-close, read to the end."""
    import grpc

    from protos import booth_pb2

    own = channel is None
    channel = channel or grpc.aio.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.max_send_message_length", 64 * 1024 * 1024)],
    )
    method = channel.stream_stream(
        "/dancebooth.v1.Ingest/Stream",
        request_serializer=None,
        response_deserializer=booth_pb2.IngestResponse.FromString,
    )
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    call = method(metadata=metadata)
    try:
        for req in requests:
            data = req if isinstance(req, bytes) else req.SerializeToString()
            try:
                await call.write(data)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                break
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await call.done_writing()
        responses = []
        with contextlib.suppress(grpc.aio.AioRpcError):
            while (resp := await call.read()) is not grpc.aio.EOF:
                responses.append(resp)
        return RawResult(responses, await call.code(), await call.details() or "")
    finally:
        if own:
            await channel.close()


def hello(session_id: str, camera_id: str = "cam0", booth_id: str = BOOTH) -> Any:
    from protos import booth_pb2

    return booth_pb2.IngestRequest(
        hello=booth_pb2.Hello(session_id=session_id, camera_id=camera_id, booth_id=booth_id)
    )


def frame_req(
    seq: int, jpeg: bytes | None = None, session_id: str = "", camera_id: str = ""
) -> Any:
    from protos import booth_pb2

    return booth_pb2.IngestRequest(
        frame=booth_pb2.Frame(
            session_id=session_id,
            camera_id=camera_id,
            seq=seq,
            capture_ts_ns=seq * 1000,
            jpeg=make_jpeg(seq) if jpeg is None else jpeg,
        )
    )


def end_req(frame_count: int) -> Any:
    from protos import booth_pb2

    return booth_pb2.IngestRequest(end=booth_pb2.EndOfTake(frame_count=frame_count))


def acks(result: RawResult) -> list[Any]:
    return [r.ack for r in result.responses if r.WhichOneof("body") == "ack"]


# ---- the link: a proxy that can black-hole ---------------------------------------------------


class LinkProxy:
    """TCP proxy from a loopback port to a server's (serve's gRPC port, the web app), with
    a Wi-Fi-like outage.

    ``cut()`` black-holes the link: bytes stop flowing both ways on live
    connections and new connections are accepted but carry nothing, as when the
    radio drops (TCP does not see a reset; gRPC keepalive has to notice).
    ``restore()`` lets everything flow again; ``reset()`` aborts every live
    connection with an RST. Threads, not asyncio, so the test's own thread stays free.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.5)
        self.port = self._listener.getsockname()[1]
        self._upstream: int | None = None
        self._has_upstream = threading.Event()
        self._open = threading.Event()
        self._open.set()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self.connections = 0
        self.cuts = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._thread = threading.Thread(target=self._accept, name="link-proxy", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_upstream(self, port: int) -> None:
        self._upstream = port
        self._has_upstream.set()

    @property
    def is_cut(self) -> bool:
        return not self._open.is_set()

    def cut(self) -> None:
        self.cuts += 1
        self._open.clear()

    def restore(self) -> None:
        self._open.set()

    def reset(self) -> None:
        with self._lock:
            socks, self._sockets = list(self._sockets), set()
        for s in socks:
            with contextlib.suppress(OSError):
                # Linger 0: the close sends a reset; shutdown first wakes the pipe threads.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self._closing.set()
        self._open.set()
        self.reset()
        self._listener.close()
        self._thread.join(timeout=5)

    def _wait_open(self) -> bool:
        while not self._open.wait(0.5):
            if self._closing.is_set():
                return False
        return not self._closing.is_set()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        with self._lock:
            self._sockets.add(client)
        # A connection made during an outage waits, like a SYN nobody answers yet.
        if not self._has_upstream.wait(60) or not self._wait_open():
            client.close()
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self._upstream), timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._sockets.add(upstream)
        for src, dst, up in ((client, upstream, True), (upstream, client, False)):
            threading.Thread(target=self._pipe, args=(src, dst, up), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not self._wait_open():
                    break
                dst.sendall(data)
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
