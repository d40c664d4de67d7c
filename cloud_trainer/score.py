"""Automatic quality score of a trained generator, on frames it never saw.

On the held-out tail of each take (``Corpus`` split ``holdout``):

- **SSIM and PSNR inside the person box** (the pose's box with room for the head),
  so the static booth background, which any generator learns first, does not
  flatter the score;
- **pose distance**: the CPU pose backend runs on the generated frame (upscaled to
  at least 256 px: BlazePose's detector misses small people) and its joints are
  compared with the input pose, in torso lengths; the same backend on the real
  held-out frames gives the floor this metric can reach;
- a **nearest-neighbour baseline**: for each held-out pose, the training frame of
  the same take whose pose is closest. A generator that does not beat it has only
  memorised the take.

On synthetic takes the corpus also has a ``transfer`` split: the attendee rendered
(noise-free) in another dance's poses, which is the true ground truth of motion
transfer; it gets the same SSIM/PSNR and baseline as ``transfer_*``.

``score_generator`` returns a plain dict (JSON-ready) stored with the job;
``plot_progress`` draws losses and scores over time into a PNG for the tablet.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cloud_trainer.corpus import Corpus, Examples
from cloud_trainer.labelmap import MIN_SCORE, Framing
from edge_agent import skeleton as sk
from edge_agent.errors import BoothError

log = logging.getLogger(__name__)

# Frames scored per split: evenly spaced, enough for a stable mean, cheap at 256 px.
MAX_SCORE_FRAMES = 48
# BlazePose wants the person at least this big; smaller outputs are upscaled first.
POSE_MIN_PX = 256
# Body joints compared for the pose distance (face points are too small at 64 px).
BODY_JOINTS = list(sk.BODY_12)

Generate = Callable[[np.ndarray], np.ndarray]  # uint8 labels (N,S,S,3) -> uint8 images


def person_box(pose: np.ndarray, size_px: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the person in crop pixels, with the framing's margins, clipped."""
    b = sk.bbox(pose, MIN_SCORE - 1e-6)
    if b is None:
        return 0, 0, size_px, size_px
    x0, y0, x1, y1 = b
    h = max(y1 - y0, 1.0)
    x0, x1 = x0 - Framing.PAD_SIDE * h, x1 + Framing.PAD_SIDE * h
    y0, y1 = y0 - Framing.PAD_TOP * h, y1 + Framing.PAD_BOTTOM * h
    box = (
        max(0, int(math.floor(x0))),
        max(0, int(math.floor(y0))),
        min(size_px, int(math.ceil(x1))),
        min(size_px, int(math.ceil(y1))),
    )
    if box[2] - box[0] < 7 or box[3] - box[1] < 7:  # SSIM's smallest window
        return 0, 0, size_px, size_px
    return box


