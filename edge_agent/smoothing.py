"""Imputation, jitter smoothing and glitch flags for keypoint streams.

Three things live here, all on the canonical (23, 3) ``(x, y, score)`` skeleton:

- ``CausalSmoother``: the per-camera filter that runs on the edge, one frame in,
  one frame out, no look-ahead. Each joint is a 2-D point whose velocity relaxes
  towards zero under white acceleration noise (a Kalman filter per joint; x and y
  share one covariance because they share the noise model). Three things adapt:
  the measurement noise grows as the detector's score falls and is learnt per
  joint from second differences of the measurements; the process noise is boosted
  when the filter is surprised (a running normalised innovation) and trimmed until
  successive innovations are uncorrelated, so it averages hard while the dancer
  holds still and follows when she moves. An innovation gate, bone-length and
  speed checks reject outliers; a joint whose measurements are missing or rejected
  is predicted forward for up to ``max_gap_frames`` (and marked imputed), then
  dropped until it is measured again.
- ``smooth_offline``: the same forward filter followed by a Rauch-Tung-Striebel
  backward pass, for whole recordings (reference dances). Interior gaps are
  interpolated by the smoother itself.
- ``OneEuroFilter``: the plain One Euro filter (Casiez, Roussel & Vogel, CHI 2012),
  the baseline the benchmark compares against.

Glitch flags mark frames whose input pose jumps implausibly: a bone whose length
departs from its running median (over the last ``window`` frames) by more than
``max_bone_change`` of it, or a joint moving faster than ``max_speed_body_per_s``
torso lengths per second. The ring buffer of recent bone and torso lengths is the
per-camera state those checks use.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from edge_agent import skeleton as sk
from edge_agent.config import SmoothingConfig

log = logging.getLogger(__name__)

J = sk.NUM_JOINTS
_LIMB_A = np.array([a for a, _ in sk.LIMB_INDEX])
_LIMB_B = np.array([b for _, b in sk.LIMB_INDEX])
_TORSO = tuple(sk.INDEX[n] for n in ("left_shoulder", "right_shoulder", "left_hip", "right_hip"))

# A bone's allowed change is relative to its running median, but the face and foot
# bones are a few pixels long: relative to them, ordinary detector jitter looks like
# a glitch. Below this fraction of the torso, the torso fraction is the reference.
_MIN_BONE_FRACTION_OF_TORSO = 0.25
# Scores below this are clipped so a near-zero score cannot make the noise infinite.
_MIN_WEIGHT_SCORE = 0.05
# The process noise may also shrink, down to this fraction, while the dancer holds
# still: the filter then averages over more frames.
_MIN_NOISE_SCALE = 0.01
# Learnt detector noise: never trust a joint to better than this, and cap one
# second-difference sample at this multiple of the current estimate.
_MIN_NOISE_PX = 0.3
_NOISE_SAMPLE_CAP = 16.0
# The running normalised innovation fluctuates around 1 by chance; only a surprise
# beyond this factor boosts the process noise.
_SURPRISE_SLACK = 2.0
# The speed check allows this many standard deviations of detector noise.
_NOISE_ALLOWANCE = 4.0
# Imputed joints carry a score: their last measured score times this factor, so
# consumers thresholding on score see them as less certain than measured ones.
_IMPUTED_SCORE_FACTOR = 0.5


def _transition(dt: float, decay_hz: float) -> tuple[float, float]:
    """The position-from-velocity and velocity-decay terms of the motion model.

    With ``decay_hz == 0`` this is constant velocity; otherwise velocity relaxes
    towards zero (an Ornstein-Uhlenbeck velocity, as in Singer's manoeuvre model), so
    a joint predicted through a gap coasts to a stop instead of flying off.
    """
    if decay_hz <= 0:
        return dt, 1.0
    f11 = math.exp(-decay_hz * dt)
    return (1.0 - f11) / decay_hz, f11


def clean(skeleton: np.ndarray, min_score: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a skeleton into positions (J, 2) float64, scores (J,) and a presence mask.

    A joint counts as present only if its score reaches ``min_score`` (and is above
    zero) and all three of its numbers are finite: NaNs and infinities from a
    misbehaving backend mean "missing", never "at NaN".
    """
    arr = np.asarray(skeleton, dtype=np.float64)
    if arr.shape != (J, 3):
        raise ValueError(f"a skeleton has shape ({J}, 3), got {arr.shape}")
    finite = np.isfinite(arr).all(axis=1)
    score = np.where(finite, arr[:, 2], 0.0)
    present = finite & (score > 0) & (score >= min_score)
    xy = np.where(present[:, None], arr[:, :2], 0.0)
    return xy, np.where(present, score, 0.0), present


@dataclass
class SmoothedPose:
    """One frame out of the causal smoother."""

    skeleton: np.ndarray  # (23, 3) float32; score 0 = missing
    imputed: np.ndarray  # (23,) bool: predicted, not measured, this frame
    glitch: bool = False
    # Why the frame is a glitch, plus any track the smoother restarted.
    reasons: tuple[str, ...] = ()
    # Measurements refused as outliers this frame (their joints are imputed).
    rejected: np.ndarray = field(default_factory=lambda: np.zeros(J, dtype=bool))


@dataclass
class SmoothedSequence:
    """A whole recording out of ``smooth_offline``."""

    skeletons: np.ndarray  # (N, 23, 3) float32
    imputed: np.ndarray  # (N, 23) bool
    glitch: np.ndarray  # (N,) bool
    reasons: list[tuple[str, ...]]


@dataclass
class _StepRecord:
    """What the forward filter did in one frame (the offline smoother replays it)."""

    pos_pred: np.ndarray
    vel_pred: np.ndarray
    p_pred: np.ndarray  # (J, 3): P00, P01, P11 of the predicted covariance
    pos: np.ndarray
    vel: np.ndarray
    p: np.ndarray
    dt: float
    alive: np.ndarray  # a track exists after this frame
    fresh: np.ndarray  # the track (re)started this frame: no link to the previous frame
    accepted: np.ndarray  # a measurement was used this frame
    miss: np.ndarray  # frames since the last accepted measurement
    score: np.ndarray  # last accepted score


class _Ring:
    """The last ``size`` rows of ``width`` values (NaN = unknown), with per-column medians."""

    def __init__(self, size: int, width: int) -> None:
        self.rows = np.full((size, width), np.nan)
        self.next = 0

    def clear(self) -> None:
        self.rows[:] = np.nan
        self.next = 0

    def push(self, row: np.ndarray) -> None:
        self.rows[self.next] = row
        self.next = (self.next + 1) % len(self.rows)

    def medians(self) -> np.ndarray:
        """Median of the known values per column, NaN where none is known."""
        # np.nanmedian costs ~0.4 ms here (masked arrays); a sort puts NaNs last.
        ordered = np.sort(self.rows, axis=0)
        known = np.count_nonzero(~np.isnan(self.rows), axis=0)
        cols = np.arange(self.rows.shape[1])
        lo = ordered[np.maximum(known - 1, 0) // 2, cols]
        hi = ordered[known // 2 - (known == 0), cols]
        return np.where(known > 0, (lo + hi) / 2, np.nan)


class _JointTracks:
    """The per-joint constant-velocity Kalman filters, vectorised over joints.

    ``reset_after`` is the longest run of frames without an accepted measurement
    that keeps a track alive: the causal smoother uses ``max_gap_frames``, the
    offline smoother its (longer) interpolation limit.
    """

    def __init__(self, cfg: SmoothingConfig, fps: float, reset_after: int) -> None:
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.cfg = cfg
        self.fps = float(fps)
        self.reset_after = int(reset_after)
        self._bones = _Ring(cfg.window, len(_LIMB_A))
        self._torsos = _Ring(cfg.window, 1)
        self.reset()

    def reset(self) -> None:
        self.pos = np.zeros((J, 2))
        self.vel = np.zeros((J, 2))
        self.p = np.zeros((J, 3))
        self.alive = np.zeros(J, dtype=bool)
        self.miss = np.zeros(J, dtype=np.int64)
        self.rejects = np.zeros(J, dtype=np.int64)
        self.surprise = np.ones(J)  # running normalised innovation, 1 = as modelled
        self.log_q_scale = np.zeros(J)  # slow process-noise trim from innovation whiteness
        self.last_innov = np.zeros((J, 2))  # previous normalised innovation, 0 = none
        # Detector noise per joint, learnt from the measurements' second differences.
        self.noise_var = np.full(J, self.cfg.meas_noise_px**2)
        self.z1 = np.zeros((J, 2))  # the last two accepted measurements
        self.z2 = np.zeros((J, 2))
        self.run = np.zeros(J, dtype=np.int64)  # consecutive frames with one
        self.score = np.zeros(J)
        self.seen_pos = np.zeros((J, 2))  # estimate at the last accepted measurement
        self.seen_age_s = np.zeros(J)  # and how long ago that was
        self.last_ts_ns: int | None = None
        self._bones.clear()
        self._torsos.clear()

    # ---- the running reference lengths ------------------------------------------

    def torso_px(self) -> float:
        return float(self._torsos.medians()[0])

    def bone_medians(self) -> np.ndarray:
        return self._bones.medians()

    def _remember_lengths(self, pos: np.ndarray, ok: np.ndarray) -> None:
        both = ok[_LIMB_A] & ok[_LIMB_B]
        lengths = np.where(both, np.linalg.norm(pos[_LIMB_A] - pos[_LIMB_B], axis=1), np.nan)
        self._bones.push(lengths)
        if ok[list(_TORSO)].all():
            ls, rs, lh, rh = (pos[i] for i in _TORSO)
            self._torsos.push(np.array([np.linalg.norm((ls + rs) / 2 - (lh + rh) / 2)]))

    # ---- one frame ------------------------------------------------------------------

    def dt_for(self, ts_ns: int | None) -> float:
        nominal = 1.0 / self.fps
        if ts_ns is None or self.last_ts_ns is None:
            if ts_ns is not None:
                self.last_ts_ns = int(ts_ns)
            return nominal
        dt = (int(ts_ns) - self.last_ts_ns) / 1e9
        if dt <= 0:
            # A repeated or backwards timestamp: trust the nominal rate instead.
            log.debug("non-increasing timestamp", extra={"dt_s": dt})
            return nominal
        self.last_ts_ns = int(ts_ns)
        return dt

    def step(
        self, skeleton: np.ndarray, dt: float
    ) -> tuple[_StepRecord, np.ndarray, bool, tuple[str, ...]]:
        cfg = self.cfg
        z, score, present = clean(skeleton, cfg.min_score)

        # Predict every live track.
        q = (
            cfg.accel_noise_psd
            * np.exp(self.log_q_scale)
            * np.clip(self.surprise / _SURPRISE_SLACK, 1.0, cfg.max_noise_boost)
        )
        a = self.alive
        f01, f11 = _transition(dt, self.cfg.velocity_decay_hz)
        pos_pred = self.pos + self.vel * f01
        vel_pred = self.vel * f11
        p00, p01, p11 = self.p.T
        pp = np.stack(
            [
                p00 + 2 * f01 * p01 + f01 * f01 * p11 + q * dt**3 / 3,
                f11 * p01 + f01 * f11 * p11 + q * dt**2 / 2,
                f11 * f11 * p11 + q * dt,
            ],
            axis=1,
        )
        pos_pred[~a] = 0.0
        vel_pred[~a] = 0.0
        pp[~a] = 0.0

        # Gate each measured joint against its track.
        weight = np.clip(score, _MIN_WEIGHT_SCORE, 1.0)
        r = self.noise_var / weight**2
        s_var = pp[:, 0] + r
        innov = z - pos_pred
        nis = np.where(a & present, (innov**2).sum(axis=1) / s_var, 0.0)
        gate_fail = a & present & (nis > cfg.gate_chi2)

        # Glitch checks on the measurement: bone lengths against their running
        # medians, and speed against the last output.
        reasons: list[str] = []
        blamed = np.zeros(J, dtype=bool)
        torso = self.torso_px()
        med = self.bone_medians()
        both = present[_LIMB_A] & present[_LIMB_B] & ~np.isnan(med)
        if both.any():
            length = np.linalg.norm(z[_LIMB_A] - z[_LIMB_B], axis=1)
            ref = np.maximum(med, _MIN_BONE_FRACTION_OF_TORSO * torso) if torso == torso else med
            ref = np.maximum(ref, 1e-6)
            change = np.abs(length - med) / ref
            # In 2-D a forearm swinging towards the camera shrinks by half within a
            # quarter second, far from its running median yet smoothly. So a glitch
            # must also break the length the two tracks predict for this very frame,
            # and one end must have left its track; that end (the larger surprise)
            # takes the blame.
            predicted = np.linalg.norm(pos_pred[_LIMB_A] - pos_pred[_LIMB_B], axis=1)
            jump = np.where(a[_LIMB_A] & a[_LIMB_B], np.abs(length - predicted) / ref, np.inf)
            bad = (
                both
                & (change > cfg.max_bone_change)
                & (jump > cfg.max_bone_change / 2)
                & (gate_fail[_LIMB_A] | gate_fail[_LIMB_B])
            )
            for k in np.flatnonzero(bad):
                ia, ib = _LIMB_A[k], _LIMB_B[k]
                culprit = ia if nis[ia] >= nis[ib] else ib
                blamed[culprit] = True
                reasons.append(
                    f"bone {sk.JOINTS[ia]}-{sk.JOINTS[ib]} changed {change[k]:.0%}"
                    f" (limit {cfg.max_bone_change:.0%})"
                )
        fast = np.zeros(J, dtype=bool)
        if torso == torso and torso > 0:
            # Against the last measured estimate, not an imputed one: imputation
            # drifts, and its drift is no evidence about the dancer.
            moved = present & a
            if moved.any():
                age = self.seen_age_s + dt
                step_px = np.linalg.norm(z - self.seen_pos, axis=1)
                speed = step_px / age / torso
                # At 120 fps a joint moves a few pixels per frame, as much as the
                # detector's own noise: allow the noise on top of the top speed, or
                # jitter alone reads as implausible speed.
                allowed_px = cfg.max_speed_body_per_s * torso * age + _NOISE_ALLOWANCE * np.sqrt(r)
                fast = moved & (step_px > allowed_px)
                for j in np.flatnonzero(fast):
                    reasons.append(
                        f"{sk.JOINTS[j]} moved {speed[j]:.1f} torso/s"
                        f" (limit {cfg.max_speed_body_per_s:g})"
                    )

        # Which measurements to use. A gate failure is an outlier when it breaks a
        # bone, when no bone can vouch for it (its neighbours are missing or also
        # surprised), or when it is far beyond any manoeuvre (a bone only vouches
        # for its length: a jump across the bone keeps it). Otherwise the dancer
        # really moved faster than the model expected, and the track follows with
        # its uncertainty inflated.
        neighbour_ok = np.zeros(J, dtype=bool)
        vouch_any = present[_LIMB_A] & present[_LIMB_B] & ~np.isnan(med)
        np.logical_or.at(neighbour_ok, _LIMB_A, vouch_any & ~gate_fail[_LIMB_B])
        np.logical_or.at(neighbour_ok, _LIMB_B, vouch_any & ~gate_fail[_LIMB_A])
        far = a & present & (nis > cfg.reject_chi2)
        reject = present & (fast | far | (gate_fail & (blamed | ~neighbour_ok)))
        # A run of rejections that long is no outlier: the track was lost; restart it.
        restart = reject & (self.rejects + 1 > cfg.max_reject_frames)
        reject &= ~restart
        use = present & ~reject
        inflate = use & gate_fail & ~restart
        new = use & (~a | restart)
        upd = use & ~new

        if inflate.any():
            # Part of the prediction (so the offline pass sees the same prior).
            pp[inflate] *= (nis[inflate] / cfg.gate_chi2)[:, None]
        pos, vel, p = pos_pred.copy(), vel_pred.copy(), pp.copy()
        if upd.any():
            s_u = p[upd, 0] + r[upd]
            k0 = p[upd, 0] / s_u
            k1 = p[upd, 1] / s_u
            y = z[upd] - pos[upd]
            pos[upd] += k0[:, None] * y
            vel[upd] += k1[:, None] * y
            p00, p01, p11 = p[upd].T
            p[upd] = np.stack([(1 - k0) * p00, (1 - k0) * p01, p11 - k1 * p01], axis=1)
            nis_u = (y**2).sum(axis=1) / s_u / 2  # per axis, so 1 on average
            alpha = cfg.noise_adapt_rate
            self.surprise[upd] = (1 - alpha) * self.surprise[upd] + alpha * nis_u
            # A well-tuned filter leaves white innovations. Successive innovations
            # that agree mean it lags (too little process noise); that alternate mean
            # it chases noise (too much). Trim the process noise until they are white.
            y_n = y / np.sqrt(s_u)[:, None]
            agree = (y_n * self.last_innov[upd]).sum(axis=1) / 2
            self.log_q_scale[upd] = np.clip(
                self.log_q_scale[upd] + cfg.noise_trim_rate * agree,
                math.log(_MIN_NOISE_SCALE),
                math.log(cfg.max_noise_boost),
            )
            self.last_innov[upd] = y_n
        if new.any():
            pos[new] = z[new]
            vel[new] = 0.0
            p[new] = np.stack(
                [r[new], np.zeros(new.sum()), np.full(new.sum(), cfg.init_speed_px_s**2)], axis=1
            )
            self.surprise[new] = 1.0
            self.last_innov[new] = 0.0
        if restart.any():
            reasons.extend(f"{sk.JOINTS[j]} track restarted" for j in np.flatnonzero(restart))

        self._learn_noise(z, weight, use)
        self.seen_pos = np.where(use[:, None], pos, self.seen_pos)
        self.seen_age_s = np.where(use, 0.0, self.seen_age_s + dt)
        self.rejects = np.where(reject, self.rejects + 1, 0)
        self.miss = np.where(use, 0, self.miss + 1)
        self.score = np.where(use, score, self.score)
        alive = (a | new) & (self.miss <= self.reset_after)
        pos[~alive] = 0.0
        vel[~alive] = 0.0
        p[~alive] = 0.0
        self.surprise[~alive] = 1.0
        self.last_innov[~use] = 0.0
        self.pos, self.vel, self.p, self.alive = pos, vel, p, alive

        rec = _StepRecord(
            pos_pred=pos_pred,
            vel_pred=vel_pred,
            p_pred=pp,
            pos=pos,
            vel=vel,
            p=p,
            dt=dt,
            alive=alive.copy(),
            fresh=new.copy(),
            accepted=use.copy(),
            miss=self.miss.copy(),
            score=self.score.copy(),
        )
        glitch = bool(blamed.any() or fast.any())
        return rec, reject, glitch, tuple(reasons)

    def _learn_noise(self, z: np.ndarray, weight: np.ndarray, use: np.ndarray) -> None:
        """Track each joint's detector noise from second differences of its measurements.

        At camera rates the true motion barely bends within three frames, so
        ``z[t] - 2 z[t-1] + z[t-2]`` is mostly noise with variance 6 sigma^2 per axis.
        A noise level learnt this way keeps the process-noise adaptation honest: a
        noisier detector than configured is not mistaken for a fast dancer.
        """
        three = use & (self.run >= 2)
        if three.any():
            d = z[three] - 2 * self.z1[three] + self.z2[three]
            var = (d**2).sum(axis=1) / 12 * weight[three] ** 2
            # One wild sample (a missed outlier) must not blow up the estimate.
            var = np.minimum(var, _NOISE_SAMPLE_CAP * self.noise_var[three])
            rate = self.cfg.noise_learn_rate
            self.noise_var[three] = np.maximum(
                (1 - rate) * self.noise_var[three] + rate * var, _MIN_NOISE_PX**2
            )
        self.z2 = np.where(use[:, None], self.z1, self.z2)
        self.z1 = np.where(use[:, None], z, self.z1)
        self.run = np.where(use, self.run + 1, 0)

    def publish(self, pos: np.ndarray, measured: np.ndarray) -> None:
        """Remember the output's bone and torso lengths as the glitch references."""
        self._remember_lengths(pos, measured)


def _assemble(
    pos: np.ndarray, ok: np.ndarray, accepted: np.ndarray, score: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((J, 3), dtype=np.float32)
    out[ok, :2] = pos[ok]
    imputed = ok & ~accepted
    out[ok, 2] = np.where(imputed, score * _IMPUTED_SCORE_FACTOR, score)[ok]
    return out, imputed


class CausalSmoother:
    """The per-camera smoother: one skeleton in, one smoothed skeleton out.

    It keeps a ring buffer of the last ``cfg.window`` frames' bone lengths and torso
    lengths as the references for glitch checks. ``fps`` is the nominal camera rate,
    used when ``update`` gets no timestamp.
    """

    def __init__(self, cfg: SmoothingConfig | None = None, fps: float = 120.0) -> None:
        self.cfg = cfg or SmoothingConfig()
        self._tracks = _JointTracks(self.cfg, fps, reset_after=self.cfg.max_gap_frames)

    def reset(self) -> None:
        """Forget everything (a new take, or a cut in the frame sequence)."""
        self._tracks.reset()

    def update(self, skeleton: np.ndarray, ts_ns: int | None = None) -> SmoothedPose:
        t = self._tracks
        dt = t.dt_for(ts_ns)
        rec, rejected, glitch, reasons = t.step(skeleton, dt)
        ok = rec.alive & (rec.miss <= self.cfg.max_gap_frames)
        out, imputed = _assemble(rec.pos, ok, rec.accepted, rec.score)
        t.publish(rec.pos, rec.accepted)
        return SmoothedPose(out, imputed, glitch, reasons, rejected)


def smooth_offline(
    seq: np.ndarray,
    fps: float,
    cfg: SmoothingConfig | None = None,
    ts_ns: np.ndarray | None = None,
) -> SmoothedSequence:
    """Smooth a whole recording with both past and future frames (Rauch-Tung-Striebel).

    Interior gaps up to ``cfg.offline_max_gap_frames`` are interpolated; gaps at the
    end of a track are extrapolated for up to ``cfg.max_gap_frames`` like the causal
    smoother does; longer gaps and leading gaps stay missing.
    """
    cfg = cfg or SmoothingConfig()
    arr = np.asarray(seq, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[1:] != (J, 3):
        raise ValueError(f"a pose sequence has shape (N, {J}, 3), got {arr.shape}")
    n = arr.shape[0]
    if ts_ns is not None and len(ts_ns) != n:
        raise ValueError(f"got {len(ts_ns)} timestamps for {n} frames")
    if n == 0:
        return SmoothedSequence(
            arr.copy(), np.zeros((0, J), dtype=bool), np.zeros(0, dtype=bool), []
        )
    reach = max(cfg.offline_max_gap_frames, cfg.max_gap_frames)
    tracks = _JointTracks(cfg, fps, reset_after=reach)
    recs: list[_StepRecord] = []
    glitch = np.zeros(n, dtype=bool)
    reasons: list[tuple[str, ...]] = []
    for i in range(n):
        dt = tracks.dt_for(None if ts_ns is None else int(ts_ns[i]))
        rec, _, glitch[i], why = tracks.step(arr[i], dt)
        reasons.append(why)
        tracks.publish(rec.pos, rec.accepted)
        recs.append(rec)

    # Backward pass. Joints are independent and x/y share covariances, so the gain
    # C = P_f F^T P_pred^-1 is one 2x2 matrix per joint per frame.
    pos_s = np.zeros((n, J, 2))
    vel_s = np.zeros((n, J, 2))
    for i in range(n - 1, -1, -1):
        rec = recs[i]
        pos_s[i], vel_s[i] = rec.pos, rec.vel
        if i == n - 1:
            continue
        nxt = recs[i + 1]
        link = rec.alive & nxt.alive & ~nxt.fresh
        if not link.any():
            continue
        f01, f11 = _transition(nxt.dt, cfg.velocity_decay_hz)
        p00, p01, p11 = rec.p[link].T
        # P_f F^T with F = [[1, f01], [0, f11]]
        a00, a01 = p00 + f01 * p01, f11 * p01
        a10, a11 = p01 + f01 * p11, f11 * p11
        b00, b01, b11 = nxt.p_pred[link].T
        det = b00 * b11 - b01 * b01
        det = np.where(np.abs(det) < 1e-12, 1e-12, det)
        i00, i01, i11 = b11 / det, -b01 / det, b00 / det
        c00, c01 = a00 * i00 + a01 * i01, a00 * i01 + a01 * i11
        c10, c11 = a10 * i00 + a11 * i01, a10 * i01 + a11 * i11
        dp = pos_s[i + 1][link] - nxt.pos_pred[link]
        dv = vel_s[i + 1][link] - nxt.vel_pred[link]
        pos_s[i][link] = rec.pos[link] + c00[:, None] * dp + c01[:, None] * dv
        vel_s[i][link] = rec.vel[link] + c10[:, None] * dp + c11[:, None] * dv

    # Which joints to output: measured ones, interior gaps of a live track, and the
    # first max_gap_frames of a track's tail.
    accepted = np.stack([r.accepted for r in recs])
    alive = np.stack([r.alive for r in recs])
    score = np.stack([r.score for r in recs])
    later = np.zeros((n, J), dtype=bool)  # an accepted measurement follows on this track
    run = np.zeros(J, dtype=bool)
    for i in range(n - 1, -1, -1):
        later[i] = run & alive[i]
        run = (accepted[i] | (run & alive[i])) & ~recs[i].fresh
    miss = np.stack([r.miss for r in recs])
    ok = accepted | (alive & later) | (alive & (miss <= cfg.max_gap_frames))
    out = np.zeros((n, J, 3), dtype=np.float32)
    imputed = np.zeros((n, J), dtype=bool)
    for i in range(n):
        out[i], imputed[i] = _assemble(pos_s[i], ok[i], accepted[i], score[i])
    return SmoothedSequence(out, imputed, glitch, reasons)


class OneEuroFilter:
    """The plain One Euro filter on every coordinate (Casiez et al., CHI 2012).

    A missing joint holds its last output for up to ``hold_frames`` frames, then is
    dropped; the filter restarts when the joint returns after that.
    """

    def __init__(
        self,
        fps: float,
        min_cutoff_hz: float = 1.0,
        beta: float = 0.0,
        d_cutoff_hz: float = 1.0,
        min_score: float = 0.0,
        hold_frames: int = 0,
    ) -> None:
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = float(fps)
        self.min_cutoff_hz = min_cutoff_hz
        self.beta = beta
        self.d_cutoff_hz = d_cutoff_hz
        self.min_score = min_score
        self.hold_frames = hold_frames
        self.reset()

    @classmethod
    def from_config(cls, cfg: SmoothingConfig, fps: float) -> OneEuroFilter:
        return cls(
            fps,
            cfg.min_cutoff_hz,
            cfg.beta,
            cfg.d_cutoff_hz,
            min_score=cfg.min_score,
            hold_frames=cfg.max_gap_frames,
        )

    def reset(self) -> None:
        self.x = np.zeros((J, 2))
        self.dx = np.zeros((J, 2))
        self.score = np.zeros(J)
        self.seen = np.zeros(J, dtype=bool)
        self.age_s = np.zeros(J)  # time since each joint's last sample
        self.miss = np.zeros(J, dtype=np.int64)
        self.last_ts_ns: int | None = None

    @staticmethod
    def _alpha(cutoff_hz: np.ndarray | float, dt: np.ndarray) -> np.ndarray:
        tau = 1.0 / (2 * math.pi * cutoff_hz)
        return 1.0 / (1.0 + tau / dt)

    def update(self, skeleton: np.ndarray, ts_ns: int | None = None) -> np.ndarray:
        if ts_ns is None or self.last_ts_ns is None or ts_ns <= self.last_ts_ns:
            dt = 1.0 / self.fps
        else:
            dt = (ts_ns - self.last_ts_ns) / 1e9
        if ts_ns is not None:
            self.last_ts_ns = ts_ns
        z, score, present = clean(skeleton, self.min_score)
        self.age_s += dt
        first = present & ~self.seen
        cont = present & self.seen
        if cont.any():
            dts = self.age_s[cont][:, None]
            dx = (z[cont] - self.x[cont]) / dts
            a_d = self._alpha(self.d_cutoff_hz, dts)
            self.dx[cont] = a_d * dx + (1 - a_d) * self.dx[cont]
            cutoff = self.min_cutoff_hz + self.beta * np.abs(self.dx[cont])
            a = self._alpha(cutoff, dts)
            self.x[cont] = a * z[cont] + (1 - a) * self.x[cont]
        self.x[first] = z[first]
        self.dx[first] = 0.0
        self.seen |= present
        self.score = np.where(present, score, self.score)
        self.age_s[present] = 0.0
        self.miss = np.where(present, 0, self.miss + 1)
        drop = self.seen & (self.miss > self.hold_frames)
        self.seen &= ~drop
        out = np.zeros((J, 3), dtype=np.float32)
        out[self.seen, :2] = self.x[self.seen]
        out[self.seen, 2] = self.score[self.seen]
        return out
