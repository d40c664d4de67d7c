"""The agent: takes on request, status (in Python and over HTTP), and bad input it survives."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from capture_fakes import (
    HEIGHT,
    WIDTH,
    disk_filling_camera,
    make_jpegs,
    slow_pose_factory,
    statvfs_with,
)
from tmpfs import mounted_tmpfs

from edge_agent.agent import Agent, BoothClock
from edge_agent.capture.sources import ReplayCamera, rate_warning
from edge_agent.config import AgentConfig, CaptureConfig, SyntheticSource, V4L2Source
from edge_agent.errors import BadInput, DeviceError
from edge_agent.frames import Granted

FPS = 240.0


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return make_jpegs(120)


def config(tmp_path: Path, **source) -> AgentConfig:
    return AgentConfig(
        camera_id="cam0",
        source=V4L2Source(**source) if source else SyntheticSource(size=(WIDTH, HEIGHT), fps=FPS),
        capture=CaptureConfig(out_dir=tmp_path / "takes", segment_s=0.25, min_free_disk_mb=0),
    )


class SlowToGrant(ReplayCamera):
    """A camera that grants half the rate it was asked for, and says so like a V4L2 one does."""

    def __init__(self, jpegs, clock, asked_fps: float) -> None:
        super().__init__(jpegs, width=WIDTH, height=HEIGHT, fps=asked_fps / 2, clock=clock)
        self.warnings = [
            rate_warning("camera test", asked_fps, Granted(WIDTH, HEIGHT, asked_fps / 2))
        ]


def replay_factory(jpegs):
    def factory(cfg, *, clock, seconds):
        return ReplayCamera(jpegs, width=WIDTH, height=HEIGHT, fps=FPS, clock=clock)

    return factory


def make_agent(tmp_path, jpegs, **kw) -> Agent:
    kw.setdefault("source_factory", replay_factory(jpegs))
    kw.setdefault("pose_factory", slow_pose_factory(0.005))
    return Agent(config(tmp_path), **kw)


def http_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_for(predicate, timeout_s: float = 20.0) -> bool:
    """Wait for a background thread's state change (not a sleep to win a race)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_agent_runs_a_take_into_session_and_camera_dirs_and_reports_it(tmp_path, jpegs):
    release = threading.Event()

    class Gated(ReplayCamera):
        """Holds frame 10 back until the test has tried a second take."""

        def frames(self):
            for frame in super().frames():
                if frame.seq == 10:
                    release.wait(30)
                yield frame

    def factory(cfg, *, clock, seconds):
        return Gated(jpegs, width=WIDTH, height=HEIGHT, fps=FPS, clock=clock)

    agent = make_agent(tmp_path, jpegs, source_factory=factory).start()
    try:
        seen = []
        agent.add_take_listener(lambda take: seen.append(take.subscribe_stream()))
        take = agent.start_take("sess-1", duration_s=0.25)
        assert agent.state == "capturing"
        with pytest.raises(BadInput, match="already capturing session sess-1"):
            agent.start_take("sess-2")
        release.set()
        summary = take.wait(60)
        assert Path(summary.directory) == tmp_path / "takes" / "sess-1" / "cam0"
        assert summary.frames == 60 and summary.frames_written == 60 and summary.ok
        assert (Path(summary.directory) / "take.json").is_file()
        assert [f.seq for f in seen[0]] == list(range(60)), "a listener sees every frame"
        status = agent.status()
        assert status["state"] == "idle" and status["error"] is None
        assert status["frames"] == 60 and status["drops"]["capture"] == 0
        assert status["last_take"]["coverage"] == 1.0 and status["takes_done"] == 1
        assert set(status) >= {"fps", "pose_fps", "drops", "queues", "take", "clock_offset_ns"}
        # Idle, the camera delivers nothing: the last take's rates are not today's news.
        assert status["fps"] == 0.0 and status["pose_fps"] == 0.0
    finally:
        release.set()
        agent.close()


def test_stop_take_returns_the_summary_of_what_was_captured(tmp_path, jpegs):
    agent = make_agent(tmp_path, jpegs).start()
    bufs = []
    agent.add_take_listener(lambda take: bufs.append(take.subscribe_stream()))
    try:
        agent.start_take("sess-1")
        assert bufs[0].get(timeout=10) is not None
        summary = agent.stop_take(timeout=60)
        assert 1 <= summary.frames <= len(jpegs)
        assert summary.frames_written == summary.frames
    finally:
        agent.close()


