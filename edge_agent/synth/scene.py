"""The booth: cameras, back wall, floor, lights, soft and hard shadows, sensor noise.

The booth is the same for every attendee, as a real one would be. Static pixels
(wall, floor, lighting, vignette) are rendered once per viewpoint and frame size
and cached; per-frame work is limited to pasting shadows, drawing the figure and
adding a precomputed noise tile at a per-frame offset.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np

# Colours the appearance sampler keeps trousers away from (RGB).
WALL_RGB = (198, 202, 208)
FLOOR_RGB = (122, 126, 136)

WALL_Z = -2.0  # the back wall, metres behind the centre of the dance zone
WALL_TOP_Y = 2.7
WALL_HALF_W = 3.4
# The side spotlight that casts the person-shaped "backup dancer" on the wall: a
# low floor light far off to the left, across the aisle. Low, so the whole figure
# lands on the wall feet first (a higher light puts the legs' shadow on the floor);
# far, so the shadow moves only 0.7x as fast as the dancer in the image: it stands
# beside the dancer and stays in view when the dancer steps out of frame leftwards.
SPOT_POS = np.array((-15.0, 0.25, 20.0))
# Image-space direction the key light comes from (upper left), for limb shading.
LIGHT_DIR_2D = np.array((-0.6, -0.8))

# Camera positions per viewpoint: a centre camera and pairs to the sides, all
# aimed at the centre of the dance zone, so a two-camera booth uses 1 and 2.
VIEWPOINTS: tuple[tuple[float, float], ...] = (
    (0.0, 4.0),
    (0.7, 3.95),
    (-0.7, 3.95),
    (1.3, 3.8),
    (-1.3, 3.8),
)
CAMERA_HEIGHT = 1.1
AIM = np.array((0.0, 1.0, 0.0))


@dataclass(frozen=True)
class CameraModel:
    """A pinhole camera in the booth. ``project`` maps world metres to pixels."""

    position: np.ndarray  # (3,)
    axes: np.ndarray  # (3, 3) rows: image right, image up, viewing direction (world)
    f_px: float
    cx: float
    cy: float
    size: tuple[int, int]

    def to_camera(self, pts: np.ndarray) -> np.ndarray:
        return (np.asarray(pts, dtype=np.float64) - self.position) @ self.axes.T

    def project(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixels (N, 2) and depths (N,) of world points (N, 3)."""
        c = self.to_camera(pts)
        depth = np.maximum(c[:, 2], 1e-3)
        uv = np.empty((len(c), 2))
        uv[:, 0] = self.cx + self.f_px * c[:, 0] / depth
        uv[:, 1] = self.cy - self.f_px * c[:, 1] / depth
        return uv, depth

    def toward(self, pts: np.ndarray) -> np.ndarray:
        """Unit vectors from world points (N, 3) towards the camera."""
        d = self.position - np.asarray(pts)
        return d / np.linalg.norm(d, axis=-1, keepdims=True)


def check_viewpoint(viewpoint: int) -> None:
    if not 0 <= viewpoint < len(VIEWPOINTS):
        raise ValueError(f"viewpoint must be 0..{len(VIEWPOINTS) - 1}, got {viewpoint}")


def look_at(pos: np.ndarray, target: np.ndarray, f_px: float, size: tuple[int, int]) -> CameraModel:
    """A level pinhole camera at ``pos`` aimed at ``target``."""
    w, h = size
    fwd = np.asarray(target, dtype=np.float64) - pos
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, (0.0, 1.0, 0.0))
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    return CameraModel(
        np.asarray(pos, dtype=np.float64),
        np.stack((right, up, fwd)),
        f_px,
        w / 2.0,
        h / 2.0,
        (w, h),
    )


@functools.lru_cache(maxsize=32)
def camera(viewpoint: int, size: tuple[int, int]) -> CameraModel:
    check_viewpoint(viewpoint)
    w, h = size
    x, z = VIEWPOINTS[viewpoint]
    # Frame the whole figure with room for hands raised overhead (about 1.3x the
    # height) and jumps, whatever the aspect.
    return look_at(np.array((x, CAMERA_HEIGHT, z)), AIM, 1.4 * min(h, 1.33 * w), (w, h))


def _rays(cam: CameraModel) -> np.ndarray:
    w, h = cam.size
    u = (np.arange(w, dtype=np.float32) + 0.5 - cam.cx) / cam.f_px
    v = (np.arange(h, dtype=np.float32) + 0.5 - cam.cy) / cam.f_px
    uu, vv = np.meshgrid(u, v)
    r, up, fwd = (a.astype(np.float32) for a in cam.axes)
    return fwd + uu[..., None] * r - vv[..., None] * up


def _smoothstep_lines(coord: np.ndarray, period: float, width: float) -> np.ndarray:
    """1 on thin lines every ``period`` metres, 0 elsewhere, softly anti-aliased."""
    d = np.abs((coord / period + 0.5) % 1.0 - 0.5) * period
    return np.clip(1.0 - d / width, 0.0, 1.0)


