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

import numpy as np

from edge_agent import skeleton as sk


@dataclass
class PoseResult:
    """One frame's pose: the canonical skeleton plus what produced it."""

    skeleton: np.ndarray = field(default_factory=sk.empty)  # (23, 3) float32, pixels
    detected: bool = False
    # Person mask (H, W) float32 in [0, 1] at full-frame size, when the backend segments.
    mask: np.ndarray | None = None
    # Detector box (x0, y0, x1, y1) in pixels, when a detector ran.
    box: tuple[float, float, float, float] | None = None
    tracked: bool = False  # ROI came from the previous frame rather than the detector


class PoseBackend(Protocol):
    name: str

    def estimate(self, rgb: np.ndarray) -> PoseResult:
        """Pose of the booth's person in an RGB uint8 (H, W, 3) frame."""

    def reset(self) -> None:
        """Forget tracking state (a new take, or a cut in the frame sequence)."""

    def close(self) -> None: ...


_MODULES = {"cpu": "edge_agent.pose.cpu", "edgetpu": "edge_agent.pose.edgetpu"}
_FACTORIES: dict[str, Callable[..., PoseBackend]] = {}


def register(type_key: str) -> Callable[[Callable[..., PoseBackend]], Callable[..., PoseBackend]]:
    def deco(factory: Callable[..., PoseBackend]) -> Callable[..., PoseBackend]:
        _FACTORIES[type_key] = factory
        return factory

    return deco


def create_pose_backend(cfg) -> PoseBackend:  # cfg: CpuPose | EdgeTpuPose
    if cfg.type not in _FACTORIES:
        importlib.import_module(_MODULES[cfg.type])
    return _FACTORIES[cfg.type](cfg)