def test_a_session_id_that_is_not_a_plain_name_is_refused(tmp_path, jpegs):
    agent = make_agent(tmp_path, jpegs)
    with pytest.raises(BadInput, match="session id '../etc'"):
        agent.start_take("../etc", 1.0)


def test_a_reused_session_is_refused_rather_than_overwritten(tmp_path, jpegs):
    agent = make_agent(tmp_path, jpegs).start()
    try:
        agent.start_take("sess-1", 0.05).wait(60)
        with pytest.raises(BadInput, match="already holds a take"):
            agent.start_take("sess-1", 0.05)
        assert agent.state == "idle"
    finally:
        agent.close()


def test_booth_clock_offset_shifts_every_capture_timestamp(tmp_path, jpegs):
    clock = BoothClock()
    agent = make_agent(tmp_path, jpegs, clock=clock)
    offset = 3_600 * 10**9
    clock.set_offset(offset)
    before = time.monotonic_ns() + offset
    summary = agent.start_take("sess-1", 0.1).wait(60)
    after = time.monotonic_ns() + offset
    rows = (Path(summary.directory) / "frames.csv").read_text().splitlines()[1:]
    ts = np.array([int(r.split(",")[1]) for r in rows])
    assert before <= ts.min() and ts.max() <= after
    assert summary.clock_offset_ns == offset


def test_missing_camera_is_a_clear_error_in_status_and_the_agent_keeps_running(
    tmp_path, get_free_port
):
    cfg = config(tmp_path, device="/dev/video-missing-42")
    cfg.status_port = get_free_port()
    agent = Agent(cfg, pose_factory=slow_pose_factory(0), retry_initial_s=0.05)
    agent.start()  # does not raise
    try:
        assert agent.state == "error"
        assert "/dev/video-missing-42: no such device" in agent.status()["error"]
        with pytest.raises(DeviceError, match="no such device"):
            agent.start_take("sess-1", 1.0)
        code, body = http_json(f"http://127.0.0.1:{agent.status_port}/healthz")
        assert code == 503 and "no such device" in body["error"]
        code, body = http_json(f"http://127.0.0.1:{agent.status_port}/status")
        assert code == 200 and body["state"] == "error" and body["camera"] == "cam0"
        # It keeps probing: the retries are counted in the log, the state stays honest.
        assert agent._loop.is_alive()
    finally:
        agent.close()


def test_agent_recovers_when_the_camera_comes_back(tmp_path, jpegs):
    plugged = {"in": False}

    def factory(cfg, *, clock, seconds):
        if not plugged["in"]:

            class Missing(ReplayCamera):
                def probe(self):
                    raise DeviceError("camera /dev/video0: no such device (is it plugged in?)")

            return Missing(jpegs, width=WIDTH, height=HEIGHT, fps=FPS, clock=clock)
        return ReplayCamera(jpegs, width=WIDTH, height=HEIGHT, fps=FPS, clock=clock)

    agent = make_agent(tmp_path, jpegs, source_factory=factory, retry_initial_s=0.02).start()
    try:
        assert agent.state == "error"
        plugged["in"] = True
        assert wait_for(lambda: agent.state == "idle"), "the agent should re-probe and recover"
        assert agent.status()["error"] is None
    finally:
        agent.close()


def test_granted_rate_below_the_asked_one_is_reported_in_status(tmp_path, jpegs):
    def factory(cfg, *, clock, seconds):
        return SlowToGrant(jpegs, clock, asked_fps=FPS)

    agent = make_agent(tmp_path, jpegs, source_factory=factory).start()
    try:
        assert agent.status()["warnings"] == [
            f"camera test granted {FPS / 2:g} fps, below the {FPS:g} fps asked"
        ]
        summary = agent.start_take("sess-1", 0.1).wait(60)
        assert summary.warnings == agent.status()["warnings"]
        assert summary.granted["fps"] == FPS / 2
    finally:
        agent.close()


