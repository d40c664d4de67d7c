"""Value types that travel through the edge pipeline (and up to the cloud)."""

from __future__ import annotations

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
