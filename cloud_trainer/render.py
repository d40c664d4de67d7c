"""Render: normalized reference poses -> label maps -> the attendee's generator -> H.264 MP4.

The pipeline runs three stages at once, joined by bounded queues:

1. a thread draws label maps (OpenCV, releases the GIL) and, for the optional
   side-by-side, decodes and crops the reference dancer's frames;
2. the calling thread runs the generator on batches of ``render.batch`` label
   maps (SavedModel or TFLite; ``engine="auto"`` times both on the first batch
   and keeps the faster, because which one wins depends on the model size and
   the machine);
3. a thread encodes with libx264 (``yuv420p``, ``movflags=+faststart`` so the
   browser can start playing before the whole file arrived) at the reference's
   frame rate.

A generator is the trainer's export directory (``cloud_trainer.train.export_generator``):
``generator.json`` records the label-map kind and size it was trained on (and the
takes' training crops), ``saved_model/`` takes uint8 label maps in batches and
``generator.tflite`` the same with batch 1. A generator trained on one kind of
label map produces garbage from another, so a mismatch is refused, never rendered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from cloud_trainer import labelmap
from cloud_trainer.storage.base import BlobNotFound
from edge_agent.errors import BadInput, BoothError
from edge_agent.frames import upright

log = logging.getLogger(__name__)

EXPORT_META = "generator.json"
SAVED_MODEL_DIR = "saved_model"
TFLITE_FILE = "generator.tflite"
EXPORT_FORMAT = 1
ENGINES = ("savedmodel", "tflite")
# libx264 preset: "veryfast" encodes 64-256 px frames far faster than the generator
# makes them, at a size within ~10% of "medium" at the same CRF.
X264_PRESET = "veryfast"
# Email clients show the poster at about 480 px wide; generator frames are 64-256 px.
POSTER_MIN_PX = 480
_QUEUE_BATCHES = 4
_STOP = object()


class GeneratorMismatch(BadInput):
    """The generator was trained on another label map (or size) than asked for."""


# ---- generators -----------------------------------------------------------------------


def _to_float(labels: np.ndarray) -> np.ndarray:
    """uint8 label maps -> float32 in [-1, 1], for exports whose graph takes floats."""
    return labels.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def _to_uint8(out: np.ndarray) -> np.ndarray:
    out = np.asarray(out)
    if out.dtype == np.uint8:
        return out
    return np.clip((out.astype(np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


class _SavedModelEngine:
    name = "savedmodel"

    def __init__(self, path: Path):
        import tensorflow as tf

        self._tf = tf
        loaded = tf.saved_model.load(str(path))
        self._keep = loaded  # the signature needs its object alive
        sigs = loaded.signatures
        self._fn = (
            sigs["serving_default"] if "serving_default" in sigs else next(iter(sigs.values()))
        )
        self._input, spec = next(iter(self._fn.structured_input_signature[1].items()))
        self.takes_uint8 = spec.dtype == tf.uint8

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = self._fn(**{self._input: self._tf.constant(x)})
        return out["image"].numpy() if "image" in out else next(iter(out.values())).numpy()


class _TfliteEngine:
    """LiteRT with XNNPACK. The trainer exports batch 1; larger batches are tried by
    resizing the input, and fall back to one invoke per frame if the graph refuses."""

    name = "tflite"

    def __init__(self, path: Path, threads: int | None = None):
        from edge_agent.pose.litert import runtime

        self._it = runtime().Interpreter(
            model_path=str(path), num_threads=threads or os.cpu_count() or 1
        )
        self._it.allocate_tensors()
        detail = self._it.get_input_details()[0]
        self._in = detail["index"]
        self._out = self._it.get_output_details()[0]["index"]
        self.takes_uint8 = detail["dtype"] == np.uint8
        self._batch = int(detail["shape"][0])
        self._resizable = True

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        self._it.set_tensor(self._in, x)
        self._it.invoke()
        return self._it.get_tensor(self._out)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] != self._batch and self._resizable:
            try:
                self._it.resize_tensor_input(self._in, list(x.shape))
                self._it.allocate_tensors()
                self._batch = x.shape[0]
            except (RuntimeError, ValueError):
                log.info(
                    "tflite generator has a fixed batch of %d; invoking per frame", self._batch
                )
                self._resizable = False
                self._it.resize_tensor_input(self._in, [self._batch, *x.shape[1:]])
                self._it.allocate_tensors()
        if x.shape[0] == self._batch:
            return self._invoke(x)
        return np.concatenate(
            [self._invoke(x[i : i + self._batch]) for i in range(0, len(x), self._batch)]
        )


@dataclass
class Generator:
    """A loaded generator: uint8 label maps (B, S, S, 3) in, uint8 RGB frames out."""

    label_map: str
    size_px: int
    engine: str
    run: Any  # one of the engines above
    meta: dict[str, Any] = field(default_factory=dict)

    def predict(self, labels: np.ndarray) -> np.ndarray:
        labels = np.ascontiguousarray(labels, dtype=np.uint8)
        return _to_uint8(self.run(labels if self.run.takes_uint8 else _to_float(labels)))

    def framing(self, camera: str | None = None) -> labelmap.Framing | None:
        """The training crop the export recorded (of ``camera``, else the first take)."""
        takes = self.meta.get("framing") or []
        for t in takes:
            if camera is None or t.get("camera") == camera:
                return labelmap.Framing.from_dict(t)
        return None


def read_export_meta(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        meta = json.loads((p / EXPORT_META).read_text())
    except FileNotFoundError:
        raise BadInput(f"{p} is not an exported generator (no {EXPORT_META})") from None
    except (OSError, ValueError) as e:
        raise BadInput(f"{p / EXPORT_META} is unreadable: {e}") from None
    if meta.get("label_map") not in labelmap.KINDS or not isinstance(meta.get("size_px"), int):
        raise BadInput(
            f"{p / EXPORT_META} does not record the label map and size it was trained on"
        )
    return meta


def _available(path: Path) -> list[str]:
    found = []
    if (path / SAVED_MODEL_DIR / "saved_model.pb").exists():
        found.append("savedmodel")
    if (path / TFLITE_FILE).exists():
        found.append("tflite")
    return found


def _open_engine(path: Path, engine: str) -> Any:
    if engine == "savedmodel":
        return _SavedModelEngine(path / SAVED_MODEL_DIR)
    return _TfliteEngine(path / TFLITE_FILE)


def load_generator(
    path: str | Path,
    *,
    label_map: str | None = None,
    engine: str = "auto",
    probe_batch: int = 8,
) -> Generator:
    """Load an exported generator (``cloud_trainer.train.export_generator``'s layout).

    Refuses one trained on another label map than ``label_map``. ``engine``:
    ``savedmodel``, ``tflite`` or ``auto`` (time both on one batch of ``probe_batch``
    after a warm-up and keep the faster).
    """
    p = Path(path)
    meta = read_export_meta(p)
    if label_map is not None and meta["label_map"] != label_map:
        raise GeneratorMismatch(
            f"the generator in {p} was trained on {meta['label_map']!r} label maps, "
            f"but this render draws {label_map!r} label maps; render with the label map "
            "it was trained on (trainer.label_map) or retrain"
        )
    have = _available(p)
    if not have:
        raise BadInput(f"{p} holds neither {SAVED_MODEL_DIR}/ nor {TFLITE_FILE}")
    if engine not in ("auto", *ENGINES):
        raise BadInput(f"unknown generator engine {engine!r} (auto, savedmodel, tflite)")
    if engine != "auto" and engine not in have:
        raise BadInput(f"{p} has no {engine} export (it has: {', '.join(have)})")
    size = meta["size_px"]
    candidates = have if engine == "auto" else [engine]
    gens = {
        name: Generator(meta["label_map"], size, name, _open_engine(p, name), meta)
        for name in candidates
    }
    chosen = candidates[0]
    if len(gens) > 1:
        labels = np.zeros((probe_batch, size, size, 3), np.uint8)
        timings = {}
        for name, gen in gens.items():
            gen.predict(labels)  # warm-up: graph tracing, allocation
            t0 = time.perf_counter()
            gen.predict(labels)
            timings[name] = time.perf_counter() - t0
        chosen = min(timings, key=timings.get)
        log.info(
            "generator engine %s (probe ms per frame: %s)",
            chosen,
            ", ".join(f"{k} {1000 * v / probe_batch:.1f}" for k, v in timings.items()),
        )
    return gens[chosen]


# ---- H.264 ---------------------------------------------------------------------------


def fps_fraction(fps: float) -> Fraction:
    """29.97 -> 30000/1001: NTSC-style rates stay exact instead of drifting."""
    whole = round(fps * 1.001)
    if abs(fps - whole) > 0.005 and abs(fps - whole / 1.001) < 0.005:
        return Fraction(whole * 1000, 1001)  # 23.976, 29.97, 59.94, 119.88
    return Fraction(fps).limit_denominator(1001)


_SMPTE170M = 6  # AVCOL_SPC / AVCOL_PRI / AVCOL_TRC_SMPTE170M: BT.601 (525-line)
_TV_RANGE = 1  # AVCOL_RANGE_MPEG: limited (16-235)
_COLORSPACES = {1: "bt709", 2: "unspecified", 5: "bt470bg", _SMPTE170M: "smpte170m"}


class H264Writer:
    """RGB frames -> H.264 MP4 (libx264, yuv420p, +faststart) at a constant frame rate."""

    def __init__(self, path: str | Path, fps: float, size: tuple[int, int], crf: int = 20):
        w, h = size
        if w % 2 or h % 2:
            raise ValueError(f"yuv420p needs even frame sizes, got {w}x{h}")
        self.path = Path(path)
        self.size = (w, h)
        self.frames = 0
        self._out = av.open(str(self.path), "w", format="mp4", options={"movflags": "+faststart"})
        self._stream = self._out.add_stream(
            "libx264",
            rate=fps_fraction(fps),
            options={"crf": str(crf), "preset": X264_PRESET, "g": str(max(1, round(2 * fps)))},
        )
        self._stream.width, self._stream.height = w, h
        self._stream.pix_fmt = "yuv420p"
        # Say which colours these are. The RGB frames become YUV by swscale's default,
        # BT.601 at TV range; an untagged stream leaves players to guess, and those that
        # guess BT.709 shift skin tones. The tags go into the H.264 stream and the MP4.
        cc = self._stream.codec_context
        cc.colorspace = cc.color_primaries = cc.color_trc = _SMPTE170M
        cc.color_range = _TV_RANGE

    def write(self, rgb: np.ndarray) -> None:
        if rgb.shape[:2] != (self.size[1], self.size[0]):
            raise ValueError(f"frame is {rgb.shape[1]}x{rgb.shape[0]}, the video is {self.size}")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = self.frames
        for packet in self._stream.encode(frame):
            self._out.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self._out is None:
            return
        for packet in self._stream.encode():
            self._out.mux(packet)
        self._out.close()
        self._out = None

    def __enter__(self) -> H264Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


AUDIO_RATE = 48_000


def add_audio(video: Path, source: str | Path, start_s: float, duration_s: float) -> bool:
    """Mux ``source``'s first audio track, from ``start_s`` for ``duration_s``, into ``video``.

    The video packets are copied, the audio is re-encoded to AAC (48 kHz stereo: what
    every phone plays) and cut to the video's length, and ``video`` is replaced
    atomically. Returns False (``video`` untouched) when ``source`` has no audio.
    """
    video = Path(video)
    with av.open(str(source)) as src:
        if not src.streams.audio:
            return False
        a_in = src.streams.audio[0]
        tmp = video.with_name(video.stem + ".audio.part.mp4")
        total = round(duration_s * AUDIO_RATE)
        written = 0
        try:
            with (
                av.open(str(video)) as vin,
                av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as out,
            ):
                v_in = vin.streams.video[0]
                v_out = out.add_stream_from_template(v_in)
                a_out = out.add_stream("aac", rate=AUDIO_RATE, layout="stereo")
                resampler = av.AudioResampler(format="fltp", layout="stereo", rate=AUDIO_RATE)
                for packet in vin.demux(v_in):
                    if packet.dts is None:
                        continue  # the demuxer's flush packet
                    packet.stream = v_out
                    out.mux(packet)
                if start_s > 0 and a_in.time_base:
                    src.seek(int(start_s / a_in.time_base), stream=a_in, backward=True)

                def encode(frame) -> None:
                    nonlocal written
                    frame.pts = written
                    frame.time_base = Fraction(1, AUDIO_RATE)
                    written += frame.samples
                    for pkt in a_out.encode(frame):
                        out.mux(pkt)

                for frame in src.decode(a_in):
                    if (
                        frame.time is not None
                        and frame.time + frame.samples / frame.rate <= start_s
                    ):
                        continue  # before the reference's first kept frame
                    for chunk in resampler.resample(frame):
                        # Drop the samples before start_s and after the video's end.
                        skip = 0
                        if chunk.time is not None and chunk.time < start_s and written == 0:
                            skip = min(chunk.samples, round((start_s - chunk.time) * AUDIO_RATE))
                        keep = min(chunk.samples - skip, total - written)
                        if keep <= 0:
                            continue
                        if skip or keep < chunk.samples:
                            data = chunk.to_ndarray()[:, skip : skip + keep]
                            chunk = av.AudioFrame.from_ndarray(
                                np.ascontiguousarray(data), format="fltp", layout="stereo"
                            )
                            chunk.sample_rate = AUDIO_RATE
                        encode(chunk)
                    if written >= total:
                        break
                for pkt in a_out.encode(None):
                    out.mux(pkt)
            tmp.replace(video)
        finally:
            tmp.unlink(missing_ok=True)
    return written > 0


# ---- the render ----------------------------------------------------------------------


@dataclass
class RenderResult:
    video_path: Path
    poster_path: Path
    side_by_side_path: Path | None
    frames: int
    fps: float
    engine: str
    seconds: dict[str, float] = field(default_factory=dict)


def poster_index(poses: np.ndarray) -> int:
    """The frame with the widest pose (arms out) in the middle 80%: a lively still."""
    n = len(poses)
    lo, hi = int(n * 0.1), max(int(n * 0.9), int(n * 0.1) + 1)
    best, best_area = n // 2, -1.0
    for i in range(lo, min(hi, n)):
        present = poses[i, :, 2] >= labelmap.MIN_SCORE
        if present.sum() < 4:
            continue
        xs, ys = poses[i, present, 0], poses[i, present, 1]
        area = float((xs.max() - xs.min()) * (ys.max() - ys.min()))
        if area > best_area:
            best, best_area = i, area
    return best


def write_poster(rgb: np.ndarray, path: str | Path, quality: int = 90) -> None:
    h, w = rgb.shape[:2]
    k = max(1, -(-POSTER_MIN_PX // w))  # an integer upscale keeps the pixels crisp
    img = cv2.resize(rgb, (w * k, h * k), interpolation=cv2.INTER_LANCZOS4) if k > 1 else rgb
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise BoothError("could not encode the poster JPEG")
    Path(path).write_bytes(buf.tobytes())


def _put(q: queue.Queue, item: Any, failed: threading.Event) -> bool:
    """Put unless the pipeline failed (then the consumer is gone: do not block forever)."""
    while not failed.is_set():
        try:
            q.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, failed: threading.Event) -> Any:
    while True:
        try:
            return q.get(timeout=0.2)
        except queue.Empty:
            if failed.is_set():
                return _STOP


def render_video(
    generator: Generator,
    crop_poses: np.ndarray,
    fps: float,
    out_dir: str | Path,
    *,
    masks: Iterable[np.ndarray] | None = None,
    reference_frames: Iterable[np.ndarray] | None = None,
    batch: int = 16,
    crf: int = 20,
    name: str = "final",
) -> RenderResult:
    """Render poses already in the generator's crop pixels (N, 23, 3) to MP4s and a poster.

    ``masks`` (crop-size booleans, one per frame) are needed for ``parts`` label maps;
    ``reference_frames`` (crop-size RGB, one per frame) make the side-by-side video.
    """
    poses = np.asarray(crop_poses, dtype=np.float32)
    n, size, kind = len(poses), generator.size_px, generator.label_map
    if n == 0:
        raise BadInput("nothing to render: the reference has no frames")
    if kind == "parts" and masks is None:
        raise GeneratorMismatch(
            "this generator needs 'parts' label maps, which need the reference's person masks; "
            "this reference has none"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = RenderResult(
        video_path=out / f"{name}.mp4",
        poster_path=out / "poster.jpg",
        side_by_side_path=(out / f"{name}-side-by-side.mp4")
        if reference_frames is not None
        else None,
        frames=n,
        fps=fps,
        engine=generator.engine,
    )
    labels_q: queue.Queue = queue.Queue(maxsize=_QUEUE_BATCHES)
    frames_q: queue.Queue = queue.Queue(maxsize=_QUEUE_BATCHES)
    failed = threading.Event()
    errors: list[BaseException] = []
    poster_at = poster_index(poses)
    busy = {"labels": 0.0, "generator": 0.0, "encode": 0.0}

    def draw() -> None:
        t_busy = 0.0
        try:
            mask_it = iter(masks) if masks is not None else None
            ref_it = iter(reference_frames) if reference_frames is not None else None
            for start in range(0, n, batch):
                t0 = time.perf_counter()
                stop = min(n, start + batch)
                labels = np.empty((stop - start, size, size, 3), np.uint8)
                refs = []
                for i in range(start, stop):
                    mask = next(mask_it) if mask_it is not None else None
                    labels[i - start] = labelmap.render_label(kind, poses[i], size, mask)
                    if ref_it is not None:
                        refs.append(next(ref_it, None))
                t_busy += time.perf_counter() - t0
                if not _put(labels_q, (labels, refs), failed):
                    return
            _put(labels_q, _STOP, failed)
        except BaseException as e:  # handed to the caller, which re-raises it
            errors.append(e)
            failed.set()
        finally:
            busy["labels"] = t_busy

    def encode() -> None:
        t_busy = 0.0
        try:
            with H264Writer(result.video_path, fps, (size, size), crf) as video:
                sbs = (
                    H264Writer(result.side_by_side_path, fps, (2 * size, size), crf)
                    if result.side_by_side_path is not None
                    else None
                )
                try:
                    while True:
                        item = _get(frames_q, failed)
                        if item is _STOP:
                            break
                        t0 = time.perf_counter()
                        images, refs, first = item
                        for j, img in enumerate(images):
                            video.write(img)
                            if first + j == poster_at:
                                write_poster(img, result.poster_path)
                            if sbs is not None:
                                ref = refs[j] if j < len(refs) and refs[j] is not None else None
                                panel = ref if ref is not None else np.zeros_like(img)
                                sbs.write(np.concatenate([img, panel], axis=1))
                        t_busy += time.perf_counter() - t0
                finally:
                    if sbs is not None:
                        sbs.close()
        except BaseException as e:
            errors.append(e)
            failed.set()
        finally:
            busy["encode"] = t_busy

    t_start = time.perf_counter()
    drawer = threading.Thread(target=draw, name="render-labels", daemon=True)
    encoder = threading.Thread(target=encode, name="render-encode", daemon=True)
    drawer.start()
    encoder.start()
    done = 0
    try:
        while True:
            item = _get(labels_q, failed)
            if item is _STOP:
                break
            labels, refs = item
            t0 = time.perf_counter()
            images = generator.predict(labels)
            busy["generator"] += time.perf_counter() - t0
            if not _put(frames_q, (images, refs, done), failed):
                break
            done += len(images)
        _put(frames_q, _STOP, failed)
    except BaseException as e:
        errors.append(e)
        failed.set()
    drawer.join()
    encoder.join()
    if errors:
        raise errors[0]
    result.seconds = {**busy, "total": time.perf_counter() - t_start}
    log.info(
        "rendered %d frames at %dpx in %.1fs (%.1f fps, engine %s)",
        n,
        size,
        result.seconds["total"],
        n / max(result.seconds["total"], 1e-9),
        generator.engine,
    )
    return result


def probe(path: str | Path) -> dict[str, Any]:
    """Codec, pixel format, frame count, fps and size of a video, read with PyAV."""
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise BadInput(f"{path} has no video stream")
            v = c.streams.video[0]
            frames = sum(1 for _ in c.decode(video=0))
            return {
                "codec": v.codec_context.name,
                "pix_fmt": v.codec_context.pix_fmt,
                "fps": float(v.average_rate) if v.average_rate else None,
                "frames": frames,
                "width": v.codec_context.width,
                "height": v.codec_context.height,
                "format": c.format.name,
                "colorspace": _COLORSPACES.get(v.codec_context.colorspace, "other"),
            }
    except av.error.FFmpegError as e:
        raise BadInput(f"{path} is not a readable video: {e}") from None


def iter_decoded(path: str | Path, indices: Iterable[int] | None = None) -> Iterator[np.ndarray]:
    """RGB frames of a video, upright, optionally only those at increasing ``indices``.

    Upright as ``reference add`` read them: a phone's portrait dance keeps the size its
    poses and framing were measured at.
    """
    wanted = None if indices is None else iter(indices)
    target = next(wanted, None) if wanted is not None else None
    if wanted is not None and target is None:
        return
    with av.open(str(path)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if wanted is None:
                yield upright(frame)
                continue
            if i < target:
                continue
            rgb = upright(frame)
            while target is not None and target == i:
                yield rgb
                target = next(wanted, None)
            if target is None:
                return


# ---- a session's video ------------------------------------------------------------------


def warp_masks(
    reference: Any, norm: Any, framing: labelmap.Framing, size_px: int
) -> Iterator[np.ndarray]:
    """The reference dancer's person masks, moved like the poses, in the attendee's crop.

    ``parts`` label maps need a silhouette; the attendee never danced these moves, so
    the reference's silhouette is moved by the same per-frame scale and offset as its
    keypoints (the normalization is exactly such a map).
    """
    w, h = reference.frame_size
    affines = norm.affines(reference.poses)
    for i, small in enumerate(reference.masks):
        mh, mw = small.shape
        k = np.diag([w / mw, h / mh])
        m = np.concatenate([affines[i][:, :2] @ k, affines[i][:, 2:]], axis=1)
        full = cv2.warpAffine(
            small.astype(np.uint8) * 255,
            m,
            (framing.frame_w, framing.frame_h),
            flags=cv2.INTER_LINEAR,
        )
        yield framing.crop_mask(full.astype(np.float32) / 255.0, size_px)


def _reference_audio(source: Path, reference: Any, result: RenderResult) -> None:
    """The reference's music (from its ``source`` video) under the rendered videos, where
    it lines up with them.

    Frames the corrections dropped from the middle of a reference would put the music
    out of step with the dance from there on: such a video stays silent.
    """
    index = np.asarray(reference.frame_index)
    if len(index) and not np.array_equal(index, np.arange(index[0], index[0] + len(index))):
        log.info(
            "reference %s v%d has frames dropped inside it: the video has no sound",
            reference.name,
            reference.version,
        )
        return
    start_s = float(index[0]) / reference.fps if len(index) else 0.0
    duration_s = result.frames / result.fps
    for path in (result.video_path, result.side_by_side_path):
        if path is not None and not add_audio(path, source, start_s, duration_s):
            return  # no audio track in the reference: nothing to add to either


def _source_or_none(
    stack: contextlib.ExitStack, library: Any, reference: Any, scratch_dir: Any
) -> Path | None:
    """The reference's source video, or None when it is gone from the store.

    Only the side-by-side and the music come from it: the attendee's own video does
    not need it, and a reference removed while a job trained must not cost that job.
    """
    try:
        return stack.enter_context(library.source_file(reference, scratch_dir))
    except BlobNotFound as e:
        log.warning(
            "reference %s v%d: its source video is gone (%s); rendering without the "
            "side-by-side and the music",
            reference.name,
            reference.version,
            e,
        )
        return None


def render_session(
    store: Any,
    session_id: str,
    generator: Generator,
    reference: Any,
    take_poses: np.ndarray,
    framing: labelmap.Framing | None = None,
    *,
    camera: str | None = None,
    library: Any = None,
    side_by_side: bool = True,
    batch: int = 16,
    crf: int = 20,
    scratch_dir: str | Path | None = None,
    take_fps: float | None = None,
) -> dict[str, str | None]:
    """Render the reference dance with the attendee's generator; store MP4s and poster.

    The videos are made in a temporary directory under ``scratch_dir`` (the job's work
    directory, which the worker sweeps, so a render killed midway leaves no attendee
    video behind in /tmp); default: the system's temporary directory.

    ``take_poses`` are the attendee's poses (full-frame pixels of the camera the
    generator was trained on) and ``framing`` that camera's training crop (default:
    the crop the export recorded for ``camera``, else one fitted to ``take_poses``), and
    ``take_fps`` their rate (how long a rise of the feet may last and still be a jump).
    Returns the blob keys: ``video_key``, ``poster_key``, ``side_by_side_key``
    (None without a side-by-side).
    """
    from cloud_trainer import normalize

    if framing is None:
        framing = generator.framing(camera)
    if framing is None:
        w = int(np.ceil(take_poses[..., 0].max())) + 1
        h = int(np.ceil(take_poses[..., 1].max())) + 1
        framing = labelmap.Framing.from_poses(take_poses, w, h)

    if generator.label_map == "parts" and reference.masks is None:
        raise GeneratorMismatch(
            f"the generator uses 'parts' label maps, but reference {reference.name} "
            f"v{reference.version} has no person masks"
        )
    size = generator.size_px
    norm = normalize.fit(
        reference.poses,
        take_poses,
        reference_fps=reference.fps,
        take_fps=take_fps or normalize.DEFAULT_FPS,
    )
    full = norm.apply(reference.poses)
    crop = np.stack([framing.to_crop(p, size) for p in full])
    masks = warp_masks(reference, norm, framing, size) if generator.label_map == "parts" else None
    prefix = f"sessions/{session_id}/video"
    if scratch_dir is not None:
        Path(scratch_dir).mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        # The reference's own video, fetched once: its frames for the side-by-side, its
        # music for both videos.
        source = None
        if library is not None:
            source = _source_or_none(stack, library, reference, scratch_dir)
        panels = None
        if side_by_side and source is not None:
            ref_framing = reference.framing()
            panels = (
                ref_framing.crop(rgb, size)
                for rgb in iter_decoded(source, reference.frame_index.tolist())
            )
        tmp = stack.enter_context(
            tempfile.TemporaryDirectory(prefix="booth-render-", dir=scratch_dir)
        )
        result = render_video(
            generator,
            crop,
            reference.fps,
            tmp,
            masks=masks,
            reference_frames=panels,
            batch=batch,
            crf=crf,
        )
        if source is not None:
            try:
                _reference_audio(source, reference, result)
            except (av.error.FFmpegError, ValueError) as e:
                # The music is a nicety: the attendee's video goes out without it rather
                # than not at all (add_audio replaces a video only once it is whole).
                log.warning(
                    "reference %s v%d: its music could not be added (%s); the video is silent",
                    reference.name,
                    reference.version,
                    e,
                )
        keys: dict[str, str | None] = {
            "video_key": f"{prefix}/final.mp4",
            "poster_key": f"{prefix}/poster.jpg",
            "side_by_side_key": None,
        }
        store.put_file(keys["video_key"], str(result.video_path), "video/mp4")
        store.put_file(keys["poster_key"], str(result.poster_path), "image/jpeg")
        if result.side_by_side_path is not None:
            keys["side_by_side_key"] = f"{prefix}/side-by-side.mp4"
            store.put_file(keys["side_by_side_key"], str(result.side_by_side_path), "video/mp4")
    log.info(
        "session %s rendered: %d frames of %s v%d",
        session_id,
        result.frames,
        reference.name,
        reference.version,
    )
    return keys