def test_full_disk_refuses_a_take_with_a_clear_message_and_the_agent_keeps_running(tmp_path, jpegs):
    free = {"mb": 1.0}

    def statvfs(path):
        return SimpleNamespace(f_bavail=int(free["mb"] * 256), f_frsize=4096)

    cfg = config(tmp_path)
    cfg.capture.min_free_disk_mb = 50
    agent = Agent(
        cfg,
        source_factory=replay_factory(jpegs),
        pose_factory=slow_pose_factory(0),
        statvfs=statvfs,
        retry_initial_s=0.02,
    ).start()
    try:
        assert agent.state == "error"
        assert "disk almost full: 1 MB free" in agent.status()["error"]
        with pytest.raises(DeviceError, match="min_free_disk_mb=50"):
            agent.start_take("sess-1", 0.1)
        free["mb"] = 1000.0
        assert wait_for(lambda: agent.state == "idle"), "space freed: the agent recovers"
        assert agent.start_take("sess-1", 0.1).wait(60).ok
    finally:
        agent.close()


@pytest.fixture
def card(tmp_path):
    """A small real filesystem the test can turn read-only, as an SD card does when it fails."""
    with mounted_tmpfs(tmp_path / "card", 4096) as remount:
        (tmp_path / "card" / "takes").mkdir()
        yield tmp_path / "card" / "takes", remount


def test_a_take_directory_that_went_read_only_stays_an_error_until_it_is_writable(
    tmp_path, jpegs, card
):
    """It stats and lists fine: the agent said idle (and /healthz 200) while every take
    failed. Only writing tells."""
    takes, remount = card
    cfg = config(tmp_path)
    cfg.capture.out_dir = takes
    remount("ro")
    agent = Agent(
        cfg,
        source_factory=replay_factory(jpegs),
        pose_factory=slow_pose_factory(0),
        retry_initial_s=0.02,
    ).start()
    try:
        assert agent.state == "error"
        assert "cannot write in the take directory" in agent.status()["error"]
        assert "Read-only file system" in agent.status()["error"]
        assert agent.probe() is False and agent.state == "error"  # a re-probe keeps it
        with pytest.raises(DeviceError):
            agent.start_take("sess-1", 0.1)
        remount("rw")
        assert wait_for(lambda: agent.state == "idle"), "writable again: the agent recovers"
        assert agent.start_take("sess-1", 0.1).wait(60).ok
        assert not list(takes.glob(".write-probe-*"))
    finally:
        agent.close()


def test_status_endpoint_serves_live_counters_during_a_take(tmp_path, jpegs, get_free_port):
    agent = make_agent(tmp_path, jpegs)
    agent.start(status_port=get_free_port())
    try:
        bufs = []
        agent.add_take_listener(lambda take: bufs.append(take.subscribe_stream()))
        agent.start_take("sess-1")
        for _ in range(10):
            bufs[0].get(timeout=10)
        code, body = http_json(f"http://127.0.0.1:{agent.status_port}/status")
        assert code == 200
        assert body["take"]["session"] == "sess-1"
        assert body["frames"] >= 10
        assert body["drops"]["capture"] == 0 and "segment" in body["queues"]
        code, _ = http_json(f"http://127.0.0.1:{agent.status_port}/healthz")
        assert code == 200
        code, _ = http_json(f"http://127.0.0.1:{agent.status_port}/nope")
        assert code == 404
    finally:
        agent.close()


# ---- the CLI -------------------------------------------------------------------------------


def _mjpeg_file(tmp_path: Path, jpegs: list[bytes]) -> Path:
    agent = make_agent(tmp_path / "make", jpegs)
    agent.cfg.capture.segment_s = 60
    summary = agent.start_take("src", 0.25).wait(60)
    return Path(summary.directory) / summary.segments[0]["file"]


def test_booth_agent_runs_one_take_and_prints_a_summary(tmp_path, jpegs, capsys):
    from cloud_trainer.cli import main

    video = _mjpeg_file(tmp_path, jpegs)
    cfg = tmp_path / "booth.yaml"
    cfg.write_text(
        "agent:\n"
        "  camera_id: cam7\n"
        f"  source: {{type: file, path: {video}, rate: max}}\n"
        "  pose: {type: cpu, threads: 1, mode: tracking}\n"
        f"  capture: {{out_dir: {tmp_path / 'out'}, segment_s: 0.1, min_free_disk_mb: 0}}\n"
    )
    code = main(
        ["agent", "--config", str(cfg), "--take-seconds", "5", "--session", "cli-1", "--json"]
    )
    out = capsys.readouterr().out
    summary = json.loads(out)
    assert code == 0, out
    assert summary["camera_id"] == "cam7" and summary["session_id"] == "cli-1"
    assert summary["frames"] == 60 and summary["frames_written"] == 60
    assert summary["pose"]["backend"] == "cpu" and summary["pose"]["coverage"] == 1.0
    assert (tmp_path / "out" / "cli-1" / "cam7" / "poses.npz").is_file()


