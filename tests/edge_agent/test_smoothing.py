"""Imputation, smoothing and glitch flags, on small synthetic trajectories (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent import skeleton as sk
from edge_agent.config import SmoothingConfig
from edge_agent.smoothing import (
    CausalSmoother,
    OneEuroFilter,
    SmoothedPose,
    smooth_offline,
)

FPS = 120.0
IDX = sk.INDEX


def _figure(n: int, seed: int = 0, amplitude: float = 1.0) -> np.ndarray:
    """A stick figure with rigid bones (torso 100 px) swaying and waving its arms.

    Every bone keeps its length, so a correct glitch detector stays quiet on it.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(n) / FPS
    out = np.zeros((n, sk.NUM_JOINTS, 3), dtype=np.float64)
    out[..., 2] = 0.9
    hip = np.stack([64 + 20 * amplitude * np.sin(2 * np.pi * 0.5 * t), 170 + 0 * t], axis=1)

    def put(name: str, p: np.ndarray) -> None:
        out[:, IDX[name], :2] = p

    def limb(start: np.ndarray, angle: np.ndarray, length: float) -> np.ndarray:
        return start + length * np.stack([np.sin(angle), np.cos(angle)], axis=1)

    shoulder = hip + [0, -100]
    for side, sign in (("left", 1.0), ("right", -1.0)):
        sh = shoulder + [sign * 30, 0]
        hp = hip + [sign * 18, 0]
        put(f"{side}_shoulder", sh)
        put(f"{side}_hip", hp)
        phase = rng.uniform(0, 2 * np.pi)
        upper = sign * (0.6 + amplitude * 0.9 * np.sin(2 * np.pi * 1.2 * t + phase))
        fore = upper + sign * (0.4 + amplitude * 0.6 * np.sin(2 * np.pi * 1.7 * t + phase))
        elbow = limb(sh, upper, 55)
        put(f"{side}_elbow", elbow)
        put(f"{side}_wrist", limb(elbow, fore, 45))
        knee = limb(hp, sign * 0.1 + 0 * t, 75)
        ankle = limb(knee, 0 * t, 70)
        put(f"{side}_knee", knee)
        put(f"{side}_ankle", ankle)
        put(f"{side}_heel", ankle + [-sign * 4, 12])
        put(f"{side}_big_toe", ankle + [sign * 20, 14])
        put(f"{side}_small_toe", ankle + [sign * 13, 15])
    head = shoulder + [0, -38]
    put("nose", head)
    for side, sign in (("left", 1.0), ("right", -1.0)):
        put(f"{side}_eye", head + [sign * 9, -6])
        put(f"{side}_ear", head + [sign * 18, -2])
    return out.astype(np.float32)


