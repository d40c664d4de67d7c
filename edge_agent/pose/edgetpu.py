"""MoveNet-style single-pose models on Coral EdgeTPUs, several devices shared as a pool.

Each device listed in ``EdgeTpuPose.devices`` gets its own interpreter with
``load_delegate(library, {"device": dev})``; ``estimate`` checks one out, so as many
frames run at once as there are devices (callers on more threads wait their turn).

The model contract: input ``[1, H, W, 3]`` uint8 (the frame letterboxed to H x W),
output ``[1, 1, 17, 3]`` float32 ``(y, x, score)`` normalised to the input.

The model file is checked first, before any delegate loads: the EdgeTPU-compiled
model does not ship with the image (``tools/fetch_models.py`` fetches only the
MediaPipe models), so a board can have a working Coral and no model for it. A
missing, unreadable or non-TFLite file is treated like a missing device.

Each delegate is first loaded, and one frame run, in a child process
(``probe_timeout_s``): a libedgetpu built against another TFLite version crashes
with SIGSEGV instead of raising, and in the agent's own process that would end it
before any fallback. A probe that crashes or hangs counts as a delegate that
cannot load.

When a delegate cannot load, the real cause (the loader's OSError, the delegate's
ValueError, the probe's signal) is logged and the device is left out. With no device left (or no usable
model file), the backend falls back to ``cpu`` if ``fallback_to_cpu`` is set, else
refuses to start with a DeviceError (ModelFileError for the file) carrying that cause.

``delegate_optional=True`` (an argument, not a config key: it exists for tests on
machines without a Coral) runs the same model on the CPU interpreter after the
delegate failed to load. Only a model *not* compiled for the EdgeTPU runs that way.
"""

from __future__ import annotations

import logging
import queue
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_agent import skeleton as sk
from edge_agent.config import EdgeTpuPose, ZoneConfig
from edge_agent.errors import BadInput, BoothError, DeviceError
from edge_agent.pose import gating, litert
from edge_agent.pose.base import PoseBackend, PoseResult, check_frame, register

log = logging.getLogger(__name__)

# MoveNet has no person flag; its demos call a pose present when keypoints average
# above roughly this score.
MIN_POSE_SCORE = 0.25
BOX_MIN_SCORE = 0.3  # MoveNet scores run lower than BlazePose's
# A TFLite flatbuffer carries this file identifier in bytes 4..8 (schema.fbs:
# ``file_identifier "TFL3"``); an HTML error page or a Git LFS pointer does not.
TFLITE_IDENTIFIER = b"TFL3"


class ModelFileError(BadInput):
    """The EdgeTPU model file is missing, unreadable or not a TFLite model."""


def check_model_file(path: Path) -> None:
    """Raise ModelFileError naming ``path`` and what to do, unless it looks like a TFLite model."""
    todo = (
        "put the EdgeTPU-compiled MoveNet model (edgetpu_compiler output) there "
        "or point pose.model at it"
    )
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise ModelFileError(f"EdgeTPU model file {path} not found; {todo}") from None
    except IsADirectoryError:
        raise ModelFileError(f"EdgeTPU model file {path} is a directory; {todo}") from None
    except OSError as e:
        raise ModelFileError(
            f"EdgeTPU model file {path} cannot be read ({e.strerror}); {todo}"
        ) from None
    if head[4:8] != TFLITE_IDENTIFIER:
        raise ModelFileError(
            f"EdgeTPU model file {path} is not a TFLite model (no "
            f"{TFLITE_IDENTIFIER.decode()} identifier: a partial copy or a Git LFS pointer?); "
            f"{todo}"
        )


@dataclass
class _Device:
    name: str
    interpreter: Any
    delegated: bool
    input_index: int
    output_index: int
    height: int
    width: int


