"""Reference dances: processed ahead of time, reviewed, corrected by hand, versioned.

The worst glitches in a rendered video come from bad poses in the *reference*,
so each reference video goes through the CPU pose backend frame by frame, the
offline two-sided smoother and its glitch flags, and a QA report staff review
before the dance is used (``booth reference add`` / ``show`` / ``correct``).

Library layout in the blob store (never overwritten; a correction is a new version)::

    references/<key>/source-v<version>.<ext> the video ``add`` processed (corrected
                                             versions point to their parent's)
    references/<key>/v<version>/poses.npz    poses (N,23,3) smoothed and corrected,
                                             raw (N,23,3) as detected, flagged (N,),
                                             frame_index (N,) into the source video,
                                             masks (N,h,w) person masks (parts label maps)
    references/<key>/v<version>/thumbnail.jpg
    references/<key>/v<version>/corrections.yaml   (versions made by ``correct``)
    references/<key>/v<version>/qa/trajectories.png, flagged.jpg, summary.json,
                                  summary.txt, corrections-template.yaml
    references/<key>/v<version>/meta.json    written last: a version exists once it has one
    references/<key>/v<version>/claim.json   written first: the number is taken (``create``)

Synthetic dances are built in (``synthetic:<dance>``, e.g. ``synthetic:warmup``):
the synthetic booth renders a reference dancer with exact ground-truth keypoints,
so the demo works offline without any video. They are materialised into the
library the first time they are used, like any other reference.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cloud_trainer import corrections as corr
from cloud_trainer import labelmap
from cloud_trainer.storage.base import BlobNotFound
from edge_agent import skeleton as sk
from edge_agent.errors import BadInput, BoothError

log = logging.getLogger(__name__)

PREFIX = "references"
SYNTHETIC = "synthetic:"
# Shown on the tablet even before first use; any dance Dance.parse accepts also works.
BUILTIN_DANCES: tuple[str, ...] = ("warmup", "wave+squat", "disco+march", "step+turn")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_VERSION_RE = re.compile(r"/v(\d+)/meta\.json$")
_VERSION_DIR_RE = re.compile(r"^v(\d+)/")
# Person masks are kept at this longest side: enough for 256 px label maps, and
# they compress to a few hundred bytes per frame.
MASK_MAX_PX = 256
THUMBNAIL_PX = 160
CONTACT_SHEET_MAX = 48
# A reference shorter than this is a clip, not a dance to render an attendee into.
MIN_REFERENCE_S = 1.0
CONTACT_CELL_PX = 160
# Below this share of frames with a detected person, the video is not a usable reference.
MIN_DETECT_RATE = 0.5


class ReferenceNotFound(BoothError):
    pass


def is_synthetic(name: str) -> bool:
    return name.startswith(SYNTHETIC)


def storage_key(name: str) -> str:
    """The blob-store directory of a reference name (names with ':' or '+' are not keys)."""
    if is_synthetic(name):
        spec = name[len(SYNTHETIC) :]
        if not re.fullmatch(r"[a-z0-9]+(\+[a-z0-9]+)*", spec):
            raise BadInput(f"invalid synthetic dance {spec!r} (e.g. synthetic:warmup, synthetic:7)")
        # '.' never occurs in staff-chosen names, so the two namespaces cannot collide.
        return "synthetic." + spec.replace("+", "_")
    if not _NAME_RE.fullmatch(name):
        raise BadInput(
            f"invalid reference name {name!r}: use lower-case letters, digits, '-' and '_' "
            "(at most 63), starting with a letter or digit"
        )
    return name


def _name_from_key(key: str) -> str:
    if key.startswith("synthetic."):
        return SYNTHETIC + key[len("synthetic.") :].replace("_", "+")
    return key


@dataclass
class ReferenceDance:
    name: str
    version: int
    poses: np.ndarray  # (N, 23, 3) float32, reference-frame pixels: what gets rendered
    raw: np.ndarray  # (N, 23, 3) float32 as the pose model saw it
    flagged: np.ndarray  # (N,) bool: glitch or no detection, not yet corrected
    frame_index: np.ndarray  # (N,) int: frame of the source video
    masks: np.ndarray | None  # (N, h, w) bool person masks, or None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return float(self.meta["fps"])

    @property
    def frame_size(self) -> tuple[int, int]:
        return int(self.meta["width"]), int(self.meta["height"])

    def __len__(self) -> int:
        return len(self.poses)

    @property
    def status(self) -> str:
        n = int(self.flagged.sum())
        return "ready" if n == 0 else f"needs review: {n} flagged frame{'s' * (n != 1)}"

    def framing(self) -> labelmap.Framing:
        """The square box around the reference dancer (for side-by-side panels)."""
        return labelmap.Framing.from_poses(self.poses, *self.frame_size)

    def full_frame_mask(self, i: int) -> np.ndarray:
        """Frame ``i``'s person mask at the reference's full frame size."""
        if self.masks is None:
            raise BadInput(f"reference {self.name} has no person masks")
        w, h = self.frame_size
        return cv2.resize(self.masks[i].astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)


@dataclass
class SyntheticSettings:
    """How built-in synthetic references are rendered."""

    fps: float = 30.0
    seconds: float = 15.0
    size: tuple[int, int] = (640, 480)
    viewpoint: int = 0
    dancer_seed: int = 0  # the reference dancer's looks


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise BoothError("could not encode a JPEG")
    return buf.tobytes()


def _small_mask(mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    if mask is None:
        return np.zeros(shape, dtype=bool)
    return (
        cv2.resize(
            np.asarray(mask, dtype=np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_AREA
        )
        >= 0.5
    )


def _mask_shape(w: int, h: int) -> tuple[int, int]:
    k = min(1.0, MASK_MAX_PX / max(w, h))
    return max(1, round(h * k)), max(1, round(w * k))


# ---- reading videos ------------------------------------------------------------------


@dataclass
class _VideoInfo:
    fps: float
    width: int  # as a player shows it (after the rotation a phone records)
    height: int


def _open_video(path: Path) -> Any:
    """The PyAV container of a video file, or BadInput saying why it is not one."""
    import av

    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise BadInput(f"{path} is not a video (FFmpeg: {e.strerror or e})") from None
    if not container.streams.video:
        container.close()
        raise BadInput(f"{path} has no video stream")
    return container


def mean_rate(times: list[float | None], declared: float) -> float:
    """Frames per second over the whole video, from the frames' own times.

    A phone or a WebM file may have a variable frame rate, and the container's average
    (WebM: of its first frames) is then not the video's: rendered at it, the dance ran
    fast or slow against its music. ``declared`` stands when the times are missing or
    agree with it within 1%.
    """
    if len(times) < 2 or any(t is None for t in times):
        return declared
    span = float(times[-1]) - float(times[0])
    if span <= 0:
        return declared
    measured = (len(times) - 1) / span
    return declared if abs(measured - declared) <= 0.01 * declared else measured


def _video_info(path: Path) -> _VideoInfo:
    """Frame rate and the size a player shows (the first frame says the rotation)."""
    import av

    from edge_agent.frames import quarter_turns

    container = _open_video(path)
    try:
        v = container.streams.video[0]
        rate = v.average_rate or v.guessed_rate
        fps = float(rate) if rate else 30.0
        width, height = v.codec_context.width, v.codec_context.height
        try:
            first = next(container.decode(video=0), None)
        except av.error.FFmpegError:
            first = None  # _decode reports a damaged file with its error
    finally:
        container.close()
    if first is not None and quarter_turns(first) % 2:
        width, height = height, width
    return _VideoInfo(fps, width, height)


def _decode(path: Path, times: list[float | None] | None = None) -> Iterator[np.ndarray]:
    """The frames, upright; each one's presentation time (s) goes into ``times`` if given."""
    import av

    from edge_agent.frames import upright

    container = _open_video(path)
    try:
        for frame in container.decode(video=0):
            if times is not None:
                times.append(frame.time)
            yield upright(frame)
    except av.error.FFmpegError as e:
        raise BadInput(f"{path} is damaged: decoding stopped at an error ({e})") from None
    finally:
        container.close()


