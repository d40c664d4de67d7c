"""Unpack the pose models from the mediapipe wheel into the models folder.

The BlazePose detector, the full landmark model and selfie segmentation ship
inside ``mediapipe==0.10.21``. We fetch that wheel from the package registry
(``pip download --no-deps``) and keep only the ``.tflite`` files: mediapipe
itself is never installed, and nothing is downloaded at run time.

Idempotent: models already present with the right size are left alone.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "mediapipe==0.10.21"
MODELS = {
    "mediapipe/modules/pose_detection/pose_detection.tflite": "pose_detection.tflite",
    "mediapipe/modules/pose_landmark/pose_landmark_full.tflite": "pose_landmark_full.tflite",
    "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite": "selfie_segmentation.tflite",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=Path("models"))
    args = ap.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    missing = [dst for dst in MODELS.values() if not (args.dest / dst).is_file()]
    if not missing:
        print(f"models: all {len(MODELS)} present in {args.dest}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL]
        subprocess.run(cmd, check=True)
        wheels = list(Path(tmp).glob("mediapipe-*.whl"))
        if not wheels:
            print(f"models: pip download of {WHEEL} produced no wheel", file=sys.stderr)
            return 1
        with zipfile.ZipFile(wheels[0]) as zf:
            for src, dst in MODELS.items():
                target = args.dest / dst
                part = target.with_suffix(".part")
                part.write_bytes(zf.read(src))
                part.replace(target)
                print(f"models: {dst} ({target.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
