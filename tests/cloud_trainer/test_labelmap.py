"""Label maps on known skeletons: pixel checks of both kinds, and the fixed framing."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from cloud_trainer import labelmap as lm
from edge_agent import skeleton as sk


def standing(size: int) -> np.ndarray:
    """A person facing the camera, arms out sideways, in crop pixels of a ``size`` image.

    Facing the camera, the person's left is on the image's right.
    """
    k = size / 64
    pts = {
        "nose": (32, 10),
        "left_eye": (33.5, 9),
        "right_eye": (30.5, 9),
        "left_ear": (35, 10),
        "right_ear": (29, 10),
        "left_shoulder": (38, 18),
        "right_shoulder": (26, 18),
        "left_elbow": (46, 18),
        "right_elbow": (18, 18),
        "left_wrist": (54, 18),
        "right_wrist": (10, 18),
        "left_hip": (36, 34),
        "right_hip": (28, 34),
        "left_knee": (36, 45),
        "right_knee": (28, 45),
        "left_ankle": (36, 56),
        "right_ankle": (28, 56),
        "left_heel": (35, 58),
        "left_big_toe": (39, 59),
        "left_small_toe": (40, 58),
        "right_heel": (29, 58),
        "right_big_toe": (25, 59),
        "right_small_toe": (24, 58),
    }
    s = sk.empty()
    for name, (x, y) in pts.items():
        s[sk.INDEX[name]] = (x * k, y * k, 1.0)
    return s


def body_mask(skel: np.ndarray, size: int) -> np.ndarray:
    """A plausible person mask: thick limbs, a filled torso and a round head."""
    m = np.zeros((size, size), np.uint8)
    w = max(3, size // 12)
    for a, b in sk.LIMB_INDEX:
        cv2.line(m, tuple(int(v) for v in skel[a, :2]), tuple(int(v) for v in skel[b, :2]), 1, w)
    torso = skel[
        [sk.INDEX[n] for n in ("left_shoulder", "right_shoulder", "right_hip", "left_hip")], :2
    ]
    cv2.fillConvexPoly(m, torso.astype(np.int32), 1)
    cv2.circle(m, tuple(int(v) for v in skel[sk.INDEX["nose"], :2]), size // 12, 1, -1)
    return m.astype(bool)


@pytest.mark.parametrize("size", [64, 256])
def test_skeleton_map_draws_each_limb_in_its_colour_at_its_midpoint(size: int) -> None:
    skel = standing(size)
    img = lm.render_skeleton(skel, size)
    for (a, b), color in zip(sk.LIMB_INDEX, sk.LIMB_COLORS, strict=True):
        pa, pb = skel[a, :2], skel[b, :2]
        if np.linalg.norm(pa - pb) < 6 * lm.stroke_px(size):
            continue  # short limbs (toes, eyes) are covered by the joint dots
        mid = ((pa + pb) / 2).astype(int)
        assert tuple(img[mid[1], mid[0]]) == color, sk.LIMBS[sk.LIMB_INDEX.index((a, b))]


def test_skeleton_map_is_black_away_from_the_person() -> None:
    img = lm.render_skeleton(standing(64), 64)
    assert img[0:4].max() == 0 and img[:, 0:4].max() == 0
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)


def test_skeleton_map_skips_limbs_with_a_missing_joint() -> None:
    skel = standing(64)
    skel[sk.INDEX["left_wrist"], 2] = 0.0  # forearm end missing
    img = lm.render_skeleton(skel, 64)
    forearm_mid = ((skel[sk.INDEX["left_elbow"], :2] + np.array([54, 18])) / 2).astype(int)
    assert tuple(img[forearm_mid[1] + 0, forearm_mid[0] + 2]) == (0, 0, 0)


def test_skeleton_stroke_scales_with_the_image() -> None:
    widths = []
    for size in (64, 256):
        img = lm.render_skeleton(standing(size), size)
        x = int(size * 42 / 64)  # along the left upper arm (horizontal)
        colour = np.array(sk.LIMB_COLORS[sk.LIMBS.index(("left_shoulder", "left_elbow"))])
        widths.append(int((np.abs(img[:, x].astype(int) - colour).sum(1) == 0).sum()))
    assert widths[0] >= 2 and widths[1] >= 2 * widths[0]


def part_at(ids: np.ndarray, x: float, y: float) -> str:
    return lm.PART_NAMES[ids[int(y), int(x)]]


def test_parts_map_assigns_pose_guided_parts_on_the_mask() -> None:
    size = 128
    skel = standing(size)
    mask = body_mask(skel, size)
    ids = lm.part_index_map(skel, mask)
    k = size / 64
    assert part_at(ids, 50 * k, 18 * k).startswith("left_lower_arm")  # image right: person's left
    assert part_at(ids, 14 * k, 18 * k).startswith("right_lower_arm")
    assert part_at(ids, 42 * k, 18 * k).startswith("left_upper_arm")
    assert part_at(ids, 36 * k, 50 * k).startswith("left_lower_leg")
    assert part_at(ids, 28 * k, 40 * k).startswith("right_upper_leg")
    assert part_at(ids, 34 * k, 26 * k) == "left_torso"
    assert part_at(ids, 30 * k, 26 * k) == "right_torso"
    assert part_at(ids, 33 * k, 9 * k) == "left_face"
    assert part_at(ids, 31 * k, 9 * k) == "right_face"
    # The two sides of a limb get different parts: above the arm is outer (away from the torso
    # centre, which is below the arms), below it inner.
    assert part_at(ids, 50 * k, 18 * k - 2) == "left_lower_arm_outer"
    assert part_at(ids, 50 * k, 18 * k + 2) == "left_lower_arm_inner"
    assert (ids[~mask] == -1).all() and (ids[mask] >= 0).all()
    assert len(set(np.unique(ids[mask]).tolist())) >= 18


def test_parts_map_colours_parts_and_leaves_background_black() -> None:
    size = 64
    skel = standing(size)
    mask = body_mask(skel, size)
    img = lm.render_parts(skel, mask)
    ids = lm.part_index_map(skel, mask)
    y, x = 18, 50
    assert tuple(img[y, x]) == lm.PART_COLORS[ids[y, x]]
    assert (img[~mask] == 0).all()
    assert lm.NUM_PARTS == 24 and len(set(lm.PART_COLORS)) == 24
    assert (0, 0, 0) not in lm.PART_COLORS


def test_parts_map_without_a_pose_keeps_the_outline_in_grey() -> None:
    mask = np.zeros((32, 32), bool)
    mask[8:24, 10:20] = True
    img = lm.render_parts(sk.empty(), mask)
    assert tuple(img[16, 15]) == lm.UNKNOWN_COLOR and tuple(img[2, 2]) == (0, 0, 0)


def test_render_label_refuses_parts_without_a_mask_and_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="mask"):
        lm.render_label("parts", standing(64), 64)
    with pytest.raises(ValueError, match="unknown label map"):
        lm.render_label("densepose", standing(64), 64)


def test_framing_maps_frame_pixels_and_skeleton_to_the_same_place() -> None:
    w, h = 320, 240
    frame = np.zeros((h, w, 3), np.uint8)
    poses = np.stack([standing(64) * np.array([2.0, 2.0, 1.0], np.float32) + [100, 40, 0]])
    framing = lm.Framing.from_poses(poses, w, h)
    wrist = poses[0, sk.INDEX["left_wrist"], :2]
    cv2.circle(frame, (int(wrist[0]), int(wrist[1])), 3, (255, 255, 255), -1)
    crop = framing.crop(frame, 64)
    skel = framing.to_crop(poses[0], 64)
    y, x = np.unravel_index(crop[..., 0].argmax(), crop.shape[:2])
    assert abs(x - skel[sk.INDEX["left_wrist"], 0]) <= 1.5
    assert abs(y - skel[sk.INDEX["left_wrist"], 1]) <= 1.5
    # The box holds every joint, with room for the head above the nose.
    assert (skel[:, :2] >= 0).all() and (skel[:, :2] < 64).all()
    assert skel[sk.INDEX["nose"], 1] > 64 * 0.1


def test_framing_letterboxes_outside_the_frame_in_black() -> None:
    w, h = 160, 120
    frame = np.full((h, w, 3), 200, np.uint8)
    framing = lm.Framing.whole_frame(w, h)  # square box taller than the frame
    crop = framing.crop(frame, 64)
    assert crop[0].max() == 0 and crop[-1].max() == 0  # bars above and below
    assert crop[32, 32].min() == 200
    assert lm.Framing.from_dict(framing.to_dict()) == framing
