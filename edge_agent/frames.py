"""Value types that travel through the edge pipeline (and up to the cloud)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
JPEG_EOI_SLACK = 64  # some cameras pad a few bytes after EOI


def jpeg_looks_complete(jpeg: bytes) -> bool:
    """Cheap structural check (no decoding): SOI at the start, EOI near the end.

    A camera can deliver a frame cut short (a USB transfer lost). The board records
    it as delivered, but uploads it as a lost frame; ingest applies the same rule.
    """
    return (
        jpeg.startswith(JPEG_SOI) and jpeg.rfind(JPEG_EOI, max(0, len(jpeg) - JPEG_EOI_SLACK)) >= 0
    )


@dataclass(frozen=True, slots=True)
class CapturedFrame:
    """One camera frame exactly as the camera produced it: compressed, never decoded here.

    ``seq`` is 0-based and contiguous within a take; ``capture_ts_ns`` is on the booth
    clock (monotonic plus the offset measured against the cloud).
    """

    seq: int
    capture_ts_ns: int
    jpeg: bytes


class DeviceBuffers:
    """A camera driver's frame buffers, for a replayed camera whose reader may fall behind.

    Frame ``i`` arrives at ``start_ns + i * period_ns`` (``due``). A driver holds at
    most ``capacity`` frames the reader has not taken yet; one that arrives while
    they are all full is lost (counted in ``lost``), as a V4L2 driver drops it.
    Arrivals are settled when the reader comes back: buffers empty only when it
    reads, so this gives the same frames as a driver would. ``total`` frames
    arrive, or frames without end when it is None.
    """

    def __init__(self, capacity: int, start_ns: int, period_ns: float, total: int | None) -> None:
        if capacity < 1:
            raise ValueError(f"a camera needs at least one buffer, got {capacity}")
        self.capacity = capacity
        self.start_ns = start_ns
        self.period_ns = period_ns
        self.total = total
        self.lost = 0
        self.arriving = 0  # the next frame to arrive
        self._queued: deque[int] = deque()

    def due(self, seq: int) -> int:
        return self.start_ns + round(seq * self.period_ns)

    def arrivals(
        self,
        now_ns: Callable[[], int],
        wait_until: Callable[[int], None],
        stopped: Callable[[], bool] = lambda: False,
    ) -> Iterator[int]:
        """The frames the reader gets, in order, as it asks for them (it may ask late)."""
        while not stopped() and not self._ended():
            self._settle(now_ns())
            if not self._queued:
                wait_until(self.due(self.arriving))
                continue
            yield self._queued.popleft()

    def _settle(self, now_ns: int) -> None:
        while (self.total is None or self.arriving < self.total) and self.due(
            self.arriving
        ) <= now_ns:
            if len(self._queued) < self.capacity:
                self._queued.append(self.arriving)
            else:
                self.lost += 1
            self.arriving += 1

    def _ended(self) -> bool:
        """Every frame has arrived and been taken or lost."""
        return self.total is not None and self.arriving >= self.total and not self._queued


@dataclass(frozen=True, slots=True)
class Granted:
    """What a camera actually agreed to deliver (may differ from what was asked)."""

    width: int
    height: int
    fps: float
    pixel_format: str = "mjpeg"


def quarter_turns(frame: Any) -> int:
    """Counter-clockwise quarter turns that show a decoded ``frame`` upright, as players do.

    Phones store the sensor's landscape buffer and a display rotation (PyAV's
    ``frame.rotation``, in degrees); ignored, a portrait video lies on its side.
    """
    return round((getattr(frame, "rotation", 0) or 0) / 90) % 4


def upright(frame: Any, format: str = "rgb24") -> Any:
    """A decoded frame as an array (``format``), turned the way a player shows it."""
    import numpy as np

    pixels = frame.to_ndarray(format=format)
    turns = quarter_turns(frame)
    return np.ascontiguousarray(np.rot90(pixels, turns)) if turns else pixels
