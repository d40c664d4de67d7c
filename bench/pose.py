"""Pose accuracy and speed on synthetic takes with ground truth (3 attendees x 2 dances).

Frames are rendered first (640x480, not timed): per attendee and dance, two 2 s
windows (``WINDOWS_S``), one of them dance 2's turn. Then each mode of the CPU
backend runs over all of them, built as the agent builds it: the default config and
the booth zone's shadow gating. Speed is frames per second of ``estimate``
(segmentation on; in tracking mode it runs every few frames, see ``edge_agent.pose.cpu``).
Each mode is timed twice and the faster pass kept, since the machine is shared.

Baseline measured in the same pass: the time spent inside the models' ``invoke`` gives
``model_only_fps_full``/``_tracking`` (what a zero-overhead pipeline would reach);
``overhead_frac`` is the share of ``estimate`` time spent outside the models
(warps, input conversion, copies). Frames go in as rendered RGB: the agent's JPEG
decode (and its compression artefacts) is not in these numbers.

Accuracy, on the tracking-mode output (the agent's default) and on joints the ground
truth marks visible: ``detect_rate`` = frames with a detection / frames with a person;
``pck_0_1`` = joints within 0.1 x torso size (a missed frame's joints count as wrong);
``mpjpe_px`` = mean error of the joints the output has, in detected frames
(``joints_dropped_frac``: visible joints the gating dropped). ``ungated_*``: the same, tracking
without the gating (what suppressing shadows costs on frames without any).

    .venv/bin/python bench/pose.py [--fps 30] [--seconds 2]
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
from edge_agent.pose import blazepose as bp  # noqa: E402
from edge_agent.pose.base import create_pose_backend  # noqa: E402
from edge_agent.synth import Attendee, Dance, render  # noqa: E402

SIZE = (640, 480)
ATTENDEES = (1, 2, 3)
DANCES = (1, 2)
# Two windows per dance, each a take of its own: one where the choreography is under
# way past the opening groove (4 s), and dance 1's squat (10.4 s) and dance 2's turn
# (11.8 s), where the dancer shows the camera their back.
WINDOWS_S = {1: (4.0, 10.4), 2: (4.0, 11.8)}
BODY12 = list(sk.BODY_12)
GROUPS = {
    "face": list(range(5)),
    "body12": BODY12,
    "feet": list(range(17, 23)),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def render_takes(fps: float, seconds: float):
    frames = []
    for a in ATTENDEES:
        attendee = Attendee.from_seed(a)
        for d in DANCES:
            dance = Dance.from_seed(d)
            n = int(round(fps * seconds))
            for start_s in WINDOWS_S[d]:
                for i in range(n):
                    t = start_s + i / fps
                    frame = render(attendee, dance.pose(t), size=SIZE, frame_index=i)
                    frames.append((i == 0, frame))  # (first frame of a take, frame)
                log(f"rendered attendee {a} dance {d} from {start_s:g} s: {n} frames")
    return frames


class TimedInvoke:
    """Wraps an interpreter's ``invoke`` to count and time the calls one pass makes."""

    def __init__(self, interpreter) -> None:
        self.fn = interpreter.invoke
        self.calls = 0
        self.seconds = 0.0
        interpreter.invoke = self

    def __call__(self) -> None:
        t0 = time.perf_counter()
        self.fn()
        self.seconds += time.perf_counter() - t0
        self.calls += 1


def run_mode(mode: str, frames, threads: int, gated: bool = True):
    """Best-of-two wall time of estimate() over the take, model-only time, and results.

    ``gated``: the backend as the agent builds it, with the booth zone's shadow gating.
    """
    backend = create_pose_backend(
        CpuPose(models_dir=ROOT / "models", mode=mode, threads=threads),
        zone=ZoneConfig() if gated else None,
    )
    interpreters = [backend._det, backend._lm]
    if backend._segmenter is not None:
        interpreters.append(backend._segmenter._interp)
    counters = [TimedInvoke(i) for i in interpreters]
    best, model_s, results = float("inf"), float("inf"), None
    for _ in range(2):
        backend.reset()
        for c in counters:
            c.calls, c.seconds = 0, 0.0
        out = []
        t0 = time.perf_counter()
        for take_starts, f in frames:
            if take_starts:
                backend.reset()  # a new take: forget the last attendee
            out.append(backend.estimate(f.rgb))
        wall = time.perf_counter() - t0
        if wall < best:
            # The baseline, from the same pass: time inside the models' invoke() alone.
            best, model_s = wall, sum(c.seconds for c in counters)
        results = out
    names = ("detector", "landmarks", "segmentation")
    calls = {name: c.calls for name, c in zip(names, counters, strict=False)}
    backend.close()
    return results, best, model_s, calls


