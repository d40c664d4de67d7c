"""Label maps: what the generator sees in place of a person.

Two kinds, chosen by ``trainer.label_map``:

- ``skeleton``: EDN-style (Chan et al. 2019, "Everybody Dance Now") coloured limb
  strokes in ``edge_agent.skeleton.LIMBS`` order and colours, plus a dot per joint;
  the stroke width scales with the image.
- ``parts``: the seed's BodyPix alternative. The person mask (selfie segmentation on
  real takes, the renderer's mask on synthetic ones) is split into 24 parts by the
  pose: each mask pixel goes to the nearest body segment (face, torso, upper arm,
  forearm, hand, thigh, shin, foot), and each segment is halved: face and torso
  into the person's left and right, limbs into their outer and inner side (away
  from / towards the torso's axis). BodyPix splits limbs into front and back, which
  a 2D pose cannot tell; the outer/inner split carries the limb's outline instead.

Both are drawn in the booth's fixed framing (``Framing``): one square crop box per
camera and take, computed from every pose of the take, so the person's size and
place in the crop are the real ones and the label map and the frame line up.
"""

from __future__ import annotations

import colorsys
import logging
from dataclasses import asdict, dataclass
from typing import Literal

import cv2
import numpy as np

from edge_agent import skeleton as sk

log = logging.getLogger(__name__)

LabelMapKind = Literal["skeleton", "parts"]
KINDS: tuple[str, ...] = ("skeleton", "parts")

# A joint below this score is missing (the pose backends report visibility-like scores;
# the synthetic booth uses 0/1).
MIN_SCORE = 0.3


# ---- framing -----------------------------------------------------------------------