class EdgeTpuPoseBackend:
    name = "edgetpu"

    def __init__(
        self,
        cfg: EdgeTpuPose,
        *,
        zone: ZoneConfig | None = None,
        delegate_optional: bool = False,
    ) -> None:
        self.cfg = cfg
        self.zone = zone
        # Before the delegates: with no model, a loaded delegate is no use, and the
        # message must be about the file.
        check_model_file(cfg.model)
        self._pool: queue.Queue[_Device] = queue.Queue(maxsize=len(cfg.devices))
        self.devices: list[str] = []
        causes = []
        for dev in cfg.devices:
            delegates = None
            try:
                probe_delegate(cfg, dev)
                delegates = [litert.load_delegate(cfg.library, {"device": dev})]
            except (OSError, ValueError) as e:
                cause = f"EdgeTPU {dev}: cannot load delegate {cfg.library}: {_one_line(e)}"
                log.error(cause)
                causes.append(cause)
                if not delegate_optional:
                    continue
                log.warning("EdgeTPU %s: running %s without the delegate", dev, cfg.model)
            try:
                device = self._open(dev, delegates)
            except DeviceError as e:  # this device cannot run the model; others may
                log.error(str(e))
                causes.append(str(e))
                continue
            self._pool.put(device)
            self.devices.append(dev)
        if not self.devices:
            raise DeviceError("; ".join(causes))
        log.info("edgetpu pose ready on %s (%s)", ", ".join(self.devices), cfg.model)

    def _open(self, dev: str, delegates: list[Any] | None) -> _Device:
        # One thread per interpreter: the work is on the accelerator, and the pool
        # already runs one interpreter per device in parallel.
        try:
            interp = litert.load_interpreter(self.cfg.model, threads=1, delegates=delegates)
        except BadInput as e:
            if delegates is None:
                raise  # the model itself: no device would do better
            # The delegate loaded, the interpreter did not: e.g. a model compiled for a
            # newer EdgeTPU runtime than this board's libedgetpu.
            raise DeviceError(
                f"EdgeTPU {dev}: the delegate loaded but cannot run the model: {e}"
            ) from None
        inp, outs = interp.get_input_details(), interp.get_output_details()
        shape_in = tuple(inp[0]["shape"]) if len(inp) == 1 else ()
        shape_out = tuple(outs[0]["shape"]) if len(outs) == 1 else ()
        if (
            len(shape_in) != 4
            or shape_in[0] != 1
            or shape_in[3] != 3
            or inp[0]["dtype"] != np.uint8
            or shape_out != (1, 1, 17, 3)
        ):
            got = [(tuple(d["shape"]), np.dtype(d["dtype"]).name) for d in inp + outs]
            raise BadInput(
                f"{self.cfg.model}: not a MoveNet-style model (want uint8 [1,H,W,3] in, "
                f"[1,1,17,3] out), got {got}"
            )
        return _Device(
            name=dev,
            interpreter=interp,
            delegated=delegates is not None,
            input_index=int(inp[0]["index"]),
            output_index=int(outs[0]["index"]),
            height=int(shape_in[1]),
            width=int(shape_in[2]),
        )

    @property
    def parallelism(self) -> int:
        """Frames this backend can pose at once: one per device (each frame stands alone)."""
        return len(self.devices)

    def estimate(self, rgb: np.ndarray) -> PoseResult:
        rgb = check_frame(rgb)
        h, w = rgb.shape[:2]
        dev = self._pool.get()
        try:
            # Letterbox: scale the frame to fit, centre it, zero the rest.
            scale = min(dev.width / w, dev.height / h)
            pad_x = (dev.width - w * scale) / 2
            pad_y = (dev.height - h * scale) / 2
            m = np.array([[scale, 0.0, pad_x], [0.0, scale, pad_y]])
            view = dev.interpreter.tensor(dev.input_index)()
            cv2.warpAffine(
                rgb,
                m,
                (dev.width, dev.height),
                dst=view[0],
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT,
            )
            del view  # a live view into the interpreter blocks invoke()
            dev.interpreter.invoke()
            yxs = dev.interpreter.get_tensor(dev.output_index).reshape(17, 3)
        finally:
            self._pool.put(dev)
        skel = sk.from_movenet(yxs, dev.width, dev.height)
        skel[:17, 0] = (skel[:17, 0] - pad_x) / scale
        skel[:17, 1] = (skel[:17, 1] - pad_y) / scale
        score = float(yxs[:, 2].mean())
        if score < MIN_POSE_SCORE:
            return PoseResult(score=score, frame_size=(w, h))
        result = PoseResult(
            skeleton=skel,
            detected=True,
            box=sk.bbox(skel, BOX_MIN_SCORE),
            score=score,
            frame_size=(w, h),
        )
        # No mask here: gating has the face, the zone and the floor to go on.
        return gating.gate(result, self.zone, rgb) if self.zone is not None else result

    def reset(self) -> None:
        """Single-frame model: nothing to forget."""

    def close(self) -> None:
        while not self._pool.empty():
            self._pool.get_nowait()


