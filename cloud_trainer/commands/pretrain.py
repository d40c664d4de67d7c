"""``booth pretrain``: build the booth's base checkpoint from many takes.

Synthetic attendees by default (``--attendees 1..K``), or recorded take directories
(``--takes DIR ...``). Training settings start from the config's ``trainer`` section
(``--config``) and the flags override them. Rerunning with the same ``--out`` resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from edge_agent.errors import BadInput


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="base checkpoint directory"
    )
    p.add_argument(
        "--attendees",
        default="1..8",
        metavar="SEEDS",
        help="synthetic attendees to dance, e.g. 1..8 or 1,3,5 (default 1..8)",
    )
    p.add_argument(
        "--takes",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="take directories instead of synthetic attendees",
    )
    p.add_argument(
        "--size", type=int, default=None, metavar="PX", help="image size (power of two, 32..512)"
    )
    p.add_argument("--label-map", choices=("skeleton", "parts"), default=None)
    p.add_argument("--steps", type=int, default=None, metavar="N", help="stop after N steps")
    p.add_argument("--budget-s", type=float, default=None, metavar="S", help="wall-clock budget")
    p.add_argument("--batch", type=int, default=None, metavar="B")
    p.add_argument("--seconds", type=float, default=15.0, metavar="S", help="synthetic take length")
    p.add_argument("--fps", type=float, default=15.0, metavar="F", help="synthetic take frame rate")
    p.add_argument(
        "--config", type=Path, default=None, metavar="FILE", help="booth config (trainer section)"
    )
    p.add_argument(
        "--publish",
        metavar="blob:PREFIX",
        help="also upload the base to the blob store of --config, where "
        "trainer.base_checkpoint names it (e.g. blob:base/booth-1)",
    )
    p.add_argument(
        "--from",
        dest="from_base",
        metavar="BASE",
        help="continue an older base (a directory, or blob:PREFIX in --config's store) "
        "instead of starting from scratch; the config's trainer.base_checkpoint is the "
        "workers' base, which this command builds, and is not read",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


# The trainer settings the flags override, so an error names what the person typed.
TRAINER_FLAGS = {
    "size_px": "--size",
    "label_map": "--label-map",
    "max_steps": "--steps",
    "budget_s": "--budget-s",
    "batch": "--batch",
}


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from cloud_trainer.config import BoothConfig, load_config
    from edge_agent.config import flags_error

    # Every flag is checked before anything heavy is imported or done.
    if not (math.isfinite(args.seconds) and 1 <= args.seconds <= 600):
        raise BadInput(f"--seconds must be 1..600, got {args.seconds:g}")
    if not (math.isfinite(args.fps) and 1 <= args.fps <= 120):
        raise BadInput(f"--fps must be 1..120, got {args.fps:g}")
    booth = load_config(args.config) if args.config else BoothConfig()
    update = {
        k: v
        for k, v in {
            "size_px": args.size,
            "label_map": args.label_map,
            "max_steps": args.steps,
            "budget_s": args.budget_s,
            "batch": args.batch,
        }.items()
        if v is not None
    }
    # The config's base_checkpoint is where the workers find the base this builds (the
    # deploy config names the --publish target): continuing from it is asked for with
    # --from (resolved below), never implied.
    update["base_checkpoint"] = None
    try:
        # TrainerConfig's own rules (32..512, a power of two, ...) are the ones a job meets.
        cfg = booth.trainer.model_validate({**booth.trainer.model_dump(), **update})
    except ValidationError as e:
        raise BadInput(
            f"bad training setting: {flags_error(e, TRAINER_FLAGS, 'trainer.')}"
        ) from None
    publish = None
    if args.publish:
        from cloud_trainer.config import blob_prefix, blob_uri

        if not args.config:
            # The embedded defaults' store is ./var/blobs: an hour of training would be
            # published where no worker looks.
            raise BadInput(
                "--publish needs the booth's config (--config FILE or BOOTH_CONFIG): it names "
                "the store the workers read the base from"
            )
        try:
            publish = blob_uri(args.publish, booth.storage)
        except ValueError as e:
            raise BadInput(f"--publish: {e}") from None
        if not blob_prefix(publish):
            raise BadInput(f"--publish needs blob:<prefix>, got {args.publish!r}")
    if args.takes:
        missing = [str(t) for t in args.takes if not t.is_dir()]
        if missing:
            raise BadInput(f"take directory not found: {', '.join(missing)}")
        takes: list = list(args.takes)
        inputs = {"takes": [str(t.resolve()) for t in args.takes]}
    else:
        from cloud_trainer.pretrain import parse_seeds  # imports TensorFlow

        try:
            seeds = parse_seeds(args.attendees)
        except ValueError as e:
            raise BadInput(f"--attendees: {e}") from None
        takes = None  # rendered below, after the heavy imports
        inputs = {"attendees": seeds, "seconds": args.seconds, "fps": args.fps}

    store = None
    if args.from_base:
        from cloud_trainer.config import blob_prefix, blob_uri

        try:
            cfg = cfg.model_copy(
                update={"base_checkpoint": blob_uri(args.from_base, booth.storage)}
            )
        except ValueError as e:
            raise BadInput(f"--from: {e}") from None
        if blob_prefix(cfg.base_checkpoint):
            from cloud_trainer.storage import create_blob_store

            store = create_blob_store(booth.storage)
        elif not Path(cfg.base_checkpoint).is_dir():
            raise BadInput(f"--from: no base checkpoint directory {args.from_base}")

    # Imported here: TensorFlow is not needed for `booth --help`.
    from tqdm import tqdm

    from cloud_trainer.pretrain import pretrain, synthetic_take_loaders

    render_bar = None
    if takes is None:
        # Each attendee is rendered when the corpus reaches them, then dropped: one
        # attendee's frames in memory at a time, whatever --attendees and --size are.
        render_bar = tqdm(
            total=len(seeds),
            desc="rendering takes",
            unit="take",
            disable=args.no_progress,
            file=sys.stderr,
        )

        def counted(load):
            def render():
                take = load()
                render_bar.update(1)
                if render_bar.n >= render_bar.total:
                    render_bar.close()
                return take

            return render

        takes = [
            counted(load)
            for load in synthetic_take_loaders(
                seeds, size_px=cfg.size_px, seconds=args.seconds, fps=args.fps
            )
        ]
    total = cfg.max_steps
    bar = tqdm(
        total=total if total else round(cfg.budget_s),
        desc="pretraining",
        unit="step" if total else "s",
        disable=args.no_progress,
        file=sys.stderr,
    )

    def progress(p) -> None:
        done = p.step if total else min(round(p.elapsed_s), bar.total)
        bar.update(max(0, done - bar.n))
        bar.set_postfix_str(
            f"{p.stage} step {p.step}" + (f" L1 {p.loss:.3f}" if p.loss is not None else "")
        )

    try:
        out, result = pretrain(
            takes,
            cfg,
            args.out,
            progress=progress,
            models_dir=booth.models_dir,
            inputs=inputs,
            store=store,
        )
    finally:
        if render_bar is not None:
            render_bar.close()
        bar.close()
    summary = {
        "base": str(out),
        "steps": result.steps,
        "best_step": result.best_step,
        "elapsed_s": result.elapsed_s,
        "ssim": result.score.get("ssim"),
        "nn_ssim": result.score.get("nn_ssim"),
        "export": str(result.export_dir),
    }
    if publish:
        summary["published"] = _publish(out, publish, booth)
    print(json.dumps(summary))
    return 0


def _publish(base: Path, uri: str, booth) -> str:
    """Upload the base (not its ``work/`` tree) under the store prefix ``uri`` names."""
    from cloud_trainer.config import blob_prefix
    from cloud_trainer.corpus import mirror_to_store
    from cloud_trainer.storage import create_blob_store

    prefix = blob_prefix(uri)
    files = [
        str(p.relative_to(base))
        for p in base.rglob("*")
        if p.is_file() and p.relative_to(base).parts[0] != "work"
    ]
    mirror_to_store(base, create_blob_store(booth.storage), prefix, only=files)
    print(f"published the base as {uri} ({len(files)} files)", file=sys.stderr)
    return uri
