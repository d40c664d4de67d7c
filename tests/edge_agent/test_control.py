"""Control on loopback: the cloud starts and stops takes on every agent of a booth."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest
import transport_helpers as th

from cloud_trainer.ingest.control import COMMAND_QUEUE, AgentRegistry
from cloud_trainer.repository import Repository
from cloud_trainer.service import RegistryController
from cloud_trainer.storage import create_blob_store
from edge_agent.control import ControlClient
from edge_agent.stream import auth_metadata, make_channel
from protos import booth_pb2, booth_pb2_grpc


class FakeCapture:
    """Records what the control client asks of the capture."""

    def __init__(self):
        self.started: list[tuple[str, float, int]] = []
        self.stopped: list[str] = []
        self.session = ""

    def start_take(self, session_id: str, duration_s: float, start_at_monotonic_ns: int) -> None:
        self.started.append((session_id, duration_s, start_at_monotonic_ns))
        self.session = session_id

    async def stop_take(self, session_id: str) -> None:
        self.stopped.append(session_id)
        self.session = ""

    def status(self) -> dict:
        if self.session:
            return {"state": "capturing", "session_id": self.session, "frames_captured": 7}
        return {"state": "idle"}


class Booth:
    def __init__(self, tmp: Path, srv, cameras=("cam0", "cam1")):
        self.srv = srv
        self.captures = {cam: FakeCapture() for cam in cameras}
        self.clients = {
            cam: ControlClient(
                th.uplink_config(f"127.0.0.1:{srv.port}", tmp / f"spool-{cam}", cam),
                booth_id=th.BOOTH,
                camera_id=cam,
                runner=self.captures[cam],
                capabilities=booth_pb2.Capabilities(pose_backends=["cpu"], max_fps=120),
                software_version="test-1",
                report_interval_s=0.2,
            )
            for cam in cameras
        }
        self.booth = srv.registry.booth(th.BOOTH)

    async def __aenter__(self):
        for c in self.clients.values():
            await c.start()
        async with asyncio.timeout(30):
            while sorted(self.booth.online()) != sorted(self.clients):
                await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc):
        for c in self.clients.values():
            await c.stop()


@pytest.fixture
async def server(tmp_path: Path):
    cfg = th.booth_config(tmp_path)
    repo = Repository.from_config(cfg.database)
    async with th.running_server(cfg, repo=repo, store=create_blob_store(cfg.storage)) as srv:
        srv.test_repo = repo
        yield srv


async def test_start_and_stop_reach_both_agents_and_they_acknowledge(tmp_path, server):
    async with Booth(tmp_path, server) as b:
        results = await b.booth.start_take("s1", 15.0)
        assert set(results) == {"cam0", "cam1"}
        for r in results.values():
            assert r.delivered and r.acked and r.state == "capturing" and r.session_id == "s1"
        assert all(c.started == [("s1", 15.0, 0)] for c in b.captures.values())
        views = {v.camera_id: v for v in b.booth.agents()}
        assert views["cam0"].online and views["cam0"].state == "capturing"
        assert views["cam0"].software_version == "test-1"
        assert views["cam0"].capabilities["pose_backends"] == ["cpu"]
        # Plain Python values for the tablet: ints stay ints, the state is its name.
        assert views["cam0"].status["frames_captured"] == 7
        assert views["cam0"].status["state"] == "capturing"

        stopped = await b.booth.stop_take("s1")
        assert all(r.acked and r.state == "idle" for r in stopped.values())
        assert all(c.stopped == ["s1"] for c in b.captures.values())

    rows = {r["camera_id"]: r for r in server.test_repo.list_agents(th.BOOTH)}
    assert set(rows) == {"cam0", "cam1"}
    assert rows["cam0"]["last_seen"] is not None and rows["cam0"]["software_version"] == "test-1"
    assert (
        rows["cam0"]["status"]["camera_id"] == "cam0" and "upload_behind" in rows["cam0"]["status"]
    )
    async with asyncio.timeout(30):  # the agents disconnected: the table says so (soon)
        while {r["state"] for r in server.test_repo.list_agents(th.BOOTH)} != {"offline"}:
            await asyncio.sleep(0.01)


async def test_duplicate_and_late_commands_are_harmless(tmp_path, server):
    async with Booth(tmp_path, server, cameras=("cam0",)) as b:
        capture = b.captures["cam0"]
        first = await b.booth.start_take("s1", 5.0, command_id="c-1")
        again = await b.booth.start_take("s1", 5.0, command_id="c-1")  # the network repeated it
        assert first["cam0"].acked and again["cam0"].acked
        assert len(capture.started) == 1

        await b.booth.stop_take("s1", command_id="c-2")
        # A new command id for a session this agent already captured: still ignored.
        redo = await b.booth.start_take("s1", 5.0, command_id="c-3")
        assert redo["cam0"].acked and len(capture.started) == 1

        # StopTake with no take running is a no-op.
        noop = await b.booth.stop_take("nothing-running", command_id="c-4")
        assert noop["cam0"].acked and capture.stopped == ["s1"]

        # A StartTake that arrives after its take would have ended is ignored.
        client = b.clients["cam0"]
        past = client.booth_time_ns() - 60 * 10**9
        late = await b.booth.start_take("s2", 5.0, start_at_ns=past, command_id="c-5")
        assert late["cam0"].acked and len(capture.started) == 1
        assert "too late" in late["cam0"].error


async def test_the_agent_measures_its_clock_offset_from_report_acks(tmp_path, server):
    async with Booth(tmp_path, server, cameras=("cam0",)) as b:
        client = b.clients["cam0"]
        await client.report_now()
        # The booth clock is the server's wall clock (same machine here): within a round trip.
        assert abs(client.booth_time_ns() - time.time_ns()) < 1_000_000_000
        assert client.build_status().clock_offset_ns == client.clock_offset_ns != 0


async def test_a_server_clock_step_is_followed_at_the_next_sample(tmp_path, server):
    """The offset was the lowest-latency sample of the last 8, however old: after the
    server's clock stepped an hour, the board kept the old offset for 6 more reports."""
    async with Booth(tmp_path, server, cameras=("cam0",)) as b:
        client = b.clients["cam0"]
        hour = 3600 * 10**9
        t = 10**12
        for rtt in (2_000_000, 1_000_000, 3_000_000):  # steady, the middle one the best
            client._clock_sample(t, t + rtt, t + rtt // 2 + 5_000)  # noqa: SLF001
            t += 10**9
        assert abs(client.clock_offset_ns - 5_000) < 1_000
        client._clock_sample(t, t + 4_000_000, t + 2_000_000 + hour)  # noqa: SLF001
        assert abs(client.clock_offset_ns - hour) < 3_000_000  # at once, not 6 reports later
        # Ordinary jitter within the round trips is not a step.
        t += 10**9
        client._clock_sample(t, t + 2_000_000, t + 1_000_000 + hour + 400_000)  # noqa: SLF001
        assert abs(client.clock_offset_ns - hour) < 3_000_000


async def test_a_start_far_ahead_of_the_booth_clock_is_refused_not_waited_for(tmp_path, server):
    """An hour ahead (a clock step the board had not seen yet): the board would sit in
    'starting' for an hour, with Stop unable to reach it."""
    async with Booth(tmp_path, server, cameras=("cam0",)) as b:
        client, capture = b.clients["cam0"], b.captures["cam0"]
        await client.report_now()
        far = client.booth_time_ns() + 3600 * 10**9
        r = await b.booth.start_take("s1", 5.0, start_at_ns=far, command_id="c-far")
        assert r["cam0"].acked and capture.started == []
        assert "ahead of this board's booth clock" in r["cam0"].error
        soon = client.booth_time_ns() + 10**8
        r = await b.booth.start_take("s2", 5.0, start_at_ns=soon, command_id="c-soon")
        assert [s[0] for s in capture.started] == ["s2"]


async def test_an_agent_that_is_gone_is_offline_and_commands_skip_it(tmp_path, server):
    async with Booth(tmp_path, server) as b:
        await b.clients["cam1"].stop()
        async with asyncio.timeout(30):
            while b.booth.online() != ["cam0"]:
                await asyncio.sleep(0.01)
        results = await b.booth.start_take("s1", 5.0)
        assert set(results) == {"cam0"}
        views = {v.camera_id: v for v in b.booth.agents()}
        assert not views["cam1"].online and views["cam1"].state == "offline"


async def test_the_registry_can_be_used_from_another_event_loop(tmp_path, server):
    async with Booth(tmp_path, server, cameras=("cam0",)) as b:

        def web_app_thread():
            # A web app with its own loop (uvicorn in a thread) awaits the same API.
            return asyncio.run(b.booth.start_take("s9", 3.0))

        results = await asyncio.to_thread(web_app_thread)
        assert results["cam0"].acked and b.captures["cam0"].started[-1][0] == "s9"


async def test_an_agent_knows_it_is_connected_before_any_command(tmp_path, server):
    async with Booth(tmp_path, server, cameras=("cam0",)) as b:
        client = b.clients["cam0"]
        await asyncio.wait_for(client.connected.wait(), 30)
        assert client.clock_offset_ns != 0  # its first report went through: the clock is set


async def test_a_start_while_another_take_runs_is_refused_and_says_why(tmp_path, server):
    async with Booth(tmp_path, server, cameras=("cam0",)) as b:
        await b.booth.start_take("s1", 5.0)
        second = await b.booth.start_take("s2", 5.0)
        assert second["cam0"].acked and second["cam0"].session_id == "s1"
        assert "still capturing s1" in second["cam0"].error
        assert [s for s, _, _ in b.captures["cam0"].started] == ["s1"]


async def test_an_agent_that_leaves_while_it_is_being_registered_is_offline(tmp_path):
    cfg = th.booth_config(tmp_path)
    repo = Repository.from_config(cfg.database)
    entered, release = threading.Event(), threading.Event()

    class SlowRepo:
        """The real repository, but recording an agent waits until the test says so."""

        def upsert_agent(self, *args, **kwargs):
            entered.set()
            release.wait(30)
            return repo.upsert_agent(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(repo, name)

    async with th.running_server(cfg, repo=SlowRepo(), store=create_blob_store(cfg.storage)) as srv:
        booth = srv.registry.booth(th.BOOTH)
        client = Booth(tmp_path, srv, cameras=("cam0",)).clients["cam0"]
        await client.start()
        assert await asyncio.to_thread(entered.wait, 30)
        async with asyncio.timeout(30):  # its report may have reached the gate first
            while booth.online() != ["cam0"]:
                await asyncio.sleep(0.01)
        await client.stop()  # gone while the server is still writing its arrival
        release.set()
        async with asyncio.timeout(30):
            while booth.online():
                await asyncio.sleep(0.01)


async def test_a_status_with_nan_numbers_is_stored_and_shown_as_strict_json(tmp_path, server):
    import json

    registry = server.registry
    bad = booth_pb2.AgentStatus(
        booth_id=th.BOOTH, camera_id="cam0", fps=float("nan"), pose_fps=float("inf")
    )
    await registry.report(bad)
    (view,) = registry.agents(th.BOOTH)
    assert view.status["fps"] is None and view.status["pose_fps"] is None
    json.dumps(view.status, allow_nan=False)
    (row,) = server.test_repo.list_agents(th.BOOTH)
    assert row["status"]["fps"] is None


def _registry(tmp_path: Path, repo=None):
    from cloud_trainer.ingest.control import AgentRegistry

    real = Repository.from_config(th.booth_config(tmp_path).database)
    return AgentRegistry(repo or real), real


def _register(cam: str = "cam0") -> booth_pb2.Register:
    return booth_pb2.Register(booth_id=th.BOOTH, camera_id=cam, software_version="t")


def _status(state: int, cam: str = "cam0") -> booth_pb2.AgentStatus:
    return booth_pb2.AgentStatus(booth_id=th.BOOTH, camera_id=cam, state=state)


async def test_a_report_that_arrives_after_the_stream_closed_leaves_the_agent_offline(tmp_path):
    # Report is its own RPC: the agent's last status can land after its Connect stream ended.
    registry, repo = _registry(tmp_path)
    link = registry.attach(_register())
    await registry.record_connected(link)
    await registry.detach(link)
    await registry.report(_status(booth_pb2.IDLE))
    (row,) = repo.list_agents(th.BOOTH)
    assert row["state"] == "offline"
    assert registry.agents(th.BOOTH)[0].state == "offline"


async def test_the_live_pose_is_shown_from_memory_and_not_written_to_the_agents_table(tmp_path):
    registry, repo = _registry(tmp_path)
    link = registry.attach(_register())
    status = _status(booth_pb2.CAPTURING)
    status.warnings.append("camera granted 60 fps; 120 were asked")
    for _ in range(23):
        status.live_pose.keypoints.add(x=0.5, y=0.25, score=0.9)
    await registry.report(status)
    assert len(registry.agents(th.BOOTH)[0].status["live_pose"]["keypoints"]) == 23
    (row,) = repo.list_agents(th.BOOTH)
    assert row["status"]["warnings"] == ["camera granted 60 fps; 120 were asked"]
    assert "live_pose" not in row["status"]
    await registry.detach(link)


async def test_an_older_status_write_that_finishes_last_does_not_overwrite_a_newer_one(tmp_path):
    gate, entered = threading.Event(), threading.Event()
    calls = []

    class GatedRepo:
        """The first write waits (like a slow thread) until the test releases it."""

        def __init__(self, repo):
            self.repo = repo

        def upsert_agent(self, *args, **kwargs):
            calls.append(kwargs["state"])
            if len(calls) == 1:
                entered.set()
                assert gate.wait(30)
            return self.repo.upsert_agent(*args, **kwargs)

    _, real = _registry(tmp_path)
    registry, _ = _registry(tmp_path, GatedRepo(real))
    link = registry.attach(_register())
    slow = asyncio.create_task(registry.report(_status(booth_pb2.CAPTURING)))
    assert await asyncio.to_thread(entered.wait, 30)
    detach = asyncio.create_task(registry.detach(link))
    await asyncio.sleep(0)  # let detach issue its write while the older one is still running
    gate.set()
    await asyncio.gather(slow, detach)
    (row,) = real.list_agents(th.BOOTH)
    assert row["state"] == "offline", calls


class WarnedCapture(FakeCapture):
    """Capturing, with a warning and a live pose, as the agent's runner reports them."""

    def status(self) -> dict:
        st = super().status()
        if self.session:
            st["warnings"] = ["camera granted 60 fps; 120 were asked"]
            st["live_pose"] = {"seq": 42, "keypoints": [[0.5, 0.25, 0.9]] * 23}
        return st


async def test_warnings_and_the_live_pose_reach_the_tablet(tmp_path, server):
    from cloud_trainer.service import RegistryController

    b = Booth(tmp_path, server, cameras=("cam0",))
    b.captures["cam0"] = capture = WarnedCapture()
    b.clients["cam0"].runner = capture
    async with b:
        await b.booth.start_take("s1", 15.0)
        (agent,) = RegistryController(server.registry, 0.0, server.test_repo).online_agents(
            th.BOOTH
        )
        assert agent["warnings"] == ["camera granted 60 fps; 120 were asked"]
        assert agent["live_pose"] == [pytest.approx([0.5, 0.25, 0.9])] * 23
        await b.booth.stop_take("s1")
        (agent,) = RegistryController(server.registry, 0.0, server.test_repo).online_agents(
            th.BOOTH
        )
        assert agent["warnings"] == [] and agent["live_pose"] is None
    async with asyncio.timeout(30):  # the agent disconnected: its row says so (soon)
        while {r["state"] for r in server.test_repo.list_agents(th.BOOTH)} != {"offline"}:
            await asyncio.sleep(0.01)
    (row,) = server.test_repo.list_agents(th.BOOTH)  # stored as plain JSON, the idle report last
    assert "live_pose" not in row["status"] and row["status"]["warnings"] == []


def test_frames_the_board_could_not_upload_are_a_warning_on_the_tablet(tmp_path):
    class LosingStreamer:
        def status(self) -> dict:
            return {
                "frames_lost": 5,
                "lost_why": "5 frames are in neither the spool nor the local recording",
            }

    client = ControlClient(
        th.uplink_config("127.0.0.1:1", tmp_path / "spool", "cam0"),
        booth_id=th.BOOTH,
        camera_id="cam0",
        runner=FakeCapture(),
        streamer=LosingStreamer(),
    )
    assert list(client.build_status().warnings) == [
        "5 frames are in neither the spool nor the local recording"
    ]


async def test_a_disk_that_refuses_the_session_list_does_not_fail_a_started_take(
    tmp_path, server, caplog
):
    """control.json only carries the started sessions over a restart: a full disk there
    must not turn a take that is filming into "start take failed" on the tablet."""
    async with Booth(tmp_path, server, cameras=("cam0",)) as b:
        client = b.clients["cam0"]
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("in the way")
        client._state_path = blocker / "control.json"  # noqa: SLF001 - its write fails
        results = await b.booth.start_take("s1", 5.0, command_id="c-1")
        assert results["cam0"].acked and results["cam0"].state == "capturing"
        assert not results["cam0"].error
        assert b.captures["cam0"].started and client.commands_run == 1
        # The list in memory still makes a repeat harmless.
        await b.booth.start_take("s1", 5.0, command_id="c-2")
        assert len(b.captures["cam0"].started) == 1
    assert "not saved" in caplog.text


async def logs_of_a_lone_board(address: str, spool: Path, caplog, until: str, **uplink):
    """Run one board's control client against ``address`` until its log says ``until``;
    its own log records."""
    import logging

    client = ControlClient(
        th.uplink_config(address, spool, **uplink),
        booth_id=th.BOOTH,
        camera_id="cam0",
        runner=FakeCapture(),
        report_interval_s=0.2,
    )

    def own() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "edge_agent.control"]

    with caplog.at_level(logging.INFO, logger="edge_agent.control"):
        await client.start()
        try:
            async with asyncio.timeout(30):
                while not any(until in r.getMessage() for r in own()):
                    await asyncio.sleep(0.01)
        finally:
            await client.stop()
    return own()


async def test_a_board_whose_token_the_cloud_refuses_says_what_to_fix(tmp_path, server, caplog):
    """Its log used to repeat 'stream broke: UNAUTHENTICATED unknown token' at INFO."""
    import logging

    records = await logs_of_a_lone_board(
        f"127.0.0.1:{server.port}",
        tmp_path / "spool",
        caplog,
        "UNAUTHENTICATED",
        token="not-the-token",
    )
    first = next(r for r in records if "UNAUTHENTICATED" in r.getMessage())
    assert first.levelno == logging.WARNING
    assert "uplink.token does not match" in first.getMessage()


async def test_a_cloud_out_of_reach_is_a_warning_after_a_few_tries(tmp_path, caplog):
    import logging

    records = await logs_of_a_lone_board(
        f"127.0.0.1:{th.dead_port()}", tmp_path / "spool", caplog, "3 time(s) in a row"
    )
    broke = [r for r in records if "stream broke" in r.getMessage()]
    assert broke[0].levelno == logging.INFO  # one failure is a blip
    third = next(r for r in broke if "3 time(s) in a row" in r.getMessage())
    assert third.levelno == logging.WARNING


# ---- guards a mutation audit found missing ------------------------------------------------


class CountingDown(FakeCapture):
    """Opens its camera at once (status: capturing, as the agent's 'starting' reads), says
    it is ready, then waits for the start instant until the test releases it."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def start_take(self, session_id, duration_s, start_at_monotonic_ns, on_ready=None):
        self.started.append((session_id, duration_s, start_at_monotonic_ns))
        self.session = session_id
        on_ready()
        self.release.wait(30)


def counting_down_booth(tmp_path, srv) -> tuple[Booth, CountingDown]:
    b = Booth(tmp_path, srv, cameras=("cam0",))
    b.captures["cam0"] = cap = CountingDown()
    client = b.clients["cam0"]
    client.runner = cap
    client.report_interval_s = 3600  # only the answers to commands report
    return b, cap


async def test_a_redelivered_start_whose_first_run_failed_is_not_run_again(tmp_path, server):
    """Same command_id twice (the network repeated it): executed once, even when that one
    failed; a retry is a new command."""

    class FailsOnce(FakeCapture):
        calls = 0

        def start_take(self, session_id, duration_s, start_at_monotonic_ns):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("camera /dev/video0 is gone")
            super().start_take(session_id, duration_s, start_at_monotonic_ns)

    b = Booth(tmp_path, server, cameras=("cam0",))
    b.captures["cam0"] = cap = FailsOnce()
    b.clients["cam0"].runner = cap
    async with b:
        first = await b.booth.start_take("s1", 5.0, command_id="c-1")
        assert first["cam0"].acked and cap.calls == 1
        again = await b.booth.start_take("s1", 5.0, command_id="c-1")
        assert again["cam0"].acked and cap.calls == 1  # not executed again
        retry = await b.booth.start_take("s1", 5.0, command_id="c-2")
        assert retry["cam0"].acked and cap.calls == 2 and cap.started


async def test_the_start_instant_reaches_the_capture_on_its_monotonic_clock(tmp_path, server):
    """start_at_ns is on the booth clock; the capture gets it minus the measured offset."""
    async with Booth(tmp_path, server, cameras=("cam0",)) as b:
        client, cap = b.clients["cam0"], b.captures["cam0"]
        await client.report_now()
        start_at = client.booth_time_ns() + 10**8
        r = await b.booth.start_take("s1", 5.0, start_at_ns=start_at)
        assert r["cam0"].acked
        ((sid, _, local),) = cap.started
        assert sid == "s1"
        assert abs(local - time.monotonic_ns()) < 5 * 10**9, (local, time.monotonic_ns())


async def test_a_stop_for_another_session_leaves_the_running_take_alone(tmp_path, server):
    async with Booth(tmp_path, server, cameras=("cam0",)) as b:
        await b.booth.start_take("s1", 5.0)
        r = await b.booth.stop_take("s0-earlier")  # a late stop of the previous take
        assert r["cam0"].acked and r["cam0"].state == "capturing" and r["cam0"].session_id == "s1"
        assert b.captures["cam0"].stopped == []


async def test_a_repeated_start_while_the_first_counts_down_is_acknowledged_quietly(
    tmp_path, server
):
    b, cap = counting_down_booth(tmp_path, server)
    async with b:
        try:
            first = await b.booth.start_take("s1", 5.0, command_id="c-1")
            assert first["cam0"].acked
            again = await b.booth.start_take("s1", 5.0, command_id="c-2")  # resent, new id
            assert again["cam0"].acked and again["cam0"].session_id == "s1"
            assert again["cam0"].error == ""  # not "cannot start s1: still capturing s1"
            assert [s for s, _, _ in cap.started] == ["s1"]
        finally:
            cap.release.set()


async def test_a_stop_for_another_session_during_a_countdown_is_a_no_op(tmp_path, server):
    b, cap = counting_down_booth(tmp_path, server)
    async with b:
        try:
            assert (await b.booth.start_take("s1", 5.0, command_id="c-1"))["cam0"].acked
            r = await b.booth.stop_take("s0-earlier", command_id="c-2")
            assert r["cam0"].acked and cap.stopped == []
            r = await b.booth.stop_take("s1", command_id="c-3")  # its own stop still works
            assert r["cam0"].acked and cap.stopped == ["s1"]
        finally:
            cap.release.set()


async def test_a_command_for_one_booth_reaches_none_of_another_booths_agents():
    registry = AgentRegistry()
    ours = registry.attach(booth_pb2.Register(booth_id=th.BOOTH, camera_id="cam0"))
    theirs = registry.attach(booth_pb2.Register(booth_id="booth-other", camera_id="cam0"))
    results = await registry.booth(th.BOOTH).start_take("s1", 5.0, timeout_s=0.05)
    assert set(results) == {"cam0"} and results["cam0"].delivered
    assert ours.queue.qsize() == 1 and theirs.queue.empty()


async def test_a_reconnect_ends_the_old_stream_and_keeps_the_agent_online(tmp_path, server):
    """The agent opens a new Connect while the server still holds its old one: the old
    one is ended, its late clean-up does not take the new one offline, commands reach it."""
    uplink = th.uplink_config(f"127.0.0.1:{server.port}", tmp_path / "spool", "cam0")
    register = booth_pb2.Register(booth_id=th.BOOTH, camera_id="cam0")
    booth = server.registry.booth(th.BOOTH)
    channel = make_channel(uplink)
    try:
        stub = booth_pb2_grpc.ControlStub(channel)
        old = stub.Connect(register, metadata=auth_metadata(uplink.token))
        async with asyncio.timeout(30):
            while booth.online() != ["cam0"]:
                await asyncio.sleep(0.01)
        new = stub.Connect(register, metadata=auth_metadata(uplink.token))
        assert await asyncio.wait_for(old.read(), 10) is grpc.aio.EOF  # superseded
        assert booth.online() == ["cam0"]
        results = await booth.start_take("s1", 5.0, command_id="c-1", timeout_s=0.05)
        assert results["cam0"].delivered
        cmd = await asyncio.wait_for(new.read(), 10)
        assert cmd.start.command_id == "c-1"
        new.cancel()
    finally:
        await channel.close()


async def test_the_stop_names_only_the_cameras_it_reached():
    """An agent that does not read its commands (queue full) was not told to stop."""
    registry = AgentRegistry()
    registry.attach(booth_pb2.Register(booth_id=th.BOOTH, camera_id="cam0"))
    booth = registry.booth(th.BOOTH)
    for i in range(COMMAND_QUEUE):
        await booth.start_take(f"s{i}", 5.0, timeout_s=0)
    told = await RegistryController(registry, 0.0, None).stop_take(th.BOOTH, "s1")
    assert told == []


async def test_the_tablets_start_is_on_the_booth_clock_after_the_countdown(tmp_path, server):
    sid = th.new_session(server.test_repo)
    async with Booth(tmp_path, server, cameras=("cam0",)) as b:
        await b.clients["cam0"].report_now()
        before = time.time()
        answers = await RegistryController(server.registry, 0.5, server.test_repo).start_take(
            th.BOOTH, sid, 5.0
        )
        ((answer),) = answers
        assert answer["acked"] and answer["session_id"] == sid and not answer["error"]
        ((started, _, local),) = b.captures["cam0"].started
        assert started == sid
        assert abs(local - time.monotonic_ns()) < 5 * 10**9
        capture_at = server.test_repo.get_session(sid)["progress"]["capture_at"]
        assert before + 0.4 < capture_at < time.time() + 1.0
