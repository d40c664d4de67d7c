"""The agent's spool and uplink: crash safety, the disk budget, cut links and restarts."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import transport_helpers as th
from capture_fakes import crashed_recording, make_jpegs, slow_pose_factory, square_centre

from cloud_trainer.repository import Repository
from cloud_trainer.storage import create_blob_store
from edge_agent.frames import CapturedFrame
from edge_agent.stream import (
    KIND_FRAME,
    KIND_POSE,
    RecordingArchive,
    Spool,
    Streamer,
    _scan,
    _SendCursor,
    backoff_s,
)

HELPERS = Path(th.__file__)


# ---- the spool on its own --------------------------------------------------------------------


def test_a_torn_last_record_is_cut_off_and_an_unended_take_is_sealed(tmp_path: Path):
    spool = Spool(tmp_path, budget_bytes=10 << 20, booth_id=th.BOOTH)
    take = spool.open_take("s1", "cam0", width=64, height=48, fps=120)
    take.add_frames(th.frames(10))
    take.add_pose(3, [[1.0, 2.0, 0.9]] * 23)
    segment = take.segments[-1].path
    spool.close()
    with open(segment, "ab") as f:  # the agent died in the middle of writing frame 10
        f.write(b"\x01\x00\x00\x00\x00\x0a" + b"\0" * 30)

    again = Spool(tmp_path, budget_bytes=10 << 20, booth_id=th.BOOTH)
    (recovered,) = again.takes.values()
    assert recovered.next_seq == 10 and recovered.last_pose == 3
    assert recovered.meta.frame_count == 10  # sealed with what it has
    assert (recovered.meta.width, recovered.meta.height) == (64, 48)
    assert segment.stat().st_size == recovered.segments[-1].size
    assert again.used_bytes == recovered.bytes


def test_the_budget_stops_spooling_says_so_and_counts_what_was_not_spooled(tmp_path: Path):
    frames = th.frames(40)
    per_frame = max(len(f.jpeg) for f in frames) + 32
    spool = Spool(tmp_path, budget_bytes=per_frame * 10, booth_id=th.BOOTH)
    take = spool.open_take("s1", "cam0")
    spooled = take.add_frames(frames)
    assert 5 <= spooled < 40
    status = take.status()
    assert status["behind_from_seq"] == spooled
    assert status["not_spooled"] == 40 - spooled  # nothing discarded silently
    take.end(40)
    assert take.status()["missing"] == 40 - spooled


def test_a_gap_in_the_capture_stream_puts_the_take_behind(tmp_path: Path):
    spool = Spool(tmp_path, budget_bytes=10 << 20, booth_id=th.BOOTH)
    take = spool.open_take("s1", "cam0")
    frames = th.frames(10)
    take.add_frames(frames[:5] + frames[6:])  # the stream buffer dropped frame 5
    assert take.meta.behind_from_seq == 5
    assert take.status()["not_spooled"] == 4


def test_a_take_killed_while_behind_is_sealed_at_every_frame_the_capture_offered(
    tmp_path: Path,
):
    frames = th.frames(40)
    per_frame = max(len(f.jpeg) for f in frames) + 32
    spool = Spool(tmp_path, budget_bytes=per_frame * 10, booth_id=th.BOOTH)
    take = spool.open_take("s1", "cam0")
    spooled = take.add_frames(frames[:30] + frames[33:])  # the stream buffer dropped 30..32
    assert spooled < 30
    spool.close()  # the agent is killed: the take never ends

    again = Spool(tmp_path, budget_bytes=per_frame * 10, booth_id=th.BOOTH)
    (recovered,) = again.takes.values()
    assert recovered.meta.frame_count == 40 and recovered.meta.behind_from_seq == spooled
    assert recovered.status()["missing"] == 40 - spooled


class NoRecording:
    """An archive that must not be asked: after a crash the recording may have no index."""

    def frames_from(self, session_id: str, camera_id: str, seq: int):
        raise AssertionError(f"the recording was read from frame {seq}")


def test_a_take_sealed_with_nothing_missing_does_not_read_the_recording(tmp_path: Path):
    frames = th.frames(40)
    per_frame = max(len(f.jpeg) for f in frames) + 32
    spool = Spool(tmp_path, budget_bytes=per_frame * 10, booth_id=th.BOOTH)
    take = spool.open_take("s1", "cam0")
    spooled = take.add_frames(frames)
    take.end(spooled)  # sealed at what was spooled (the count of the rest was lost)
    assert take.behind
    assert take.backfill(NoRecording()) == 0
    assert not take.behind and take.status()["missing"] == 0


def test_a_segment_that_cannot_be_opened_leaves_no_stale_descriptor_behind(
    tmp_path: Path, monkeypatch
):
    spool = Spool(tmp_path / "spool", budget_bytes=10 << 20, booth_id=th.BOOTH)
    spool.segment_bytes = 4096
    take = spool.open_take("s1", "cam0")
    frames = th.frames(40)
    seq = 0
    while not take.segments or take.segments[-1].size < spool.segment_bytes:
        assert take.add_frame(frames[seq])
        seq += 1
    real_open = os.open

    def disk_full(path, flags, mode=0o777, **kwargs):
        if str(path).endswith(".log"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", disk_full)
    take.add_pose(0, [[1.0, 2.0, 0.5]] * 23)  # needs the next segment, which cannot be opened
    assert take.poses_behind and take._fd is None  # the old segment is closed, and forgotten
    monkeypatch.setattr(os, "open", real_open)
    # Another part of the agent opens a file: it may get the number the segment had.
    other = tmp_path / "other.mp4"
    other_fd = os.open(other, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert take.add_frame(frames[seq])  # the disk has room again: a new segment
        os.write(other_fd, b"mp4")
    finally:
        os.close(other_fd)
    assert other.read_bytes() == b"mp4"  # nobody else's file was written to, or closed
    spool.close()
    again = Spool(tmp_path / "spool", budget_bytes=10 << 20, booth_id=th.BOOTH)
    (recovered,) = again.takes.values()
    assert [r.payload for r in _records(recovered)] == [f.jpeg for f in frames[: seq + 1]]


def _records(take) -> list:
    return [r for path, _n, _s, size in take.snapshot() for r in _scan(path, size)]


def _read_all(cursor: _SendCursor) -> list[tuple[int, int, bytes]]:
    out = []
    while batch := cursor.read(max_bytes=3 * 4096):
        out += [(r.kind, r.seq, r.payload) for r in batch]
    return out


def _spooled(take) -> list[tuple[int, int, bytes]]:
    # What the segment files hold, read the way recovery does.
    return [
        (r.kind, r.seq, r.payload)
        for path, _n, _s, size in take.snapshot()
        for r in _scan(path, size)
    ]


def test_the_uplink_sends_what_it_keeps_up_with_from_memory_not_the_files(tmp_path: Path):
    spool = Spool(tmp_path, budget_bytes=10 << 20, booth_id=th.BOOTH)
    spool.segment_bytes = 8_000  # several segments
    take = spool.open_take("s1", "cam0")
    cursor = _SendCursor(take, -1, -1)
    sent = []
    for frames in (th.frames(10), th.frames(25, start=10)):
        take.add_frames(frames)
        take.add_pose(frames[-1].seq, [[1.0, 2.0, 0.5]] * 23)
        sent += _read_all(cursor)
    assert sent == _spooled(take)  # the same records, bytes and order as on disk
    assert len(take.segments) > 2 and cursor.files_opened == 0  # no segment was read back
    # Acked records leave memory with their segments; what is left is still sendable.
    take.ack(19, -1)
    assert spool._tail_used == sum(end - start for start, end, _ in take._tail) > 0
    assert min(r.seq for _, _, r in take._tail if r.kind == KIND_FRAME) <= 20
    take.finish()  # the server confirmed the whole take: nothing is held, on disk or in memory
    assert spool.used_bytes == 0 and spool._tail_used == 0 and not take._tail


def _deleted_files_held_open(directory: Path) -> list[str]:
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(directory)) and target.endswith("(deleted)"):
                held.append(target)
    return held


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_a_reconnected_uplink_holds_no_acked_segment_open_once_it_read_past_it(tmp_path: Path):
    spool = Spool(tmp_path, budget_bytes=10 << 20, booth_id=th.BOOTH)
    spool.segment_bytes = 8_000
    take = spool.open_take("s1", "cam0")
    take.add_frames(th.frames(20))
    take.ack(2, -1)  # the server holds 0..2: they leave memory, their segment stays
    cursor = _SendCursor(take, 2, -1)  # a new stream resumes from the segment files
    assert [r.seq for r in cursor.read()] == list(range(3, 20))
    assert cursor.files_opened == 1  # what memory no longer had came from the file
    take.ack(19, -1)  # all acked: every segment is deleted...
    assert not take.segments
    # ...and its blocks are free: on a full disk, the backfill needs them.
    assert _deleted_files_held_open(tmp_path) == []
    cursor.close()


@pytest.mark.parametrize("tail_bytes", [0, 5_000, 60_000])
def test_records_dropped_from_memory_are_read_from_the_files_in_order(
    tmp_path: Path, tail_bytes: int
):
    spool = Spool(tmp_path, budget_bytes=10 << 20, booth_id=th.BOOTH)
    spool.segment_bytes, spool.tail_bytes = 20_000, tail_bytes
    take = spool.open_take("s1", "cam0")
    cursor = _SendCursor(take, -1, -1)
    sent = []
    rng = random.Random(tail_bytes)
    seq = 0
    while seq < 60:  # appends and reads interleaved, the uplink sometimes far behind
        n = rng.randint(1, 12)
        take.add_frames(th.frames(min(60, seq + n), start=seq))
        take.add_pose(seq, [[0.0, 0.0, 0.0]] * 23)
        seq = min(60, seq + n)
        if rng.random() < 0.5:
            sent += _read_all(cursor)
    sent += _read_all(cursor)
    assert sent == _spooled(take)
    assert spool._tail_used <= max(tail_bytes, max(len(p) for _, _, p in sent) + 64)
    # A reconnect starts a new cursor after what the server holds: nothing acked is resent.
    take.ack(29, 10)
    again = _read_all(_SendCursor(take, 29, 10))
    assert again == [r for r in _spooled(take) if r[1] > (29 if r[0] == KIND_FRAME else 10)]


def test_backoff_is_exponential_with_full_jitter():
    rng = random.Random(1)
    samples = [backoff_s(a, 0.1, 5.0, rng) for a in range(12) for _ in range(50)]
    assert all(0.0 <= s <= 5.0 for s in samples)
    early = [backoff_s(0, 0.1, 5.0, rng) for _ in range(200)]
    late = [backoff_s(10, 0.1, 5.0, rng) for _ in range(200)]
    assert max(early) <= 0.1 and max(late) > 1.0
    assert min(late) < 1.0  # full jitter: anywhere from zero


def _on_disk(take) -> set[tuple[int, int]]:
    return {(r.kind, r.seq) for p, _n, _s, size in take.snapshot() for r in _scan(p, size)}


@pytest.mark.parametrize("pose_lag", [0, 2, None], ids=["poses-acked-too", "poses-lag", "no-poses"])
def test_an_ack_deletes_only_segments_whose_every_record_is_acked(tmp_path: Path, pose_lag):
    spool = Spool(tmp_path, budget_bytes=10 << 20, booth_id=th.BOOTH)
    spool.segment_bytes = 6_000  # a segment every few frames
    take = spool.open_take("s1", "cam0")
    for f in th.frames(40):
        take.add_frame(f)
        if pose_lag is not None:
            take.add_pose(f.seq, [[1.0, 2.0, 0.5]] * 23)
    assert len(take.segments) > 5
    for k in range(-1, 40):
        p = -1 if pose_lag is None else (k // pose_lag if pose_lag else k)
        take.ack(k, p)
        kept = _on_disk(take)
        assert {(KIND_FRAME, s) for s in range(k + 1, 40)} <= kept, k
        if pose_lag is not None:
            assert {(KIND_POSE, s) for s in range(p + 1, 40)} <= kept, k


def test_spooled_records_are_fsynced_in_batches_and_at_the_end(
    tmp_path: Path, monkeypatch, fsynced
):
    import edge_agent.stream as stream_mod

    synced = fsynced
    spool = Spool(tmp_path, budget_bytes=10 << 20, booth_id=th.BOOTH)
    take = spool.open_take("s1", "cam0")
    monkeypatch.setattr(stream_mod, "FSYNC_INTERVAL_S", 0.0)
    take.add_frames(th.frames(3))
    assert any(p.endswith(".log") for p in synced), synced  # the batch was due: synced
    synced.clear()
    monkeypatch.setattr(stream_mod, "FSYNC_INTERVAL_S", 1e9)
    take.add_frames(th.frames(6, start=3))
    assert not any(p.endswith(".log") for p in synced)  # not due yet
    take.end()
    assert any(p.endswith(".log") for p in synced), synced  # the end syncs what is dirty


async def test_a_stream_that_keeps_breaking_backs_off_further_each_time(
    tmp_path: Path, monkeypatch
):
    import edge_agent.stream as stream_mod

    attempts: list[int] = []
    real = stream_mod.backoff_s

    def spy(attempt, initial_s, max_s, rng):
        attempts.append(attempt)
        return real(attempt, initial_s, max_s, rng)

    monkeypatch.setattr(stream_mod, "backoff_s", spy)
    uplink = th.uplink_config(f"127.0.0.1:{th.dead_port()}", tmp_path / "spool")
    uplink = uplink.model_copy(update={"backoff_initial_s": 0.001, "backoff_max_s": 0.01})
    st = Streamer(uplink, booth_id=th.BOOTH, camera_id="cam0", seed=1)
    await st.start()
    try:
        take = st.open_take("s1")
        take.add_frames(th.frames(2))
        await _until(lambda: len(attempts) >= 5)
    finally:
        await st.stop()
    assert attempts[:5] == [0, 1, 2, 3, 4]


# ---- against a real server -------------------------------------------------------------------


class Env:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.cfg = th.booth_config(tmp)
        self.repo = Repository.from_config(self.cfg.database)
        self.store = create_blob_store(self.cfg.storage)

    def streamer(self, address: str, **kwargs) -> Streamer:
        uplink = th.uplink_config(address, self.tmp / "spool")
        return Streamer(uplink, booth_id=th.BOOTH, camera_id="cam0", **kwargs)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


async def _until(predicate, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def _upload_all(st: Streamer, sid: str) -> None:
    """Run the uplink until the session's take is uploaded, then stop it."""
    await st.start()
    try:
        await st.wait_uploaded(sid, timeout_s=60)
    finally:
        await st.stop()