def box_metrics(
    a: np.ndarray, b: np.ndarray, box: tuple[int, int, int, int]
) -> tuple[float, float]:
    """(SSIM, PSNR) of two uint8 RGB images inside ``box``."""
    x0, y0, x1, y1 = box
    pa, pb = a[y0:y1, x0:x1], b[y0:y1, x0:x1]
    win = min(7, (min(pa.shape[:2]) // 2) * 2 - 1)
    ssim = structural_similarity(pa, pb, channel_axis=2, data_range=255, win_size=win)
    if np.array_equal(pa, pb):
        psnr = 100.0
    else:
        psnr = min(100.0, float(peak_signal_noise_ratio(pa, pb, data_range=255)))
    return float(ssim), psnr


def nearest_pose(query: np.ndarray, candidates: np.ndarray) -> int:
    """Index of the candidate pose closest to ``query`` (mean distance over shared joints)."""
    q_ok = query[:, 2] >= MIN_SCORE
    c_ok = candidates[:, :, 2] >= MIN_SCORE
    both = c_ok & q_ok[None]
    d = np.linalg.norm(candidates[:, :, :2] - query[None, :, :2], axis=2)
    shared = both.sum(1)
    mean = np.where(shared > 0, (d * both).sum(1) / np.maximum(shared, 1), np.inf)
    # A candidate sharing few joints is a worse match than its distance says.
    mean = mean + (q_ok.sum() - shared) * 1e3
    return int(np.argmin(mean))


def _evenly(n: int, k: int) -> np.ndarray:
    return (
        np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(np.int64))
        if n
        else np.zeros(0, np.int64)
    )


def _evenly_mask(n: int, k: int) -> np.ndarray:
    keep = np.zeros(n, bool)
    keep[_evenly(n, k)] = True
    return keep


def holdout_part(n: int, k: int, part: str) -> np.ndarray:
    """At most ``k`` held-out frames, evenly spread, from one of two disjoint halves.

    ``"select"`` (even positions) chooses the best checkpoint, ``"score"`` (odd ones)
    scores it: a score taken on the frames that chose the checkpoint is the best of
    several noisy draws, biased upward against the nearest-neighbour baseline, which
    gets no such choice. With a single held-out frame both halves are that frame.
    """
    keep = np.zeros(n, bool)
    if n < 2:
        keep[:] = True
        return keep
    half = np.arange(0 if part == "select" else 1, n, 2)
    keep[half[_evenly(len(half), k)]] = True
    return keep


class PoseMetric:
    """The CPU pose backend on generated frames vs the input pose, in torso lengths."""

    def __init__(self, backend) -> None:
        self.backend = backend

    @classmethod
    def create(cls, models_dir: Path) -> tuple[PoseMetric | None, str | None]:
        """The metric, or None and the reason it is skipped."""
        try:
            from edge_agent.config import CpuPose
            from edge_agent.pose.base import create_pose_backend

            cfg = CpuPose(models_dir=models_dir, threads=2, mode="full", segmentation=False)
            return cls(create_pose_backend(cfg)), None
        except ImportError as e:
            return None, f"pose distance skipped: the CPU pose backend is not available ({e})"
        except (OSError, ValueError, RuntimeError, BoothError) as e:
            # A score without the pose metric is still a score: note it, never fail the job.
            return None, f"pose distance skipped: the CPU pose backend did not load ({e})"

    def error(self, image: np.ndarray, pose: np.ndarray) -> float | None:
        """Mean joint error in torso lengths; None when no person is detected."""
        k = max(1.0, POSE_MIN_PX / image.shape[0])
        big = cv2.resize(image, None, fx=k, fy=k, interpolation=cv2.INTER_CUBIC) if k > 1 else image
        self.backend.reset()
        result = self.backend.estimate(np.ascontiguousarray(big))
        if not result.detected:
            return None
        found = result.skeleton.copy()
        found[:, :2] /= k
        torso = sk.torso_size(pose)
        if not np.isfinite(torso) or torso <= 0:
            b = sk.bbox(pose, MIN_SCORE - 1e-6)
            torso = max(1.0, (b[3] - b[1]) / 3) if b else float(image.shape[0]) / 3
        ok = (pose[BODY_JOINTS, 2] >= MIN_SCORE) & (found[BODY_JOINTS, 2] > 0)
        if not ok.any():
            return None
        d = np.linalg.norm(found[BODY_JOINTS, :2] - pose[BODY_JOINTS, :2], axis=1)[ok]
        return float(d.mean() / torso)

    def close(self) -> None:
        self.backend.close()


def _pose_summary(
    metric: PoseMetric, images: np.ndarray, poses: np.ndarray
) -> tuple[float | None, float]:
    errors = [metric.error(img, p) for img, p in zip(images, poses, strict=True)]
    found = [e for e in errors if e is not None]
    rate = len(found) / max(1, len(errors))
    return (float(np.median(found)) if found else None), rate


def _generate_batched(generate: Generate, labels: np.ndarray, batch: int = 16) -> np.ndarray:
    return np.concatenate([generate(labels[i : i + batch]) for i in range(0, len(labels), batch)])


def _split_scores(
    generate: Generate,
    target: Examples,
    train: Examples,
    size_px: int,
    pose: PoseMetric | None,
    prefix: str,
) -> tuple[dict[str, Any], np.ndarray]:
    out = _generate_batched(generate, target.labels)
    nn_frames = np.empty_like(target.frames)
    for i, (p, t) in enumerate(zip(target.poses, target.takes, strict=True)):
        same = np.flatnonzero(train.takes == t)
        pool = same if same.size else np.arange(len(train))
        nn_frames[i] = train.frames[pool[nearest_pose(p, train.poses[pool])]]
    ours, nn = [], []
    for i in range(len(target)):
        box = person_box(target.poses[i], size_px)
        ours.append(box_metrics(out[i], target.frames[i], box))
        nn.append(box_metrics(nn_frames[i], target.frames[i], box))
    res: dict[str, Any] = {
        f"{prefix}frames": len(target),
        f"{prefix}ssim": float(np.mean([o[0] for o in ours])),
        f"{prefix}psnr": float(np.mean([o[1] for o in ours])),
        f"{prefix}nn_ssim": float(np.mean([o[0] for o in nn])),
        f"{prefix}nn_psnr": float(np.mean([o[1] for o in nn])),
    }
    if pose is not None:
        res[f"{prefix}pose_error"], res[f"{prefix}pose_detected"] = _pose_summary(
            pose, out, target.poses
        )
        res[f"{prefix}nn_pose_error"], _ = _pose_summary(pose, nn_frames, target.poses)
        res[f"{prefix}real_pose_error"], _ = _pose_summary(pose, target.frames, target.poses)
    return res, out


def score_generator(
    generate: Generate,
    corpus: Corpus,
    *,
    models_dir: Path | None = None,
    max_frames: int = MAX_SCORE_FRAMES,
    samples_path: Path | None = None,
) -> dict[str, Any]:
    """Score ``generate`` on the corpus' held-out (and, if any, transfer) frames.

    The held-out frames scored are the half the trainer did not choose its best
    checkpoint on (``holdout_part``).

    ``models_dir`` holds the pose models; None skips the pose distance.
    ``samples_path`` gets a PNG strip (label | generated | real) of a few held-out frames.
    """
    t0 = time.monotonic()
    notes: list[str] = []
    hold_all = corpus.examples("holdout", keep=lambda p: holdout_part(len(p), max_frames, "score"))
    if len(hold_all) == 0:
        raise ValueError("the corpus has no held-out frames to score on")
    transfer = corpus.examples("transfer", keep=lambda p: _evenly_mask(len(p), max_frames))
    # Training poses are small: pick each scored pose's nearest neighbour among them, then
    # decode only the picked frames.
    train_poses, train_takes, _ = corpus.metadata("train")
    keep = np.zeros(len(train_poses), bool)
    for ex in (hold_all, transfer):
        for p, t in zip(ex.poses, ex.takes, strict=True):
            same = np.flatnonzero(train_takes == t)
            pool = same if same.size else np.arange(len(train_poses))
            keep[pool[nearest_pose(p, train_poses[pool])]] = True
    train = corpus.examples("train", keep=keep)

    pose = None
    if models_dir is None:
        notes.append("pose distance skipped: no pose models directory given")
    else:
        pose, why = PoseMetric.create(Path(models_dir))
        if why:
            notes.append(why)
            log.warning(why)
    try:
        result, generated = _split_scores(generate, hold_all, train, corpus.size_px, pose, "")
        if len(transfer):
            tr, _ = _split_scores(generate, transfer, train, corpus.size_px, pose, "transfer_")
            result.update(tr)
    finally:
        if pose is not None:
            pose.close()
    result["beats_nn"] = result["ssim"] > result["nn_ssim"]
    result["label_map"] = corpus.label_map
    result["size_px"] = corpus.size_px
    result["notes"] = notes
    result["score_s"] = round(time.monotonic() - t0, 2)
    if samples_path is not None:
        pick_idx = _evenly(len(hold_all), 4)
        rows = [
            np.concatenate([hold_all.labels[i], generated[i], hold_all.frames[i]], axis=1)
            for i in pick_idx
        ]
        cv2.imwrite(
            str(samples_path), cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR)
        )
    return result


