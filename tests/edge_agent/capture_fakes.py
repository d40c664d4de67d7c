"""Test doubles for capture and agent tests: tiny JPEG frames and a deliberately slow pose model.

Frame ``k`` shows a white square whose centre is :func:`square_centre(k)`; the
fake backend finds that centre and reports it as every joint, so a test can
check that each pose landed on the right frame.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np

from edge_agent import skeleton as sk
from edge_agent.frames import CapturedFrame
from edge_agent.pose.base import PoseResult, create_pose_backend, register

WIDTH, HEIGHT = 128, 96
SQUARE = 10
SLOW_TYPE = "slow-test"


def square_centre(k: int) -> tuple[float, float]:
    x0 = 4 + (k * 3) % (WIDTH - SQUARE - 8)
    y0 = 4 + (k * 5) % (HEIGHT - SQUARE - 8)
    return x0 + (SQUARE - 1) / 2, y0 + (SQUARE - 1) / 2


def make_jpegs(n: int, quality: int = 90) -> list[bytes]:
    rng = np.random.default_rng(7)
    out = []
    for k in range(n):
        img = rng.integers(20, 60, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        cx, cy = square_centre(k)
        x0, y0 = int(cx - (SQUARE - 1) / 2), int(cy - (SQUARE - 1) / 2)
        img[y0 : y0 + SQUARE, x0 : x0 + SQUARE] = 255
        ok, buf = cv2.imencode(".jpg", img, [int(cv2.IMWRITE_JPEG_QUALITY), quality])
        assert ok
        out.append(buf.tobytes())
    return out


class SlowPose:
    """Finds the white square; takes ``delay_s`` per frame, like a model too slow for the camera."""

    name = SLOW_TYPE

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.calls = 0
        self.closed = False
        self.lock = threading.Lock()

    def estimate(self, rgb: np.ndarray) -> PoseResult:
        with self.lock:
            self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        ys, xs = np.nonzero(rgb[:, :, 0] > 200)
        skel = sk.empty()
        if len(xs):
            skel[:, 0], skel[:, 1], skel[:, 2] = xs.mean(), ys.mean(), 0.9
        return PoseResult(skeleton=skel, detected=bool(len(xs)))

    def reset(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@register(SLOW_TYPE)
def _slow_factory(cfg: SimpleNamespace) -> SlowPose:
    return SlowPose(cfg.delay_s)


def slow_pose_factory(delay_s: float = 0.03):
    """A zero-argument factory, as Take and Agent take it, going through the real registry."""
    cfg = SimpleNamespace(type=SLOW_TYPE, delay_s=delay_s)
    return lambda: create_pose_backend(cfg)


def crashed_recording(directory: Path, frames: list[CapturedFrame], segment_s: float) -> None:
    """What a real recording of ``frames`` leaves in ``directory`` when the agent dies then.

    A real :class:`SegmentRecorder` records them (its segments, their indexes, the
    segment in progress as a ``.part``; no ``frames.csv``, which the take writes at
    its end). Once every frame is muxed and every rolled segment finalized, the
    directory is copied as it stands: the process being killed at that moment.
    """
    import shutil
    import tempfile

    from edge_agent.capture.segments import PART_SUFFIX, SegmentRecorder

    with tempfile.TemporaryDirectory(prefix="live-") as live:
        rec = SegmentRecorder(
            Path(live),
            width=WIDTH,
            height=HEIGHT,
            fps=120.0,
            segment_s=segment_s,
            min_free_disk_mb=0,
        )
        rec.start()
        for frame in frames:
            assert rec.queue.offer(frame)
        deadline = time.monotonic() + 30
        # Every frame muxed, and only the segment in progress still a .part.
        while (
            rec.frames_written < len(frames) or len(list(Path(live).glob(f"*{PART_SUFFIX}"))) != 1
        ):
            assert time.monotonic() < deadline, "the recorder did not catch up"
            time.sleep(0.01)
        shutil.copytree(live, directory)
        rec.close()
        rec.wait(30)


def statvfs_with(free_mb: dict):
    """An ``os.statvfs`` stand-in reporting ``free_mb["mb"]`` MB free (read at each call)."""

    def statvfs(path: str):
        return SimpleNamespace(f_bavail=int(free_mb["mb"] * 2**20) // 4096, f_frsize=4096)

    return statvfs


def disk_filling_camera(
    jpegs, free_mb: dict, *, full_at: int = 130, hold_at=None, release=None, **kw
):
    """A ReplayCamera of ``jpegs`` after whose frame ``full_at`` the disk ``statvfs_with
    (free_mb)`` reports is nearly full (5 MB); at ``hold_at`` it waits for ``release``."""
    from edge_agent.capture.sources import ReplayCamera

    class FillsTheDisk(ReplayCamera):
        def frames(self):
            for frame in super().frames():
                if frame.seq == full_at:
                    free_mb["mb"] = 5.0
                if frame.seq == hold_at:
                    release.wait(30)
                yield frame

    return FillsTheDisk(jpegs, **kw)
