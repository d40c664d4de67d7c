"""The ingest server on loopback: durability, idempotency, completion, and bad input."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import grpc
import pytest
import transport_helpers as th

from cloud_trainer.ingest.shards import decode_shard
from cloud_trainer.repository import Repository
from cloud_trainer.storage import create_blob_store
from edge_agent.errors import BoothError
from edge_agent.stream import Streamer
from protos import booth_pb2, booth_pb2_grpc


class Env:
    def __init__(self, tmp: Path, **cfg_kwargs):
        self.tmp = tmp
        self.cfg = th.booth_config(tmp, **cfg_kwargs)
        self.repo = Repository.from_config(self.cfg.database)
        self.store = create_blob_store(self.cfg.storage)
        self.uploaded: list[str] = []

    def streamer(self, port: int, camera_id: str = "cam0", **kwargs) -> Streamer:
        uplink = th.uplink_config(f"127.0.0.1:{port}", self.tmp / f"spool-{camera_id}", camera_id)
        return Streamer(uplink, booth_id=th.BOOTH, camera_id=camera_id, **kwargs)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


@pytest.fixture
async def server(env: Env):
    async def hook(session_id: str) -> None:
        env.uploaded.append(session_id)

    async with th.running_server(
        env.cfg, repo=env.repo, store=env.store, on_session_uploaded=hook
    ) as srv:
        yield srv


async def test_two_cameras_upload_exactly_once_and_the_session_becomes_uploaded(env, server):
    sid = th.new_session(env.repo, ("cam0", "cam1"))
    sent = {cam: th.frames(30, salt=i) for i, cam in enumerate(("cam0", "cam1"))}
    streamers = [env.streamer(server.port, cam) for cam in sent]
    for st in streamers:
        await st.start()
    try:
        for st in streamers:
            take = st.open_take(sid, width=64, height=48, fps=120)
            take.add_frames(sent[st.camera_id])
            take.add_pose(5, [[1.0, 2.0, 0.5]] * 23, imputed=True)
            take.end()
        await asyncio.gather(*(st.wait_uploaded(sid, timeout_s=30) for st in streamers))
    finally:
        for st in streamers:
            await st.stop()
    for cam, frames in sent.items():
        th.assert_exactly_once(env.repo, env.store, sid, cam, frames)
        (pose,) = env.repo.pose_rows(sid, cam)
        assert pose["seq"] == 5 and pose["imputed"] and not pose["glitch"]
    assert {t["state"] for t in env.repo.list_takes(sid)} == {"uploaded"}
    assert env.repo.get_session(sid)["state"] == "uploaded"
    assert env.uploaded == [sid]  # the hook ran once, for the whole session


async def test_frames_are_chunked_into_shards_not_one_object_per_frame(tmp_path):
    env = Env(tmp_path, shard_mb=0.01)  # ~10 KB shards: several for 40 small frames
    sid = th.new_session(env.repo)
    frames = [th.frame_req(i) for i in range(40)]
    async with th.running_server(env.cfg, repo=env.repo, store=env.store) as srv:
        result = await th.raw_ingest(srv.port, th.token_for("cam0"), [th.hello(sid), *frames])
    assert result.code == grpc.StatusCode.OK, result.details
    keys = list(env.store.list(f"sessions/{sid}/frames/cam0/"))
    assert 1 < len(keys) < 40  # shard_mb is tiny in the tests, but frames still share shards
    seqs = [f.seq for key in keys for f in decode_shard(env.store.get(key))]
    assert sorted(seqs) == list(range(40))


async def test_acks_report_the_highest_contiguous_durable_seq(env, server):
    sid = th.new_session(env.repo)
    result = await th.raw_ingest(
        server.port, th.token_for("cam0"), [th.hello(sid), *(th.frame_req(i) for i in range(10))]
    )
    assert result.responses[0].hello_ack.resume_after_seq == -1
    durable = [a.durable_seq for a in th.acks(result)]
    assert durable == sorted(durable) and durable[-1] == 9
    assert not any(a.take_complete for a in th.acks(result))


async def test_resent_frames_are_skipped_and_hello_says_where_to_resume(env, server):
    sid = th.new_session(env.repo)
    token = th.token_for("cam0")
    await th.raw_ingest(server.port, token, [th.hello(sid), *(th.frame_req(i) for i in range(10))])
    # The agent lost the acks and sends everything again, then the rest of the take.
    again = await th.raw_ingest(
        server.port,
        token,
        [th.hello(sid), *(th.frame_req(i) for i in range(20)), th.end_req(20)],
    )
    assert again.code == grpc.StatusCode.OK, again.details
    assert again.responses[0].hello_ack.resume_after_seq == 9
    assert th.acks(again)[-1].take_complete
    stored = th.stored_frames(env.repo, env.store, sid, "cam0")
    assert sorted(stored) == list(range(20))
    assert all(stored[i] == th.make_jpeg(i) for i in range(20))
    assert server.ingest.resent_frames == 10


def _gcs_forbidden() -> Exception:
    from google.api_core.exceptions import Forbidden

    return Forbidden("caller does not have storage.objects.create access")


@pytest.mark.parametrize(
    ("failure", "detail"),
    [
        (lambda: OSError(5, "Input/output error"), "storage unavailable: Input/output error"),
        (_gcs_forbidden, "did not take shard"),
        (lambda: BoothError("GCS refused access to 'x': quota"), "did not take shard"),
    ],
    ids=["disk", "gcs-api-error", "store-refusal"],
)
async def test_a_storage_failure_is_unavailable_and_the_agent_retries_until_it_lands(
    env, failure, detail
):
    class FlakyStore:
        """The real store, but the first puts fail as a failing disk or bucket would."""

        def __init__(self, inner, failures: int):
            self.inner, self.failures = inner, failures

        def put(self, key, data, content_type=None):
            if self.failures > 0:
                self.failures -= 1
                raise failure()
            self.inner.put(key, data, content_type)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    flaky = FlakyStore(env.store, failures=2)
    sid = th.new_session(env.repo)
    async with th.running_server(env.cfg, repo=env.repo, store=flaky) as srv:
        bad = await th.raw_ingest(
            srv.port,
            th.token_for("cam0"),
            [th.hello(th.new_session(env.repo)), th.frame_req(0), th.end_req(1)],
        )
        assert bad.code == grpc.StatusCode.UNAVAILABLE
        assert detail in bad.details, bad.details
        assert "internal error" not in bad.details
        frames = th.frames(12)
        await _upload(env, srv.port, sid, frames)
    th.assert_exactly_once(env.repo, env.store, sid, "cam0", frames)


async def _upload(env: Env, port: int, sid: str, frames: list) -> None:
    """One agent streams ``frames`` as cam0's whole take until ingest confirms it."""
    st = env.streamer(port)
    await st.start()
    try:
        take = st.open_take(sid)
        take.add_frames(frames)
        take.end()
        await st.wait_uploaded(sid, timeout_s=30)
    finally:
        await st.stop()


