"""The articulated figure: joint angles, proportions and forward kinematics.

Coordinates are metres in the booth. ``x`` points to the camera's right, ``y`` up,
``z`` from the back wall towards the camera; the floor is ``y = 0``. A body frame
has ``x`` to the person's left, ``y`` up and ``z`` forward, so a person with yaw 0
faces the camera and their left side appears on the right of the image.

Proportions are expressed in head heights ``h`` (crown to chin). The defaults
start from the ones measured to work with BlazePose (DESIGN.md): about 7.5 h
tall, shoulder joints 1.6 h apart (1.7 h read as too wide), hips 0.9 h, upper arm 1.45 h, forearm 1.2 h,
hand 0.7 h, thigh 1.85 h. The shin ends at the malleolus (the ankle as COCO and
BlazePose mark it) 0.3 h above the sole. Running BlazePose on our frames put
hips, knees and ankles 0.15-0.2 h above joints placed with a 2.4 h torso, so the
hip sits at 3.9 h (torso 2.2 h, shin 1.75 h): closer to anthropometric tables
(hip 0.53, knee 0.285 of the height) and to what the model calls a hip or knee.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Joint angles in radians. Positive directions, for the left side (the right side
# mirrors them, so the same value raises either arm):
#   spine_flex/neck_flex: bend forward; *_side: bend towards the person's left;
#   *_twist: turn the upper part towards the person's left;
#   shoulder_flex: raise the arm forward; shoulder_abd: raise it sideways;
#   shoulder_twist: outward rotation of the upper arm about its own axis (with
#   the arm raised sideways and the elbow bent, positive turns the forearm up);
#   elbow/knee: flex (0 is straight); wrist: flex the hand forward;
#   hip_flex: raise the thigh forward; hip_abd: move the leg outwards;
#   hip_twist: toes outwards; ankle: point the toes down.
ANGLE_NAMES: tuple[str, ...] = (
    "spine_flex",
    "spine_side",
    "spine_twist",
    "neck_flex",
    "neck_side",
    "neck_twist",
    "l_shoulder_flex",
    "l_shoulder_abd",
    "l_shoulder_twist",
    "l_elbow",
    "l_wrist",
    "r_shoulder_flex",
    "r_shoulder_abd",
    "r_shoulder_twist",
    "r_elbow",
    "r_wrist",
    "l_hip_flex",
    "l_hip_abd",
    "l_hip_twist",
    "l_knee",
    "l_ankle",
    "r_hip_flex",
    "r_hip_abd",
    "r_hip_twist",
    "r_knee",
    "r_ankle",
)
NUM_ANGLES = len(ANGLE_NAMES)
ANGLE_INDEX: dict[str, int] = {n: i for i, n in enumerate(ANGLE_NAMES)}

# A relaxed stance: arms slightly away from the body, toes slightly out.
_NEUTRAL = {
    "l_shoulder_abd": 0.12,
    "r_shoulder_abd": 0.12,
    "l_elbow": 0.15,
    "r_elbow": 0.15,
    "l_hip_abd": 0.05,
    "r_hip_abd": 0.05,
    "l_hip_twist": 0.2,
    "r_hip_twist": 0.2,
}


@dataclass(frozen=True)
class BodyPose:
    """One instant of a dance: joint angles plus where the body stands.

    ``x``/``z`` place the pelvis on the booth floor (metres, 0 is the centre of the
    dance zone); ``lift`` raises the body above ground contact (jumps); ``yaw``
    turns the whole body (0 faces the camera, positive turns towards the person's
    left). The pelvis height is not part of the pose: it follows from the legs of
    whoever is rendered, so any attendee can perform any pose.
    ``hard_shadow`` asks the scene for the side spotlight (the choreography decides
    when it shines, e.g. while the dancer steps out of frame).
    """

    angles: np.ndarray = field(default_factory=lambda: BodyPose.neutral_angles())
    x: float = 0.0
    z: float = 0.0
    lift: float = 0.0
    yaw: float = 0.0
    hard_shadow: bool = False

    @staticmethod
    def neutral_angles() -> np.ndarray:
        a = np.zeros(NUM_ANGLES, dtype=np.float64)
        for name, value in _NEUTRAL.items():
            a[ANGLE_INDEX[name]] = value
        return a

    @classmethod
    def neutral(cls) -> BodyPose:
        return cls()

    def __getitem__(self, name: str) -> float:
        return float(self.angles[ANGLE_INDEX[name]])

    def with_angles(self, **angles: float) -> BodyPose:
        """A copy with some angles set (by name, radians)."""
        a = self.angles.copy()
        for name, value in angles.items():
            if name not in ANGLE_INDEX:
                raise KeyError(f"unknown joint angle {name!r}")
            a[ANGLE_INDEX[name]] = value
        return BodyPose(a, self.x, self.z, self.lift, self.yaw, self.hard_shadow)

    def moved(
        self,
        *,
        x: float | None = None,
        z: float | None = None,
        lift: float | None = None,
        yaw: float | None = None,
        hard_shadow: bool | None = None,
    ) -> BodyPose:
        return BodyPose(
            self.angles,
            self.x if x is None else x,
            self.z if z is None else z,
            self.lift if lift is None else lift,
            self.yaw if yaw is None else yaw,
            self.hard_shadow if hard_shadow is None else hard_shadow,
        )

    def as_vector(self) -> np.ndarray:
        """``[x, z, lift, yaw, *angles]``: a flat float64 vector (for storing or blending)."""
        return np.concatenate([[self.x, self.z, self.lift, self.yaw], self.angles])

    @classmethod
    def from_vector(cls, v: np.ndarray, hard_shadow: bool = False) -> BodyPose:
        v = np.asarray(v, dtype=np.float64)
        if v.shape != (NUM_ANGLES + 4,):
            raise ValueError(f"a pose vector has {NUM_ANGLES + 4} values, got {v.shape}")
        return cls(v[4:].copy(), float(v[0]), float(v[1]), float(v[2]), float(v[3]), hard_shadow)

    @staticmethod
    def blend(a: BodyPose, b: BodyPose, w: float) -> BodyPose:
        """``a`` at ``w = 0``, ``b`` at ``w = 1``; yaw takes the short way round."""
        dyaw = math.remainder(b.yaw - a.yaw, 2 * math.pi)
        return BodyPose(
            a.angles + (b.angles - a.angles) * w,
            a.x + (b.x - a.x) * w,
            a.z + (b.z - a.z) * w,
            a.lift + (b.lift - a.lift) * w,
            a.yaw + dyaw * w,
            b.hard_shadow if w >= 0.5 else a.hard_shadow,
        )


@dataclass(frozen=True)
class Proportions:
    """Bone lengths and half-widths in metres for one attendee."""

    height_m: float
    head_h: float  # one head height, metres
    # Lengths (metres).
    shoulder_half: float
    hip_half: float
    lumbar: float
    thoracic: float
    neck: float
    upper_arm: float
    forearm: float
    hand: float
    thigh: float
    shin: float  # knee to malleolus
    ankle_h: float  # malleolus above the sole
    foot_back: float  # heel behind the ankle
    foot_front: float  # toe tip in front of the ankle
    # Half-widths (metres), tapered from the proximal to the distal end.
    upper_arm_r: tuple[float, float]
    forearm_r: tuple[float, float]
    hand_r: tuple[float, float]
    thigh_r: tuple[float, float]
    shin_r: tuple[float, float]
    foot_half_w: float
    neck_r: float
    # Torso outline half-widths and half-depths at shoulder, armpit, waist, hip, crotch.
    torso_w: tuple[float, float, float, float, float]
    torso_d: tuple[float, float, float, float, float]
    # Head ellipsoid radii (x, y, z).
    head_r: tuple[float, float, float]

    @classmethod
    def make(
        cls,
        height_m: float = 1.75,
        heads: float = 7.5,
        build: float = 1.0,
        shoulders: float = 1.0,
        hips: float = 1.0,
        arms: float = 1.0,
        legs: float = 1.0,
    ) -> Proportions:
        """Proportions from a height and a few ratios near 1 (the measured defaults)."""
        # The default stack (head heights above the floor): sole 0, malleolus 0.3,
        # knee 2.05, hip 3.9, shoulders 6.1, chin 6.5, crown 7.5.
        h = height_m / heads
        leg_scale = legs * (heads - 3.6) / 3.9  # taller-than-7.5h figures have longer legs
        w = build
        return cls(
            height_m=height_m,
            head_h=h,
            shoulder_half=0.8 * h * shoulders,
            hip_half=0.45 * h * hips,
            lumbar=0.92 * h,
            thoracic=1.28 * h,
            neck=0.2 * h,
            upper_arm=1.45 * h * arms,
            forearm=1.2 * h * arms,
            hand=0.7 * h * arms,
            thigh=1.85 * h * leg_scale,
            shin=1.75 * h * leg_scale,
            ankle_h=0.3 * h * leg_scale,
            foot_back=0.25 * h,
            foot_front=0.85 * h,
            upper_arm_r=(0.2 * h * w, 0.16 * h * w),
            forearm_r=(0.16 * h * w, 0.125 * h * w),
            hand_r=(0.12 * h, 0.1 * h),
            thigh_r=(0.32 * h * w, 0.2 * h * w),
            shin_r=(0.2 * h * w, 0.13 * h * w),
            foot_half_w=0.17 * h,
            neck_r=0.22 * h * math.sqrt(w),
            torso_w=(
                0.78 * h * shoulders,
                0.8 * h * w * shoulders,
                0.6 * h * w,
                0.74 * h * w * hips,
                0.62 * h * w * hips,
            ),
            torso_d=(0.35 * h * w, 0.5 * h * w, 0.45 * h * w, 0.5 * h * w, 0.45 * h * w),
            head_r=(0.38 * h, 0.5 * h, 0.45 * h),
        )


# ---- forward kinematics -----------------------------------------------------------

# Named 3-D points the renderer draws and the ground truth reports.
POINT_NAMES: tuple[str, ...] = (
    "pelvis",
    "waist",
    "chest",
    "neck_top",
    "head",
    "nose",
    "l_eye",
    "r_eye",
    "l_ear",
    "r_ear",
    "l_shoulder",
    "l_elbow",
    "l_wrist",
    "l_hand",
    "r_shoulder",
    "r_elbow",
    "r_wrist",
    "r_hand",
    "l_hip",
    "l_knee",
    "l_ankle",
    "l_heel",
    "l_big_toe",
    "l_small_toe",
    "r_hip",
    "r_knee",
    "r_ankle",
    "r_heel",
    "r_big_toe",
    "r_small_toe",
)
P = {n: i for i, n in enumerate(POINT_NAMES)}

# Canonical skeleton order (edge_agent.skeleton.JOINTS) -> POINT_NAMES index.
CANONICAL_POINTS: tuple[int, ...] = tuple(
    P[n]
    for n in (
        "nose",
        "l_eye",
        "r_eye",
        "l_ear",
        "r_ear",
        "l_shoulder",
        "r_shoulder",
        "l_elbow",
        "r_elbow",
        "l_wrist",
        "r_wrist",
        "l_hip",
        "r_hip",
        "l_knee",
        "r_knee",
        "l_ankle",
        "r_ankle",
        "l_big_toe",
        "l_small_toe",
        "l_heel",
        "r_big_toe",
        "r_small_toe",
        "r_heel",
    )
)

FRAME_NAMES: tuple[str, ...] = (
    "root",
    "lumbar",
    "chest",
    "head",
    "l_upper_arm",
    "l_forearm",
    "l_hand",
    "r_upper_arm",
    "r_forearm",
    "r_hand",
    "l_thigh",
    "l_shin",
    "l_foot",
    "r_thigh",
    "r_shin",
    "r_foot",
)
F = {n: i for i, n in enumerate(FRAME_NAMES)}

_MIRROR = np.diag([-1.0, 1.0, 1.0])


def _rx(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array(((1.0, 0.0, 0.0), (0.0, c, -s), (0.0, s, c)))


def _ry(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array(((c, 0.0, s), (0.0, 1.0, 0.0), (-s, 0.0, c)))


def _rz(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array(((c, -s, 0.0), (s, c, 0.0), (0.0, 0.0, 1.0)))


def _limb_rotation(flex: float, abd: float, twist: float, mirrored: bool) -> np.ndarray:
    """Rotation of a limb hanging along -y: abduct about z, flex about x, twist about y."""
    r = _rz(abd) @ _rx(-flex) @ _ry(twist)
    return _MIRROR @ r @ _MIRROR if mirrored else r


@dataclass
class Body3D:
    """A posed figure: named points (N, 3) and body-part frames (M, 3, 3), metres."""

    points: np.ndarray
    frames: np.ndarray
    proportions: Proportions

    def point(self, name: str) -> np.ndarray:
        return self.points[P[name]]

    def frame(self, name: str) -> np.ndarray:
        return self.frames[F[name]]


def forward_kinematics(prop: Proportions, pose: BodyPose) -> Body3D:
    """Place every point of ``prop``'s figure in ``pose``, feet on the floor."""
    a = pose.angles
    pts = np.zeros((len(POINT_NAMES), 3))
    frames = np.zeros((len(FRAME_NAMES), 3, 3))
    h = prop.head_h

    root = _ry(pose.yaw)
    pelvis = np.zeros(3)  # height fixed below, once the feet are known
    sf, ss, st = a[0] / 2, a[1] / 2, a[2] / 2
    half_spine = _rx(sf) @ _rz(-ss) @ _ry(st)
    lumbar = root @ half_spine
    chest = lumbar @ half_spine
    waist = pelvis + lumbar[:, 1] * prop.lumbar
    chest_p = waist + chest[:, 1] * prop.thoracic
    head = chest @ _rx(a[3]) @ _rz(-a[4]) @ _ry(a[5])
    neck_top = chest_p + chest[:, 1] * prop.neck
    head_c = neck_top + head @ np.array((0.0, 0.7 * h, 0.05 * h))
    frames[F["root"]] = root
    frames[F["lumbar"]] = lumbar
    frames[F["chest"]] = chest
    frames[F["head"]] = head
    pts[P["pelvis"]] = pelvis
    pts[P["waist"]] = waist
    pts[P["chest"]] = chest_p
    pts[P["neck_top"]] = neck_top
    pts[P["head"]] = head_c
    # Face points on the head ellipsoid (eyes are pupil centres, ears the tragus).
    face = np.array(
        (
            (0.0, -0.12 * h, 0.5 * h),  # nose tip
            (0.17 * h, 0.04 * h, 0.4 * h),  # left eye
            (-0.17 * h, 0.04 * h, 0.4 * h),
            (0.34 * h, -0.02 * h, 0.0),  # left ear
            (-0.34 * h, -0.02 * h, 0.0),
        )
    )
    pts[P["nose"] : P["r_ear"] + 1] = head_c + face @ head.T

    for side, sign, base in (("l", 1.0, 6), ("r", -1.0, 11)):
        mirrored = sign < 0
        shoulder = chest_p + chest @ np.array((sign * prop.shoulder_half, -0.05 * h, 0.0))
        upper = chest @ _limb_rotation(a[base], a[base + 1], a[base + 2], mirrored)
        elbow = shoulder - upper[:, 1] * prop.upper_arm
        fore = upper @ _rx(-a[base + 3])
        wrist = elbow - fore[:, 1] * prop.forearm
        hand = fore @ _rx(-a[base + 4])
        tip = wrist - hand[:, 1] * prop.hand
        pts[P[f"{side}_shoulder"]] = shoulder
        pts[P[f"{side}_elbow"]] = elbow
        pts[P[f"{side}_wrist"]] = wrist
        pts[P[f"{side}_hand"]] = tip
        frames[F[f"{side}_upper_arm"]] = upper
        frames[F[f"{side}_forearm"]] = fore
        frames[F[f"{side}_hand"]] = hand

    for side, sign, base in (("l", 1.0, 16), ("r", -1.0, 21)):
        mirrored = sign < 0
        hip = pelvis + root[:, 0] * (sign * prop.hip_half)
        thigh = root @ _limb_rotation(a[base], a[base + 1], a[base + 2], mirrored)
        knee = hip - thigh[:, 1] * prop.thigh
        shin = thigh @ _rx(a[base + 3])
        ankle = knee - shin[:, 1] * prop.shin
        foot = shin @ _rx(a[base + 4])
        sole = -prop.ankle_h * 0.85
        # Heel: the back of the heel near the floor; toes: the tips, big toe on the
        # inner side (towards the body's midline), as COCO-WholeBody marks them.
        local = np.array(
            (
                (0.0, sole, -prop.foot_back * 0.9),
                (-sign * 0.06 * h, sole, prop.foot_front * 0.95),
                (sign * 0.1 * h, sole, prop.foot_front * 0.72),
            )
        )
        heel_toes = ankle + local @ foot.T
        pts[P[f"{side}_hip"]] = hip
        pts[P[f"{side}_knee"]] = knee
        pts[P[f"{side}_ankle"]] = ankle
        pts[P[f"{side}_heel"] : P[f"{side}_small_toe"] + 1] = heel_toes
        frames[F[f"{side}_thigh"]] = thigh
        frames[F[f"{side}_shin"]] = shin
        frames[F[f"{side}_foot"]] = foot

    # Ground contact: the lowest sole corner rests on the floor (plus the jump lift).
    body = Body3D(pts, frames, prop)
    lowest = min(sole_corners(body, side)[:_SOLE_BOTTOM, 1].min() for side in ("l", "r"))
    pts += np.array((pose.x, -lowest + max(pose.lift, 0.0), pose.z))
    return body


# sole_corners lists the six bottom corners first.
_SOLE_BOTTOM = 6


def sole_corners(body: Body3D, side: str) -> np.ndarray:
    """The 8 corners of a shoe-shaped box around one foot, (8, 3) metres."""
    prop = body.proportions
    h = prop.head_h
    foot = body.frame(f"{side}_foot")
    ankle = body.point(f"{side}_ankle")
    w = prop.foot_half_w
    # The shoe's top stays below the malleolus, as a low sneaker's does.
    bottom, top = -prop.ankle_h, -prop.ankle_h + 0.26 * h
    back, front = -prop.foot_back, prop.foot_front
    local = np.array(
        (
            (-w * 0.8, bottom, back),
            (w * 0.8, bottom, back),
            (-w, bottom, front * 0.6),
            (w, bottom, front * 0.6),
            (-w * 0.6, bottom, front),
            (w * 0.6, bottom, front),
            (-w * 0.8, top, back),
            (w * 0.8, top, back),
            (-w * 0.7, top, front * 0.75),
            (w * 0.7, top, front * 0.75),
        )
    )
    return ankle + local @ foot.T