def plot_progress(
    history: list[dict[str, float]],
    evals: list[dict[str, float]],
    score: dict[str, Any] | None,
    path: Path,
    *,
    title: str = "training",
) -> None:
    """Losses and held-out SSIM over time, with the nearest-neighbour baseline, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    if history:
        steps = [h["step"] for h in history]
        ax_loss.plot(steps, [h["l1"] for h in history], label="L1 (x100 in G loss)")
        ax_loss.plot(steps, [h["gan"] for h in history], label="G adversarial")
        ax_loss.plot(steps, [h["d"] for h in history], label="D")
        ax_loss.set_xlabel("step")
        ax_loss.set_yscale("log")
        ax_loss.legend(fontsize=7)
    ax_loss.set_title("losses")
    if evals:
        ax_score.plot(
            [e["step"] for e in evals], [e["ssim"] for e in evals], "o-", label="held-out SSIM"
        )
    if score:
        ax_score.axhline(
            score["nn_ssim"], color="grey", ls="--", label="nearest-neighbour SSIM (box)"
        )
        ax_score.axhline(score["ssim"], color="green", ls=":", label="final SSIM (box)")
    ax_score.set_xlabel("step")
    ax_score.set_title("scores")
    ax_score.legend(fontsize=7)
    if score:
        fig.suptitle(
            f"{title}: SSIM {score['ssim']:.3f} (NN {score['nn_ssim']:.3f}), "
            f"PSNR {score['psnr']:.1f} dB",
            fontsize=9,
        )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
