"""One take: a camera's frames for one session, recorded, streamed and posed.

The hot path (``Take._capture``) does three non-blocking things per frame and
nothing else — no decoding, no logging, no allocation beyond the frame itself:

1. offer it to the segment writer's bounded queue (MJPEG-in-MP4, see segments.py);
2. offer it to every stream subscription's bounded buffer (the uplink);
3. put it into the pose worker's latest-frame slot ("latest wins").

Each consumer has its own drop counter. The capture loop never waits on any of
them, so the capture-drop counter only counts frames the *device* skipped.

When the frames end (duration reached, ``stop()``, or the source ran out) the
take finishes on the same thread, off the hot path: segments are finalized, the
catch-up pass poses every frame the live worker skipped, the offline smoother
runs over the whole take, and ``poses.npz``, ``frames.csv`` and the
``take.json`` manifest are written next to the segments.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np

from edge_agent.capture.buffers import BoundedBuffer, LatestSlot
from edge_agent.capture.clock import BoothClock
from edge_agent.capture.pose_worker import (
    CATCH_UP,
    LIVE,
    CatchUpResult,
    PoseStore,
    PoseWorker,
    catch_up,
    lower_thread_priority,
    pose_frames,
)
from edge_agent.capture.segments import SegmentRecorder
from edge_agent.capture.sources import CameraSource
from edge_agent.config import CaptureConfig, SmoothingConfig
from edge_agent.errors import BadInput, DeviceError
from edge_agent.frames import CapturedFrame, Granted
from edge_agent.pose.base import PoseBackend
from edge_agent.smoothing import CausalSmoother

log = logging.getLogger(__name__)

MANIFEST = "take.json"
POSES = "poses.npz"
TIMESTAMPS = "frames.csv"
POSE_LOAD_WAIT_S = 60.0  # longest prepare() waits for the pose model before capturing anyway
# A capturing camera that has sent nothing for this long (or ten frame periods, if
# longer) is reported as stalled: a loose USB cable often leaves the device open and
# silent rather than closed, so no error ever reaches the capture loop.
STALL_AFTER_S = 1.0
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(kind: str, value: str) -> str:
    """Session and camera ids become directory names: refuse anything that is not a plain name."""
    if not _SAFE_NAME.match(value or ""):
        raise BadInput(
            f"{kind} id {value!r} must be 1-128 letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit"
        )
    return value


@dataclass
class TakeSummary:
    """What a finished take produced: the manifest's contents."""

    session_id: str
    camera_id: str
    booth_id: str
    directory: str
    state: str
    granted: dict[str, Any]
    frames: int
    frames_written: int
    capture_dropped: int
    fps_captured: float
    duration_s: float
    segments: list[dict[str, Any]]
    counters: dict[str, Any]
    pose: dict[str, Any]
    first_ts_ns: int | None
    last_ts_ns: int | None
    clock_offset_ns: int
    timestamps: str = TIMESTAMPS
    poses: str | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.state == "done" and not self.errors

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Take:
    """Capture one camera for one session. Build it, ``start()``, then ``wait()``.

    The uplink seam: call :meth:`subscribe_stream` (before ``start()`` to see
    every frame) to get a bounded buffer of :class:`CapturedFrame` that ends with
    ``None`` when the take ends. Frames it had to drop are still in the segments
    (see ``segments.read_segment_frames``).
    """

    def __init__(
        self,
        *,
        session_id: str,
        camera_id: str,
        source: CameraSource,
        capture: CaptureConfig,
        clock: BoothClock,
        pose_factory: Callable[[], PoseBackend] | None = None,
        smoothing: SmoothingConfig | None = None,
        duration_s: float | None = None,
        statvfs: Callable[[str], Any] = os.statvfs,
        booth_id: str = "",
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.session_id = check_name("session", session_id)
        self.camera_id = check_name("camera", camera_id)
        if duration_s is not None and duration_s <= 0:
            raise BadInput(f"take duration must be positive, got {duration_s} s")
        self.booth_id = booth_id
        self.source = source
        self.capture_cfg = capture
        self.smoothing_cfg = smoothing
        self.clock = clock
        self.duration_s = duration_s
        self.directory = Path(capture.out_dir) / self.session_id / self.camera_id
        self._pose_factory = pose_factory
        self._statvfs = statvfs
        self._monotonic_ns = monotonic_ns

        self.state = "created"  # created | ready | capturing | finishing | done | failed
        self.granted: Granted | None = None
        self.frames = 0
        self.first_ts_ns: int | None = None
        self.last_ts_ns: int | None = None
        # Local arrival time of the newest frame (or of the start), for stall detection.
        self.last_arrival_ns: int | None = None
        self.capture_error: str | None = None
        self.capture_warning: str | None = None  # degraded, not failed (a short file)
        self.errors: list[str] = []
        self.summary: TakeSummary | None = None
        self.recorder: SegmentRecorder | None = None
        self.slot: LatestSlot[CapturedFrame] = LatestSlot()
        self.store = PoseStore()
        self.worker: PoseWorker | None = None
        self.catch_up_result: CatchUpResult | None = None
        # The take's poses (what poses.npz holds), kept in memory once computed: the
        # uplink spools them from here, so a disk that refuses poses.npz loses nothing.
        self.pose_arrays: dict[str, np.ndarray] | None = None
        self._poses_file: str | None = None
        self._streams: tuple[BoundedBuffer[CapturedFrame], ...] = ()
        self._stop = threading.Event()
        self._skip_catch_up = threading.Event()
        self._done = threading.Event()
        # None once the callbacks have been run (then new ones run at once).
        self._callbacks: list[Callable[[TakeSummary], None]] | None = []
        self._callback_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name=f"capture-{self.camera_id}", daemon=True
        )

    # ---- the seams for other stages ---------------------------------------------------

    def subscribe_stream(self, maxlen: int | None = None) -> BoundedBuffer[CapturedFrame]:
        """A bounded buffer that receives every captured frame from now on (drop-newest)."""
        buf: BoundedBuffer[CapturedFrame] = BoundedBuffer(
            maxlen or self.capture_cfg.stream_buffer_frames, f"stream-{len(self._streams)}"
        )
        if self.state in ("finishing", "done", "failed"):
            buf.close()
        # Replacing the tuple is atomic, so the capture loop never sees a half-built list.
        self._streams = (*self._streams, buf)
        return buf

    def add_done_callback(self, fn: Callable[[TakeSummary], None]) -> None:
        """Call ``fn(summary)`` once the take is finished (immediately if it already is)."""
        with self._callback_lock:
            if self._callbacks is not None:
                self._callbacks.append(fn)
                return
        fn(self.summary)

    # ---- lifecycle -------------------------------------------------------------------

    def prepare(self) -> Granted:
        """Open the camera (pre-render a synthetic one), load the pose model, set up consumers.

        Raises DeviceError (camera missing, busy, wrong format) or BadInput (the
        take's directory already holds a take).
        """
        if self.state != "created":
            raise RuntimeError(f"take already {self.state}")
        if self.directory.exists() and any(self.directory.iterdir()):
            raise BadInput(
                f"{self.directory} already holds a take; use a new session id or remove it"
            )
        self.granted = self.source.open()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.source.close()
            raise DeviceError(f"cannot create {self.directory}: {e.strerror}") from None
        g = self.granted
        self.recorder = SegmentRecorder(
            self.directory,
            width=g.width,
            height=g.height,
            fps=g.fps,
            segment_s=self.capture_cfg.segment_s,
            min_free_disk_mb=self.capture_cfg.min_free_disk_mb,
            metadata={"session": self.session_id, "camera": self.camera_id},
            statvfs=self._statvfs,
        )
        if self._pose_factory is not None:
            self.worker = PoseWorker(
                self.slot,
                self._pose_factory,
                self.store,
                name=f"pose-{self.camera_id}",
                smoother=CausalSmoother(self.smoothing_cfg, g.fps or 30.0),
            )
            # Load the model now: building an interpreter holds the GIL for a while,
            # which would stall the first frames if it overlapped capture.
            self.worker.start()
            if not self.worker.wait_ready(POSE_LOAD_WAIT_S):
                log.warning(
                    "take %s/%s: pose backend still loading after %g s; capture starts anyway",
                    self.session_id,
                    self.camera_id,
                    POSE_LOAD_WAIT_S,
                )
        self.state = "ready"
        return g

    def start(self) -> None:
        if self.state == "created":
            self.prepare()
        if self.state != "ready":
            raise RuntimeError(f"take already {self.state}")
        assert self.recorder is not None
        self.recorder.start()
        self.last_arrival_ns = self._monotonic_ns()
        self.state = "capturing"
        self.clock.hold()
        self._thread.start()
        log.info(
            "take %s/%s started: %s, %dx%d at %g fps%s",
            self.session_id,
            self.camera_id,
            self.source.name,
            self.granted.width,
            self.granted.height,
            self.granted.fps,
            f", {self.duration_s:g} s" if self.duration_s else "",
        )

    def stop(self, *, catch_up: bool = True) -> None:
        """End capture at the next frame. ``catch_up=False`` also skips the catch-up pose pass."""
        if not catch_up:
            self._skip_catch_up.set()
        self._stop.set()

    def wait(self, timeout: float | None = None) -> TakeSummary | None:
        """The summary once the take is finished (segments, poses, manifest); None on timeout."""
        self._done.wait(timeout)
        return self.summary

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    # ---- the capture thread -----------------------------------------------------------

    def _run(self) -> None:
        try:
            self._capture()
        finally:
            self.clock.release()  # held by start(): the take's timestamps are on one offset
            self._finish()

    def _capture(self) -> None:
        """The hot path. Keep it lean: see the module docstring."""
        assert self.recorder is not None and self.granted is not None
        frames = self.source.frames()
        offer_segment = self.recorder.queue.offer
        put_pose = self.slot.put
        arrival_ns = self._monotonic_ns
        stop = self._stop
        fps = self.granted.fps or 30.0
        max_frames = round(self.duration_s * fps) if self.duration_s else None
        # A camera that delivers fewer frames than it granted still ends on time.
        late_ns = int(self.duration_s * 1e9 + 2e9 / fps) if self.duration_s else None
        end_ns: int | None = None
        n = 0
        try:
            for frame in frames:
                if n == 0:
                    self.first_ts_ns = frame.capture_ts_ns
                    if late_ns is not None:
                        end_ns = frame.capture_ts_ns + late_ns
                elif (
                    stop.is_set()
                    or n == max_frames
                    or (end_ns is not None and frame.capture_ts_ns >= end_ns)
                ):
                    break
                if frame.seq != n:  # sources number from 0; renumber if one does not
                    frame = CapturedFrame(n, frame.capture_ts_ns, frame.jpeg)
                offer_segment(frame)
                for buf in self._streams:
                    buf.offer(frame)
                put_pose(frame)
                n += 1
                self.frames = n
                self.last_ts_ns = frame.capture_ts_ns
                self.last_arrival_ns = arrival_ns()
            else:
                # The source ran out by itself: a video file shorter than the take, a
                # stream that ended. A short take must not pass for a whole one.
                # (A take without a duration lasts as long as its source.)
                # Frames the device lost (counted there) were offered all the same.
                got = n + self.source.lost_frames
                if not stop.is_set() and max_frames is not None and got < max_frames:
                    short = f"camera {self.source.name} ended after {n} of {max_frames} frames"
                    if getattr(self.source, "ends_by_itself", False):
                        # A video file: it ends where it ends; the take is what it holds.
                        self.capture_warning = f"{short}: the file is shorter than the take"
                        log.warning("take %s/%s: %s", self.session_id, self.camera_id, short)
                    else:
                        self.capture_error = f"{short}, before the take did (the stream stopped)"
                        log.error(
                            "take %s/%s: %s", self.session_id, self.camera_id, self.capture_error
                        )
        except (OSError, av.FFmpegError, DeviceError) as e:  # unplugged, USB error, ...
            self.capture_error = f"camera {self.source.name} failed after {n} frames: {e}"
            log.error("take %s/%s: %s", self.session_id, self.camera_id, self.capture_error)
        except Exception as e:  # a source bug: keep what was captured, say what happened
            self.capture_error = f"camera {self.source.name} failed after {n} frames: {e!r}"
            log.exception("take %s/%s: capture failed", self.session_id, self.camera_id)
        finally:
            close = getattr(frames, "close", None)
            if close is not None:
                close()
            self.source.close()

    def _finish(self) -> None:
        self.state = "finishing"
        # Catch-up pose and smoothing may overlap the next take's capture: yield to it.
        lower_thread_priority()
        self.slot.close()
        for buf in self._streams:
            buf.close()
        assert self.recorder is not None
        self.recorder.close()
        self.recorder.wait()
        backend = None
        if self.worker is not None:
            self.worker.join()
            backend = self.worker.backend
        try:
            if backend is not None and not self._skip_catch_up.is_set():
                self.catch_up_result = catch_up(
                    self.recorder.finished_segments(),
                    self.store,
                    backend,
                    stop=self._skip_catch_up,
                    name=f"catch-up-{self.camera_id}",
                )
            self.summary = self._write_outputs()
            self.state = "done"
        except OSError as e:
            self._fail(f"cannot write the take's pose and manifest files: {e.strerror or e}")
        except Exception as e:  # a bug after capture must still leave a summary and status
            log.exception("take %s/%s: post-processing failed", self.session_id, self.camera_id)
            self._fail(f"post-processing failed: {e}")
        finally:
            if backend is not None:
                backend.close()
        log.info(
            "take %s/%s finished: %d frames, %d written, pose coverage %.3f%s",
            self.session_id,
            self.camera_id,
            self.summary.frames,
            self.summary.frames_written,
            self.summary.pose.get("coverage", 0.0),
            f"; errors: {'; '.join(self.summary.errors)}" if self.summary.errors else "",
        )
        # Callbacks run before wait() returns, so whoever waits sees their effects.
        with self._callback_lock:
            callbacks, self._callbacks = self._callbacks, None
        for fn in callbacks:
            try:
                fn(self.summary)
            except Exception:  # a consumer's bug must not hide the take's result
                log.exception("take %s/%s: a done callback failed", self.session_id, self.camera_id)
        self._done.set()

    def _fail(self, message: str) -> None:
        self.errors.append(message)
        log.error("take %s/%s: %s", self.session_id, self.camera_id, message)
        self.state = "failed"
        # What was computed and written before the failure still counts (a full disk
        # after poses.npz leaves the poses there, and in memory either way).
        self.summary = self._summary(self.pose_arrays, self._poses_file)
        with contextlib.suppress(OSError):
            for tmp in self.directory.glob("*.tmp*"):  # half-written outputs
                tmp.unlink()

    # ---- outputs ---------------------------------------------------------------------

    def _timestamps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per frame: capture timestamp, segment index (-1: not recorded), size, corrupt flag."""
        n = self.frames
        fps = (self.granted.fps if self.granted else 0) or 30.0
        ts = np.zeros(n, dtype=np.int64)
        if n and self.first_ts_ns is not None:
            ts[:] = self.first_ts_ns + (np.arange(n) * (1e9 / fps)).astype(np.int64)
        segment = np.full(n, -1, dtype=np.int32)
        size = np.full(n, -1, dtype=np.int64)
        corrupt = np.zeros(n, dtype=bool)
        for rec in self.recorder.records if self.recorder else ():
            if rec.seq < n:
                ts[rec.seq] = rec.capture_ts_ns
                segment[rec.seq] = rec.segment
                size[rec.seq] = rec.size_bytes
                corrupt[rec.seq] = rec.corrupt
        return ts, segment, size, corrupt

    def _write_outputs(self) -> TakeSummary:
        """poses.npz, frames.csv, then take.json, each fsynced before its rename: after a
        power cut a file is whole or absent (an empty frames.csv would have made every
        frame the spool lacked look unrecorded). The poses first: the cloud needs them."""
        ts, segment, size, corrupt = self._timestamps()
        poses = self._smoothed_poses(ts)
        self.pose_arrays = poses
        if poses is not None:
            self._poses_file = write_poses(self.directory, poses)

        def write_csv(f: Any) -> None:
            w = csv.writer(f)
            w.writerow(["seq", "capture_ts_ns", "segment", "bytes", "corrupt"])
            for i in range(self.frames):
                w.writerow([i, int(ts[i]), int(segment[i]), int(size[i]), int(corrupt[i])])

        _write_durably(self.directory / TIMESTAMPS, write_csv, text=True)
        summary = self._summary(poses, self._poses_file)
        manifest = json.dumps(summary.to_dict(), indent=2) + "\n"
        _write_durably(self.directory / MANIFEST, lambda f: f.write(manifest), text=True)
        return summary

    def _smoothed_poses(self, ts: np.ndarray) -> dict[str, np.ndarray] | None:
        if self.worker is None or self.worker.backend is None:
            return None
        fps = (self.granted.fps if self.granted else 0) or 30.0
        return smoothed_poses(self.store, ts, fps, self.smoothing_cfg)

    def _summary(self, poses: dict[str, np.ndarray] | None, poses_file: str | None) -> TakeSummary:
        rec = self.recorder
        n = self.frames
        errors, warnings = self._problems()
        cu = self.catch_up_result
        if cu is not None and cu.error:
            warnings.append(cu.error)
        span_s = (
            (self.last_ts_ns - self.first_ts_ns) / 1e9
            if self.first_ts_ns is not None and self.last_ts_ns is not None
            else 0.0
        )
        source_flags = poses["source"] if poses else np.zeros(0, dtype=np.uint8)
        with_pose = int(np.count_nonzero(source_flags))
        pose = {
            "backend": self.worker.backend_name if self.worker else None,
            "live": int(np.count_nonzero(source_flags == LIVE)),
            "catch_up": int(np.count_nonzero(source_flags == CATCH_UP)),
            "live_dropped": self.slot.replaced,
            "live_fps": round(self.worker.fps, 2) if self.worker else 0.0,
            "catch_up_s": round(cu.seconds, 3) if cu else None,
            "corrupt": len(self._undecodable()),  # frames, each counted once
            "errors": (self.worker.counters.errors if self.worker else 0)
            + (cu.errors if cu else 0),
            "coverage": round(with_pose / n, 6) if n else 0.0,
            "detected": int(poses["detected"].sum()) if poses else 0,
            "glitch_frames": int(poses["glitch"].sum()) if poses and "glitch" in poses else 0,
            "smoothing": "offline" if poses else None,
        }
        g = self.granted
        return TakeSummary(
            session_id=self.session_id,
            camera_id=self.camera_id,
            booth_id=self.booth_id,
            directory=str(self.directory),
            state=self.state if self.state in ("done", "failed") else "done",
            granted=asdict(g) if g else {},
            frames=n,
            frames_written=rec.frames_written if rec else 0,
            capture_dropped=self.source.lost_frames,
            fps_captured=round((n - 1) / span_s, 3) if n > 1 and span_s > 0 else 0.0,
            duration_s=round(n / g.fps, 3) if g and g.fps else 0.0,
            segments=[s.to_dict() for s in rec.finished_segments()] if rec else [],
            counters=self._counters(),
            pose=pose,
            first_ts_ns=self.first_ts_ns,
            last_ts_ns=self.last_ts_ns,
            clock_offset_ns=self.clock.offset_ns,
            poses=poses_file,
            errors=errors,
            warnings=warnings,
        )

    def _counters(self) -> dict[str, Any]:
        rec = self.recorder
        return {
            "capture_dropped": self.source.lost_frames,
            "segment_dropped": rec.queue.dropped if rec else 0,
            "not_recorded": rec.frames_not_recorded if rec else 0,
            "stream_dropped": [b.dropped for b in self._streams],
            "pose_dropped": self.slot.replaced,
            "corrupt_frames": rec.corrupt_frames if rec else 0,
        }

    # ---- status ----------------------------------------------------------------------

    def silent_s(self) -> float:
        """Seconds since the camera's last frame while capturing (0 otherwise)."""
        since = self.last_arrival_ns
        if self.state != "capturing" or since is None:
            return 0.0
        return (self._monotonic_ns() - since) / 1e9

    def stalled(self) -> str | None:
        """Why the camera looks stalled while capturing, or None.

        The capture loop cannot notice this itself (it is blocked waiting for the
        frame that does not come), so the status poller does. The take then ends
        when the camera comes back or is unplugged; the cloud fails the session
        if it never does (``booth.upload_deadline_s``).
        """
        silent_s = self.silent_s()
        fps = self.granted.fps if self.granted and self.granted.fps else 30.0
        if silent_s < max(STALL_AFTER_S, 10.0 / fps):
            return None
        return (
            f"camera {self.source.name} stalled: no frame for {silent_s:.1f} s after "
            f"{self.frames} frames (check the cable and the USB port)"
        )

    def _live_pose(self) -> dict[str, Any] | None:
        """The newest live pose, causally smoothed, with x and y as fractions of the frame."""
        live = self.worker.live if self.worker is not None else None
        g = self.granted
        if live is None or g is None or not g.width or not g.height:
            return None
        seq, skel = live
        pts = skel.astype(np.float64) / (g.width, g.height, 1.0)
        return {"seq": seq, "keypoints": np.round(pts, 4).tolist()}

    def _undecodable(self) -> set[int]:
        """Frames whose JPEG would not decode, by the live pass or the catch-up."""
        seqs = set(self.worker.counters.corrupt_seqs) if self.worker is not None else set()
        if self.catch_up_result is not None:
            seqs |= self.catch_up_result.corrupt_seqs
        return seqs

    def _problems(self) -> tuple[list[str], list[str]]:
        """(errors, warnings) so far: what stopped recording, and what degraded it."""
        errors = list(self.errors)
        if self.capture_error:
            errors.append(self.capture_error)
        if self.recorder is not None and self.recorder.error:
            errors.append(self.recorder.error)
        if stalled := self.stalled():
            errors.append(stalled)
        warnings = list(getattr(self.source, "warnings", []))
        if self.capture_warning:
            warnings.append(self.capture_warning)
        if self.worker is not None and self.worker.error:
            warnings.append(self.worker.error)
        # The backend this take got may be a fallback (a Coral unplugged since start-up).
        if note := getattr(getattr(self.worker, "backend", None), "fallback_reason", None):
            warnings.append(f"pose: {note}")
        if self.recorder is not None and self.recorder.corrupt_frames:
            rec = self.recorder
            warnings.append(
                f"{rec.corrupt_frames} corrupt JPEG{'s' if rec.corrupt_frames > 1 else ''} from "
                f"the camera (first at frame {rec.first_corrupt_seq}); they are uploaded as "
                "lost frames (check the cable and the USB port)"
            )
        flagged = self.recorder.corrupt_seqs if self.recorder is not None else set()
        if bad := self._undecodable() - flagged:
            # Whole to the eye of the recorder (start and end markers in place) but damaged
            # inside: recorded and uploaded as they came, with no pose.
            warnings.append(
                f"{len(bad)} JPEG{'s' if len(bad) > 1 else ''} from the camera would not decode "
                f"(first at frame {min(bad)}); they have no pose (check the cable and the USB "
                "port)"
            )
        return errors, warnings

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot, cheap enough to call every second from another thread."""
        rec = self.recorder
        first, last, n = self.first_ts_ns, self.last_ts_ns, self.frames
        span_s = (last - first) / 1e9 if first is not None and last is not None else 0.0
        worker = self.worker
        errors, warnings = self._problems()
        return {
            "session": self.session_id,
            "camera": self.camera_id,
            "state": self.state,
            "granted": asdict(self.granted) if self.granted else None,
            "frames": n,
            "fps": round((n - 1) / span_s, 2) if n > 1 and span_s > 0 else 0.0,
            "capture_dropped": self.source.lost_frames,
            "recording": rec.stats() if rec else None,
            "stream": [b.stats() for b in self._streams],
            "pose": {
                "backend": worker.backend_name if worker else None,
                "posed": len(self.store),
                "dropped": self.slot.replaced,
                "fps": round(worker.fps, 2) if worker else 0.0,
                "coverage": round(len(self.store) / n, 4) if n else 0.0,
                "corrupt": worker.counters.corrupt if worker else 0,
                "errors": worker.counters.errors if worker else 0,
                "live": self._live_pose(),
            },
            "errors": errors,
            "warnings": warnings,
        }


# ---- a take's poses file ---------------------------------------------------------------


def smoothed_poses(
    store: PoseStore, ts: np.ndarray, fps: float, smoothing: SmoothingConfig
) -> dict[str, np.ndarray]:
    """What ``poses.npz`` holds for frames ``0..len(ts)-1``: raw, smoothed, flags."""
    n = len(ts)
    arrays = store.arrays(n)
    out = {"seq": np.arange(n, dtype=np.int64), "capture_ts_ns": ts, **arrays}
    if n == 0:
        out["skeleton"] = arrays["raw"].copy()
        out["imputed"] = np.zeros((0, arrays["raw"].shape[1]), dtype=bool)
        out["glitch"] = np.zeros(0, dtype=bool)
        return out
    # Imported here: the smoother is only needed once per take, after capture.
    from edge_agent.smoothing import smooth_offline

    smoothed = smooth_offline(arrays["raw"], fps, smoothing, ts_ns=ts)
    out["skeleton"] = smoothed.skeletons
    out["imputed"] = smoothed.imputed
    out["glitch"] = smoothed.glitch
    return out


def _write_durably(path: Path, write: Callable[[Any], Any], *, text: bool = False) -> None:
    """Write ``path`` through ``write(file)``: to a temporary name, fsynced, renamed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w" if text else "wb", **({"newline": ""} if text else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_poses(directory: Path, poses: dict[str, np.ndarray]) -> str:
    """Write ``poses.npz`` atomically and durably; returns its name."""
    _write_durably(directory / POSES, lambda f: np.savez_compressed(f, **poses))
    return POSES


