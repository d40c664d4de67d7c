"""Selfie segmentation: the whole-frame API, and why the backend segments the person's crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.config import CpuPose
from edge_agent.pose.base import create_pose_backend
from edge_agent.pose.segmentation import SelfieSegmenter
from edge_agent.synth import Attendee, Dance, render

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture(scope="module")
def segmenter() -> SelfieSegmenter:
    return SelfieSegmenter(MODELS, threads=2)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_whole_frame_mask_has_the_frame_size_and_values_in_0_1(segmenter):
    mask = segmenter.mask(np.full((120, 160, 3), 128, np.uint8))
    assert mask.shape == (120, 160) and mask.dtype == np.float32
    assert mask.min() >= 0.0 and mask.max() <= 1.0


def test_the_backend_mask_from_the_person_crop_beats_the_whole_frame_mask(segmenter):
    backend = create_pose_backend(CpuPose(models_dir=MODELS, mode="full", segmentation=True))
    dance = Dance.from_name("wave")
    ious_crop, ious_frame = [], []
    for seed in (1, 2, 3):
        frame = render(Attendee.from_seed(seed), dance.pose(1.0), size=(640, 480))
        result = backend.estimate(frame.rgb)
        assert result.detected and result.mask is not None
        assert result.mask.shape == frame.mask.shape
        ious_crop.append(_iou(result.mask > 0.5, frame.mask))
        ious_frame.append(_iou(segmenter.mask(frame.rgb) > 0.5, frame.mask))
    # Measured: the dancer fills the crop as a selfie fills the model's input.
    assert min(ious_crop) > 0.75, ious_crop
    assert np.mean(ious_crop) > np.mean(ious_frame) + 0.05, (ious_crop, ious_frame)
