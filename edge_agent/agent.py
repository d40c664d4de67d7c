"""The edge agent: one camera, its takes, its status.

An agent turns its config into a camera source, a pose backend factory and a
smoother, and runs takes on request:

    agent = Agent(cfg)
    agent.start()                      # probe the camera, status endpoint, status log
    take = agent.start_take("s-42", 15.0)
    summary = take.wait()              # segments, poses.npz, take.json
    agent.status()                     # fps, frames, drops per consumer, queues, pose fps

Takes land in ``capture.out_dir/<session>/<camera>/``. Several agents (one per
camera) form a booth; they stamp frames on one :class:`BoothClock`
(``time.monotonic_ns()`` plus an offset the control channel measures and sets
with ``agent.clock.set_offset``).

Seams for the transport and control stages:

- ``Agent.add_take_listener(fn)``: ``fn(take)`` runs for every new take *before*
  its first frame, so a listener can ``take.subscribe_stream()`` and see every
  frame, and ``take.add_done_callback(...)`` to send the poses and manifest.
- ``Agent.start_take / stop_take / status``: what the control channel calls.

The pose backend is built once at start-up (``check_pose``) and dropped: an agent
that cannot pose (a missing model, an EdgeTPU that does not load with
``fallback_to_cpu: false``) refuses to start with the cause, rather than
registering and capturing takes without pose. ``status()["pose_backend"]`` says
which backend runs, and a fallback from the EdgeTPU is a standing warning. Takes
still build their own backend lazily.

Otherwise bad input never stops the agent: a missing or busy camera, a rate below
the one asked, a corrupt JPEG or a full disk is logged, shown in ``status()``, and the
agent keeps running (it re-probes the camera and the disk until they are back).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from edge_agent.capture.clock import BoothClock
from edge_agent.capture.sources import CameraSource, create_source
from edge_agent.capture.take import Take, TakeSummary, check_name
from edge_agent.config import AgentConfig
from edge_agent.errors import BadInput, BoothError, DeviceError
from edge_agent.frames import Granted
from edge_agent.pose.base import PoseBackend, create_pose_backend
from edge_agent.status import StatusServer, status_line

log = logging.getLogger(__name__)

__all__ = ["Agent", "BoothClock"]

RETRY_INITIAL_S = 2.0
RETRY_MAX_S = 60.0


class Agent:
    """One camera's edge agent. Thread-safe: the control channel may call it from any thread."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        clock: BoothClock | None = None,
        source_factory: Callable[..., CameraSource] = create_source,
        pose_factory: Callable[[], PoseBackend] | None = None,
        statvfs: Callable[[str], Any] = os.statvfs,
        status_interval_s: float = 10.0,
        retry_initial_s: float = RETRY_INITIAL_S,
    ) -> None:
        check_name("camera", cfg.camera_id)
        self.cfg = cfg
        self.clock = clock or BoothClock()
        self._source_factory = source_factory
        # The zone turns on shadow gating inside the backend, so tracking lets go of a shadow.
        self._pose_factory = pose_factory or (lambda: create_pose_backend(cfg.pose, zone=cfg.zone))
        self._statvfs = statvfs
        self.status_interval_s = status_interval_s
        self.retry_initial_s = retry_initial_s
        self._lock = threading.RLock()
        self._take: Take | None = None
        self._finishing: list[Take] = []
        self._listeners: list[Callable[[Take], None]] = []
        self._error: str | None = None
        self._warnings: list[str] = []
        # More of the status, from the parts that run beside the agent (the uplink, when
        # connected): name -> a cheap, thread-safe read.
        self.status_sources: dict[str, Callable[[], Any]] = {}
        self._granted: Granted | None = None
        self._takes_done = 0
        # While a take starts (camera opening, countdown): its session, and the event that
        # stops it at once (set by Stop or close); None when no take is starting.
        self._starting_session = ""
        self._start_abort: threading.Event | None = None
        self._stopped_before_start = ""  # a Stop for a session whose start has not come in yet
        self._last_summary: TakeSummary | None = None
        self._closing = threading.Event()
        self._wake = threading.Event()
        self._loop: threading.Thread | None = None
        self._server: StatusServer | None = None
        self._device_lock = threading.Lock()  # one opener of the camera at a time
        # Set when only a restart of the process can help (a camera stuck mid-read).
        self.needs_restart = threading.Event()
        self.restart_reason: str | None = None
        self._pose_backend: str | None = None  # the backend check_pose built
        self._pose_note: str | None = None  # why it is not the one configured

    # ---- lifecycle -----------------------------------------------------------------

    def start(self, *, status_port: int | None = None) -> Agent:
        """Check pose, probe camera and disk, start the status loop and (with a port) the endpoint.

        Raises BoothError when no pose backend can be built (see ``check_pose``).
        """
        self.check_pose()
        self.probe()
        port = self.cfg.status_port if status_port is None else status_port
        if port:
            self._server = StatusServer(self.status, port).start()
        self._loop = threading.Thread(target=self._run_loop, name="agent-status", daemon=True)
        self._loop.start()
        return self

    @property
    def pose_factory(self) -> Callable[[], PoseBackend]:
        """Builds the pose backend takes use (for posing a recording after a crash, too)."""
        return self._pose_factory

    @property
    def status_port(self) -> int | None:
        return self._server.port if self._server else None

    def close(self, timeout: float = 30.0) -> None:
        """Stop the take in progress (skipping its catch-up pass) and the background threads."""
        self._closing.set()
        self._wake.set()
        with self._lock:
            if self._start_abort is not None:
                self._start_abort.set()
            takes = [t for t in (self._take, *self._finishing) if t is not None]
        for take in takes:
            take.stop(catch_up=False)
        for take in takes:
            take.wait(timeout)
        if self._server is not None:
            self._server.close()
        if self._loop is not None:
            self._loop.join(timeout)

    # ---- health ----------------------------------------------------------------------

    def check_pose(self) -> str:
        """Build the pose backend once and close it; return its name, or raise saying why not.

        A missing device, model or runtime does not come back by itself, unlike a
        camera, so it stops the start-up instead of every take running without pose.
        """
        try:
            backend = self._pose_factory()
        except BoothError as e:
            raise type(e)(f"cannot start pose backend {self.cfg.pose.type}: {e}") from None
        try:
            name = getattr(backend, "name", type(backend).__name__)
            note = getattr(backend, "fallback_reason", None)
        finally:
            backend.close()
        with self._lock:
            self._pose_backend, self._pose_note = name, note
        if note:
            log.warning("pose: %s", note)
        else:
            log.info("pose: %s backend ready", name)
        return name

    def _disk_problem(self) -> str | None:
        out_dir = self.cfg.capture.out_dir
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            st = self._statvfs(str(out_dir))
        except OSError as e:
            return f"cannot use the take directory {out_dir}: {e.strerror}"
        # Written, not just looked at: an SD card that went read-only still lists and
        # stats fine, and every take would fail while status said healthy.
        probe = out_dir / f".write-probe-{os.getpid()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"probe")
            finally:
                os.close(fd)
            probe.unlink()
        except OSError as e:
            with contextlib.suppress(OSError):
                probe.unlink()
            return f"cannot write in the take directory {out_dir}: {e.strerror}; not recording"
        free = st.f_bavail * st.f_frsize
        need = self.cfg.capture.min_free_disk_mb * 2**20
        if free < need or free == 0:
            return (
                f"disk almost full: {free / 2**20:.0f} MB free in {out_dir}, below "
                f"capture.min_free_disk_mb={self.cfg.capture.min_free_disk_mb}; not recording"
            )
        return None

    def probe(self) -> bool:
        """Check the camera and the disk now; update state and status. True if both are fine."""
        source = self._source_factory(self.cfg.source, clock=self.clock, seconds=None)
        try:
            with self._device_lock:  # a V4L2 probe opens the device: not while a take does
                granted = source.probe()
        except DeviceError as e:
            self._set_error(str(e))
            return False
        problem = self._disk_problem()
        with self._lock:
            self._granted = granted
            self._warnings = list(getattr(source, "warnings", []))
        if problem:
            self._set_error(problem)
            return False
        self._clear_error()
        return True

    def _check_stall(self) -> None:
        """Ask for a restart when the camera has been silent mid-take past the limit.

        The capture thread is blocked inside the camera's read, holding the device:
        StopTake cannot reach it and every later Start finds the agent busy. Only a
        new process frees the device; the spool makes that lose nothing uploaded.
        """
        limit = self.cfg.capture.stall_restart_s
        take = self._take
        if not limit or take is None or self.needs_restart.is_set():
            return
        silent = take.silent_s()
        if silent < limit:
            return
        self.restart_reason = (
            f"camera silent for {silent:.0f} s mid-take (capture.stall_restart_s = {limit:g}); "
            "restarting the agent to free the device"
        )
        self._set_error(self.restart_reason)
        self.needs_restart.set()

    def _set_error(self, message: str) -> None:
        with self._lock:
            changed = message != self._error
            self._error = message
        if changed:
            log.error("%s (the agent keeps running and retries)", message)

    def _clear_error(self) -> None:
        with self._lock:
            previous, self._error = self._error, None
        if previous:
            log.info("recovered: %s is no longer the case", previous)

    # ---- takes -------------------------------------------------------------------------

    def add_take_listener(self, fn: Callable[[Take], None]) -> None:
        """``fn(take)`` for every new take, called before the take's first frame."""
        self._listeners.append(fn)

    def start_take(
        self,
        session_id: str,
        duration_s: float | None = None,
        *,
        start_at_monotonic_ns: int = 0,
        on_ready: Callable[[], None] | None = None,
    ) -> Take:
        """Start capturing a take; returns once frames flow. Raises DeviceError or BadInput.

        Opening the camera (or pre-rendering a synthetic one) happens outside the
        agent's lock, so ``status()`` keeps answering meanwhile. With
        ``start_at_monotonic_ns`` (the booth's shared start instant on this board's
        clock) capture begins then: the camera is opened and the pose model loaded
        *before* the wait, so every board's first frame is at that instant, not at
        that instant plus its own start-up time. ``on_ready`` is called then, when the
        camera is open and only that wait is left (a Stop meanwhile ends the take at
        once).
        """
        with self._lock:
            current = self._take
            starting = self._start_abort is not None
            if starting or (current is not None and current.state in ("ready", "capturing")):
                busy = "a take that is starting" if starting else (f"session {current.session_id}")
                raise BadInput(
                    f"camera {self.cfg.camera_id} is already capturing {busy}; stop it first"
                )
            problem = self._disk_problem()
            if problem:
                self._set_error(problem)
                raise DeviceError(problem)
            self._starting_session = session_id
            abort = self._start_abort = threading.Event()
            if self._closing.is_set() or session_id == self._stopped_before_start:
                abort.set()
        try:
            source = self._source_factory(self.cfg.source, clock=self.clock, seconds=duration_s)
            take = Take(
                session_id=session_id,
                camera_id=self.cfg.camera_id,
                source=source,
                capture=self.cfg.capture,
                clock=self.clock,
                pose_factory=self._pose_factory,
                smoothing=self.cfg.smoothing,
                duration_s=duration_s,
                statvfs=self._statvfs,
                booth_id=self.cfg.booth_id,
            )
            try:
                with self._device_lock:  # a re-probe holding the device would make it busy
                    granted = take.prepare()
            except DeviceError as e:
                self._set_error(str(e))
                raise
            with self._lock:
                self._granted = granted
                self._warnings = list(getattr(source, "warnings", []))
            self._clear_error()
            for fn in self._listeners:
                try:
                    fn(take)
                except Exception:  # a consumer's bug must not stop the camera
                    log.exception("take listener %r failed; capturing anyway", fn)
            take.add_done_callback(self._on_take_done)
            with self._lock:
                if current is not None and not current.finished:
                    self._finishing.append(current)
                self._take = take
            if on_ready is not None:
                on_ready()
            wait_s = (start_at_monotonic_ns - time.monotonic_ns()) / 1e9
            if abort.is_set() or (start_at_monotonic_ns and wait_s > 0 and abort.wait(wait_s)):
                # Stopped during the countdown (or the agent is shutting down): the take
                # ends at once, with the one frame of that instant.
                log.info("take %s stopped during its countdown", session_id)
                take.stop(catch_up=False)
            take.start()
        finally:
            with self._lock:
                self._starting_session = ""
                self._start_abort = None
        self._wake.set()
        return take

    def stop_take(
        self, *, wait: bool = True, timeout: float | None = None, session_id: str = ""
    ) -> TakeSummary | None:
        """Stop the capturing take. With ``wait``, return its summary once it is finished.

        ``session_id``: the take to stop, even if its start is still on its way here (a
        Stop right behind its Start): that take then ends as soon as it starts.
        """
        with self._lock:
            take = self._take
            if session_id:
                self._stopped_before_start = session_id
            if self._start_abort is not None:
                # Still opening the camera or counting down: that take ends as it starts.
                self._start_abort.set()
                return None
        if take is None:
            return None
        take.stop()
        return take.wait(timeout) if wait else None

    @property
    def current_take(self) -> Take | None:
        return self._take

    def _on_take_done(self, summary: TakeSummary) -> None:
        with self._lock:
            self._takes_done += 1
            self._last_summary = summary
            self._finishing = [
                t for t in self._finishing if not t.finished and t.summary is not summary
            ]
        if summary.errors:
            # A full disk or a camera that died mid-take stays visible until a probe or a
            # new take shows it is fixed.
            self._set_error(summary.errors[-1])

    # ---- status ------------------------------------------------------------------------

    @property
    def state(self) -> str:
        with self._lock:
            take = self._take
            if self._start_abort is not None:
                return "starting"
            if take is not None and take.state in ("ready", "capturing"):
                return "capturing"
            if take is not None and take.state == "finishing":
                return "finishing"
            return "error" if self._error else "idle"

    def status(self) -> dict[str, Any]:
        """Everything staff and ops need at a glance. JSON-able; safe from any thread."""
        with self._lock:
            take = self._take
            error = self._error
            warnings = list(self._warnings)
            granted = self._granted
            last = self._last_summary
            pose_backend, pose_note = self._pose_backend, self._pose_note
            finishing = [t.session_id for t in self._finishing if not t.finished]
            starting = self._starting_session
        state = self.state
        if pose_note:
            warnings.insert(0, pose_note)
        take_status = take.status() if take is not None else None
        if take_status:
            if take_status["errors"] and state in ("capturing", "finishing"):
                error = take_status["errors"][-1]
            warnings += [w for w in take_status["warnings"] if w not in warnings]
        rec = (take_status or {}).get("recording") or {}
        pose = (take_status or {}).get("pose") or {}
        streams = (take_status or {}).get("stream") or []
        return {
            "booth": self.cfg.booth_id,
            "camera": self.cfg.camera_id,
            "state": state,
            "error": error,
            "warnings": warnings,
            "source": {
                "type": self.cfg.source.type,
                "asked_fps": getattr(self.cfg.source, "fps", None),
                "granted": asdict(granted) if granted else None,
            },
            "pose_backend": pose_backend,
            "clock_offset_ns": self.clock.offset_ns,
            # Rates are now's: an idle camera delivers 0 fps, whatever the last take did
            # (its numbers are in last_take).
            "fps": (take_status or {}).get("fps", 0.0) if state == "capturing" else 0.0,
            "frames": (take_status or {}).get("frames", 0),
            "pose_fps": pose.get("fps", 0.0) if state == "capturing" else 0.0,
            "live_pose": pose.get("live"),
            "drops": {
                "capture": (take_status or {}).get("capture_dropped", 0),
                "segment": (rec.get("queue") or {}).get("dropped", 0),
                "stream": [s["dropped"] for s in streams],
                "pose": pose.get("dropped", 0),
            },
            "queues": {
                "segment": (rec.get("queue") or {}).get("depth", 0),
                "stream": [s["depth"] for s in streams],
            },
            "take": take_status,
            # While starting, "take" may still be the previous one: this is the new one's.
            "starting_session": starting,
            "takes_done": self._takes_done,
            "finishing": finishing,
            "last_take": {
                "session": last.session_id,
                "frames": last.frames,
                "frames_written": last.frames_written,
                "coverage": last.pose.get("coverage"),
                "errors": last.errors,
            }
            if last
            else None,
            **{name: read() for name, read in list(self.status_sources.items())},
        }

    # ---- the background loop ---------------------------------------------------------------

    def _run_loop(self) -> None:
        """Log status periodically; while in error and idle, re-probe with backoff."""
        retry_s = self.retry_initial_s
        now = time.monotonic()
        next_log = now + self.status_interval_s
        next_probe = now + retry_s
        while not self._closing.is_set():
            self._wake.wait(max(0.05, min(next_log, next_probe) - time.monotonic()))
            self._wake.clear()
            if self._closing.is_set():
                break
            now = time.monotonic()
            if now >= next_log:
                log.info("status: %s", status_line(self.status()))
                next_log = now + self.status_interval_s
            self._check_stall()
            if self.state != "error":
                retry_s = self.retry_initial_s
                next_probe = now + retry_s
            elif now >= next_probe:
                try:
                    ok = self.probe()
                except BoothError as e:  # a probe must never end the loop
                    self._set_error(str(e))
                    ok = False
                retry_s = self.retry_initial_s if ok else min(retry_s * 2, RETRY_MAX_S)
                next_probe = now + retry_s
