"""Corpus: takes -> (label map, real frame) training pairs -> TFRecord shards -> tf.data.

A take is a person dancing in front of one camera: frames in time order plus a
canonical skeleton per frame (and, for the ``parts`` label map, a person mask).
``TakeData`` is that input, whatever it came from: the synthetic booth, a local
take directory written by the edge agent, or the blob store (ingest shards).

``build_corpus`` frames each take with its fixed crop box, renders a label map per
frame, holds out the *last* ``holdout_fraction`` of every take in time (after a
short gap, so the held-out frames are not near-copies of the last training frames)
and writes TFRecord shards plus ``corpus.json``, last and atomically: a directory
with a manifest is a complete corpus. ``Corpus.dataset`` streams the training shards
with decoding in parallel, an in-memory cache of the decoded uint8 pairs, shuffling
and prefetch.

Layout of a corpus directory (mirrored to ``sessions/<sid>/corpus/`` in the store)::

    corpus.json                      manifest: size, label map, takes, framings, shards
    train-00000.tfrecord ...         training pairs
    holdout-00000.tfrecord ...       the held-out tail of each take (scoring, best checkpoint)
    transfer-00000.tfrecord ...      synthetic takes only: the attendee rendered in unseen poses

Each record: ``label`` (PNG), ``frame`` (JPEG, q95), ``pose`` (23x3 float, crop pixels),
``take`` (index in the manifest), ``index`` (frame number in the take).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import tensorflow as tf

from cloud_trainer.labelmap import MIN_SCORE, Framing, render_label
from edge_agent import skeleton as sk
from edge_agent.errors import BoothError

log = logging.getLogger(__name__)

CORPUS_FORMAT = 1
MANIFEST = "corpus.json"
SPLITS = ("train", "holdout", "transfer")
# A take needs this many usable frames: fewer and there is nothing to learn from, and
# the held-out tail is a frame or two.
MIN_USABLE_FRAMES = 16
# A frame has a person when this many joints are confidently placed.
MIN_JOINTS = 6
# Frames dropped between the training part and the held-out tail: adjacent frames at
# booth frame rates are near-duplicates, which would make the held-out score a recall test.
HOLDOUT_GAP_S = 0.25
RECORDS_PER_SHARD = 256
# The training stream's decode/cast threads and prefetched batches (no autotuning: see
# Corpus.dataset).
DATASET_THREADS = 2
PREFETCH_BATCHES = 2
JPEG_QUALITY = 95


class TrainingFailed(BoothError):
    """A job that cannot succeed with its input; ``reason`` is shown on the session."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Segmenter(Protocol):
    def mask(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W) float32 person probability."""


# ---- takes ----------------------------------------------------------------------------


@dataclass
class TransferTruth:
    """Synthetic ground truth: the take's attendee rendered in poses they never danced."""

    poses: np.ndarray  # (M, 23, 3) full-frame pixels
    frames: Sequence[np.ndarray]  # RGB, noise-free
    masks: Sequence[np.ndarray]


