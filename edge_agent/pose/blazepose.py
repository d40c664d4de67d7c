"""BlazePose pre- and post-processing in numpy and OpenCV, following MediaPipe 0.10.21.

Every constant here reproduces MediaPipe's own graph for the same models
(``pose_detection_cpu.pbtxt``, ``pose_detection_to_roi.pbtxt``,
``pose_landmark_by_roi_cpu.pbtxt``, ``tensors_to_pose_landmarks_and_segmentation.pbtxt``),
so our landmarks match MediaPipe's to a fraction of a pixel.

Conventions: a region of interest (``Roi``) is a rotated rectangle in full-frame
pixels. A tensor of size S maps the rectangle's edges onto [0, S] (MediaPipe's
``getPerspectiveTransform`` corners), so normalised tensor coordinates ``u / S`` project
back through the same rectangle. Letterboxing is folded into the rectangle: a
region is first padded to the tensor's aspect ratio, and whatever falls outside the
image becomes border.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np

# ---- detector (pose_detection.tflite) ------------------------------------------------

DETECTOR_SIZE = 224
# SsdAnchorsCalculator options: 5 layers, strides 8/16/32/32/32, one aspect ratio plus
# the interpolated scale, so two anchors per cell per layer; equal strides share cells.
ANCHOR_STRIDES = (8, 16, 32, 32, 32)
NUM_ANCHORS = 2254
NUM_DETECTION_KEYPOINTS = 4
# Detector keypoints: 0 mid-hip, 1 full-body size/rotation point, 2 mid-shoulder,
# 3 upper-body size/rotation point.
SCORE_CLIP = 100.0
NMS_IOU = 0.3

# ---- landmarks (pose_landmark_full.tflite) -------------------------------------------

LANDMARK_SIZE = 256
NUM_LANDMARKS = 39  # 33 pose landmarks, 2 auxiliary (next frame's ROI), 4 unused
NUM_POSE_LANDMARKS = 33
AUX_CENTER, AUX_SCALE = 33, 34
HEATMAP_KERNEL = 7
HEATMAP_MIN_CONFIDENCE = 0.5  # RefineLandmarksFromHeatmapCalculator's default
POSE_FLAG_THRESHOLD = 0.5  # ThresholdingCalculator on the pose-presence output
# RectTransformationCalculator: scale 1.25, square_long; target angle 90 degrees.
ROI_SCALE = 1.25
ROI_TARGET_ANGLE = math.pi / 2


@dataclass(frozen=True, slots=True)
class Roi:
    """A rotated rectangle in pixels; ``rotation`` in radians, clockwise in image coordinates."""

    cx: float
    cy: float
    width: float
    height: float
    rotation: float = 0.0


@dataclass(frozen=True, slots=True)
class Detection:
    """One detector hit in full-frame pixels; ``box`` is MediaPipe's (face) box."""

    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    keypoints: np.ndarray  # (4, 2) float32 pixels


def ssd_anchors(size: int = DETECTOR_SIZE, strides: tuple[int, ...] = ANCHOR_STRIDES) -> np.ndarray:
    """Anchor centres (N, 2) in normalised (x, y), in the order the model emits boxes."""
    centres = []
    layer = 0
    while layer < len(strides):
        last = layer
        per_cell = 0
        while last < len(strides) and strides[last] == strides[layer]:
            per_cell += 2  # aspect ratio 1.0 + the interpolated-scale anchor
            last += 1
        cells = math.ceil(size / strides[layer])
        ys, xs = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        grid = np.stack([(xs.ravel() + 0.5) / cells, (ys.ravel() + 0.5) / cells], axis=1)
        centres.append(np.repeat(grid, per_cell, axis=0))
        layer = last
    return np.concatenate(centres).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # Clipped so that float32 exp cannot overflow; sigmoid(+-80) is 0 or 1 in float32.
    return 1.0 / (1.0 + np.exp(-np.clip(x, -80.0, 80.0)))


