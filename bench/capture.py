"""Capture bench: synthetic cameras at 640x480 and 120 fps, 10 s, CPU pose running.

Ours: each camera runs a real Take (hot path -> MJPEG-in-MP4 segments, stream
buffer, latest-frame pose worker), then the catch-up pass and offline smoothing.
Baseline, measured in the same run on the same frames: the naive pipeline that
decodes every frame, runs pose inline and re-encodes with OpenCV's mp4v, as fast
as it goes (one thread per camera, all cameras at once).

The default run does 2 cameras, then 4, and prints one JSON object: the
2-camera keys plus a ``four_cameras`` object. ``--cameras N`` runs N only.

Keys: cameras, fps_target, frames_offered, frames_written, capture_dropped,
fps_written_min, pose_fps, pose_coverage, naive_fps, ratio_vs_naive (plus
pose_backend, pose_detected, capture_late_ms_p99, catch_up_s, per-camera details).

- capture_dropped: frames a camera offered that the take did not capture (the
  synthetic camera holds 32 frames for a late reader, as a UVC driver does, and
  loses those that find every buffer full), plus frames the segment queue refused.
- fps_written_min: the slowest camera's sustained written rate, frames per
  second of wall time between its first and last segment write.
- pose_fps: live pose frames per second per camera (mean), during the take.
- pose_coverage: the lowest camera's frames with a pose / frames captured, after
  catch-up: every frame went through the pose model.
- pose_detected: the lowest camera's frames where the model found the dancer /
  frames captured (coverage counts a frame posed as "nobody" too).
- naive_fps: frames per second per camera of the naive pipeline.
- ratio_vs_naive: fps_written_min / naive_fps.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_agent.capture.clock import BoothClock  # noqa: E402
from edge_agent.capture.take import Take  # noqa: E402
from edge_agent.config import CaptureConfig, CpuPose, SyntheticSource, ZoneConfig  # noqa: E402
from edge_agent.frames import Granted  # noqa: E402
from edge_agent.pose.base import create_pose_backend, decode_jpeg  # noqa: E402
from edge_agent.synth import SyntheticCamera  # noqa: E402

log = logging.getLogger("bench.capture")


def progress(msg: str) -> None:
    print(f"[capture bench] {msg}", file=sys.stderr, flush=True)


def pose_config() -> CpuPose | None:
    try:
        import edge_agent.pose.cpu  # noqa: F401
    except ModuleNotFoundError:
        return None
    return CpuPose(models_dir=ROOT / "models", threads=2, mode="tracking")


def make_backend(pose: CpuPose):
    """The backend exactly as the agent builds it (with the booth zone's shadow gating)."""
    return create_pose_backend(pose, zone=ZoneConfig())


class TimedSynthetic:
    """A pre-rendered synthetic camera as a take's source, measuring how late frames arrive.

    The synthetic camera stamps each frame with its deadline; the difference to
    the moment the capture loop receives it is how far capture fell behind.
    """

    def __init__(self, camera: SyntheticCamera) -> None:
        self.camera = camera
        self.name = "synthetic"
        self.warnings: list[str] = []
        self.late_ns = np.zeros(camera.num_frames, dtype=np.int64)

    @property
    def lost_frames(self) -> int:
        """Frames the camera lost because the capture loop left its buffers full."""
        return self.camera.lost_frames

    def probe(self) -> Granted:
        return self.camera.granted()

    def open(self) -> Granted:
        self.camera.prerender()
        return self.camera.granted()

    def frames(self):
        late = self.late_ns
        for frame in self.camera.frames():
            late[frame.seq] = time.monotonic_ns() - frame.capture_ts_ns
            yield frame

    def close(self) -> None:
        pass


def render_cameras(n: int, seconds: float, fps: float, clock: BoothClock) -> list[SyntheticCamera]:
    cams = []
    for i in range(n):
        cfg = SyntheticSource(attendee=i + 1, dance=i + 1, viewpoint=i, size=(640, 480), fps=fps)
        cam = SyntheticCamera(cfg, seconds, clock_ns=clock.now_ns)
        t0 = time.perf_counter()
        cam.prerender()
        progress(
            f"camera {i}: pre-rendered {cam.num_frames} frames in {time.perf_counter() - t0:.1f} s"
        )
        cams.append(cam)
    return cams


def run_ours(
    cams: list[SyntheticCamera], clock: BoothClock, seconds: float, pose: CpuPose | None, out: Path
) -> dict:
    sources = [TimedSynthetic(c) for c in cams]
    takes = [
        Take(
            session_id="bench",
            camera_id=f"cam{i}",
            source=src,
            capture=CaptureConfig(out_dir=out, segment_s=2.0, min_free_disk_mb=200),
            clock=clock,
            pose_factory=(lambda: make_backend(pose)) if pose else None,
            duration_s=seconds,
        )
        for i, src in enumerate(sources)
    ]
    for t in takes:
        t.prepare()
    # A stream consumer per camera, as the uplink would be, draining its buffer.
    drains = []
    for t in takes:
        buf = t.subscribe_stream()
        th = threading.Thread(target=lambda b=buf: sum(1 for _ in b), daemon=True)
        th.start()
        drains.append(th)
    progress(f"{len(takes)} cameras: capturing {seconds:g} s at {cams[0].fps:g} fps")
    t0 = time.perf_counter()
    for t in takes:
        t.start()
    capture_end = None
    summaries = []
    for t in takes:
        while t.state == "capturing":
            time.sleep(0.05)
    capture_end = time.perf_counter()
    progress(f"capture done in {capture_end - t0:.1f} s; catch-up pose running")
    for t in takes:
        summaries.append(t.wait())
    done = time.perf_counter()
    for th in drains:
        th.join(10)
    progress(f"catch-up and smoothing done in {done - capture_end:.1f} s")

    offered = sum(c.num_frames for c in cams)
    captured = sum(s.frames for s in summaries)
    written = sum(s.frames_written for s in summaries)
    # A camera loses the frames that find its buffers full while the loop stalls: those
    # are offered and never captured (and in the source's own count too, not added twice).
    dropped = (offered - captured) + sum(s.counters["segment_dropped"] for s in summaries)
    fps_written = [t.recorder.fps_written for t in takes]
    late = np.concatenate([s.late_ns for s in sources]) / 1e6
    return {
        "frames_offered": offered,
        "frames_written": written,
        "capture_dropped": int(dropped),
        "fps_written_min": round(min(fps_written), 2),
        "fps_written": [round(f, 2) for f in fps_written],
        "pose_fps": round(float(np.mean([s.pose["live_fps"] for s in summaries])), 2),
        # What the takes ran (a backend that failed to load shows here, not as "cpu").
        "pose_backends": sorted({str(s.pose["backend"]) for s in summaries}),
        "warnings": [w for s in summaries for w in s.warnings],
        "pose_coverage": min(s.pose["coverage"] for s in summaries),
        "pose_detected": min(
            round(s.pose["detected"] / s.frames, 4) if s.frames else 0.0 for s in summaries
        ),
        "pose_live_frames": [s.pose["live"] for s in summaries],
        "stream_dropped": sum(sum(s.counters["stream_dropped"]) for s in summaries),
        "capture_late_ms_p99": round(float(np.percentile(late, 99)), 2),
        "capture_late_ms_max": round(float(late.max()), 2),
        "catch_up_s": round(done - capture_end, 1),
        "errors": [e for s in summaries for e in s.errors],
    }


def run_naive(cams: list[SyntheticCamera], frames: int, pose: CpuPose | None, out: Path) -> float:
    """Per-camera fps of decode -> pose inline -> mp4v re-encode, all cameras at once."""
    backends = [make_backend(pose) if pose else None for _ in cams]
    rates = [0.0] * len(cams)
    barrier = threading.Barrier(len(cams))

    def one(i: int) -> None:
        cam, backend = cams[i], backends[i]
        w, h = cam.size
        writer = cv2.VideoWriter(
            str(out / f"naive{i}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), cam.fps, (w, h)
        )
        barrier.wait()
        t0 = time.perf_counter()
        for seq in range(frames):
            rgb = decode_jpeg(cam.jpeg(seq))
            if backend is not None:
                backend.estimate(rgb)
            writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        writer.release()
        rates[i] = frames / (time.perf_counter() - t0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for b in backends:
        if b is not None:
            b.close()
    return float(np.mean(rates))


def bench(
    n: int, cams: list[SyntheticCamera], clock: BoothClock, args, pose: CpuPose | None
) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"capture-bench-{n}-", dir=args.tmp))
    try:
        ours = run_ours(cams[:n], clock, args.seconds, pose, out)
        naive_frames = min(int(args.naive_seconds * args.fps), cams[0].num_frames)
        progress(f"{n} cameras: naive pipeline on {naive_frames} frames per camera")
        naive = run_naive(cams[:n], naive_frames, pose, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    result = {
        "cameras": n,
        "fps_target": args.fps,
        **ours,
        "naive_fps": round(naive, 2),
        "ratio_vs_naive": round(ours["fps_written_min"] / naive, 2) if naive else None,
    }
    progress(json.dumps(result))
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cameras", type=int, help="run only this many cameras (default: 2, then 4)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--fps", type=float, default=120.0)
    p.add_argument("--naive-seconds", type=float, default=2.0, help="frames for the baseline")
    p.add_argument("--tmp", default=None, help="where takes are written (default: system temp)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    pose = pose_config()
    backend = "cpu" if pose else "none (edge_agent/pose/cpu.py missing)"
    counts = [args.cameras] if args.cameras else [2, 4]
    clock = BoothClock()
    cams = render_cameras(max(counts), args.seconds, args.fps, clock)
    results = [bench(n, cams, clock, args, pose) for n in counts]
    final = {**results[0], "pose_backend": backend}
    if len(results) > 1:
        final["four_cameras"] = results[1]
    print(json.dumps(final))
    return 0


if __name__ == "__main__":
    from _guard import guarded

    sys.exit(guarded(main))
