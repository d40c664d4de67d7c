"""Write a synthetic take to disk: MJPEG-in-MP4, ground truth, contact sheet, take.json.

Files in the take directory:

- ``frames.mp4``: the JPEGs exactly as the camera would deliver them, muxed without
  re-encoding (DESIGN.md's MJPEG passthrough recipe, fragmented so a killed writer
  leaves a readable file). Packet timestamps start at 0; the take is on the exact
  ``seq / fps`` grid.
- ``truth.npz``: ``keypoints`` (N, 23, 3) float32, ``projected`` (N, 23, 2) float32
  (un-occluded positions), ``visible`` and ``in_frame`` (N, 23) bool,
  ``timestamps_ns`` (N,) int64, ``poses`` (N, 4 + angles) float64 (``BodyPose``
  vectors), ``mask_bits`` (N, H, ceil(W/8)) uint8 bit-packed person masks,
  ``shadow_bits`` likewise for the hard wall shadow, and ``parts`` (N, H, W) uint8
  part maps (``PART_NAMES``). ``read_truth`` unpacks them.
- ``contact.png``: a grid of frames with the ground-truth skeleton drawn on.
- ``take.json``: seeds and settings; the same command re-renders identical bytes.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import zipfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from edge_agent import skeleton as sk
from edge_agent.synth.appearance import Attendee
from edge_agent.synth.body import ANGLE_NAMES
from edge_agent.synth.camera import SHUTTER, encode_jpeg
from edge_agent.synth.choreography import Dance
from edge_agent.synth.render import PART_NAMES, SynthFrame, render

log = logging.getLogger(__name__)

TAKE_VERSION = 1
CONTACT_TILES = 12
_US = Fraction(1, 1_000_000)


@dataclass
class TakeSummary:
    out_dir: Path
    frames: int
    seconds: float
    fps: float
    size: tuple[int, int]
    mp4_bytes: int
    render_s: float
    hard_shadow_frames: int
    frames_without_person: int
    visible_fraction: float


class Mjpeg4Writer:
    """MJPEG passthrough into a fragmented MP4: packets in, nothing decoded or encoded."""

    def __init__(self, path: Path, size: tuple[int, int], fps: float) -> None:
        import av

        self._av = av
        self.path = Path(path)
        self._out = av.open(
            str(self.path),
            "w",
            format="mp4",
            options={
                "movflags": "empty_moov+default_base_moof",
                "frag_duration": "250000",
                "flush_packets": "1",
            },
        )
        self._stream = self._out.add_stream("mjpeg", rate=Fraction(fps).limit_denominator(1001))
        self._stream.width, self._stream.height = size
        # yuv420p fails to open: the muxer still opens an encoder (DESIGN.md).
        self._stream.pix_fmt = "yuvj420p"
        self._last_pts = -1
        self._duration = max(1, round(1e6 / fps))

    def write(self, jpeg: bytes, ts_ns: int) -> None:
        pts = round(ts_ns / 1000)
        if pts <= self._last_pts:  # a repeated dts raises; bump it
            pts = self._last_pts + 1
        packet = self._av.Packet(jpeg)
        packet.stream = self._stream
        # A constant time base on every packet: the stream's own changes after the first mux.
        packet.time_base = _US
        packet.pts = packet.dts = pts
        packet.duration = self._duration
        self._out.mux(packet)
        self._last_pts = pts

    def close(self) -> None:
        self._out.close()


def read_mp4_jpegs(path: str | Path) -> list[bytes]:
    """The JPEG packets of an MJPEG-in-MP4 file, byte for byte."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [bytes(p) for p in container.demux(stream) if p.size]


class _NpyStream:
    """Stream (N, ...) frames into one ``.npy`` entry of a zip (an ``.npz``) without holding N."""

    def __init__(self, zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype) -> None:
        self._fh = zf.open(_entry(f"{name}.npy"), "w", force_zip64=True)
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False,
            "shape": shape,
        }
        np.lib.format.write_array_header_2_0(self._fh, header)
        self._dtype = np.dtype(dtype)

    def write(self, arr: np.ndarray) -> None:
        self._fh.write(np.ascontiguousarray(arr, dtype=self._dtype).tobytes())

    def close(self) -> None:
        self._fh.close()


