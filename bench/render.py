"""Render bench: reference poses -> label maps -> generator -> video, ours against naive.

Both pipelines start from the same crop-space poses (a synthetic dance) and draw
the same skeleton label maps with the same generator weights (the trainer's
pix2pix U-Net at ``--size``, untrained: speed does not depend on the weights).

- ours: ``cloud_trainer.render.render_video`` on the trainer's export
  (``train.export_generator``), engine chosen by timing SavedModel and TFLite
  (``auto``), batches of ``--batch``, label maps / generator / libx264 encode
  pipelined in three threads, H.264 ``yuv420p`` with ``+faststart``.
- naive: the Keras generator called once per frame, frames written with OpenCV's
  ``mp4v`` writer, one thread. Both ways of calling it are timed, ``model.predict``
  (Keras' inference API, ``naive_predict_fps``) and ``model(x)``
  (``naive_call_fps``), and ``naive_fps`` is the faster: predict's per-call
  overhead would flatter ours.

Model loading and export are not timed (both pipelines have the model in memory).
h264 is true iff ffprobe (Debian's ffmpeg, installed by the Makefile) reports
h264 and yuv420p for our file; without ffprobe, PyAV probes it and
``probe`` says so.

Keys: size, frames, ours_fps, naive_fps, ratio, h264 (plus frames_written, engine,
batch, naive_predict_fps, naive_call_fps, probe, export_s). A video short of frames
adds ``error`` and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloud_trainer import labelmap, render  # noqa: E402


def progress(msg: str) -> None:
    print(f"[render bench] {msg}", file=sys.stderr, flush=True)


def crop_poses(size: int, frames: int, fps: float) -> np.ndarray:
    """A synthetic dancer's ground-truth poses in a ``size`` crop, as the renderer gets them."""
    from edge_agent.synth.appearance import Attendee
    from edge_agent.synth.choreography import Dance
    from edge_agent.synth.render import render as synth_render

    frame = (640, 480)
    dancer = Attendee.from_seed(1)
    poses = Dance.parse("wave+squat+disco").poses(fps, frames / fps)
    full = np.stack(
        [
            synth_render(dancer, p, frame, 0, i, shadow="none", noise=False).keypoints
            for i, p in enumerate(poses)
        ]
    )
    framing = labelmap.Framing.from_poses(full, *frame)
    return np.stack([framing.to_crop(s, size) for s in full])


def naive(model, poses: np.ndarray, fps: float, path: Path, call: bool) -> float:
    """One frame at a time through Keras; OpenCV mp4v writer. Returns frames per second."""
    size = model.input_shape[1]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (size, size))
    t0 = time.perf_counter()
    for p in poses:
        label = labelmap.render_skeleton(p, size)
        x = label[None].astype(np.float32) / 127.5 - 1.0
        y = model(x, training=False).numpy() if call else model.predict(x, verbose=0)
        img = np.clip((y[0] + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
        writer.write(cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    writer.release()
    return len(poses) / (time.perf_counter() - t0)


def check_h264(path: Path) -> tuple[bool, str]:
    if shutil.which("ffprobe"):
        out = subprocess.run(
            [
                "ffprobe",
                "-v",
                "error",
                "-select_streams",
                "v:0",
                "-show_entries",
                "stream=codec_name,pix_fmt",
                "-of",
                "json",
                str(path),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        stream = json.loads(out.stdout)["streams"][0]
        return stream["codec_name"] == "h264" and stream["pix_fmt"] == "yuv420p", "ffprobe"
    info = render.probe(path)
    ok = info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    return ok, "pyav (ffprobe not installed)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128, help="generator size in px (power of two)")
    p.add_argument("--frames", type=int, default=96)
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--engine", default="auto", choices=("auto", *render.ENGINES))
    args = p.parse_args()

    from cloud_trainer.model import ModelSpec, build_generator
    from cloud_trainer.train import export_generator

    spec = ModelSpec.for_size(args.size)
    model = build_generator(spec)
    progress(f"generator {args.size}px, {model.count_params() / 1e6:.1f}M parameters")
    poses = crop_poses(args.size, args.frames, args.fps)
    with tempfile.TemporaryDirectory(prefix="bench-render-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        export_generator(
            types.SimpleNamespace(spec=spec, generator=model),
            tmp_path / "export",
            label_map="skeleton",
            meta={},
        )
        export_s = time.perf_counter() - t0
        progress(f"exported in {export_s:.1f}s")
        gen = render.load_generator(tmp_path / "export", label_map="skeleton", engine=args.engine)
        progress(f"engine {gen.engine}")

        # Warm both up on a few frames so neither pays tracing or allocation in the timing.
        render.render_video(gen, poses[: args.batch], args.fps, tmp_path / "warm", batch=args.batch)
        naive(model, poses[:2], args.fps, tmp_path / "warm.mp4", call=False)
        naive(model, poses[:2], args.fps, tmp_path / "warm.mp4", call=True)

        t0 = time.perf_counter()
        result = render.render_video(gen, poses, args.fps, tmp_path / "ours", batch=args.batch)
        ours_fps = args.frames / (time.perf_counter() - t0)
        progress(f"ours: {ours_fps:.1f} fps (busy s: {result.seconds})")
        predict_fps = naive(model, poses, args.fps, tmp_path / "naive.mp4", call=False)
        progress(f"naive (model.predict per frame, mp4v): {predict_fps:.1f} fps")
        call_fps = naive(model, poses, args.fps, tmp_path / "naive-call.mp4", call=True)
        progress(f"naive (model(x) per frame, mp4v): {call_fps:.1f} fps")
        h264, how = check_h264(result.video_path)
        frames = render.probe(result.video_path)["frames"]
    # The baseline is the faster way of calling the generator per frame: predict() pays a
    # large per-call overhead that a careful naive script would not.
    naive_fps = max(predict_fps, call_fps)
    out = {
        "size": args.size,
        "frames": args.frames,
        "ours_fps": round(ours_fps, 2),
        "naive_fps": round(naive_fps, 2),
        "ratio": round(ours_fps / naive_fps, 2),
        "h264": h264,
        "frames_written": frames,
        "engine": gen.engine,
        "batch": args.batch,
        "naive_predict_fps": round(predict_fps, 2),
        "naive_call_fps": round(call_fps, 2),
        "probe": how,
        "export_s": round(export_s, 1),
    }
    if frames != args.frames:
        # A video short of frames is no speed-up: the result says so, and the run fails.
        out["error"] = f"our video has {frames} frames, {args.frames} were rendered"
    print(json.dumps(out))
    return 0 if "error" not in out else 1


if __name__ == "__main__":
    from _guard import guarded

    sys.exit(guarded(main))