def test_booth_agent_with_a_missing_camera_prints_one_line_and_exits_2(tmp_path, capsys):
    from cloud_trainer.cli import main

    cfg = tmp_path / "booth.yaml"
    cfg.write_text(
        "agent:\n"
        "  source: {type: v4l2, device: /dev/video-missing-42}\n"
        f"  capture: {{out_dir: {tmp_path / 'out'}, min_free_disk_mb: 0}}\n"
    )
    code = main(["agent", "--config", str(cfg), "--take-seconds", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        "booth agent: camera /dev/video-missing-42: no such device (is the camera plugged in?)"
    ]


def test_agent_captures_the_synthetic_booth_camera(tmp_path):
    cfg = config(tmp_path)
    cfg.source = SyntheticSource(size=(160, 120), fps=60)
    agent = Agent(cfg, pose_factory=slow_pose_factory(0))
    summary = agent.start_take("sess-1", 0.5).wait(60)
    assert summary.granted == {"width": 160, "height": 120, "fps": 60.0, "pixel_format": "mjpeg"}
    assert summary.frames == 30 and summary.frames_written == 30
    assert summary.pose["coverage"] == 1.0 and summary.ok


def booth_agent(cfg: Path, *flags: str):
    """``booth agent --config cfg`` as its own process group (so a test can end it all)."""
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "cloud_trainer.cli", "agent", "--config", str(cfg), *flags],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_booth_agent_process_keeps_serving_status_with_a_missing_camera_until_sigterm(
    tmp_path, get_free_port
):
    import os
    import signal

    port = get_free_port()
    cfg = tmp_path / "booth.yaml"
    cfg.write_text(
        "agent:\n"
        "  source: {type: v4l2, device: /dev/video-missing-42}\n"
        f"  capture: {{out_dir: {tmp_path / 'out'}, min_free_disk_mb: 0}}\n"
        f"  status_port: {port}\n"
    )
    proc = booth_agent(cfg, "--offline")
    try:

        def serving() -> bool:
            assert proc.poll() is None, proc.stderr.read()
            try:
                return http_json(f"http://127.0.0.1:{port}/healthz")[0] == 503
            except (urllib.error.URLError, ConnectionError):
                return False

        assert wait_for(serving, 60), "the agent should serve its status despite the error"
        code, body = http_json(f"http://127.0.0.1:{port}/status")
        assert body["state"] == "error" and "no such device" in body["error"]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "camera /dev/video-missing-42: no such device" in err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_connected_agents_status_says_whether_the_cloud_answers(tmp_path, get_free_port):
    """/status answered "ok" with serve gone: it now carries the cloud link's state."""
    import os
    import signal
    import subprocess

    port, nobody = get_free_port(), get_free_port()  # nothing listens on the second
    cfg = tmp_path / "booth.yaml"
    cfg.write_text(
        "agent:\n"
        "  source: {type: synthetic, size: 64x48, fps: 10}\n"
        f"  capture: {{out_dir: {tmp_path / 'out'}, min_free_disk_mb: 0}}\n"
        f"  status_port: {port}\n"
        f"  uplink: {{address: '127.0.0.1:{nobody}', token: a-real-token-for-this-test,"
        f" spool_dir: {tmp_path / 'spool'}}}\n"
    )
    proc = booth_agent(cfg)
    try:

        def cloud() -> dict | None:
            assert proc.poll() is None, proc.stderr.read()
            try:
                return http_json(f"http://127.0.0.1:{port}/status")[1].get("cloud")
            except (urllib.error.URLError, ConnectionError):
                return None

        assert wait_for(cloud, 60), "the status never named the cloud link"
        link = cloud()
        assert link["connected"] is False and link["address"] == f"127.0.0.1:{nobody}"
        assert link["spool_bytes"] == 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_camera_unplugged_mid_take_keeps_the_frames_and_reports_the_error(tmp_path, jpegs):
    import errno

    class Unplugged(ReplayCamera):
        def frames(self):
            for frame in super().frames():
                if frame.seq == 20:
                    raise OSError(errno.ENODEV, "No such device")
                yield frame

    def factory(cfg, *, clock, seconds):
        return Unplugged(jpegs, width=WIDTH, height=HEIGHT, fps=FPS, clock=clock)

    agent = make_agent(tmp_path, jpegs, source_factory=factory)
    summary = agent.start_take("sess-1").wait(60)
    assert summary.frames == 20 and summary.frames_written == 20
    assert summary.errors == ["camera replay failed after 20 frames: [Errno 19] No such device"]
    assert summary.pose["coverage"] == 1.0, "what was captured is still posed"
    assert agent.state == "error" and "No such device" in agent.status()["error"]