async def test_a_cut_connection_mid_take_reconnects_and_the_take_completes(env):
    sid = th.new_session(env.repo)
    sent = th.frames(120)
    async with th.running_server(env.cfg, repo=env.repo, store=env.store) as srv:
        proxy = th.CutProxy(srv.port)
        await proxy.start()
        st = env.streamer(f"127.0.0.1:{proxy.port}")
        await st.start()
        try:
            take = st.open_take(sid)
            take.add_frames(sent[:50])
            await _until(lambda: st.frames_acked >= 20)
            proxy.cut()
            take.add_frames(sent[50:])
            await _until(lambda: proxy.bytes_up > 0 and st.reconnects >= 1)
            proxy.cut()  # again, while the rest is on its way
            take.end()
            await st.wait_uploaded(sid, timeout_s=60)
        finally:
            await st.stop()
            await proxy.stop()
    assert proxy.cuts >= 2 and proxy.connections >= 2
    th.assert_exactly_once(env.repo, env.store, sid, "cam0", sent)


async def test_an_agent_killed_mid_take_resumes_from_its_spool_after_restart(env):
    sid = th.new_session(env.repo)
    sent = th.frames(90)
    async with th.running_server(env.cfg, repo=env.repo, store=env.store) as srv:
        address = f"127.0.0.1:{srv.port}"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HELPERS),
            "agent",
            address,
            str(env.tmp / "spool"),
            sid,
            "--upload",
            "40",
            "--total",
            "90",
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(60):
                assert (await proc.stdout.readline()).startswith(b"acked")
                assert await proc.stdout.readline() == b"spooled\n"
        finally:
            proc.kill()  # SIGKILL: no clean-up of any kind
            await proc.wait()
        stored_before = len(env.repo.frame_index(sid, "cam0"))
        assert 40 <= stored_before < 90

        st = env.streamer(address)  # the restarted agent: same spool directory
        await _upload_all(st, sid)
    th.assert_exactly_once(env.repo, env.store, sid, "cam0", sent)
    assert not list((env.tmp / "spool").glob("*__*"))  # the spool is empty again