def decode_detections(
    raw_boxes: np.ndarray, raw_scores: np.ndarray, anchors: np.ndarray, min_score: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode the detector's raw output (fixed-size anchors, x before y).

    Returns ``(scores (K,), boxes (K, 4) xmin/ymin/xmax/ymax, keypoints (K, 4, 2))`` in
    normalised tensor coordinates, only for boxes scoring at least ``min_score``.
    """
    scores = _sigmoid(np.clip(raw_scores.reshape(-1), -SCORE_CLIP, SCORE_CLIP))
    keep = np.flatnonzero(scores >= min_score)
    if keep.size == 0:
        empty = np.zeros((0,), np.float32)
        return empty, np.zeros((0, 4), np.float32), np.zeros((0, 4, 2), np.float32)
    raw = raw_boxes.reshape(-1, 4 + 2 * NUM_DETECTION_KEYPOINTS)[keep] / DETECTOR_SIZE
    anchor = anchors[keep]
    centre = raw[:, 0:2] + anchor
    half = raw[:, 2:4] / 2
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    keypoints = raw[:, 4:].reshape(-1, NUM_DETECTION_KEYPOINTS, 2) + anchor[:, None, :]
    return scores[keep], boxes, keypoints


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def weighted_nms(
    scores: np.ndarray, boxes: np.ndarray, keypoints: np.ndarray, iou: float = NMS_IOU
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MediaPipe's weighted non-maximum suppression, best first.

    Each cluster (IoU above ``iou`` with its top box, the top box included) becomes one
    detection: the score of its top box, and box and keypoints averaged with the
    scores as weights.
    """
    order = np.argsort(-scores, kind="stable")
    out_s, out_b, out_k = [], [], []
    while order.size:
        top = order[0]
        members = _iou(boxes[top], boxes[order]) > iou
        cluster = order[members]
        w = scores[cluster][:, None]
        total = float(w.sum())
        out_s.append(scores[top])
        out_b.append((boxes[cluster] * w).sum(0) / total)
        out_k.append((keypoints[cluster] * w[:, :, None]).sum(0) / total)
        # The top box always joins its own cluster unless its area is zero; then drop it alone.
        order = order[~members] if members.any() else order[1:]
    if not out_s:
        return scores[:0], boxes[:0], keypoints[:0]
    return (
        np.asarray(out_s, np.float32),
        np.asarray(out_b, np.float32),
        np.asarray(out_k, np.float32),
    )


def normalize_radians(angle: float) -> float:
    return angle - 2 * math.pi * math.floor((angle + math.pi) / (2 * math.pi))


def roi_from_points(centre: np.ndarray, scale_point: np.ndarray) -> Roi:
    """The body ROI: centred on ``centre``, 2 x 1.25 x the distance to ``scale_point``,
    rotated so that centre -> scale point is vertical (pixels in, pixels out)."""
    dx = float(scale_point[0] - centre[0])
    dy = float(scale_point[1] - centre[1])
    size = math.hypot(dx, dy) * 2.0 * ROI_SCALE
    rotation = normalize_radians(ROI_TARGET_ANGLE - math.atan2(-dy, dx))
    return Roi(float(centre[0]), float(centre[1]), size, size, rotation)


def full_frame_roi(width: int, height: int, aspect_hw: float = 1.0) -> Roi:
    """The whole frame padded to the tensor's aspect ratio (the detector's letterbox)."""
    w, h = float(width), float(height)
    if h / w < aspect_hw:
        h = w * aspect_hw
    else:
        w = h / aspect_hw
    return Roi(width / 2.0, height / 2.0, w, h, 0.0)


def roi_matrix(roi: Roi, out_w: int, out_h: int) -> np.ndarray:
    """The 2x3 affine matrix mapping frame pixels into an (out_h, out_w) tensor."""
    c, s = math.cos(roi.rotation), math.sin(roi.rotation)
    # Tensor (u, v) -> frame: centre + (u/W - 0.5) w x_axis + (v/H - 0.5) h y_axis,
    # with the rectangle's x axis (cos, sin) and y axis (-sin, cos).
    a = np.array(
        [
            [c * roi.width / out_w, -s * roi.height / out_h, 0.0],
            [s * roi.width / out_w, c * roi.height / out_h, 0.0],
        ]
    )
    a[:, 2] = [
        roi.cx - 0.5 * (a[0, 0] * out_w + a[0, 1] * out_h),
        roi.cy - 0.5 * (a[1, 0] * out_w + a[1, 1] * out_h),
    ]
    return cv2.invertAffineTransform(a)


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return xs, ys


def fixed_maps(roi: Roi, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``remap`` maps for ``roi`` -> (size, size), in OpenCV's fixed-point form.

    Why fixed point: MediaPipe samples with ``warpPerspective``, which (like
    ``warpAffine`` up to OpenCV 4.10) rounds source coordinates to 1/32 px and blends
    with integer weights. OpenCV 5's ``warpAffine`` samples in floating point; the
    difference is invisible to the eye but moves the detector's keypoints by ~0.2 px
    and the landmarks by ~1.5 px, so we build the same fixed-point maps and ``remap``.
    """
    (a, b, c), (d, e, f) = cv2.invertAffineTransform(roi_matrix(roi, size, size)).tolist()
    xs, ys = _pixel_grid(size)
    # Python floats keep the maps float32 (convertMaps accepts nothing else).
    map_x = a * xs + b * ys + c
    map_y = d * xs + e * ys + f
    return cv2.convertMaps(map_x, map_y, cv2.CV_16SC2)


def remap_to_tensor(
    rgb: np.ndarray,
    maps: tuple[np.ndarray, np.ndarray],
    *,
    border: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Sample ``rgb`` through ``fixed_maps`` into a (size, size, 3) uint8 image."""
    return cv2.remap(
        rgb, maps[0], maps[1], cv2.INTER_LINEAR, dst=out, borderMode=border, borderValue=(0, 0, 0)
    )


def warp_to_tensor(
    rgb: np.ndarray, roi: Roi, size: int, *, border: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Crop, rotate and scale ``roi`` into a (size, size, 3) uint8 image: the affine warp
    MediaPipe does, with its sampling (see ``fixed_maps``)."""
    return remap_to_tensor(rgb, fixed_maps(roi, size), border=border, out=out)


def project(points_norm: np.ndarray, roi: Roi) -> np.ndarray:
    """Normalised tensor coordinates (N, 2) -> frame pixels through ``roi``."""
    c, s = math.cos(roi.rotation), math.sin(roi.rotation)
    x = points_norm[:, 0] - 0.5
    y = points_norm[:, 1] - 0.5
    out = np.empty_like(points_norm, dtype=np.float32)
    out[:, 0] = (c * x - s * y) * roi.width + roi.cx
    out[:, 1] = (s * x + c * y) * roi.height + roi.cy
    return out


def to_detections(
    scores: np.ndarray, boxes: np.ndarray, keypoints: np.ndarray, roi: Roi
) -> list[Detection]:
    """NMS output in tensor coordinates -> ``Detection``s in frame pixels (best first)."""
    dets = []
    for score, box, kps in zip(scores, boxes, keypoints, strict=True):
        corners = project(box.reshape(2, 2), roi)
        dets.append(
            Detection(
                score=float(score),
                box=(
                    float(corners[0, 0]),
                    float(corners[0, 1]),
                    float(corners[1, 0]),
                    float(corners[1, 1]),
                ),
                keypoints=project(kps, roi),
            )
        )
    return dets


# Kernel offsets, built once: (K*K, 2) as (row, col).
_HALF = (HEATMAP_KERNEL - 1) // 2
_OFFSETS = np.stack(
    np.meshgrid(np.arange(-_HALF, _HALF + 1), np.arange(-_HALF, _HALF + 1), indexing="ij"), -1
).reshape(-1, 2)


def refine_with_heatmap(xy_norm: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """Replace each landmark by the sigmoid-weighted mean of its 7x7 heatmap window.

    ``xy_norm`` (N, 2) normalised; ``heatmap`` (H, W, N) raw logits. Windows shrink at the
    edges (a zero border), and a landmark moves only if its window's peak confidence
    reaches 0.5, as in RefineLandmarksFromHeatmapCalculator (including its truncation
    toward zero and its check of the row against the width only).
    """
    hm_h, hm_w, channels = heatmap.shape
    n = xy_norm.shape[0]
    col = np.trunc(xy_norm[:, 0] * hm_w).astype(np.int64)
    row = np.trunc(xy_norm[:, 1] * hm_h).astype(np.int64)
    inside = (col >= 0) & (col < hm_w) & (row >= 0) & (col < hm_h)
    rows = row[:, None] + _OFFSETS[None, :, 0]
    cols = col[:, None] + _OFFSETS[None, :, 1]
    valid = (rows >= 0) & (rows < hm_h) & (cols >= 0) & (cols < hm_w)
    ch = np.broadcast_to(np.arange(n)[:, None], rows.shape)
    logits = heatmap[np.clip(rows, 0, hm_h - 1), np.clip(cols, 0, hm_w - 1), ch % channels]
    conf = np.where(valid, _sigmoid(logits), 0.0)
    total = conf.sum(1)
    peak = conf.max(1)
    ok = inside & (peak >= HEATMAP_MIN_CONFIDENCE) & (total > 0)
    out = xy_norm.astype(np.float32, copy=True)
    safe = np.where(total > 0, total, 1.0)
    out[ok, 0] = ((conf * cols).sum(1) / safe / hm_w)[ok]
    out[ok, 1] = ((conf * rows).sum(1) / safe / hm_h)[ok]
    return out


def decode_landmarks(raw: np.ndarray, heatmap: np.ndarray, roi: Roi) -> np.ndarray:
    """Landmark-model output -> (39, 5) ``(x_px, y_px, z_px, visibility, presence)``.

    ``raw`` holds 39 x (x, y, z, visibility logit, presence logit) in tensor pixels.
    z is scaled like x (MediaPipe's convention: roughly the same scale as x).
    """
    lm = raw.reshape(NUM_LANDMARKS, 5)
    xy = refine_with_heatmap(lm[:, :2] / LANDMARK_SIZE, heatmap)
    out = np.empty((NUM_LANDMARKS, 5), np.float32)
    out[:, :2] = project(xy, roi)
    out[:, 2] = lm[:, 2] / LANDMARK_SIZE * roi.width
    out[:, 3] = _sigmoid(lm[:, 3])
    out[:, 4] = _sigmoid(lm[:, 4])
    return out


def roi_from_landmarks(landmarks: np.ndarray) -> Roi:
    """Next frame's ROI from the two auxiliary landmarks (tracking mode)."""
    return roi_from_points(landmarks[AUX_CENTER, :2], landmarks[AUX_SCALE, :2])


def roi_from_detection(det: Detection) -> Roi:
    """The landmark model's ROI from a detection's hip centre and full-body scale point."""
    return roi_from_points(det.keypoints[0], det.keypoints[1])
