"""The EdgeTPU backend's real code path, on a tiny MoveNet-shaped model built here.

No Coral exists on this machine, so loading ``libedgetpu.so.1`` really fails; the
tests check that failure's handling (fallback, refusal) and run the model without the
delegate (``delegate_optional``), which is the same interpreter code minus the delegate.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_agent import skeleton as sk
from edge_agent.config import CpuPose, EdgeTpuPose, ZoneConfig
from edge_agent.errors import BadInput, DeviceError
from edge_agent.pose import litert
from edge_agent.pose.base import create_pose_backend

MODELS = Path(__file__).resolve().parents[2] / "models"
INPUT_PX = 64
# Every keypoint k sits at normalised (y, x) = (0.25 + k/40, 0.5 + k/80) of the input.
TARGET_Y = 0.25 + np.arange(17) / 40
TARGET_X = 0.5 + np.arange(17) / 80


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p))


@pytest.fixture(scope="session")
def movenet_model(tmp_path_factory) -> Path:
    """A MoveNet-shaped .tflite: uint8 [1,64,64,3] in, float32 [1,1,17,3] (y, x, score) out.

    Positions are fixed (bias only); every score is sigmoid(10 * mean red - 5), so a
    red frame holds a person and a black frame does not, which proves the pixels
    reach the model through the letterbox.
    """
    tf = pytest.importorskip("tensorflow")
    inp = tf.keras.Input(shape=(INPUT_PX, INPUT_PX, 3), batch_size=1, dtype="uint8")
    x = tf.keras.layers.Rescaling(1 / 255.0)(tf.keras.ops.cast(inp, "float32"))
    identity = tf.keras.layers.Conv2D(3, 1, use_bias=False)
    x = identity(x)
    box = tf.keras.layers.Conv2D(3, 3, strides=2, padding="same", use_bias=False)
    x = box(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    head = tf.keras.layers.Dense(51, activation="sigmoid")
    out = tf.keras.layers.Reshape((1, 17, 3))(head(x))
    model = tf.keras.Model(inp, out)
    identity.set_weights([np.eye(3, dtype=np.float32).reshape(1, 1, 3, 3)])
    box_k = np.zeros((3, 3, 3, 3), np.float32)
    for c in range(3):
        box_k[:, :, c, c] = 1 / 9
    box.set_weights([box_k])
    kernel = np.zeros((3, 51), np.float32)
    bias = np.zeros(51, np.float32)
    bias[0::3] = _logit(TARGET_Y)
    bias[1::3] = _logit(TARGET_X)
    kernel[0, 2::3] = 10.0  # score follows the mean of the red channel
    bias[2::3] = -5.0
    head.set_weights([kernel, bias])
    path = tmp_path_factory.mktemp("movenet") / "tiny_movenet.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return path


def _cfg(model: Path, **kw) -> EdgeTpuPose:
    kw.setdefault("cpu", CpuPose(models_dir=MODELS, segmentation=False, mode="full"))
    return EdgeTpuPose(model=model, **kw)


def _red(w: int, h: int) -> np.ndarray:
    frame = np.zeros((h, w, 3), np.uint8)
    frame[..., 0] = 255
    return frame


def test_edgetpu_delegate_really_fails_here_and_the_log_names_the_cause(movenet_model, caplog):
    with caplog.at_level(logging.ERROR, logger="edge_agent.pose.edgetpu"):
        backend = create_pose_backend(_cfg(movenet_model), delegate_optional=True)
    assert backend.name == "edgetpu"
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("libedgetpu.so.1" in m and "usb:0" in m for m in messages), messages
    # The loader's own words, not a generic "failed".
    assert any("cannot open shared object file" in m or "Failed to load" in m for m in messages)


def test_edgetpu_maps_letterboxed_movenet_output_to_frame_pixels(movenet_model):
    backend = create_pose_backend(_cfg(movenet_model), delegate_optional=True)
    w, h = 128, 96  # scale 0.5 into 64x64, 8 px of padding above and below
    result = backend.estimate(_red(w, h))
    assert result.detected
    assert result.frame_size == (w, h)
    skel = result.skeleton
    np.testing.assert_allclose(skel[:17, 0], TARGET_X * INPUT_PX / 0.5, atol=0.05)
    np.testing.assert_allclose(skel[:17, 1], (TARGET_Y * INPUT_PX - 8) / 0.5, atol=0.05)
    assert (skel[17:] == 0).all()  # MoveNet has no foot points
    # A quarter of the input is black letterbox, so the mean red is 0.75.
    expected_score = 1 / (1 + math.exp(-(10 * 0.75 - 5)))
    np.testing.assert_allclose(skel[:17, 2], expected_score, atol=0.02)


def test_edgetpu_reports_no_person_when_the_model_scores_low(movenet_model):
    backend = create_pose_backend(_cfg(movenet_model), delegate_optional=True)
    result = backend.estimate(np.zeros((96, 128, 3), np.uint8))
    assert not result.detected
    assert result.score < 0.1
    assert (result.skeleton == sk.empty()).all()


def test_edgetpu_pool_serves_concurrent_callers_one_interpreter_per_device(movenet_model):
    backend = create_pose_backend(
        _cfg(movenet_model, devices=["usb:0", "usb:1", "pci:0"]), delegate_optional=True
    )
    assert backend.devices == ["usb:0", "usb:1", "pci:0"]
    assert backend.parallelism == 3  # catch-up keeps one frame in flight per device
    frame = _red(96, 96)
    results: list[np.ndarray] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(10):
            r = backend.estimate(frame)
            with lock:
                results.append(r.skeleton)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 60
    for skel in results:
        np.testing.assert_array_equal(skel, results[0])


def test_edgetpu_falls_back_to_cpu_when_no_delegate_loads(movenet_model, caplog):
    with caplog.at_level(logging.WARNING, logger="edge_agent.pose.edgetpu"):
        backend = create_pose_backend(_cfg(movenet_model, fallback_to_cpu=True))
    assert backend.name == "cpu"
    assert any("falling back to the cpu backend" in r.getMessage() for r in caplog.records)


def test_edgetpu_refuses_to_start_with_the_real_cause_when_fallback_is_off(movenet_model):
    with pytest.raises(DeviceError) as err:
        create_pose_backend(_cfg(movenet_model, fallback_to_cpu=False))
    text = str(err.value)
    assert "libedgetpu.so.1" in text and "usb:0" in text
    assert "\n" not in text


def test_edgetpu_a_library_that_is_not_a_delegate_is_refused_with_its_name(movenet_model):
    with pytest.raises(DeviceError, match="not a TFLite external delegate"):
        create_pose_backend(_cfg(movenet_model, library="libc.so.6", fallback_to_cpu=False))


def test_edgetpu_rejects_a_model_that_is_not_movenet_shaped():
    # The BlazePose detector takes float32 input: a clear BadInput, not a crash later.
    with pytest.raises(BadInput, match="not a MoveNet-style model"):
        create_pose_backend(
            _cfg(MODELS / "pose_detection.tflite", fallback_to_cpu=False), delegate_optional=True
        )


@pytest.fixture
def coral_present(monkeypatch) -> list[str]:
    """A board whose Coral loads: only the missing device is faked. Lists the devices loaded."""
    loaded: list[str] = []

    def load_delegate(library: str, options: dict[str, str]) -> object:
        loaded.append(options["device"])
        return object()

    monkeypatch.setattr(litert, "load_delegate", load_delegate)
    return loaded


def _unusable_model(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / "movenet_thunder_edgetpu.tflite"
    if kind == "directory":
        path.mkdir()
    elif kind == "lfs-pointer":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    elif kind == "empty":
        path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("missing", "not found"),
        ("directory", "is a directory"),
        ("lfs-pointer", "not a TFLite model"),
        ("empty", "not a TFLite model"),
    ],
)
def test_edgetpu_unusable_model_with_a_coral_falls_back_to_cpu_naming_the_file(
    kind, why, tmp_path, coral_present, caplog
):
    model = _unusable_model(kind, tmp_path)
    with caplog.at_level(logging.WARNING, logger="edge_agent.pose.edgetpu"):
        backend = create_pose_backend(_cfg(model, fallback_to_cpu=True))
    assert backend.name == "cpu"
    assert coral_present == [], "the model is checked before any delegate loads"
    (message,) = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert str(model) in message and why in message and "pose.model" in message
    assert str(model) in backend.fallback_reason and "running the cpu backend" in (
        backend.fallback_reason
    )
    assert backend.estimate(np.zeros((96, 128, 3), np.uint8)).frame_size == (128, 96)


def test_edgetpu_missing_model_without_fallback_is_refused_naming_the_file(tmp_path, coral_present):
    model = tmp_path / "movenet_thunder_edgetpu.tflite"
    with pytest.raises(BadInput) as err:
        create_pose_backend(_cfg(model, fallback_to_cpu=False))
    text = str(err.value)
    assert f"EdgeTPU model file {model} not found" in text and "\n" not in text
    assert coral_present == []


def test_edgetpu_gates_with_the_zone_it_is_given(movenet_model):
    # A flat red frame scores as a person for this model, but has no face: gating says nobody.
    plain = create_pose_backend(_cfg(movenet_model), delegate_optional=True)
    gated = create_pose_backend(_cfg(movenet_model), zone=ZoneConfig(), delegate_optional=True)
    assert plain.estimate(_red(128, 96)).detected
    result = gated.estimate(_red(128, 96))
    assert not result.detected and (result.skeleton == 0).all()


@pytest.fixture
def coral_refuses_the_model(monkeypatch, coral_present) -> list[str]:
    """The Coral's delegate loads, but the interpreter cannot run the model on it (as with
    a model compiled for a newer EdgeTPU runtime) on the devices listed in the result."""
    refusing: list[str] = []
    real = litert.load_interpreter

    def load_interpreter(path, *, threads, delegates=None):
        if delegates is not None and coral_present[-1] in refusing:
            raise BadInput(f"model file {path} cannot be loaded: Failed to prepare for TPU")
        return real(path, threads=threads)  # the device's work, done without it here

    monkeypatch.setattr(litert, "load_interpreter", load_interpreter)
    return refusing


def test_edgetpu_a_model_the_coral_cannot_run_falls_back_to_cpu_with_the_cause(
    movenet_model, coral_refuses_the_model, caplog
):
    coral_refuses_the_model.append("usb:0")
    with caplog.at_level(logging.WARNING, logger="edge_agent.pose.edgetpu"):
        backend = create_pose_backend(_cfg(movenet_model, fallback_to_cpu=True))
    assert backend.name == "cpu"
    assert "the delegate loaded but cannot run the model" in backend.fallback_reason
    assert "Failed to prepare for TPU" in backend.fallback_reason
    with pytest.raises(DeviceError, match="usb:0: the delegate loaded but cannot run"):
        create_pose_backend(_cfg(movenet_model, fallback_to_cpu=False))


def test_edgetpu_one_device_that_cannot_run_the_model_leaves_the_others_in_the_pool(
    movenet_model, coral_refuses_the_model
):
    coral_refuses_the_model.append("usb:0")
    backend = create_pose_backend(
        _cfg(movenet_model, devices=["usb:0", "usb:1"], fallback_to_cpu=False)
    )
    assert backend.name == "edgetpu" and backend.devices == ["usb:1"]
    assert backend.estimate(_red(64, 48)).frame_size == (64, 48)


# ---- a delegate that crashes or hangs instead of raising ----------------------------------

BAD_DELEGATE_C = r"""
#include <signal.h>
#include <unistd.h>
void *tflite_plugin_create_delegate(void) { return 0; }
void tflite_plugin_destroy_delegate(void *delegate) { (void)delegate; }
__attribute__((constructor)) static void on_load(void) {
#ifdef HANG
  for (;;) pause();
#else
  raise(SIGSEGV);
#endif
}
"""


@pytest.fixture(scope="module")
def bad_delegates(tmp_path_factory) -> dict[str, Path]:
    """Shared libraries that look like TFLite delegates and crash (SIGSEGV) or hang when
    loaded, as libedgetpu built for another TFLite version does."""
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build a crashing delegate library")
    where = tmp_path_factory.mktemp("delegates")
    src = where / "bad_delegate.c"
    src.write_text(BAD_DELEGATE_C)
    libs = {}
    for kind, flags in (("crash", []), ("hang", ["-DHANG"])):
        libs[kind] = where / f"libbad_{kind}.so"
        subprocess.run([cc, "-shared", "-fPIC", *flags, "-o", libs[kind], src], check=True)
    return libs


def test_a_delegate_that_crashes_on_load_falls_back_to_cpu_instead_of_killing_the_agent(
    movenet_model, bad_delegates, caplog
):
    cfg = _cfg(movenet_model, library=str(bad_delegates["crash"]), fallback_to_cpu=True)
    with caplog.at_level(logging.ERROR, logger="edge_agent.pose.edgetpu"):
        backend = create_pose_backend(cfg)  # in this process, the load would be a SIGSEGV
    assert backend.name == "cpu"
    assert "SIGSEGV" in backend.fallback_reason and "usb:0" in backend.fallback_reason
    assert any("SIGSEGV" in r.getMessage() for r in caplog.records)


def test_a_delegate_that_hangs_on_load_is_given_up_after_the_probe_timeout(
    movenet_model, bad_delegates
):
    cfg = _cfg(
        movenet_model,
        library=str(bad_delegates["hang"]),
        probe_timeout_s=1,
        fallback_to_cpu=False,
    )
    with pytest.raises(DeviceError, match=r"usb:0: .*did not finish in 1 s"):
        create_pose_backend(cfg)
