"""Pose off the hot path: a live worker on the latest frame, then a catch-up pass over segments.

While the take runs, :class:`PoseWorker` takes the newest frame from a
:class:`LatestSlot`, decodes it (the only decode on the edge) and runs the pose
backend. A slow model therefore skips frames, it never delays capture; each
skipped frame is counted.

When the take has ended, :func:`catch_up` reads the finished segments back
(demux, decode, pose) and fills every frame the live worker skipped — the seed's
"write MP4, queue it for asynchronous processing" — so that by the end every
captured and recorded frame has a pose: coverage = frames with a pose / frames
captured.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np

from edge_agent import skeleton as sk
from edge_agent.capture.buffers import LatestSlot
from edge_agent.capture.segments import SegmentInfo, read_segment_frames
from edge_agent.errors import BadInput
from edge_agent.frames import CapturedFrame
from edge_agent.pose.base import PoseBackend, decode_jpeg
from edge_agent.smoothing import CausalSmoother

log = logging.getLogger(__name__)

LIVE = 1
CATCH_UP = 2

# Pose threads run at a lower CPU priority than capture: on a 2-core board, the
# model (and the XNNPACK threads it starts, which inherit the value) must yield the
# core to the capture and segment threads, never the other way round.
POSE_NICE = 10


def lower_thread_priority(nice: int = POSE_NICE) -> None:
    """Make the calling thread (and threads it starts later) yield the CPU to capture.

    Linux schedules threads individually, so this affects only the caller. Where
    per-thread priorities do not exist, pose simply runs at normal priority.
    """
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))
    except (AttributeError, OSError) as e:
        log.debug("cannot lower the pose thread's priority: %s", e)


class PoseStore:
    """The poses of one take, by frame ``seq``. Written by one thread at a time."""

    def __init__(self) -> None:
        self._skeletons: dict[int, np.ndarray] = {}
        self._detected: dict[int, bool] = {}
        self._source: dict[int, int] = {}

    def put(self, seq: int, skeleton: np.ndarray, detected: bool, source: int) -> None:
        self._skeletons[seq] = np.asarray(skeleton, dtype=np.float32)
        self._detected[seq] = bool(detected)
        self._source[seq] = source

    def __contains__(self, seq: int) -> bool:
        return seq in self._skeletons

    def __len__(self) -> int:
        return len(self._skeletons)

    def arrays(self, n: int) -> dict[str, np.ndarray]:
        """Dense arrays for frames ``0..n-1``: missing frames have score 0 and source 0."""
        skeletons = np.zeros((n, sk.NUM_JOINTS, 3), dtype=np.float32)
        detected = np.zeros(n, dtype=bool)
        source = np.zeros(n, dtype=np.uint8)
        for seq, skel in self._skeletons.items():
            if 0 <= seq < n:
                skeletons[seq] = skel
                detected[seq] = self._detected[seq]
                source[seq] = self._source[seq]
        return {"raw": skeletons, "detected": detected, "source": source}


@dataclass
class PoseCounters:
    posed: int = 0
    errors: int = 0  # frames on which the backend raised
    busy_s: float = 0.0
    # Frames that would not decode (a take's live pass and catch-up may both meet one).
    corrupt_seqs: set[int] = field(default_factory=set)

    @property
    def corrupt(self) -> int:
        return len(self.corrupt_seqs)


def _attempt(backend: PoseBackend, jpeg: bytes) -> tuple[Any, str | None, BaseException | None]:
    """Decode and pose one frame: ``((skeleton, detected), None, None)`` or the failure.

    The failure is ``"corrupt"`` (the JPEG does not decode) or ``"error"`` (the backend
    raised). Counting and logging are the caller's, on one thread.
    """
    try:
        rgb = decode_jpeg(jpeg)
    except BadInput as e:
        return None, "corrupt", e
    try:
        result = backend.estimate(rgb)
    except Exception as e:  # a model bug must cost one frame's pose, never the take
        return None, "error", e
    return (result.skeleton, result.detected), None, None


def _count(
    outcome: tuple[Any, str | None, BaseException | None],
    seq: int,
    counters: PoseCounters,
    where: str,
) -> tuple[np.ndarray, bool] | None:
    """The pose of an attempt, counting (and logging the first of) each kind of failure."""
    pose, failure, exc = outcome
    if failure == "corrupt":
        counters.corrupt_seqs.add(seq)
        if counters.corrupt == 1:
            log.warning("%s: frame %d: %s; counted and skipped", where, seq, exc)
    elif failure == "error":
        counters.errors += 1
        if counters.errors == 1:
            if isinstance(exc, BadInput):
                log.warning("%s: frame %d: %s", where, seq, exc)
            else:
                log.error(
                    "%s: pose backend failed on frame %d; counting further failures",
                    where,
                    seq,
                    exc_info=exc,
                )
    return pose


def _estimate(
    backend: PoseBackend, jpeg: bytes, seq: int, counters: PoseCounters, where: str
) -> tuple[np.ndarray, bool] | None:
    """Decode and pose one frame; count (and log the first of) any failure. Never raises."""
    return _count(_attempt(backend, jpeg), seq, counters, where)


class PoseWorker:
    """Runs the pose backend on the latest frame, on its own thread, until the slot closes."""

    def __init__(
        self,
        slot: LatestSlot[CapturedFrame],
        backend_factory: Callable[[], PoseBackend],
        store: PoseStore,
        name: str = "pose",
        smoother: CausalSmoother | None = None,
    ) -> None:
        self.slot = slot
        self.store = store
        self.name = name
        # Live poses also go through the causal smoother (imputed gaps, glitches
        # rejected): ``live`` is what the booth shows now. The take's stored poses stay
        # raw; after catch-up the two-sided smoother sees every frame.
        self.smoother = smoother
        self.live: tuple[int, np.ndarray] | None = None  # (seq, smoothed (23, 3))
        self.counters = PoseCounters()
        self.backend: PoseBackend | None = None
        self.backend_name: str | None = None
        self.error: str | None = None
        self._factory = backend_factory
        self._first_ns: int | None = None
        self._last_ns: int | None = None
        self._thread = threading.Thread(target=self._run, name=f"{name}-worker", daemon=True)
        self._ready = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the backend is loaded (or failed to load)."""
        return self._ready.wait(timeout)

    @property
    def fps(self) -> float:
        """Frames posed per second of the worker's active time."""
        if self._first_ns is None:
            return 0.0
        end = self._last_ns if self.slot.closed and self._last_ns else time.monotonic_ns()
        elapsed = (end - self._first_ns) / 1e9
        return self.counters.posed / elapsed if elapsed > 0 else 0.0

    def _load(self) -> bool:
        try:
            self.backend = self._factory()
        except Exception as e:  # any load failure: capture goes on, pose is reported missing
            self.error = f"pose backend unavailable: {e}"
            log.error("%s: %s", self.name, self.error)
            return False
        finally:
            self._ready.set()
        self.backend_name = getattr(self.backend, "name", type(self.backend).__name__)
        self.backend.reset()
        return True

    def _run(self) -> None:
        lower_thread_priority()
        if not self._load():
            return
        backend = self.backend
        counters = self.counters
        while (frame := self.slot.take()) is not None:
            t0 = time.monotonic_ns()
            if self._first_ns is None:
                self._first_ns = t0
            pose = _estimate(backend, frame.jpeg, frame.seq, counters, self.name)
            t1 = time.monotonic_ns()
            counters.busy_s += (t1 - t0) / 1e9
            self._last_ns = t1
            if pose is not None:
                self.store.put(frame.seq, pose[0], pose[1], LIVE)
                counters.posed += 1
                if self.smoother is not None:
                    smoothed = self.smoother.update(pose[0], frame.capture_ts_ns)
                    self.live = (frame.seq, smoothed.skeleton)


