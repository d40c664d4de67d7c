"""The synthetic booth as a camera: JPEGs rendered up front, replayed at an exact rate.

Rendering a frame costs a few milliseconds, which a 120 fps (8.3 ms) schedule
cannot absorb with any jitter margin, so ``prerender`` renders and JPEG-encodes
the whole take first. ``frames`` then releases frame ``i`` at ``start + i / fps``:
deadlines are absolute, so a late frame never delays the ones after it (no
drift), and the capture timestamp is the deadline itself, as a camera with a
hardware clock would stamp it. Waiting sleeps until about a millisecond before
the deadline, then spins, because ``time.sleep`` alone overshoots by up to a
scheduler tick.

Like a camera driver, it holds only ``cfg.device_buffers`` frames for a reader
that falls behind (a UVC driver allows 32). A frame that arrives while they are
all full is lost, and counted in ``lost_frames``, just as a device drops it: a
stalled capture loop shows up as lost frames, not merely as late ones.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

import cv2
import numpy as np

from edge_agent.config import SyntheticSource
from edge_agent.errors import BadInput
from edge_agent.frames import CapturedFrame, DeviceBuffers, Granted
from edge_agent.synth import scene
from edge_agent.synth.appearance import Attendee
from edge_agent.synth.choreography import Dance
from edge_agent.synth.render import SynthFrame, render

log = logging.getLogger(__name__)

# Sleep until this long before a deadline, then spin.
SPIN_NS = 1_000_000
# SCHED_FIFO priority for frames(realtime=True): low among real-time threads, above
# every normal one.
REALTIME_PRIORITY = 10
# With motion blur, the exposure lasts this fraction of the frame period.
SHUTTER = 0.5


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG of an RGB frame (deterministic for equal pixels and quality)."""
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), (cv2.IMWRITE_JPEG_QUALITY, int(quality))
    )
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


class SyntheticCamera:
    """A camera whose scene is the synthetic booth.

    ``seconds`` is the take length; ``frames()`` ends after it (or repeats it with
    ``loop=True``). ``clock_ns`` and ``sleep`` are injectable so tests can run the
    schedule on a fake clock.
    """

    def __init__(
        self,
        cfg: SyntheticSource,
        seconds: float,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        *,
        sleep: Callable[[float], None] = time.sleep,
        dance: Dance | None = None,
        shadow: str = "auto",
        noise: bool = True,
        motion_blur: bool = False,
    ) -> None:
        if not seconds > 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        try:
            scene.check_viewpoint(cfg.viewpoint)
        except ValueError as e:
            raise BadInput(f"synthetic camera: {e}") from None
        self.cfg = cfg
        self.seconds = float(seconds)
        self.size = (int(cfg.size[0]), int(cfg.size[1]))
        self.fps = float(cfg.fps)
        self.attendee = Attendee.from_seed(cfg.attendee)
        self.dance = dance if dance is not None else Dance.from_seed(cfg.dance)
        self.shadow = shadow
        self.noise = noise
        self.motion_blur = motion_blur
        self.poses = self.dance.poses(self.fps, self.seconds)
        if not self.poses:
            raise ValueError(f"{seconds} s at {self.fps} fps is not a single frame")
        self._clock = clock_ns
        self._sleep = sleep
        self._jpegs: list[bytes] | None = None
        self.keypoints: np.ndarray | None = None  # (N, 23, 3), filled by prerender
        self._stop = threading.Event()
        self._device: DeviceBuffers | None = None

    @property
    def lost_frames(self) -> int:
        """Frames the last ``frames()`` lost because every driver buffer was full."""
        return self._device.lost if self._device is not None else 0

    @property
    def num_frames(self) -> int:
        return len(self.poses)

    def granted(self) -> Granted:
        return Granted(width=self.size[0], height=self.size[1], fps=self.fps, pixel_format="mjpeg")

    def ground_truth(self, seq: int) -> SynthFrame:
        """Frame ``seq``'s ground truth (re-rendered: rendering is deterministic).

        ``seq`` counts on past the end of the take when replaying in a loop.
        """
        i = seq % self.num_frames
        return render(
            self.attendee,
            self.poses[i],
            self.size,
            self.cfg.viewpoint,
            frame_index=i,
            shadow=self.shadow,
            noise=self.noise,
            blur_from=self.dance.pose((i - SHUTTER) / self.fps) if self.motion_blur else None,
        )

    def prerender(self, progress: bool = False) -> None:
        """Render and JPEG-encode the whole take (a tqdm bar on stderr if ``progress``)."""
        if self._jpegs is not None:
            return
        indices = range(self.num_frames)
        if progress:
            from tqdm import tqdm

            indices = tqdm(indices, desc="rendering", unit="frame", file=sys.stderr)
        jpegs = []
        keypoints = np.zeros((self.num_frames, 23, 3), dtype=np.float32)
        t0 = time.perf_counter()
        for i in indices:
            frame = self.ground_truth(i)
            keypoints[i] = frame.keypoints
            jpegs.append(encode_jpeg(frame.rgb, self.cfg.jpeg_quality))
        self._jpegs, self.keypoints = jpegs, keypoints
        log.info(
            "pre-rendered %d frames %dx%d in %.1f s (%.0f KB/frame)",
            self.num_frames,
            *self.size,
            time.perf_counter() - t0,
            sum(map(len, jpegs)) / len(jpegs) / 1024,
        )

    def jpeg(self, seq: int) -> bytes:
        if self._jpegs is None:
            self.prerender()
        assert self._jpegs is not None
        return self._jpegs[seq % self.num_frames]

    def stop(self) -> None:
        """Make ``frames()`` return after the frame it is waiting for (thread-safe)."""
        self._stop.set()

    def frames(self, loop: bool = False, realtime: bool = False) -> Iterator[CapturedFrame]:
        """Yield the take at exactly ``fps``, frame ``seq`` due at ``start + seq / fps``.

        ``realtime`` puts the consuming thread on the SCHED_FIFO class while it
        iterates (needs CAP_SYS_NICE; otherwise a warning and normal scheduling).
        On a loaded machine this is the difference between a p99 jitter of tens of
        milliseconds and one of tens of microseconds (bench/synth.py).
        """
        if self._jpegs is None:
            self.prerender()
        assert self._jpegs is not None
        self._stop.clear()
        restore = _enter_realtime() if realtime else None
        try:
            device = DeviceBuffers(
                self.cfg.device_buffers,
                self._clock(),
                1e9 / self.fps,
                None if loop else self.num_frames,
            )
            self._device = device
            for seq in device.arrivals(self._clock, self._wait_until, self._stop.is_set):
                yield CapturedFrame(seq, device.due(seq), self._jpegs[seq % self.num_frames])
        finally:
            if restore is not None:
                os.sched_setscheduler(0, *restore)

    def _wait_until(self, deadline_ns: int) -> None:
        clock = self._clock
        while True:
            remaining = deadline_ns - clock()
            if remaining <= 0:
                return
            if remaining > SPIN_NS + 200_000:
                self._sleep((remaining - SPIN_NS) / 1e9)


def _enter_realtime() -> tuple[int, os.sched_param] | None:
    """Move the calling thread to SCHED_FIFO; returns what to restore, or None."""
    try:
        before = (os.sched_getscheduler(0), os.sched_getparam(0))
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
    except (OSError, AttributeError) as e:
        log.warning("synthetic camera: real-time scheduling unavailable (%s); replaying without", e)
        return None
    return before
