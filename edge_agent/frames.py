"""Value types that travel through the edge pipeline (and up to the cloud)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CapturedFrame:
    """One camera frame exactly as the camera produced it: compressed, never decoded here.

    ``seq`` is 0-based and contiguous within a take; ``capture_ts_ns`` is on the booth
    clock (monotonic plus the offset measured against the cloud).
    """

    seq: int
    capture_ts_ns: int
    jpeg: bytes


@dataclass(frozen=True, slots=True)
class Granted:
    """What a camera actually agreed to deliver (may differ from what was asked)."""

    width: int
    height: int
    fps: float
    pixel_format: str = "mjpeg"