def recover_poses(
    directory: Path,
    frames: Iterable[CapturedFrame],
    pose_factory: Callable[[], PoseBackend],
    smoothing: SmoothingConfig,
) -> bool:
    """Pose a recording whose agent died before the take wrote ``poses.npz``; True if written.

    The same pass the take would have run (every recorded frame through the pose
    backend, then the offline smoother), on a thread that yields the CPU to a take
    capturing meanwhile. Frames the recording lacks get no pose. The rate comes from
    the frames' own timestamps.
    """
    result: list[bool] = []

    def run() -> None:
        lower_thread_priority()  # and the pose threads it starts
        store, stamps = PoseStore(), {}

        def seen() -> Iterator[tuple[int, bytes]]:
            for frame in frames:
                stamps[frame.seq] = frame.capture_ts_ns
                yield frame.seq, frame.jpeg

        backend = pose_factory()
        try:
            posed = pose_frames(seen(), store, backend, name=f"recover-poses-{directory.name}")
        finally:
            backend.close()
        if not stamps:
            result.append(False)
            return
        seqs = np.fromiter(stamps, dtype=np.int64)
        known = np.fromiter(stamps.values(), dtype=np.int64)
        step = float(np.median(np.diff(known))) if len(known) > 1 else 0.0
        fps = 1e9 / step if step > 0 else 30.0
        # Frames the recording lacks: their time from their neighbours'.
        ts = np.interp(np.arange(seqs.max() + 1), seqs, known).astype(np.int64)
        write_poses(directory, smoothed_poses(store, ts, fps, smoothing))
        log.warning(
            "%s: posed %d recorded frames of a take its agent did not finish (%d failed)",
            directory,
            len(store),
            posed.corrupt + posed.errors,
        )
        result.append(True)

    def guarded() -> None:
        try:
            run()
        except Exception:  # the frames still upload; the take just has no poses
            log.exception(
                "%s: posing the recording failed; its take uploads without poses", directory
            )

    thread = threading.Thread(target=guarded, name="recover-poses", daemon=True)
    thread.start()
    thread.join()
    return bool(result and result[0])
