"""Shadow and false-positive suppression: a wall shadow alone is nobody, a person stays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent import skeleton as sk
from edge_agent.config import CpuPose, ZoneConfig
from edge_agent.pose import gating
from edge_agent.pose.base import PoseResult, create_pose_backend
from edge_agent.synth import Attendee, Dance, render

MODELS = Path(__file__).resolve().parents[2] / "models"
SIZE = (320, 240)
W, H = SIZE


@pytest.fixture(scope="module")
def backend():
    return create_pose_backend(CpuPose(models_dir=MODELS, mode="full", segmentation=True))


@pytest.fixture(scope="module")
def stepout():
    """The step-out dance: the dancer walks out to the left, their wall shadow stays a while."""
    return Attendee.from_seed(3), Dance.from_name("stepout")


def test_gated_tracking_drops_the_lone_wall_shadow_and_finds_the_dancer_again(stepout):
    _, dance = stepout
    cfg = CpuPose(models_dir=MODELS, mode="tracking", segmentation=True)
    shadow_only = fooled = person = found = 0
    # At camera-like rates the plain tracker follows the dancer out and onto the shadow
    # (DESIGN.md: within 1-2 frames). Whether it does depends on the attendee, so try
    # a second one if the first does not fool it.
    for seed in (1, 2):
        attendee = Attendee.from_seed(seed)
        raw_backend = create_pose_backend(cfg)
        gated_backend = create_pose_backend(cfg, zone=ZoneConfig())
        for k, t in enumerate(np.arange(1.2, 3.4, 1 / 30)):
            frame = render(attendee, dance.pose(t), size=SIZE, frame_index=k, shadow="hard")
            raw = raw_backend.estimate(frame.rgb)
            gated = gated_backend.estimate(frame.rgb)
            if not frame.in_frame.any() and frame.shadow_mask.sum() > 500:
                shadow_only += 1  # the dancer is gone, their shadow is not
                fooled += raw.detected
                assert not gated.detected, (seed, t)
                assert (gated.skeleton == 0).all() and gated.box is None
            elif frame.visible.sum() >= 12:
                person += 1
                ok = (gated.skeleton[:, 2] > 0.5) & frame.visible
                err = np.hypot(*(gated.skeleton[ok, :2] - frame.keypoints[ok, :2]).T)
                found += gated.detected and np.median(err) < 0.1 * sk.torso_size(frame.keypoints)
        if fooled:
            break
    assert shadow_only >= 10 and person >= 10, (shadow_only, person)
    # Otherwise this test proves nothing: the raw tracker must have been fooled.
    assert fooled >= 1
    assert found >= 0.9 * person, (found, person)


def test_gating_keeps_the_real_person_beside_their_shadow(backend, stepout):
    attendee, dance = stepout
    for k, t in enumerate((0.4, 0.8, 1.2)):
        frame = render(attendee, dance.pose(t), size=SIZE, frame_index=k)
        assert frame.shadow_mask is not None and frame.shadow_mask.sum() > 500
        raw = backend.estimate(frame.rgb)
        gated = gating.gate(raw, ZoneConfig(), frame.rgb)
        assert gated.detected, t
        kept = (gated.skeleton[:, 2] > 0.5) & frame.visible
        seen = (raw.skeleton[:, 2] > 0.5) & frame.visible
        assert kept.sum() >= 0.9 * seen.sum(), (t, kept.sum(), seen.sum())
        # What is kept is the person, not the shadow beside them.
        err = np.hypot(*(gated.skeleton[kept, :2] - frame.keypoints[kept, :2]).T)
        assert np.median(err) < 0.1 * sk.torso_size(frame.keypoints)


def _standing(x0: float = 100.0, y0: float = 40.0) -> np.ndarray:
    """A hand-made upright skeleton in a 320x240 frame, every joint confident."""
    s = sk.empty()
    rows = {
        "nose": (0, 0),
        "left_eye": (4, -3),
        "right_eye": (-4, -3),
        "left_ear": (8, 0),
        "right_ear": (-8, 0),
        "left_shoulder": (20, 30),
        "right_shoulder": (-20, 30),
        "left_elbow": (25, 60),
        "right_elbow": (-25, 60),
        "left_wrist": (27, 90),
        "right_wrist": (-27, 90),
        "left_hip": (12, 95),
        "right_hip": (-12, 95),
        "left_knee": (13, 135),
        "right_knee": (-13, 135),
        "left_ankle": (14, 175),
        "right_ankle": (-14, 175),
        "left_big_toe": (20, 185),
        "left_small_toe": (20, 185),
        "left_heel": (12, 182),
        "right_big_toe": (-20, 185),
        "right_small_toe": (-20, 185),
        "right_heel": (-12, 182),
    }
    for name, (dx, dy) in rows.items():
        s[sk.INDEX[name]] = (x0 + dx, y0 + dy, 0.9)
    return s


def _result(skel: np.ndarray, mask: np.ndarray | None = None) -> PoseResult:
    return PoseResult(skeleton=skel, detected=True, mask=mask, score=0.99, frame_size=SIZE)


def test_joints_outside_the_booth_zone_are_dropped_and_the_rest_kept():
    skel = _standing()
    # The zone ends at x = 100 px: the person's left side (image right) is outside.
    zone = ZoneConfig(polygon=[(0, 0), (100 / W, 0), (100 / W, 1), (0, 1)], min_face_contrast=0)
    out = gating.gate(_result(skel), zone)
    assert out.detected
    left = [i for i, n in enumerate(sk.JOINTS) if n.startswith("left_")]
    right = [i for i, n in enumerate(sk.JOINTS) if n.startswith("right_")]
    assert (out.skeleton[left, 2] == 0).all()
    assert (out.skeleton[right, 2] == 0.9).all()
    assert out.box is not None and out.box[2] < 100
    assert (skel[:, 2] == 0.9).all()  # the input is left alone


def test_a_person_entirely_outside_the_zone_is_nobody():
    zone = ZoneConfig(polygon=[(0.8, 0), (1, 0), (1, 1), (0.8, 1)], min_face_contrast=0)
    out = gating.gate(_result(_standing()), zone)
    assert not out.detected and out.box is None


def test_a_person_off_the_segmentation_mask_is_nobody_and_stray_joints_are_dropped():
    skel = _standing()
    empty = np.zeros((H, W), np.float32)
    zone = ZoneConfig(min_face_contrast=0, require_mask_overlap=0.3)
    assert not gating.gate(_result(skel, empty), zone).detected

    body = np.zeros((H, W), np.float32)
    body[30:240, 60:140] = 1.0
    body[:, 120:] = 0.0  # the left arm (image right) is off the mask
    stray = skel.copy()
    stray[sk.INDEX["left_wrist"], :2] = (230, 130)  # on the wall, far from its elbow
    out = gating.gate(_result(stray, body), zone)
    assert out.detected
    assert out.skeleton[sk.INDEX["left_wrist"], 2] == 0
    assert out.skeleton[sk.INDEX["right_wrist"], 2] == 0.9


def test_a_limb_the_mask_missed_is_kept_when_it_hangs_from_the_body():
    """Selfie segmentation often loses an arm held away from the body; its joints are
    still this person's when each lies within its bone's length of the joint it hangs
    from (the shoulder on the mask carries the elbow, the elbow the wrist)."""
    skel = _standing()
    body = np.zeros((H, W), np.float32)
    body[30:240, 60:140] = 1.0
    body[:, 119:] = 0.0  # the left elbow and wrist (x 125, 127) are off the mask
    zone = ZoneConfig(min_face_contrast=0)
    on_mask = gating.mask_at(body, skel, gating._radius_px(body)) >= gating.MASK_THRESHOLD
    assert not on_mask[sk.INDEX["left_elbow"]] and not on_mask[sk.INDEX["left_wrist"]]
    out = gating.gate(_result(skel, body), zone)
    assert out.detected and (out.skeleton[:, 2] == 0.9).all()

    # A wrist further from its elbow than a forearm can reach is not this body's.
    long = skel.copy()
    long[sk.INDEX["left_wrist"], :2] = (125 + 48, 100)  # 0.74 torso lengths (65 px)
    out = gating.gate(_result(long, body), zone)
    assert out.skeleton[sk.INDEX["left_wrist"], 2] == 0
    assert out.skeleton[sk.INDEX["left_elbow"], 2] == 0.9
    # Nothing hangs from a joint that was itself dropped.
    no_elbow = skel.copy()
    no_elbow[sk.INDEX["left_elbow"], :2] = (230, 60)
    out = gating.gate(_result(no_elbow, body), zone)
    assert out.skeleton[sk.INDEX["left_elbow"], 2] == 0
    assert out.skeleton[sk.INDEX["left_wrist"], 2] == 0


def test_feet_off_the_floor_zone_mean_a_shadow_on_the_wall():
    skel = _standing()  # feet at y ~ 215-225 px
    on_floor = ZoneConfig(min_face_contrast=0, floor_polygon=[(0, 0.85), (1, 0.85), (1, 1), (0, 1)])
    assert gating.gate(_result(skel), on_floor).detected
    below = ZoneConfig(min_face_contrast=0, floor_polygon=[(0, 0.97), (1, 0.97), (1, 1), (0, 1)])
    assert not gating.gate(_result(skel), below).detected


def test_a_flat_grey_face_is_not_a_face():
    skel = _standing()
    flat = np.full((H, W, 3), 90, np.uint8)
    assert not gating.gate(_result(skel), ZoneConfig(), flat).detected
    face = flat.copy()
    face[34:38, 96:99] = 250  # eyes
    face[35:37, 97:98] = 10
    face[34:38, 103:106] = 250
    face[35:37, 104:105] = 10
    assert gating.gate(_result(skel), ZoneConfig(), face).detected


def test_points_in_polygon_handles_concave_zones():
    # An L-shaped zone.
    poly = [(0, 0), (2, 0), (2, 1), (1, 1), (1, 2), (0, 2)]
    pts = np.array([(0.5, 0.5), (1.5, 0.5), (0.5, 1.5), (1.5, 1.5), (3, 3), (-1, 0.5)])
    assert gating.points_in_polygon(pts, poly).tolist() == [True, True, True, False, False, False]


def test_too_little_of_a_skeleton_on_the_person_mask_is_nobody():
    """The segmentation found a person, but only under one leg of this skeleton (a shadow
    lying over someone's leg): the overlap threshold decides, not the joints left."""
    skel = _standing()
    leg = np.zeros((H, W), np.float32)
    leg[125:240, 80:96] = 1.0  # the right leg and foot (image left): 6 of 23 joints
    on_leg = gating.mask_at(leg, skel, gating._radius_px(leg)) >= gating.MASK_THRESHOLD
    assert 0.2 < on_leg.mean() < 0.3
    assert not gating.gate(_result(skel, leg), ZoneConfig(min_face_contrast=0)).detected
    lenient = ZoneConfig(min_face_contrast=0, require_mask_overlap=0.2)
    out = gating.gate(_result(skel, leg), lenient)
    assert out.detected and (out.skeleton[:, 2] > 0).sum() == on_leg.sum()


def test_gated_tracking_keeps_a_dancer_who_turns_their_back_to_the_camera():
    """Acquired with a face, the dancer stays tracked through a turn: gating used to drop
    one frame in eight of dance 2's turn as "no visible face" (PCK 0.78 against 0.96)."""
    attendee, dance = Attendee.from_seed(1), Dance.from_seed(2)
    gated = create_pose_backend(
        CpuPose(models_dir=MODELS, mode="tracking", segmentation=True), zone=ZoneConfig()
    )
    frames = [
        render(attendee, dance.pose(11.8 + k / 30), size=(640, 480), frame_index=k)
        for k in range(48)
    ]
    found = [gated.estimate(f.rgb).detected for f in frames]
    assert all(found), f"lost in {found.count(False)} of {len(found)} frames of the turn"
    # Acquiring still takes a face: a fresh tracker does not pick up the dancer from behind.
    faces = [gating.face_contrast(f.rgb, f.keypoints) for f in frames]
    back = frames[int(np.argmin(faces))]
    fresh = create_pose_backend(
        CpuPose(models_dir=MODELS, mode="tracking", segmentation=True), zone=ZoneConfig()
    )
    assert not fresh.estimate(back.rgb).detected
