"""The figure as drawn: tapered shaded limbs, a torso with clothes, a head with a bold face.

Everything is drawn with OpenCV primitives (capsules, convex polygons, ellipses at
sub-pixel precision). ``Figure.items()`` returns the body parts in painter's order,
far parts first; each item draws itself twice: shaded into an RGB image, and flat
with its BodyPix-like part id into a part map, so the mask, the part map and the
keypoint visibility all come from one geometry.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from edge_agent.synth import scene
from edge_agent.synth.appearance import Attendee
from edge_agent.synth.body import Body3D, F, P, sole_corners

# The eyes, nose and mouth are drawn when the face turns at least this far to the
# camera (cosine of the face's normal); the ground truth calls them visible only then.
FACE_FEATURES_MIN_FACING = 0.15

# BodyPix's 24 parts, shifted by one so that 0 is the background.
PART_NAMES: tuple[str, ...] = (
    "background",
    "left_face",
    "right_face",
    "left_upper_arm_front",
    "left_upper_arm_back",
    "right_upper_arm_front",
    "right_upper_arm_back",
    "left_lower_arm_front",
    "left_lower_arm_back",
    "right_lower_arm_front",
    "right_lower_arm_back",
    "left_hand",
    "right_hand",
    "torso_front",
    "torso_back",
    "left_upper_leg_front",
    "left_upper_leg_back",
    "right_upper_leg_front",
    "right_upper_leg_back",
    "left_lower_leg_front",
    "left_lower_leg_back",
    "right_lower_leg_front",
    "right_lower_leg_back",
    "left_foot",
    "right_foot",
)
PART: dict[str, int] = {n: i for i, n in enumerate(PART_NAMES)}
NUM_PARTS = len(PART_NAMES) - 1  # 24, background excluded

_SHIFT = 4  # OpenCV sub-pixel bits: coordinates are drawn at 1/16 pixel
_ONE = 1 << _SHIFT
_AA = cv2.LINE_AA


# ---- drawing primitives ---------------------------------------------------------------


def _fx(pts: np.ndarray) -> np.ndarray:
    return np.rint(np.asarray(pts) * _ONE).astype(np.int32)


def _scale(color, k: float, add: float = 0.0) -> tuple[int, int, int]:
    return tuple(int(min(255.0, max(0.0, c * k + add))) for c in color)  # type: ignore[return-value]


def _quad(p0: np.ndarray, p1: np.ndarray, r0: float, r1: float) -> np.ndarray | None:
    d = p1 - p0
    n = math.hypot(d[0], d[1])
    if n < 1e-6:
        return None
    perp = np.array((-d[1] / n, d[0] / n))
    return np.array((p0 + perp * r0, p1 + perp * r1, p1 - perp * r1, p0 - perp * r0))


def _capsule(img, p0, p1, r0, r1, color, line=_AA) -> None:
    q = _quad(p0, p1, r0, r1)
    if q is not None:
        cv2.fillConvexPoly(img, _fx(q), color, line, _SHIFT)
    for p, r in ((p0, r0), (p1, r1)):
        if r * _ONE >= 1:
            cv2.circle(img, tuple(_fx(p)), int(r * _ONE), color, -1, line, _SHIFT)


def _shaded_capsule(img, p0, p1, r0, r1, color) -> None:
    """A limb with volume: dark rim, base colour body, highlight towards the light."""
    d = p1 - p0
    n = math.hypot(d[0], d[1])
    perp = np.array((-d[1], d[0])) / n if n > 1e-6 else np.array((1.0, 0.0))
    if perp @ scene.LIGHT_DIR_2D < 0:
        perp = -perp
    _capsule(img, p0, p1, r0, r1, _scale(color, 0.68))
    o0, o1 = perp * 0.16 * r0, perp * 0.16 * r1
    _capsule(img, p0 + o0, p1 + o1, r0 * 0.8, r1 * 0.8, color)
    o0, o1 = perp * 0.42 * r0, perp * 0.42 * r1
    _capsule(img, p0 + o0, p1 + o1, r0 * 0.3, r1 * 0.3, _scale(color, 1.1, 14))


def _ellipse_pts(c: np.ndarray, e1: np.ndarray, e2: np.ndarray, n: int = 24) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return c + np.outer(np.cos(t), e1) + np.outer(np.sin(t), e2)


def _clip_half_plane(poly: np.ndarray, a: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman: the part of convex ``poly`` where (p - a) . normal >= 0."""
    out = []
    s = (poly - a) @ normal
    for i in range(len(poly)):
        j = (i + 1) % len(poly)
        if s[i] >= 0:
            out.append(poly[i])
        if (s[i] >= 0) != (s[j] >= 0):
            t = s[i] / (s[i] - s[j])
            out.append(poly[i] + (poly[j] - poly[i]) * t)
    return np.array(out) if out else np.zeros((0, 2))