@dataclass(frozen=True)
class Backdrop:
    """Cached static pixels of one viewpoint: plain, spot-lit, and in the spot's shadow."""

    plain: np.ndarray  # (H, W, 3) uint8 RGB
    spotlit: np.ndarray
    shadowed: np.ndarray
    wall: np.ndarray  # (H, W) uint8, 255 where the booth wall is seen (shadows fall there)


@functools.lru_cache(maxsize=16)
def backdrop(viewpoint: int, size: tuple[int, int]) -> Backdrop:
    cam = camera(viewpoint, size)
    d = _rays(cam)
    c = cam.position.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_wall = np.where(d[..., 2] < 0, (WALL_Z - c[2]) / d[..., 2], np.inf)
        t_floor = np.where(d[..., 1] < 0, -c[1] / d[..., 1], np.inf)
    t = np.minimum(t_wall, t_floor)
    # Rays that meet neither (only in absurdly wide views of tiny frames) see the hall.
    nowhere = ~np.isfinite(t)
    hit = c + d * np.where(nowhere, 1.0, t)[..., None]
    hit[nowhere] = (0.0, WALL_TOP_Y + 1.0, WALL_Z)
    on_floor = t_floor < t_wall
    hx, hy, hz = hit[..., 0], hit[..., 1], hit[..., 2]

    img = np.empty(d.shape, dtype=np.float32)
    # Wall: painted panels with seams, two banners, lit from above the camera.
    wall = np.array(WALL_RGB, dtype=np.float32)
    seam = _smoothstep_lines(hx, 1.2, 0.012)[..., None]
    img[:] = wall * (1.0 - 0.12 * seam)
    for x0, x1, y0, y1, color in (
        (-2.9, -1.7, 1.55, 2.35, (38, 70, 140)),
        (1.7, 2.9, 1.55, 2.35, (180, 60, 70)),
    ):
        inside = (hx > x0) & (hx < x1) & (hy > y0) & (hy < y1) & ~on_floor
        stripe = ((hx - x0) / (x1 - x0) * 6).astype(np.int32) % 2 == 0
        banner = np.where(stripe[..., None], color, np.multiply(color, 0.75))
        img = np.where(inside[..., None], banner.astype(np.float32), img)
    above = (hy > WALL_TOP_Y) | (np.abs(hx) > WALL_HALF_W)
    img = np.where((above & ~on_floor)[..., None], np.float32((52, 52, 60)), img)
    wall_light = 0.82 + 0.18 * np.exp(-(hx**2) / (2 * 2.2**2) - (hy - 1.6) ** 2 / (2 * 1.4**2))
    # Floor: carpet tiles with slight per-tile variation and a taped dance zone.
    tile = np.floor(hx / 0.6) * 31 + np.floor(hz / 0.6) * 17
    variation = 1.0 + 0.04 * np.sin(tile * 12.9898)
    floor = np.array(FLOOR_RGB, dtype=np.float32) * variation[..., None]
    floor *= (
        1.0
        - 0.15
        * np.maximum(_smoothstep_lines(hx, 0.6, 0.006), _smoothstep_lines(hz, 0.6, 0.006))[
            ..., None
        ]
    )
    tape = ((np.abs(np.abs(hx) - 1.3) < 0.03) & (np.abs(hz) < 1.0)) | (
        (np.abs(np.abs(hz) - 1.0) < 0.03) & (np.abs(hx) < 1.33)
    )
    floor = np.where(tape[..., None], np.float32((215, 190, 70)), floor)
    floor_light = 0.8 + 0.2 * np.exp(-(hx**2 + (hz - 0.5) ** 2) / (2 * 2.0**2))
    # Where wall meets floor, a little ambient occlusion.
    corner = np.exp(-np.abs(np.where(on_floor, hz - WALL_Z, hy)) / 0.15)
    light = np.where(on_floor, floor_light, wall_light) * (1.0 - 0.25 * corner)
    img = np.where(on_floor[..., None], floor, img) * light[..., None]
    # Lens vignette.
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
    img *= (1.0 - 0.18 * r2)[..., None]
    plain = np.clip(img, 0, 255).astype(np.uint8)

    # The side spot brightens a pool on the wall; its shadow is darker than the plain wall.
    to_spot = SPOT_POS.astype(np.float32) - hit
    dist = np.linalg.norm(to_spot, axis=-1)
    aim = np.array((0.5, 1.1, WALL_Z), dtype=np.float32) - SPOT_POS.astype(np.float32)
    aim /= np.linalg.norm(aim)
    cos_a = (-(to_spot / dist[..., None]) @ aim).clip(0, 1)
    pool = np.clip((cos_a - 0.985) / 0.01, 0, 1) * (~above | on_floor)
    spotlit = np.clip(img * (1.0 + 0.25 * pool)[..., None], 0, 255).astype(np.uint8)
    shadowed = np.clip(img * 0.3, 0, 255).astype(np.uint8)
    wall_px = np.where(~on_floor & ~above, 255, 0).astype(np.uint8)
    return Backdrop(plain, spotlit, shadowed, wall_px)


