"""Shadow and false-positive suppression.

Give the backend the zone (``create_pose_backend(cfg.pose, zone=cfg.zone)``) and it
gates every estimate itself, which matters in tracking mode: a rejected "person"
is not tracked into the next frame, and when the top detection is a shadow the next
ones get a chance. ``gate()`` also works after the fact on any PoseResult, but then
a tracker that has locked onto a shadow stays there.

Measured here (DESIGN.md): a person-shaped wall shadow *alone* is detected by
BlazePose as a person in 56 of 60 frames, with visibility 0.92, so confidence cannot
tell a shadow from a person. Worse, selfie segmentation marks such a shadow as a
person too (on our synthetic booth, up to 70% of the shadow's joints lay on a
whole-frame mask). What does separate them, in order of the checks below:

1. **a visible face** (``ZoneConfig.min_face_contrast``). A shadow is a flat patch:
   around its "eyes" and "nose" the grey levels spread by 4-11 (sensor noise). A
   face spreads by 130-230 (eyes, skin). Measured on 148 detected shadows and 207
   people of the synthetic booth (``FACE_PAD``). A person is *acquired* only with a
   face; once tracked from a frame where they had one, they keep being tracked
   through a turn with their back to the camera (BlazePose still finds 96% of their
   joints within 0.1 torso there), since a shadow never gets tracked to begin with.
2. **the person mask** (``require_mask_overlap``): enough of the confident joints
   must lie on the segmentation mask, which removes a "person" the segmentation of
   its own region does not see (background clutter).
3. **feet on the floor** (``floor_polygon``, optional): a wall shadow's feet are on
   the wall, above the dance floor's back edge.
4. **per joint**: joints off the mask or outside the booth-zone ``polygon`` are
   dropped, and if fewer than ``MIN_BODY_JOINTS`` torso and leg joints remain,
   nobody is there. A limb joint off the mask is kept when it hangs, within its bone's
   length, from a joint that is kept (``attach_limbs``): the segmentation often loses
   an arm held away from the body, and a joint further off cannot be this body's.

Each rejection is logged at debug level with its reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import cv2
import numpy as np

from edge_agent import skeleton as sk
from edge_agent.config import ZoneConfig
from edge_agent.pose.base import PoseResult

log = logging.getLogger(__name__)

# A joint is on the mask if the mask reaches this anywhere within its neighbourhood.
MASK_THRESHOLD = 0.5
# Neighbourhood radius as a fraction of the frame's longer side: joints sit on the
# body's outline (wrists, ankles, ears), where a 256x256 mask is blurred, and in
# tracking mode the mask may be a few frames old.
MASK_RADIUS_FRAC = 0.015
CONFIDENT = 0.5  # joints at least this confident decide whether the person is real
# Padding of the face box, in eye distances. 0.4 let a shadow's head outline against a
# banner into the box (contrast 176); 0.2 keeps shadows at 4-11 and faces at 130+
# (5th percentile, 207 frames of 4 attendees incl. turns, 320x240 and 640x480).
FACE_PAD = 0.2
MIN_BODY_JOINTS = 3
_I = sk.INDEX
_BODY = np.array(
    [
        _I[n]
        for n in (
            "left_shoulder",
            "right_shoulder",
            "left_hip",
            "right_hip",
            "left_knee",
            "right_knee",
            "left_ankle",
            "right_ankle",
        )
    ]
)
_FEET = np.array(
    [
        _I[n]
        for n in (
            "left_ankle",
            "right_ankle",
            "left_heel",
            "right_heel",
            "left_big_toe",
            "right_big_toe",
        )
    ]
)


# Limbs the person mask often misses: selfie segmentation thins out or loses an arm held
# away from the body (measured on the pose bench: 95% of the joints the mask check
# dropped were correct, 62% of them wrists, 25% elbows, 13% feet, up to a torso length
# off the mask). Such a joint is kept when the joint it hangs from is kept and it lies
# within the bone's length of it. Lengths in torso lengths (shoulder midpoint to hip
# midpoint, ~0.30 of body height): anthropometric means (upper arm 0.63, forearm 0.49,
# thigh and shin 0.82, ankle to toe 0.40, to heel 0.17) with 25% slack. A projected bone
# is never longer than the bone, so a joint further off is not part of this body.
_LIMBS: tuple[tuple[str, str, float], ...] = tuple(
    (f"{side}_{parent}", f"{side}_{child}", length)
    for side in ("left", "right")
    for parent, child, length in (
        ("shoulder", "elbow", 0.80),
        ("elbow", "wrist", 0.62),
        ("hip", "knee", 1.02),
        ("knee", "ankle", 1.02),
        ("ankle", "heel", 0.22),
        ("ankle", "big_toe", 0.50),
        ("ankle", "small_toe", 0.50),
    )
)
_LIMB_INDEX = tuple((_I[p], _I[c], length) for p, c, length in _LIMBS)


def attach_limbs(skeleton: np.ndarray, kept: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """``kept`` plus the ``candidates`` that hang, within their bone's length, from a kept
    joint (outwards from the torso: an elbow kept this way carries its wrist)."""
    torso = sk.torso_size(skeleton)
    out = kept.copy()
    if not np.isfinite(torso) or torso <= 0:
        return out
    for parent, child, length in _LIMB_INDEX:
        if out[child] or not candidates[child] or not out[parent]:
            continue
        bone = float(np.hypot(*(skeleton[child, :2] - skeleton[parent, :2])))
        if bone <= length * torso:
            out[child] = True
    return out


def points_in_polygon(points: np.ndarray, polygon: Sequence[tuple[float, float]]) -> np.ndarray:
    """Even-odd rule: which of ``points`` (N, 2) lie inside ``polygon`` (same units)."""
    poly = np.asarray(polygon, dtype=np.float64)
    x, y = points[:, 0:1].astype(np.float64), points[:, 1:2].astype(np.float64)
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    crosses = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    hits = crosses & (x < x_at)
    return (hits.sum(axis=1) % 2) == 1


def mask_at(mask: np.ndarray, points: np.ndarray, radius_px: int) -> np.ndarray:
    """The highest mask value near each point (0 for points off the frame).

    "Near" is a 5x5 grid of samples spanning ``radius_px`` either side: one vectorised
    lookup for all joints, instead of a window per joint.
    """
    h, w = mask.shape
    xy = np.nan_to_num(points[:, :2].astype(np.float64), nan=-1e9)
    cx, cy = np.rint(xy[:, 0]).astype(np.int64), np.rint(xy[:, 1]).astype(np.int64)
    inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
    steps = np.rint(np.linspace(-radius_px, radius_px, 5)).astype(np.int64)
    ys = np.clip(cy[:, None, None] + steps[None, :, None], 0, h - 1)
    xs = np.clip(cx[:, None, None] + steps[None, None, :], 0, w - 1)
    near = mask[ys, xs].reshape(len(points), -1).max(axis=1)
    return np.where(inside, near, 0.0).astype(np.float32)


def _radius_px(mask: np.ndarray) -> int:
    return max(1, round(MASK_RADIUS_FRAC * max(mask.shape)))


def face_contrast(rgb: np.ndarray, skeleton: np.ndarray) -> float:
    """Grey-level spread (95th - 5th percentile) in the box around the eyes and nose.

    The box spans the eyes and the nose, padded by ``FACE_PAD`` eye distances: inside
    the head, so a shadow's outline against the wall (or a banner behind its head)
    stays out of it. Returns 0 when the box falls off the frame.
    """
    le, re, nose = skeleton[_I["left_eye"]], skeleton[_I["right_eye"]], skeleton[_I["nose"]]
    if not np.isfinite(np.concatenate([le[:2], re[:2], nose[:2]])).all():
        return 0.0
    pad = max(FACE_PAD * float(np.hypot(le[0] - re[0], le[1] - re[1])), 1.0)
    x0 = int(np.floor(min(le[0], re[0], nose[0]) - pad))
    x1 = int(np.ceil(max(le[0], re[0], nose[0]) + pad))
    y0 = int(np.floor(min(le[1], re[1], nose[1]) - pad))
    y1 = int(np.ceil(max(le[1], re[1], nose[1]) + pad))
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return 0.0
    grey = cv2.cvtColor(np.ascontiguousarray(rgb[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)
    lo, hi = np.percentile(grey, (5, 95))
    return float(hi - lo)


def gate(
    result: PoseResult,
    zone: ZoneConfig,
    rgb: np.ndarray | None = None,
    *,
    require_face: bool = True,
) -> PoseResult:
    """Keep a real person, drop a shadow; see the module docstring for the checks.

    ``rgb`` is the frame the result came from (needed for the face check; without it
    that check is skipped). ``require_face=False`` skips the face check for a person
    tracked from a frame where they passed it: a dancer who turns their back stays the
    dancer (a shadow never passes it, so it is never tracked). Returns a new PoseResult
    and leaves the input alone; a rejected person comes back with ``detected=False``
    and an empty skeleton.
    """
    if not result.detected:
        return result
    skel = result.skeleton.copy()
    confident = skel[:, 2] >= CONFIDENT
    size = _frame_size(result, rgb)

    if require_face and rgb is not None and zone.min_face_contrast > 0:
        contrast = face_contrast(rgb, skel)
        if contrast < zone.min_face_contrast:
            return _nobody(result, f"no visible face (contrast {contrast:.0f})")

    present = skel[:, 2] > 0
    if size is not None:
        scale = np.array(size, np.float32)
        norm = skel[:, :2] / scale
        if zone.floor_polygon is not None:
            feet = _FEET[confident[_FEET]]
            if feet.size and not points_in_polygon(norm[feet], zone.floor_polygon).any():
                return _nobody(result, "no confident foot on the floor zone")
        present &= points_in_polygon(norm, zone.polygon)

    kept = present
    if result.mask is not None:
        on_mask = mask_at(result.mask, skel, _radius_px(result.mask)) >= MASK_THRESHOLD
        n_conf = int(confident.sum())
        overlap = float((on_mask & confident).sum()) / n_conf if n_conf else 0.0
        if overlap < zone.require_mask_overlap:
            return _nobody(result, f"{overlap:.0%} of confident joints on the person mask")
        # Whether anybody is there is decided by the joints on the mask alone; limbs the
        # mask missed are then attached to them.
        present = present & on_mask
        kept = attach_limbs(skel, present, kept)

    body_left = int((present[_BODY] & confident[_BODY]).sum())
    if body_left < MIN_BODY_JOINTS:
        return _nobody(result, f"{body_left} body joints left in the zone and on the mask")
    skel[~kept] = 0.0
    return replace(result, skeleton=skel, box=sk.bbox(skel, CONFIDENT))


def _frame_size(result: PoseResult, rgb: np.ndarray | None) -> tuple[int, int] | None:
    if result.frame_size is not None:
        return result.frame_size
    if rgb is not None:
        return rgb.shape[1], rgb.shape[0]
    if result.mask is not None:
        return result.mask.shape[1], result.mask.shape[0]
    return None


def _nobody(result: PoseResult, reason: str) -> PoseResult:
    log.debug("rejected a person: %s", reason)
    return replace(result, skeleton=sk.empty(), detected=False, box=None)