class ListArchive:
    """Stands in for the take's MP4 segments (edge_agent.capture.segments.read_segment_frames)."""

    def __init__(self, frames: list[CapturedFrame]):
        self.frames = frames
        self.reads = 0

    def frames_from(self, session_id: str, camera_id: str, seq: int):
        self.reads += 1
        return iter([f for f in self.frames if f.seq >= seq])


async def test_frames_over_the_budget_are_read_back_from_the_recording(env):
    sid = th.new_session(env.repo)
    sent = th.frames(60)
    archive = ListArchive(sent)
    async with th.running_server(env.cfg, repo=env.repo, store=env.store) as srv:
        st = env.streamer(f"127.0.0.1:{srv.port}", archive=archive)
        st.spool.budget_bytes = 12 * (max(len(f.jpeg) for f in sent) + 32)
        take = st.open_take(sid)
        spooled = take.add_frames(sent)  # before the uplink runs: the budget fills up
        assert spooled < 60
        status = st.status()
        assert status["upload_behind"] and status["stream_dropped"] == 60 - spooled
        take.end()
        await _upload_all(st, sid)
    assert archive.reads >= 1
    th.assert_exactly_once(env.repo, env.store, sid, "cam0", sent)


# Not recorded either (frames.csv segment -1: a full disk, a dropped segment).
GAP, END = {15, 16, 17}, {25, 26, 27, 28, 29}


