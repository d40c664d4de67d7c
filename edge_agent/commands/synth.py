"""``booth synth``: render a synthetic take (MJPEG-in-MP4, ground truth, contact sheet)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from edge_agent.errors import BadInput

MAX_SECONDS = 600.0
MAX_FPS = 1000.0
MAX_SIDE = 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attendee", type=int, default=1, metavar="N", help="appearance seed")
    parser.add_argument(
        "--dance",
        default="1",
        metavar="M",
        help="choreography seed, or move names joined by + (e.g. warmup, wave+squat, stepout)",
    )
    parser.add_argument("--seconds", type=float, default=5.0, metavar="S", help="take length")
    parser.add_argument("--fps", type=float, default=30.0, metavar="F", help="frame rate")
    parser.add_argument("--size", default="640x480", metavar="WxH", help="frame size in pixels")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="take directory")
    parser.add_argument("--viewpoint", type=int, default=0, metavar="V", help="camera position")
    parser.add_argument(
        "--shadow",
        choices=("auto", "hard", "soft", "none"),
        default="auto",
        help="auto: soft floor shadow, hard wall shadow when the attendee or dance has one",
    )
    parser.add_argument("--quality", type=int, default=85, metavar="Q", help="JPEG quality")
    parser.add_argument(
        "--motion-blur", action="store_true", help="average each frame over half a frame period"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        w, h = (int(p) for p in parts) if len(parts) == 2 else (0, -1)
    except ValueError:
        w, h = 0, -1
    if h == -1:
        raise BadInput(f"--size must look like 640x480, got {text!r}")
    if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
        raise BadInput(f"--size sides must be 1..{MAX_SIDE} pixels, got {w}x{h}")
    return w, h


def run(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    if not (math.isfinite(args.fps) and 0 < args.fps <= MAX_FPS):
        raise BadInput(f"--fps must be in (0, {MAX_FPS:g}], got {args.fps:g}")
    if not (math.isfinite(args.seconds) and 0 < args.seconds <= MAX_SECONDS):
        raise BadInput(f"--seconds must be in (0, {MAX_SECONDS:g}], got {args.seconds:g}")
    if args.attendee < 0:
        raise BadInput(f"--attendee must be >= 0, got {args.attendee}")
    if not 10 <= args.quality <= 100:
        raise BadInput(f"--quality must be 10..100, got {args.quality}")
    if round(args.fps * args.seconds) < 1:
        raise BadInput(f"{args.seconds:g} s at {args.fps:g} fps is not a single frame")

    # Imported here: OpenCV and PyAV are not needed for `booth --help`.
    from edge_agent.synth import scene
    from edge_agent.synth.choreography import Dance
    from edge_agent.synth.take import write_take

    try:
        scene.check_viewpoint(args.viewpoint)
        Dance.parse(args.dance)
    except ValueError as e:
        raise BadInput(str(e)) from None
    if args.out.exists() and not args.out.is_dir():
        raise BadInput(f"--out {args.out} exists and is not a directory")
    try:
        summary = write_take(
            args.out,
            attendee=args.attendee,
            dance=args.dance,
            seconds=args.seconds,
            fps=args.fps,
            size=size,
            viewpoint=args.viewpoint,
            shadow=args.shadow,
            jpeg_quality=args.quality,
            motion_blur=args.motion_blur,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    except OSError as e:
        raise BadInput(f"cannot write the take to {args.out}: {e.strerror or e}") from None
    print(
        f"wrote {summary.frames} frames ({summary.size[0]}x{summary.size[1]} at "
        f"{summary.fps:g} fps, {summary.seconds:g} s) to {summary.out_dir} "
        f"in {summary.render_s:.1f} s: frames.mp4 ({summary.mp4_bytes / 1e6:.1f} MB), "
        f"truth.npz, contact.png, take.json"
    )
    print(
        f"attendee {args.attendee}, dance {args.dance}, viewpoint {args.viewpoint}: "
        f"{summary.visible_fraction:.0%} of keypoints visible, "
        f"{summary.hard_shadow_frames} frames with a hard wall shadow, "
        f"{summary.frames_without_person} with nobody in frame"
    )
    return 0