def test_while_capturing_the_runner_reports_the_live_pose_and_the_agent_warnings(tmp_path, jpegs):
    from edge_agent.control import AgentRunner

    agent = make_agent(tmp_path, jpegs).start()
    runner = AgentRunner(agent)
    try:
        agent.start_take("sess-1", 30.0)
        assert wait_for(lambda: runner.status()["live_pose"] is not None)
        st = runner.status()
        assert st["state"] == "capturing" and len(st["live_pose"]["keypoints"]) == 23
        assert isinstance(st["warnings"], list)
        agent.stop_take(wait=True)
        assert runner.status()["live_pose"] is None  # idle: nothing live to draw
    finally:
        agent.close()


def test_a_booth_start_opens_the_camera_before_the_shared_instant_and_films_from_it(
    tmp_path, jpegs
):
    """Each board's camera takes its own time to open (and its pose model to load): that
    must happen before the booth's start instant, or boards start out of step by it."""
    from edge_agent.control import AgentRunner

    seen: dict[str, int] = {}

    class SlowToOpen(ReplayCamera):
        def open(self) -> Granted:
            time.sleep(0.2)  # a V4L2 device probing its formats
            granted = super().open()
            seen["opened"] = time.monotonic_ns()
            return granted

        def frames(self):
            for frame in super().frames():
                seen.setdefault("first_frame", time.monotonic_ns())
                yield frame

    def factory(cfg, *, clock, seconds):
        return SlowToOpen(jpegs, width=WIDTH, height=HEIGHT, fps=FPS, clock=clock)

    agent = make_agent(tmp_path, jpegs, source_factory=factory).start()
    try:
        start_at = time.monotonic_ns() + 2_000_000_000
        AgentRunner(agent).start_take("sess-1", 0.1, start_at)
        agent.current_take.wait(60)
    finally:
        agent.close()
    assert seen["opened"] < start_at <= seen["first_frame"]


def test_a_clock_offset_measured_mid_take_waits_for_the_take_to_end(tmp_path, jpegs):
    """A new offset can arrive with any report (1 s); stepped mid-take, the timestamps
    jumped backwards, or forwards past the take's end and cut it short."""
    clock = BoothClock()
    agent = make_agent(tmp_path, jpegs, clock=clock)
    bufs = []
    agent.add_take_listener(lambda take: bufs.append(take.subscribe_stream()))
    take = agent.start_take("sess-1", 0.5)  # 120 frames at 240 fps
    assert bufs[0].get(timeout=10) is not None  # capturing
    clock.set_offset(300_000_000)  # +300 ms
    assert clock.offset_ns == 0
    summary = take.wait(60)
    agent.close()
    rows = (Path(summary.directory) / "frames.csv").read_text().splitlines()[1:]
    ts = np.array([int(r.split(",")[1]) for r in rows])
    assert summary.frames == 120 and len(ts) == 120
    assert (np.diff(ts) > 0).all() and np.diff(ts).max() < 50_000_000
    assert clock.offset_ns == 300_000_000  # adopted once the capture ended


def test_a_start_waits_for_a_reprobe_that_holds_the_camera(tmp_path, jpegs):
    """While in error the agent re-probes the camera (a V4L2 probe opens the device); a
    Start arriving meanwhile must not open it at the same time ("device busy")."""
    events: list[str] = []
    opened = threading.Event()

    class Probed(ReplayCamera):
        def probe(self) -> Granted:
            events.append("probe")
            opened.wait(2.0)  # holds the device until a concurrent open shows up (or 2 s)
            events.append("probe done")
            return super().probe()

        def open(self) -> Granted:
            events.append("open")
            opened.set()
            return super().open()

    def factory(cfg, *, clock, seconds):
        return Probed(jpegs, width=WIDTH, height=HEIGHT, fps=FPS, clock=clock)

    agent = make_agent(tmp_path, jpegs, source_factory=factory)
    prober = threading.Thread(target=agent.probe)
    prober.start()
    assert wait_for(lambda: events == ["probe"])
    take = agent.start_take("sess-1", 0.05)
    prober.join(30)
    take.wait(60)
    agent.close()
    assert events == ["probe", "probe done", "open"]


