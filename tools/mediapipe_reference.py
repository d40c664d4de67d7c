"""Write MediaPipe Pose's own landmarks on the skimage astronaut, our CPU backend's reference.

MediaPipe is deliberately *not* a dependency of dancebooth. Run this once, by hand, in a
scratch virtualenv, and commit the JSON it writes:

    python3 -m venv /tmp/mpvenv
    /tmp/mpvenv/bin/pip install mediapipe==0.10.21 scikit-image
    /tmp/mpvenv/bin/python tools/mediapipe_reference.py --out tests/data/astronaut_mediapipe.json

It uses the legacy ``mp.solutions.pose`` API in static-image mode with
``model_complexity=1`` (the "full" landmark model, the same file ``models/`` holds), so
every image runs the detector and nothing is smoothed over time.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("tests/data/astronaut_mediapipe.json"))
    args = ap.parse_args()

    # Imported here: these exist only in the scratch virtualenv.
    import mediapipe as mp
    import numpy as np
    from skimage import data

    astronaut = data.astronaut()  # (512, 512, 3) uint8, RGB
    # The square original, and a wide crop whose letterbox padding is not zero.
    images = {"astronaut": astronaut, "astronaut_top_384": astronaut[:384]}
    entries = {}
    for name, rgb in images.items():
        height, width = rgb.shape[:2]
        with mp.solutions.pose.Pose(
            static_image_mode=True,
            model_complexity=1,
            smooth_landmarks=False,
            enable_segmentation=False,
            min_detection_confidence=0.5,
        ) as pose:
            res = pose.process(np.ascontiguousarray(rgb))
        if res.pose_landmarks is None:
            print(f"mediapipe found no pose on {name}", file=sys.stderr)
            return 1
        entries[name] = {
            "image_size": [width, height],
            # The legacy API leaves presence unset (0.0); only visibility is compared.
            "landmarks": [
                [round(v, 4) for v in (lm.x * width, lm.y * height, lm.z * width, lm.visibility)]
                for lm in res.pose_landmarks.landmark
            ],
        }
    doc = {
        "source": "skimage.data.astronaut(); astronaut_top_384 is its first 384 rows",
        "producer": f"mediapipe {mp.__version__}, mp.solutions.pose, static_image_mode=True, "
        "model_complexity=1, smooth_landmarks=False",
        "made_by": "tools/mediapipe_reference.py (run in a scratch venv; see its docstring)",
        "columns": ["x_px", "y_px", "z_px", "visibility"],
        "images": entries,
    }
    text = json.dumps(doc, indent=1)
    # One landmark per line keeps the committed file short and diffable.
    text = re.sub(
        r"\[\s+([-\d.e]+),\s+([-\d.e]+),\s+([-\d.e]+),\s+([-\d.e]+)\s+\]", r"[\1, \2, \3, \4]", text
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {len(entries)} images' landmarks to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
