"""Attendees: proportions and looks, drawn deterministically from a seed."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from edge_agent.synth.body import Proportions
from edge_agent.synth.scene import FLOOR_RGB, WALL_RGB

RGB = tuple[int, int, int]

# Stream salts keep the attendee and dance random streams apart for equal seeds.
_ATTENDEE_SALT = 0xA77E

# From very light to very dark; jittered per attendee.
_SKIN_TONES: tuple[RGB, ...] = (
    (250, 220, 196),
    (241, 194, 160),
    (228, 178, 138),
    (205, 145, 105),
    (176, 118, 80),
    (140, 90, 58),
    (105, 66, 42),
    (80, 52, 36),
)
_HAIR_COLORS: tuple[RGB, ...] = (
    (28, 24, 24),
    (55, 38, 28),
    (95, 65, 42),
    (190, 160, 100),
    (145, 68, 35),
    (150, 150, 150),
)
_TROUSERS: tuple[RGB, ...] = (
    (42, 56, 92),  # denim
    (30, 30, 36),
    (185, 165, 122),  # khaki
    (105, 105, 112),
    (28, 36, 70),  # navy
    (86, 88, 56),  # olive
    (222, 220, 212),
    (130, 32, 42),
)
_SHOES: tuple[RGB, ...] = (
    (235, 235, 235),
    (30, 30, 30),
    (120, 70, 40),
    (200, 40, 40),
    (40, 60, 150),
)
HAIR_STYLES = ("short", "long", "bun", "curly", "bald")
SHIRT_PATTERNS = ("plain", "hstripes", "vstripes", "twotone")


def _distance(a: RGB, b: RGB) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def _jitter(rng: np.random.Generator, color: RGB, amount: float) -> RGB:
    c = np.clip(np.asarray(color, dtype=np.float64) + rng.uniform(-amount, amount, 3), 0, 255)
    return tuple(int(round(v)) for v in c)  # type: ignore[return-value]


def _hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


@dataclass(frozen=True)
class Appearance:
    """Colours (RGB) and styles of one attendee."""

    skin: RGB
    hair: RGB
    hair_style: str
    brows: RGB
    lips: RGB
    shirt: RGB
    shirt_accent: RGB
    shirt_pattern: str
    long_sleeves: bool
    trousers: RGB
    shorts: bool
    shoes: RGB


@dataclass(frozen=True)
class Attendee:
    """One person: body proportions plus looks. ``from_seed`` is deterministic."""

    seed: int
    proportions: Proportions
    appearance: Appearance
    # The booth's side spotlight is on for this attendee, casting a hard wall shadow.
    hard_shadow: bool

    @classmethod
    def from_seed(cls, seed: int) -> Attendee:
        if seed < 0:
            raise ValueError(f"attendee seed must be >= 0, got {seed}")
        rng = np.random.default_rng([seed, _ATTENDEE_SALT])
        height = float(np.clip(rng.normal(1.72, 0.09), 1.5, 1.95))
        prop = Proportions.make(
            height_m=height,
            heads=float(rng.uniform(7.2, 7.8)),
            build=float(rng.uniform(0.92, 1.3)),
            shoulders=float(rng.uniform(0.93, 1.1)),
            hips=float(rng.uniform(0.93, 1.12)),
            arms=float(rng.uniform(0.96, 1.04)),
            legs=float(rng.uniform(0.96, 1.04)),
        )
        skin = _jitter(rng, _SKIN_TONES[rng.integers(len(_SKIN_TONES))], 8)
        hair = _jitter(rng, _HAIR_COLORS[rng.integers(len(_HAIR_COLORS))], 10)
        style = HAIR_STYLES[int(rng.choice(len(HAIR_STYLES), p=(0.35, 0.3, 0.12, 0.15, 0.08)))]
        # Brows stay bold and dark whatever the hair: a visible face is what lets
        # BlazePose tell front from back (DESIGN.md).
        brows = tuple(int(c * 0.35) for c in hair)
        lips = (int(skin[0] * 0.45) + 30, int(skin[1] * 0.25), int(skin[2] * 0.25))
        shirt = _hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.35, 0.95))
        accent = _hsv(rng.random(), rng.uniform(0.0, 0.8), rng.uniform(0.2, 1.0))
        if _distance(shirt, accent) < 90:
            accent = tuple(255 - c for c in shirt)  # type: ignore[assignment]
        pattern = SHIRT_PATTERNS[int(rng.choice(len(SHIRT_PATTERNS), p=(0.4, 0.25, 0.2, 0.15)))]
        # Trousers must stand out from the floor and the wall: khaki on a brown
        # floor was the worst case measured for BlazePose.
        order = rng.permutation(len(_TROUSERS))
        trousers = next(
            t
            for t in (_TROUSERS[i] for i in order)
            if _distance(t, FLOOR_RGB) > 90 and _distance(t, WALL_RGB) > 90
        )
        trousers = _jitter(rng, trousers, 10)
        appearance = Appearance(
            skin=skin,
            hair=hair,
            hair_style=style,
            brows=brows,  # type: ignore[arg-type]
            lips=lips,
            shirt=shirt,
            shirt_accent=accent,
            shirt_pattern=pattern,
            long_sleeves=bool(rng.random() < 0.45),
            trousers=trousers,
            shorts=bool(rng.random() < 0.15),
            shoes=_SHOES[rng.integers(len(_SHOES))],
        )
        return cls(seed, prop, appearance, hard_shadow=bool(rng.random() < 0.35))