class GoesSilent(ReplayCamera):
    """A camera that delivers a few frames, then blocks in its read until ``resume``."""

    resume = threading.Event()

    def frames(self):
        for frame in super().frames():
            if frame.seq == 5:
                self.resume.wait(60)
            yield frame


def _silent_factory(jpegs):
    def factory(cfg, *, clock, seconds):
        return GoesSilent(jpegs, width=WIDTH, height=HEIGHT, fps=FPS, clock=clock)

    return factory


def test_a_camera_silent_mid_take_past_the_limit_asks_for_a_restart(tmp_path, jpegs):
    """StopTake cannot reach a capture blocked in the camera's read; only a new process
    frees the device, so the agent says it needs one (booth agent then exits 3)."""
    GoesSilent.resume.clear()
    agent = make_agent(tmp_path, jpegs, source_factory=_silent_factory(jpegs), retry_initial_s=0.05)
    agent.cfg.capture.stall_restart_s = 0.5
    agent.start()
    try:
        agent.start_take("sess-1", 5.0)
        assert agent.needs_restart.wait(30)
        assert "camera silent for" in agent.restart_reason
        assert agent.status()["error"] == agent.restart_reason
    finally:
        GoesSilent.resume.set()
        agent.close()


def test_booth_agent_exits_3_for_its_supervisor_when_the_camera_sticks(
    tmp_path, jpegs, monkeypatch
):
    import argparse

    import edge_agent.agent as agent_module
    from edge_agent.commands import agent as command

    GoesSilent.resume.clear()
    cfg_path = tmp_path / "agent.yaml"
    cfg_path.write_text(
        "agent:\n"
        "  camera_id: cam0\n"
        f"  capture: {{out_dir: {tmp_path / 'takes'}, min_free_disk_mb: 0, stall_restart_s: 0.5}}\n"
    )
    real = agent_module.Agent

    def stuck_agent(cfg, **kw):
        kw.update(source_factory=_silent_factory(jpegs), pose_factory=slow_pose_factory(0))
        kw.setdefault("retry_initial_s", 0.05)
        return real(cfg, **kw)

    monkeypatch.setattr(agent_module, "Agent", stuck_agent)
    args = argparse.Namespace(
        config=cfg_path,
        camera_id=None,
        take_seconds=5.0,
        session="s1",
        out_dir=None,
        status_port=0,
        json=False,
        offline=False,
        prerender_seconds=0.0,
    )
    try:
        assert command.run(args) == command.EXIT_RESTART
    finally:
        GoesSilent.resume.set()


def _disk_agent(tmp_path, frames, hold_at: int | None, release: threading.Event):
    free = {"mb": 10_000.0}

    def factory(cfg, *, clock, seconds):
        return disk_filling_camera(
            frames,
            free,
            hold_at=hold_at,
            release=release,
            width=WIDTH,
            height=HEIGHT,
            fps=FPS,
            clock=clock,
        )

    cfg = AgentConfig(
        camera_id="cam0",
        source=SyntheticSource(size=(WIDTH, HEIGHT), fps=FPS),
        capture=CaptureConfig(out_dir=tmp_path / "takes", segment_s=0.25, min_free_disk_mb=100),
    )
    return Agent(
        cfg,
        source_factory=factory,
        pose_factory=slow_pose_factory(0),
        statvfs=statvfs_with(free),
    )


def test_a_disk_that_fills_mid_take_is_the_agents_error_while_capturing(tmp_path):
    release = threading.Event()
    agent = _disk_agent(tmp_path, make_jpegs(240), hold_at=220, release=release)
    try:
        take = agent.start_take("sess-1")
        assert wait_for(lambda: take.recorder.state == "disk_full")
        st = agent.status()
        assert st["state"] == "capturing"
        assert st["error"] and "disk almost full" in st["error"], st["error"]
    finally:
        release.set()
        agent.close()