@pytest.mark.parametrize("unrecorded", [GAP, END, GAP | END], ids=["gap", "end", "both"])
async def test_frames_the_recording_lacks_too_are_uploaded_as_lost_and_the_take_completes(
    env, caplog, unrecorded
):
    sid = th.new_session(env.repo)
    sent = th.frames(30)
    archive = ListArchive([f for f in sent if f.seq not in unrecorded])
    async with th.running_server(env.cfg, repo=env.repo, store=env.store) as srv:
        st = env.streamer(f"127.0.0.1:{srv.port}", archive=archive)
        st.spool.budget_bytes = 12 * (max(len(f.jpeg) for f in sent) + 32)
        take = st.open_take(sid)
        assert take.add_frames(sent) < 15  # the rest only in the recording
        take.end()
        await _upload_all(st, sid)
    assert env.repo.get_session(sid)["state"] == "uploaded"
    stored = th.stored_frames(env.repo, env.store, sid, "cam0")
    assert sorted(stored) == list(range(30))
    assert all(stored[f.seq] == (b"" if f.seq in unrecorded else f.jpeg) for f in sent)
    status = st.status()
    n = len(unrecorded)
    assert status["frames_lost"] == n and take.status()["lost_frames"] == n
    assert f"{n} frames are in neither the spool nor the local recording" in status["lost_why"]
    for run in (r for r in (GAP, END) if r <= unrecorded):
        said = f"frames {min(run)}..{max(run)} are in neither the spool nor the recording"
        assert said in caplog.text


