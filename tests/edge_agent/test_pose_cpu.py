"""The CPU BlazePose backend: agreement with MediaPipe itself, input errors, laziness."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_agent import skeleton as sk
from edge_agent.config import CpuPose
from edge_agent.errors import BadInput
from edge_agent.pose import blazepose as bp
from edge_agent.pose.base import create_pose_backend, decode_jpeg

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
# Written once by tools/mediapipe_reference.py in a scratch venv (mediapipe 0.10.21,
# static-image mode, model_complexity=1); mediapipe is not a dependency.
REFERENCE = ROOT / "tests" / "data" / "astronaut_mediapipe.json"


@pytest.fixture(scope="module")
def full_backend():
    backend = create_pose_backend(CpuPose(models_dir=MODELS, mode="full", segmentation=True))
    yield backend
    backend.close()


def _astronaut(name: str) -> np.ndarray:
    from skimage import data

    img = data.astronaut()
    return np.ascontiguousarray(img if name == "astronaut" else img[:384])


@pytest.mark.parametrize("name", ["astronaut", "astronaut_top_384"])
def test_cpu_landmarks_agree_with_mediapipe_on_the_astronaut(full_backend, name):
    ref = json.loads(REFERENCE.read_text())["images"][name]
    expected = np.array(ref["landmarks"], np.float32)  # (33, 4): x, y, z, visibility
    rgb = _astronaut(name)
    assert list(rgb.shape[1::-1]) == ref["image_size"]

    dets = full_backend.detect(rgb)
    assert dets, "the detector found nobody"
    landmarks, flag = full_backend.landmarks(rgb, bp.roi_from_detection(dets[0]))
    assert flag >= bp.POSE_FLAG_THRESHOLD
    err = np.hypot(*(landmarks[:33, :2] - expected[:, :2]).T)
    assert np.median(err) < 1.0, f"median {np.median(err):.2f} px"
    clearly_visible = expected[:, 3] > 0.9
    assert err[clearly_visible].max() < 1.5, err[clearly_visible]
    np.testing.assert_allclose(landmarks[:33, 3], expected[:, 3], atol=0.02)

    # The public path gives the same joints in the canonical skeleton.
    full_backend.reset()
    result = full_backend.estimate(rgb)
    assert result.detected and not result.tracked
    nose = sk.INDEX["nose"]
    np.testing.assert_allclose(result.skeleton[nose, :2], expected[0, :2], atol=1.0)
    mask = result.mask
    assert mask is not None and mask.shape == rgb.shape[:2]
    # The person's region is segmented: the face is on the mask, the far corner is not.
    assert mask[int(expected[0, 1]), int(expected[0, 0])] > 0.5
    assert mask[5, rgb.shape[1] - 5] < 0.5
    assert result.frame_size == (rgb.shape[1], rgb.shape[0])


def test_cpu_finds_nobody_in_an_empty_frame(full_backend):
    result = full_backend.estimate(np.full((96, 128, 3), 128, np.uint8))
    assert not result.detected
    assert (result.skeleton == 0).all()
    assert result.mask is None  # the mask is the person's: no person, no mask


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((64, 64), np.uint8), "shape"),
        (np.zeros((64, 64, 4), np.uint8), "shape"),
        (np.zeros((64, 64, 3), np.float32), "uint8"),
        (np.zeros((8, 64, 3), np.uint8), "outside"),
        (b"\xff\xd8 not an array", "array"),
    ],
)
def test_cpu_wrong_input_is_a_clear_bad_input(full_backend, frame, message):
    with pytest.raises(BadInput, match=message):
        full_backend.estimate(frame)


def test_corrupt_and_truncated_jpegs_are_bad_input():
    import cv2

    ok, enc = cv2.imencode(".jpg", np.full((64, 80, 3), 90, np.uint8))
    assert ok
    jpeg = enc.tobytes()
    assert decode_jpeg(jpeg).shape == (64, 80, 3)
    with pytest.raises(BadInput, match="corrupt JPEG"):
        decode_jpeg(b"")
    with pytest.raises(BadInput, match="corrupt JPEG"):
        decode_jpeg(b"GIF89a" + jpeg)
    with pytest.raises(BadInput, match="corrupt JPEG"):
        decode_jpeg(jpeg[: len(jpeg) // 2])


def test_missing_model_is_a_clear_bad_input(tmp_path):
    with pytest.raises(BadInput, match="not found.*make models"):
        create_pose_backend(CpuPose(models_dir=tmp_path))


def test_importing_the_pose_package_loads_no_model_or_runtime():
    code = (
        "import sys\n"
        "import edge_agent.pose.base, edge_agent.pose.cpu, edge_agent.pose.edgetpu\n"
        "import edge_agent.pose.gating, edge_agent.pose.segmentation, edge_agent.pose.blazepose\n"
        "bad = [m for m in ('ai_edge_litert.interpreter', 'tflite_runtime', 'tensorflow')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_model_file_that_is_not_blazepose_is_a_clear_bad_input(tmp_path):
    import shutil

    for name in ("pose_detection.tflite", "pose_landmark_full.tflite"):
        shutil.copy(MODELS / "selfie_segmentation.tflite", tmp_path / name)
    with pytest.raises(BadInput, match="not the BlazePose model"):
        create_pose_backend(CpuPose(models_dir=tmp_path))


def test_a_mirrored_view_of_a_frame_is_accepted(full_backend):
    rgb = _astronaut("astronaut")
    mirrored = rgb[:, ::-1]  # a non-contiguous numpy view
    result = full_backend.estimate(mirrored)
    assert result.detected
    # The same pixels give the same pose, view or copy.
    direct = full_backend.estimate(np.ascontiguousarray(mirrored))
    np.testing.assert_allclose(result.skeleton, direct.skeleton)


def test_a_closed_backend_lets_its_interpreters_go():
    """An agent keeps its last take, and with it the take's backend: a closed one must not
    hold two model interpreters (and their arenas) for as long."""
    import gc
    import weakref

    backend = create_pose_backend(CpuPose(models_dir=MODELS, mode="full", segmentation=False))
    interpreters = [weakref.ref(backend._det), weakref.ref(backend._lm)]
    backend.close()
    gc.collect()
    assert [ref() for ref in interpreters] == [None, None]
