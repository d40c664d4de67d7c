"""Dance moves and the dances composed from them.

A move is a function of time returning a ``BodyPose`` (joint angles and floor
position, never pixels), so any attendee can perform it with their own bones.
``Dance.from_seed`` strings moves together with tempo, amplitudes and sides drawn
from the seed; ``Dance.from_name`` repeats named moves (``warmup``,
``wave+squat``), which is how tests and benchmarks ask for a specific motion.
Moves blend into each other over a short crossfade, and the figure faces the
camera except during brief turns.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_agent.synth.body import ANGLE_INDEX, ANGLE_NAMES, BodyPose

_DANCE_SALT = 0xDA7CE
CROSSFADE_S = 0.35
MovePose = Callable[[float], BodyPose]


def _smooth(x: float) -> float:
    """Smoothstep on [0, 1], clamped."""
    x = min(max(x, 0.0), 1.0)
    return x * x * (3 - 2 * x)


def _swing(t: float, period: float, phase: float = 0.0) -> float:
    return math.sin(2 * math.pi * (t / period + phase))


def _pulse(t: float, period: float, phase: float = 0.0) -> float:
    """0..1..0 once per period."""
    return 0.5 - 0.5 * math.cos(2 * math.pi * (t / period + phase))


_N = BodyPose.neutral()

_MIRROR_PAIRS = [
    (ANGLE_INDEX[n], ANGLE_INDEX["r" + n[1:]]) for n in ANGLE_NAMES if n.startswith("l_")
]
_MIRROR_NEGATE = [
    ANGLE_INDEX[n]
    for n in ANGLE_NAMES
    if n.endswith(("_side", "_twist")) and not n.startswith(("l_", "r_"))
]


def mirror(pose: BodyPose) -> BodyPose:
    """The same pose with left and right exchanged."""
    a = pose.angles.copy()
    for i, j in _MIRROR_PAIRS:
        a[i], a[j] = pose.angles[j], pose.angles[i]
    a[_MIRROR_NEGATE] *= -1
    return BodyPose(a, -pose.x, pose.z, pose.lift, -pose.yaw, pose.hard_shadow)


def _stance(q: float) -> dict[str, float]:
    """Both knees bent by a squat depth ``q`` (hip flexion), feet flat, torso balanced."""
    ankle = -min(q, 0.6)
    return {
        "l_hip_flex": q,
        "r_hip_flex": q,
        "l_knee": 2 * q,
        "r_knee": 2 * q,
        "l_ankle": ankle,
        "r_ankle": ankle,
        "spine_flex": 0.35 * q,
    }


def _at(stance: dict[str, float], **angles: float) -> BodyPose:
    """The neutral pose with a stance, then ``angles`` on top of it."""
    return _N.with_angles(**{**stance, **angles})


# ---- the move library: name -> factory(rng, beat_s) -> (duration_s, pose(t)) ----------


def _groove(rng: np.random.Generator, beat: float) -> tuple[float, MovePose]:
    sway = rng.uniform(0.15, 0.35)

    def pose(t: float) -> BodyPose:
        b = _pulse(t, beat)
        s = _swing(t, 2 * beat)
        return _at(
            _stance(0.08 + 0.12 * b),
            l_shoulder_flex=sway * s,
            r_shoulder_flex=-sway * s,
            l_elbow=0.4 + 0.2 * b,
            r_elbow=0.4 + 0.2 * b,
            spine_side=0.05 * s,
            neck_side=0.08 * s,
        ).moved(x=0.04 * s)

    return rng.uniform(1.5, 3.0), pose


def _wave(rng: np.random.Generator, beat: float) -> tuple[float, MovePose]:
    both = rng.random() < 0.6
    height = rng.uniform(1.4, 2.4)

    def pose(t: float) -> BodyPose:
        w = _swing(t, beat)
        v = _swing(t, beat, 0.25)
        angles = {
            **_stance(0.06 + 0.06 * _pulse(t, beat)),
            "l_shoulder_abd": height + 0.35 * w,
            "l_elbow": 0.7 + 0.6 * v,
            "l_shoulder_twist": 1.2,
            "spine_side": 0.08 * w,
        }
        if both:
            angles.update(
                r_shoulder_abd=height - 0.35 * w, r_elbow=0.7 - 0.6 * v, r_shoulder_twist=1.2
            )
        else:
            angles.update(r_shoulder_abd=0.3 + 0.1 * w, r_elbow=0.5, r_shoulder_flex=0.15)
        return _N.with_angles(**angles)

    return rng.uniform(2.0, 4.0), pose


def _squat(rng: np.random.Generator, beat: float) -> tuple[float, MovePose]:
    depth = rng.uniform(0.7, 1.15)
    period = 2 * beat

    def pose(t: float) -> BodyPose:
        q = depth * _pulse(t, period)
        return _at(
            _stance(0.05 + q),
            l_shoulder_flex=1.5 * q / depth,
            r_shoulder_flex=1.5 * q / depth,
            l_elbow=0.2,
            r_elbow=0.2,
            l_hip_abd=0.15,
            r_hip_abd=0.15,
        )

    return period * int(rng.integers(2, 4)), pose


def _step(rng: np.random.Generator, beat: float) -> tuple[float, MovePose]:
    reach = rng.uniform(0.2, 0.4)
    period = 2 * beat

    def pose(t: float) -> BodyPose:
        s = _swing(t, period)
        lift_l = max(0.0, math.sin(2 * math.pi * t / period + 0.5))
        lift_r = max(0.0, -math.sin(2 * math.pi * t / period + 0.5))
        return _at(
            _stance(0.1),
            l_hip_abd=0.05 + 0.25 * lift_l,
            r_hip_abd=0.05 + 0.25 * lift_r,
            l_knee=0.2 + 0.5 * lift_l,
            r_knee=0.2 + 0.5 * lift_r,
            l_hip_flex=0.1 + 0.2 * lift_l,
            r_hip_flex=0.1 + 0.2 * lift_r,
            l_shoulder_flex=0.5 * s,
            r_shoulder_flex=-0.5 * s,
            l_elbow=0.8,
            r_elbow=0.8,
            spine_twist=0.1 * s,
        ).moved(x=reach * s)

    return period * int(rng.integers(2, 4)), pose


def _turn(rng: np.random.Generator, beat: float) -> tuple[float, MovePose]:
    direction = 1.0 if rng.random() < 0.5 else -1.0
    full = rng.random() < 0.6
    duration = rng.uniform(1.2, 1.8)

    def pose(t: float) -> BodyPose:
        u = _smooth(t / duration)
        # A full spin, or a quick look over the shoulder and back.
        yaw = direction * (2 * math.pi * u if full else 1.1 * math.sin(math.pi * u))
        return _at(
            _stance(0.12),
            l_shoulder_abd=0.7,
            r_shoulder_abd=0.7,
            l_elbow=0.6,
            r_elbow=0.6,
        ).moved(yaw=yaw)

    return duration, pose


def _jump(rng: np.random.Generator, beat: float) -> tuple[float, MovePose]:
    height = rng.uniform(0.08, 0.18)
    period = max(beat, 0.5)

    def pose(t: float) -> BodyPose:
        p = (t / period) % 1.0
        air = math.sin(math.pi * p)  # one jump per period
        open_ = _pulse(t, 2 * period)  # jacks: open and close every other jump
        crouch = 0.25 * (1 - air) ** 4
        return _at(
            _stance(0.05 + crouch),
            l_hip_abd=0.05 + 0.35 * open_,
            r_hip_abd=0.05 + 0.35 * open_,
            l_shoulder_abd=0.2 + 2.5 * open_,
            r_shoulder_abd=0.2 + 2.5 * open_,
            l_ankle=0.5 * air,
            r_ankle=0.5 * air,
        ).moved(lift=height * air)

    return period * int(rng.integers(3, 6)), pose


def _disco(rng: np.random.Generator, beat: float) -> tuple[float, MovePose]:
    period = 2 * beat

    def pose(t: float) -> BodyPose:
        up = _pulse(t, period)
        return _at(
            _stance(0.1 + 0.1 * (1 - up)),
            r_shoulder_abd=0.4 + 2.1 * up,
            r_shoulder_flex=0.5,
            r_elbow=0.1,
            l_shoulder_abd=0.6,
            l_elbow=1.7,
            l_shoulder_twist=-1.4,
            l_hip_abd=0.2,
            spine_side=-0.15 * up,
            neck_side=-0.15 * up,
            neck_twist=-0.25 * up,
        ).moved(x=0.1 * _swing(t, 2 * period))

    return period * int(rng.integers(2, 4)), pose


def _march(rng: np.random.Generator, beat: float) -> tuple[float, MovePose]:
    knee = rng.uniform(0.9, 1.5)
    period = 2 * beat

    def pose(t: float) -> BodyPose:
        s = _swing(t, period)
        left, right = max(0.0, s), max(0.0, -s)
        return _N.with_angles(
            l_hip_flex=knee * left,
            r_hip_flex=knee * right,
            l_knee=1.4 * knee * left,
            r_knee=1.4 * knee * right,
            l_ankle=0.3 * left,
            r_ankle=0.3 * right,
            l_shoulder_flex=-0.7 * s,
            r_shoulder_flex=0.7 * s,
            l_elbow=1.3,
            r_elbow=1.3,
        )

    return period * int(rng.integers(2, 4)), pose


# The warm-up visits the limits of every joint group, one keyframe per beat pair.
_WARMUP_KEYS: tuple[dict[str, float], ...] = (
    {},
    {"l_shoulder_flex": 3.0, "r_shoulder_flex": 3.0, "l_elbow": 0.1, "r_elbow": 0.1},
    {"l_shoulder_abd": 1.57, "r_shoulder_abd": 1.57, "l_elbow": 0.05, "r_elbow": 0.05},
    {"l_shoulder_flex": 1.57, "r_shoulder_flex": 1.57, "l_elbow": 0.05, "r_elbow": 0.05},
    {"l_shoulder_flex": 1.57, "r_shoulder_flex": 1.57, "l_elbow": 2.3, "r_elbow": 2.3},
    {
        "l_shoulder_abd": 2.8,
        "r_shoulder_abd": 0.3,
        "spine_side": -0.45,
        "neck_side": -0.2,
        "l_elbow": 0.2,
    },
    {
        "r_shoulder_abd": 2.8,
        "l_shoulder_abd": 0.3,
        "spine_side": 0.45,
        "neck_side": 0.2,
        "r_elbow": 0.2,
    },
    {"spine_twist": 0.8, "l_shoulder_abd": 1.4, "r_shoulder_abd": 1.4, "neck_twist": 0.4},
    {"spine_twist": -0.8, "l_shoulder_abd": 1.4, "r_shoulder_abd": 1.4, "neck_twist": -0.4},
    {
        "spine_flex": 1.1,
        "l_hip_flex": 0.6,
        "r_hip_flex": 0.6,
        "l_shoulder_flex": 1.2,
        "r_shoulder_flex": 1.2,
        "neck_flex": 0.2,
    },
    {"l_hip_flex": 1.6, "l_knee": 1.9, "l_shoulder_abd": 0.6, "r_shoulder_abd": 0.6},
    {"r_hip_flex": 1.6, "r_knee": 1.9, "l_shoulder_abd": 0.6, "r_shoulder_abd": 0.6},
    {"l_hip_abd": 0.75, "spine_side": -0.2, "l_shoulder_abd": 1.2, "r_shoulder_abd": 1.2},
    {"r_hip_abd": 0.75, "spine_side": 0.2, "l_shoulder_abd": 1.2, "r_shoulder_abd": 1.2},
    {"l_knee": 2.0, "l_hip_flex": -0.2, "r_shoulder_flex": 1.0},
    {"neck_flex": 0.5, "l_shoulder_abd": 0.3, "r_shoulder_abd": 0.3},
    {"neck_flex": -0.4, "neck_twist": 0.8},
    {"neck_twist": -0.8, "l_wrist": 1.0, "r_wrist": -0.8, "l_elbow": 1.5, "r_elbow": 1.5},
    {**_stance(1.0), "l_shoulder_flex": 1.5, "r_shoulder_flex": 1.5},
    {},
)


def _warmup(rng: np.random.Generator, beat: float) -> tuple[float, MovePose]:
    step = 2 * beat
    keys = [_N.with_angles(**k) for k in _WARMUP_KEYS]

    def pose(t: float) -> BodyPose:
        i = int(t // step)
        if i >= len(keys) - 1:
            return keys[-1]
        return BodyPose.blend(keys[i], keys[i + 1], _smooth((t - i * step) / step))

    return step * (len(keys) - 1), pose


def _stepout(rng: np.random.Generator, beat: float) -> tuple[float, MovePose]:
    """Side-step out of the frame to the left and back, while the spotlight shines.

    The dancer leaves entirely (no keypoint in frame) while their hard wall shadow
    stays in view: the "backup dancer" that pose gating must not follow. Measured
    for viewpoints 0-2 (the centre camera and the two-camera pair).
    """
    out_x = -2.7
    walk = 2.6
    hold = rng.uniform(1.2, 2.0)
    period = 0.55

    def pose(t: float) -> BodyPose:
        if t < walk:
            x, moving = out_x * _smooth(t / walk), True
        elif t < walk + hold:
            x, moving = out_x, False
        else:
            x, moving = out_x * (1 - _smooth((t - walk - hold) / walk)), True
        s = _swing(t, period) if moving else 0.0
        left, right = max(0.0, s), max(0.0, -s)
        return _N.with_angles(
            l_hip_abd=0.05 + 0.3 * left,
            r_hip_abd=0.05 + 0.3 * right,
            l_knee=0.1 + 0.5 * left,
            r_knee=0.1 + 0.5 * right,
            l_hip_flex=0.15 * left,
            r_hip_flex=0.15 * right,
            l_shoulder_flex=0.3 * s,
            r_shoulder_flex=-0.3 * s,
        ).moved(x=x, hard_shadow=True)

    return 2 * walk + hold, pose


MOVES: dict[str, Callable[[np.random.Generator, float], tuple[float, MovePose]]] = {
    "groove": _groove,
    "wave": _wave,
    "squat": _squat,
    "step": _step,
    "turn": _turn,
    "jump": _jump,
    "disco": _disco,
    "march": _march,
    "warmup": _warmup,
    "stepout": _stepout,
}
# Seeded dances draw from these (the step-out leaves the frame; ask for it by name).
_SEEDED_WEIGHTS = {
    "wave": 3,
    "squat": 2,
    "step": 3,
    "turn": 1,
    "jump": 2,
    "disco": 2,
    "march": 2,
    "groove": 1,
    "warmup": 1,
}


@dataclass(frozen=True)
class MoveSpan:
    name: str
    start_s: float
    duration_s: float
    pose: MovePose


class Dance:
    """A choreography: ``pose(t)`` for any time ``t >= 0`` seconds."""

    def __init__(self, name: str, spans: list[MoveSpan], bpm: float) -> None:
        if not spans:
            raise ValueError("a dance needs at least one move")
        self.name = name
        self.spans = spans
        self.bpm = bpm
        self.length_s = spans[-1].start_s + spans[-1].duration_s
        self._starts = np.array([s.start_s for s in spans])
        self.hard_shadow = False  # set for dances that contain a step-out

    @classmethod
    def from_seed(cls, seed: int, length_s: float = 180.0) -> Dance:
        if seed < 0:
            raise ValueError(f"dance seed must be >= 0, got {seed}")
        rng = np.random.default_rng([seed, _DANCE_SALT])
        bpm = float(rng.uniform(90, 130))
        mirrored = bool(rng.random() < 0.5)
        names = list(_SEEDED_WEIGHTS)
        p = np.array([_SEEDED_WEIGHTS[n] for n in names], dtype=float)
        p /= p.sum()
        sequence = ["groove"]
        total = 0.0
        while total < length_s:
            name = names[int(rng.choice(len(names), p=p))]
            if name == sequence[-1]:
                continue
            sequence.append(name)
            total += 3.0
        return cls._compose(f"seed-{seed}", sequence, rng, bpm, mirrored)

    @classmethod
    def from_name(cls, spec: str) -> Dance:
        """Named moves joined by ``+``, repeated: ``warmup``, ``wave+squat``, ``stepout``."""
        names = [n.strip().lower() for n in spec.split("+")]
        unknown = [n for n in names if n not in MOVES]
        if not names or unknown:
            raise ValueError(
                f"unknown dance move {', '.join(unknown) or spec!r}; "
                f"known: {', '.join(MOVES)} (join with +), or a seed number"
            )
        rng = np.random.default_rng([sum(map(ord, spec)), _DANCE_SALT])
        sequence = ["groove"] + names * 24
        dance = cls._compose(spec, sequence, rng, 110.0, mirrored=False, groove_s=0.6)
        dance.hard_shadow = "stepout" in names
        return dance

    @classmethod
    def parse(cls, spec: str | int) -> Dance:
        """A seed number (``7``) or move names (``warmup``, ``wave+squat``)."""
        if isinstance(spec, int) or str(spec).strip().lstrip("-").isdigit():
            return cls.from_seed(int(spec))
        return cls.from_name(str(spec))

    @classmethod
    def _compose(
        cls,
        name: str,
        sequence: list[str],
        rng: np.random.Generator,
        bpm: float,
        mirrored: bool,
        groove_s: float | None = None,
    ) -> Dance:
        beat = 60.0 / bpm
        spans, t = [], 0.0
        for i, move in enumerate(sequence):
            duration, fn = MOVES[move](rng, beat)
            if i == 0 and groove_s is not None:
                duration = groove_s
            if mirrored and rng.random() < 0.5:
                fn = _mirrored(fn)
            spans.append(MoveSpan(move, t, duration, fn))
            t += duration
        return cls(name, spans, bpm)

    def pose(self, t: float) -> BodyPose:
        """The pose at ``t`` seconds; a dance repeats once it has run its course."""
        t = float(t) % self.length_s if t >= self.length_s else max(float(t), 0.0)
        i = int(np.searchsorted(self._starts, t, side="right")) - 1
        span = self.spans[i]
        local = t - span.start_s
        current = span.pose(local)
        if i > 0 and local < CROSSFADE_S:
            prev = self.spans[i - 1]
            before = prev.pose(min(t - prev.start_s, prev.duration_s))
            current = BodyPose.blend(before, current, _smooth(local / CROSSFADE_S))
        if self.hard_shadow and not current.hard_shadow:
            current = current.moved(hard_shadow=True)
        return current

    def poses(self, fps: float, seconds: float) -> list[BodyPose]:
        """Poses sampled at ``fps`` for ``seconds``: ``round(fps * seconds)`` of them."""
        if fps <= 0 or seconds < 0:
            raise ValueError(f"need fps > 0 and seconds >= 0, got {fps} and {seconds}")
        return [self.pose(i / fps) for i in range(int(round(fps * seconds)))]

    def moves_at(self, fps: float, seconds: float) -> list[str]:
        """The move each frame belongs to (for labelling benchmarks and contact sheets)."""
        out = []
        for k in range(int(round(fps * seconds))):
            t = k / fps
            t = t % self.length_s if t >= self.length_s else t
            out.append(self.spans[int(np.searchsorted(self._starts, t, side="right")) - 1].name)
        return out


def _mirrored(fn: MovePose) -> MovePose:
    return lambda t: mirror(fn(t))
