"""Render a frame of the booth with an attendee in a pose, and its ground truth.

``render`` composes the cached booth (``scene``), the shadows and the figure
(``figure``), then derives the ground truth from the same geometry: the part map
and mask as drawn, and keypoint visibility. A keypoint is visible when the part
map at its pixel belongs to that joint's own limbs (a forearm in front of the
torso hides nothing of it; a torso in front of a forearm hides the wrist), no
limb pointing at the camera covers it (an elbow under its own forearm), and, for
face points and heels, when they face the camera.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from edge_agent import skeleton as sk
from edge_agent.synth import scene
from edge_agent.synth.appearance import Attendee
from edge_agent.synth.body import CANONICAL_POINTS, Body3D, BodyPose, F, P, forward_kinematics
from edge_agent.synth.figure import FACE_FEATURES_MIN_FACING, PART, PART_NAMES, Figure

SHADOW_MODES = ("auto", "hard", "soft", "none")


def _parts_of(*names: str) -> frozenset[int]:
    ids = set()
    for n in names:
        ids.update(PART[p] for p in PART_NAMES if p == n or p in (f"{n}_front", f"{n}_back"))
    return frozenset(ids)


_FACE = _parts_of("left_face", "right_face")
# Which parts may cover each canonical joint while it still counts as visible.
_JOINT_PARTS: tuple[frozenset[int], ...] = tuple(
    {
        "nose": _FACE,
        "left_eye": _FACE,
        "right_eye": _FACE,
        "left_ear": _FACE,
        "right_ear": _FACE,
        "left_shoulder": _parts_of("left_upper_arm", "torso"),
        "right_shoulder": _parts_of("right_upper_arm", "torso"),
        "left_elbow": _parts_of("left_upper_arm", "left_lower_arm"),
        "right_elbow": _parts_of("right_upper_arm", "right_lower_arm"),
        "left_wrist": _parts_of("left_lower_arm", "left_hand"),
        "right_wrist": _parts_of("right_lower_arm", "right_hand"),
        "left_hip": _parts_of("left_upper_leg", "torso"),
        "right_hip": _parts_of("right_upper_leg", "torso"),
        "left_knee": _parts_of("left_upper_leg", "left_lower_leg"),
        "right_knee": _parts_of("right_upper_leg", "right_lower_leg"),
        "left_ankle": _parts_of("left_lower_leg", "left_foot"),
        "right_ankle": _parts_of("right_lower_leg", "right_foot"),
        "left_big_toe": _parts_of("left_foot"),
        "left_small_toe": _parts_of("left_foot"),
        "left_heel": _parts_of("left_foot", "left_lower_leg"),
        "right_big_toe": _parts_of("right_foot"),
        "right_small_toe": _parts_of("right_foot"),
        "right_heel": _parts_of("right_foot", "right_lower_leg"),
    }[name]
    for name in sk.JOINTS
)
# Lookup table (joint, part id) -> allowed, for one vectorised test per frame.
_ALLOWED = np.zeros((sk.NUM_JOINTS, len(PART_NAMES)), dtype=bool)
for _j, _ids in enumerate(_JOINT_PARTS):
    _ALLOWED[_j, list(_ids)] = True


@dataclass
class SynthFrame:
    """One rendered frame and its ground truth.

    ``keypoints`` is the canonical skeleton (23, 3) float32 with score 1 where the
    joint is visible and 0 (and x = y = 0) where it is occluded or out of frame;
    ``projected`` (23, 2) holds every joint's un-occluded image position, for
    ground truth of hidden joints. ``parts`` uses ``PART_NAMES`` (0 = background).
    ``shadow_mask`` marks the hard wall shadow where it is visible, or is None.
    """

    rgb: np.ndarray
    keypoints: np.ndarray
    projected: np.ndarray
    visible: np.ndarray
    in_frame: np.ndarray
    mask: np.ndarray
    parts: np.ndarray
    shadow_mask: np.ndarray | None
    frame_index: int = 0

    @property
    def occluded(self) -> np.ndarray:
        """In frame but hidden behind another body part (or the back of the head)."""
        return self.in_frame & ~self.visible


# ---- the hard wall shadow ----------------------------------------------------------------


def _spot_shadow(
    attendee: Attendee, body: Body3D, cam: scene.CameraModel, wall: np.ndarray
) -> np.ndarray:
    """The side spot's shadow on the wall, (H, W) uint8 255/0.

    The figure is drawn as the spotlight sees it (clothes, hair and all), and that
    silhouette is carried onto the wall plane and into the camera by a homography.
    """
    centre = (body.points[P["pelvis"]] + body.points[P["chest"]]) / 2
    spot = scene.spot_view(centre, wall.shape[0])
    silhouette = np.zeros((spot.size[1], spot.size[0]), dtype=np.uint8)
    for item in Figure(attendee, body, spot).items():
        item.draw_parts(silhouette)
    h, w = wall.shape
    out = np.zeros((h, w), dtype=np.uint8)
    ys, xs = np.nonzero(silhouette)
    if len(xs) == 0:
        return out
    hom = scene.wall_homography(spot, cam)
    box = np.array(
        (
            (xs.min(), ys.min()),
            (xs.max() + 1, ys.min()),
            (xs.max() + 1, ys.max() + 1),
            (xs.min(), ys.max() + 1),
        ),
        dtype=np.float32,
    )
    uv = cv2.perspectiveTransform(box[None], hom)[0]
    x0, y0 = np.floor(uv.min(axis=0)).astype(int).clip(0, (w, h))
    x1, y1 = np.ceil(uv.max(axis=0)).astype(int).clip(0, (w, h))
    if x1 <= x0 or y1 <= y0:
        return out
    shift = np.array(((1, 0, -x0), (0, 1, -y0), (0, 0, 1)), dtype=np.float64)
    roi = cv2.warpPerspective(
        np.where(silhouette > 0, 255, 0).astype(np.uint8),
        shift @ hom,
        (int(x1 - x0), int(y1 - y0)),
        flags=cv2.INTER_LINEAR,
    )
    roi = np.where(roi >= 128, 255, 0).astype(np.uint8)
    out[y0:y1, x0:x1] = cv2.bitwise_and(roi, wall[y0:y1, x0:x1])
    return out


# ---- public entry point ---------------------------------------------------------------------


def render(
    attendee: Attendee,
    pose: BodyPose,
    size: tuple[int, int] = (640, 480),
    viewpoint: int = 0,
    frame_index: int = 0,
    shadow: str = "auto",
    noise: bool = True,
    blur_from: BodyPose | None = None,
) -> SynthFrame:
    """Render ``attendee`` in ``pose`` from camera ``viewpoint`` of the booth.

    ``shadow``: ``auto`` (soft floor shadow, plus the hard wall shadow when the
    attendee or the pose asks for the side spot), ``hard``, ``soft`` or ``none``.
    ``frame_index`` only moves the sensor noise, so equal inputs give equal bytes.
    ``blur_from``: optional motion blur, the pose where the exposure began; the
    figure is averaged over instants from it to ``pose``. Ground truth is ``pose``'s.
    """
    if shadow not in SHADOW_MODES:
        raise ValueError(f"shadow must be one of {', '.join(SHADOW_MODES)}, got {shadow!r}")
    w, h = int(size[0]), int(size[1])
    if w <= 0 or h <= 0:
        raise ValueError(f"size must be positive, got {w}x{h}")
    cam = scene.camera(viewpoint, (w, h))
    bd = scene.backdrop(viewpoint, (w, h))
    body = forward_kinematics(attendee.proportions, pose)
    hard = shadow == "hard" or (shadow == "auto" and (attendee.hard_shadow or pose.hard_shadow))

    img = (bd.spotlit if hard else bd.plain).copy()
    shadow_mask = None
    if hard:
        shadow_mask = _spot_shadow(attendee, body, cam, bd.wall)
        cv2.copyTo(bd.shadowed, shadow_mask, img)
    if shadow != "none":
        _soft_floor_shadow(img, body, cam)

    fig = Figure(attendee, body, cam)
    parts = np.zeros((h, w), dtype=np.uint8)
    if blur_from is not None:
        _blurred_figure(img, attendee, blur_from, pose, cam)
    for item in fig.items():
        if blur_from is None:
            item.draw_rgb(img)
        item.draw_parts(parts)
    if noise:
        scene.add_noise(img, frame_index)

    projected = fig.uv[list(CANONICAL_POINTS)].astype(np.float32)
    in_frame = (
        (projected[:, 0] >= 0)
        & (projected[:, 0] < w)
        & (projected[:, 1] >= 0)
        & (projected[:, 1] < h)
    )
    # Joints behind the camera plane never count (cannot happen in the booth).
    in_frame &= fig.depth[list(CANONICAL_POINTS)] > 0.05
    xi = np.clip(projected[:, 0].astype(np.int32), 0, w - 1)
    yi = np.clip(projected[:, 1].astype(np.int32), 0, h - 1)
    under = parts[yi, xi]
    visible = in_frame & _ALLOWED[np.arange(sk.NUM_JOINTS), under]
    visible &= _self_occlusion(body, cam)
    visible &= ~_covered_by_limbs(body, cam)
    keypoints = np.zeros((sk.NUM_JOINTS, 3), dtype=np.float32)
    keypoints[visible, :2] = projected[visible]
    keypoints[visible, 2] = 1.0
    mask = parts > 0
    if shadow_mask is not None:
        shadow_mask = (shadow_mask > 0) & ~mask
    return SynthFrame(
        rgb=img,
        keypoints=keypoints,
        projected=projected,
        visible=visible,
        in_frame=in_frame,
        mask=mask,
        parts=parts,
        shadow_mask=shadow_mask,
        frame_index=frame_index,
    )


_FACE_JOINTS = [sk.INDEX[n] for n in ("nose", "left_eye", "right_eye", "left_ear", "right_ear")]
_HEELS = {"l": sk.INDEX["left_heel"], "r": sk.INDEX["right_heel"]}
_TOES = {
    "l": [sk.INDEX["left_big_toe"], sk.INDEX["left_small_toe"]],
    "r": [sk.INDEX["right_big_toe"], sk.INDEX["right_small_toe"]],
}


def _self_occlusion(body: Body3D, cam: scene.CameraModel) -> np.ndarray:
    """False for points their own body part hides: a face turned away, a heel seen
    from the front (behind the shoe), toes seen from behind."""
    head = body.frames[F["head"]]
    to_cam = cam.toward(body.points[P["head"]][None])[0]
    ok = np.ones(sk.NUM_JOINTS, dtype=bool)
    normals = (
        head[:, 2],
        head @ (np.array((0.45, 0.05, 1.0)) / 1.1),
        head @ (np.array((-0.45, 0.05, 1.0)) / 1.1),
        head[:, 0],
        -head[:, 0],
    )
    thresholds = (0.1, 0.2, 0.2, -0.3, -0.3)
    for j, n, t in zip(_FACE_JOINTS, normals, thresholds, strict=True):
        ok[j] = float(n @ to_cam) > t
    # The nose and eyes are seen only where the figure draws them (ears have no features).
    if float(head[:, 2] @ to_cam) <= FACE_FEATURES_MIN_FACING:
        ok[_FACE_JOINTS[:3]] = False
    for side in ("l", "r"):
        forward = body.frames[F[f"{side}_foot"]][:, 2]
        cos = float(forward @ cam.toward(body.points[P[f"{side}_ankle"]][None])[0])
        ok[_HEELS[side]] = cos < 0.5
        ok[_TOES[side]] = cos > -0.5
    return ok


BLUR_INSTANTS = 4


def _blurred_figure(img, attendee: Attendee, start: BodyPose, end: BodyPose, cam) -> None:
    """Draw the figure as the average of several instants of one exposure, in place."""
    backdrop = img.copy()
    acc = np.zeros(img.shape, dtype=np.float32)
    for k in range(BLUR_INSTANTS):
        layer = backdrop.copy()
        pose = BodyPose.blend(start, end, (k + 1) / BLUR_INSTANTS)
        for item in Figure(attendee, forward_kinematics(attendee.proportions, pose), cam).items():
            item.draw_rgb(layer)
        cv2.accumulate(layer, acc)
    np.copyto(img, np.rint(acc / BLUR_INSTANTS).astype(np.uint8))


_LIMB_SAMPLES = np.linspace(0.0, 1.0, 9)


def _limb_capsules(prop) -> list[tuple[str, str, tuple[float, float]]]:
    h = prop.head_h
    out = []
    for s in ("l", "r"):
        out += [
            (f"{s}_shoulder", f"{s}_elbow", prop.upper_arm_r),
            (f"{s}_elbow", f"{s}_wrist", prop.forearm_r),
            (f"{s}_wrist", f"{s}_hand", prop.hand_r),
            (f"{s}_hip", f"{s}_knee", prop.thigh_r),
            (f"{s}_knee", f"{s}_ankle", prop.shin_r),
            (f"{s}_ankle", f"{s}_big_toe", (0.14 * h, 0.1 * h)),
        ]
    return out


def _joint_radii(prop) -> np.ndarray:
    """How far below the skin each canonical joint lies (metres)."""
    h = prop.head_h
    r = {
        "shoulder": prop.upper_arm_r[0],
        "elbow": prop.forearm_r[0],
        "wrist": prop.hand_r[0],
        "hip": prop.thigh_r[0],
        "knee": prop.shin_r[0],
        "ankle": prop.shin_r[1],
    }
    return np.array(
        [next((v for k, v in r.items() if name.endswith(k)), 0.08 * h) for name in sk.JOINTS]
    )


def _covered_by_limbs(body: Body3D, cam: scene.CameraModel) -> np.ndarray:
    """Joints hidden behind a limb that points at the camera, their own included.

    The part map cannot see this: an elbow under its own forearm shows forearm
    pixels either way. Each limb is sampled as spheres along its axis; a joint is
    covered when a sphere nearer the camera than the joint's skin overlaps it in
    the image and does not simply contain the joint (its own end of the limb).
    """
    prop = body.proportions
    caps = _limb_capsules(prop)
    a = np.array([body.points[P[c[0]]] for c in caps])
    b = np.array([body.points[P[c[1]]] for c in caps])
    r = np.array([c[2] for c in caps])
    t = _LIMB_SAMPLES[None, :, None]
    centres = (a[:, None] + (b - a)[:, None] * t).reshape(-1, 3)
    radii = (r[:, :1] + (r[:, 1:] - r[:, :1]) * _LIMB_SAMPLES[None]).reshape(-1)
    joints = body.points[list(CANONICAL_POINTS)]
    uv_c, d_c = cam.project(centres)
    uv_j, d_j = cam.project(joints)
    r_j = _joint_radii(prop)
    px = cam.f_px / d_c  # pixels per metre at each sample
    near_2d = np.linalg.norm(uv_c[None] - uv_j[:, None], axis=-1) < radii[None] * px[None] * 0.9
    in_front = (d_c - radii)[None] < (d_j - r_j)[:, None] - 0.02
    apart = np.linalg.norm(centres[None] - joints[:, None], axis=-1) > (radii[None] + r_j[:, None])
    covered = (near_2d & in_front & apart).any(axis=1)
    covered[_FACE_JOINTS] = False  # the head has its own test
    return covered


def _soft_floor_shadow(img: np.ndarray, body: Body3D, cam: scene.CameraModel) -> None:
    la, ra = body.points[P["l_ankle"]], body.points[P["r_ankle"]]
    feet_y = min(la[1], ra[1]) - body.proportions.ankle_h
    centre = ((la[0] + ra[0]) / 2, (la[2] + ra[2]) / 2)
    half_x = abs(la[0] - ra[0]) / 2 + 0.32
    half_z = abs(la[2] - ra[2]) / 2 + 0.22
    strength = 0.5 * math.exp(-max(feet_y, 0.0) / 0.25)
    scene.floor_shadow(img, cam, np.array(centre), half_x, half_z, strength)