# ---- QA report ---------------------------------------------------------------------------


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i in np.flatnonzero(mask).tolist():
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


_PANEL = (240, 120)  # width, height of one joint's plot
_X_COLOR, _Y_COLOR = (60, 130, 255), (255, 150, 40)


# Smaller ranges are padded to this: 2 px of jitter must not fill a panel like a glitch.
_MIN_SPAN_PX = 24.0


def _plot_line(
    img: np.ndarray,
    t_px: np.ndarray,
    v: np.ndarray,
    lo: float,
    hi: float,
    box: tuple[int, int, int, int],
    color: tuple[int, int, int],
    *,
    dots: bool,
    down: bool,
) -> None:
    x0, y0, w, h = box
    span = hi - lo
    frac = (v - lo) / span
    # Image y grows downwards: plot it that way so the panel reads like the video.
    ys = y0 + (frac if down else 1 - frac) * (h - 1)
    ok = np.isfinite(ys)
    pts = np.stack([t_px, ys], axis=1)
    if dots:
        for px, py in pts[ok].astype(int):
            cv2.circle(img, (int(px), int(py)), 1, color, -1)
        return
    for a, b in _runs(ok):  # break the line where the joint is missing
        seg = np.round(pts[a : b + 1] * 16).astype(np.int32)
        cv2.polylines(img, [seg], False, color, 1, cv2.LINE_AA, 4)