@dataclass
class CatchUpResult:
    posed: int = 0
    errors: int = 0
    corrupt_seqs: set[int] = field(default_factory=set)
    seconds: float = 0.0
    error: str | None = None

    @property
    def corrupt(self) -> int:
        return len(self.corrupt_seqs)


def catch_up(
    segments: Iterable[SegmentInfo],
    store: PoseStore,
    backend: PoseBackend,
    *,
    stop: threading.Event | None = None,
    name: str = "catch-up",
) -> CatchUpResult:
    """Pose every recorded frame that has no pose yet, reading the finished segments in order.

    A segment that cannot be read back is reported in the result and skipped.
    """
    result = CatchUpResult()

    def frames() -> Iterator[tuple[int, bytes]]:
        for info in segments:
            try:
                yield from read_segment_frames(info)
            except (OSError, ValueError, av.FFmpegError) as e:
                result.error = f"cannot read back {info.path.name}: {e}"
                log.error("%s: %s", name, result.error)

    return pose_frames(frames(), store, backend, stop=stop, name=name, result=result)


def pose_frames(
    frames: Iterable[tuple[int, bytes]],
    store: PoseStore,
    backend: PoseBackend,
    *,
    stop: threading.Event | None = None,
    name: str = "catch-up",
    result: CatchUpResult | None = None,
) -> CatchUpResult:
    """Pose each ``(seq, jpeg)`` that has no pose in ``store`` yet; store the poses (CATCH_UP).

    A backend that poses frames independently on several devices at once (its
    ``parallelism``, e.g. an EdgeTPU pool) gets that many frames in flight; poses are
    still stored in frame order, by this thread.
    """
    counters = PoseCounters()
    result = result if result is not None else CatchUpResult()
    started = time.monotonic()
    # The live worker's tracking state belongs to another frame; so does the pass's own
    # after a run of frames it skipped (posed live): tracking starts afresh after each.
    backend.reset()
    previous = None
    workers = max(1, int(getattr(backend, "parallelism", 1)))
    in_flight: deque[tuple[int, Future]] = deque()

    def store_oldest() -> None:
        seq, future = in_flight.popleft()
        pose = _count(future.result(), seq, counters, name)
        if pose is not None:
            store.put(seq, pose[0], pose[1], CATCH_UP)
            result.posed += 1

    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        for seq, jpeg in frames:
            if stop is not None and stop.is_set():
                result.error = "catch-up interrupted"
                break
            if seq in store:
                continue
            if previous is not None and seq != previous + 1:
                while in_flight:  # nothing in flight while its state is reset
                    store_oldest()
                backend.reset()
            previous = seq
            in_flight.append((seq, pool.submit(_attempt, backend, jpeg)))
            while len(in_flight) >= 2 * workers:  # bounded: a frame or two per device
                store_oldest()
        while in_flight:
            store_oldest()
    result.errors, result.corrupt_seqs = counters.errors, counters.corrupt_seqs
    result.seconds = time.monotonic() - started
    return result