async def test_a_take_killed_while_behind_gets_its_frames_from_the_recording_it_left(env, caplog):
    sid = th.new_session(env.repo)
    sent = th.frames(30)
    # The capture recorded all 30 frames in 0.1 s segments when the agent died: two
    # finished (0..25), the third a .part with no complete fragment yet (26..29).
    crashed_recording(_take_dir(env, sid), sent, segment_s=0.1)
    killed = env.streamer(f"127.0.0.1:{th.dead_port()}")
    killed.spool.budget_bytes = 12 * (max(len(f.jpeg) for f in sent) + 32)
    spooled = killed.open_take(sid).add_frames(sent)
    assert spooled < 26
    killed.spool.close()  # the agent is killed mid-take, before it uploaded anything
    async with th.running_server(env.cfg, repo=env.repo, store=env.store) as srv:
        archive = RecordingArchive(env.tmp / "takes")
        st = env.streamer(f"127.0.0.1:{srv.port}", archive=archive)  # the restarted agent
        await _upload_all(st, sid)
    assert env.repo.get_session(sid)["state"] == "uploaded"
    stored = th.stored_frames(env.repo, env.store, sid, "cam0")
    assert sorted(stored) == list(range(30))  # every frame captured, none forgotten
    assert all(stored[f.seq] == (f.jpeg if f.seq < 26 else b"") for f in sent)
    assert st.status()["frames_lost"] == 4
    assert "has no frames.csv (its capture never finished); reading frames" in caplog.text
    assert "frames 26..29 are in neither the spool nor the recording" in caplog.text


async def test_frames_recorded_but_not_yet_spooled_when_the_agent_died_are_uploaded(env, caplog):
    sid = th.new_session(env.repo)
    sent = th.frames(40)
    # Recorded up to 39 (38 readable: 39 is in the .part's unfinished fragment), but
    # only 0..19 had left the stream buffer for the spool.
    crashed_recording(_take_dir(env, sid), sent, segment_s=0.1)
    killed = env.streamer(f"127.0.0.1:{th.dead_port()}")
    assert killed.open_take(sid).add_frames(sent[:20]) == 20
    killed.spool.close()
    async with th.running_server(env.cfg, repo=env.repo, store=env.store) as srv:
        st = env.streamer(f"127.0.0.1:{srv.port}", archive=RecordingArchive(env.tmp / "takes"))
        await _upload_all(st, sid)
    stored = th.stored_frames(env.repo, env.store, sid, "cam0")
    assert sorted(stored) == list(range(39))
    assert all(stored[f.seq] == f.jpeg for f in sent[:39])
    assert st.status()["frames_lost"] == 0
    assert "its recording holds frames up to 38; sealed at 39 frames now, was 20" in caplog.text