@dataclass
class TakeData:
    """One camera's take: frames in time order with a pose per frame.

    ``frames`` hold RGB uint8 arrays or JPEG bytes (decoded one at a time, so a long
    take never sits decoded in memory). ``masks`` are optional person masks (H, W),
    needed by the ``parts`` label map unless a segmenter computes them.
    """

    name: str
    frames: Sequence[np.ndarray | bytes]
    poses: np.ndarray
    fps: float = 30.0
    masks: Sequence[np.ndarray | None] | None = None
    camera: str = "cam0"
    transfer: TransferTruth | None = None
    frame_size: tuple[int, int] | None = None  # (w, h); found from the first frame if None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.poses = np.asarray(self.poses, dtype=np.float32).reshape(-1, sk.NUM_JOINTS, 3)
        if len(self.frames) != len(self.poses):
            raise TrainingFailed(
                f"take {self.name}: {len(self.frames)} frames but {len(self.poses)} poses"
            )
        if self.masks is not None and len(self.masks) != len(self.frames):
            raise TrainingFailed(
                f"take {self.name}: {len(self.frames)} frames but {len(self.masks)} masks"
            )

    def __len__(self) -> int:
        return len(self.frames)

    def rgb(self, i: int) -> np.ndarray | None:
        """Frame ``i`` as RGB uint8, or None if its JPEG does not decode."""
        f = self.frames[i]
        if isinstance(f, np.ndarray):
            return f
        if not f:
            return None  # a lost frame: the camera delivered nothing usable
        bgr = cv2.imdecode(np.frombuffer(f, np.uint8), cv2.IMREAD_COLOR)
        return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def size(self) -> tuple[int, int] | None:
        if self.frame_size is None:
            for i in range(len(self)):
                rgb = self.rgb(i)
                if rgb is not None:
                    self.frame_size = (rgb.shape[1], rgb.shape[0])
                    break
        return self.frame_size

    # -- constructors ------------------------------------------------------------------

    @classmethod
    def from_synth(
        cls,
        attendee: int,
        dance: int,
        *,
        seconds: float,
        fps: float = 15.0,
        size: tuple[int, int] = (160, 120),
        viewpoint: int = 0,
        transfer_dance: int | None = None,
        transfer_frames: int = 0,
    ) -> TakeData:
        """Attendee ``attendee`` dancing dance ``dance``, rendered by the synthetic booth.

        With ``transfer_dance``, ``transfer_frames`` noise-free renders of the same attendee
        in that dance's poses come along as ground truth for motion transfer.
        """
        from edge_agent.synth.appearance import Attendee
        from edge_agent.synth.choreography import Dance
        from edge_agent.synth.render import render

        person = Attendee.from_seed(attendee)
        frames, poses, masks = [], [], []
        for i, body in enumerate(Dance.from_seed(dance).poses(fps, seconds)):
            f = render(person, body, size=size, viewpoint=viewpoint, frame_index=i)
            frames.append(f.rgb)
            poses.append(f.keypoints)
            masks.append(f.mask)
        transfer = None
        if transfer_dance is not None and transfer_frames > 0:
            bodies = list(Dance.from_seed(transfer_dance).poses(fps, seconds))
            pick = np.linspace(0, len(bodies) - 1, transfer_frames).round().astype(int)
            rendered = [
                render(person, bodies[j], size=size, viewpoint=viewpoint, noise=False) for j in pick
            ]
            transfer = TransferTruth(
                np.stack([r.keypoints for r in rendered]),
                [r.rgb for r in rendered],
                [r.mask for r in rendered],
            )
        return cls(
            name=f"synth-a{attendee}-d{dance}-v{viewpoint}",
            frames=frames,
            poses=np.stack(poses) if poses else np.zeros((0, sk.NUM_JOINTS, 3), np.float32),
            fps=fps,
            masks=masks,
            camera=f"cam{viewpoint}",
            transfer=transfer,
            frame_size=size,
            meta={"attendee": attendee, "dance": dance, "viewpoint": viewpoint},
        )

    @classmethod
    def from_take_dir(cls, path: str | Path) -> TakeData:
        """A take directory written by the edge agent's capture (see ``load_take_dir``)."""
        return load_take_dir(Path(path))


