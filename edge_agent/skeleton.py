"""The canonical skeleton: COCO-17 plus the six COCO-WholeBody foot points.

A skeleton is a float32 array of shape (23, 3): ``(x, y, score)`` per joint in
full-frame pixels. ``score == 0`` means the joint is missing; x and y are then
meaningless (kept at 0 by convention).
"""

from __future__ import annotations

import numpy as np

JOINTS: tuple[str, ...] = (
    # COCO-17, in COCO order.
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
    # COCO-WholeBody feet, in WholeBody order.
    "left_big_toe",
    "left_small_toe",
    "left_heel",
    "right_big_toe",
    "right_small_toe",
    "right_heel",
)
NUM_JOINTS = len(JOINTS)
INDEX: dict[str, int] = {name: i for i, name in enumerate(JOINTS)}
# The 12 body joints, shoulders to ankles: what pose metrics compare (the face is tiny
# at training sizes, and the feet are COCO-WholeBody extras).
BODY_12: tuple[int, ...] = tuple(range(INDEX["left_shoulder"], INDEX["right_ankle"] + 1))

# Bones drawn in label maps, with EDN-style distinct colours (RGB). The order is
# fixed: label maps rendered by old checkpoints must stay comparable.
LIMBS: tuple[tuple[str, str], ...] = (
    ("left_shoulder", "right_shoulder"),
    ("left_hip", "right_hip"),
    ("left_shoulder", "left_hip"),
    ("right_shoulder", "right_hip"),
    ("left_shoulder", "left_elbow"),
    ("left_elbow", "left_wrist"),
    ("right_shoulder", "right_elbow"),
    ("right_elbow", "right_wrist"),
    ("left_hip", "left_knee"),
    ("left_knee", "left_ankle"),
    ("right_hip", "right_knee"),
    ("right_knee", "right_ankle"),
    ("left_ankle", "left_heel"),
    ("left_heel", "left_big_toe"),
    ("left_big_toe", "left_small_toe"),
    ("right_ankle", "right_heel"),
    ("right_heel", "right_big_toe"),
    ("right_big_toe", "right_small_toe"),
    ("nose", "left_eye"),
    ("nose", "right_eye"),
    ("left_eye", "left_ear"),
    ("right_eye", "right_ear"),
)
LIMB_INDEX: tuple[tuple[int, int], ...] = tuple((INDEX[a], INDEX[b]) for a, b in LIMBS)

LIMB_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 85),
    (255, 0, 170),
    (255, 85, 0),
    (255, 170, 0),
    (170, 255, 0),
    (85, 255, 0),
    (0, 255, 85),
    (0, 255, 170),
    (0, 170, 255),
    (0, 85, 255),
    (85, 0, 255),
    (170, 0, 255),
    (0, 255, 255),
    (64, 200, 200),
    (32, 160, 160),
    (255, 255, 0),
    (200, 200, 64),
    (160, 160, 32),
    (255, 0, 255),
    (200, 64, 200),
    (160, 32, 160),
    (120, 0, 120),
)
assert len(LIMB_COLORS) == len(LIMBS)

# Left/right pairs, for flip augmentation and swap detection.
FLIP_PAIRS: tuple[tuple[int, int], ...] = tuple(
    (INDEX[n], INDEX["right_" + n[len("left_") :]]) for n in JOINTS if n.startswith("left_")
)

# BlazePose's 33 landmarks -> canonical index. BlazePose has no small toe; its
# "foot_index" (the tip of the foot) stands in for both toes.
BLAZEPOSE_33_TO_CANONICAL: dict[int, int] = {
    0: INDEX["nose"],
    2: INDEX["left_eye"],
    5: INDEX["right_eye"],
    7: INDEX["left_ear"],
    8: INDEX["right_ear"],
    11: INDEX["left_shoulder"],
    12: INDEX["right_shoulder"],
    13: INDEX["left_elbow"],
    14: INDEX["right_elbow"],
    15: INDEX["left_wrist"],
    16: INDEX["right_wrist"],
    23: INDEX["left_hip"],
    24: INDEX["right_hip"],
    25: INDEX["left_knee"],
    26: INDEX["right_knee"],
    27: INDEX["left_ankle"],
    28: INDEX["right_ankle"],
    29: INDEX["left_heel"],
    30: INDEX["right_heel"],
    31: INDEX["left_big_toe"],
    32: INDEX["right_big_toe"],
}
_BLAZEPOSE_SMALL_TOE = {31: INDEX["left_small_toe"], 32: INDEX["right_small_toe"]}

# MoveNet and COCO share the first 17 joints in the same order.
MOVENET_17_TO_CANONICAL: dict[int, int] = {i: i for i in range(17)}


def empty() -> np.ndarray:
    """A skeleton with every joint missing."""
    return np.zeros((NUM_JOINTS, 3), dtype=np.float32)


def from_blazepose(landmarks: np.ndarray) -> np.ndarray:
    """Convert BlazePose (33, >=3) ``(x, y, score)`` landmarks to the canonical skeleton."""
    landmarks = np.asarray(landmarks, dtype=np.float32)
    if landmarks.shape[0] != 33 or landmarks.shape[1] < 3:
        raise ValueError(
            f"expected 33 BlazePose landmarks with (x, y, score), got {landmarks.shape}"
        )
    out = empty()
    for src, dst in BLAZEPOSE_33_TO_CANONICAL.items():
        out[dst] = landmarks[src, :3]
    for src, dst in _BLAZEPOSE_SMALL_TOE.items():
        out[dst] = landmarks[src, :3]
    return out


def from_movenet(keypoints_yxs: np.ndarray, width: int, height: int) -> np.ndarray:
    """Convert MoveNet's (17, 3) normalised ``(y, x, score)`` output to canonical pixels."""
    kp = np.asarray(keypoints_yxs, dtype=np.float32).reshape(17, 3)
    out = empty()
    out[:17, 0] = kp[:, 1] * width
    out[:17, 1] = kp[:, 0] * height
    out[:17, 2] = kp[:, 2]
    return out


def validate(skeleton: np.ndarray) -> np.ndarray:
    """Return ``skeleton`` as float32 (23, 3), raising ValueError on a wrong shape or NaN score."""
    arr = np.asarray(skeleton, dtype=np.float32)
    if arr.shape != (NUM_JOINTS, 3):
        raise ValueError(f"a skeleton has shape ({NUM_JOINTS}, 3), got {arr.shape}")
    if np.isnan(arr[:, 2]).any():
        raise ValueError("a skeleton's scores must not be NaN")
    return arr


def torso_size(skeleton: np.ndarray) -> float:
    """Distance from the shoulder midpoint to the hip midpoint (PCK's reference length)."""
    s = np.asarray(skeleton)
    ls, rs, lh, rh = (
        s[INDEX[n]] for n in ("left_shoulder", "right_shoulder", "left_hip", "right_hip")
    )
    if min(ls[2], rs[2], lh[2], rh[2]) <= 0:
        return float("nan")
    return float(np.hypot(*((ls[:2] + rs[:2]) / 2 - (lh[:2] + rh[:2]) / 2)))


def bbox(skeleton: np.ndarray, min_score: float = 0.0) -> tuple[float, float, float, float] | None:
    """Bounding box ``(x0, y0, x1, y1)`` of the joints scoring above ``min_score``."""
    s = np.asarray(skeleton)
    present = s[:, 2] > min_score
    if not present.any():
        return None
    xs, ys = s[present, 0], s[present, 1]
    return float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())