async def test_a_shard_written_while_its_session_is_deleted_does_not_outlive_it(env):
    """The attendee deletes mid-upload: the delete's blob passes run before the shard's put
    lands, its rows go before the shard's index does. Nothing would ever remove that shard."""
    sid = th.new_session(env.repo)

    class DeletedMeanwhile:
        def __init__(self, inner):
            self.inner = inner

        def put(self, key, data, content_type=None):
            self.inner.put(key, data, content_type)
            env.repo.delete_session_rows(sid)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    store = DeletedMeanwhile(env.store)
    async with th.running_server(env.cfg, repo=env.repo, store=store) as srv:
        result = await th.raw_ingest(
            srv.port,
            th.token_for("cam0"),
            [th.hello(sid), *(th.frame_req(i) for i in range(5)), th.end_req(5)],
        )
    assert "was deleted by its attendee" in result.details, result.details
    assert list(env.store.list(f"sessions/{sid}/")) == []


async def test_a_shard_a_crash_left_unindexed_is_removed_once_the_take_is_complete(env, server):
    """Killed between a shard's put and its index commit, the server left a shard nothing
    points at; the resent frames went to another one. The finished take keeps only those."""
    sid = th.new_session(env.repo)
    orphan = f"sessions/{sid}/frames/cam0/shard-00000000-deadbeefdeadbeef.bin"
    env.store.put(orphan, b"DBSHARD1 half of a take")
    other_camera = f"sessions/{sid}/frames/cam1/shard-00000000-0123456789abcdef.bin"
    env.store.put(other_camera, b"DBSHARD1 still streaming")
    frames = th.frames(20)
    await _upload(env, server.port, sid, frames)
    th.assert_exactly_once(env.repo, env.store, sid, "cam0", frames)
    stored = set(env.store.list(f"sessions/{sid}/frames/cam0/"))
    assert orphan not in stored
    assert stored == env.repo.shard_keys(sid, "cam0") and stored
    assert env.store.exists(other_camera)  # another camera's take is not this one's business


