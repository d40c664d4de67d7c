"""The whole edge-to-cloud path with the real agent: Start on the tablet -> frames in the cloud."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import transport_helpers as th
from capture_fakes import HEIGHT, WIDTH, make_jpegs, slow_pose_factory

from cloud_trainer.repository import Repository
from cloud_trainer.storage import create_blob_store
from edge_agent.agent import Agent
from edge_agent.capture.sources import ReplayCamera
from edge_agent.config import AgentConfig, CaptureConfig, SyntheticSource
from edge_agent.control import AgentRunner, ControlClient
from edge_agent.stream import RecordingArchive, Streamer, stream_agent_takes

FPS = 240.0


class CountingArchive(RecordingArchive):
    reads = 0

    def frames_from(self, session_id, camera_id, seq):
        self.reads += 1
        return super().frames_from(session_id, camera_id, seq)


def make_agent(tmp_path: Path) -> Agent:
    jpegs = make_jpegs(60)

    def source(cfg, *, clock, seconds):
        return ReplayCamera(jpegs, width=WIDTH, height=HEIGHT, fps=FPS, clock=clock)

    cfg = AgentConfig(
        booth_id=th.BOOTH,
        camera_id="cam0",
        # Asked for 640x480 at 120 fps; the camera grants its own size and rate.
        source=SyntheticSource(size=(640, 480), fps=120.0),
        capture=CaptureConfig(out_dir=tmp_path / "takes", segment_s=0.1, min_free_disk_mb=0),
    )
    return Agent(cfg, source_factory=source, pose_factory=slow_pose_factory(0.0))


async def online(agent: Agent, srv, tmp_path: Path, streamer: Streamer | None = None):
    """The agent's control client, connected, and the booth as the cloud sees it."""
    control = ControlClient(
        th.uplink_config(f"127.0.0.1:{srv.port}", tmp_path / "spool"),
        booth_id=th.BOOTH,
        camera_id="cam0",
        runner=AgentRunner(agent),
        streamer=streamer,
        clock=agent.clock,
        report_interval_s=0.2,
    )
    await control.start()
    booth = srv.registry.booth(th.BOOTH)
    async with asyncio.timeout(30):
        while booth.online() != ["cam0"]:
            await asyncio.sleep(0.01)
    return control, booth


@pytest.fixture
def cloud(tmp_path: Path):
    cfg = th.booth_config(tmp_path)
    return cfg, Repository.from_config(cfg.database), create_blob_store(cfg.storage)


@pytest.mark.parametrize("budget_frames", [None, 10], ids=["spooled", "spool-full"])
async def test_start_on_the_tablet_puts_every_recorded_frame_in_the_cloud_once(
    tmp_path, cloud, budget_frames
):
    cfg, repo, store = cloud
    sid = th.new_session(repo)
    agent = make_agent(tmp_path).start()
    out_dir = agent.cfg.capture.out_dir
    async with th.running_server(cfg, repo=repo, store=store) as srv:
        # The uplink goes through a proxy, so the test can hold the link down while the take
        # is captured (the control stream goes direct).
        proxy = th.CutProxy(srv.port if not budget_frames else th.dead_port())
        await proxy.start()
        uplink = th.uplink_config(f"127.0.0.1:{proxy.port}", tmp_path / "spool")
        # Kept after upload, so the test can compare it with what the cloud stored.
        archive = CountingArchive(out_dir, keep_uploaded=True)
        streamer = Streamer(uplink, booth_id=th.BOOTH, camera_id="cam0", archive=archive)
        if budget_frames:  # the spool fills up: the rest must come from the MP4 segments
            streamer.spool.budget_bytes = budget_frames * max(len(j) for j in make_jpegs(60))
        stream_agent_takes(agent, streamer)
        await streamer.start()
        control, booth = await online(agent, srv, tmp_path, streamer)
        try:
            results = await booth.start_take(sid, 0.5)
            # The replayed camera is quick: by its report the take may already be finishing.
            assert results["cam0"].acked and results["cam0"].session_id == sid
            if budget_frames:
                async with asyncio.timeout(30):  # the take ends with the link still down
                    while not (agent.state == "idle" and streamer.status()["takes"]):
                        await asyncio.sleep(0.01)
                status = streamer.status()
                assert status["upload_behind"] and status["stream_dropped"] > 0
                assert control.build_status().upload_behind
                proxy.upstream_port = srv.port  # the link is back
            await streamer.wait_uploaded(sid, timeout_s=60)
            assert (archive.reads > 0) == bool(budget_frames)
        finally:
            await control.stop()
            await streamer.stop()
            await proxy.stop()
            agent.close()

    summary = agent.status()["last_take"]
    recorded = list(RecordingArchive(out_dir).frames_from(sid, "cam0", 0))
    assert summary["frames"] == len(recorded) >= 30
    th.assert_exactly_once(repo, store, sid, "cam0", recorded)
    assert len(repo.pose_rows(sid, "cam0")) == len(recorded)
    assert repo.get_session(sid)["state"] == "uploaded"
    # The cloud knows the take by what the camera granted, not by what the config asked.
    (take,) = repo.list_takes(sid)
    assert (take["width"], take["height"], take["fps"]) == (WIDTH, HEIGHT, FPS)


