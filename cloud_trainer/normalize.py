"""Global pose normalization from a reference dance to the attendee's take (EDN-style).

Everybody Dance Now (Chan et al., 2019, section 4 "Global pose normalization")
maps each source pose into the target's frame with one scale and one offset that
depend only on how far from the camera the source stands, read off the ankle
line: between the farthest (highest in the image) and closest (lowest) ankle
positions of each subject, the target's position and the ratio of body heights
are interpolated linearly.

Our choices, each for a reason:
- The floor contact of a frame is the *lower* ankle (largest y), not the mean:
  a dancer lifting one foot still stands on the other, so the floor line does
  not bounce with every step.
- Where a subject stands is that floor contact with its brief rises filled in
  (a grey-level closing over about a second, ``_STANCE_S``): a jump, a hop or a
  heel lifted in a squat is motion, not a step away from the camera. Each frame is
  placed and scaled by where the subject stands, and its feet keep their height
  above that, scaled, so a jump is rendered as a jump and the attendee's own jumps
  do not lift their floor line.
- Closest and farthest positions are the 5th/95th percentiles of where the subject
  stands, so one bad pose does not define the booth's depth range.
- Body height is ankle-to-head: floor contact minus the highest head keypoint.
  People crouch while dancing, so the height at a position is a high percentile
  (90th) of the heights of frames near that position, which is the standing height.
- Horizontally the reference's centre (median ankle midpoint) is moved onto the
  attendee's, so the rendered attendee stands where they stood in the booth.
- The depth model needs a real walk in depth: a range of at least 10% of body
  height, in which the subject looks taller close than far (perspective). Short of
  that, one scale and one floor line are used: a height measured on a few frames
  at an "extreme" would otherwise scale the dance by what happens there (a squat
  measured as the far height drew squats up to 28% too tall).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from edge_agent import skeleton as sk
from edge_agent.errors import BadInput

log = logging.getLogger(__name__)

_HEAD = [sk.INDEX[n] for n in ("nose", "left_eye", "right_eye", "left_ear", "right_ear")]
_ANKLES = [sk.INDEX["left_ankle"], sk.INDEX["right_ankle"]]
# Percentiles for the closest/farthest positions and the standing height (see module doc).
_RANGE_PCT = (5.0, 95.0)
_HEIGHT_PCT = 90.0
# Share of the depth range around an extreme whose frames measure the height there.
_BAND = 0.25
# The depth model's least range, as a share of body height, and the least height gain
# from far to close that makes the range a walk in depth (see the module doc).
_MIN_DEPTH_RANGE = 0.10
_MIN_PERSPECTIVE_GAIN = 1.02
# A rise of the feet shorter than this is motion (a jump, a squat), not a change of place.
_STANCE_S = 1.0
DEFAULT_FPS = 30.0


@dataclass(frozen=True)
class BodyStats:
    """Where a subject stands and how tall they are, measured over a whole sequence."""

    floor_far: float  # image y of the floor contact at the farthest position
    floor_close: float  # ... at the closest position
    height_far: float  # ankle-to-head height in pixels at the farthest position
    height_close: float
    center_x: float  # median x of the ankle midpoint
    frames: int  # frames that had ankles and a head

    @property
    def depth_range(self) -> float:
        return self.floor_close - self.floor_far


def floor_contact(poses: np.ndarray, min_score: float = 0.0) -> np.ndarray:
    """Per frame, the image y where the body meets the floor (lower ankle); NaN if none."""
    p = np.asarray(poses, dtype=np.float32)
    y = np.where(p[:, _ANKLES, 2] > min_score, p[:, _ANKLES, 1], np.nan)
    return np.fmax(y[:, 0], y[:, 1])  # fmax ignores a NaN unless both are NaN


def body_heights(poses: np.ndarray, min_score: float = 0.0) -> np.ndarray:
    """Per frame, ankle-to-head height in pixels; NaN where ankles or head are missing."""
    p = np.asarray(poses, dtype=np.float32)
    head = np.where(p[:, _HEAD, 2] > min_score, p[:, _HEAD, 1], np.inf).min(axis=1)
    head[~np.isfinite(head)] = np.nan
    return floor_contact(p, min_score) - head


def stance_window(fps: float) -> int:
    """Frames of the closing that turns floor contact into where a subject stands."""
    return max(1, round(_STANCE_S * fps)) | 1  # odd, so it is centred


def _rolling(x: np.ndarray, window: int, reduce) -> np.ndarray:
    half = window // 2
    win = sliding_window_view(np.pad(x, half, mode="edge"), 2 * half + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN window stays NaN
        return reduce(win, axis=1)


def stance(floor: np.ndarray, window: int) -> np.ndarray:
    """Where the subject stands, per frame: ``floor`` with rises shorter than ``window``
    filled in (a grey-level closing; image y grows downwards, so a rise is a dip in y).

    A steady walk toward or away from the camera passes through unchanged; frames
    without ankles stay NaN.
    """
    floor = np.asarray(floor, dtype=np.float64)
    if window <= 1 or len(floor) < 2 or np.isnan(floor).all():
        return floor.copy()
    closed = _rolling(_rolling(floor, window, np.nanmax), window, np.nanmin)
    closed[np.isnan(floor)] = np.nan
    return closed


def measure(poses: np.ndarray, min_score: float = 0.0, fps: float = DEFAULT_FPS) -> BodyStats:
    """Robust floor positions and heights of one subject (see the module doc)."""
    p = np.asarray(poses, dtype=np.float32)
    floor = stance(floor_contact(p, min_score), stance_window(fps))
    height = body_heights(p, min_score)
    ok = np.isfinite(floor) & np.isfinite(height) & (height > 0)
    if ok.sum() == 0:
        raise BadInput("cannot normalise poses: no frame shows both the ankles and the head")
    floor, height = floor[ok], height[ok]
    far, close = np.percentile(floor, _RANGE_PCT)
    standing = float(np.percentile(height, _HEIGHT_PCT))
    walk = close - far >= _MIN_DEPTH_RANGE * standing
    if walk:
        band = _BAND * (close - far)
        h_far = float(np.percentile(height[floor <= far + band], _HEIGHT_PCT))
        h_close = float(np.percentile(height[floor >= close - band], _HEIGHT_PCT))
        walk = h_close >= h_far * _MIN_PERSPECTIVE_GAIN
    if not walk:
        # No walk in depth (or none that perspective confirms): one place, one scale.
        h_far = h_close = standing
        far = close = float(np.median(floor))
    ank = p[ok][:, _ANKLES]
    present = ank[:, :, 2] > min_score
    mid_x = np.nanmean(np.where(present, ank[:, :, 0], np.nan), axis=1)
    return BodyStats(
        floor_far=float(far),
        floor_close=float(close),
        height_far=h_far,
        height_close=h_close,
        center_x=float(np.nanmedian(mid_x)),
        frames=int(ok.sum()),
    )


@dataclass(frozen=True)
class GlobalNormalization:
    """The fitted mapping from reference pixels to attendee pixels."""

    source: BodyStats
    target: BodyStats
    min_score: float = 0.0  # keypoints below it are missing (as ``fit`` measured)
    source_window: int = 1  # the reference's stance window (``stance_window``)

    def _alpha(self, floor: np.ndarray) -> np.ndarray:
        s = self.source
        if s.depth_range <= 0:
            return np.full_like(floor, 0.5)
        return np.clip((floor - s.floor_far) / s.depth_range, 0.0, 1.0)

    def scale(self, floor: np.ndarray) -> np.ndarray:
        s, t = self.source, self.target
        far, close = t.height_far / s.height_far, t.height_close / s.height_close
        return far + self._alpha(floor) * (close - far)

    def affines(self, poses: np.ndarray) -> np.ndarray:
        """Per frame, the (2, 3) affine map from reference pixels to attendee pixels.

        Every frame's map is a uniform scale plus a translation, so it moves a
        person mask exactly as it moves the keypoints (``parts`` label maps need that).
        """
        p = np.asarray(poses, dtype=np.float32)
        # Placed and scaled by where the subject stands; the feet's height above that
        # (a jump) is carried over, scaled.
        floor = stance(floor_contact(p, self.min_score), self.source_window)
        # Frames without ankles borrow the nearest measured stance.
        missing = np.isnan(floor)
        if missing.all():
            floor[:] = (self.source.floor_far + self.source.floor_close) / 2
        elif missing.any():
            idx = np.arange(len(floor))
            floor[missing] = np.interp(idx[missing], idx[~missing], floor[~missing])
        s, t = self.source, self.target
        clipped = np.clip(floor, s.floor_far, s.floor_close)
        alpha = self._alpha(floor)
        scale = self.scale(floor)
        target_floor = t.floor_far + alpha * (t.floor_close - t.floor_far)
        m = np.zeros((len(p), 2, 3), dtype=np.float64)
        m[:, 0, 0] = m[:, 1, 1] = scale
        m[:, 0, 2] = t.center_x - scale * s.center_x
        m[:, 1, 2] = target_floor - scale * clipped
        return m

    def apply(self, poses: np.ndarray) -> np.ndarray:
        """Map reference poses (N, 23, 3) into the attendee's image; scores are kept."""
        p = np.array(poses, dtype=np.float32, copy=True)
        m = self.affines(p)
        present = p[:, :, 2] > 0
        x = m[:, 0, 0, None] * p[:, :, 0] + m[:, 0, 2, None]
        y = m[:, 1, 1, None] * p[:, :, 1] + m[:, 1, 2, None]
        p[:, :, 0] = np.where(present, x, 0.0)
        p[:, :, 1] = np.where(present, y, 0.0)
        return p