def _noisy(gt: np.ndarray, sigma_px: float = 2.0, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = gt.copy()
    out[..., :2] += rng.normal(0, sigma_px, out[..., :2].shape)
    return out


def _err_px(a: np.ndarray, gt: np.ndarray) -> float:
    present = a[..., 2] > 0
    return float(np.linalg.norm(a[..., :2] - gt[..., :2], axis=-1)[present].mean())


def _causal(seq: np.ndarray, cfg: SmoothingConfig | None = None) -> list[SmoothedPose]:
    sm = CausalSmoother(cfg or SmoothingConfig(), FPS)
    return [sm.update(f) for f in seq]


def _stack(poses: list[SmoothedPose]) -> np.ndarray:
    return np.stack([p.skeleton for p in poses])


# ---- edge cases -------------------------------------------------------------------------


def test_every_point_missing_yields_missing_joints_and_no_glitch() -> None:
    seq = np.zeros((20, sk.NUM_JOINTS, 3), dtype=np.float32)
    poses = _causal(seq)
    assert all((p.skeleton == 0).all() and not p.imputed.any() and not p.glitch for p in poses)
    off = smooth_offline(seq, FPS)
    assert (off.skeletons == 0).all()
    assert not off.imputed.any()
    assert not off.glitch.any()


def test_an_empty_sequence_smooths_to_an_empty_sequence() -> None:
    off = smooth_offline(np.zeros((0, sk.NUM_JOINTS, 3), np.float32), FPS)
    assert off.skeletons.shape == (0, sk.NUM_JOINTS, 3)
    assert off.imputed.shape == (0, sk.NUM_JOINTS)
    assert off.glitch.shape == (0,)


def test_missing_frames_before_the_first_detection_are_not_invented() -> None:
    gt = _figure(30)
    seq = gt.copy()
    seq[:10] = 0
    poses = _causal(seq)
    assert all((p.skeleton[:, 2] == 0).all() for p in poses[:10])
    assert (poses[10].skeleton[:, 2] > 0).all()
    off = smooth_offline(seq, FPS)
    assert (off.skeletons[:10, :, 2] == 0).all()


def test_a_single_frame_passes_through_unchanged() -> None:
    frame = _figure(1)[0]
    out = CausalSmoother(SmoothingConfig(), FPS).update(frame)
    np.testing.assert_allclose(out.skeleton, frame, atol=1e-4)
    assert not out.imputed.any()
    off = smooth_offline(frame[None], FPS)
    np.testing.assert_allclose(off.skeletons[0], frame, atol=1e-4)


def test_nans_are_treated_as_missing_and_never_reach_the_output() -> None:
    seq = _figure(40)
    seq[5, IDX["left_wrist"], 0] = np.nan
    seq[6, IDX["nose"], 2] = np.nan
    seq[7] = np.nan
    seq[8, IDX["left_knee"], 1] = np.inf
    poses = _causal(seq)
    out = _stack(poses)
    assert np.isfinite(out).all()
    # Short gaps right after a track started are imputed, not dropped.
    assert poses[5].imputed[IDX["left_wrist"]]
    assert poses[7].imputed.all()
    off = smooth_offline(seq, FPS)
    assert np.isfinite(off.skeletons).all()
    assert off.imputed[7].all()


def test_low_scores_count_as_missing() -> None:
    cfg = SmoothingConfig(min_score=0.5)
    seq = _figure(20)
    seq[10:, IDX["nose"], 2] = 0.2
    poses = _causal(seq, cfg)
    assert poses[12].imputed[IDX["nose"]]
    assert not poses[12].imputed[IDX["left_hip"]]


def test_wrong_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        CausalSmoother().update(np.zeros((17, 3)))
    with pytest.raises(ValueError, match="shape"):
        smooth_offline(np.zeros((5, 17, 3)), FPS)
    with pytest.raises(ValueError, match="fps"):
        CausalSmoother(SmoothingConfig(), fps=0)


def test_outputs_are_float32_with_the_documented_shapes() -> None:
    seq = _noisy(_figure(12))
    pose = CausalSmoother(SmoothingConfig(), FPS).update(seq[0])
    assert pose.skeleton.shape == (sk.NUM_JOINTS, 3) and pose.skeleton.dtype == np.float32
    assert pose.imputed.shape == (sk.NUM_JOINTS,) and pose.imputed.dtype == bool
    assert pose.rejected.shape == (sk.NUM_JOINTS,) and pose.rejected.dtype == bool
    assert isinstance(pose.glitch, bool)
    off = smooth_offline(seq, FPS)
    assert off.skeletons.shape == seq.shape and off.skeletons.dtype == np.float32
    assert off.imputed.shape == seq.shape[:2] and off.imputed.dtype == bool
    assert off.glitch.shape == (len(seq),) and off.glitch.dtype == bool
    assert len(off.reasons) == len(seq)
    euro = OneEuroFilter(FPS).update(seq[0])
    assert euro.shape == (sk.NUM_JOINTS, 3) and euro.dtype == np.float32


# ---- imputation -------------------------------------------------------------------------


@pytest.mark.parametrize("gap", [1, 4, 8])
def test_a_gap_of_at_most_k_frames_is_imputed_near_the_truth(gap: int) -> None:
    cfg = SmoothingConfig(max_gap_frames=8)
    gt = _figure(80)
    seq = gt.copy()
    wrist = IDX["left_wrist"]
    seq[40 : 40 + gap, wrist] = 0
    poses = _causal(seq, cfg)
    span = range(40, 40 + gap)
    assert all(poses[i].imputed[wrist] and poses[i].skeleton[wrist, 2] > 0 for i in span)
    err = [np.linalg.norm(poses[i].skeleton[wrist, :2] - gt[i, wrist, :2]) for i in span]
    # Better than holding the last seen position (what a plain filter does).
    held = [np.linalg.norm(gt[39, wrist, :2] - gt[i, wrist, :2]) for i in span]
    assert sum(err) < 0.5 * sum(held)
    assert max(err) < 15.0
    assert not poses[40 + gap].imputed[wrist]
    assert not poses[39].imputed.any()


def test_a_gap_longer_than_k_frames_is_left_missing_after_k() -> None:
    cfg = SmoothingConfig(max_gap_frames=5)
    seq = _figure(60)
    wrist = IDX["left_wrist"]
    seq[20:32, wrist] = 0
    poses = _causal(seq, cfg)
    assert all(poses[i].imputed[wrist] for i in range(20, 25))
    for i in range(25, 32):
        assert poses[i].skeleton[wrist, 2] == 0
        assert not poses[i].imputed[wrist]
    # The joint comes back as a fresh, measured track.
    assert poses[32].skeleton[wrist, 2] > 0
    np.testing.assert_allclose(poses[32].skeleton[wrist], seq[32, wrist], atol=1e-4)


def test_offline_interpolates_interior_gaps_up_to_its_limit_only() -> None:
    cfg = SmoothingConfig(max_gap_frames=4, offline_max_gap_frames=10)
    gt = _figure(90)
    seq = gt.copy()
    wrist, knee = IDX["left_wrist"], IDX["right_knee"]
    seq[20:30, wrist] = 0  # interior, 10 frames: interpolated
    seq[40:55, knee] = 0  # interior, 15 frames: too long
    seq[84:, wrist] = 0  # the tail: extrapolated for max_gap_frames only
    off = smooth_offline(seq, FPS, cfg)
    assert off.imputed[20:30, wrist].all()
    err = np.linalg.norm(off.skeletons[20:30, wrist, :2] - gt[20:30, wrist, :2], axis=-1)
    assert err.max() < 4.0
    assert (off.skeletons[40:55, knee, 2][4:] == 0).all()
    assert off.imputed[84:88, wrist].all()
    assert (off.skeletons[88:, wrist, 2] == 0).all()


def test_timestamps_set_the_step_so_dropped_frames_are_bridged() -> None:
    n = 60
    gt = np.repeat(_figure(1), n, axis=0)
    gt[:, :, 0] += np.arange(n)[:, None] * 300.0 / FPS  # walking sideways at 300 px/s
    step_ns = int(1e9 / FPS)
    kept = [*range(30), *range(36, n)]  # frames 30-35 never arrive

    def error_after_gap(with_ts: bool) -> float:
        sm = CausalSmoother(SmoothingConfig(), FPS)
        for i in kept:
            out = sm.update(gt[i], ts_ns=1_000_000 + i * step_ns if with_ts else None)
            if i == 36:
                return float(np.abs(out.skeleton[:, :2] - gt[i, :, :2]).max())
        raise AssertionError("unreachable")

    assert error_after_gap(with_ts=True) < 1.5
    # Without timestamps the six lost frames look like one step: a jump.
    assert error_after_gap(with_ts=False) > 5.0


# ---- smoothing --------------------------------------------------------------------------


def test_a_constant_pose_comes_out_exactly() -> None:
    frame = _figure(1)[0]
    poses = _causal(np.repeat(frame[None], 50, axis=0))
    np.testing.assert_allclose(poses[-1].skeleton, frame, atol=1e-4)
    off = smooth_offline(np.repeat(frame[None], 50, axis=0), FPS)
    np.testing.assert_allclose(off.skeletons, np.repeat(frame[None], 50, axis=0), atol=1e-4)
    euro = OneEuroFilter(FPS, min_cutoff_hz=1.0, beta=0.01)
    for _ in range(50):
        held = euro.update(frame)
    np.testing.assert_allclose(held, frame, atol=1e-4)


def test_a_noisy_pose_at_rest_converges_to_the_truth() -> None:
    gt = np.repeat(_figure(1), 240, axis=0)
    seq = _noisy(gt, sigma_px=3.0)
    out = _stack(_causal(seq))
    assert _err_px(out[-60:], gt[-60:]) < 0.5 * _err_px(seq[-60:], gt[-60:])


def test_the_causal_smoother_reduces_jitter_without_lagging() -> None:
    gt = _figure(360, amplitude=1.0)
    seq = _noisy(gt, sigma_px=2.5)
    out = _stack(_causal(seq))
    assert _err_px(out[20:], gt[20:]) < 0.75 * _err_px(seq[20:], gt[20:])
    # The shift that best aligns output and truth: 0 frames, where a lagging
    # filter would need a positive one.
    shifts = range(-3, 4)
    cost = [_err_px(out[20 + k : len(out) - 3 + k], gt[20 : len(gt) - 3]) for k in shifts]
    assert shifts[int(np.argmin(cost))] == 0


def test_offline_beats_causal_on_a_noisy_trajectory() -> None:
    gt = _figure(360)
    seq = _noisy(gt, sigma_px=2.5)
    causal = _stack(_causal(seq))
    off = smooth_offline(seq, FPS).skeletons
    assert _err_px(off, gt) < 0.85 * _err_px(causal, gt)


def test_low_scores_move_the_estimate_less() -> None:
    gt = np.repeat(_figure(1), 30, axis=0)
    confident, doubtful = gt.copy(), gt.copy()
    confident[20, IDX["nose"], :2] += 4.0
    doubtful[20, IDX["nose"], :2] += 4.0
    doubtful[20, IDX["nose"], 2] = 0.35
    moved = [
        np.linalg.norm(_causal(s)[20].skeleton[IDX["nose"], :2] - gt[20, IDX["nose"], :2])
        for s in (confident, doubtful)
    ]
    assert moved[1] < 0.5 * moved[0]


def test_an_outlier_spike_is_rejected_and_flagged() -> None:
    gt = _figure(80)
    seq = _noisy(gt, sigma_px=1.0)
    wrist = IDX["right_wrist"]
    seq[50:52, wrist, :2] += [70.0, -50.0]
    poses = _causal(seq)
    for i in (50, 51):
        assert poses[i].rejected[wrist]
        assert poses[i].glitch
        assert any("right_wrist" in r for r in poses[i].reasons)
        assert np.linalg.norm(poses[i].skeleton[wrist, :2] - gt[i, wrist, :2]) < 5.0
    off = smooth_offline(seq, FPS)
    assert off.glitch[50] and off.glitch[51]
    assert np.linalg.norm(off.skeletons[50, wrist, :2] - gt[50, wrist, :2]) < 5.0


def test_a_track_that_really_jumped_is_restarted_not_rejected_forever() -> None:
    cfg = SmoothingConfig(max_reject_frames=3, max_gap_frames=8)
    seq = np.repeat(_figure(1), 60, axis=0)
    seq[30:, :, :2] += [40.0, 0.0]  # the whole figure steps sideways in one frame
    poses = _causal(seq, cfg)
    np.testing.assert_allclose(poses[-1].skeleton[:, :2], seq[-1, :, :2], atol=0.5)


def test_reset_forgets_the_previous_take() -> None:
    sm = CausalSmoother(SmoothingConfig(), FPS)
    first = _figure(10)
    for f in first:
        sm.update(f)
    sm.reset()
    elsewhere = first[0].copy()
    elsewhere[:, :2] += 300.0
    out = sm.update(elsewhere)
    np.testing.assert_allclose(out.skeleton, elsewhere, atol=1e-4)
    assert not out.glitch


# ---- glitch flags -----------------------------------------------------------------------


def test_glitch_fires_on_a_bone_length_jump() -> None:
    gt = _figure(60)
    seq = _noisy(gt, sigma_px=1.0)
    # The detector stretches the left forearm for three frames.
    elbow, wrist = IDX["left_elbow"], IDX["left_wrist"]
    seq[40:43, wrist, :2] += (seq[40:43, wrist, :2] - seq[40:43, elbow, :2]) * 0.8
    poses = _causal(seq)
    assert all(p.glitch for p in poses[40:43])
    assert any("bone left_elbow-left_wrist" in r for r in poses[40].reasons)
    assert not any(p.glitch for p in poses[:40])


def test_glitch_fires_on_implausible_speed() -> None:
    seq = np.repeat(_figure(1), 40, axis=0)
    seq[30:, :, :2] += [0.0, 60.0]  # 60 px in 1/120 s: 72 torso lengths per second
    poses = _causal(seq)
    assert poses[30].glitch
    assert any("torso/s" in r for r in poses[30].reasons)


def test_no_glitch_on_smooth_motion() -> None:
    gt = _figure(480, amplitude=1.0)
    for seq in (gt, _noisy(gt, sigma_px=2.0)):
        poses = _causal(seq)
        assert not any(p.glitch for p in poses), [p.reasons for p in poses if p.glitch][:3]
        assert not smooth_offline(seq, FPS).glitch.any()


# ---- the One Euro baseline --------------------------------------------------------------


def test_one_euro_holds_a_missing_joint_then_drops_it() -> None:
    frame = _figure(1)[0]
    euro = OneEuroFilter(FPS, hold_frames=2)
    euro.update(frame)
    gone = frame.copy()
    gone[IDX["nose"]] = 0
    held = [euro.update(gone)[IDX["nose"]] for _ in range(3)]
    np.testing.assert_allclose(held[0], frame[IDX["nose"]])
    np.testing.assert_allclose(held[1], frame[IDX["nose"]])
    assert held[2][2] == 0


def test_one_euro_smooths_jitter_on_a_noisy_pose_at_rest() -> None:
    gt = np.repeat(_figure(1), 240, axis=0)
    seq = _noisy(gt, sigma_px=3.0)
    euro = OneEuroFilter(FPS, min_cutoff_hz=1.0, beta=0.0)
    out = np.stack([euro.update(f) for f in seq])
    assert _err_px(out[-60:], gt[-60:]) < 0.5 * _err_px(seq[-60:], gt[-60:])


def _swing(seq: np.ndarray, frames: range, joint: str, about: str, degrees: float) -> None:
    """Turn ``joint`` about ``about`` in those frames: the bone between them keeps its length."""
    a = np.deg2rad(degrees)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    j, c = IDX[joint], IDX[about]
    for i in frames:
        seq[i, j, :2] = seq[i, c, :2] + rot @ (seq[i, j, :2] - seq[i, c, :2])


def test_a_joint_back_from_a_dropout_across_its_bone_is_refused() -> None:
    """A bone vouches only for its length: a wrist that reappears swung a quarter turn
    about its elbow keeps the forearm's length, and is still refused as far off."""
    gt = _figure(80)
    seq = _noisy(gt, sigma_px=1.0)
    wrist = IDX["left_wrist"]
    seq[48:50, wrist] = 0  # two frames without it
    _swing(seq, range(50, 51), "left_wrist", "left_elbow", 90)
    poses = _causal(seq)
    assert poses[50].rejected[wrist]
    assert np.linalg.norm(poses[50].skeleton[wrist, :2] - gt[50, wrist, :2]) < 5.0


def test_a_real_fast_move_is_followed_at_once_not_held_back() -> None:
    """The forearm swings 30 degrees in one frame and stays: the neighbours vouch for it,
    so the track trusts the measurement (its uncertainty inflated) instead of lagging."""
    gt = _figure(80)
    seq = _noisy(gt, sigma_px=1.0)
    truth = gt.copy()
    _swing(truth, range(50, 80), "left_wrist", "left_elbow", 30)
    seq[50:, IDX["left_wrist"], :2] += (
        truth[50:, IDX["left_wrist"], :2] - gt[50:, IDX["left_wrist"], :2]
    )
    poses = _causal(seq)
    wrist = IDX["left_wrist"]
    assert not poses[50].rejected[wrist]
    assert np.linalg.norm(poses[50].skeleton[wrist, :2] - truth[50, wrist, :2]) < 2.5


def test_an_imputed_joint_is_reported_less_sure_than_a_measured_one() -> None:
    """Whoever draws or trains on the pose can tell a prediction from a detection."""
    gt = _figure(60)
    seq = gt.copy()
    wrist = IDX["left_wrist"]
    seq[30:34, wrist] = 0
    poses = _causal(seq, SmoothingConfig(max_gap_frames=8))
    measured = poses[29].skeleton[wrist, 2]
    assert all(poses[i].imputed[wrist] for i in range(30, 34))
    assert all(0 < poses[i].skeleton[wrist, 2] < 0.75 * measured for i in range(30, 34))
