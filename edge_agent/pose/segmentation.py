"""Person mask from MediaPipe's selfie segmentation model (general, 256x256).

The model was trained on selfies: on a whole 640x480 booth frame, where the dancer
is a thin figure, it misses dark sleeves and trousers and half-segments a wall shadow
(measured on the synthetic booth). On the landmark model's 256x256 crop of the
person, where the body fills the input as a selfie's does, the mask is clean. So we
segment that crop, which is already warped, and warp the mask back into the frame;
outside the person's region the mask is 0.

The model's ``Convolution2DTransposeBias`` op exists only in XNNPACK, which the
LiteRT interpreter applies by default.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from edge_agent.errors import BadInput
from edge_agent.pose import blazepose as bp
from edge_agent.pose import litert

log = logging.getLogger(__name__)

MODEL_FILE = "selfie_segmentation.tflite"
SIZE = 256
_SCALE_UNIT = np.float32(1.0 / 255.0)  # uint8 -> the model's [0, 1] input


class SelfieSegmenter:
    """Loads the model in the constructor; see ``segment`` and ``frame_mask``."""

    def __init__(self, models_dir: Path, threads: int) -> None:
        self._interp = litert.load_interpreter(Path(models_dir) / MODEL_FILE, threads=threads)
        inp = self._interp.get_input_details()[0]
        out = self._interp.get_output_details()[0]
        if tuple(inp["shape"]) != (1, SIZE, SIZE, 3) or tuple(out["shape"]) != (1, SIZE, SIZE, 1):
            raise BadInput(
                f"{MODEL_FILE}: expected 1x{SIZE}x{SIZE}x3 in, 1x{SIZE}x{SIZE}x1 out, got "
                f"{inp['shape'].tolist()} -> {out['shape'].tolist()}"
            )
        self._input = self._interp.tensor(inp["index"])
        self._output = self._interp.tensor(out["index"])
        self._small = np.empty((SIZE, SIZE, 3), np.uint8)

    def segment(self, rgb: np.ndarray) -> np.ndarray:
        """Mask (256, 256) float32 in [0, 1] of an RGB uint8 image (stretched to 256x256)."""
        if rgb.shape[:2] != (SIZE, SIZE):
            rgb = cv2.resize(rgb, (SIZE, SIZE), dst=self._small, interpolation=cv2.INTER_LINEAR)
        np.multiply(rgb, _SCALE_UNIT, out=self._input()[0], dtype=np.float32)
        self._interp.invoke()
        return self._output()[0, :, :, 0].copy()

    def mask(self, rgb: np.ndarray) -> np.ndarray:
        """Whole-frame mask (H, W) float32 in [0, 1]: the frame stretched to 256x256 and back.

        Simple, but on a booth frame where the dancer is small it misses dark clothes
        (see the module docstring); the pose backend segments the person's crop instead.
        """
        h, w = rgb.shape[:2]
        return cv2.resize(self.segment(rgb), (w, h), interpolation=cv2.INTER_LINEAR)

    def to_frame(self, small: np.ndarray, roi: bp.Roi, size: tuple[int, int]) -> np.ndarray:
        """A (256, 256) mask of ``roi``'s crop, warped into frame pixels ``size`` (w, h).

        A fresh array per call: callers may keep a result's mask. (Warping only the
        ROI's bounding box into a zeroed frame measured no faster.)
        """
        return cv2.warpAffine(
            small,
            bp.roi_matrix(roi, SIZE, SIZE),
            size,
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0.0,
        )
