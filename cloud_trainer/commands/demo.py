"""``booth demo``: the whole booth end to end on this machine (what ``make demo`` runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_agent.errors import BadInput


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workdir", type=Path, default=Path("var/demo"), help="where the demo keeps its state"
    )
    p.add_argument(
        "--keep-serving",
        action="store_true",
        help="leave the app up afterwards for a person to explore",
    )
    p.add_argument("--seconds", type=float, default=15.0, help="take length (default 15)")
    p.add_argument("--cameras", type=int, default=2)
    p.add_argument("--fps", type=float, default=120.0)
    p.add_argument("--size", default="640x480", help="camera size WxH")
    p.add_argument("--train-size", type=int, default=64, help="generator size in px (power of two)")
    p.add_argument("--budget-s", type=float, default=150.0, help="training wall-clock budget")
    p.add_argument("--reference", default="synthetic:warmup", help="reference dance")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import shutil

    from cloud_trainer.demo import DemoPlan, run_demo
    from edge_agent.config import _parse_size

    try:
        size = _parse_size(args.size)
    except ValueError as e:
        raise BadInput(str(e)) from None
    if args.seconds <= 0 or args.fps <= 0 or args.cameras < 1:
        raise BadInput("--seconds and --fps must be positive and --cameras at least 1")
    if args.workdir.exists():
        shutil.rmtree(
            args.workdir
        )  # a fresh booth each run; the base checkpoint is cached beside it
    plan = DemoPlan(
        workdir=args.workdir,
        cameras=args.cameras,
        take_s=args.seconds,
        fps=args.fps,
        size=size,
        train_size_px=args.train_size,
        budget_s=args.budget_s,
        reference=args.reference,
    )
    run_demo(plan, keep_serving=args.keep_serving, progress=not args.no_progress)
    return 0