def load_take_dir(path: Path) -> TakeData:
    """A take directory, in either of the two layouts the edge side writes.

    - Capture (``edge_agent.capture.take``): ``seg_*.mp4`` MJPEG-in-MP4 segments,
      ``frames.csv`` (seq -> segment), ``poses.npz`` (``skeleton``: offline-smoothed,
      else ``raw``; (N, 23, 3) by seq) and ``take.json`` (``granted.fps``).
    - Synthetic (``booth synth``, ``edge_agent.synth.take``): ``frames.mp4`` plus
      ``truth.npz`` with ground-truth keypoints and person masks.

    Frames stay JPEG bytes until the corpus decodes them one at a time.
    """
    path = Path(path)
    if not path.is_dir():
        raise TrainingFailed(f"take directory {path} does not exist")
    manifest: dict[str, Any] = {}
    if (path / "take.json").exists():
        try:
            manifest = json.loads((path / "take.json").read_text())
        except (OSError, ValueError) as e:
            raise TrainingFailed(f"take {path.name}: unreadable take.json ({e})") from e
    fps = float((manifest.get("granted") or {}).get("fps") or manifest.get("fps") or 30.0)
    try:
        if (path / "truth.npz").exists() and (path / "frames.mp4").exists():
            return _load_synth_take_dir(path, fps)
        return _load_capture_take_dir(path, fps, manifest)
    except (
        OSError,
        ValueError,
        KeyError,
        EOFError,
    ) as e:  # av errors derive from OSError/ValueError
        raise TrainingFailed(f"take {path.name}: unreadable ({_first_line(str(e))})") from e


def _load_synth_take_dir(path: Path, fps: float) -> TakeData:
    from edge_agent.synth.take import read_mp4_jpegs, read_truth

    jpegs = read_mp4_jpegs(path / "frames.mp4")
    truth = read_truth(path / "truth.npz")
    n = min(len(jpegs), len(truth["keypoints"]))
    return TakeData(
        name=path.name,
        frames=jpegs[:n],
        poses=truth["keypoints"][:n],
        fps=fps,
        masks=list(truth["mask"][:n]),
    )


def _load_capture_take_dir(path: Path, fps: float, manifest: dict[str, Any]) -> TakeData:
    import csv

    from edge_agent.capture import segments

    segs = sorted(path.glob(f"{segments.SEGMENT_PREFIX}*.mp4"))
    if not segs:
        raise TrainingFailed(f"take {path.name}: no video segments in {path}")
    by_segment: dict[int, list[int]] = {}
    csv_file = path / "frames.csv"
    if csv_file.exists():
        with open(csv_file, newline="") as f:
            for row in csv.DictReader(f):
                by_segment.setdefault(int(row["segment"]), []).append(int(row["seq"]))
    frames: dict[int, bytes] = {}
    next_seq = 0
    for seg in segs:
        index = int(seg.stem[len(segments.SEGMENT_PREFIX) :])
        seqs = sorted(by_segment.get(index, []))
        for k, (_pts, jpeg) in enumerate(segments.read_segment_packets(seg)):
            # Without frames.csv, frames are numbered in segment order.
            seq = seqs[k] if k < len(seqs) else next_seq
            frames[seq] = jpeg
            next_seq = max(next_seq, seq + 1)
    seqs = sorted(frames)
    skeletons = np.zeros((len(seqs), sk.NUM_JOINTS, 3), np.float32)
    pose_file = path / (manifest.get("poses") or "poses.npz")
    if pose_file.exists():
        with np.load(pose_file) as z:
            arr = z["skeleton"] if "skeleton" in z.files else z["raw"]
            seq_of = z["seq"] if "seq" in z.files else np.arange(len(arr))
        by_seq = {int(s): a for s, a in zip(seq_of, arr, strict=True)}
        for i, s in enumerate(seqs):
            if s in by_seq:
                skeletons[i] = by_seq[s]
    return TakeData(
        name=path.name,
        frames=[frames[s] for s in seqs],
        poses=skeletons,
        fps=fps,
        camera=str(manifest.get("camera_id") or "cam0"),
    )


# ---- building ---------------------------------------------------------------------------


def split_indices(n: int, holdout_fraction: float, fps: float) -> tuple[range, range]:
    """(train, holdout) frame ranges: the holdout is the last fraction in time, after a gap."""
    if holdout_fraction <= 0 or n < 2:
        return range(n), range(n, n)
    n_hold = max(1, math.ceil(n * holdout_fraction))
    rate = fps if math.isfinite(fps) and fps > 0 else 30.0  # a take that never said its rate
    gap = max(0, min(round(rate * HOLDOUT_GAP_S), (n - n_hold) // 4))
    return range(0, n - n_hold - gap), range(n - n_hold, n)


def has_person(pose: np.ndarray) -> bool:
    return int((pose[:, 2] >= MIN_SCORE).sum()) >= MIN_JOINTS


def _bytes(v: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))


def _ints(v: Sequence[int]) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(v)))