def _entry(name: str) -> zipfile.ZipInfo:
    """A zip entry stamped with a fixed time: the same take gives the same bytes."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def _add_array(zf: zipfile.ZipFile, name: str, arr: np.ndarray) -> None:
    with zf.open(_entry(f"{name}.npy"), "w", force_zip64=True) as fh:
        np.lib.format.write_array(fh, np.asarray(arr), allow_pickle=False)


def read_truth(path: str | Path) -> dict[str, np.ndarray]:
    """Load ``truth.npz`` with masks unpacked to (N, H, W) bool."""
    with np.load(path) as data:
        out = {k: data[k] for k in data.files}
    w = out["parts"].shape[2]
    out["mask"] = np.unpackbits(out.pop("mask_bits"), axis=-1, count=w).astype(bool)
    out["shadow"] = np.unpackbits(out.pop("shadow_bits"), axis=-1, count=w).astype(bool)
    return out


def draw_skeleton(rgb: np.ndarray, frame: SynthFrame, thickness: int = 2) -> np.ndarray:
    """The frame with its ground truth drawn on: limbs, visible joints filled, hidden hollow."""
    img = rgb.copy()
    pts = frame.projected
    for (i, j), color in zip(sk.LIMB_INDEX, sk.LIMB_COLORS, strict=True):
        if frame.in_frame[i] and frame.in_frame[j]:
            style = cv2.LINE_AA if frame.visible[i] and frame.visible[j] else cv2.LINE_4
            cv2.line(img, _ip(pts[i]), _ip(pts[j]), color, thickness, style)
    for j in range(sk.NUM_JOINTS):
        if frame.in_frame[j]:
            filled = -1 if frame.visible[j] else 1
            cv2.circle(img, _ip(pts[j]), thickness + 1, (255, 255, 255), filled, cv2.LINE_AA)
    return img


def _ip(p: np.ndarray) -> tuple[int, int]:
    return int(round(float(p[0]))), int(round(float(p[1])))


def contact_sheet(tiles: list[tuple[np.ndarray, str]], tile_w: int = 320) -> np.ndarray:
    """A grid (4 columns) of labelled RGB images scaled to ``tile_w`` wide."""
    cols = 4
    h0, w0 = tiles[0][0].shape[:2]
    tile_h = max(1, round(h0 * tile_w / w0))
    rows = -(-len(tiles) // cols)
    sheet = np.full((rows * tile_h, cols * tile_w, 3), 32, dtype=np.uint8)
    for k, (img, label) in enumerate(tiles):
        small = cv2.resize(img, (tile_w, tile_h), interpolation=cv2.INTER_AREA)
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.42, 1)
        cv2.rectangle(small, (0, 0), (tw + 10, th + 10), (20, 20, 20), -1)
        cv2.putText(
            small,
            label,
            (5, th + 4),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.42,
            (255, 255, 255),
            1,
            cv2.LINE_AA,
        )
        r, c = divmod(k, cols)
        sheet[r * tile_h : (r + 1) * tile_h, c * tile_w : (c + 1) * tile_w] = small
    return sheet


def write_take(
    out_dir: str | Path,
    *,
    attendee: int,
    dance: str | int,
    seconds: float,
    fps: float,
    size: tuple[int, int],
    viewpoint: int = 0,
    shadow: str = "auto",
    jpeg_quality: int = 85,
    motion_blur: bool = False,
    progress: bool = False,
) -> TakeSummary:
    """Render a whole take into ``out_dir`` (created if missing); see the module doc."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    person = Attendee.from_seed(attendee)
    choreo = Dance.parse(dance)
    poses = choreo.poses(fps, seconds)
    n = len(poses)
    if n == 0:
        raise ValueError(f"{seconds} s at {fps} fps is not a single frame")
    w, h = size
    moves = choreo.moves_at(fps, seconds)
    sheet_at = set(np.linspace(0, n - 1, min(CONTACT_TILES, n)).round().astype(int).tolist())

    keypoints = np.zeros((n, sk.NUM_JOINTS, 3), np.float32)
    projected = np.zeros((n, sk.NUM_JOINTS, 2), np.float32)
    visible = np.zeros((n, sk.NUM_JOINTS), bool)
    in_frame = np.zeros((n, sk.NUM_JOINTS), bool)
    mask_bits = np.zeros((n, h, (w + 7) // 8), np.uint8)
    shadow_bits = np.zeros((n, h, (w + 7) // 8), np.uint8)
    timestamps = np.array([round(i * 1e9 / fps) for i in range(n)], dtype=np.int64)
    tiles: list[tuple[np.ndarray, str]] = []

    indices = range(n)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="rendering", unit="frame", file=sys.stderr)
    t0 = time.perf_counter()
    writer = Mjpeg4Writer(out / "frames.mp4", (w, h), fps)
    # Written aside and renamed when whole: an interrupted render leaves no truth.npz
    # that loads as if it were complete.
    truth_part = out / "truth.npz.part"
    zf = zipfile.ZipFile(truth_part, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True)
    parts_stream: _NpyStream | None = None
    complete = False
    try:
        parts_stream = _NpyStream(zf, "parts", (n, h, w), np.uint8)
        for i in indices:
            blur_from = choreo.pose((i - SHUTTER) / fps) if motion_blur else None
            f = render(person, poses[i], (w, h), viewpoint, i, shadow=shadow, blur_from=blur_from)
            writer.write(encode_jpeg(f.rgb, jpeg_quality), int(timestamps[i]))
            keypoints[i], projected[i] = f.keypoints, f.projected
            visible[i], in_frame[i] = f.visible, f.in_frame
            mask_bits[i] = np.packbits(f.mask, axis=-1)
            if f.shadow_mask is not None:
                shadow_bits[i] = np.packbits(f.shadow_mask, axis=-1)
            parts_stream.write(f.parts)
            if i in sheet_at:
                tiles.append((draw_skeleton(f.rgb, f), f"#{i} {i / fps:.2f}s {moves[i]}"))
        parts_stream.close()
        parts_stream = None
        for name, arr in (
            ("keypoints", keypoints),
            ("projected", projected),
            ("visible", visible),
            ("in_frame", in_frame),
            ("timestamps_ns", timestamps),
            ("poses", np.stack([p.as_vector() for p in poses])),
            ("hard_shadow", shadow_bits.reshape(n, -1).any(axis=1)),
            ("mask_bits", mask_bits),
            ("shadow_bits", shadow_bits),
        ):
            _add_array(zf, name, arr)
        complete = True
    finally:
        # Each closed whatever happens to the others, so the error that stopped the
        # render (or Ctrl-C) is the one reported.
        try:
            if parts_stream is not None:
                parts_stream.close()
            zf.close()
        finally:
            writer.close()
            if not complete:
                truth_part.unlink(missing_ok=True)
    truth_part.replace(out / "truth.npz")
    render_s = time.perf_counter() - t0

    sheet = contact_sheet(tiles)
    cv2.imwrite(str(out / "contact.png"), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    meta = {
        "version": TAKE_VERSION,
        "attendee": attendee,
        "dance": str(dance),
        "dance_name": choreo.name,
        "bpm": round(choreo.bpm, 2),
        "seconds": seconds,
        "fps": fps,
        "size": [w, h],
        "viewpoint": viewpoint,
        "shadow": shadow,
        "jpeg_quality": jpeg_quality,
        "motion_blur": motion_blur,
        "frames": n,
        "files": {"video": "frames.mp4", "truth": "truth.npz", "contact_sheet": "contact.png"},
        "joints": list(sk.JOINTS),
        "parts": list(PART_NAMES),
        "pose_vector": ["x", "z", "lift", "yaw", *ANGLE_NAMES],
        "moves": [
            {"move": s.name, "start_s": round(s.start_s, 4), "duration_s": round(s.duration_s, 4)}
            for s in choreo.spans
            if s.start_s < seconds
        ],
    }
    (out / "take.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return TakeSummary(
        out_dir=out,
        frames=n,
        seconds=seconds,
        fps=fps,
        size=(w, h),
        mp4_bytes=(out / "frames.mp4").stat().st_size,
        render_s=render_s,
        hard_shadow_frames=int(shadow_bits.reshape(n, -1).any(axis=1).sum()),
        frames_without_person=int((~in_frame.any(axis=1)).sum()),
        visible_fraction=float(visible.mean()),
    )
