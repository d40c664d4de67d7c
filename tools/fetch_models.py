"""Unpack the pose models from the mediapipe wheel into the models folder.

The BlazePose detector, the full landmark model and selfie segmentation ship
inside ``mediapipe==0.10.21``. We fetch that wheel from the package registry
(``pip download --no-deps``) and keep only the ``.tflite`` files: mediapipe
itself is never installed, and nothing is downloaded at run time.

The models are the same on every machine, but the wheel is not, and 0.10.21 has
no Linux aarch64 build (a Coral board, the edge image): so the x86_64 CPython
3.11 wheel is asked for by name, whatever the host. Each model is checked
against its SHA-256.

Idempotent: models already present with the right hash are left alone.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "mediapipe==0.10.21"
# One build of the wheel, named whatever machine fetches it (see above).
WHEEL_PLATFORM = [
    "--only-binary=:all:",
    "--platform",
    "manylinux_2_28_x86_64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
]
MODELS = {
    "mediapipe/modules/pose_detection/pose_detection.tflite": "pose_detection.tflite",
    "mediapipe/modules/pose_landmark/pose_landmark_full.tflite": "pose_landmark_full.tflite",
    "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite": "selfie_segmentation.tflite",
}
SHA256 = {
    "pose_detection.tflite": "9ba9dd3d42efaaba86b4ff0122b06f29c4122e756b329d89dca1e297fd8f866c",
    "pose_landmark_full.tflite": "e9a5c5cb17f736fafd4c2ec1da3b3d331d6edbe8a0d32395855aeb2cdfd64b9f",
    "selfie_segmentation.tflite": "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c",
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=Path("models"))
    args = ap.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    missing = [
        dst
        for dst in MODELS.values()
        if not (args.dest / dst).is_file() or _sha256((args.dest / dst).read_bytes()) != SHA256[dst]
    ]
    if not missing:
        print(f"models: all {len(MODELS)} present in {args.dest}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp]
        subprocess.run([*cmd, *WHEEL_PLATFORM, WHEEL], check=True)
        wheels = list(Path(tmp).glob("mediapipe-*.whl"))
        if not wheels:
            print(f"models: pip download of {WHEEL} produced no wheel", file=sys.stderr)
            return 1
        with zipfile.ZipFile(wheels[0]) as zf:
            for src, dst in MODELS.items():
                data = zf.read(src)
                if _sha256(data) != SHA256[dst]:
                    print(
                        f"models: {dst} in {wheels[0].name} is not the model this booth "
                        f"was built for (SHA-256 {_sha256(data)})",
                        file=sys.stderr,
                    )
                    return 1
                target = args.dest / dst
                part = target.with_suffix(".part")
                part.write_bytes(data)
                part.replace(target)
                print(f"models: {dst} ({target.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
