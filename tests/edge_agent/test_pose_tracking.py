"""CPU BlazePose on the synthetic booth: tracking agrees with full detection, and recovers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent import skeleton as sk
from edge_agent.config import CpuPose
from edge_agent.pose.base import create_pose_backend
from edge_agent.synth import Attendee, BodyPose, Dance, render

MODELS = Path(__file__).resolve().parents[2] / "models"
SIZE = (320, 240)  # the models see 224/256 px anyway; smaller renders keep this fast
FPS = 30.0


def _backend(mode: str):
    return create_pose_backend(CpuPose(models_dir=MODELS, mode=mode, segmentation=False))


@pytest.fixture(scope="module")
def attendee() -> Attendee:
    return Attendee.from_seed(3)


@pytest.fixture(scope="module")
def dance_frames(attendee):
    poses = Dance.from_name("wave").poses(FPS, 0.3)  # 9 frames of a waving arm
    return [render(attendee, p, size=SIZE, frame_index=i) for i, p in enumerate(poses)]


def _empty_booth(attendee, frame_index: int):
    # The same attendee, far off to the side: nobody in view, not even a shadow.
    away = BodyPose.neutral().moved(x=-9.0)
    frame = render(attendee, away, size=SIZE, frame_index=frame_index, shadow="none")
    assert not frame.in_frame.any()
    return frame


def test_tracking_follows_the_roi_and_agrees_with_full_detection(dance_frames):
    full, tracking = _backend("full"), _backend("tracking")
    gaps = []
    for i, frame in enumerate(dance_frames):
        a, b = full.estimate(frame.rgb), tracking.estimate(frame.rgb)
        assert a.detected and b.detected, i
        assert b.tracked == (i > 0), i  # the detector ran only on the first frame
        both = (a.skeleton[:, 2] > 0.5) & (b.skeleton[:, 2] > 0.5) & frame.visible
        assert both.sum() >= 10, i
        gaps.append(np.hypot(*(a.skeleton[both, :2] - b.skeleton[both, :2]).T))
    gaps = np.concatenate(gaps)
    torso = np.nanmedian([sk.torso_size(f.keypoints) for f in dance_frames])
    # Two different crops of the same frame: a few pixels apart, never a different person.
    assert np.median(gaps) < 0.05 * torso, (np.median(gaps), torso)
    assert gaps.max() < 0.5 * torso, (gaps.max(), torso)


def test_tracking_recovers_after_the_figure_leaves_the_frame(attendee, dance_frames):
    tracking = _backend("tracking")
    before, after = dance_frames[:3], dance_frames[3:6]
    empty = [_empty_booth(attendee, 100 + i) for i in range(3)]

    results = [tracking.estimate(f.rgb) for f in before]
    assert all(r.detected for r in results)
    assert results[-1].tracked

    for f in empty:
        r = tracking.estimate(f.rgb)
        assert not r.detected and not r.tracked
        assert (r.skeleton == 0).all()

    back = [tracking.estimate(f.rgb) for f in after]
    # Found again on the very first frame back (the detector runs on it), then tracked.
    assert [r.detected for r in back] == [True, True, True]
    assert [r.tracked for r in back] == [False, True, True]
    for r, f in zip(back, after, strict=True):
        ok = (r.skeleton[:, 2] > 0.5) & f.visible
        err = np.hypot(*(r.skeleton[ok, :2] - f.keypoints[ok, :2]).T)
        assert np.median(err) < 0.1 * sk.torso_size(f.keypoints)


def test_reset_forgets_the_tracked_person(dance_frames):
    tracking = _backend("tracking")
    assert tracking.estimate(dance_frames[0].rgb).detected
    assert tracking.estimate(dance_frames[1].rgb).tracked
    tracking.reset()
    assert not tracking.estimate(dance_frames[2].rgb).tracked