def _floats(v: Sequence[float]) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(v)))


def encode_example(
    label: np.ndarray, frame: np.ndarray, pose: np.ndarray, take: int, index: int
) -> bytes:
    ok_l, png = cv2.imencode(".png", cv2.cvtColor(label, cv2.COLOR_RGB2BGR))
    ok_f, jpg = cv2.imencode(
        ".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    )
    if not (ok_l and ok_f):
        raise RuntimeError("OpenCV failed to encode a training pair")
    ex = tf.train.Example(
        features=tf.train.Features(
            feature={
                "label": _bytes(png.tobytes()),
                "frame": _bytes(jpg.tobytes()),
                "pose": _floats(np.asarray(pose, np.float32).reshape(-1).tolist()),
                "take": _ints([take]),
                "index": _ints([index]),
            }
        )
    )
    return ex.SerializeToString()


class _ShardWriter:
    def __init__(self, root: Path, split: str) -> None:
        self.root, self.split = root, split
        self.shards: list[dict[str, Any]] = []
        self._writer: tf.io.TFRecordWriter | None = None

    def write(self, record: bytes) -> None:
        if self._writer is None or self.shards[-1]["records"] >= RECORDS_PER_SHARD:
            self.close()
            name = f"{self.split}-{len(self.shards):05d}.tfrecord"
            self._writer = tf.io.TFRecordWriter(str(self.root / name))
            self.shards.append({"file": name, "records": 0})
        self._writer.write(record)
        self.shards[-1]["records"] += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def default_segmenter(models_dir: Path) -> Segmenter:
    """Selfie segmentation on the CPU (the model ``make models`` unpacked)."""
    from edge_agent.pose.segmentation import SelfieSegmenter

    try:
        return SelfieSegmenter(models_dir, threads=2)
    except (OSError, ValueError, BoothError) as e:
        raise TrainingFailed(
            f"the parts label map needs person masks, and selfie segmentation did not load: {e}"
        ) from e


def build_corpus(
    takes: Iterable[TakeData],
    out_dir: str | Path,
    *,
    size_px: int,
    label_map: str,
    holdout_fraction: float,
    segmenter: Callable[[], Segmenter] | None = None,
    progress: Callable[[int, int], None] | None = None,
    total: int | None = None,
) -> Corpus:
    """Write the corpus of ``takes`` to ``out_dir``; raise TrainingFailed on unusable input.

    ``takes`` is consumed one take at a time, so an iterator that loads each take when
    asked keeps one take's frames in memory, not all of them; ``total`` is how many it
    will yield (for ``progress``) when it has no length.

    ``segmenter`` is a factory, called only if some take lacks masks, of the person
    segmenter the ``parts`` label map needs. A take that cannot be used (empty, too
    short, nobody in it, frames that do not decode) is skipped, and listed with its
    reason in the manifest, as long as another take is usable; otherwise the job fails
    with every take's reason.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for stale in out.glob("*.tfrecord"):
        stale.unlink()
    writers = {s: _ShardWriter(out, s) for s in SPLITS}
    manifest_takes: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    seg: Segmenter | None = None
    if total is None and isinstance(takes, Sized):
        total = len(takes)
    seen = 0
    t0 = time.monotonic()
    try:
        # Not enumerate(): its reused result tuple would keep the previous take alive
        # while the next one loads.
        for take in takes:
            t_idx, seen = seen, seen + 1
            needs_mask = label_map == "parts" and take.masks is None
            if needs_mask and seg is None:
                if segmenter is None:
                    raise TrainingFailed(
                        f"take {take.name} has no person masks and no segmenter is configured"
                        " for the parts label map"
                    )
                seg = segmenter()
            try:
                info = _write_take(
                    len(manifest_takes), take, writers, size_px, label_map, holdout_fraction, seg
                )
            except TrainingFailed as e:
                # One camera that saw nobody must not sink the others' takes.
                skipped.append({"take": take.name, "reason": e.reason})
                log.warning("take skipped", extra={"take": take.name, "reason": e.reason})
            else:
                manifest_takes.append(info)
            if progress:
                progress(t_idx + 1, max(total or 0, t_idx + 1))
            del take  # before the next is loaded: one take's frames in memory at a time
    finally:
        for w in writers.values():
            w.close()
    if not seen:
        raise TrainingFailed("the job has no takes")
    if not manifest_takes:
        raise TrainingFailed("; ".join(s["reason"] for s in skipped))
    manifest = {
        "format": CORPUS_FORMAT,
        "size_px": size_px,
        "label_map": label_map,
        "holdout_fraction": holdout_fraction,
        "takes": manifest_takes,
        "skipped": skipped,
        "shards": {s: w.shards for s, w in writers.items()},
        "build_s": round(time.monotonic() - t0, 2),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    log.info(
        "corpus built",
        extra={
            "dir": str(out),
            "train": manifest_count(manifest, "train"),
            "holdout": manifest_count(manifest, "holdout"),
        },
    )
    return Corpus(out, manifest)


def unusable_reason(take: TakeData) -> str | None:
    """Why ``take``'s poses alone keep it out of training (None: they do not).

    The worker asks before training, to check what rendering needs on the takes that
    will be trained on; writing the take asks again, and checks its frames too.
    """
    n = len(take)
    if n == 0:
        return f"take {take.name} is empty: no frames were recorded"
    with_person = sum(1 for p in take.poses if has_person(p))
    if not with_person:
        return (
            f"no person detected in take {take.name} (none of its {n} frames has a pose: "
            "if the attendee was in view, check that camera's pose model)"
        )
    if with_person < MIN_USABLE_FRAMES:
        return (
            f"take {take.name} is too short to train on: {with_person} frames with a "
            f"person, at least {MIN_USABLE_FRAMES} needed"
        )
    return None


def _write_take(
    t_idx: int,
    take: TakeData,
    writers: dict[str, _ShardWriter],
    size_px: int,
    label_map: str,
    holdout_fraction: float,
    seg: Segmenter | None,
) -> dict[str, Any]:
    n = len(take)
    if reason := unusable_reason(take):
        raise TrainingFailed(reason)
    with_person = np.array([has_person(p) for p in take.poses])
    frame_size = take.size()
    if frame_size is None:
        raise TrainingFailed(f"take {take.name}: none of its {n} frames decodes (corrupt shard?)")
    framing = Framing.from_poses(take.poses[with_person], *frame_size)
    train_idx, hold_idx = split_indices(n, holdout_fraction, take.fps)
    counts = {"train": 0, "holdout": 0, "transfer": 0, "undecodable": 0, "no_person": 0}

    def pair(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        if not with_person[i]:
            counts["no_person"] += 1
            return None
        rgb = take.rgb(i)
        if rgb is None or (rgb.shape[1], rgb.shape[0]) != frame_size:
            counts["undecodable"] += 1
            return None
        pose = framing.to_crop(take.poses[i], size_px)
        mask = None
        if label_map == "parts":
            full = take.masks[i] if take.masks is not None else None
            if full is None:
                full = seg.mask(rgb)
            mask = framing.crop_mask(full, size_px)
            if not mask.any():
                counts["no_person"] += 1
                return None
        return render_label(label_map, pose, size_px, mask), framing.crop(rgb, size_px), pose

    # Encoded records (tens of KB each) are held until the take passes its checks, so a
    # rejected take leaves nothing in the shards.
    records: dict[str, list[bytes]] = {"train": [], "holdout": [], "transfer": []}
    for split, idx in (("train", train_idx), ("holdout", hold_idx)):
        for i in idx:
            p = pair(i)
            if p is not None:
                records[split].append(encode_example(p[0], p[1], p[2], t_idx, i))
                counts[split] += 1
    if counts["undecodable"] > n // 2:
        raise TrainingFailed(
            f"take {take.name}: {counts['undecodable']} of {n} frames do not decode (corrupt shard?)"
        )
    if counts["train"] < MIN_USABLE_FRAMES:
        raise TrainingFailed(
            f"take {take.name} is too short to train on: {counts['train']} usable training "
            f"frames, at least {MIN_USABLE_FRAMES} needed"
        )
    if take.transfer is not None:
        tr = take.transfer
        for j, (pose_full, rgb, m) in enumerate(zip(tr.poses, tr.frames, tr.masks, strict=True)):
            if not has_person(pose_full):
                continue
            pose = framing.to_crop(pose_full, size_px)
            mask = framing.crop_mask(m, size_px) if label_map == "parts" else None
            label = render_label(label_map, pose, size_px, mask)
            records["transfer"].append(
                encode_example(label, framing.crop(rgb, size_px), pose, t_idx, j)
            )
            counts["transfer"] += 1
    for split, recs in records.items():
        for r in recs:
            writers[split].write(r)
    return {
        "name": take.name,
        "camera": take.camera,
        "fps": take.fps,
        "frames": n,
        "train_range": [train_idx.start, train_idx.stop],
        "holdout_range": [hold_idx.start, hold_idx.stop],
        "framing": framing.to_dict(),
        "meta": take.meta,
        **counts,
    }


# ---- reading ----------------------------------------------------------------------------


def manifest_count(manifest: dict, split: str) -> int:
    return sum(s["records"] for s in manifest["shards"].get(split, []))


_FEATURES = {
    "label": tf.io.FixedLenFeature([], tf.string),
    "frame": tf.io.FixedLenFeature([], tf.string),
    "pose": tf.io.FixedLenFeature([sk.NUM_JOINTS * 3], tf.float32),
    "take": tf.io.FixedLenFeature([], tf.int64),
    "index": tf.io.FixedLenFeature([], tf.int64),
}


@dataclass
class Examples:
    """Decoded records of one split, in file order."""

    labels: np.ndarray  # (N, S, S, 3) uint8
    frames: np.ndarray  # (N, S, S, 3) uint8
    poses: np.ndarray  # (N, 23, 3) crop pixels
    takes: np.ndarray  # (N,)
    indices: np.ndarray  # (N,)

    def __len__(self) -> int:
        return len(self.poses)

    def subset(self, sel: np.ndarray | Sequence[int]) -> Examples:
        sel = np.asarray(sel, dtype=np.int64)
        return Examples(
            self.labels[sel], self.frames[sel], self.poses[sel], self.takes[sel], self.indices[sel]
        )


class Corpus:
    """A built corpus directory (see the module docstring for its layout)."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.size_px: int = int(manifest["size_px"])
        self.label_map: str = manifest["label_map"]

    @classmethod
    def open(cls, root: str | Path) -> Corpus:
        path = Path(root) / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise TrainingFailed(f"no corpus at {root} (missing {MANIFEST})") from e
        except (OSError, ValueError) as e:
            raise TrainingFailed(f"corrupt corpus manifest {path}: {e}") from e
        if manifest.get("format") != CORPUS_FORMAT:
            raise TrainingFailed(
                f"corpus {root} has format {manifest.get('format')}, expected {CORPUS_FORMAT}"
            )
        return cls(Path(root), manifest)

    @staticmethod
    def exists(root: str | Path) -> bool:
        return (Path(root) / MANIFEST).is_file()

    def count(self, split: str) -> int:
        return manifest_count(self.manifest, split)

    def files(self, split: str) -> list[str]:
        return [str(self.root / s["file"]) for s in self.manifest["shards"].get(split, [])]

    @property
    def takes(self) -> list[dict[str, Any]]:
        return self.manifest["takes"]

    def _parse(self, record: tf.Tensor) -> dict[str, tf.Tensor]:
        f = tf.io.parse_single_example(record, _FEATURES)
        s = self.size_px
        label = tf.ensure_shape(tf.io.decode_png(f["label"], channels=3), (s, s, 3))
        frame = tf.ensure_shape(tf.io.decode_jpeg(f["frame"], channels=3), (s, s, 3))
        return {
            "label": label,
            "frame": frame,
            "pose": tf.reshape(f["pose"], (sk.NUM_JOINTS, 3)),
            "take": f["take"],
            "index": f["index"],
        }

    def _records(self, split: str) -> tf.data.Dataset:
        return tf.data.TFRecordDataset(self.files(split))

    def verify(self) -> None:
        """Read and decode every record once; raise TrainingFailed naming a corrupt shard."""
        for split in SPLITS:
            for shard in self.manifest["shards"].get(split, []):
                path = self.root / shard["file"]
                if not path.is_file():
                    raise TrainingFailed(f"corpus shard {shard['file']} is missing")
                ds = tf.data.TFRecordDataset(str(path)).map(
                    self._parse, num_parallel_calls=tf.data.AUTOTUNE
                )
                try:
                    n = int(ds.reduce(np.int64(0), lambda c, _: c + 1))
                except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
                    raise TrainingFailed(
                        f"corpus shard {shard['file']} is corrupt ({_first_line(e.message)})"
                    ) from e
                if n != shard["records"]:
                    raise TrainingFailed(
                        f"corpus shard {shard['file']} holds {n} records, the manifest says "
                        f"{shard['records']} (truncated?)"
                    )

    def dataset(self, batch: int, *, seed: int = 0, cache: bool = True) -> tf.data.Dataset:
        """Endless shuffled batches of (label, frame), float32 in [-1, 1], prefetched.

        Without tf.data's autotuner: dropping an iterator whose autotuner was busy
        blocked for 2.2 s in about a third of 15 s runs here, and for 19 s in a job while
        other work shared the cores (never in 40 runs with it off), time the job's budget
        paid for nothing. The pipeline is a cached cast, so fixed parallelism loses nothing.
        """
        files = self.files("train")
        if not files:
            raise TrainingFailed("the corpus has no training frames")
        ds = tf.data.TFRecordDataset(files, num_parallel_reads=min(4, len(files)))
        ds = ds.map(
            lambda r: (lambda e: (e["label"], e["frame"]))(self._parse(r)),
            num_parallel_calls=DATASET_THREADS,
        )
        if cache:
            # uint8 before the float cast: a quarter of the memory of cached floats.
            ds = ds.cache()
        ds = ds.shuffle(min(self.count("train"), 2048), seed=seed, reshuffle_each_iteration=True)
        ds = ds.repeat()
        ds = ds.map(
            lambda label, frame: (_to_unit(label), _to_unit(frame)),
            num_parallel_calls=DATASET_THREADS,
        )
        options = tf.data.Options()
        options.autotune.enabled = False
        ds = ds.batch(batch, drop_remainder=True).prefetch(PREFETCH_BATCHES)
        return ds.with_options(options)

    def metadata(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(poses, takes, indices) of every record of a split, without decoding images."""
        files = self.files(split)
        poses = [np.zeros((0, sk.NUM_JOINTS, 3), np.float32)]
        takes, indices = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        if files:
            ds = tf.data.TFRecordDataset(files).map(
                lambda r: tf.io.parse_single_example(
                    r, {k: _FEATURES[k] for k in ("pose", "take", "index")}
                ),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
            try:
                for m in ds.batch(512).as_numpy_iterator():
                    poses.append(m["pose"].reshape(-1, sk.NUM_JOINTS, 3))
                    takes.append(m["take"])
                    indices.append(m["index"])
            except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
                raise TrainingFailed(
                    f"corpus split {split} is corrupt ({_first_line(e.message)})"
                ) from e
        return np.concatenate(poses), np.concatenate(takes), np.concatenate(indices)

    def examples(
        self,
        split: str,
        keep: np.ndarray | Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> Examples:
        """Decode a split into memory, in file order.

        ``keep`` selects records: a boolean array, or a function of the split's poses
        returning one (poses are read first, so picking a few frames of a large split
        decodes only those).
        """
        poses, takes, indices = self.metadata(split)
        if keep is None:
            sel = np.ones(len(poses), bool)
        else:
            sel = np.asarray(keep(poses) if callable(keep) else keep, bool)
        s = self.size_px
        labels = [np.zeros((0, s, s, 3), np.uint8)]
        frames = [np.zeros((0, s, s, 3), np.uint8)]
        if sel.any():
            wanted = tf.constant(sel)
            ds = (
                tf.data.TFRecordDataset(self.files(split))
                .enumerate()
                .filter(lambda i, _: tf.gather(wanted, i))
                .map(lambda _, r: self._parse(r), num_parallel_calls=tf.data.AUTOTUNE)
            )
            try:
                for e in ds.batch(128).as_numpy_iterator():
                    labels.append(e["label"])
                    frames.append(e["frame"])
            except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
                raise TrainingFailed(
                    f"corpus split {split} is corrupt ({_first_line(e.message)})"
                ) from e
        return Examples(
            np.concatenate(labels), np.concatenate(frames), poses[sel], takes[sel], indices[sel]
        )


def _to_unit(x: tf.Tensor) -> tf.Tensor:
    return tf.cast(x, tf.float32) / 127.5 - 1.0


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0][:200] if msg else "unknown error"


# ---- blob store mirroring -----------------------------------------------------------------


def _index_last(name: str, record: str | None = None) -> tuple[int, str]:
    """Sort key moving the indexes (``corpus.json``, a checkpoint tree's ``checkpoint``)
    after the files they name, and ``record`` after both."""
    return (2 if name == record else 1 if Path(name).name in ("checkpoint", MANIFEST) else 0), name


def mirror_to_store(
    local: Path,
    store,
    prefix: str,
    *,
    only: Iterable[str] | None = None,
    record: str | None = None,
) -> int:
    """Upload files under ``local`` to ``prefix/``; remove keys whose local file is gone.

    ``only`` limits the upload to those relative names (already-uploaded, unchanged
    checkpoint shards are not sent again). ``record`` (a relative name) goes up
    last, after the index files: the record that describes the checkpoints (a
    job's ``state.json``) must never name one the store does not hold yet.
    Returns the number of files uploaded.
    """
    prefix = prefix.rstrip("/")
    names = sorted(
        str(p.relative_to(local))
        for p in local.rglob("*")
        if p.is_file() and not p.name.endswith(".tmp")
    )
    want = set(names if only is None else only)
    sent = 0

    # Data before index, index before record: a reader that sees the new `checkpoint`
    # index (``ckpt/checkpoint`` in a job's checkpoint tree) finds its files, and one that
    # sees the new record finds its checkpoints, even if the writer is killed midway.
    for name in sorted(want & set(names), key=lambda n: _index_last(n, record)):
        store.put_file(f"{prefix}/{name}", str(local / name))
        sent += 1
    for key in list(store.list(prefix + "/")):
        if key[len(prefix) + 1 :] not in names:
            store.delete(key)
    return sent


def mirror_from_store(store, prefix: str, local: Path) -> int:
    """Download every object under ``prefix/`` into ``local``; returns the count.

    Indexes last (``corpus.json``, a checkpoint tree's ``checkpoint``), as they were
    uploaded: a download killed midway must not leave an index naming files that are
    not there, which the next attempt would take for a corrupt corpus.
    """
    prefix = prefix.rstrip("/")
    local.mkdir(parents=True, exist_ok=True)
    n = 0
    for key in sorted(store.list(prefix + "/"), key=_index_last):
        dest = local / key[len(prefix) + 1 :]
        dest.parent.mkdir(parents=True, exist_ok=True)
        store.download(key, str(dest))
        n += 1
    return n