async def test_a_stop_during_the_countdown_is_answered_and_ends_the_take_at_once(tmp_path, cloud):
    """The start is answered when the camera is open; the board keeps reading commands
    while it counts down, so Stop is acted on: the take ends then, not after filming."""
    cfg, repo, store = cloud
    sid = th.new_session(repo)
    agent = make_agent(tmp_path).start()
    async with th.running_server(cfg, repo=repo, store=store) as srv:
        control, booth = await online(agent, srv, tmp_path)
        try:
            countdown_s = 30.0
            # The booth clock is the server's wall clock (this machine's): the board may
            # not have measured its offset to it yet.
            start_at = time.time_ns() + int(countdown_s * 1e9)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            started = await booth.start_take(sid, 5.0, start_at_ns=start_at)
            assert started["cam0"].acked, started
            assert (started["cam0"].state, started["cam0"].session_id) == ("capturing", sid), (
                started
            )
            stopped = await booth.stop_take(sid)
            assert stopped["cam0"].acked
            async with asyncio.timeout(30):
                while agent.current_take is None or not agent.current_take.finished:
                    await asyncio.sleep(0.01)
            assert loop.time() - t0 < countdown_s  # it did not wait the countdown out
        finally:
            await control.stop()
            agent.close()
    summary = agent.status()["last_take"]
    assert summary["session"] == sid and summary["frames"] <= 1  # the instant of the stop


async def test_a_disk_that_refuses_the_takes_files_still_uploads_its_poses(
    tmp_path, cloud, monkeypatch
):
    """The disk fills as the take writes poses.npz, frames.csv and take.json: the take
    fails, but the poses it computed are uploaded from memory, not dropped (the cloud
    used to mark the take complete with no pose at all, and training had nothing)."""
    import errno

    import edge_agent.capture.take as take_mod

    def disk_full(path, write, *, text=False):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(take_mod, "_write_durably", disk_full)
    cfg, repo, store = cloud
    sid = th.new_session(repo)
    agent = make_agent(tmp_path).start()
    async with th.running_server(cfg, repo=repo, store=store) as srv:
        uplink = th.uplink_config(f"127.0.0.1:{srv.port}", tmp_path / "spool")
        archive = RecordingArchive(agent.cfg.capture.out_dir, keep_uploaded=True)
        streamer = Streamer(uplink, booth_id=th.BOOTH, camera_id="cam0", archive=archive)
        stream_agent_takes(agent, streamer)
        await streamer.start()
        try:
            take = await asyncio.to_thread(agent.start_take, sid, 0.25)
            summary = await asyncio.to_thread(take.wait, 30)
            assert summary.state == "failed" and summary.poses is None
            assert any("No space left" in e for e in summary.errors), summary.errors
            take_dir = Path(summary.directory)
            assert not list(take_dir.glob("*.tmp*")), "no half-written file is left"
            await streamer.wait_uploaded(sid, timeout_s=60)
        finally:
            await streamer.stop()
            agent.close()
    assert summary.frames > 0
    assert len(repo.pose_rows(sid, "cam0")) == summary.frames