def accuracy(frames, results) -> dict:
    detected = hits = visible_total = 0
    person_frames = 0
    errs: list[np.ndarray] = []
    group_hits = {g: [0, 0] for g in GROUPS}
    swaps = swap_frames = dropped = 0
    for f, r in zip(frames, results, strict=True):
        vis = f.keypoints[:, 2] > 0
        torso = sk.torso_size(f.keypoints)
        if vis.sum() < 5 or not np.isfinite(torso):
            continue
        person_frames += 1
        visible_total += int(vis.sum())
        for g, idx in GROUPS.items():
            group_hits[g][1] += int(vis[idx].sum())
        if not r.detected:
            continue
        detected += 1
        d = np.hypot(*(r.skeleton[:, :2] - f.keypoints[:, :2]).T)
        ok = vis & (d < 0.1 * torso)
        hits += int(ok.sum())
        for g, idx in GROUPS.items():
            group_hits[g][0] += int(ok[idx].sum())
        # The error of joints the output has; a joint it dropped (gating) is no position,
        # and counts as a miss in PCK only.
        errs.append(d[vis & (r.skeleton[:, 2] > 0)])
        dropped += int((vis & (r.skeleton[:, 2] <= 0)).sum())
        # A left/right swap: the prediction sits nearer the mirrored joint.
        ls, rs = sk.INDEX["left_shoulder"], sk.INDEX["right_shoulder"]
        if vis[ls] and vis[rs]:
            swap_frames += 1
            straight = d[ls] + d[rs]
            crossed = np.hypot(*(r.skeleton[ls, :2] - f.keypoints[rs, :2])) + np.hypot(
                *(r.skeleton[rs, :2] - f.keypoints[ls, :2])
            )
            swaps += crossed < straight
    all_err = np.concatenate(errs) if errs else np.array([np.nan])
    return {
        "person_frames": person_frames,
        "detect_rate": detected / max(person_frames, 1),
        "pck_0_1": hits / max(visible_total, 1),
        "mpjpe_px": float(np.mean(all_err)),
        "median_err_px": float(np.median(all_err)),
        **{f"pck_0_1_{g}": h / max(n, 1) for g, (h, n) in group_hits.items()},
        "lr_swap_rate": swaps / max(swap_frames, 1),
        "joints_dropped_frac": dropped / max(visible_total, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fps", type=float, default=30.0, help="sampling rate of the takes")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each take")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    takes = render_takes(args.fps, args.seconds)
    frames = [f for _, f in takes]
    n = len(frames)
    out: dict = {"backend": "cpu", "frames": n, "size": f"{SIZE[0]}x{SIZE[1]}"}
    per_mode = {}
    for mode in ("full", "tracking"):
        log(f"running {mode} mode on {n} frames")
        results, wall_s, model_s, calls = run_mode(mode, takes, args.threads)
        per_mode[mode] = accuracy(frames, results)
        out[f"fps_{mode}"] = round(n / wall_s, 1)
        out[f"model_only_fps_{mode}"] = round(n / model_s, 1)
        out[f"overhead_frac_{mode}"] = round(1 - model_s / wall_s, 3)
        out[f"invokes_{mode}"] = calls
        log(f"{mode}: {out[f'fps_{mode}']} fps, {per_mode[mode]}")
    # The same frames without the shadow gating: what gating costs in accuracy.
    log(f"running tracking mode without gating on {n} frames")
    ungated, _, _, _ = run_mode("tracking", takes, args.threads, gated=False)
    plain = accuracy(frames, ungated)
    out["ungated_detect_rate"] = round(plain["detect_rate"], 4)
    out["ungated_pck_0_1"] = round(plain["pck_0_1"], 4)
    track = per_mode["tracking"]
    out.update(
        {
            "detect_rate": round(track["detect_rate"], 4),
            "pck_0_1": round(track["pck_0_1"], 4),
            "mpjpe_px": round(track["mpjpe_px"], 2),
            "median_err_px": round(track["median_err_px"], 2),
            "pck_0_1_body12": round(track["pck_0_1_body12"], 4),
            "pck_0_1_face": round(track["pck_0_1_face"], 4),
            "pck_0_1_feet": round(track["pck_0_1_feet"], 4),
            "lr_swap_rate": round(track["lr_swap_rate"], 4),
            "joints_dropped_frac": round(track["joints_dropped_frac"], 4),
            "detect_rate_full": round(per_mode["full"]["detect_rate"], 4),
            "pck_0_1_full": round(per_mode["full"]["pck_0_1"], 4),
            "mpjpe_px_full": round(per_mode["full"]["mpjpe_px"], 2),
            "threads": args.threads,
            "roi_scale": bp.ROI_SCALE,
        }
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    from _guard import guarded

    sys.exit(guarded(main))
