"""``booth demo``: the whole booth end to end on this machine (what ``make demo`` runs)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from edge_agent.errors import BadInput

# Written into the workdir the demo makes: only a directory holding it is deleted
# for the next run, so a mistyped --workdir never costs anyone their files.
MARKER = ".booth-demo"
DEFAULT_WORKDIR = Path("var/demo")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workdir", type=Path, default=DEFAULT_WORKDIR, help="where the demo keeps its state"
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
    from cloud_trainer.demo import DemoPlan, run_demo

    size, reference = _checked(args)
    _fresh_workdir(args.workdir)
    plan = DemoPlan(
        workdir=args.workdir,
        cameras=args.cameras,
        take_s=args.seconds,
        fps=args.fps,
        size=size,
        train_size_px=args.train_size,
        budget_s=args.budget_s,
        reference=reference,
    )
    run_demo(plan, keep_serving=args.keep_serving, progress=not args.no_progress)
    return 0


def _checked(args: argparse.Namespace) -> tuple[tuple[int, int], str]:
    """Every flag, against the settings it becomes, before anything is deleted or built.

    The config models' own rules: a value they refuse would otherwise stop the demo
    minutes in (pretraining, or the session the reference is only asked for at the end).
    """
    from pydantic import ValidationError

    from cloud_trainer.config import BoothSection, TrainerConfig
    from edge_agent.config import SyntheticSource, _parse_size, flags_error

    try:
        size = _parse_size(args.size)
    except ValueError as e:
        raise BadInput(str(e)) from None
    if args.cameras < 1:
        raise BadInput(f"--cameras must be at least 1, got {args.cameras}")
    for flag, value in (
        ("--seconds", args.seconds),
        ("--fps", args.fps),
        ("--budget-s", args.budget_s),
    ):
        if not math.isfinite(value):
            raise BadInput(f"{flag} must be a finite number, got {value:g}")
    for model, flags in (
        (BoothSection, {"take_s": ("--seconds", args.seconds)}),
        (SyntheticSource, {"size": ("--size", size), "fps": ("--fps", args.fps)}),
        (
            TrainerConfig,
            {
                "size_px": ("--train-size", args.train_size),
                "budget_s": ("--budget-s", args.budget_s),
            },
        ),
    ):
        try:
            model(**{key: value for key, (_, value) in flags.items()})
        except ValidationError as e:
            names = {key: flag for key, (flag, _) in flags.items()}
            raise BadInput(flags_error(e, names)) from None
    return size, _checked_reference(args.reference)


def _checked_reference(name: str) -> str:
    """A reference the demo's booth can offer: its store starts empty, so a built-in one."""
    from cloud_trainer.reference import BUILTIN_DANCES, SYNTHETIC, is_synthetic, storage_key
    from edge_agent.synth.choreography import Dance

    if not is_synthetic(name):
        raise BadInput(
            f"--reference: the demo's booth has only synthetic references, not {name!r} "
            f"(e.g. {', '.join(SYNTHETIC + d for d in BUILTIN_DANCES)})"
        )
    storage_key(name)  # BadInput for a name no store could hold
    try:
        Dance.parse(name[len(SYNTHETIC) :])
    except ValueError as e:
        raise BadInput(f"--reference: {e}") from None
    return name


def _older_demo(workdir: Path) -> bool:
    """The default workdir as demos before the marker left it (its config and its logs)."""
    return (
        workdir.resolve() == DEFAULT_WORKDIR.resolve()
        and (workdir / "booth.yaml").is_file()
        and (workdir / "logs").is_dir()
    )


def _fresh_workdir(workdir: Path) -> None:
    """An empty ``workdir`` with the marker: a fresh booth each run.

    A missing or empty directory is used; one with files in it is deleted first only if
    an earlier demo made it. (The base checkpoint is cached beside it, not in it.)
    """
    import shutil

    if workdir.is_symlink() or (workdir.exists() and not workdir.is_dir()):
        raise BadInput(f"--workdir {workdir} is not a directory; name a new or empty one")
    if workdir.is_dir() and any(workdir.iterdir()):
        if not (workdir / MARKER).is_file() and not _older_demo(workdir):
            raise BadInput(
                f"--workdir {workdir} is not empty and was not made by booth demo (it has no "
                f"{MARKER}), so the demo will not delete it; name a new or empty directory"
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by `booth demo`, which deletes this directory each run\n")