def test_a_damaged_poses_file_is_set_aside_and_the_recording_posed_again(tmp_path):
    """A poses.npz cut short (a power cut before it reached the disk) is not read as
    poses, nor does it stop the upload: it is moved aside and the frames posed again."""
    agent = make_agent(tmp_path).start()
    try:
        summary = agent.start_take("s-damaged", 30 / FPS).wait(30)
    finally:
        agent.close()
    take_dir = Path(summary.directory)
    poses = take_dir / "poses.npz"
    good = poses.read_bytes()
    poses.write_bytes(good[: len(good) // 3])
    archive = RecordingArchive(
        agent.cfg.capture.out_dir, pose_factory=slow_pose_factory(0.0), keep_uploaded=True
    )
    got = list(archive.poses_from("s-damaged", "cam0", 0))
    assert [seq for seq, *_ in got] == list(range(summary.frames))
    assert (take_dir / "poses.npz.unreadable").exists()
    assert poses.exists() and poses.read_bytes() != good[: len(good) // 3]


async def test_an_upload_that_crashes_says_so_in_status_and_is_retried_with_backoff(
    tmp_path, cloud, monkeypatch, caplog
):
    """A bug in the uplink used to restart the upload every second, silently, forever."""
    import edge_agent.stream as stream_mod

    cfg, repo, store = cloud
    sid = th.new_session(repo)
    real = stream_mod.Streamer._stream_take
    calls = []

    async def crash_twice(self, take):
        calls.append(asyncio.get_running_loop().time())
        if len(calls) <= 2:
            raise RuntimeError("a bug in the uplink")
        return await real(self, take)

    monkeypatch.setattr(stream_mod.Streamer, "_stream_take", crash_twice)
    async with th.running_server(cfg, repo=repo, store=store) as srv:
        uplink = th.uplink_config(f"127.0.0.1:{srv.port}", tmp_path / "spool")
        uplink = uplink.model_copy(update={"backoff_initial_s": 0.3, "backoff_max_s": 2.0})
        streamer = Streamer(uplink, booth_id=th.BOOTH, camera_id="cam0")
        await streamer.start()
        try:
            take = streamer.open_take(sid, width=WIDTH, height=HEIGHT, fps=FPS)
            async with asyncio.timeout(30):
                while not calls:
                    await asyncio.sleep(0.01)
                while not take.error:
                    await asyncio.sleep(0.01)
            assert "RuntimeError: a bug in the uplink" in take.error
            assert "retrying" in take.error
            frames = th.frames(5)
            take.add_frames(frames)
            take.end(len(frames))
            await streamer.wait_uploaded(sid, timeout_s=60)
        finally:
            await streamer.stop()
    assert len(calls) == 3
    # Backed off: 0.3 s, then 0.6 s (not a restart at once).
    assert calls[1] - calls[0] >= 0.3 and calls[2] - calls[1] >= 0.6
    assert "failed on an unexpected error" in caplog.text


async def test_the_retry_delay_after_crashes_is_capped_at_backoff_max(
    tmp_path, monkeypatch, caplog
):
    async def crash(self, take):
        raise RuntimeError("a bug in the uplink")

    monkeypatch.setattr(Streamer, "_stream_take", crash)
    uplink = th.uplink_config(f"127.0.0.1:{th.dead_port()}", tmp_path / "spool")
    uplink = uplink.model_copy(update={"backoff_initial_s": 0.3, "backoff_max_s": 0.4})
    streamer = Streamer(uplink, booth_id=th.BOOTH, camera_id="cam0")

    def crashes() -> list[float]:  # the delay each crash's log line announces
        return [r.args[3] for r in caplog.records if "failed on an unexpected error" in r.msg]

    await streamer.start()
    try:
        streamer.open_take("s1")
        async with asyncio.timeout(20):
            while len(crashes()) < 3:
                await asyncio.sleep(0.02)
    finally:
        await streamer.stop()
    assert crashes()[:3] == [0.3, 0.4, 0.4]  # doubling, then held at the cap


async def test_a_take_the_spool_cannot_open_is_an_error_in_status_not_silence(
    tmp_path, monkeypatch
):
    """The spool's disk (separate from the recording's) refuses a new take: capture goes
    on, and the camera's status says this take's upload is not coming."""
    import errno

    agent = make_agent(tmp_path).start()
    uplink = th.uplink_config(f"127.0.0.1:{th.dead_port()}", tmp_path / "spool")
    streamer = Streamer(uplink, booth_id=th.BOOTH, camera_id="cam0")

    def refuse(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(streamer, "open_take", refuse)
    stream_agent_takes(agent, streamer)
    try:
        summary = agent.start_take("s-nospool", 0.1).wait(30)
    finally:
        agent.close()
    assert summary.frames > 0 and summary.frames_written == summary.frames
    error = streamer.status()["error"]
    assert "s-nospool cannot be uploaded" in error and "No space left" in error