@functools.lru_cache(maxsize=1)
def _sphere() -> np.ndarray:
    """Unit-sphere sample points (Fibonacci lattice), for hair and head outlines."""
    n = 160
    i = np.arange(n) + 0.5
    y = 1 - 2 * i / n
    r = np.sqrt(1 - y * y)
    phi = i * math.pi * (3 - math.sqrt(5))
    return np.stack((r * np.cos(phi), y, r * np.sin(phi)), axis=1)


# ---- the figure ------------------------------------------------------------------------


@dataclass
class Item:
    depth: float
    draw_rgb: Callable[[np.ndarray], None]
    draw_parts: Callable[[np.ndarray], None]


class Figure:
    """Projects a posed body and builds its draw items."""

    def __init__(self, attendee: Attendee, body: Body3D, cam: scene.CameraModel):
        self.att = attendee
        self.look = attendee.appearance
        self.body = body
        self.cam = cam
        self.uv, self.depth = cam.project(body.points)
        self.cam_frames = np.einsum("ij,njk->nik", cam.axes, body.frames)  # axes in camera space
        self.px_per_m = cam.f_px / self.depth
        self.h = body.proportions.head_h

    # -- helpers
    def p(self, name: str) -> np.ndarray:
        return self.uv[P[name]]

    def s(self, name: str) -> float:
        return float(self.px_per_m[P[name]])

    def d(self, name: str) -> float:
        return float(self.depth[P[name]])

    def frame_cam(self, name: str) -> np.ndarray:
        return self.cam_frames[F[name]]

    def faces_camera(self, frame: str, axis: int = 2) -> float:
        """Cosine between a frame axis and the direction to the camera."""
        return float(-self.frame_cam(frame)[2, axis])

    def side_part(self, base: str, frame: str) -> int:
        front = self.faces_camera(frame) >= 0
        return PART[f"{base}_{'front' if front else 'back'}"]

    # -- items
    def items(self) -> list[Item]:
        items: list[Item] = []
        items.append(self._torso())
        items.append(self._neck())
        items.extend(self._head())
        for side, name in (("l", "left"), ("r", "right")):
            items.extend(self._arm(side, name))
            items.extend(self._leg(side, name))
        items.sort(key=lambda it: -it.depth)
        return items

    def _limb(
        self,
        a: str,
        b: str,
        radii,
        color,
        part: int,
        bias: float = -0.03,
        sleeve: tuple[float, tuple[int, int, int], float] | None = None,
    ) -> Item:
        p0, p1 = self.p(a), self.p(b)
        r0, r1 = radii[0] * self.s(a), radii[1] * self.s(b)

        def rgb(img: np.ndarray) -> None:
            _shaded_capsule(img, p0, p1, r0, r1, color)
            if sleeve is not None:
                frac, sleeve_color, extra = sleeve
                pm = p0 + (p1 - p0) * frac
                rm = r0 + (r1 - r0) * frac
                _shaded_capsule(img, p0, pm, r0 + extra * r0, rm + extra * rm, sleeve_color)

        def parts(pm: np.ndarray) -> None:
            grow = 1.0 + (sleeve[2] if sleeve is not None else 0.0)
            _capsule(pm, p0, p1, r0 * grow, r1 * grow, part, cv2.LINE_8)

        return Item((self.d(a) + self.d(b)) / 2 + bias, rgb, parts)

    def _arm(self, side: str, name: str) -> list[Item]:
        prop, look = self.body.proportions, self.look
        shirt, skin = look.shirt, look.skin
        upper_part = self.side_part(f"{name}_upper_arm", f"{side}_upper_arm")
        lower_part = self.side_part(f"{name}_lower_arm", f"{side}_forearm")
        if look.long_sleeves:
            upper = self._limb(
                f"{side}_shoulder", f"{side}_elbow", _grow(prop.upper_arm_r, 1.1), shirt, upper_part
            )
            lower = self._limb(
                f"{side}_elbow", f"{side}_wrist", _grow(prop.forearm_r, 1.1), shirt, lower_part
            )
        else:
            upper = self._limb(
                f"{side}_shoulder",
                f"{side}_elbow",
                prop.upper_arm_r,
                skin,
                upper_part,
                sleeve=(0.5, shirt, 0.15),
            )
            lower = self._limb(f"{side}_elbow", f"{side}_wrist", prop.forearm_r, skin, lower_part)
        hand = self._limb(
            f"{side}_wrist", f"{side}_hand", prop.hand_r, skin, PART[f"{name}_hand"], bias=-0.04
        )
        return [upper, lower, hand]

    def _leg(self, side: str, name: str) -> list[Item]:
        prop, look = self.body.proportions, self.look
        pants, skin = look.trousers, look.skin
        upper_part = self.side_part(f"{name}_upper_leg", f"{side}_thigh")
        lower_part = self.side_part(f"{name}_lower_leg", f"{side}_shin")
        if look.shorts:
            thigh = self._limb(
                f"{side}_hip",
                f"{side}_knee",
                prop.thigh_r,
                skin,
                upper_part,
                sleeve=(0.7, pants, 0.08),
            )
            shin = self._limb(f"{side}_knee", f"{side}_ankle", prop.shin_r, skin, lower_part)
        else:
            thigh = self._limb(
                f"{side}_hip", f"{side}_knee", _grow(prop.thigh_r, 1.08), pants, upper_part
            )
            shin = self._limb(
                f"{side}_knee", f"{side}_ankle", _grow(prop.shin_r, 1.15), pants, lower_part
            )
        return [thigh, shin, self._foot(side, name)]

    def _foot(self, side: str, name: str) -> Item:
        corners = sole_corners(self.body, side)
        uv, depth = self.cam.project(corners)
        hull = cv2.convexHull(uv.astype(np.float32)).reshape(-1, 2).astype(np.float64)
        centre = hull.mean(axis=0)
        inner = centre + (hull - centre) * 0.8 + np.array((-0.5, -1.0))
        color = self.look.shoes
        part = PART[f"{name}_foot"]

        def rgb(img: np.ndarray) -> None:
            cv2.fillConvexPoly(img, _fx(hull), _scale(color, 0.55), _AA, _SHIFT)
            cv2.fillConvexPoly(img, _fx(inner), color, _AA, _SHIFT)

        def parts(pm: np.ndarray) -> None:
            cv2.fillConvexPoly(pm, _fx(hull), part, cv2.LINE_8, _SHIFT)

        return Item(float(depth.mean()) - 0.03, rgb, parts)

    def _neck(self) -> Item:
        r = self.body.proportions.neck_r
        # Up into the head, which is drawn over the top: no ball-shaped end shows.
        return self._limb(
            "chest",
            "head",
            (r, r * 0.95),
            self.look.skin,
            PART["torso_front"] if self.faces_camera("chest") >= 0 else PART["torso_back"],
            bias=0.05,
        )

    def _torso(self) -> Item:
        prop = self.body.proportions
        h = self.h
        levels = (
            ("chest", "chest", 0.1 * h),
            ("chest", "chest", -0.55 * h),
            ("lumbar", "waist", 0.0),
            ("root", "pelvis", 0.05 * h),
            ("root", "pelvis", -0.35 * h),
        )
        centres = np.array(
            [self.body.points[P[pt]] + self.body.frames[F[fr]][:, 1] * dy for fr, pt, dy in levels]
        )
        uv, depth = self.cam.project(centres)
        side_pts = np.empty((len(levels), 2, 2))
        for i, (fr, _, _) in enumerate(levels):
            axes = self.cam_frames[F[fr]]  # columns: body x, y, z in camera coords
            spine = np.array((axes[0, 1], -axes[1, 1]))
            n = math.hypot(*spine)
            spine = spine / n if n > 0.2 else np.array((0.0, -1.0))
            u = np.array((-spine[1], spine[0]))
            if u @ scene.LIGHT_DIR_2D < 0:
                u = -u
            bx = np.array((axes[0, 0], -axes[1, 0]))
            bz = np.array((axes[0, 2], -axes[1, 2]))
            e = math.hypot(prop.torso_w[i] * (bx @ u), prop.torso_d[i] * (bz @ u))
            e *= self.cam.f_px / depth[i]
            side_pts[i, 0] = uv[i] + u * e  # lit side
            side_pts[i, 1] = uv[i] - u * e
        bottom = self.cam.project(
            (self.body.points[P["pelvis"]] - self.body.frames[F["root"]][:, 1] * 0.5 * h)[None]
        )[0][0]
        outline = np.concatenate((side_pts[:, 0], bottom[None], side_pts[::-1, 1]))
        look = self.look
        part = PART["torso_front"] if self.faces_camera("chest") >= 0 else PART["torso_back"]
        belt = 2.65  # in level units: between the waist (2) and the hip (3)

        def patch(s0: float, s1: float, t0: float, t1: float) -> np.ndarray:
            ks = [s0] + [k for k in range(len(levels)) if s0 < k < s1] + [s1]
            pts_a, pts_b = [], []
            for s in ks:
                i = min(int(s), len(levels) - 2)
                f = s - i
                a = side_pts[i] * (1 - f) + side_pts[i + 1] * f  # (2, 2): lit, dark edges
                pts_a.append(a[0] * (1 - t0) + a[1] * t0)
                pts_b.append(a[0] * (1 - t1) + a[1] * t1)
            return np.array(pts_a + pts_b[::-1])

        # A round neckline on the front: skin below the collar, above the top edge's centre.
        neckline = None
        if self.faces_camera("chest") > 0.2:
            top = (side_pts[0, 0] + side_pts[0, 1]) / 2
            across = (side_pts[0, 0] - side_pts[0, 1]) / 2 * 0.3
            down = (side_pts[1].mean(axis=0) - top) * 0.35
            t = np.linspace(0, np.pi, 9)
            neckline = top + np.outer(np.cos(t), across) + np.outer(np.sin(t), down)
        # Shading bands across the body, lit edge (t=0) to dark edge (t=1).
        bands = ((0.0, 0.07, 0.94), (0.07, 0.4, 1.1), (0.4, 0.68, 1.0), (0.68, 0.86, 0.86))
        fabric = self._shirt_pieces(belt)

        def rgb(img: np.ndarray) -> None:
            cv2.fillPoly(img, [_fx(outline)], _scale(look.shirt, 0.7), _AA, _SHIFT)
            for s0, s1, t0, t1, color in fabric + [(belt, 4.0, 0.0, 1.0, look.trousers)]:
                for b0, b1, k in bands:
                    lo, hi = max(t0, b0), min(t1, b1)
                    if hi > lo:
                        cv2.fillPoly(
                            img, [_fx(patch(s0, s1, lo, hi))], _scale(color, k), cv2.LINE_8, _SHIFT
                        )
                if t1 > 0.86:
                    cv2.fillPoly(
                        img,
                        [_fx(patch(s0, s1, max(t0, 0.86), t1))],
                        _scale(color, 0.72),
                        cv2.LINE_8,
                        _SHIFT,
                    )
            # Trousers between the legs, below the crotch level.
            crotch = np.array((side_pts[-1, 0], bottom, side_pts[-1, 1]))
            cv2.fillConvexPoly(img, _fx(crotch), _scale(look.trousers, 0.8), _AA, _SHIFT)
            if neckline is not None:
                cv2.fillConvexPoly(img, _fx(neckline), _scale(look.skin, 0.92), _AA, _SHIFT)
            # Belt line.
            a = patch(belt - 0.04, belt + 0.04, 0.0, 1.0)
            cv2.fillPoly(img, [_fx(a)], _scale(look.trousers, 0.45), cv2.LINE_8, _SHIFT)

        def parts(pm: np.ndarray) -> None:
            cv2.fillPoly(pm, [_fx(outline)], part, cv2.LINE_8, _SHIFT)

        return Item(float(depth[2]), rgb, parts)

    def _shirt_pieces(self, belt: float) -> list[tuple[float, float, float, float, tuple]]:
        look = self.look
        base, accent = look.shirt, look.shirt_accent
        if look.shirt_pattern == "hstripes":
            edges = np.arange(0.0, belt, 0.32)
            return [
                (float(s), float(min(s + 0.32, belt)), 0.0, 1.0, accent if i % 2 else base)
                for i, s in enumerate(edges)
            ]
        if look.shirt_pattern == "vstripes":
            return [
                (0.0, belt, t, t + 1 / 7, accent if i % 2 else base)
                for i, t in enumerate(np.arange(7) / 7)
            ]
        if look.shirt_pattern == "twotone":
            return [(0.0, 1.1, 0.0, 1.0, accent), (1.1, belt, 0.0, 1.0, base)]
        return [(0.0, belt, 0.0, 1.0, base)]

    def _head(self) -> list[Item]:
        prop, look, h = self.body.proportions, self.look, self.h
        head_w = self.body.frames[F["head"]]  # world axes of the head
        centre_w = self.body.points[P["head"]]
        radii = np.array(prop.head_r)
        style = look.hair_style
        volume = 1.22 if style == "curly" else 1.07
        to_cam = self.cam.toward(centre_w[None])[0]
        facing = float(head_w[:, 2] @ to_cam)

        # Head outline: the projected silhouette of the ellipsoid, sampled.
        sph = _sphere()
        surf = centre_w + (sph * radii) @ head_w.T
        normals = (sph / radii) @ head_w.T
        normals /= np.linalg.norm(normals, axis=1, keepdims=True)
        vis = normals @ to_cam > -0.05
        uv_s, _ = self.cam.project(surf)
        head_hull = cv2.convexHull(uv_s.astype(np.float32)).reshape(-1, 2).astype(np.float64)

        hair_polys: list[np.ndarray] = []
        if style != "bald":
            # Volume grows up, out and back, never forward over the face.
            grow = np.where(sph[:, 2:3] > 0.3, (volume, volume, 1.0), volume)
            hair_pts = centre_w + (sph * radii * grow) @ head_w.T
            uv_h, _ = self.cam.project(hair_pts)
            x, y, z = sph[:, 0], sph[:, 1], sph[:, 2]
            hairline = -0.05 + 0.55 * z
            regions = (
                y > 0.42,  # crown
                (x > 0.35) & (y > -0.15) & (z < 0.45),  # sides, above the ears
                (x < -0.35) & (y > -0.15) & (z < 0.45),
                (z < -0.1) & (y > hairline),  # back
            )
            for region in regions:
                sel = region & vis
                if sel.sum() >= 3:
                    hull = cv2.convexHull(uv_h[sel].astype(np.float32))
                    hair_polys.append(hull.reshape(-1, 2).astype(np.float64))
            if style == "bun":
                bun_c = centre_w + head_w @ (np.array((0.0, 0.5, -0.45)) * radii)
                bun_uv, bun_d = self.cam.project(bun_c[None])
                r = 0.3 * h * self.cam.f_px / bun_d[0]
                hair_polys.append(_ellipse_pts(bun_uv[0], np.array((r, 0)), np.array((0, r)), 16))
        else:
            sel = (sph[:, 2] < -0.2) & (np.abs(sph[:, 1]) < 0.3) & vis
            if sel.sum() >= 3:
                hull = cv2.convexHull(
                    self.cam.project(centre_w + (sph[sel] * radii * 1.03) @ head_w.T)[0].astype(
                        np.float32
                    )
                )
                hair_polys.append(hull.reshape(-1, 2).astype(np.float64))

        all_pts = np.concatenate([head_hull] + hair_polys)
        silhouette = cv2.convexHull(all_pts.astype(np.float32)).reshape(-1, 2).astype(np.float64)
        # The person's right half of the head, for the left/right face parts.
        mid_a, mid_b = self.cam.project(
            centre_w + (np.array(((0, 1.2, 0.6), (0, -1.2, 0.6))) * radii) @ head_w.T
        )[0]
        # Oriented by both side extremes: with the head turned far, the right extreme alone
        # lies behind the head and projects onto the wrong side of the midline.
        left_pt, right_pt = self.cam.project(
            centre_w + np.outer((1.0, -1.0), head_w[:, 0] * radii[0])
        )[0]
        along = mid_b - mid_a
        normal = np.array((-along[1], along[0]))
        if (right_pt - left_pt) @ normal < 0:
            normal = -normal
        right_half = _clip_half_plane(silhouette, mid_a, normal)

        ears = []
        for side, sign in (("l", 1.0), ("r", -1.0)):
            ear_n = head_w[:, 0] * sign
            if ear_n @ to_cam > -0.3:
                c = self.p(f"{side}_ear")
                s = self.s(f"{side}_ear")
                up2 = self._dir2d(head_w[:, 1])
                ears.append(
                    _ellipse_pts(
                        c, up2 * 0.17 * h * s, np.array((-up2[1], up2[0])) * 0.09 * h * s, 12
                    )
                )

        skin, hair_c = look.skin, look.hair
        features = (
            self._face_features(head_w, centre_w, to_cam)
            if facing > FACE_FEATURES_MIN_FACING
            else []
        )

        def rgb(img: np.ndarray) -> None:
            for e in ears:
                cv2.fillConvexPoly(img, _fx(e), _scale(skin, 0.8), _AA, _SHIFT)
            cv2.fillConvexPoly(img, _fx(head_hull), _scale(skin, 0.75), _AA, _SHIFT)
            c = head_hull.mean(axis=0)
            lit = c + (head_hull - c) * 0.86 + scene.LIGHT_DIR_2D * 0.06 * h * self.s("head")
            cv2.fillConvexPoly(img, _fx(lit), skin, _AA, _SHIFT)
            for poly in hair_polys:
                cv2.fillConvexPoly(img, _fx(poly), hair_c, _AA, _SHIFT)
            if hair_polys:
                # A sheen on the crown so hair reads as volume, not a flat cap.
                crown = hair_polys[0]
                cc = crown.mean(axis=0)
                sheen = cc + (crown - cc) * 0.45 + scene.LIGHT_DIR_2D * 0.1 * h * self.s("head")
                cv2.fillConvexPoly(img, _fx(sheen), _scale(hair_c, 1.25, 18), _AA, _SHIFT)
            # The face goes on last: a fringe may touch the brows, never hide the eyes,
            # because the face is what tells BlazePose front from back.
            for fn in features:
                fn(img)

        def parts(pm: np.ndarray) -> None:
            for e in ears:
                cv2.fillConvexPoly(pm, _fx(e), PART["left_face"], cv2.LINE_8, _SHIFT)
            cv2.fillConvexPoly(pm, _fx(silhouette), PART["left_face"], cv2.LINE_8, _SHIFT)
            if len(right_half) >= 3:
                cv2.fillConvexPoly(pm, _fx(right_half), PART["right_face"], cv2.LINE_8, _SHIFT)
            # Ears sit on their own side whatever the midline does.
            if len(ears) == 2:
                cv2.fillConvexPoly(pm, _fx(ears[1]), PART["right_face"], cv2.LINE_8, _SHIFT)

        items = [Item(self.d("head") - 0.12, rgb, parts)]
        if style == "long":
            items.append(self._long_hair(head_w, centre_w, radii))
        return items

    def _dir2d(self, v_world: np.ndarray) -> np.ndarray:
        c = self.cam.axes @ v_world
        d = np.array((c[0], -c[1]))
        n = math.hypot(*d)
        return d / n if n > 1e-6 else np.array((0.0, -1.0))

    def _face_features(self, head_w, centre_w, to_cam) -> list[Callable[[np.ndarray], None]]:
        """Bold eyes, brows, nose and mouth: the cue BlazePose needs to see a front view."""
        h, look = self.h, self.look
        local = (
            np.array(
                (
                    (0.17, 0.04, 0.4),  # eyes (keypoints)
                    (-0.17, 0.04, 0.4),
                    (0.07, 0.19, 0.43),  # brow inner / outer ends
                    (0.29, 0.17, 0.33),
                    (-0.07, 0.19, 0.43),
                    (-0.29, 0.17, 0.33),
                    (0.0, 0.06, 0.47),  # nose bridge
                    (0.075, -0.13, 0.47),  # nostrils
                    (-0.075, -0.13, 0.47),
                    (0.0, -0.12, 0.5),  # tip
                    (0.0, -0.3, 0.39),  # mouth
                )
            )
            * h
        )
        world = centre_w + local @ head_w.T
        uv, depth = self.cam.project(world)
        s = self.cam.f_px / float(depth.mean())
        right2 = self._dir2d(head_w[:, 0])
        up2 = self._dir2d(head_w[:, 1])
        fns: list[Callable[[np.ndarray], None]] = []
        for i, sign in ((0, 1.0), (1, -1.0)):
            eye_n = head_w @ (np.array((sign * 0.45, 0.05, 1.0)) / 1.1)
            cos_e = float(eye_n @ to_cam)
            if cos_e < 0.2:
                continue
            c = uv[i]
            ax = right2 * 0.11 * h * s * cos_e
            ay = up2 * 0.07 * h * s
            white = _ellipse_pts(c, ax, ay, 16)
            rim = _ellipse_pts(c, ax * 1.25, ay * 1.3, 16)
            pupil = _ellipse_pts(
                c, right2 * 0.055 * h * s * max(cos_e, 0.4), up2 * 0.055 * h * s, 12
            )
            b0, b1 = uv[2 + 2 * i], uv[3 + 2 * i]
            br = 0.04 * h * s

            def eye(img, white=white, rim=rim, pupil=pupil, b0=b0, b1=b1, br=br) -> None:
                cv2.fillConvexPoly(img, _fx(rim), (40, 30, 30), _AA, _SHIFT)
                cv2.fillConvexPoly(img, _fx(white), (250, 250, 250), _AA, _SHIFT)
                cv2.fillConvexPoly(img, _fx(pupil), (25, 18, 15), _AA, _SHIFT)
                _capsule(img, b0, b1, br * 1.1, br * 0.8, look.brows)

            fns.append(eye)
        skin = look.skin
        nose = np.array((uv[6], uv[7], uv[9], uv[8]))
        mouth = _ellipse_pts(
            uv[10],
            right2 * 0.13 * h * s * max(float(head_w[:, 2] @ to_cam), 0.3),
            up2 * 0.045 * h * s,
            16,
        )

        def nose_mouth(img) -> None:
            hull = cv2.convexHull(_fx(nose))
            cv2.fillConvexPoly(img, hull, _scale(skin, 0.62), _AA, _SHIFT)
            cv2.fillConvexPoly(img, _fx(mouth), look.lips, _AA, _SHIFT)
            cv2.line(
                img,
                tuple(_fx(mouth[0])),
                tuple(_fx(mouth[len(mouth) // 2])),
                (40, 15, 15),
                max(1, int(0.02 * h * s)),
                _AA,
                _SHIFT,
            )

        fns.append(nose_mouth)
        return fns

    def _long_hair(self, head_w, centre_w, radii) -> Item:
        chest = self.body.frames[F["chest"]]
        top = centre_w + head_w @ (np.array((0.0, 0.2, -0.5)) * radii)
        pts = [top + head_w[:, 0] * radii[0] * 1.1 * s for s in (-1, 1)] + [
            top
            + chest[:, 0] * radii[0] * 1.25 * s
            - chest[:, 1] * 1.9 * self.h
            - chest[:, 2] * 0.1 * self.h
            for s in (-1, 1)
        ]
        uv, depth = self.cam.project(np.array(pts))
        hull = cv2.convexHull(uv.astype(np.float32)).reshape(-1, 2).astype(np.float64)
        color = _scale(self.look.hair, 0.85)

        def rgb(img: np.ndarray) -> None:
            cv2.fillConvexPoly(img, _fx(hull), color, _AA, _SHIFT)

        def parts(pm: np.ndarray) -> None:
            cv2.fillConvexPoly(pm, _fx(hull), PART["left_face"], cv2.LINE_8, _SHIFT)

        return Item(float(depth.mean()), rgb, parts)


def _grow(radii: tuple[float, float], k: float) -> tuple[float, float]:
    return radii[0] * k, radii[1] * k