@register("edgetpu")
def create(
    cfg: EdgeTpuPose, *, zone: ZoneConfig | None = None, delegate_optional: bool = False
) -> PoseBackend:
    """The EdgeTPU pool, or the cpu backend when config allows it and no device or model loads.

    A cpu backend returned this way carries ``fallback_reason`` (why not edgetpu), so the
    agent's status can say which backend runs and why.
    """
    try:
        return EdgeTpuPoseBackend(cfg, zone=zone, delegate_optional=delegate_optional)
    except (DeviceError, ModelFileError) as e:
        if not cfg.fallback_to_cpu:
            raise
        log.warning("edgetpu unavailable (%s); falling back to the cpu backend", e)
        from edge_agent.pose.cpu import CpuPoseBackend

        try:
            backend = CpuPoseBackend(cfg.cpu, zone=zone)
        except BoothError as cpu_error:
            # Both causes: the one that needs fixing may well be the EdgeTPU's.
            raise type(cpu_error)(
                f"edgetpu unavailable ({_one_line(e)}), and the cpu fallback cannot start "
                f"either: {_one_line(cpu_error)}"
            ) from None
        backend.fallback_reason = f"edgetpu unavailable, running the cpu backend: {e}"
        return backend


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


# ---- the delegate probe: a child process that may crash in our place ----------------------

PROBE_FAILED = 3  # the child's exit status for a delegate that raised (its cause on stderr)


def probe_delegate(cfg: EdgeTpuPose, dev: str) -> None:
    """Load ``dev``'s delegate and run one frame in a child process; OSError if that fails.

    The child's own error (a missing library) is left for the in-process load to
    report with its exception; what only the child can survive, a crash or a hang,
    becomes the OSError here.
    """
    if cfg.probe_timeout_s <= 0:
        return
    cmd = [sys.executable, "-m", "edge_agent.pose.edgetpu", cfg.library, dev, str(cfg.model)]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=cfg.probe_timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise OSError(
            f"loading it and running one frame did not finish in {cfg.probe_timeout_s:g} s "
            "(a hung device or driver)"
        ) from None
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        raise OSError(
            f"it crashed a test process ({name}) while loading or running one frame: is "
            "libedgetpu built for this TFLite runtime? (libedgetpu1-std 16.0 was built "
            "against TensorFlow 2.5)"
        )


def _probe_main(argv: list[str]) -> int:
    """The child: load the delegate and the model on it, run one frame of zeros."""
    library, dev, model = argv
    try:
        delegate = litert.load_delegate(library, {"device": dev})
        interp = litert.load_interpreter(Path(model), threads=1, delegates=[delegate])
        inp = interp.get_input_details()[0]
        interp.set_tensor(inp["index"], np.zeros(inp["shape"], dtype=inp["dtype"]))
        interp.invoke()
    except Exception as e:  # noqa: BLE001 - reported to the parent, which decides
        print(_one_line(e), file=sys.stderr)
        return PROBE_FAILED
    return 0


if __name__ == "__main__":
    raise SystemExit(_probe_main(sys.argv[1:]))
