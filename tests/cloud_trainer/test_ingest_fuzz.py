"""Hypothesis against the ingest handlers over a real connection: nothing crashes the server.

Every example is one stream of random, truncated or field-scrambled IngestRequests.
The server must answer each with a status a client can act on (never INTERNAL or
UNKNOWN, which would mean an unhandled exception) and keep serving a good agent.
``FUZZ_EXAMPLES`` scales the number of examples (``make fuzz``).
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import grpc
import pytest
import transport_helpers as th
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_trainer.repository import Repository
from cloud_trainer.storage import create_blob_store
from protos import booth_pb2

pytestmark = pytest.mark.fuzz
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
CRASH_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


class ThreadServer:
    """The ingest server on its own event loop in a thread, so sync hypothesis tests can use it."""

    def __init__(self, tmp: Path):
        self.cfg = th.booth_config(tmp)
        self.repo = Repository.from_config(self.cfg.database)
        self.store = create_blob_store(self.cfg.storage)
        self.sessions = [th.new_session(self.repo) for _ in range(3)]
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop: asyncio.Event | None = None
        self.port = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        from cloud_trainer.ingest.server import serve

        srv = serve(self.cfg, repo=self.repo, store=self.store)
        await srv.start()
        self.port = srv.port
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await srv.stop(0)

    def __enter__(self) -> ThreadServer:
        self._thread.start()
        assert self._ready.wait(30)
        return self

    def __exit__(self, *exc) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    with ThreadServer(tmp_path_factory.mktemp("fuzz")) as srv:
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        srv.call = channel.stream_stream(
            "/dancebooth.v1.Ingest/Stream",
            request_serializer=None,
            response_deserializer=None,
        )
        yield srv
        channel.close()


def _send(srv: ThreadServer, messages: list[bytes]) -> grpc.StatusCode:
    metadata = (("authorization", f"Bearer {th.token_for('cam0')}"),)
    try:
        for _ in srv.call(iter(messages), metadata=metadata, timeout=30):
            pass
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _good_take_still_works(srv: ThreadServer) -> None:
    sid = th.new_session(srv.repo)
    msgs = [th.hello(sid), th.frame_req(0), th.end_req(1)]
    assert _send(srv, [m.SerializeToString() for m in msgs]) == grpc.StatusCode.OK


ids = st.sampled_from(["", "cam0", "cam1", "x" * 70, "é/../", "\x00"])
seqs = st.one_of(st.integers(0, 5), st.integers(0, 2**64 - 1))
jpegs = st.one_of(
    st.just(th.make_jpeg(0)),
    st.binary(max_size=64),
    st.binary(max_size=64).map(lambda b: b"\xff\xd8" + b + b"\xff\xd9"),
)


@st.composite
def requests(draw, sessions: list[str]) -> booth_pb2.IngestRequest:
    sid = draw(st.one_of(st.sampled_from(sessions), st.text(max_size=8)))
    kind = draw(st.sampled_from(["hello", "frame", "pose", "end", "empty"]))
    if kind == "hello":
        return booth_pb2.IngestRequest(
            hello=booth_pb2.Hello(
                session_id=sid,
                camera_id=draw(ids),
                booth_id=draw(st.sampled_from([th.BOOTH, "", "other"])),
                width=draw(st.integers(0, 2**32 - 1)),
                fps=draw(st.floats(allow_nan=True)),
            )
        )
    if kind == "frame":
        return booth_pb2.IngestRequest(
            frame=booth_pb2.Frame(
                session_id=draw(st.sampled_from(["", sid])),
                camera_id=draw(ids),
                seq=draw(seqs),
                capture_ts_ns=draw(st.integers(-(2**63), 2**63 - 1)),
                jpeg=draw(jpegs),
            )
        )
    if kind == "pose":
        n = draw(st.sampled_from([0, 1, 23, 24]))
        point = booth_pb2.Keypoint(x=draw(st.floats(width=32)), y=1.0, score=0.5)
        return booth_pb2.IngestRequest(
            pose=booth_pb2.Pose(
                seq=draw(seqs), skeleton=booth_pb2.Skeleton(keypoints=[point] * n), glitch=True
            )
        )
    if kind == "end":
        return booth_pb2.IngestRequest(end=booth_pb2.EndOfTake(frame_count=draw(seqs)))
    return booth_pb2.IngestRequest()


@st.composite
def streams(draw, sessions: list[str]) -> list[bytes]:
    msgs = [m.SerializeToString() for m in draw(st.lists(requests(sessions), max_size=6))]
    if draw(st.booleans()):  # a valid hello first, so the later handlers get exercised
        msgs.insert(0, th.hello(draw(st.sampled_from(sessions))).SerializeToString())
    mangle = draw(st.sampled_from(["none", "truncate", "garbage"]))
    if msgs and mangle == "truncate":
        i = draw(st.integers(0, len(msgs) - 1))
        msgs[i] = msgs[i][: draw(st.integers(0, max(0, len(msgs[i]) - 1)))]
    elif mangle == "garbage":
        msgs.append(draw(st.binary(min_size=1, max_size=80)))
    return msgs


def test_random_and_broken_messages_never_crash_the_server(fuzz_server):
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(streams(fuzz_server.sessions))
    def check(messages: list[bytes]) -> None:
        code = _send(fuzz_server, messages)
        assert code not in CRASH_CODES, f"{code} for {messages!r}"

    check()
    _good_take_still_works(fuzz_server)
