"""Person mask from MediaPipe's selfie segmentation model (general, 256x256).

The whole frame is stretched to 256x256 (no letterbox, as MediaPipe's
``selfie_segmentation_cpu`` graph does), the model's sigmoid output is resized back
to the frame. The model's ``Convolution2DTransposeBias`` op exists only in XNNPACK,
which the LiteRT interpreter applies by default.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from edge_agent.pose import litert

log = logging.getLogger(__name__)

MODEL_FILE = "selfie_segmentation.tflite"
SIZE = 256
_SCALE_UNIT = np.float32(1.0 / 255.0)  # uint8 -> the model's [0, 1] input


class SelfieSegmenter:
    """Loads the model in the constructor; ``mask(rgb)`` returns (H, W) float32 in [0, 1]."""

    def __init__(self, models_dir: Path, threads: int) -> None:
        self._interp = litert.load_interpreter(Path(models_dir) / MODEL_FILE, threads=threads)
        inp = self._interp.get_input_details()[0]
        out = self._interp.get_output_details()[0]
        if tuple(inp["shape"]) != (1, SIZE, SIZE, 3) or tuple(out["shape"]) != (1, SIZE, SIZE, 1):
            raise ValueError(
                f"{MODEL_FILE}: expected 1x{SIZE}x{SIZE}x3 in, 1x{SIZE}x{SIZE}x1 out, got "
                f"{inp['shape'].tolist()} -> {out['shape'].tolist()}"
            )
        self._input = self._interp.tensor(inp["index"])
        self._output = self._interp.tensor(out["index"])
        self._small = np.empty((SIZE, SIZE, 3), np.uint8)

    def mask(self, rgb: np.ndarray) -> np.ndarray:
        height, width = rgb.shape[:2]
        cv2.resize(rgb, (SIZE, SIZE), dst=self._small, interpolation=cv2.INTER_LINEAR)
        np.multiply(self._small, _SCALE_UNIT, out=self._input()[0], dtype=np.float32)
        self._interp.invoke()
        # A fresh array per call: callers may keep a result's mask across frames.
        return cv2.resize(
            self._output()[0, :, :, 0], (width, height), interpolation=cv2.INTER_LINEAR
        )