FIT_MIN_SCORE = 0.3  # the keypoint score ``fit`` trusts


def shows_whole_body(poses: np.ndarray, min_score: float = FIT_MIN_SCORE) -> bool:
    """True if some frame shows the ankles and the head: what ``fit`` needs of a take."""
    height = body_heights(poses, min_score)
    return bool(np.any(np.isfinite(height) & (height > 0)))


def fit(
    reference: np.ndarray,
    take: np.ndarray,
    min_score: float = FIT_MIN_SCORE,
    *,
    reference_fps: float = DEFAULT_FPS,
    take_fps: float = DEFAULT_FPS,
) -> GlobalNormalization:
    """Fit the normalization from reference poses to the attendee's take poses."""
    try:
        source = measure(reference, min_score, reference_fps)
    except BadInput:
        raise BadInput(
            "cannot normalise: the reference has no frame showing both ankles and the head"
        ) from None
    try:
        target = measure(take, min_score, take_fps)
    except BadInput:
        raise BadInput(
            "cannot normalise: the attendee's take has no frame showing both ankles and the head"
        ) from None
    norm = GlobalNormalization(source, target, min_score, stance_window(reference_fps))
    log.info(
        "normalization fitted",
        extra={
            "scale_far": target.height_far / source.height_far,
            "scale_close": target.height_close / source.height_close,
            "target_floor": (target.floor_far, target.floor_close),
        },
    )
    return norm


def normalize(
    reference: np.ndarray,
    take: np.ndarray,
    min_score: float = 0.3,
    *,
    reference_fps: float = DEFAULT_FPS,
    take_fps: float = DEFAULT_FPS,
) -> np.ndarray:
    """Reference poses moved and scaled to stand like the attendee in their take."""
    norm = fit(reference, take, min_score, reference_fps=reference_fps, take_fps=take_fps)
    return norm.apply(reference)
