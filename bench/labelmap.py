"""Benchmark: ``skeleton`` vs ``parts`` label maps under the same wall-clock budget.

One synthetic attendee dances 15 s in the booth. The same job (``train_job``: same
take, same budget, from scratch, same seed) runs once per label map; each job
scores its best checkpoint as every job does (``cloud_trainer.score``): SSIM
inside the person box on the held-out last 10% of the take, against the real
frames, and the nearest-neighbour baseline on the same frames (the training
frame with the closest pose; it depends only on poses, so it is the same for
both maps).

Also reported, as ``transfer_*``: the same attendee rendered noise-free in a
different dance's poses (true ground truth of motion transfer). Caveat for
``parts`` there: its label maps use that attendee's own silhouette in the new
poses, which a renderer does not have (it has the reference dancer's), so the
transfer score flatters ``parts``; the held-out score does not (on real takes its
masks come from the attendee's own frames, as here).

Prints progress to stderr and one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloud_trainer.config import TrainerConfig  # noqa: E402
from cloud_trainer.corpus import TakeData  # noqa: E402
from cloud_trainer.pretrain import synth_frame_size  # noqa: E402
from cloud_trainer.train import JobSpec, train_job  # noqa: E402

WORK = ROOT / "bench" / ".cache" / "labelmap"
ATTENDEE, DANCE, TRANSFER_DANCE = 21, 1021, 1022


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64, choices=(64, 128))
    p.add_argument("--budget-s", type=float, default=240.0, help="per label map")
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t0 = time.monotonic()
    take = TakeData.from_synth(
        ATTENDEE,
        DANCE,
        seconds=15,
        fps=15,
        size=synth_frame_size(args.size),
        transfer_dance=TRANSFER_DANCE,
        transfer_frames=32,
    )
    say(f"take: {len(take)} frames; budget {args.budget_s:.0f} s per label map")
    scores = {}
    for kind in ("skeleton", "parts"):
        work = WORK / kind
        shutil.rmtree(work, ignore_errors=True)  # a fresh job each run, never a resume
        cfg = TrainerConfig(
            size_px=args.size,
            label_map=kind,
            batch=args.batch,
            budget_s=args.budget_s,
            checkpoint_every_s=max(10.0, args.budget_s / 8),
            checkpoint_every_steps=10**6,
            work_dir=work,
        )
        last = [0.0]

        def progress(pr, kind=kind, last=last) -> None:
            if time.monotonic() - last[0] > 20 or pr.stage != "training":
                last[0] = time.monotonic()
                say(f"  {kind}: {pr.stage} step {pr.step} ({pr.elapsed_s:.0f} s)")

        result = train_job(JobSpec(f"bench-{kind}", [take]), cfg, None, progress, models_dir=None)
        s = result.score
        say(
            f"{kind}: {result.steps} steps, held-out SSIM {s['ssim']:.4f} (NN {s['nn_ssim']:.4f}), "
            f"transfer SSIM {s.get('transfer_ssim', float('nan')):.4f} "
            f"(NN {s.get('transfer_nn_ssim', float('nan')):.4f}), {result.elapsed_s:.0f} s"
        )
        scores[kind] = {"steps": result.steps, "elapsed_s": result.elapsed_s, **s}
    sk, pa = scores["skeleton"], scores["parts"]
    out = {
        "ssim_skeleton": round(sk["ssim"], 4),
        "ssim_parts": round(pa["ssim"], 4),
        "ssim_nn_baseline": round(sk["nn_ssim"], 4),
        "winner": "parts" if pa["ssim"] > sk["ssim"] else "skeleton",
        "both_beat_nn": sk["ssim"] > sk["nn_ssim"] and pa["ssim"] > pa["nn_ssim"],
        "psnr_skeleton": round(sk["psnr"], 2),
        "psnr_parts": round(pa["psnr"], 2),
        "psnr_nn_baseline": round(sk["nn_psnr"], 2),
        "transfer_ssim_skeleton": round(sk.get("transfer_ssim", float("nan")), 4),
        "transfer_ssim_parts": round(pa.get("transfer_ssim", float("nan")), 4),
        "transfer_ssim_nn_baseline": round(sk.get("transfer_nn_ssim", float("nan")), 4),
        "steps_skeleton": sk["steps"],
        "steps_parts": pa["steps"],
        "size": args.size,
        "budget_s": args.budget_s,
        "heldout_frames": sk["frames"],
        "total_s": round(time.monotonic() - t0, 1),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    from _guard import guarded

    sys.exit(guarded(main))