async def test_a_take_whose_agent_died_before_posing_it_gets_poses_from_its_recording(env, caplog):
    sid = th.new_session(env.repo)
    jpegs = make_jpegs(40)  # frame k shows a square at square_centre(k)
    sent = [CapturedFrame(k, 10**9 + k * 8_333_333, jpegs[k]) for k in range(40)]
    crashed_recording(_take_dir(env, sid), sent, segment_s=0.1)  # 0..38 readable
    killed = env.streamer(f"127.0.0.1:{th.dead_port()}")
    killed.open_take(sid).add_frames(sent[:20])
    killed.spool.close()  # died mid-take: no poses were spooled, no poses.npz written
    archive = RecordingArchive(env.tmp / "takes", pose_factory=slow_pose_factory(0.0))
    async with th.running_server(env.cfg, repo=env.repo, store=env.store) as srv:
        await _upload_all(env.streamer(f"127.0.0.1:{srv.port}", archive=archive), sid)
    rows = env.repo.pose_rows(sid, "cam0")
    assert [r["seq"] for r in rows] == list(range(39))
    errors = [
        np.hypot(
            *(np.frombuffer(r["keypoints"], "<f4").reshape(-1, 3)[0, :2] - square_centre(r["seq"]))
        )
        for r in rows
    ]
    assert np.median(errors) < 1.0  # each pose is its own frame's (smoothed)
    assert "posed 39 recorded frames of a take its agent did not finish" in caplog.text


async def test_a_recovered_take_reads_back_only_what_the_server_does_not_hold(env):
    sid = th.new_session(env.repo)
    sent = th.frames(60)
    crashed_recording(_take_dir(env, sid), sent, segment_s=0.1)
    async with th.running_server(env.cfg, repo=env.repo, store=env.store) as srv:
        address = f"127.0.0.1:{srv.port}"
        first = env.streamer(address)
        await first.start()
        try:
            first.open_take(sid).add_frames(sent[:30])
            await _until(lambda: first.frames_acked == 30)
            # Acked segments are deleted: the spool keeps nothing of the take's frames.
            await _until(lambda: not list((env.tmp / "spool").glob("*/seg-*.log")))
        finally:
            await first.stop()  # then the agent dies: the take never ends

        class Reads(RecordingArchive):
            starts: list[int] = []

            def frames_from(self, session_id, camera_id, seq):
                self.starts.append(seq)
                return super().frames_from(session_id, camera_id, seq)

        archive = Reads(env.tmp / "takes")
        st = env.streamer(address, archive=archive)
        await _upload_all(st, sid)
    # Recorded: 0..51 readable (52..59 are in the .part's unfinished fragment).
    th.assert_exactly_once(env.repo, env.store, sid, "cam0", sent[:52])
    assert archive.starts and min(archive.starts) >= 30  # not from what the server had


def test_a_recording_without_its_index_or_a_segment_gives_back_no_frames(tmp_path: Path, caplog):
    archive = RecordingArchive(tmp_path)
    directory = tmp_path / "s1" / "cam0"
    directory.mkdir(parents=True)
    (directory / "seg_00000.mp4.part").write_bytes(b"\0" * 64)  # killed mid-take
    assert list(archive.frames_from("s1", "cam0", 0)) == []  # and no index to read it by
    assert "has no frames.csv (its capture never finished)" in caplog.text
    # Finished, but its segment is gone: no frame of it is coming back.
    rows = "".join(f"{i},{i * 1000},0,100,0\n" for i in range(5))
    (directory / "frames.csv").write_text("seq,capture_ts_ns,segment,bytes,corrupt\n" + rows)
    assert list(archive.frames_from("s1", "cam0", 2)) == []
    assert "seg_00000.mp4 is missing; its 5 frames cannot be read back" in caplog.text


async def test_without_a_recording_to_read_from_the_take_waits_and_says_why(env):
    sid = th.new_session(env.repo)
    sent = th.frames(30)
    async with th.running_server(env.cfg, repo=env.repo, store=env.store) as srv:
        st = env.streamer(f"127.0.0.1:{srv.port}")
        st.spool.budget_bytes = 8 * (max(len(f.jpeg) for f in sent) + 32)
        take = st.open_take(sid)
        spooled = take.add_frames(sent)
        take.end()
        await st.start()
        try:
            await _until(lambda: "not uploaded" in st.status()["error"])
            await _until(lambda: st.frames_acked == spooled)
            # Each new ack clears the take's error until the next send pass says it again.
            await _until(lambda: "not uploaded" in st.status()["error"])
        finally:
            await st.stop()
    assert f"{30 - spooled} frames" in st.status()["error"]
    assert env.repo.list_takes(sid)[0]["state"] == "capturing"  # never marked uploaded
    assert len(env.repo.frame_index(sid, "cam0")) == spooled


