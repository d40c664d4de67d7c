"""Control, agent side: hold the Control stream, run StartTake/StopTake, report status.

The agent registers (``Connect(Register)``) and keeps that stream open; the cloud
pushes commands down it. Commands are idempotent here, because networks repeat
and delay them:

- a ``command_id`` seen before is not executed again (the agent still reports,
  so the cloud sees the command acknowledged);
- ``StartTake`` for a session this agent already captured is ignored, as is one
  that arrives after its take would have ended (``start_at_ns + duration_s``);
- ``StopTake`` when no take of that session runs is a no-op.

After each command the agent reports at once (``last_command_id`` is the ack),
and every ``report_interval_s`` otherwise. Each ``ReportAck.server_time_ns``
gives a clock sample: ``offset = server_time - (send + receive) / 2`` on the
monotonic clock, keeping the sample with the shortest round trip of the last
few, so ``booth_time_ns()`` (monotonic + offset) agrees with the cloud to about
half a round trip. ``start_at_ns`` is on that booth clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import random
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import grpc

from edge_agent.stream import PERMANENT_CODES, auth_metadata, backoff_s, make_channel
from protos import booth_pb2, booth_pb2_grpc

log = logging.getLogger(__name__)

REMEMBERED_COMMANDS = 512
REMEMBERED_SESSIONS = 256
# Failed connections in a row after which the log says WARNING: a blip is one or two.
UNREACHABLE_WARN_FAILURES = 3
CLOCK_SAMPLES = 8
CLOCK_STEP_NS = 500_000  # adopt a new offset when it moved by more than this
MAX_START_AHEAD_S = 60.0  # the longest countdown is 30 s (booth.countdown_s)
MAX_WARNINGS = 8  # a status report carries at most this many (the board keeps them all)
_STATES = {
    "idle": booth_pb2.IDLE,
    "capturing": booth_pb2.CAPTURING,
    "uploading": booth_pb2.UPLOADING,
    "error": booth_pb2.ERROR,
}


def _live_pose(live: dict[str, Any] | None) -> booth_pb2.Skeleton | None:
    """The take's newest smoothed pose (x, y as fractions of the frame) for the tablet."""
    if not live or not live.get("keypoints"):
        return None
    return booth_pb2.Skeleton(
        keypoints=[booth_pb2.Keypoint(x=x, y=y, score=s) for x, y, s in live["keypoints"]]
    )


class TakeRunner(Protocol):
    """What the control client drives: the agent's capture (edge_agent.commands.agent)."""

    def start_take(
        self, session_id: str, duration_s: float, start_at_monotonic_ns: int
    ) -> Awaitable[None] | None:
        """Begin capturing ``session_id`` at that monotonic time (0: now).

        A runner whose start also takes ``on_ready`` calls it (from any thread) once its
        camera is open and only the wait for the start instant is left; the start is
        acknowledged then, instead of after the whole countdown.
        """

    def stop_take(self, session_id: str) -> Awaitable[None] | None:
        """Stop the running take of ``session_id`` early."""

    def status(self) -> dict[str, Any]:
        """AgentStatus fields: state (idle|capturing|uploading|error), session_id, fps,
        frames_captured, capture_dropped, pose_dropped, pose_fps, error."""