def _pose_req(seq: int, score: float = 0.9, x: float = 10.0, y: float = 5.0):
    return booth_pb2.IngestRequest(
        pose=booth_pb2.Pose(
            seq=seq,
            skeleton=booth_pb2.Skeleton(
                keypoints=[booth_pb2.Keypoint(x=x + j, y=y, score=score) for j in range(23)]
            ),
        )
    )


async def test_a_take_completes_only_with_the_poses_sent_before_its_end(tmp_path):
    """Poses trail their frames, so the last frames' poses come after the last frame. An end
    of take whose final write failed must not leave the take 'complete at its last frame':
    a resend of the frames alone would then complete it, and the agent would drop the rest
    of its spool, trailing poses included."""

    class FailOnce:
        def __init__(self, inner):
            self.inner, self.failed = inner, False

        def put(self, key, data, content_type=None):
            if not self.failed:
                self.failed = True
                raise OSError(5, "Input/output error")
            self.inner.put(key, data, content_type)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    env = Env(tmp_path, shard_mb=64, flush_interval_s=60)  # one write, at the end
    sid = th.new_session(env.repo)
    poses_at_upload: list[list[int]] = []

    async def hook(session_id: str) -> None:
        poses_at_upload.append([p["seq"] for p in env.repo.pose_rows(session_id, "cam0")])

    token = th.token_for("cam0")
    frames = [th.frame_req(i) for i in range(10)]
    async with th.running_server(
        env.cfg, repo=env.repo, store=FailOnce(env.store), on_session_uploaded=hook
    ) as srv:
        first = await th.raw_ingest(
            srv.port,
            token,
            [th.hello(sid), *frames, *(_pose_req(i) for i in range(10)), th.end_req(10)],
        )
        assert first.code == grpc.StatusCode.UNAVAILABLE, first.details
        # The agent resends; this stream breaks off after the frames and some poses.
        await th.raw_ingest(srv.port, token, [th.hello(sid), *frames, _pose_req(5)])
        assert poses_at_upload == []  # its end never landed: not complete yet
        last = await th.raw_ingest(
            srv.port, token, [th.hello(sid), *(_pose_req(i) for i in range(6, 10)), th.end_req(10)]
        )
        assert last.code == grpc.StatusCode.OK, last.details
        assert th.acks(last)[-1].take_complete
    assert poses_at_upload == [[5, 6, 7, 8, 9]]
    assert env.repo.get_session(sid)["state"] == "uploaded"


# ---- bad input: each gets a status with a clear detail, and the server keeps serving ----------