@dataclass(frozen=True)
class Framing:
    """A square crop box in full-frame pixels; parts outside the frame are letterboxed black."""

    x0: float
    y0: float
    side: float
    frame_w: int
    frame_h: int

    # The skeleton stops at the nose and the toes: the crop adds room for the head and
    # hair above, a little floor below and the arms' width at the sides (head heights
    # are about 1/7.5 of the body, DESIGN.md).
    PAD_TOP = 0.22
    PAD_BOTTOM = 0.06
    PAD_SIDE = 0.12

    @classmethod
    def from_poses(cls, poses: np.ndarray, frame_w: int, frame_h: int) -> Framing:
        """The box holding every pose of a take (with margins), square, centred on them."""
        poses = np.asarray(poses, dtype=np.float32).reshape(-1, sk.NUM_JOINTS, 3)
        present = poses[..., 2] >= MIN_SCORE
        if not present.any():
            raise ValueError("no joint in any pose: cannot frame the take")
        xs, ys = poses[..., 0][present], poses[..., 1][present]
        # Percentiles rather than extremes: one glitched joint must not shrink the person.
        x0, x1 = np.percentile(xs, [0.5, 99.5])
        y0, y1 = np.percentile(ys, [0.5, 99.5])
        h = max(y1 - y0, 1.0)
        x0, x1 = x0 - cls.PAD_SIDE * h, x1 + cls.PAD_SIDE * h
        y0, y1 = y0 - cls.PAD_TOP * h, y1 + cls.PAD_BOTTOM * h
        side = max(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        return cls(float(cx - side / 2), float(cy - side / 2), float(side), frame_w, frame_h)

    @classmethod
    def whole_frame(cls, frame_w: int, frame_h: int) -> Framing:
        """Letterbox the whole frame (for takes whose person fills it)."""
        side = max(frame_w, frame_h)
        return cls((frame_w - side) / 2, (frame_h - side) / 2, float(side), frame_w, frame_h)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Framing:
        return cls(
            float(d["x0"]), float(d["y0"]), float(d["side"]), int(d["frame_w"]), int(d["frame_h"])
        )

    def _box(self) -> tuple[int, int, int]:
        return round(self.x0), round(self.y0), max(1, round(self.side))

    def crop(self, image: np.ndarray, size_px: int) -> np.ndarray:
        """Cut the box out of a full frame (H, W[, C]) and scale it to ``size_px``."""
        if image.shape[0] != self.frame_h or image.shape[1] != self.frame_w:
            raise ValueError(
                f"frame is {image.shape[1]}x{image.shape[0]}, framing expects "
                f"{self.frame_w}x{self.frame_h}"
            )
        x0, y0, side = self._box()
        canvas = np.zeros((side, side, *image.shape[2:]), dtype=image.dtype)
        sx0, sy0 = max(x0, 0), max(y0, 0)
        sx1, sy1 = min(x0 + side, self.frame_w), min(y0 + side, self.frame_h)
        if sx1 > sx0 and sy1 > sy0:
            canvas[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
        interp = cv2.INTER_AREA if side > size_px else cv2.INTER_LINEAR
        return cv2.resize(canvas, (size_px, size_px), interpolation=interp)

    def crop_mask(self, mask: np.ndarray, size_px: int) -> np.ndarray:
        """A person mask (H, W) of probabilities or booleans -> boolean (size, size)."""
        return self.crop(np.asarray(mask, dtype=np.float32), size_px) >= 0.5

    def to_crop(self, skeleton: np.ndarray, size_px: int) -> np.ndarray:
        """Full-frame skeleton -> skeleton in crop pixels (missing joints stay missing)."""
        x0, y0, side = self._box()
        out = np.array(skeleton, dtype=np.float32, copy=True)
        k = size_px / side
        present = out[:, 2] > 0
        out[present, 0] = (out[present, 0] - x0) * k
        out[present, 1] = (out[present, 1] - y0) * k
        out[~present, :2] = 0
        return out


# ---- skeleton label map ------------------------------------------------------------


def stroke_px(size_px: int) -> int:
    """Limb stroke width: 2 px at 64, 3 at 128, 5 at 256, 11 at 512 (EDN draws ~1/50 of the body)."""
    return max(2, round(size_px / 48))


# One colour per joint for the dots, distinct from each other (hue wheel, two brightnesses).
JOINT_COLORS: tuple[tuple[int, int, int], ...] = tuple(
    tuple(
        int(round(255 * c))
        for c in colorsys.hsv_to_rgb(i / sk.NUM_JOINTS, 1.0, 1.0 - 0.35 * (i % 2))
    )
    for i in range(sk.NUM_JOINTS)
)


def _present(skel: np.ndarray) -> np.ndarray:
    return skel[:, 2] >= MIN_SCORE


def render_skeleton(skel: np.ndarray, size_px: int) -> np.ndarray:
    """Skeleton in crop pixels -> (size, size, 3) uint8 RGB label map on black."""
    skel = sk.validate(skel)
    img = np.zeros((size_px, size_px, 3), dtype=np.uint8)
    present = _present(skel)
    width = stroke_px(size_px)
    shift = 4  # sub-pixel precision: strokes land where the joints are, not rounded
    pts = np.round(skel[:, :2] * (1 << shift)).astype(np.int64)
    for (a, b), color in zip(sk.LIMB_INDEX, sk.LIMB_COLORS, strict=True):
        if present[a] and present[b]:
            cv2.line(img, tuple(pts[a]), tuple(pts[b]), color, width, cv2.LINE_AA, shift)
    radius = max(1, width // 2 + 1) << shift
    for j in np.flatnonzero(present):
        cv2.circle(img, tuple(pts[j]), radius, JOINT_COLORS[j], -1, cv2.LINE_AA, shift)
    return img


# ---- parts label map ---------------------------------------------------------------

# Segments of the body: (name, from, to). Points are joint names or derived points.
SEGMENTS: tuple[tuple[str, str, str], ...] = (
    ("face", "neck", "nose"),
    ("torso", "neck", "mid_hip"),
    ("left_upper_arm", "left_shoulder", "left_elbow"),
    ("right_upper_arm", "right_shoulder", "right_elbow"),
    ("left_lower_arm", "left_elbow", "left_wrist"),
    ("right_lower_arm", "right_elbow", "right_wrist"),
    ("left_hand", "left_wrist", "left_hand_tip"),
    ("right_hand", "right_wrist", "right_hand_tip"),
    ("left_upper_leg", "left_hip", "left_knee"),
    ("right_upper_leg", "right_hip", "right_knee"),
    ("left_lower_leg", "left_knee", "left_ankle"),
    ("right_lower_leg", "right_knee", "right_ankle"),
    ("left_foot", "left_heel", "left_toes"),
    ("right_foot", "right_heel", "right_toes"),
)
_SPLIT_LR = ("face", "torso")  # halved into the person's left and right
_WHOLE = ("left_hand", "right_hand", "left_foot", "right_foot")  # not halved


def _part_names() -> tuple[str, ...]:
    names = []
    for seg, _, _ in SEGMENTS:
        if seg in _SPLIT_LR:
            names += [f"left_{seg}", f"right_{seg}"]
        elif seg in _WHOLE:
            names.append(seg)
        else:
            names += [f"{seg}_outer", f"{seg}_inner"]
    return tuple(names)


PART_NAMES: tuple[str, ...] = _part_names()
NUM_PARTS = len(PART_NAMES)  # 24, as BodyPix
PART: dict[str, int] = {n: i for i, n in enumerate(PART_NAMES)}
# Mask pixels no segment claims (no pose at all): drawn grey, so the outline survives.
UNKNOWN_COLOR = (128, 128, 128)
# Every RGB colour whose channels are 0, 128 or 255, minus black (background), grey
# (unclaimed) and white: exactly 24, at least 127 apart in some channel. The stride
# through them puts neighbouring parts far apart.
_LEVELS = (0, 128, 255)
_CUBE = [
    (r, g, b)
    for r in _LEVELS
    for g in _LEVELS
    for b in _LEVELS
    if (r, g, b) not in ((0, 0, 0), UNKNOWN_COLOR, (255, 255, 255))
]
PART_COLORS: tuple[tuple[int, int, int], ...] = tuple(
    _CUBE[(i * 7) % NUM_PARTS] for i in range(NUM_PARTS)
)
assert len(set(PART_COLORS)) == NUM_PARTS


def _derived_points(skel: np.ndarray) -> dict[str, np.ndarray | None]:
    """Joint positions plus the segment ends the skeleton lacks (neck, hand tips, toes)."""
    present = _present(skel)
    pts: dict[str, np.ndarray | None] = {
        n: (skel[i, :2].astype(np.float64) if present[i] else None) for n, i in sk.INDEX.items()
    }

    def mid(a: str, b: str) -> np.ndarray | None:
        pa, pb = pts[a], pts[b]
        if pa is None or pb is None:
            return pa if pb is None else pb
        return (pa + pb) / 2

    pts["neck"] = mid("left_shoulder", "right_shoulder")
    pts["mid_hip"] = mid("left_hip", "right_hip")
    for side in ("left", "right"):
        wrist, elbow = pts[f"{side}_wrist"], pts[f"{side}_elbow"]
        # A hand reaches about 0.7 head heights past the wrist, ~half a forearm (DESIGN.md).
        pts[f"{side}_hand_tip"] = (
            None if wrist is None or elbow is None else wrist + 0.5 * (wrist - elbow)
        )
        toes = mid(f"{side}_big_toe", f"{side}_small_toe")
        pts[f"{side}_toes"] = toes
        if pts[f"{side}_heel"] is None:
            pts[f"{side}_heel"] = pts[f"{side}_ankle"]
    return pts


def part_index_map(skel: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(size, size) int16: part id per mask pixel, -1 off the person, NUM_PARTS if unclaimed."""
    skel = sk.validate(skel)
    mask = np.asarray(mask, dtype=bool)
    out = np.full(mask.shape, -1, dtype=np.int16)
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return out
    pts = _derived_points(skel)
    segs = [(name, pts[a], pts[b]) for name, a, b in SEGMENTS]
    segs = [(n, a, b) for n, a, b in segs if a is not None and b is not None]
    if not segs:
        out[ys, xs] = NUM_PARTS
        return out
    p = np.stack([xs, ys], axis=1).astype(np.float64) + 0.5  # pixel centres
    a = np.stack([s[1] for s in segs])  # (S, 2)
    b = np.stack([s[2] for s in segs])
    ab = b - a
    length2 = np.maximum((ab**2).sum(1), 1e-9)
    ap = p[:, None, :] - a[None]  # (N, S, 2)
    t = np.clip((ap * ab[None]).sum(2) / length2[None], 0.0, 1.0)
    dist2 = ((ap - t[..., None] * ab[None]) ** 2).sum(2)
    # The torso is a quadrilateral, not a line: inside it, it always wins.
    names = [s[0] for s in segs]
    torso_poly = [pts[n] for n in ("left_shoulder", "right_shoulder", "right_hip", "left_hip")]
    if "torso" in names and all(q is not None for q in torso_poly):
        poly = np.round(np.stack(torso_poly) * 16).astype(np.int32)
        inside = np.zeros(mask.shape, np.uint8)
        cv2.fillConvexPoly(inside, poly, 1, cv2.LINE_8, 4)
        dist2[inside[ys, xs] > 0, names.index("torso")] = -1.0
    nearest = dist2.argmin(1)
    # Which side of its segment's axis each pixel lies on (z of the 2D cross product).
    cross = (ab[nearest, 0] * ap[np.arange(len(p)), nearest, 1]) - (
        ab[nearest, 1] * ap[np.arange(len(p)), nearest, 0]
    )
    centre = pts["mid_hip"] if pts["neck"] is None else pts["neck"]
    if pts["neck"] is not None and pts["mid_hip"] is not None:
        centre = (pts["neck"] + pts["mid_hip"]) / 2
    part_ids = np.empty(len(p), dtype=np.int16)
    for s, name in enumerate(names):
        sel = nearest == s
        if not sel.any():
            continue
        if name in _WHOLE:
            part_ids[sel] = PART[name]
            continue
        if name in _SPLIT_LR:
            # With y pointing down, a positive cross product is on the image right of an
            # upward axis (neck->nose), or on the image left of a downward one
            # (neck->hip): either way the person's left when they face the camera.
            positive = cross[sel] > 0 if name == "face" else cross[sel] < 0
            part_ids[sel] = np.where(positive, PART[f"left_{name}"], PART[f"right_{name}"])
            continue
        # Outer = the side of the limb's axis away from the torso's centre.
        if centre is None:
            centre_side = 1.0
        else:
            c = centre - a[s]
            centre_side = ab[s, 0] * c[1] - ab[s, 1] * c[0]
        outer = np.sign(cross[sel]) != np.sign(centre_side)
        part_ids[sel] = np.where(outer, PART[f"{name}_outer"], PART[f"{name}_inner"])
    out[ys, xs] = part_ids
    return out


_PALETTE = np.array([*PART_COLORS, UNKNOWN_COLOR, (0, 0, 0)], dtype=np.uint8)


def render_parts(skel: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Skeleton in crop pixels and the person mask at crop size -> (S, S, 3) uint8 RGB."""
    ids = part_index_map(skel, mask)
    return _PALETTE[np.where(ids < 0, len(_PALETTE) - 1, ids)]


def render_label(
    kind: str, skel: np.ndarray, size_px: int, mask: np.ndarray | None = None
) -> np.ndarray:
    """The label map of ``kind`` for one skeleton in crop pixels (and its mask for ``parts``)."""
    if kind == "skeleton":
        return render_skeleton(skel, size_px)
    if kind == "parts":
        if mask is None:
            raise ValueError("the parts label map needs the person mask")
        if mask.shape != (size_px, size_px):
            raise ValueError(f"mask is {mask.shape}, expected ({size_px}, {size_px})")
        return render_parts(skel, mask)
    raise ValueError(f"unknown label map {kind!r} (expected one of {', '.join(KINDS)})")