async def test_a_frame_too_big_to_send_stops_the_take_with_a_reason(env):
    sid = th.new_session(env.repo)
    frames = th.frames(3)
    huge = CapturedFrame(3, 0, b"\xff\xd8" + b"\0" * (5 * 2**20) + b"\xff\xd9")  # > 4 MiB
    async with th.running_server(env.cfg, repo=env.repo, store=env.store) as srv:
        st = env.streamer(f"127.0.0.1:{srv.port}")
        take = st.open_take(sid)
        take.add_frames([*frames, huge])
        take.end()
        await st.start()
        try:
            await _until(lambda: "max_message_mb" in st.status()["error"])
            await _until(lambda: st.frames_acked == 3)  # what fits is uploaded meanwhile
            assert "frame 3 is 5.0 MiB" in st.status()["error"]
        finally:
            await st.stop()


# ---- what the board keeps ---------------------------------------------------------------


def _take_dir(env: Env, sid: str) -> Path:
    return env.tmp / "takes" / sid / "cam0"


def _recording(env: Env, sid: str) -> Path:
    """Stands in for the capture's output directory of this take (retention removes it)."""
    d = env.tmp / "takes" / sid / "cam0"
    d.mkdir(parents=True)
    (d / "seg_00000.mp4").write_bytes(b"\0" * 128)
    return d


def _spool_whole_take(st: Streamer, sid: str, frames: int) -> None:
    take = st.open_take(sid)
    take.add_frames(th.frames(frames))
    take.end()


@pytest.mark.parametrize("keep", [False, True], ids=["default", "keep_uploaded_takes"])
async def test_an_uploaded_take_leaves_no_recording_on_the_board_unless_asked(env, keep):
    sid = th.new_session(env.repo)
    recording = _recording(env, sid)
    archive = RecordingArchive(env.tmp / "takes", keep_uploaded=keep)
    async with th.running_server(env.cfg, repo=env.repo, store=env.store) as srv:
        st = env.streamer(f"127.0.0.1:{srv.port}", archive=archive)
        _spool_whole_take(st, sid, 20)
        await st.start()
        try:
            await st.wait_uploaded(sid, timeout_s=60)
            await _until(lambda: recording.exists() == keep)
        finally:
            await st.stop()
    assert recording.exists() == keep and st.takes_dropped == 0
    assert env.repo.get_session(sid)["state"] == "uploaded"


async def test_a_take_whose_session_was_deleted_while_the_board_was_offline_is_dropped(env):
    sid = th.new_session(env.repo)
    recording = _recording(env, sid)
    archive = RecordingArchive(env.tmp / "takes", keep_uploaded=True)  # deletion overrides it
    async with th.running_server(env.cfg, repo=env.repo, store=env.store) as srv:
        proxy = th.CutProxy(th.dead_port())  # the board is offline
        await proxy.start()
        st = env.streamer(f"127.0.0.1:{proxy.port}", archive=archive)
        _spool_whole_take(st, sid, 20)
        await st.start()
        try:
            env.repo.delete_session_rows(sid)  # the attendee deletes their data meanwhile
            proxy.upstream_port = srv.port  # the board is back
            await st.wait_uploaded(sid, timeout_s=60)  # returns once the take left the spool
        finally:
            await st.stop()
            await proxy.stop()
    assert st.takes_dropped == 1 and not recording.exists()
    assert not any((env.tmp / "spool").rglob(f"*{sid}*"))
    assert env.repo.frame_index(sid, "cam0") == []


async def test_an_unknown_session_is_not_mistaken_for_a_deleted_one(env):
    archive = RecordingArchive(env.tmp / "takes")
    recording = _recording(env, "never-created")
    async with th.running_server(env.cfg, repo=env.repo, store=env.store) as srv:
        st = env.streamer(f"127.0.0.1:{srv.port}", archive=archive)
        _spool_whole_take(st, "never-created", 5)
        await st.start()
        try:
            await _until(lambda: "NOT_FOUND" in st.status()["error"])
        finally:
            await st.stop()
    # A typo'd booth address or a lost database must not cost an attendee their take.
    assert recording.exists() and st.takes_dropped == 0 and st.spool.pending()


