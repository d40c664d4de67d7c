"""The pose backend interface and its registry.

Each backend lives in its own module and registers itself under its config
``type`` key with ``@register("cpu")``. ``create_pose_backend(cfg)`` imports the
module lazily, so a board without TFLite can still import this package.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import cv2
import numpy as np

from edge_agent import skeleton as sk
from edge_agent.errors import BadInput

# Below this a frame cannot hold a person the models can find; above it is not a camera.
MIN_SIDE_PX = 32
MAX_SIDE_PX = 8192


@dataclass
class PoseResult:
    """One frame's pose: the canonical skeleton plus what produced it."""

    skeleton: np.ndarray = field(default_factory=sk.empty)  # (23, 3) float32, pixels
    detected: bool = False
    # Person mask (H, W) float32 in [0, 1] at full-frame size, when the backend segments
    # (cpu: selfie segmentation of the person's region, 0 elsewhere). Read-only.
    mask: np.ndarray | None = None
    # Person box (x0, y0, x1, y1) in pixels: the extent of the joints scoring >= 0.5.
    box: tuple[float, float, float, float] | None = None
    tracked: bool = False  # ROI came from the previous frame rather than the detector
    # The model's own "a person is here" confidence (BlazePose's pose flag, MoveNet's
    # mean keypoint score). A wall shadow scores high too: see ``gating``.
    score: float = 0.0
    frame_size: tuple[int, int] | None = None  # (width, height) of the frame estimated


class PoseBackend(Protocol):
    name: str

    def estimate(self, rgb: np.ndarray) -> PoseResult:
        """Pose of the booth's person in an RGB uint8 (H, W, 3) frame."""

    def reset(self) -> None:
        """Forget tracking state (a new take, or a cut in the frame sequence)."""

    def close(self) -> None: ...


def check_frame(rgb: object) -> np.ndarray:
    """Return ``rgb`` if it is an RGB uint8 (H, W, 3) frame, else raise BadInput saying why."""
    if not isinstance(rgb, np.ndarray):
        raise BadInput(f"pose input must be an RGB image array, got {type(rgb).__name__}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise BadInput(f"pose input must have shape (height, width, 3), got {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise BadInput(f"pose input must be uint8, got {rgb.dtype}")
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE_PX or max(h, w) > MAX_SIDE_PX:
        raise BadInput(f"pose input of {w}x{h} px is outside {MIN_SIDE_PX}..{MAX_SIDE_PX} px")
    return np.ascontiguousarray(rgb)  # OpenCV wants rows in order (no copy if they are)


# No booth camera comes near this (4K is 8.3 Mpx); a header claiming more is hostile or broken,
# and decoding it first would allocate gigabytes.
MAX_JPEG_PIXELS = 4096 * 4096
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a JPEG's start-of-frame header, without decoding; None if absent."""
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _SOF_MARKERS:
            if pos + 9 > n:
                return None
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return width, height
        if marker == 0xDA or length < 2:  # start of scan before any frame header
            return None
        pos += 2 + length
    return None


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decode one camera JPEG to RGB uint8, raising BadInput for a corrupt or truncated one."""
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        raise BadInput(f"corrupt JPEG: no start-of-image marker ({len(data)} bytes)")
    size = jpeg_size(data)
    if size is None:
        raise BadInput(f"corrupt JPEG: no frame header ({len(data)} bytes)")
    if size[0] * size[1] > MAX_JPEG_PIXELS or 0 in size:
        raise BadInput(f"JPEG claims {size[0]}x{size[1]} pixels; refusing to decode it")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise BadInput(f"corrupt JPEG: cannot decode {len(data)} bytes (truncated or damaged)")
    return check_frame(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


_MODULES = {"cpu": "edge_agent.pose.cpu", "edgetpu": "edge_agent.pose.edgetpu"}
_FACTORIES: dict[str, Callable[..., PoseBackend]] = {}


def register(type_key: str) -> Callable[[Callable[..., PoseBackend]], Callable[..., PoseBackend]]:
    def deco(factory: Callable[..., PoseBackend]) -> Callable[..., PoseBackend]:
        _FACTORIES[type_key] = factory
        return factory

    return deco


def create_pose_backend(cfg, **options) -> PoseBackend:  # cfg: CpuPose | EdgeTpuPose
    """Build the backend ``cfg.type`` names; its module is imported (and models load) only now.

    ``options`` go to the backend's factory as keyword arguments: ``zone=`` (a
    ``ZoneConfig``) turns on shadow gating inside the backend; edgetpu also takes
    ``delegate_optional`` (tests only). Settings belong in ``cfg``.
    """
    if cfg.type not in _FACTORIES:
        importlib.import_module(_MODULES[cfg.type])
    return _FACTORIES[cfg.type](cfg, **options)
