"""The booth's base checkpoint: pix2pix trained on many takes, the start of every fine-tune.

By default the takes are synthetic attendees (``edge_agent.synth``), each dancing
its own seeded dance in the booth. Real take directories work the same way. The
base is trained like any job (``train_job``: budget, checkpoints, resumable, best
checkpoint, score) and then written as a base checkpoint directory: a TF
checkpoint with ``generator`` (the best one) and its Adam moments (what a warm
start restores, see ``train.restore_base``), plus
``base.json`` (model spec, label map, steps, score) and the job's export
(``export/``, usable for rendering as is).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import tensorflow as tf

from cloud_trainer.config import TrainerConfig
from cloud_trainer.corpus import TakeData, TrainingFailed
from cloud_trainer.model import ModelSpec
from cloud_trainer.train import (
    JobResult,
    JobSpec,
    Pix2Pix,
    ProgressFn,
    TakeRef,
    _write_json,
    save_base,
    select_runtime,
    train_job,
)

log = logging.getLogger(__name__)

# Dances of synthetic attendee n: seeded apart from the attendee numbers, so attendee 3
# does not always dance dance 3 in every experiment.
DANCE_OFFSET = 1000


def parse_seeds(spec: str) -> list[int]:
    """``1..8``, ``1,4,9`` or a mix (``1..3,7``) -> sorted unique seeds."""
    seeds: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        m = re.fullmatch(r"(\d+)\s*(?:\.\.|-)\s*(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f"empty range {part!r}")
            seeds.update(range(lo, hi + 1))
        elif part.isdigit():
            seeds.add(int(part))
        else:
            raise ValueError(f"expected seeds like 1..8 or 1,4,9, got {spec!r}")
    return sorted(seeds)


def synth_frame_size(size_px: int) -> tuple[int, int]:
    """Render size for a training size: the booth framing crops ~80% of the frame height."""
    return size_px * 2, size_px * 3 // 2


def synthetic_take_loaders(
    attendees: Sequence[int],
    *,
    size_px: int,
    seconds: float = 15.0,
    fps: float = 15.0,
    viewpoint: int = 0,
) -> list[Callable[[], TakeData]]:
    """One function per attendee that renders their take when called.

    A job given these renders each take when its corpus reaches it and drops it once
    written, so pretraining holds one attendee's frames at a time (8 attendees of
    15 s at 256 px, rendered up front, took about 1.4 GB).
    """
    return [
        functools.partial(
            TakeData.from_synth,
            a,
            DANCE_OFFSET + a,
            seconds=seconds,
            fps=fps,
            size=synth_frame_size(size_px),
            viewpoint=viewpoint,
        )
        for a in attendees
    ]


def synthetic_takes(attendees: Sequence[int], **kw: Any) -> Iterator[TakeData]:
    """The takes of ``synthetic_take_loaders``, rendered as they are iterated."""
    for load in synthetic_take_loaders(attendees, **kw):
        yield load()


def pretrain(
    takes: Sequence[TakeRef],
    cfg: TrainerConfig,
    out_dir: Path,
    *,
    progress: ProgressFn | None = None,
    models_dir: Path | None = None,
    inputs: dict[str, Any] | None = None,
    store: Any = None,
) -> tuple[Path, JobResult]:
    """Train a base on ``takes`` and write it to ``out_dir``; resumable like any job.

    ``cfg.work_dir`` is replaced by ``out_dir/work``; ``cfg.base_checkpoint`` (if set)
    continues an older base (``blob:`` ones are read from ``store``). ``inputs`` describes the takes (attendee seeds, take
    directories): with the size, label map and batch it is the base's recipe, kept in
    ``out_dir``. A rerun resumes only the same recipe; another one is refused, since
    resuming it would train on a corpus and checkpoints made for the first.
    """
    if not takes:
        raise TrainingFailed("pretraining needs at least one take")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainingFailed(f"{out_dir} is a file, not a directory for the base checkpoint")
    _same_recipe(out_dir, _recipe(cfg, takes, inputs))
    job_cfg = cfg.model_copy(update={"work_dir": out_dir / "work"})
    result = train_job(
        JobSpec("pretrain", list(takes)), job_cfg, store, progress, models_dir=models_dir
    )
    if result.stopped == "done-before" and cfg.max_steps and result.steps < cfg.max_steps:
        raise TrainingFailed(
            f"the base in {out_dir} already finished after {result.steps} steps; a rerun "
            f"does not train it to {cfg.max_steps}: use a new --out, with "
            f"--from {out_dir} to start from this base"
        )
    # The base: the best generator, with the optimizer state of the last step.
    runtime = select_runtime(job_cfg)
    model = Pix2Pix(
        ModelSpec.for_size(cfg.size_px),
        learning_rate=cfg.learning_rate,
        l1_weight=cfg.l1_weight,
        global_batch=cfg.batch,
        runtime=runtime,
    )
    ckpts = out_dir / "work" / "pretrain" / "checkpoints"
    latest = tf.train.latest_checkpoint(str(ckpts / "ckpt"))
    if latest is None:
        raise TrainingFailed(f"pretraining left no checkpoint in {ckpts}")
    model.checkpoint.restore(latest).assert_existing_objects_matched()
    best = tf.train.latest_checkpoint(str(ckpts / "best"))
    if best:
        tf.train.Checkpoint(generator=model.generator).restore(
            best
        ).assert_existing_objects_matched()
    meta: dict[str, Any] = {
        "steps": result.steps,
        "best_step": result.best_step,
        "takes": len(takes),
        # Provenance: the older base this one continued (--from), or none.
        "continued_from": cfg.base_checkpoint if result.warm_start else None,
        "score": result.score,
        "export": str(result.export_dir),
    }
    save_base(model, out_dir, label_map=cfg.label_map, meta=meta)
    log.info("base checkpoint written", extra={"out": str(out_dir), "steps": result.steps})
    return out_dir, result


RECIPE = "recipe.json"


def _recipe(cfg: TrainerConfig, takes: Sequence[TakeRef], inputs: dict[str, Any] | None) -> dict:
    return {
        "size_px": cfg.size_px,
        "label_map": cfg.label_map,
        "batch": cfg.batch,
        "inputs": inputs if inputs is not None else {"takes": len(takes)},
    }


def _same_recipe(out_dir: Path, recipe: dict[str, Any]) -> None:
    """Record ``recipe`` in a new ``out_dir``; refuse a different one in an existing one."""
    path = out_dir / RECIPE
    try:
        before = json.loads(path.read_text())
    except FileNotFoundError:
        if (out_dir / "work").exists():
            raise TrainingFailed(
                f"{out_dir} holds a pretraining run without a recorded recipe; use a new --out"
            ) from None
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(path, recipe)
        return
    except (OSError, ValueError) as e:
        raise TrainingFailed(f"{path} is unreadable ({e}); use a new --out") from None
    changed = [
        f"{k} {before.get(k)!r} -> {recipe[k]!r}" for k in recipe if before.get(k) != recipe[k]
    ]
    if changed:
        raise TrainingFailed(
            f"{out_dir} holds a base pretrained with other settings ({'; '.join(changed)}); "
            "rerun with the same settings to resume it, or use a new --out"
        )