def trajectories_png(ref: ReferenceDance, corrected: np.ndarray | None = None) -> bytes:
    """x (blue) and y (orange) over time for every joint; flagged frames red, corrected green.

    Drawn with OpenCV: matplotlib spent seconds laying out 23 panels of tick labels.
    """
    pw, ph = _PANEL
    cols, rows = 4, 6
    img = np.full((rows * ph, cols * pw, 3), 250, np.uint8)
    n = len(ref)
    for j, name in enumerate([*sk.JOINTS, None]):
        r, c = divmod(j, cols)
        box = (c * pw + 6, r * ph + 18, pw - 12, ph - 24)
        x0, y0, w, h = box
        if name is None:
            lines = [
                f"{ref.name} v{ref.version}",
                f"{n} frames @ {ref.fps:g} fps",
                "blue: x   orange: y (down = lower)",
                "dots: as detected",
                "lines: smoothed/corrected",
                "red: flagged   green: corrected",
            ]
            for k, text in enumerate(lines):
                cv2.putText(
                    img,
                    text,
                    (x0, y0 + 4 + 15 * k),
                    cv2.FONT_HERSHEY_SIMPLEX,
                    0.4,
                    (0, 0, 0),
                    1,
                    cv2.LINE_AA,
                )
            continue
        cv2.rectangle(img, (x0, y0), (x0 + w - 1, y0 + h - 1), (255, 255, 255), -1)
        t_px = x0 + (np.arange(n) + 0.5) * (w / max(n, 1))
        for mask, color in ((ref.flagged, (255, 170, 170)), (corrected, (170, 230, 170))):
            if mask is None:
                continue
            for a, b in _runs(mask):
                xa, xb = int(x0 + a * w / n), int(np.ceil(x0 + (b + 1) * w / n))
                cv2.rectangle(img, (xa, y0), (max(xa, xb - 1), y0 + h - 1), color, -1)
        cv2.rectangle(img, (x0, y0), (x0 + w - 1, y0 + h - 1), (180, 180, 180), 1)
        present = ref.poses[:, j, 2] > 0
        raw_present = ref.raw[:, j, 2] > 0
        label = name
        for ch, color in ((0, _X_COLOR), (1, _Y_COLOR)):
            smooth = np.where(present, ref.poses[:, j, ch], np.nan)
            raw = np.where(raw_present, ref.raw[:, j, ch], np.nan)
            both = np.concatenate([smooth[np.isfinite(smooth)], raw[np.isfinite(raw)]])
            if both.size == 0:
                continue
            lo, hi = float(both.min()), float(both.max())
            label += f"  {'xy'[ch]} {lo:.0f}..{hi:.0f}"
            pad = max(0.0, _MIN_SPAN_PX - (hi - lo)) / 2
            lo, hi = lo - pad, hi + pad
            light = tuple(int(v + (255 - v) * 0.45) for v in color)
            _plot_line(img, t_px, raw, lo, hi, box, light, dots=True, down=ch == 1)
            _plot_line(img, t_px, smooth, lo, hi, box, color, dots=False, down=ch == 1)
        cv2.putText(
            img, label, (x0, y0 - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (0, 0, 0), 1, cv2.LINE_AA
        )
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    if not ok:
        raise BoothError("could not encode the trajectories PNG")
    return buf.tobytes()


def _draw_skeleton(img: np.ndarray, skel: np.ndarray, color: tuple[int, int, int]) -> None:
    present = skel[:, 2] > 0
    pts = np.round(skel[:, :2] * 16).astype(np.int64)
    for a, b in sk.LIMB_INDEX:
        if present[a] and present[b]:
            cv2.line(img, tuple(pts[a]), tuple(pts[b]), color, 1, cv2.LINE_AA, 4)


def contact_sheet(
    frames: dict[int, np.ndarray], ref: ReferenceDance, indices: list[int]
) -> np.ndarray:
    """A grid of flagged frames cropped to the dancer: detected pose red, smoothed green."""
    cell = CONTACT_CELL_PX
    font = cv2.FONT_HERSHEY_SIMPLEX
    if not indices:
        img = np.full((cell // 2, cell * 3, 3), 40, np.uint8)
        cv2.putText(img, "no flagged frames", (10, cell // 4 + 6), font, 0.7, (255, 255, 255), 1)
        return img
    cols = min(8, len(indices))
    rows = -(-len(indices) // cols)
    w, h = ref.frame_size
    sheet = np.full((rows * (cell + 18), cols * cell, 3), 30, np.uint8)
    for n, i in enumerate(indices):
        r, c = divmod(n, cols)
        both = np.stack([ref.raw[i], ref.poses[i]])
        try:
            framing = labelmap.Framing.from_poses(both, w, h)
        except ValueError:  # nothing detected at all: show the whole frame
            framing = labelmap.Framing.whole_frame(w, h)
        src = frames.get(int(ref.frame_index[i]))
        tile = framing.crop(src, cell) if src is not None else np.zeros((cell, cell, 3), np.uint8)
        _draw_skeleton(tile, framing.to_crop(ref.raw[i], cell), (255, 40, 40))
        _draw_skeleton(tile, framing.to_crop(ref.poses[i], cell), (40, 255, 40))
        y0, x0 = r * (cell + 18), c * cell
        sheet[y0 + 18 : y0 + 18 + cell, x0 : x0 + cell] = tile
        cv2.putText(sheet, f"frame {i}", (x0 + 4, y0 + 13), font, 0.45, (255, 255, 255), 1)
    return sheet


def summary(ref: ReferenceDance) -> dict[str, Any]:
    m = ref.meta
    return {
        "name": ref.name,
        "version": ref.version,
        "status": ref.status,
        "frames": len(ref),
        "fps": ref.fps,
        "width": m["width"],
        "height": m["height"],
        "source": m.get("source"),
        "detect_rate": m.get("detect_rate"),
        "flagged": int(ref.flagged.sum()),
        "flagged_frames": [list(r) for r in _runs(ref.flagged)],
        "corrected_frames": m.get("corrected_frames", 0),
        "parent_version": m.get("parent_version"),
        "created_at": m.get("created_at"),
    }


def summary_text(s: dict[str, Any]) -> str:
    runs = ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in s["flagged_frames"]) or "none"
    rate = s["detect_rate"]
    lines = [
        f"reference   {s['name']} v{s['version']}",
        f"status      {s['status']}",
        f"source      {s['source']}",
        f"frames      {s['frames']} @ {s['fps']:g} fps, {s['width']}x{s['height']}",
        f"detected    {'-' if rate is None else f'{rate:.1%}'} of frames",
        f"flagged     {s['flagged']} ({runs})",
    ]
    if s.get("parent_version"):
        lines.append(f"corrected   {s['corrected_frames']} frames, from v{s['parent_version']}")
    return "\n".join(lines) + "\n"


# ---- the library -----------------------------------------------------------------------------


class ReferenceLibrary:
    """The versioned reference dances in one blob store."""

    def __init__(
        self,
        store: Any,
        *,
        pose_cfg: Any = None,  # edge_agent.config.CpuPose; the default loads models/ lazily
        smoothing: Any = None,  # edge_agent.config.SmoothingConfig
        synthetic: SyntheticSettings | None = None,
        min_detect_rate: float = MIN_DETECT_RATE,
    ):
        self.store = store
        self.pose_cfg = pose_cfg
        self.smoothing = smoothing
        self.synthetic = synthetic or SyntheticSettings()
        self.min_detect_rate = min_detect_rate
        self._thumbs: dict[str, str] = {}

    # ---- reading ----

    def _dir(self, name: str, version: int) -> str:
        return f"{PREFIX}/{storage_key(name)}/v{version}"

    def versions(self, name: str) -> list[int]:
        prefix = f"{PREFIX}/{storage_key(name)}/"
        out = []
        for key in self.store.list(prefix):
            m = _VERSION_RE.search(key)
            if m and key.count("/") == 3:
                out.append(int(m.group(1)))
        return sorted(out)

    def _new_version(self, name: str) -> int:
        """The next version number of ``name``, reserved for this caller.

        Two writers (staff correcting one dance twice at once, two workers building a
        synthetic dance on first use) would both read the latest version and write v+1
        over each other, leaving one version made of both. Each reserves its number with
        the store's ``create``, which exactly one of them wins; the other takes the next.
        A number whose writer died before its meta.json stays taken, never reused.
        """
        prefix = f"{PREFIX}/{storage_key(name)}/"
        taken = [
            int(m.group(1))
            for key in self.store.list(prefix)
            if (m := _VERSION_DIR_RE.match(key[len(prefix) :]))
        ]
        version = max(taken, default=0) + 1
        claim = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "at": time.time()})
        while not self.store.create(f"{prefix}v{version}/claim.json", claim.encode()):
            version += 1
        return version

    def names(self) -> list[str]:
        found = set()
        for key in self.store.list(f"{PREFIX}/"):
            parts = key.split("/")
            if len(parts) == 4 and _VERSION_RE.search(key):
                found.add(_name_from_key(parts[1]))
        return sorted(found)

    def exists(self, name: str) -> bool:
        return bool(self.versions(name))

    def get(self, name: str, version: int | None = None) -> ReferenceDance:
        """A reference (latest version by default); synthetic ones are built on first use."""
        versions = self.versions(name)
        if not versions and is_synthetic(name):
            self.add_synthetic(name)
            versions = self.versions(name)
        if not versions:
            raise ReferenceNotFound(
                f"no reference named {name!r} (add one with `booth reference add VIDEO --name "
                f"{name}`; built-in: {', '.join(SYNTHETIC + d for d in BUILTIN_DANCES)})"
            )
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise ReferenceNotFound(
                f"reference {name} has no v{version} (versions: {', '.join(map(str, versions))})"
            )
        d = self._dir(name, version)
        meta = json.loads(self.store.get(f"{d}/meta.json"))
        with np.load(io.BytesIO(self.store.get(f"{d}/poses.npz"))) as z:
            masks = z["masks"] if "masks" in z.files else None
            return ReferenceDance(
                name=name,
                version=version,
                poses=z["poses"].astype(np.float32),
                raw=z["raw"].astype(np.float32),
                flagged=z["flagged"].astype(bool),
                frame_index=z["frame_index"].astype(np.int64),
                masks=None if masks is None else masks.astype(bool),
                meta=meta,
            )

    def source_frames(self, ref: ReferenceDance) -> Iterator[np.ndarray]:
        """The reference dancer's RGB frames, one per pose (for the side-by-side video)."""
        from cloud_trainer.render import iter_decoded

        with self.source_file(ref) as path:
            yield from iter_decoded(path, ref.frame_index.tolist())

    def status(self, name: str) -> dict[str, Any]:
        ref = self.get(name)
        s = summary(ref)
        s["versions"] = self.versions(name)
        d = self._dir(name, ref.version)
        s["qa"] = {k: f"{d}/qa/{k}" for k in ("trajectories.png", "flagged.jpg", "summary.txt")}
        return s

    def remove(self, name: str) -> int:
        """Delete every version of reference ``name``, its source video included; how many
        objects went. A real dancer's video must not be kept for ever for want of a way out."""
        if not self.versions(name):
            raise ReferenceNotFound(f"no reference named {name!r}")
        # The meta files first: a reader then no longer sees the versions whose files go.
        prefix = f"{PREFIX}/{storage_key(name)}/"
        for key in [k for k in self.store.list(prefix) if k.endswith("/meta.json")]:
            self.store.delete(key)
        n = self.store.delete_prefix(prefix)
        self._thumbs.clear()
        log.info("reference %s removed (%d objects)", name, n)
        return n

    def catalogue(self) -> list[dict[str, Any]]:
        """What staff can pick on the tablet: stored references, then the built-in dances."""
        out = []
        stored = self.names()
        for name in stored:
            latest = self.versions(name)[-1]
            thumb_key = f"{self._dir(name, latest)}/thumbnail.jpg"
            if thumb_key not in self._thumbs and self.store.exists(thumb_key):
                b64 = base64.b64encode(self.store.get(thumb_key)).decode()
                self._thumbs[thumb_key] = f"data:image/jpeg;base64,{b64}"
            try:
                meta = json.loads(self.store.get(f"{self._dir(name, latest)}/meta.json"))
            except (BlobNotFound, ValueError):
                meta = {}
            out.append(
                {
                    "name": name,
                    "title": title(name),
                    "version": latest,
                    "thumbnail_url": self._thumbs.get(thumb_key),
                    "flagged": int(meta.get("flagged") or 0),
                }
            )
        for dance in BUILTIN_DANCES:
            if SYNTHETIC + dance not in stored:
                out.append(
                    {
                        "name": SYNTHETIC + dance,
                        "title": title(SYNTHETIC + dance),
                        "version": None,
                        "thumbnail_url": None,
                        "flagged": 0,
                    }
                )
        return out

    # ---- writing ----

    def _write_version(
        self,
        ref: ReferenceDance,
        frames: dict[int, np.ndarray],
        thumbnail: np.ndarray | None,
        corrected: np.ndarray | None = None,
        corrections_text: str | None = None,
    ) -> None:
        d = self._dir(ref.name, ref.version)
        arrays = {
            "poses": ref.poses.astype(np.float32),
            "raw": ref.raw.astype(np.float32),
            "flagged": ref.flagged.astype(bool),
            "frame_index": ref.frame_index.astype(np.int64),
        }
        if ref.masks is not None:
            arrays["masks"] = ref.masks.astype(bool)
        self.store.put(f"{d}/poses.npz", _npz_bytes(**arrays), "application/octet-stream")
        if thumbnail is not None:
            self.store.put(f"{d}/thumbnail.jpg", _jpeg(thumbnail), "image/jpeg")
        if corrections_text is not None:
            self.store.put(f"{d}/corrections.yaml", corrections_text.encode(), "text/yaml")
        self.store.put(f"{d}/qa/trajectories.png", trajectories_png(ref, corrected), "image/png")
        flagged = _sheet_frames(ref.flagged).tolist()
        self.store.put(
            f"{d}/qa/flagged.jpg", _jpeg(contact_sheet(frames, ref, flagged)), "image/jpeg"
        )
        s = summary(ref)
        self.store.put(f"{d}/qa/summary.json", json.dumps(s, indent=2).encode(), "application/json")
        self.store.put(f"{d}/qa/summary.txt", summary_text(s).encode(), "text/plain")
        self.store.put(
            f"{d}/qa/corrections-template.yaml",
            corr.template(ref.flagged, name=ref.name, version=ref.version).encode(),
            "text/yaml",
        )
        # Last: the version exists for readers only once everything above is in place.
        self.store.put(
            f"{d}/meta.json", json.dumps(ref.meta, indent=2).encode(), "application/json"
        )
        log.info("reference %s v%d stored (%s)", ref.name, ref.version, ref.status)

    def _thumbnail(self, rgb: np.ndarray, poses: np.ndarray, w: int, h: int) -> np.ndarray:
        try:
            framing = labelmap.Framing.from_poses(poses, w, h)
            return framing.crop(rgb, THUMBNAIL_PX)
        except ValueError:
            k = THUMBNAIL_PX / max(w, h)
            return cv2.resize(rgb, (round(w * k), round(h * k)), interpolation=cv2.INTER_AREA)

    def add(
        self,
        video: str | Path,
        name: str,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> ReferenceDance:
        """Process a video into a new version of reference ``name`` (v1 if new)."""
        from edge_agent.config import CpuPose, SmoothingConfig
        from edge_agent.pose.base import create_pose_backend
        from edge_agent.smoothing import smooth_offline

        if is_synthetic(name):
            raise BadInput(f"{name!r} is a built-in name; pick another name for a video reference")
        storage_key(name)
        path = Path(video)
        info = _video_info(path)  # a file that is not a video fails here, early
        cfg = self.pose_cfg or CpuPose(mode="tracking", segmentation=True)
        backend = create_pose_backend(cfg)
        mshape = _mask_shape(info.width, info.height)
        raw, detected, masks = [], [], []
        times: list[float | None] = []
        try:
            for i, rgb in enumerate(_decode(path, times)):
                result = backend.estimate(rgb)
                raw.append(result.skeleton if result.detected else sk.empty())
                detected.append(bool(result.detected))
                masks.append(_small_mask(result.mask if result.detected else None, mshape))
                if progress is not None:
                    progress(i + 1)
        finally:
            backend.close()
        n = len(raw)
        fps = mean_rate(times, info.fps)
        if fps != info.fps:
            log.warning(
                "%s: variable frame rate; %.3f fps over the whole video (the file says %.3f)",
                path,
                fps,
                info.fps,
            )
            info = _VideoInfo(fps, info.width, info.height)
        if n < 2 or n / info.fps < MIN_REFERENCE_S:
            raise BadInput(
                f"{path} has {n} frame{'s' * (n != 1)} ({n / info.fps:.2f} s): not a video of "
                f"a dance (at least {MIN_REFERENCE_S:g} s)"
            )
        det = np.array(detected)
        rate = float(det.mean())
        if rate == 0:
            raise BadInput(
                f"no person found in {path}: the pose model detected nobody in any of its {n} frames"
            )
        if rate < self.min_detect_rate:
            raise BadInput(
                f"a person is visible in only {rate:.0%} of {path}'s {n} frames "
                f"(at least {self.min_detect_rate:.0%} needed): trim the video to the dance"
            )
        raw_arr = np.stack(raw).astype(np.float32)
        smoothed = smooth_offline(raw_arr, info.fps, self.smoothing or SmoothingConfig())
        _check_usable(smoothed.skeletons, str(path))
        flagged = smoothed.glitch | ~det
        version = self._new_version(name)
        key = storage_key(name)
        source_key = f"{PREFIX}/{key}/source-v{version}{path.suffix.lower() or '.mp4'}"
        self.store.put_file(source_key, str(path), "video/mp4")
        ref = ReferenceDance(
            name=name,
            version=version,
            poses=smoothed.skeletons.astype(np.float32),
            raw=raw_arr,
            flagged=flagged,
            frame_index=np.arange(n),
            masks=np.stack(masks),
            meta={
                "name": name,
                "version": version,
                "fps": info.fps,
                "width": info.width,
                "height": info.height,
                "frames": n,
                "source": f"video:{path.name}",
                "source_key": source_key,
                "detect_rate": rate,
                "flagged": int(flagged.sum()),
                "glitch_reasons": {str(i): list(r) for i, r in enumerate(smoothed.reasons) if r},
                "parent_version": None,
                "corrected_frames": 0,
                "created_at": time.time(),
            },
        )
        self._write_version(ref, self._flagged_frames(path, ref), self._thumbnail_from(path, ref))
        return ref

    @staticmethod
    def _flagged_frames(path: Path, ref: ReferenceDance) -> dict[int, np.ndarray]:
        """Source frames of the flagged poses (a second decode pass: flags come after smoothing)."""
        from cloud_trainer.render import iter_decoded

        # Only the frames the contact sheet shows: a long reference's flagged frames, all
        # decoded at full size, ran to gigabytes.
        wanted = sorted({int(ref.frame_index[i]) for i in _sheet_frames(ref.flagged)})
        if not wanted:
            return {}
        return dict(zip(wanted, iter_decoded(path, wanted), strict=False))

    def _thumbnail_from(self, path: Path, ref: ReferenceDance) -> np.ndarray | None:
        from cloud_trainer.render import iter_decoded

        mid = len(ref) // 2
        rgb = next(iter_decoded(path, [int(ref.frame_index[mid])]), None)
        if rgb is None:
            return None
        return self._thumbnail(rgb, ref.poses, *ref.frame_size)

    @contextlib.contextmanager
    def source_file(
        self, ref: ReferenceDance, scratch_dir: str | Path | None = None
    ) -> Iterator[Path]:
        """The reference's source video as a local file, for as long as the block runs.

        ``scratch_dir``: where to put it (a job's work directory, on the disk sized for
        jobs) instead of the system's temporary directory, often a small tmpfs.
        """
        key = ref.meta["source_key"]
        with tempfile.TemporaryDirectory(prefix="booth-ref-", dir=scratch_dir) as tmp:
            path = Path(tmp) / Path(key).name
            self.store.download(key, str(path))
            yield path

    def add_synthetic(self, name: str) -> ReferenceDance:
        """Render a built-in dance with the synthetic booth (ground truth: nothing flagged)."""
        from cloud_trainer.render import H264Writer
        from edge_agent.synth.appearance import Attendee
        from edge_agent.synth.choreography import Dance
        from edge_agent.synth.render import render

        if not is_synthetic(name):
            raise BadInput(f"{name!r} is not a synthetic reference (synthetic:<dance>)")
        spec = name[len(SYNTHETIC) :]
        try:
            dance = Dance.parse(spec)
        except ValueError as e:
            raise BadInput(f"unknown synthetic dance {spec!r}: {e}") from None
        s = self.synthetic
        dancer = Attendee.from_seed(s.dancer_seed)
        w, h = s.size
        mshape = _mask_shape(w, h)
        poses, masks = [], []
        key = storage_key(name)
        version = self._new_version(name)
        source_key = f"{PREFIX}/{key}/source-v{version}.mp4"
        thumb_rgb = None
        body_poses = dance.poses(s.fps, s.seconds)
        with tempfile.TemporaryDirectory(prefix="booth-synth-") as tmp:
            video = Path(tmp) / "source.mp4"
            with H264Writer(video, s.fps, (w, h), crf=23) as writer:
                for i, body in enumerate(body_poses):
                    f = render(dancer, body, (w, h), s.viewpoint, i)
                    # Occluded joints keep their true position at a lower score, as a
                    # pose model reports them: the label map still draws the limb.
                    kp = np.zeros((sk.NUM_JOINTS, 3), dtype=np.float32)
                    kp[:, :2] = f.projected
                    kp[:, 2] = np.where(f.visible, 1.0, np.where(f.in_frame, 0.6, 0.0))
                    kp[kp[:, 2] == 0, :2] = 0
                    poses.append(kp)
                    masks.append(_small_mask(f.mask, mshape))
                    writer.write(f.rgb)
                    if i == len(body_poses) // 2:
                        thumb_rgb = f.rgb
            self.store.put_file(source_key, str(video), "video/mp4")
        arr = np.stack(poses)
        n = len(arr)
        ref = ReferenceDance(
            name=name,
            version=version,
            poses=arr,
            raw=arr.copy(),
            flagged=np.zeros(n, dtype=bool),
            frame_index=np.arange(n),
            masks=np.stack(masks),
            meta={
                "name": name,
                "version": version,
                "fps": s.fps,
                "width": w,
                "height": h,
                "frames": n,
                "source": f"synthetic:{spec} (dancer {s.dancer_seed}, viewpoint {s.viewpoint})",
                "source_key": source_key,
                "detect_rate": 1.0,
                "flagged": 0,
                "parent_version": None,
                "corrected_frames": 0,
                "created_at": time.time(),
            },
        )
        thumb = self._thumbnail(thumb_rgb, arr, w, h) if thumb_rgb is not None else None
        self._write_version(ref, {}, thumb)
        return ref

    def correct(self, name: str, correction_file: str | Path) -> ReferenceDance:
        """Validate a correction file against the latest version, apply it, store v+1."""
        path = Path(correction_file)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise BadInput(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"{path}: cannot read: {e}") from None
        return self.apply_corrections(name, text, source=str(path))

    def apply_corrections(
        self, name: str, text: str, *, source: str = "corrections"
    ) -> ReferenceDance:
        base = self.get(name)
        # A file made from a version's template says which: its frame numbers are that
        # version's, and a drop since then moved them (applying it twice dropped twice).
        made_for = _TEMPLATE_HEADER.search(text)
        if made_for and (made_for.group(1), int(made_for.group(2))) != (name, base.version):
            raise BadInput(
                f"{source} was made for {made_for.group(1)} v{made_for.group(2)}, but {name} is "
                f"now at v{base.version}, whose frame numbers may differ: start from "
                f"v{base.version}'s corrections-template.yaml (booth reference show {name} --qa DIR)"
            )
        c = corr.parse(text, len(base), source=source)
        poses, kept = corr.apply(base.poses, c)
        touched = corr.touched_frames(c, len(base))
        meta = dict(base.meta)
        meta.update(
            frames=len(kept),
            parent_version=base.version,
            corrected_frames=int(touched.sum()),
            created_at=time.time(),
        )
        if len(kept) / base.fps < MIN_REFERENCE_S:
            raise BadInput(
                f"{source}: the corrections leave {len(kept)} frames of {name}, under "
                f"{MIN_REFERENCE_S:g} s: drop fewer frames"
            )
        _check_usable(poses, source)
        flagged = (base.flagged & ~touched)[kept]
        meta["flagged"] = int(flagged.sum())
        version = meta["version"] = self._new_version(name)  # once the corrections are valid
        ref = ReferenceDance(
            name=name,
            version=version,
            poses=poses,
            raw=base.raw[kept],
            flagged=flagged,
            frame_index=base.frame_index[kept],
            masks=None if base.masks is None else base.masks[kept],
            meta=meta,
        )
        with self.source_file(ref) as src:
            frames = self._flagged_frames(src, ref)
        thumb_key = f"{self._dir(name, base.version)}/thumbnail.jpg"
        thumb = None
        if self.store.exists(thumb_key):
            thumb = cv2.cvtColor(
                cv2.imdecode(np.frombuffer(self.store.get(thumb_key), np.uint8), cv2.IMREAD_COLOR),
                cv2.COLOR_BGR2RGB,
            )
        self._write_version(
            ref, frames, thumb, corrected=touched[kept], corrections_text=c.to_yaml()
        )
        return ref


def _sheet_frames(flagged: np.ndarray) -> np.ndarray:
    """The flagged frames the QA contact sheet shows: all, or CONTACT_SHEET_MAX evenly spread."""
    idx = np.flatnonzero(flagged)
    if len(idx) > CONTACT_SHEET_MAX:
        idx = idx[np.linspace(0, len(idx) - 1, CONTACT_SHEET_MAX).round().astype(int)]
    return idx


# The first line of a corrections template (corrections.template).
_TEMPLATE_HEADER = re.compile(r"^# Corrections for reference '([^']+)' v(\d+)\.", re.MULTILINE)


def _check_usable(poses: np.ndarray, what: str) -> None:
    """Refuse a reference no attendee could be fitted to: normalization needs a frame with
    the head and both ankles (``normalize.fit``), and finding out after an attendee's
    whole training budget is too late."""
    from cloud_trainer.normalize import shows_whole_body

    if not shows_whole_body(poses):
        raise BadInput(
            f"{what}: no frame shows the dancer's head and both ankles, which a reference "
            "needs to be fitted to each attendee's height and floor: film the whole body"
        )


def title(name: str) -> str:
    if is_synthetic(name):
        spec = name[len(SYNTHETIC) :]
        label = f"dance #{spec}" if spec.isdigit() else spec.replace("+", " + ")
        return f"{label} (synthetic)"
    return name.replace("-", " ").replace("_", " ")
