"""BlazePose on the CPU: detector + full landmark model (+ selfie segmentation) on LiteRT.

Two modes (``CpuPose.mode``):

- ``full``: the detector runs on every frame, as MediaPipe's static-image mode does.
- ``tracking``: the landmark model's two auxiliary landmarks give the next frame's
  region of interest, so the detector runs only to (re)acquire a person. When the
  landmark model's pose flag falls below 0.5 on the tracked region, tracking is lost
  and the detector runs again *on the same frame*, so a person who is still there
  costs one frame's extra latency rather than a missed frame.

With ``zone=`` (the agent's ``ZoneConfig``) every candidate is gated
(``edge_agent.pose.gating``) before it is reported or tracked: a wall shadow that
BlazePose takes for a person is dropped, tracking lets go of it, and the next
detection (up to ``MAX_CANDIDATES``) is tried.

A joint's score is ``visibility x presence``: presence is the model's belief that the
joint lies inside the frame, visibility that it is inside and not occluded, so the
product reads as "seen here". Joints outside the frame thus score near 0.

Segmentation runs on the landmark model's crop of the person (see
``segmentation``), so a frame without a person has no mask. The full pipeline costs
about 7.9 (detector) + 9.8 (landmarks) + 2.8 (segmentation) ms here. In ``full``
mode the mask is computed every frame. In ``tracking`` mode, running it every frame
would cost a fifth of the frame budget (80 fps leaves 12.5 ms), so it runs whenever
the detector found the person (acquiring a person is when a wall shadow can be
mistaken for one) and otherwise every ``SEGMENTATION_INTERVAL_FRAMES`` frames; in
between, the last mask of the crop is warped with the current ROI, so it moves with
the person and misses only the limbs' motion of the last few frames (a few pixels
at pose rates of 80+ fps).
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from edge_agent import skeleton as sk
from edge_agent.config import CpuPose, ZoneConfig
from edge_agent.errors import BadInput
from edge_agent.pose import blazepose as bp
from edge_agent.pose import gating, litert
from edge_agent.pose.base import PoseResult, check_frame, register

log = logging.getLogger(__name__)

DETECTOR_FILE = "pose_detection.tflite"
LANDMARK_FILE = "pose_landmark_full.tflite"
SEGMENTATION_INTERVAL_FRAMES = 4
# With gating, how many detections (best first) may be tried before giving up on a frame:
# a shadow beside the dancer can outscore them, each try costs one landmark run.
MAX_CANDIDATES = 3
# Joints scoring at least this count toward the person box.
BOX_MIN_SCORE = 0.5

# uint8 -> the models' input ranges ([-1, 1] detector, [0, 1] landmarks), written
# straight into the input tensors (a multiply is 5x faster than a lookup table here).
_SCALE_SIGNED = np.float32(2.0 / 255.0)
_SCALE_UNIT = np.float32(1.0 / 255.0)


def _expect(interp, name: str, inputs: list[tuple[int, ...]], outputs: list[tuple[int, ...]]):
    got_in = [tuple(d["shape"]) for d in interp.get_input_details()]
    got_out = [tuple(d["shape"]) for d in interp.get_output_details()]
    if got_in != inputs or sorted(got_out) != sorted(outputs):
        raise BadInput(f"{name}: not the BlazePose model expected ({got_in} -> {got_out})")


def _output_index(interp, shape: tuple[int, ...]) -> int:
    for d in interp.get_output_details():
        if tuple(d["shape"]) == shape:
            return int(d["index"])
    raise BadInput(f"model has no output of shape {shape}")


@register("cpu")
class CpuPoseBackend:
    """BlazePose full on LiteRT/XNNPACK. Loads its models here, in the constructor.

    One caller at a time: it holds tracking state and the interpreters' buffers.
    """

    name = "cpu"

    def __init__(self, cfg: CpuPose, *, zone: ZoneConfig | None = None) -> None:
        models = Path(cfg.models_dir)
        self.cfg = cfg
        self.mode = cfg.mode
        self.zone = zone
        self._det = litert.load_interpreter(models / DETECTOR_FILE, threads=cfg.threads)
        self._lm = litert.load_interpreter(models / LANDMARK_FILE, threads=cfg.threads)
        ds, ls = bp.DETECTOR_SIZE, bp.LANDMARK_SIZE
        _expect(
            self._det,
            DETECTOR_FILE,
            [(1, ds, ds, 3)],
            [(1, bp.NUM_ANCHORS, 12), (1, bp.NUM_ANCHORS, 1)],
        )
        n = bp.NUM_LANDMARKS
        _expect(
            self._lm,
            LANDMARK_FILE,
            [(1, ls, ls, 3)],
            [(1, n * 5), (1, 1), (1, ls, ls, 1), (1, 64, 64, n), (1, n * 3)],
        )
        # Views into the interpreters' own buffers: no copies in or out. They are
        # functions, called afresh each frame, because a live view blocks invoke().
        self._det_in = self._det.tensor(self._det.get_input_details()[0]["index"])
        self._det_boxes = self._det.tensor(_output_index(self._det, (1, bp.NUM_ANCHORS, 12)))
        self._det_scores = self._det.tensor(_output_index(self._det, (1, bp.NUM_ANCHORS, 1)))
        self._lm_in = self._lm.tensor(self._lm.get_input_details()[0]["index"])
        self._lm_raw = self._lm.tensor(_output_index(self._lm, (1, n * 5)))
        self._lm_flag = self._lm.tensor(_output_index(self._lm, (1, 1)))
        self._lm_heatmap = self._lm.tensor(_output_index(self._lm, (1, 64, 64, n)))
        self._anchors = bp.ssd_anchors()
        self._det_u8 = np.empty((ds, ds, 3), np.uint8)
        self._det_maps: tuple[np.ndarray, np.ndarray] | None = None
        self._det_maps_for: tuple[int, int] | None = None
        self._lm_u8 = np.empty((ls, ls, 3), np.uint8)
        self._segmenter = None
        if cfg.segmentation:
            from edge_agent.pose.segmentation import SelfieSegmenter

            self._segmenter = SelfieSegmenter(models, cfg.threads)
        self._roi: bp.Roi | None = None
        self._crop_mask: np.ndarray | None = None  # last segmentation, in crop pixels
        self._frame = 0  # frames estimated since reset
        self._mask_frame = -1  # the frame self._crop_mask was computed on
        log.info(
            "cpu pose ready: mode=%s threads=%d segmentation=%s",
            cfg.mode,
            cfg.threads,
            cfg.segmentation,
        )

    # ---- the two models -------------------------------------------------------------

    def detect(self, rgb: np.ndarray) -> list[bp.Detection]:
        """All people the detector finds (weighted NMS), best first, in frame pixels."""
        h, w = rgb.shape[:2]
        roi = bp.full_frame_roi(w, h)
        if self._det_maps_for != (w, h):
            # The detector always sees the whole frame: its maps change only with the size.
            self._det_maps = bp.fixed_maps(roi, bp.DETECTOR_SIZE)
            self._det_maps_for = (w, h)
        bp.remap_to_tensor(rgb, self._det_maps, border=cv2.BORDER_CONSTANT, out=self._det_u8)
        tensor = self._det_in()[0]
        np.multiply(self._det_u8, _SCALE_SIGNED, out=tensor, dtype=np.float32)
        tensor -= 1.0
        del tensor  # a live view into the interpreter blocks invoke()
        self._det.invoke()
        scores, boxes, kps = bp.decode_detections(
            self._det_boxes()[0], self._det_scores()[0], self._anchors, self.cfg.min_detection_score
        )
        if scores.size == 0:
            return []
        return bp.to_detections(*bp.weighted_nms(scores, boxes, kps), roi)

    def landmarks(self, rgb: np.ndarray, roi: bp.Roi) -> tuple[np.ndarray, float]:
        """(39, 5) landmarks ``(x_px, y_px, z_px, visibility, presence)`` and the pose flag."""
        bp.warp_to_tensor(rgb, roi, bp.LANDMARK_SIZE, border=cv2.BORDER_REPLICATE, out=self._lm_u8)
        np.multiply(self._lm_u8, _SCALE_UNIT, out=self._lm_in()[0], dtype=np.float32)
        self._lm.invoke()
        flag = float(self._lm_flag()[0, 0])
        lms = bp.decode_landmarks(self._lm_raw()[0], self._lm_heatmap()[0], roi)
        return lms, flag

    # ---- the backend interface --------------------------------------------------------

    def estimate(self, rgb: np.ndarray) -> PoseResult:
        rgb = check_frame(rgb)
        h, w = rgb.shape[:2]
        self._frame += 1
        tracked_roi = self._roi if self.mode == "tracking" else None
        self._roi = None

        if tracked_roi is not None:
            result, lms = self._pose_in(rgb, tracked_roi, tracked=True)
            if result.detected:
                self._roi = bp.roi_from_landmarks(lms)
                return result
            log.debug("tracking lost (pose flag %.2f); running the detector", result.score)

        dets = self.detect(rgb)
        if not dets:
            return PoseResult(frame_size=(w, h))
        # Without gating, MediaPipe's rule: the top detection or nobody. With gating, the
        # next candidates get a chance when the top one is a shadow.
        rejected = None
        for det in dets[: MAX_CANDIDATES if self.zone else 1]:
            result, lms = self._pose_in(rgb, bp.roi_from_detection(det), tracked=False)
            if result.detected:
                if self.mode == "tracking":
                    self._roi = bp.roi_from_landmarks(lms)
                return result
            rejected = rejected or result
        return rejected

    def _pose_in(
        self, rgb: np.ndarray, roi: bp.Roi, *, tracked: bool
    ) -> tuple[PoseResult, np.ndarray]:
        """Landmarks (and the mask) in ``roi`` as a PoseResult, gated when a zone is set."""
        h, w = rgb.shape[:2]
        lms, flag = self.landmarks(rgb, roi)
        if flag < bp.POSE_FLAG_THRESHOLD:
            return PoseResult(score=flag, frame_size=(w, h)), lms
        pose = np.empty((bp.NUM_POSE_LANDMARKS, 3), np.float32)
        pose[:, :2] = lms[: bp.NUM_POSE_LANDMARKS, :2]
        pose[:, 2] = lms[: bp.NUM_POSE_LANDMARKS, 3] * lms[: bp.NUM_POSE_LANDMARKS, 4]
        skel = sk.from_blazepose(pose)
        result = PoseResult(
            skeleton=skel,
            detected=True,
            box=sk.bbox(skel, BOX_MIN_SCORE),
            tracked=tracked,
            score=flag,
            frame_size=(w, h),
        )
        # A tracked person passed the face check when acquired: turning their back to the
        # camera must not lose them (see gating).
        face = not tracked
        if self.zone is not None:
            # The checks that need no mask first: a shadow fails them, and then its
            # segmentation (2.8 ms) is never computed.
            without_mask = gating.gate(result, self.zone, rgb, require_face=face)
            if not without_mask.detected:
                return without_mask, lms
        result.mask = self._mask_in(roi, (w, h), fresh=not tracked)
        if self.zone is not None:
            result = gating.gate(result, self.zone, rgb, require_face=face)
        return result, lms

    def _mask_in(self, roi: bp.Roi, size: tuple[int, int], *, fresh: bool) -> np.ndarray | None:
        """The person mask in frame pixels for the landmark crop just made of ``roi``.

        When segmentation is not due, the last mask *of the crop* is reused: the crop
        follows the person, so warping it with this frame's ROI carries the mask along
        with the body (only the limbs' own motion since then is missed).
        """
        if self._segmenter is None:
            return None
        due = (
            fresh
            or self.mode == "full"
            or self._crop_mask is None
            or self._frame - self._mask_frame >= SEGMENTATION_INTERVAL_FRAMES
        )
        if due:
            self._crop_mask = self._segmenter.segment(self._lm_u8)
            self._mask_frame = self._frame
        return self._segmenter.to_frame(self._crop_mask, roi, size)

    def reset(self) -> None:
        self._roi = None
        self._crop_mask = None
        self._frame = 0
        self._mask_frame = -1

    def close(self) -> None:
        # LiteRT frees interpreters with their last reference: ours, and the tensor views
        # (bound to their interpreter), which would otherwise hold them as long as we live.
        self._det = self._lm = self._segmenter = None
        self._det_in = self._det_boxes = self._det_scores = None
        self._lm_in = self._lm_raw = self._lm_flag = self._lm_heatmap = None
