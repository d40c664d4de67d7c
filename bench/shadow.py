"""False people from hard wall shadows: raw CPU pose vs. the same output after gating.

Synthetic takes at 640x480 lit by the booth's side spotlight, which throws a
person-shaped shadow on the back wall. Per attendee (3): the ``stepout`` dance, where
the dancer walks out of the frame to the left while the shadow stays in view for a
while (frames with the shadow alone), and a ``wave+step`` take with the shadow beside
the dancer. The backend runs in tracking mode with segmentation, as the agent does.

A frame has a *false person* when the pose says "detected" and either nobody is in
the frame (fewer than 3 visible ground-truth joints) or the skeleton is not on the
dancer (median distance of its confident joints to the truth above half a torso):
it followed the shadow. ``raw`` is the plain backend (the baseline, MediaPipe's
behaviour); ``ours`` is the same backend built with the default ``ZoneConfig`` (no floor
polygon), which gates every candidate before reporting or tracking it. Also reported:
frames with a dancer where a correct person is kept (the cost of gating), the share
of correctly seen joints gating keeps, and the time per frame of each.

    .venv/bin/python bench/shadow.py [--fps 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_agent import skeleton as sk  # noqa: E402
from edge_agent.config import CpuPose, ZoneConfig  # noqa: E402
from edge_agent.pose.base import create_pose_backend  # noqa: E402
from edge_agent.synth import Attendee, Dance, render  # noqa: E402

SIZE = (640, 480)
ATTENDEES = (1, 2, 3)
# (dance, start s, seconds): the first step-out (out, hold, back) and a dance beside
# the shadow.
TAKES = (("stepout", 0.6, 6.9), ("wave+step", 1.0, 2.0))
MIN_PERSON_JOINTS = 8


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def torso_px(frame) -> float:
    p = frame.projected
    i = sk.INDEX
    mid_s = (p[i["left_shoulder"]] + p[i["right_shoulder"]]) / 2
    mid_h = (p[i["left_hip"]] + p[i["right_hip"]]) / 2
    return float(np.hypot(*(mid_s - mid_h)))


def on_the_dancer(result, frame) -> bool:
    vis = frame.keypoints[:, 2] > 0
    conf = vis & (result.skeleton[:, 2] >= 0.5)
    if conf.sum() < 3:
        return False
    d = np.hypot(*(result.skeleton[conf, :2] - frame.keypoints[conf, :2]).T)
    return float(np.median(d)) <= 0.5 * torso_px(frame)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fps", type=float, default=30.0, help="sampling rate of the takes")
    args = ap.parse_args()

    zone = ZoneConfig()
    counts = dict.fromkeys(
        (
            "frames",
            "shadow_only_frames",
            "empty_frames",
            "person_frames",
            "false_person_frames_raw",
            "false_person_frames_ours",
            "false_on_shadow_only_raw",
            "false_on_shadow_only_ours",
            "person_kept_raw",
            "person_kept_ours",
        ),
        0,
    )
    joints_seen = joints_kept = 0
    raw_s = ours_s = 0.0
    for a in ATTENDEES:
        attendee = Attendee.from_seed(a)
        for name, start, seconds in TAKES:
            dance = Dance.from_name(name)
            cfg = CpuPose(models_dir=ROOT / "models", mode="tracking", segmentation=True)
            backend = create_pose_backend(cfg)
            gated = create_pose_backend(cfg, zone=zone)
            n = int(round(seconds * args.fps))
            for k in range(n):
                frame = render(
                    attendee,
                    dance.pose(start + k / args.fps),
                    size=SIZE,
                    frame_index=k,
                    shadow="hard",
                )
                t0 = time.perf_counter()
                raw = backend.estimate(frame.rgb)
                t1 = time.perf_counter()
                ours = gated.estimate(frame.rgb)
                raw_s += t1 - t0
                ours_s += time.perf_counter() - t1
                visible = int((frame.keypoints[:, 2] > 0).sum())
                nobody = visible < 3
                shadow_only = (
                    not frame.in_frame.any()
                    and frame.shadow_mask is not None
                    and frame.shadow_mask.any()
                )
                counts["frames"] += 1
                counts["shadow_only_frames"] += shadow_only
                counts["empty_frames"] += nobody and not shadow_only
                for tag, r in (("raw", raw), ("ours", ours)):
                    false = r.detected and (nobody or not on_the_dancer(r, frame))
                    counts[f"false_person_frames_{tag}"] += false
                    counts[f"false_on_shadow_only_{tag}"] += false and shadow_only
                if visible >= MIN_PERSON_JOINTS:
                    counts["person_frames"] += 1
                    counts["person_kept_raw"] += raw.detected and on_the_dancer(raw, frame)
                    counts["person_kept_ours"] += ours.detected and on_the_dancer(ours, frame)
                    if on_the_dancer(raw, frame) and ours.detected:
                        # Joints the plain backend sees on the dancer that gating keeps.
                        seen = (frame.keypoints[:, 2] > 0) & (raw.skeleton[:, 2] >= 0.5)
                        joints_seen += int(seen.sum())
                        joints_kept += int((seen & (ours.skeleton[:, 2] >= 0.5)).sum())
            backend.close()
            gated.close()
            log(f"attendee {a} {name}: {n} frames; running totals {counts}")
    out = {
        **{k: int(v) for k, v in counts.items()},
        "person_joints_kept_frac": round(joints_kept / max(joints_seen, 1), 4),
        "raw_ms_per_frame": round(1e3 * raw_s / max(counts["frames"], 1), 2),
        "ours_ms_per_frame": round(1e3 * ours_s / max(counts["frames"], 1), 2),
        "zone": "default (whole frame, face contrast 40, mask overlap 0.3)",
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    from _guard import guarded

    sys.exit(guarded(main))