class ControlClient:
    def __init__(
        self,
        uplink: Any,  # edge_agent.config.UplinkConfig
        *,
        booth_id: str,
        camera_id: str,
        runner: TakeRunner,
        capabilities: booth_pb2.Capabilities | None = None,
        software_version: str = "",
        streamer: Any = None,  # edge_agent.stream.Streamer, for the upload fields
        report_interval_s: float = 1.0,
        state_dir: str | os.PathLike[str] | None = None,
        clock: Any = None,  # edge_agent.capture.clock.BoothClock: gets the measured offset
        seed: int | None = None,
    ):
        self.cfg = uplink
        self.booth_id, self.camera_id = booth_id, camera_id
        self.runner, self.streamer = runner, streamer
        self.capabilities = capabilities or booth_pb2.Capabilities()
        self.software_version = software_version
        self.report_interval_s = report_interval_s
        self.clock = clock
        self.clock_offset_ns = 0
        self.connected = asyncio.Event()
        self.last_command_id = ""
        self.commands_run = 0
        self._note = ""  # why the last command was not run, reported once
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._state_path = Path(state_dir or uplink.spool_dir) / "control.json"
        self._sessions: list[str] = self._load_sessions()
        self._clock: deque[tuple[int, int]] = deque(maxlen=CLOCK_SAMPLES)  # (rtt, offset)
        self._rng = random.Random(seed)
        self._channel: grpc.aio.Channel | None = None
        self._tasks: list[asyncio.Task] = []
        # Starts run beside the command stream (see execute): by session, while they run.
        self._starting: dict[str, asyncio.Task] = {}

    # ---- the booth clock -------------------------------------------------------------------

    def booth_time_ns(self) -> int:
        return time.monotonic_ns() + self.clock_offset_ns

    def _clock_sample(self, sent_ns: int, received_ns: int, server_ns: int) -> None:
        rtt = received_ns - sent_ns
        offset = server_ns - (sent_ns + received_ns) // 2
        if self._clock:
            best_rtt, best = min(self._clock)
            # Each sample says the offset is within its round trip of its midpoint. A new
            # one that cannot agree with the best one means the server's clock stepped (or
            # this board's did): the older samples describe a clock that is gone. Keeping
            # them, the step was ignored until they aged out of the window.
            if abs(offset - best) > (rtt + best_rtt) // 2 + CLOCK_STEP_NS:
                log.warning(
                    "control: the booth clock stepped by %+.3f s; measuring it afresh",
                    (offset - best) / 1e9,
                )
                self._clock.clear()
        self._clock.append((rtt, offset))
        self.clock_offset_ns = min(self._clock)[1]
        # The capture stamps frames with it; small wobbles are noise, not news.
        if (
            self.clock is not None
            and abs(self.clock.offset_ns - self.clock_offset_ns) > CLOCK_STEP_NS
        ):
            self.clock.set_offset(self.clock_offset_ns)

    # ---- running ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._channel = make_channel(self.cfg)
        self._tasks = [
            asyncio.create_task(self._hold_stream(), name="control-stream"),
            asyncio.create_task(self._report_loop(), name="control-report"),
        ]

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._starting.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()

    async def _hold_stream(self) -> None:
        assert self._channel is not None
        stub = booth_pb2_grpc.ControlStub(self._channel)
        attempt = 0
        failures = 0  # in a row, for the log
        register = booth_pb2.Register(
            booth_id=self.booth_id,
            camera_id=self.camera_id,
            software_version=self.software_version,
            capabilities=self.capabilities,
        )
        while True:
            call = stub.Connect(register, metadata=auth_metadata(self.cfg.token))
            # After an outage the old samples may describe a clock that has moved since.
            self._clock.clear()
            try:
                # The stream carries nothing until a command comes; a report that goes through
                # says the server is there (and measures the clock at once).
                await self.report_now()
                self.connected.set()
                log.info("control: connected to %s", self.cfg.address)
                attempt = failures = 0
                while (cmd := await call.read()) is not grpc.aio.EOF:
                    await self.execute(cmd)
                log.info("control: the server closed the stream")
            except grpc.aio.AioRpcError as e:
                # A blip is news; a cloud out of reach for a while, or one that refuses
                # this board, is something to act on.
                failures += 1
                level = (
                    logging.WARNING
                    if e.code() in PERMANENT_CODES or failures >= UNREACHABLE_WARN_FAILURES
                    else logging.INFO
                )
                hint = ""
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    hint = (
                        " (this board's uplink.token does not match its camera's token_sha256 "
                        "in the cloud's ingest.agents)"
                    )
                log.log(
                    level,
                    "control: stream broke (%d time(s) in a row): %s %s%s",
                    failures,
                    e.code().name,
                    e.details(),
                    hint,
                )
                if e.code() in PERMANENT_CODES:
                    attempt = 30  # retrying soon cannot help; wait the longest backoff
            finally:
                self.connected.clear()
                call.cancel()
            await asyncio.sleep(
                backoff_s(attempt, self.cfg.backoff_initial_s, self.cfg.backoff_max_s, self._rng)
            )
            attempt += 1

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.report_interval_s)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.report_now()

    # ---- commands ------------------------------------------------------------------------------

    async def execute(self, cmd: booth_pb2.Command) -> None:
        """Run one command at most once, then report (which acknowledges it).

        A start runs beside the command stream: opening the camera and waiting for the
        booth's start instant take seconds, during which a Stop (or a repeat of the
        start) must still be read, acknowledged and acted on.
        """
        kind = cmd.WhichOneof("body")
        if kind not in ("start", "stop"):
            log.warning("control: ignoring an empty or unknown command")
            return
        body = getattr(cmd, kind)
        if body.command_id and body.command_id in self._seen:
            log.info("control: command %s already handled", body.command_id)
        elif kind == "start" and body.session_id in self._starting:
            log.info("control: session %s is already starting here", body.session_id)
            self._remember(body.command_id)
        else:
            self._remember(body.command_id)
            if kind == "start":
                ready = asyncio.Event()
                task = asyncio.create_task(self._run_start(body, ready), name="control-start")
                self._starting[body.session_id] = task
                task.add_done_callback(lambda _t, sid=body.session_id: self._starting.pop(sid))
                # Answered once the camera is open (or failed to open: the answer says
                # why), not after the countdown, which the task then waits out alone.
                waiter = asyncio.create_task(ready.wait())
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
            else:
                await self._guarded("stop", body, self._stop(body))
        # Only now: a report carrying the id acknowledges the command with the state it
        # left (the periodic reports carry it too, and must not answer before that).
        self.last_command_id = body.command_id
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.report_now()

    async def _run_start(self, body: booth_pb2.StartTake, ready: asyncio.Event) -> None:
        await self._guarded("start", body, self._start(body, ready))
        if ready.is_set():  # answered already (execute answers a start that ended early)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.report_now()  # capturing now (or why not)

    async def _guarded(self, kind: str, body: Any, work: Any) -> None:
        try:
            await work
        except Exception as e:  # a failed capture start is reported to staff, not fatal
            log.error("control: %s %s failed: %s", kind, body.session_id, e)
            self._note = f"{kind} take {body.session_id} failed: {e}"

    async def _start(self, start: booth_pb2.StartTake, ready: asyncio.Event) -> None:
        if start.session_id in self._sessions:
            log.info("control: session %s was already captured here; ignoring", start.session_id)
            return
        if (
            start.start_at_ns
            and start.start_at_ns + int(start.duration_s * 1e9) < self.booth_time_ns()
        ):
            log.warning(
                "control: StartTake for %s arrived after its take would end", start.session_id
            )
            self._note = f"start of {start.session_id} arrived too late"
            return
        ahead_s = (start.start_at_ns - self.booth_time_ns()) / 1e9 if start.start_at_ns else 0.0
        if ahead_s > MAX_START_AHEAD_S:
            # The tablet's countdown is seconds; this far ahead, the clocks disagree, and
            # the take would wait (holding the commands, Stop too) for that long.
            self._note = (
                f"start of {start.session_id} is {ahead_s:.0f} s ahead of this board's booth "
                "clock; not waiting for it (the clocks disagree: check the server's time)"
            )
            log.warning("control: %s", self._note)
            return
        current = self.runner.status()
        if current.get("state") == "capturing":
            self._note = (
                f"cannot start {start.session_id}: still capturing {current.get('session_id')}"
            )
            log.warning("control: %s", self._note)
            return
        start_local = start.start_at_ns - self.clock_offset_ns if start.start_at_ns else 0
        log.info("control: start take %s (%g s)", start.session_id, start.duration_s)
        args: tuple[Any, ...] = (start.session_id, start.duration_s, start_local)
        if "on_ready" in inspect.signature(self.runner.start_take).parameters:
            loop = asyncio.get_running_loop()
            await _call(self.runner.start_take, *args, lambda: loop.call_soon_threadsafe(ready.set))
        else:
            await _call(self.runner.start_take, *args)
        # Remembered once started: a failed start may be retried with a new command.
        self._sessions.append(start.session_id)
        del self._sessions[:-REMEMBERED_SESSIONS]
        self._save_sessions()
        self.commands_run += 1

    async def _stop(self, stop: booth_pb2.StopTake) -> None:
        if stop.session_id in self._starting:
            # Opening the camera or counting down (or about to): it ends before filming.
            log.info("control: stop take %s before it starts", stop.session_id)
            await _call(self.runner.stop_take, stop.session_id)
            self.commands_run += 1
            return
        current = self.runner.status()
        if current.get("state") != "capturing" or current.get("session_id") != stop.session_id:
            log.info("control: no take of %s is running; stop is a no-op", stop.session_id)
            return
        log.info("control: stop take %s", stop.session_id)
        await _call(self.runner.stop_take, stop.session_id)
        self.commands_run += 1

    def _remember(self, command_id: str) -> None:
        if command_id:
            self._seen[command_id] = None
            while len(self._seen) > REMEMBERED_COMMANDS:
                self._seen.popitem(last=False)

    # ---- status -----------------------------------------------------------------------------

    def build_status(self) -> booth_pb2.AgentStatus:
        run = dict(self.runner.status())
        up = self.streamer.status() if self.streamer is not None else {}
        state = _STATES.get(run.get("state", "idle"), booth_pb2.AGENT_STATE_UNSPECIFIED)
        if state == booth_pb2.IDLE and up.get("takes"):
            state = booth_pb2.UPLOADING
        error = run.get("error") or up.get("error") or self._note
        return booth_pb2.AgentStatus(
            booth_id=self.booth_id,
            camera_id=self.camera_id,
            state=state,
            session_id=run.get("session_id", ""),
            fps=float(run.get("fps", 0.0)),
            frames_captured=int(run.get("frames_captured", 0)),
            capture_dropped=int(run.get("capture_dropped", 0)),
            pose_dropped=int(run.get("pose_dropped", 0)),
            stream_dropped=int(up.get("stream_dropped", 0)),
            pose_fps=float(run.get("pose_fps", 0.0)),
            frames_acked=int(up.get("frames_acked", 0)),
            spool_bytes=int(up.get("spool_bytes", 0)),
            upload_behind=bool(up.get("upload_behind", False)),
            error=str(error or ""),
            clock_offset_ns=self.clock_offset_ns,
            last_command_id=self.last_command_id,
            warnings=_warnings(run, up),
            live_pose=_live_pose(run.get("live_pose")),
        )

    async def report_now(self) -> None:
        assert self._channel is not None
        stub = booth_pb2_grpc.ControlStub(self._channel)
        status = self.build_status()
        sent = time.monotonic_ns()
        ack = await stub.Report(status, metadata=auth_metadata(self.cfg.token), timeout=10)
        self._clock_sample(sent, time.monotonic_ns(), ack.server_time_ns)
        self._note = ""

    # ---- sessions already captured (survive a restart) -----------------------------------------

    def _load_sessions(self) -> list[str]:
        try:
            data = json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            log.warning(
                "control: %s unreadable (%s); starting with no captured sessions",
                self._state_path,
                e,
            )
            return []
        return [str(s) for s in data.get("sessions", [])][-REMEMBERED_SESSIONS:]

    def _save_sessions(self) -> None:
        """Best effort: the list in memory protects this run from a repeated start; the
        file only carries it over a restart. A full disk must not turn a take that is
        filming into a "start failed" note."""
        tmp = self._state_path.with_name(self._state_path.name + ".tmp")
        try:
            self._state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"sessions": self._sessions}))
            os.replace(tmp, self._state_path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.warning(
                "control: %s not saved (%s): a restart would not know the sessions started",
                self._state_path,
                e.strerror or e,
            )


def _warnings(run: dict[str, Any], up: dict[str, Any]) -> list[str]:
    """The camera's warnings, and the uplink's frames that could not be had (uploaded as lost)."""
    out = [str(w) for w in run.get("warnings") or []]
    if up.get("frames_lost") and up.get("lost_why"):
        out.append(str(up["lost_why"]))
    return out[:MAX_WARNINGS]


async def _call(fn: Any, *args: Any) -> None:
    """Await ``fn`` if it is async; else run it in a thread (opening a camera takes a while)."""
    if inspect.iscoroutinefunction(fn):
        await fn(*args)
    else:
        result = await asyncio.to_thread(fn, *args)
        if inspect.isawaitable(result):
            await result


class AgentRunner:
    """``TakeRunner`` over ``edge_agent.agent.Agent``: what the control stream drives."""

    def __init__(self, agent: Any):
        self.agent = agent

    def start_take(
        self,
        session_id: str,
        duration_s: float,
        start_at_monotonic_ns: int,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        # Every camera of the booth starts on the same booth-clock instant; the agent
        # opens its camera first and waits for that instant itself.
        self.agent.start_take(
            session_id, duration_s, start_at_monotonic_ns=start_at_monotonic_ns, on_ready=on_ready
        )

    def stop_take(self, session_id: str) -> None:
        self.agent.stop_take(wait=False, session_id=session_id)

    def status(self) -> dict[str, Any]:
        st = self.agent.status()
        take = st.get("take") or {}
        drops = st.get("drops") or {}
        state = st.get("state", "idle")
        return {
            "state": {"starting": "capturing", "finishing": "uploading"}.get(state, state),
            "session_id": st.get("starting_session") or take.get("session", "")
            if state != "idle"
            else "",
            "fps": st.get("fps", 0.0),
            "frames_captured": st.get("frames", 0),
            "capture_dropped": drops.get("capture", 0),
            "pose_dropped": drops.get("pose", 0),
            "pose_fps": st.get("pose_fps", 0.0),
            "error": st.get("error") or "",
            "warnings": list(st.get("warnings") or []),
            "live_pose": st.get("live_pose") if state == "capturing" else None,
        }