async def test_a_frame_corrupt_at_capture_is_uploaded_as_lost_and_the_take_completes(env):

    from cloud_trainer.worker import take_from_ingest

    sid = th.new_session(env.repo)
    sent = th.frames(30)
    whole = sent[12].jpeg
    sent[12] = CapturedFrame(12, sent[12].capture_ts_ns, whole[: len(whole) // 2])  # USB cut it
    async with th.running_server(env.cfg, repo=env.repo, store=env.store) as srv:
        st = env.streamer(f"127.0.0.1:{srv.port}")
        take = st.open_take(sid)
        take.add_frames(sent)
        for f in sent:  # the smoother may have imputed a pose even where the image is bad
            take.add_pose(f.seq, np.full((23, 3), 0.5, np.float32))
        take.end()
        await _upload_all(st, sid)
        assert srv.ingest.lost_frames == 1
    assert take.status()["lost_frames"] == 1
    assert env.repo.counter_values()["frames_lost"] == {"cam0": 1.0}  # booth_frames_lost
    assert env.repo.get_session(sid)["state"] == "uploaded"
    stored = th.stored_frames(env.repo, env.store, sid, "cam0")
    assert sorted(stored) == list(range(30)) and stored[12] == b""
    assert all(stored[f.seq] == f.jpeg for f in sent if f.seq != 12)
    # The trainer finds no image there, and no pose that would make it look for one.
    data = take_from_ingest(env.repo, env.store, sid, "cam0", 120.0)
    assert data.rgb(12) is None and not data.poses[12].any()
    assert data.rgb(11) is not None and data.poses[11].any()


async def test_a_backend_nan_pose_is_uploaded_as_missing_points_not_refused(env):
    """Ingest refuses non-finite keypoints and scores outside 0..1; the agent says
    "missing" the skeleton's way (zeros), so such a pose cannot stall its take."""

    sid = th.new_session(env.repo)
    sent = th.frames(4)
    odd = np.full((23, 3), 0.5, np.float32)
    odd[3] = np.nan  # a backend that lost the joint
    odd[4, 2] = 1.0000001  # a score a hair over 1 after float rounding
    async with th.running_server(env.cfg, repo=env.repo, store=env.store) as srv:
        st = env.streamer(f"127.0.0.1:{srv.port}")
        take = st.open_take(sid)
        take.add_frames(sent)
        for f in sent:
            take.add_pose(f.seq, odd)
        take.end()
        await _upload_all(st, sid)
    (row, *_) = env.repo.pose_rows(sid, "cam0")
    kp = np.frombuffer(row["keypoints"], "<f4").reshape(23, 3)
    assert (kp[3] == 0).all() and kp[4, 2] == 1.0 and np.isfinite(kp).all()
    assert env.repo.get_session(sid)["state"] == "uploaded"


async def test_poses_spooled_as_the_take_ends_go_up_before_its_end(env, monkeypatch):
    """The agent spools a take's poses and then ends it, from its own thread. If both land
    between the uplink's last empty read and its "everything sent?" check, the end must
    still wait for the poses: the server completes the take on its end, and the board
    then drops the spool with the poses in it."""

    from edge_agent import stream

    sid = th.new_session(env.repo)
    sent = th.frames(6)
    pose = np.full((23, 3), 0.5, np.float32)
    armed: dict[str, object] = {}
    real_read = stream._SendCursor.read

    def read(self, *args, **kwargs):
        batch = real_read(self, *args, **kwargs)
        take = armed.pop("take", None) if not batch else None
        if take is not None:
            if self.frames_after < len(sent) - 1:
                armed["take"] = take  # not there yet
            else:  # the agent's thread, in the window
                for f in sent:
                    take.add_pose(f.seq, pose)
                take.end()
        return batch

    monkeypatch.setattr(stream._SendCursor, "read", read)
    async with th.running_server(env.cfg, repo=env.repo, store=env.store) as srv:
        st = env.streamer(f"127.0.0.1:{srv.port}")
        take = st.open_take(sid)
        take.add_frames(sent)
        armed["take"] = take
        await _upload_all(st, sid)
    assert "take" not in armed  # the window was hit
    assert len(env.repo.pose_rows(sid, "cam0")) == len(sent)


def test_a_spool_dir_that_cannot_be_used_is_one_line_naming_the_setting(tmp_path: Path):
    from edge_agent.errors import DeviceError
    from edge_agent.stream import Spool

    blocker = tmp_path / "spool"
    blocker.write_text("a file where the spool directory should be")
    with pytest.raises(DeviceError, match=r"uplink.spool_dir .*spool cannot be used: a file"):
        Spool(blocker, 1 << 20, "booth")
