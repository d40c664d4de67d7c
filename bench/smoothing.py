"""Benchmark: smoothing real CPU-pose output on synthetic takes, with injected faults.

Each take is a synthetic attendee dancing a seeded choreography, rendered at
640x480 and 120 fps; the CPU pose backend (BlazePose, tracking mode) estimates
every frame. Those pose outputs are cached under ``bench/.cache/smoothing/`` (the
key covers the synth and pose sources, the pose settings, the model files and the
runtime versions, so any change to them re-renders). On top of
the real detector noise we inject, with a fixed seed:

- dropouts: runs of 1-12 frames of a missing joint, and runs of 1-6 frames with
  the whole skeleton missing;
- outliers: a joint jumps 0.3-1.0 torso lengths in a random direction for 1-3
  frames, at full confidence (a confidently wrong detector).

Compared, on the same frames:

- ``raw``: the corrupted detector output; a missing joint keeps its last value
  for up to ``max_gap_frames`` frames (what a consumer without a smoother draws);
- ``one_euro``: the plain One Euro filter, its two parameters tuned on this very
  data by grid search (the strongest version of the baseline); the config's
  defaults are reported too;
- ``ours``: ``CausalSmoother`` with the default config;
- ``offline``: ``smooth_offline`` (RTS) with the default config.

``jitter_px`` is the mean frame-to-frame acceleration |x[t+1] - 2x[t] + x[t-1]|,
for the ground truth too: the shake a viewer sees, which the mean error hides.

Errors are mean pixel distances to the ground truth over joints the ground truth
marks visible, on every frame where all four methods output the joint (imputed
joints included). ``lag_frames`` is the time shift that minimises the squared
error between our output and the ground truth over moving joints (sub-frame, by
a parabola through the best integer shift); positive means the output trails.

Prints progress to stderr and one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_agent import skeleton as sk  # noqa: E402
from edge_agent.config import CpuPose, SmoothingConfig  # noqa: E402
from edge_agent.smoothing import CausalSmoother, OneEuroFilter, smooth_offline  # noqa: E402

log = logging.getLogger("bench.smoothing")

CACHE = ROOT / "bench" / ".cache" / "smoothing"
# Sources whose change invalidates cached pose outputs (with the pose settings, the
# model files and the runtime's version: see _sources_digest).
CACHE_SOURCES = ("edge_agent/synth", "edge_agent/pose", "edge_agent/skeleton.py")

ONE_EURO_GRID_MIN_CUTOFF_HZ = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
ONE_EURO_GRID_BETA = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1)
# A joint counts as moving, for the lag measurement, above this many torso lengths/s.
MOVING_TORSO_PER_S = 1.0
MAX_LAG_FRAMES = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attendees", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument(
        "--dances", type=int, nargs="+", default=[1, 2, 3], help="one dance seed per attendee"
    )
    p.add_argument("--seconds", type=float, default=4.0, help="length of each take")
    p.add_argument("--start-s", type=float, default=1.0, help="where in the dance takes start")
    p.add_argument("--fps", type=float, default=120.0)
    p.add_argument("--size", default="640x480")
    p.add_argument("--viewpoint", type=int, default=0)
    p.add_argument("--seed", type=int, default=4, help="fault-injection seed")
    p.add_argument(
        "--dropout-rate",
        type=float,
        default=0.01,
        help="per joint and frame, chance that a 1-12 frame dropout starts",
    )
    p.add_argument(
        "--frame-dropout-rate",
        type=float,
        default=0.005,
        help="per frame, chance that a 1-6 frame whole-skeleton dropout starts",
    )
    p.add_argument(
        "--outlier-rate",
        type=float,
        default=0.004,
        help="per joint and frame, chance that a 1-3 frame outlier starts",
    )
    p.add_argument("--threads", type=int, default=2, help="pose backend threads")
    p.add_argument("--no-cache", action="store_true", help="re-render and re-estimate")
    args = p.parse_args(argv)
    if len(args.dances) != len(args.attendees):
        p.error("give one dance seed per attendee")
    return args


# ---- takes: rendered frames, ground truth and real pose output --------------------


def _sources_digest() -> str:
    """What the cached pose outputs depend on: code, pose settings, models and runtime."""
    from importlib import metadata

    h = hashlib.sha256()
    for rel in CACHE_SOURCES:
        path = ROOT / rel
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(ROOT)).encode())
            h.update(f.read_bytes())
    h.update(CpuPose(models_dir=ROOT / "models").model_dump_json().encode())
    for model in sorted((ROOT / "models").glob("*.tflite")):
        h.update(model.name.encode())
        h.update(hashlib.sha256(model.read_bytes()).digest())
    for dist in ("ai-edge-litert", "opencv-python-headless", "numpy"):
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=none".encode())
    return h.hexdigest()[:12]


def take_poses(
    attendee: int, dance: int, args: argparse.Namespace
) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth and CPU-pose skeletons (N, 23, 3) for one take, from cache if possible."""
    w, h = (int(v) for v in args.size.lower().split("x"))
    take = (
        f"a{attendee}_d{dance}_v{args.viewpoint}_{w}x{h}_{args.fps:g}fps"
        f"_{args.start_s:g}+{args.seconds:g}s"
    )
    key = f"{take}_{_sources_digest()}"
    path = CACHE / f"{key}.npz"
    if path.exists() and not args.no_cache:
        with np.load(path) as z:
            return z["gt"], z["pose"]

    from edge_agent.pose.base import create_pose_backend
    from edge_agent.synth import Attendee, Dance, render

    who = Attendee.from_seed(attendee)
    moves = Dance.from_seed(dance)
    n = int(round(args.fps * args.seconds))
    backend = create_pose_backend(CpuPose(models_dir=ROOT / "models", threads=args.threads))
    gt = np.zeros((n, sk.NUM_JOINTS, 3), np.float32)
    pose = np.zeros((n, sk.NUM_JOINTS, 3), np.float32)
    t0 = time.perf_counter()
    try:
        for i in range(n):
            body = moves.pose(args.start_s + i / args.fps)
            frame = render(who, body, size=(w, h), viewpoint=args.viewpoint, frame_index=i)
            gt[i] = frame.keypoints
            pose[i] = backend.estimate(frame.rgb).skeleton
            if i % 60 == 0:
                print(f"  {key}: frame {i}/{n}, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    finally:
        backend.close()
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part.npz")
    np.savez_compressed(tmp, gt=gt, pose=pose)
    tmp.replace(path)
    # Outputs of older synth/pose code for this take will never be read again.
    for stale in CACHE.glob(f"{take}_*.npz"):
        if stale != path:
            stale.unlink(missing_ok=True)
    return gt, pose


# ---- fault injection --------------------------------------------------------------------


def inject(
    pose: np.ndarray, torso_px: float, rng: np.random.Generator, args: argparse.Namespace
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Corrupt a pose sequence; return it with the dropped and the outlier (frame, joint) masks."""
    out = pose.copy()
    n, j = out.shape[:2]
    dropped = np.zeros((n, j), dtype=bool)
    for f, k in zip(*np.nonzero(rng.random((n, j)) < args.dropout_rate), strict=True):
        dropped[f : f + rng.integers(1, 13), k] = True
    for f in np.flatnonzero(rng.random(n) < args.frame_dropout_rate):
        dropped[f : f + rng.integers(1, 7)] = True
    outlier = np.zeros((n, j), dtype=bool)
    for f, k in zip(*np.nonzero(rng.random((n, j)) < args.outlier_rate), strict=True):
        span = slice(f, f + rng.integers(1, 4))
        angle = rng.uniform(0, 2 * np.pi)
        jump = rng.uniform(0.3, 1.0) * torso_px * np.array([np.cos(angle), np.sin(angle)])
        out[span, k, :2] += jump.astype(np.float32)
        out[span, k, 2] = np.maximum(out[span, k, 2], 0.9)
        outlier[span, k] = True
    out[dropped] = 0.0
    return out, dropped, outlier & ~dropped


# ---- the methods ------------------------------------------------------------------------


def hold(seq: np.ndarray, min_score: float, max_gap: int) -> np.ndarray:
    out = np.zeros_like(seq)
    last = np.zeros(seq.shape[1:], seq.dtype)
    age = np.full(seq.shape[1], max_gap + 1)
    for i, frame in enumerate(seq):
        seen = frame[:, 2] >= max(min_score, 1e-9)
        last[seen] = frame[seen]
        age = np.where(seen, 0, age + 1)
        out[i] = np.where((age <= max_gap)[:, None], last, 0.0)
    return out


def run_one_euro(
    seqs: list[np.ndarray], fps: float, cfg: SmoothingConfig, mc: float, beta: float
) -> list[np.ndarray]:
    outs = []
    for seq in seqs:
        f = OneEuroFilter(fps, mc, beta, cfg.d_cutoff_hz, cfg.min_score, cfg.max_gap_frames)
        outs.append(np.stack([f.update(x) for x in seq]))
    return outs


def run_causal(
    seqs: list[np.ndarray], fps: float, cfg: SmoothingConfig
) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    outs, glitches, spent, frames = [], [], 0.0, 0
    for seq in seqs:
        sm = CausalSmoother(cfg, fps)
        t0 = time.perf_counter()
        res = [sm.update(x) for x in seq]
        spent += time.perf_counter() - t0
        frames += len(seq)
        outs.append(np.stack([r.skeleton for r in res]))
        glitches.append(np.array([r.glitch for r in res]))
    return outs, glitches, spent / frames * 1e6


# ---- scoring ----------------------------------------------------------------------------


def err_px(outs: list[np.ndarray], gts: list[np.ndarray], masks: list[np.ndarray]) -> float:
    d = [
        np.linalg.norm(o[..., :2] - g[..., :2], axis=-1)[m]
        for o, g, m in zip(outs, gts, masks, strict=True)
    ]
    return float(np.concatenate(d).mean())


def jitter_px(outs: list[np.ndarray], masks: list[np.ndarray]) -> float:
    """Mean |x[t+1] - 2 x[t] + x[t-1]| (px/frame^2) where the joint is in all three frames.

    At 120 fps a dancer's true acceleration is a fraction of a pixel per frame^2, so
    this is mostly the frame-to-frame shake a viewer sees, which a mean error hides.
    """
    d = []
    for o, m in zip(outs, masks, strict=True):
        acc = np.linalg.norm(o[2:, :, :2] - 2 * o[1:-1, :, :2] + o[:-2, :, :2], axis=-1)
        d.append(acc[m[2:] & m[1:-1] & m[:-2]])
    return float(np.concatenate(d).mean())


def lag_frames(outs: list[np.ndarray], gts: list[np.ndarray], moving: list[np.ndarray]) -> float:
    """The shift s minimising |out[t + s] - gt[t]|^2 over moving joints; sub-frame."""
    shifts = np.arange(-MAX_LAG_FRAMES, MAX_LAG_FRAMES + 1)
    cost = []
    for s in shifts:
        num, den = 0.0, 0
        for o, g, m in zip(outs, gts, moving, strict=True):
            n = len(g)
            lo, hi = max(0, -s), min(n, n - s)
            oo, gg, mm = o[lo + s : hi + s], g[lo:hi], m[lo:hi] & (o[lo + s : hi + s, :, 2] > 0)
            num += float((((oo[..., :2] - gg[..., :2]) ** 2).sum(-1))[mm].sum())
            den += int(mm.sum())
        cost.append(num / max(den, 1))
    cost = np.array(cost)
    k = int(np.argmin(cost))
    if 0 < k < len(cost) - 1:
        a, b, c = cost[k - 1], cost[k], cost[k + 1]
        curv = a - 2 * b + c
        frac = 0.5 * (a - c) / curv if curv > 0 else 0.0
        return float(shifts[k] + frac)
    return float(shifts[k])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = SmoothingConfig()
    fps = args.fps
    rng = np.random.default_rng(args.seed)

    gts, raws, corrupted, drops, outls = [], [], [], [], []
    for a, d in zip(args.attendees, args.dances, strict=True):
        print(f"take: attendee {a}, dance {d}", file=sys.stderr)
        gt, pose = take_poses(a, d, args)
        torso = float(np.nanmedian([sk.torso_size(f) for f in gt]))
        bad, dropped, outlier = inject(pose, torso, rng, args)
        gts.append(gt)
        raws.append(pose)
        corrupted.append(bad)
        drops.append(dropped)
        outls.append(outlier)
    frames = sum(len(g) for g in gts)

    print("filtering", file=sys.stderr)
    raw_out = [hold(s, cfg.min_score, cfg.max_gap_frames) for s in corrupted]
    ours, glitch, ours_us = run_causal(corrupted, fps, cfg)
    t0 = time.perf_counter()
    offline = [smooth_offline(s, fps, cfg).skeletons for s in corrupted]
    offline_ms = (time.perf_counter() - t0) / frames * 1e3
    euro_default = run_one_euro(corrupted, fps, cfg, cfg.min_cutoff_hz, cfg.beta)

    visible = [g[..., 2] > 0 for g in gts]

    def common(*methods: list[np.ndarray]) -> list[np.ndarray]:
        masks = []
        for i, vis in enumerate(visible):
            m = vis.copy()
            for out in methods:
                m &= out[i][..., 2] > 0
            masks.append(m)
        return masks

    # The strongest One Euro: tuned on this data (same mask as everyone else).
    print("tuning the One Euro baseline", file=sys.stderr)
    best = None
    for mc in ONE_EURO_GRID_MIN_CUTOFF_HZ:
        for beta in ONE_EURO_GRID_BETA:
            outs = run_one_euro(corrupted, fps, cfg, mc, beta)
            e = err_px(outs, gts, common(outs, ours, raw_out, offline))
            if best is None or e < best[0]:
                best = (e, mc, beta, outs)
    _, euro_mc, euro_beta, euro = best

    masks = common(raw_out, euro, ours, offline)
    raw_err = err_px(raw_out, gts, masks)
    euro_err = err_px(euro, gts, masks)
    ours_err = err_px(ours, gts, masks)
    offline_err = err_px(offline, gts, masks)

    # The detector's own convention: its mean offset per joint and take, measured
    # on the uncorrupted output. No filter can see (or remove) that offset, so
    # errors against "ground truth + offset" isolate what filtering can change:
    # jitter, dropouts and outliers.
    shifted = []
    for g, r, vis in zip(gts, raws, visible, strict=True):
        ok = vis & (r[..., 2] >= cfg.min_score)
        offset = np.zeros((sk.NUM_JOINTS, 2), np.float32)
        for j in range(sk.NUM_JOINTS):
            if ok[:, j].any():
                offset[j] = (r[ok[:, j], j, :2] - g[ok[:, j], j, :2]).mean(axis=0)
        moved = g.copy()
        moved[..., :2] += offset
        shifted.append(moved)
    raw_jit = err_px(raw_out, shifted, masks)
    ours_jit = err_px(ours, shifted, masks)

    # Moving joints, for the lag: ground-truth speed above a threshold.
    moving = []
    for g, vis in zip(gts, visible, strict=True):
        torso = float(np.nanmedian([sk.torso_size(f) for f in g]))
        speed = np.zeros(vis.shape)
        speed[1:] = np.linalg.norm(np.diff(g[..., :2], axis=0), axis=-1) * fps / torso
        both = np.zeros(vis.shape, dtype=bool)
        both[1:] = vis[1:] & vis[:-1]
        moving.append(both & (speed > MOVING_TORSO_PER_S))

    flagged = np.concatenate(glitch)
    outlier_frames = np.concatenate([o.any(axis=1) for o in outls])
    dropped_frames = np.concatenate([d.any(axis=1) for d in drops])
    clean_frames = ~outlier_frames & ~dropped_frames
    # Joint-level errors on the pose output before injection: the floor no filter removes.
    pose_masks = [v & (r[..., 2] >= cfg.min_score) for v, r in zip(visible, raws, strict=True)]

    result = {
        "raw_err_px": round(raw_err, 3),
        "one_euro_err_px": round(euro_err, 3),
        "ours_err_px": round(ours_err, 3),
        "offline_err_px": round(offline_err, 3),
        "reduction": round(1.0 - ours_err / raw_err, 3),
        "lag_frames": round(lag_frames(ours, gts, moving), 2),
        "offline_reduction": round(1.0 - offline_err / raw_err, 3),
        "raw_err_debiased_px": round(raw_jit, 3),
        "one_euro_err_debiased_px": round(err_px(euro, shifted, masks), 3),
        "ours_err_debiased_px": round(ours_jit, 3),
        "offline_err_debiased_px": round(err_px(offline, shifted, masks), 3),
        "reduction_debiased": round(1.0 - ours_jit / raw_jit, 3),
        "one_euro_params": {"min_cutoff_hz": euro_mc, "beta": euro_beta},
        "one_euro_default_err_px": round(err_px(euro_default, gts, masks), 3),
        "one_euro_lag_frames": round(lag_frames(euro, gts, moving), 2),
        "raw_lag_frames": round(lag_frames(raw_out, gts, moving), 2),
        "jitter_px": {
            name: round(jitter_px(out, masks), 3)
            for name, out in (
                ("ground_truth", gts),
                ("raw", raw_out),
                ("one_euro", euro),
                ("ours", ours),
                ("offline", offline),
            )
        },
        "pose_err_uncorrupted_px": round(err_px(raws, gts, pose_masks), 3),
        "pose_err_uncorrupted_debiased_px": round(err_px(raws, shifted, pose_masks), 3),
        "outlier_err_px": {
            name: round(err_px(out, gts, [m & o for m, o in zip(masks, outls, strict=True)]), 2)
            for name, out in (
                ("raw", raw_out),
                ("one_euro", euro),
                ("ours", ours),
                ("offline", offline),
            )
        },
        "imputed_err_px": {
            name: round(err_px(out, gts, [m & d for m, d in zip(masks, drops, strict=True)]), 2)
            for name, out in (
                ("raw", raw_out),
                ("one_euro", euro),
                ("ours", ours),
                ("offline", offline),
            )
        },
        "coverage": {
            name: round(
                float(
                    sum((v & (o[..., 2] > 0)).sum() for v, o in zip(visible, out, strict=True))
                    / sum(v.sum() for v in visible)
                ),
                4,
            )
            for name, out in (
                ("raw", raw_out),
                ("one_euro", euro),
                ("ours", ours),
                ("offline", offline),
            )
        },
        "glitch_rate_on_outlier_frames": round(float(flagged[outlier_frames].mean()), 3),
        "glitch_rate_on_clean_frames": round(float(flagged[clean_frames].mean()), 4),
        "ours_us_per_frame": round(ours_us, 1),
        "offline_ms_per_frame": round(offline_ms, 3),
        "takes": len(gts),
        "frames": frames,
        "fps": fps,
        "size": args.size,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from _guard import guarded

    sys.exit(guarded(main))
