"""Camera sources behind one interface. Every source yields *compressed* frames.

A source is opened once per take:

- ``probe() -> Granted``: a cheap health check between takes (opens and closes the
  device); raises :class:`DeviceError` with a one-line reason.
- ``open() -> Granted``: get ready to deliver (open the device, pre-render synthetic
  frames); raises :class:`DeviceError`.
- ``frames()``: an iterator of :class:`CapturedFrame`, ``seq`` from 0, stamped on the
  booth clock. It ends when the source ends (a file, a synthetic take) or when the
  caller stops iterating.
- ``close()``.
- ``lost_frames``: frames the device skipped (gaps in its own timestamps), and
  ``warnings``: what the device granted differently from what was asked.

Sources are chosen by the config's ``type`` key through :func:`create_source`.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from fractions import Fraction
from typing import Any, Protocol

from edge_agent.capture.clock import BoothClock
from edge_agent.config import FileSource, SyntheticSource, V4L2Source
from edge_agent.errors import DeviceError
from edge_agent.frames import CapturedFrame, DeviceBuffers, Granted, quarter_turns, upright

log = logging.getLogger(__name__)

# A booth take is about 15 s; a synthetic camera needs a length to pre-render.
DEFAULT_SYNTHETIC_SECONDS = 15.0
# Some UVC cameras grant 119.88 when asked for 120; that is not "below the asked rate".
RATE_TOLERANCE = 0.01
# A device timestamp this close to CLOCK_MONOTONIC is taken to be on it.
_MONOTONIC_WINDOW_NS = 10_000_000_000


class CameraSource(Protocol):
    name: str
    lost_frames: int
    warnings: list[str]

    def probe(self) -> Granted: ...

    def open(self) -> Granted: ...

    def frames(self) -> Iterator[CapturedFrame]: ...

    def close(self) -> None: ...


def rate_warning(what: str, asked: float, granted: Granted) -> str | None:
    """The warning to log and show in status when a device grants less than asked."""
    if granted.fps > 0 and granted.fps < asked * (1 - RATE_TOLERANCE):
        return f"{what} granted {granted.fps:g} fps, below the {asked:g} fps asked"
    return None


def paced(
    jpegs: Iterable[bytes], fps: float, clock: BoothClock, *, realtime: bool = True
) -> Iterator[CapturedFrame]:
    """Yield ``jpegs`` as frames at exactly ``fps`` (or as fast as possible).

    The schedule is absolute (start + i / fps), so a late frame does not delay the
    ones after it: the rate is exact over the take, and jitter never accumulates.
    In real time, a frame is stamped with its due time, as a camera with its own
    clock stamps the exposure however late the frame is read; as fast as
    possible, it is stamped on delivery.
    """
    period_ns = 1e9 / fps
    start = time.monotonic_ns()
    for seq, jpeg in enumerate(jpegs):
        if realtime:
            due = start + round(seq * period_ns)
            delay_ns = due - time.monotonic_ns()
            if delay_ns > 0:
                time.sleep(delay_ns / 1e9)
            yield CapturedFrame(seq, clock.from_monotonic_ns(due), jpeg)
        else:
            yield CapturedFrame(seq, clock.now_ns(), jpeg)


def _sleep_until(deadline_ns: int) -> None:
    time.sleep(max(0, deadline_ns - time.monotonic_ns()) / 1e9)


class ReplayCamera:
    """In-memory JPEGs replayed as a camera, at ``fps`` or as fast as possible.

    The building block for the synthetic booth and for tests: the frames exist
    before the take starts, so replay costs nothing but the pacing.
    """

    def __init__(
        self,
        jpegs: Sequence[bytes],
        *,
        width: int,
        height: int,
        fps: float,
        clock: BoothClock,
        realtime: bool = True,
        name: str = "replay",
        device_buffers: int | None = None,
    ) -> None:
        self.name = name
        self.jpegs = jpegs
        self._granted = Granted(width, height, fps)
        self.clock = clock
        self.realtime = realtime
        self.device_buffers = device_buffers
        self._device: DeviceBuffers | None = None
        self.warnings: list[str] = []

    def probe(self) -> Granted:
        return self._granted

    def open(self) -> Granted:
        return self._granted

    @property
    def lost_frames(self) -> int:
        return self._device.lost if self._device is not None else 0

    def frames(self) -> Iterator[CapturedFrame]:
        """``paced``; with ``device_buffers`` (real time), through a driver's buffers: a
        reader that falls further behind than they hold loses frames, as on a camera."""
        if self.device_buffers is None or not self.realtime:
            return paced(self.jpegs, self._granted.fps, self.clock, realtime=self.realtime)
        device = DeviceBuffers(
            self.device_buffers, time.monotonic_ns(), 1e9 / self._granted.fps, len(self.jpegs)
        )
        self._device = device
        return (
            CapturedFrame(seq, self.clock.from_monotonic_ns(device.due(seq)), self.jpegs[seq])
            for seq in device.arrivals(time.monotonic_ns, _sleep_until)
        )

    def close(self) -> None:
        pass


# The last pre-rendered synthetic take (one camera per agent process; kept to one entry).
_PRERENDERED: dict[tuple[str, float, int], Any] = {}
_PRERENDER_LOCK = threading.Lock()


def _prerendered(cfg: SyntheticSource, seconds: float, clock: BoothClock) -> Any:
    """The synthetic take for ``cfg``, rendered once per process.

    Every take of one synthetic camera shows the same dance, so Start on the tablet
    starts the take rather than a minute of rendering; a take started while the
    start-up pre-render (``booth agent --prerender-seconds``) runs waits for it.
    """
    # Imported here: rendering pulls in more than a board needs to import the agent.
    from edge_agent.synth import SyntheticCamera

    key = (cfg.model_dump_json(), seconds, id(clock))
    with _PRERENDER_LOCK:
        camera = _PRERENDERED.get(key)
        if camera is None:
            camera = SyntheticCamera(cfg, seconds, clock_ns=clock.now_ns)
            started = time.monotonic()
            camera.prerender()
            log.info(
                "synthetic camera: %.1f s pre-rendered in %.1f s",
                seconds,
                time.monotonic() - started,
            )
            _PRERENDERED.clear()
            _PRERENDERED[key] = camera
        return camera


class SyntheticBoothCamera:
    """The synthetic booth (``edge_agent.synth``) as a camera: pre-rendered, then exact-rate."""

    def __init__(self, cfg: SyntheticSource, clock: BoothClock, seconds: float | None) -> None:
        self.name = f"synthetic(attendee={cfg.attendee}, dance={cfg.dance})"
        self.cfg = cfg
        self.clock = clock
        self.seconds = seconds or DEFAULT_SYNTHETIC_SECONDS
        self.warnings: list[str] = []
        self._camera: Any = None
        self._lost_before_close = 0

    @property
    def lost_frames(self) -> int:
        """Frames lost because the capture loop left every driver buffer full."""
        return self._camera.lost_frames if self._camera is not None else self._lost_before_close

    def probe(self) -> Granted:
        w, h = self.cfg.size
        return Granted(w, h, self.cfg.fps)

    def open(self) -> Granted:
        self._camera = _prerendered(self.cfg, self.seconds, self.clock)
        return self._camera.granted()

    def frames(self) -> Iterator[CapturedFrame]:
        if self._camera is None:
            raise RuntimeError("open() the synthetic camera before iterating its frames")
        return self._camera.frames()

    def close(self) -> None:
        if self._camera is not None:
            self._lost_before_close = self._camera.lost_frames
        self._camera = None


_RATE_WINDOW = 15  # intervals the delivered frame period is the median of


class DeviceTimestamps:
    """Puts a camera's own frame timestamps on the booth clock and counts the frames it skipped.

    FFmpeg passes V4L2 buffer timestamps through unchanged; UVC drivers stamp them
    with CLOCK_MONOTONIC near the end of exposure, which is closer to the truth
    than the moment we read the frame. If the first timestamp is not near
    CLOCK_MONOTONIC (another clock, or none), frames are stamped on arrival.
    A jump of more than 1.5 frame periods means the device dropped frames. The period is
    the one the camera delivers lately (the median of its last intervals, never shorter
    than the granted one): a UVC camera that halves its rate in dim light is slower, not
    dropping every other frame.
    """

    def __init__(
        self,
        clock: BoothClock,
        time_base: Fraction,
        fps: float,
        name: str = "camera",
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        ns_per_tick = Fraction(10**9) * Fraction(time_base)
        self._num, self._den = ns_per_tick.numerator, ns_per_tick.denominator
        self._period_ns = 1e9 / fps
        self._clock = clock
        self._name = name
        self._monotonic_ns = monotonic_ns
        self._device_clock: bool | None = None  # decided on the first frame
        self._last_ns: int | None = None
        self._intervals: deque[int] = deque(maxlen=_RATE_WINDOW)
        self.lost = 0

    def stamp(self, pts: int | None) -> int:
        if pts is None:
            return self._clock.now_ns()
        dev_ns = pts * self._num // self._den
        if self._device_clock is None:
            self._device_clock = abs(dev_ns - self._monotonic_ns()) < _MONOTONIC_WINDOW_NS
            if not self._device_clock:
                log.info(
                    "%s: device timestamps are not on CLOCK_MONOTONIC; stamping frames on arrival",
                    self._name,
                )
        if not self._device_clock:
            return self._clock.now_ns()
        last, self._last_ns = self._last_ns, dev_ns
        if last is not None and dev_ns > last:
            gap = dev_ns - last
            self._intervals.append(gap)
            period = max(self._period_ns, statistics.median(self._intervals))
            if gap > 1.5 * period:
                self.lost += round(gap / period) - 1
        return self._clock.from_monotonic_ns(dev_ns)


def _device_error(what: str, err: OSError) -> DeviceError:
    """A one-line reason staff can act on, from an OSError PyAV raised."""
    import errno

    reason = {
        errno.ENOENT: "no such device (is the camera plugged in?)",
        errno.ENODEV: "no such device (is the camera plugged in?)",
        errno.EACCES: "permission denied (add the agent's user to the 'video' group)",
        errno.EPERM: "permission denied (add the agent's user to the 'video' group)",
        errno.EBUSY: "device busy (another program is using the camera)",
        errno.EIO: "I/O error (a USB problem: check the cable and the port)",
    }.get(err.errno or 0, err.strerror or str(err))
    return DeviceError(f"{what}: {reason}")


class V4L2Camera:
    """A USB camera through Video4Linux, asked for MJPEG, read as JPEG packets without decoding."""

    def __init__(self, cfg: V4L2Source, clock: BoothClock) -> None:
        self.name = f"v4l2:{cfg.device}"
        self.cfg = cfg
        self.clock = clock
        self._stamps: DeviceTimestamps | None = None
        self.warnings: list[str] = []
        self._container: Any = None
        self._stream: Any = None
        self._rate_unknown = False  # the device reported no frame rate (see _granted)

    def _options(self) -> dict[str, str]:
        w, h = self.cfg.size
        return {
            "input_format": "mjpeg",
            "video_size": f"{w}x{h}",
            "framerate": f"{self.cfg.fps:g}",
        }

    def _open_container(self) -> Any:
        import av

        what = f"camera {self.cfg.device}"
        try:
            return av.open(self.cfg.device, format="v4l2", options=self._options())
        except OSError as e:  # av.error.FileNotFoundError and friends subclass OSError
            raise _device_error(what, e) from None
        except av.FFmpegError as e:
            w, h = self.cfg.size
            raise DeviceError(
                f"{what}: cannot open as MJPEG {w}x{h} at {self.cfg.fps:g} fps: {e}"
            ) from None

    def _granted(self, container: Any) -> Granted:
        stream = container.streams.video[0]
        cc = stream.codec_context
        rate = float(stream.average_rate or stream.base_rate or stream.guessed_rate or 0)
        # A driver that reports no frame interval: the take must not end (or size its
        # queues) on a rate of 0, which the capture would read as 30 fps.
        self._rate_unknown = not rate > 0
        if self._rate_unknown:
            rate = float(self.cfg.fps)
        granted = Granted(int(cc.width), int(cc.height), rate, cc.name)
        if cc.name != "mjpeg":
            raise DeviceError(
                f"camera {self.cfg.device} delivers {cc.name}, not MJPEG, at "
                f"{granted.width}x{granted.height}; pick a size and rate it offers as MJPEG "
                f"(v4l2-ctl --list-formats-ext)"
            )
        return granted

    def _check(self, granted: Granted) -> None:
        self.warnings = []
        asked_w, asked_h = self.cfg.size
        if (granted.width, granted.height) != (asked_w, asked_h):
            self.warnings.append(
                f"camera {self.cfg.device} granted {granted.width}x{granted.height}, "
                f"not the {asked_w}x{asked_h} asked"
            )
        if self._rate_unknown:
            self.warnings.append(
                f"camera {self.cfg.device} did not report its frame rate; assuming the "
                f"{self.cfg.fps:g} fps asked"
            )
        elif msg := rate_warning(f"camera {self.cfg.device}", self.cfg.fps, granted):
            self.warnings.append(msg)
        for msg in self.warnings:
            log.warning("%s", msg)

    def probe(self) -> Granted:
        container = self._open_container()
        try:
            granted = self._granted(container)
        finally:
            container.close()
        self._check(granted)
        return granted

    def open(self) -> Granted:
        self._container = self._open_container()
        try:
            granted = self._granted(self._container)
        except DeviceError:
            self.close()
            raise
        self._stream = self._container.streams.video[0]
        self._check(granted)
        self._fps = granted.fps or self.cfg.fps
        return granted

    def frames(self) -> Iterator[CapturedFrame]:
        if self._container is None:
            raise RuntimeError("open() the camera before iterating its frames")
        stamps = DeviceTimestamps(
            self.clock, self._stream.time_base or Fraction(1, 1_000_000), self._fps, self.name
        )
        self._stamps = stamps
        seq = 0
        for packet in self._container.demux(self._stream):
            if packet.size == 0:
                continue
            yield CapturedFrame(seq, stamps.stamp(packet.pts), bytes(packet))
            seq += 1

    @property
    def lost_frames(self) -> int:
        return self._stamps.lost if self._stamps is not None else 0

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


class VideoFileCamera:
    """A recorded video replayed as a camera, at its native rate or as fast as possible.

    MJPEG files (the booth's own segments, for instance) pass their JPEG bytes
    through untouched. Any other codec is decoded and JPEG-encoded once per frame
    on this source's thread: for a file the decoder *is* the camera, so this is
    not the hot path a real camera's frames take.
    """

    JPEG_QUALITY = 90
    ends_by_itself = True  # a file shorter than the take: a warning, not a failed camera

    def __init__(self, cfg: FileSource, clock: BoothClock) -> None:
        self.name = f"file:{cfg.path}"
        self.cfg = cfg
        self.clock = clock
        self.lost_frames = 0
        self.warnings: list[str] = []
        self._granted: Granted | None = None
        self._turns = 0  # quarter turns that show the file upright (a phone's rotation)

    def _open_container(self) -> Any:
        import av

        if not self.cfg.path.is_file():
            raise DeviceError(f"video file {self.cfg.path}: no such file")
        try:
            container = av.open(str(self.cfg.path))
        except (OSError, av.FFmpegError) as e:
            raise DeviceError(f"video file {self.cfg.path}: cannot open: {e}") from None
        if not container.streams.video:
            container.close()
            raise DeviceError(f"video file {self.cfg.path}: has no video stream")
        return container

    def probe(self) -> Granted:
        import av

        container = self._open_container()
        try:
            stream = container.streams.video[0]
            cc = stream.codec_context
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            if not rate:
                raise DeviceError(f"video file {self.cfg.path}: frame rate unknown")
            # A phone's portrait video: its buffer is landscape, with a display rotation
            # that players apply, and so must we (pose on a sideways dancer fails).
            try:
                first = next(iter(container.decode(stream)), None)
            except av.FFmpegError as e:
                raise DeviceError(f"video file {self.cfg.path}: cannot decode: {e}") from None
            self._turns = quarter_turns(first) if first is not None else 0
            w, h = int(cc.width), int(cc.height)
            if self._turns % 2:
                w, h = h, w
            return Granted(w, h, float(rate), cc.name)
        finally:
            container.close()

    def open(self) -> Granted:
        self._granted = self.probe()
        return self._granted

    def _jpegs_once(self) -> Iterator[tuple[float | None, bytes]]:
        """``(time_s, jpeg)`` for each frame of one pass over the file (upright)."""
        import av
        import cv2

        with self._open_container() as container:
            stream = container.streams.video[0]
            tb = stream.time_base
            if stream.codec_context.name == "mjpeg" and not self._turns:
                for packet in container.demux(stream):
                    if packet.size == 0:
                        continue
                    t = float(packet.pts * tb) if packet.pts is not None and tb else None
                    yield t, bytes(packet)
                return
            encode = [int(cv2.IMWRITE_JPEG_QUALITY), self.JPEG_QUALITY]
            try:
                for frame in container.decode(stream):
                    ok, buf = cv2.imencode(".jpg", upright(frame, "bgr24"), encode)
                    if not ok:
                        raise DeviceError(f"video file {self.cfg.path}: cannot JPEG-encode a frame")
                    yield frame.time, buf.tobytes()
            except av.FFmpegError as e:
                raise DeviceError(f"video file {self.cfg.path}: cannot decode: {e}") from None

    def frames(self) -> Iterator[CapturedFrame]:
        if self._granted is None:
            raise RuntimeError("open() the video file before iterating its frames")
        realtime = self.cfg.rate == "native"
        period_s = 1.0 / self._granted.fps
        clock = self.clock
        seq = 0
        start_ns = time.monotonic_ns()
        offset_s = 0.0  # media time of a loop's start, so loops continue the schedule
        while True:
            t0: float | None = None
            last_t = 0.0
            for i, (t, jpeg) in enumerate(self._jpegs_once()):
                if t is None:
                    t = i * period_s
                if t0 is None:
                    t0 = t
                last_t = t - t0
                if realtime:  # stamped with its due time, like a camera's own clock
                    due = start_ns + round((offset_s + last_t) * 1e9)
                    delay_ns = due - time.monotonic_ns()
                    if delay_ns > 0:
                        time.sleep(delay_ns / 1e9)
                    ts = clock.from_monotonic_ns(due)
                else:
                    ts = clock.now_ns()
                yield CapturedFrame(seq, ts, jpeg)
                seq += 1
            if not self.cfg.loop or t0 is None:
                return
            offset_s += last_t + period_s

    def close(self) -> None:
        self._granted = None


_SOURCES: dict[str, Callable[..., CameraSource]] = {
    "synthetic": lambda cfg, clock, seconds: SyntheticBoothCamera(cfg, clock, seconds),
    "v4l2": lambda cfg, clock, seconds: V4L2Camera(cfg, clock),
    "file": lambda cfg, clock, seconds: VideoFileCamera(cfg, clock),
}


def create_source(
    cfg: SyntheticSource | V4L2Source | FileSource,
    *,
    clock: BoothClock,
    seconds: float | None = None,
) -> CameraSource:
    """The camera source for ``cfg.type``. ``seconds`` bounds a synthetic take's length."""
    return _SOURCES[cfg.type](cfg, clock, seconds)