def _bad_cases(
    sid: str, other_sid: str
) -> dict[str, tuple[list, str | None, grpc.StatusCode, str]]:
    token = th.token_for("cam0")
    big = th.frame_req(0, jpeg=b"\xff\xd8" + b"\0" * (5 * 1024 * 1024) + b"\xff\xd9")
    return {
        "malformed bytes": (
            [b"\x0a\xff\xff\xff\x0f"],
            token,
            grpc.StatusCode.INVALID_ARGUMENT,
            "malformed",
        ),
        "truncated message": (
            [th.hello(sid).SerializeToString()[:-3]],
            token,
            grpc.StatusCode.INVALID_ARGUMENT,
            "malformed",
        ),
        "frame before hello": ([th.frame_req(0)], token, grpc.StatusCode.INVALID_ARGUMENT, "hello"),
        "empty request": (
            [th.hello(sid), booth_pb2.IngestRequest()],
            token,
            grpc.StatusCode.INVALID_ARGUMENT,
            "empty",
        ),
        "oversized message": ([th.hello(sid), big], token, grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
        "unknown session": (
            [th.hello("nosuchsession")],
            token,
            grpc.StatusCode.NOT_FOUND,
            "unknown session",
        ),
        "camera not registered": (
            [th.hello(sid, camera_id="cam9")],
            token,
            grpc.StatusCode.PERMISSION_DENIED,
            "not registered",
        ),
        "camera not in the session": (
            [th.hello(other_sid, camera_id="cam1")],
            th.token_for("cam1"),
            grpc.StatusCode.PERMISSION_DENIED,
            "not part of session",
        ),
        "wrong booth": (
            [th.hello(sid, booth_id="elsewhere")],
            token,
            grpc.StatusCode.PERMISSION_DENIED,
            "booth",
        ),
        "out-of-order seq": (
            [th.hello(sid), th.frame_req(0), th.frame_req(2)],
            token,
            grpc.StatusCode.OUT_OF_RANGE,
            "1 was expected next",
        ),
        "duplicate seq with other bytes": (
            [th.hello(sid), th.frame_req(0), th.frame_req(1), th.frame_req(1, th.make_jpeg(77))],
            token,
            grpc.StatusCode.ALREADY_EXISTS,
            "different content",
        ),
        "non-JPEG payload": (
            [th.hello(sid), th.frame_req(0, b"GIF89a" + b"\0" * 100)],
            token,
            grpc.StatusCode.INVALID_ARGUMENT,
            "not a JPEG",
        ),
        "JPEG without its end": (
            [th.hello(sid), th.frame_req(0, th.make_jpeg(0)[:-200])],
            token,
            grpc.StatusCode.INVALID_ARGUMENT,
            "EOI",
        ),
        "lost frame that carries bytes": (
            [
                th.hello(sid),
                booth_pb2.IngestRequest(
                    frame=booth_pb2.Frame(seq=0, jpeg=th.make_jpeg(0), lost=True)
                ),
            ],
            token,
            grpc.StatusCode.INVALID_ARGUMENT,
            "marked lost but carries",
        ),
        "pose with a wrong skeleton": (
            [
                th.hello(sid),
                booth_pb2.IngestRequest(
                    pose=booth_pb2.Pose(
                        seq=0, skeleton=booth_pb2.Skeleton(keypoints=[booth_pb2.Keypoint()])
                    )
                ),
            ],
            token,
            grpc.StatusCode.INVALID_ARGUMENT,
            "keypoints",
        ),
        "pose with a NaN keypoint": (
            [
                th.hello(sid),
                booth_pb2.IngestRequest(
                    pose=booth_pb2.Pose(
                        seq=0,
                        skeleton=booth_pb2.Skeleton(
                            keypoints=[booth_pb2.Keypoint(x=float("nan"), score=0.9)] * 23
                        ),
                    )
                ),
            ],
            token,
            grpc.StatusCode.INVALID_ARGUMENT,
            "not finite",
        ),
        "pose with a score over 1": (
            [th.hello(sid), _pose_req(0, score=7.0)],
            token,
            grpc.StatusCode.INVALID_ARGUMENT,
            "score outside 0..1",
        ),
        "pose past the end of the take": (
            [th.hello(sid), th.frame_req(0), th.end_req(1), _pose_req(1)],
            token,
            grpc.StatusCode.INVALID_ARGUMENT,
            "pose 1 is past the end of the take",
        ),
        "pose far ahead of the frames": (
            # It would have stored a row, and hidden every real pose after it as a resend.
            [th.hello(sid), th.frame_req(0), _pose_req(2**31 - 1)],
            token,
            grpc.StatusCode.INVALID_ARGUMENT,
            "far ahead of the frames",
        ),
        "hello with a negative frame rate": (
            [
                booth_pb2.IngestRequest(
                    hello=booth_pb2.Hello(
                        session_id=sid, camera_id="cam0", booth_id=th.BOOTH, fps=-30
                    )
                )
            ],
            token,
            grpc.StatusCode.INVALID_ARGUMENT,
            "not a frame rate",
        ),
        "frames past the end": (
            [th.hello(sid), th.frame_req(0), th.end_req(1), th.frame_req(1)],
            token,
            grpc.StatusCode.INVALID_ARGUMENT,
            "past the end",
        ),
        "frame for another session": (
            [th.hello(sid), th.frame_req(0, session_id=other_sid)],
            token,
            grpc.StatusCode.INVALID_ARGUMENT,
            "this stream is",
        ),
        "no token": ([th.hello(sid)], None, grpc.StatusCode.UNAUTHENTICATED, "missing"),
        "wrong token": (
            [th.hello(sid)],
            "not-a-token",
            grpc.StatusCode.UNAUTHENTICATED,
            "unknown token",
        ),
        "expired token": (
            [th.hello(sid)],
            th.token_for("old"),
            grpc.StatusCode.UNAUTHENTICATED,
            "expired",
        ),
    }


async def test_bad_input_gets_a_clear_status_and_the_server_keeps_serving(tmp_path, caplog):
    env = Env(
        tmp_path,
        agents=[
            th.agent_entry("cam0"),
            th.agent_entry("cam1"),
            th.agent_entry("old", expires_at=1.0),
        ],
    )
    async with th.running_server(env.cfg, repo=env.repo, store=env.store) as srv:
        cases = None
        for name in _bad_cases("x", "y"):
            # A fresh session per case, so one case's frames do not change the next one's.
            sid, other = th.new_session(env.repo), th.new_session(env.repo, ("cam0",))
            cases = _bad_cases(sid, other)
            requests, token, code, detail = cases[name]
            result = await th.raw_ingest(srv.port, token, requests)
            assert result.code == code, f"{name}: {result.code} {result.details}"
            assert detail.lower() in result.details.lower(), f"{name}: {result.details!r}"
            # ...and a well-behaved agent is still served.
            good = th.new_session(env.repo)
            ok = await th.raw_ingest(
                srv.port, th.token_for("cam0"), [th.hello(good), th.frame_req(0), th.end_req(1)]
            )
            assert ok.code == grpc.StatusCode.OK and th.acks(ok)[-1].take_complete, name
    assert cases is not None
    assert "refused" in caplog.text  # each refusal is logged


async def test_a_duplicate_seq_with_the_same_bytes_is_harmless(env, server):
    sid = th.new_session(env.repo)
    f1 = th.frame_req(1)
    result = await th.raw_ingest(
        server.port,
        th.token_for("cam0"),
        [th.hello(sid), th.frame_req(0), f1, f1, th.frame_req(2), th.end_req(3)],
    )
    assert result.code == grpc.StatusCode.OK, result.details
    assert th.acks(result)[-1].take_complete
    rows = env.repo.frame_index(sid, "cam0")
    assert [r["seq"] for r in rows] == [0, 1, 2]
    assert rows[1]["sha256"] == hashlib.sha256(th.make_jpeg(1)).hexdigest()


async def test_a_camera_refused_by_an_ended_session_leaves_no_take_behind(env, server):
    sid = th.new_session(env.repo)
    env.repo.transition(sid, "failed", detail="staff gave up")
    result = await th.raw_ingest(server.port, th.token_for("cam0"), [th.hello(sid)])
    assert result.code == grpc.StatusCode.FAILED_PRECONDITION, result.details
    assert "no longer accepts frames" in result.details
    assert env.repo.list_takes(sid) == []


async def test_an_end_counting_frames_that_never_came_leaves_the_take_open(env, server):
    """Frames 0..9 stored, the end says 20: the take is not complete (training would start
    on half a take) until the other ten arrive, on a later stream."""
    sid = th.new_session(env.repo)
    token = th.token_for("cam0")
    short = await th.raw_ingest(
        server.port, token, [th.hello(sid), *(th.frame_req(i) for i in range(10)), th.end_req(20)]
    )
    assert short.code == grpc.StatusCode.OK, short.details
    assert not any(a.take_complete for a in th.acks(short))
    assert env.repo.get_session(sid)["state"] == "capturing"
    assert env.uploaded == []

    rest = await th.raw_ingest(
        server.port, token, [th.hello(sid), *(th.frame_req(i) for i in range(10, 20))]
    )
    assert rest.code == grpc.StatusCode.OK, rest.details
    assert rest.responses[0].hello_ack.resume_after_seq == 9
    assert th.acks(rest)[-1].take_complete  # the end was known: its last frame completes it
    assert env.repo.get_session(sid)["state"] == "uploaded"
    assert env.uploaded == [sid]


async def test_a_resent_frame_with_other_bytes_is_refused_after_a_reconnect_too(
    tmp_path, db_config
):
    """The stored frame's hash decides once the stream that sent it is gone (the index's
    digests, on either database), not only the bytes still in memory."""
    env = Env(tmp_path)
    env.cfg = env.cfg.model_copy(update={"database": db_config})
    env.repo = Repository.from_config(db_config)
    sid = th.new_session(env.repo)
    token = th.token_for("cam0")
    async with th.running_server(env.cfg, repo=env.repo, store=env.store) as srv:
        first = await th.raw_ingest(
            srv.port, token, [th.hello(sid), *(th.frame_req(i) for i in range(10))]
        )
        assert th.acks(first)[-1].durable_seq == 9
        same = await th.raw_ingest(srv.port, token, [th.hello(sid), th.frame_req(3)])
        assert same.code == grpc.StatusCode.OK, same.details
        other = await th.raw_ingest(
            srv.port, token, [th.hello(sid), th.frame_req(3, jpeg=th.make_jpeg(3, salt=1))]
        )
    assert other.code == grpc.StatusCode.ALREADY_EXISTS
    assert "frame 3" in other.details and "different content" in other.details
    assert th.stored_frames(env.repo, env.store, sid, "cam0")[3] == th.make_jpeg(3)
    env.repo.close()


async def test_no_ack_covers_a_frame_before_its_shard_and_index_are_stored(tmp_path):
    """Each ack is checked as it arrives: every frame it covers is in the index and reads
    back from its shard (the agent deletes its copy on that ack)."""
    env = Env(tmp_path, shard_mb=0.005, flush_interval_s=0.01)  # a shard every few frames
    sid = th.new_session(env.repo)
    async with th.running_server(env.cfg, repo=env.repo, store=env.store) as srv:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}")
        call = booth_pb2_grpc.IngestStub(channel).Stream(
            metadata=(("authorization", f"Bearer {th.token_for('cam0')}"),)
        )
        checked = []

        async def check_acks() -> None:
            while (resp := await call.read()) is not grpc.aio.EOF:
                if resp.WhichOneof("body") != "ack" or resp.ack.durable_seq < 0:
                    continue
                stored = await asyncio.to_thread(th.stored_frames, env.repo, env.store, sid, "cam0")
                assert set(range(resp.ack.durable_seq + 1)) <= set(stored), resp.ack
                checked.append(resp.ack.durable_seq)
                if resp.ack.take_complete:
                    return

        await call.write(th.hello(sid))
        reader = asyncio.create_task(check_acks())
        for i in range(60):
            await call.write(th.frame_req(i))
        await call.write(th.end_req(60))
        async with asyncio.timeout(60):
            await reader
        await call.done_writing()
        await channel.close()
    assert checked and checked[-1] == 59 and len(checked) > 3