# ---- per-frame effects -----------------------------------------------------------

NOISE_SIGMA = 3.0
_NOISE_MARGIN = 64


@functools.lru_cache(maxsize=8)
def _noise_tiles(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative parts of one Gaussian noise field, larger than the frame."""
    w, h = size
    rng = np.random.default_rng(0x5E45)
    n = rng.normal(0.0, NOISE_SIGMA, (h + _NOISE_MARGIN, w + _NOISE_MARGIN, 3))
    n = np.rint(n).astype(np.int16)
    return np.clip(n, 0, 255).astype(np.uint8), np.clip(-n, 0, 255).astype(np.uint8)


def add_noise(img: np.ndarray, frame_index: int) -> None:
    """Sensor noise in place: a cached tile at an offset that changes every frame."""
    h, w = img.shape[:2]
    pos, neg = _noise_tiles((w, h))
    # A fixed pseudo-random walk through the tile (Knuth's multiplicative hash).
    k = (frame_index * 2654435761) & 0xFFFFFFFF
    dx, dy = k % _NOISE_MARGIN, (k >> 8) % _NOISE_MARGIN
    cv2.add(img, pos[dy : dy + h, dx : dx + w], dst=img)
    cv2.subtract(img, neg[dy : dy + h, dx : dx + w], dst=img)


_EXP3 = math.exp(-3.0)  # the Gaussian's value at the ellipse's rim, where alpha ends


def floor_shadow(
    img: np.ndarray,
    cam: CameraModel,
    center: np.ndarray,
    half_x: float,
    half_z: float,
    strength: float,
) -> None:
    """Darken a soft ellipse on the floor around ``center`` (x, z in metres), in place."""
    if strength <= 0:
        return
    cx, cz = float(center[0]), float(center[1])
    corners = np.array(
        ((cx - half_x, 0, cz), (cx + half_x, 0, cz), (cx, 0, cz - half_z), (cx, 0, cz + half_z))
    )
    uv, depth = cam.project(corners)
    if depth.min() < 0.5:  # the dancer stands on the camera: no sensible floor patch
        return
    h, w = img.shape[:2]
    x0, x1 = max(math.floor(uv[:, 0].min()), 0), min(math.ceil(uv[:, 0].max()), w)
    y0, y1 = max(math.floor(uv[:, 1].min()), 0), min(math.ceil(uv[:, 1].max()), h)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return
    # The projected ellipse, approximated in the image by its axis-aligned extent.
    mx, my = (uv[0, 0] + uv[1, 0]) / 2, (uv[2, 1] + uv[3, 1]) / 2
    rx = max(abs(uv[1, 0] - uv[0, 0]) / 2, 1.0)
    ry = max(abs(uv[3, 1] - uv[2, 1]) / 2, 1.0)
    u = (np.arange(x0, x1, dtype=np.float32) + 0.5 - mx) / rx
    v = (np.arange(y0, y1, dtype=np.float32) + 0.5 - my) / ry
    r2 = v[:, None] ** 2 + u[None, :] ** 2
    alpha = np.clip((np.exp(-3.0 * r2) - _EXP3) / (1.0 - _EXP3), 0.0, 1.0)
    roi = img[y0:y1, x0:x1]
    roi[:] = (roi * (1.0 - strength * alpha)[..., None]).astype(np.uint8)


def spot_view(target: np.ndarray, frame_height: int) -> CameraModel:
    """The spotlight as a camera aimed at ``target``: what it lights is what it sees.

    Its view is sized so the silhouette has about the pixels its shadow will cover
    in a frame ``frame_height`` tall (the shadow spans about half of that).
    """
    size = int(np.clip(round(0.6 * frame_height), 48, 400))
    dist = float(np.linalg.norm(target - SPOT_POS))
    # A 2.6 m tall figure (hands up) fills about 85% of the view.
    f_px = 0.85 * size * dist / 2.6
    return look_at(SPOT_POS, target, f_px, (size, size))


def wall_homography(spot: CameraModel, cam: CameraModel) -> np.ndarray:
    """Maps spot-view pixels to camera pixels through the wall plane (3x3)."""
    w, h = spot.size
    corners = np.array(((0, 0), (w, 0), (w, h), (0, h)), dtype=np.float64)
    rays = (
        spot.axes[2]
        + np.outer((corners[:, 0] - spot.cx) / spot.f_px, spot.axes[0])
        - np.outer((corners[:, 1] - spot.cy) / spot.f_px, spot.axes[1])
    )
    t = (WALL_Z - spot.position[2]) / rays[:, 2]
    on_wall = spot.position + rays * t[:, None]
    uv, _ = cam.project(on_wall)
    return cv2.getPerspectiveTransform(corners.astype(np.float32), uv.astype(np.float32))