async def test_a_take_the_session_went_on_without_is_dropped_by_its_board(env, server):
    """Staff went on without cam1 (its board was away): when the board comes back, it is
    told its take is not wanted, instead of offering it at the slowest backoff forever."""
    sid = th.new_session(env.repo, ("cam0", "cam1"))
    env.repo.update_session(sid, cameras=["cam0"])  # what going on without cam1 leaves
    late = env.streamer(server.port, "cam1")
    await late.start()
    try:
        take = late.open_take(sid, width=64, height=48, fps=120)
        take.add_frames(th.frames(10))
        take.end()
        await late.wait_idle(timeout_s=30)
        assert late.takes_dropped == 1 and late.status()["takes"] == []
    finally:
        await late.stop()
    assert env.repo.frame_index(sid, "cam1") == []


async def test_a_take_completes_only_once_its_last_frame_is_durable(tmp_path: Path):
    """Completion follows the durable position, not what was received: a frame in a shard
    still being written must not let the take (and its training) start without it."""
    import threading

    cfg = th.booth_config(tmp_path, shard_mb=64, flush_interval_s=0.05)
    repo = Repository.from_config(cfg.database)
    inner = create_blob_store(cfg.storage)
    gate, waiting = threading.Event(), threading.Event()

    class Gated:  # the second shard's put waits for the test
        puts = 0

        def put(self, key, data, content_type=None):
            Gated.puts += 1
            if Gated.puts == 2:
                waiting.set()
                gate.wait(10)
            inner.put(key, data, content_type)

        def __getattr__(self, name):
            return getattr(inner, name)

    sid = th.new_session(repo)
    indexed_at_upload: list[int] = []

    def uploaded(session_id):
        indexed_at_upload.append(len(repo.frame_index(session_id, "cam0")))

    token = th.token_for("cam0")
    async with th.running_server(
        cfg, repo=repo, store=Gated(), on_session_uploaded=uploaded
    ) as srv:
        first = await th.raw_ingest(
            srv.port, token, [th.hello(sid), *(th.frame_req(i) for i in range(10)), th.end_req(20)]
        )
        assert first.code == grpc.StatusCode.OK, first.details
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}")
        call = booth_pb2_grpc.IngestStub(channel).Stream(
            metadata=(("authorization", f"Bearer {token}"),)
        )
        await call.write(th.hello(sid))
        for i in range(10, 19):
            await call.write(th.frame_req(i))
        async with asyncio.timeout(10):
            await asyncio.to_thread(waiting.wait)  # frames 10-18 are being written
        await call.write(th.frame_req(19))  # received while that shard is not yet durable
        await asyncio.sleep(0.3)  # (lets the server read it; passes whenever it does)
        gate.set()
        await call.done_writing()
        acks = []
        async with asyncio.timeout(30):
            while (resp := await call.read()) is not grpc.aio.EOF:
                if resp.WhichOneof("body") == "ack":
                    acks.append(resp.ack)
        await channel.close()
    assert any(a.take_complete for a in acks)
    assert all(a.durable_seq == 19 for a in acks if a.take_complete), acks
    assert indexed_at_upload == [20]
