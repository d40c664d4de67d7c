"""Training: warm-started pix2pix under a wall-clock budget, resumable, exported for rendering.

``train_job`` is the one function a worker calls for a session. Calling it again
with the same work directory (or, on another machine, the same blob store)
resumes the job, as TF Model Garden does: the latest job checkpoint if there is
one, else the base checkpoint with ``expect_partial()``, else fresh weights. It
never starts again from step 0 when a job checkpoint exists.

The ``Budget`` covers everything from the call on: building the corpus, training,
scoring and export. Training stops when what is left would only just pay for one
more step, a last checkpoint, the score and the export, all estimated from
measured times; the job then scores and exports its *best* checkpoint (by SSIM
on held-out frames, evaluated at every checkpoint), not its last.

A job always takes its first step unless the budget cannot pay for scoring and
export after it even at their fastest; such a budget fails the job with the
numbers rather than exporting weights that never saw the attendee. The first
step is not weighed against the budget beforehand: it is mostly tracing, which a
loaded machine slows several-fold, so its guess is the least reliable, and
without it the job has no point; a tiny budget may therefore end a few seconds
late.

A worker that is asked to stop (SIGTERM on a deploy) passes ``should_stop``:
training then ends after the current step with a checkpoint mirrored to the
store, and ``train_job`` raises ``Interrupted`` so the worker hands the job back;
the next attempt resumes from that step. The budget counts the time each attempt
spent up to its last checkpoint.

NaN losses roll the job back once to the last good checkpoint at half the
learning rate; a second divergence fails the job with a readable reason.

Job directory (``trainer.work_dir/<session>``) and its mirror in the blob store::

    corpus/                    -> sessions/<sid>/corpus/       (see corpus.py)
    checkpoints/ckpt/          -> sessions/<sid>/checkpoints/ckpt/   full state, latest 2
    checkpoints/best/          -> sessions/<sid>/checkpoints/best/   best generator
    checkpoints/state.json     -> sessions/<sid>/checkpoints/state.json
    export/                    -> sessions/<sid>/model/

Export layout (``export/``, read by the renderer)::

    generator.json    {"format": 1, "label_map": "skeleton"|"parts", "size_px": S,
                       "framing": [...per take...], "spec": {...}, "step": N,
                       "score": {...}, "input": ..., "output": ...}
    saved_model/      tf.saved_model, signature "serving_default":
                      label uint8 [N, S, S, 3] RGB -> {"image": uint8 [N, S, S, 3] RGB}
    generator.tflite  the same function with batch 1, float32 weights, uint8 in and out
    score.json, progress.png, samples.png

A renderer must check ``label_map`` (``require_label_map``): a generator trained on
skeleton maps draws garbage from part maps and the other way round.

Base checkpoints (``booth pretrain``, or any job's ``checkpoints/ckpt``) are a
directory holding a TF checkpoint with ``generator`` and its Adam state ``g_opt``
(a job's also holds the discriminator, which a warm start leaves out) and a
``base.json`` describing them; ``trainer.base_checkpoint`` names it by path or as
``blob:<prefix>`` in the blob store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from cloud_trainer.config import TrainerConfig, blob_prefix, local_checkpoint_exists
from cloud_trainer.corpus import (
    Corpus,
    Examples,
    TakeData,
    TrainingFailed,
    build_corpus,
    default_segmenter,
    load_take_dir,
    mirror_from_store,
    mirror_to_store,
)
from cloud_trainer.model import (
    ModelSpec,
    build_discriminator,
    build_generator,
    build_optimizer,
    discriminator_loss,
    generator_loss,
)
from cloud_trainer.score import (
    box_metrics,
    holdout_part,
    person_box,
    plot_progress,
    score_generator,
)
from edge_agent.errors import BoothError

log = logging.getLogger(__name__)

__all__ = [
    "Budget",
    "Interrupted",
    "JobResult",
    "JobSpec",
    "Pix2Pix",
    "Progress",
    "Runtime",
    "TrainingFailed",
    "export_generator",
    "read_export",
    "require_label_map",
    "select_runtime",
    "train_job",
]

EXPORT_FORMAT = 1
BASE_META = "base.json"
STATE = "state.json"
# Held-out frames evaluated at each checkpoint to pick the best one.
EVAL_FRAMES = 16
# Safety margin kept back from the budget on top of the measured estimates.
MARGIN_S = 1.5
# Before anything is measured: seconds to save a checkpoint and to export, per million
# parameters plus a constant (measured on this machine: SavedModel + TFLite of the
# 54M-parameter 256 px generator took 7.3 s, the 7M one at 64 px 2.5 s; about
# half again as much when other jobs share the cores).
SAVE_S_PER_MPARAM = 0.03
EXPORT_S = 4.0
EXPORT_S_PER_MPARAM = 0.12
# Export and scoring relative to the first step's duration (mostly tracing), measured on
# this machine: idle, a 6 s first step at 32 px, then 2.5 s scoring and 2.7 s export;
# with other jobs on the 2 cores, 11-18 s first steps and 10-15 s exports (the
# single-threaded converter suffers most). Before the first step, its duration is
# guessed from tracing the generator alone for the first evaluation (about 5x less).
EXPORT_PER_TRACE = 1.4
SCORE_PER_TRACE = 0.4
FIRST_STEP_PER_PREDICT_TRACE = 5.0
# The least scoring and export take, the fastest measured on this machine (export 1.2 s
# at 32 px, 2.5 s at 64 px and 7.3 s at 256 px idle; scoring 0.4 s): a budget that cannot
# pay even these after the first step fails the job; one that can takes the step.
EXPORT_FLOOR_S = 1.5
EXPORT_FLOOR_S_PER_MPARAM = 0.12
SCORE_FLOOR_S = 0.5
# The pose metric costs the backend three times per scored frame (ours, NN, real).
POSE_S_PER_FRAME = 0.1


# ---- time -------------------------------------------------------------------------------


class Budget:
    """Wall-clock seconds a job may take; ``spent_s`` carries time used by earlier attempts."""

    def __init__(
        self,
        budget_s: float,
        *,
        spent_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        started_at: float | None = None,
    ) -> None:
        self.budget_s = float(budget_s)
        self.spent_s = float(spent_s)
        self._clock = clock
        self._start = clock() if started_at is None else min(started_at, clock())

    def elapsed(self) -> float:
        return self.spent_s + (self._clock() - self._start)

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()


# ---- devices ----------------------------------------------------------------------------


@dataclass
class Runtime:
    """Where and how the step runs: strategy, precision policy, XLA."""

    strategy: tf.distribute.Strategy
    device: str  # cpu | gpu | tpu
    policy: str | None  # None (float32), mixed_float16 or mixed_bfloat16
    jit_compile: bool

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": type(self.strategy).__name__,
            "device": self.device,
            "replicas": self.replicas,
            "precision": self.policy or "float32",
            "jit_compile": self.jit_compile,
        }


def cpu_has_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _tpu_strategy() -> tf.distribute.Strategy:
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu="")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.NotFoundError, tf.errors.UnavailableError) as e:
        raise TrainingFailed(f"trainer.strategy is tpu but no TPU is reachable ({e})") from e
    return tf.distribute.TPUStrategy(resolver)


def select_runtime(cfg: TrainerConfig) -> Runtime:
    """Strategy, precision and XLA from config; ``auto`` picks by the devices present.

    Measured on this machine's CPU (bench/train_step.py): XLA makes the pix2pix step
    slower (1.16 vs 0.98 s at 256 px) and doubles tracing time, so ``auto`` uses it only
    on GPU/TPU. bfloat16 on a CPU with native bf16 (AVX512-BF16/AMX) runs the step
    ~1.8x faster at 256 px, so ``auto`` uses it there; float16 on GPU (with loss scaling).
    """
    for gpu in tf.config.list_physical_devices("GPU"):
        # As it needs it, not all of it up front: workers sharing a GPU both fit.
        with contextlib.suppress(RuntimeError):  # already initialised in this process
            tf.config.experimental.set_memory_growth(gpu, True)
    gpus = tf.config.list_logical_devices("GPU")
    tpus = tf.config.list_logical_devices("TPU")
    kind = cfg.strategy
    if kind == "auto":
        kind = "tpu" if tpus else "mirrored" if len(gpus) > 1 else "default"
    if kind == "tpu":
        strategy = _tpu_strategy()
        device = "tpu"
    elif kind == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
        device = "gpu" if gpus else "cpu"
    else:
        strategy = tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
        device = "gpu" if gpus else "cpu"
    native = {"gpu": "mixed_float16", "tpu": "mixed_bfloat16", "cpu": "mixed_bfloat16"}[device]
    if cfg.mixed_precision == "on":
        policy: str | None = native
    elif cfg.mixed_precision == "off":
        policy = None
    else:
        policy = native if device != "cpu" or cpu_has_bf16() else None
    if cfg.jit_compile == "auto":
        jit = auto_jit(device, int(strategy.num_replicas_in_sync))
    else:
        jit = cfg.jit_compile == "on"
        if jit and device != "tpu" and strategy.num_replicas_in_sync > 1:
            log.warning(
                "trainer.jit_compile is on with %d replicas: an XLA-compiled step under "
                "MirroredStrategy can fail to reach other devices' variables; 'auto' leaves "
                "it off there",
                strategy.num_replicas_in_sync,
            )
    return Runtime(strategy, device, policy, jit)


def auto_jit(device: str, replicas: int) -> bool:
    """XLA for the step on one GPU or on TPUs; never on the CPU (slower here, see above).

    Not across several GPUs: the replica step, applying its gradients included,
    compiled by XLA under MirroredStrategy reads variables that live on the other
    devices and fails at the first step (as Keras also leaves XLA off with tf.distribute).
    """
    if device == "tpu":
        return True
    return device == "gpu" and replicas == 1


# ---- the model pair ------------------------------------------------------------------------


def _inner(opt):
    """The Adam inside a loss-scaling wrapper (or the optimizer itself)."""
    return getattr(opt, "inner_optimizer", opt)


def _set_lr(opt, lr: float) -> None:
    _inner(opt).learning_rate.assign(lr)


class Pix2Pix:
    """Generator, discriminator, their optimizers and the compiled train step."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        learning_rate: float,
        l1_weight: float,
        global_batch: int,
        runtime: Runtime,
    ) -> None:
        self.spec = spec
        self.runtime = runtime
        self.l1_weight = float(l1_weight)
        self.global_batch = int(global_batch)
        loss_scale = runtime.policy == "mixed_float16"
        with runtime.strategy.scope():
            self.generator = build_generator(spec, runtime.policy)
            self.discriminator = build_discriminator(spec, runtime.policy)
            self.g_opt = build_optimizer(learning_rate, loss_scale=loss_scale)
            self.d_opt = build_optimizer(learning_rate, loss_scale=loss_scale)
            # Built now, not at the first step: a restore must find every slot variable.
            self.g_opt.build(self.generator.trainable_variables)
            self.d_opt.build(self.discriminator.trainable_variables)
            self.step = tf.Variable(
                0,
                dtype=tf.int64,
                trainable=False,
                name="step",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
        # The Adams themselves, not a loss-scaling wrapper around them: a job checkpointed
        # on one worker resumes on another whatever its precision (float16 on a GPU,
        # bfloat16 or float32 elsewhere). The loss scale starts afresh on resume.
        self.checkpoint = tf.train.Checkpoint(
            generator=self.generator,
            discriminator=self.discriminator,
            g_opt=_inner(self.g_opt),
            d_opt=_inner(self.d_opt),
            step=self.step,
        )
        # What a base checkpoint holds: the generator and its Adam moments (see save_base).
        self.base = tf.train.Checkpoint(generator=self.generator, g_opt=_inner(self.g_opt))
        replica = self._replica_step
        if runtime.jit_compile:
            replica = tf.function(replica, jit_compile=True)
        strategy = runtime.strategy

        @tf.function
        def distributed(label: tf.Tensor, target: tf.Tensor) -> dict[str, tf.Tensor]:
            per_replica = strategy.run(replica, args=(label, target))
            return {
                k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                for k, v in per_replica.items()
            }

        self._step_fn = distributed
        s = spec.size_px
        self._predict = tf.function(
            lambda x: self.generator(x, training=False),
            input_signature=[tf.TensorSpec([None, s, s, 3], tf.float32)],
        )
        self._finite = tf.function(
            lambda: tf.reduce_all(
                [
                    tf.reduce_all(tf.math.is_finite(v))
                    for v in self.generator.trainable_variables
                    + self.discriminator.trainable_variables
                ]
            )
        )

    @property
    def params_m(self) -> float:
        return (self.generator.count_params() + self.discriminator.count_params()) / 1e6

    def _replica_step(self, label: tf.Tensor, target: tf.Tensor) -> dict[str, tf.Tensor]:
        g, d = self.generator, self.discriminator
        with tf.GradientTape(persistent=True) as tape:
            fake = g(label, training=True)
            d_real = d([label, target], training=True)
            d_fake = d([label, fake], training=True)
            g_total, g_gan, g_l1 = generator_loss(d_fake, fake, target, self.l1_weight)
            d_total = discriminator_loss(d_real, d_fake)
            # Averaged over the global batch: replicas' gradients are summed.
            avg = lambda x: tf.nn.compute_average_loss(x, global_batch_size=self.global_batch)  # noqa: E731
            g_loss, d_loss = avg(g_total), avg(d_total)
            g_scaled = (
                self.g_opt.scale_loss(g_loss) if hasattr(self.g_opt, "scale_loss") else g_loss
            )
            d_scaled = (
                self.d_opt.scale_loss(d_loss) if hasattr(self.d_opt, "scale_loss") else d_loss
            )
        g_grads = tape.gradient(g_scaled, g.trainable_variables)
        d_grads = tape.gradient(d_scaled, d.trainable_variables)
        del tape
        self.g_opt.apply_gradients(zip(g_grads, g.trainable_variables, strict=True))
        self.d_opt.apply_gradients(zip(d_grads, d.trainable_variables, strict=True))
        self.step.assign_add(1)
        return {"g": g_loss, "d": d_loss, "gan": avg(g_gan), "l1": avg(g_l1)}

    def train_step(self, label: tf.Tensor, target: tf.Tensor) -> dict[str, float]:
        out = self._step_fn(label, target)
        return {k: float(v) for k, v in out.items()}

    def generate(self, labels: np.ndarray) -> np.ndarray:
        """uint8 label maps (N, S, S, 3) -> uint8 images, BatchNorm in inference mode."""
        x = tf.cast(tf.convert_to_tensor(labels), tf.float32) / 127.5 - 1.0
        y = self._predict(x)
        return tf.cast(
            tf.clip_by_value(tf.round((tf.cast(y, tf.float32) + 1.0) * 127.5), 0, 255), tf.uint8
        ).numpy()

    def weights_finite(self) -> bool:
        return bool(self._finite())

    def set_learning_rate(self, lr: float) -> None:
        _set_lr(self.g_opt, lr)
        _set_lr(self.d_opt, lr)

    def snapshot(self) -> list[np.ndarray]:
        return [v.numpy() for v in self._all_variables()]

    def restore_snapshot(self, values: list[np.ndarray]) -> None:
        for v, x in zip(self._all_variables(), values, strict=True):
            v.assign(x)

    def _all_variables(self) -> list[tf.Variable]:
        return [
            *self.generator.variables,
            *self.discriminator.variables,
            *self.g_opt.variables,
            *self.d_opt.variables,
            self.step,
        ]


def evaluate(model: Pix2Pix, holdout: Examples) -> dict[str, float]:
    """SSIM inside the person box (as the score) and whole-crop L1 on a few held-out frames."""
    out = np.concatenate(
        [model.generate(holdout.labels[i : i + 8]) for i in range(0, len(holdout), 8)]
    )
    size = model.spec.size_px
    ssim = [
        box_metrics(o, t, person_box(p, size))[0]
        for o, t, p in zip(out, holdout.frames, holdout.poses, strict=True)
    ]
    l1 = np.abs(out.astype(np.float32) - holdout.frames.astype(np.float32)).mean() / 255.0
    return {"ssim": float(np.mean(ssim)), "l1": float(l1)}


# ---- base checkpoints -------------------------------------------------------------------


def save_base(model: Pix2Pix, out_dir: Path, *, label_map: str, meta: dict[str, Any]) -> Path:
    """Write a base checkpoint (``base.json`` + TF checkpoint): what a warm start restores.

    That is the generator and its Adam moments (``g_opt``), not the discriminator: see
    ``restore_base`` for why a fine-tune starts with a fresh discriminator.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    manager = tf.train.CheckpointManager(model.base, str(out_dir), 1, checkpoint_name="base")
    manager.save(checkpoint_number=int(model.step.numpy()))
    info = {
        "spec": model.spec.to_dict(),
        "label_map": label_map,
        "step": int(model.step.numpy()),
        **meta,
    }
    _write_json(out_dir / BASE_META, info)
    return out_dir


def resolve_base(uri: str, store, cache_dir: Path) -> Path:
    """A base checkpoint directory on local disk, downloading ``blob:<prefix>`` first."""
    prefix = blob_prefix(uri)
    if prefix is not None:
        if store is None:
            raise TrainingFailed(
                f"base checkpoint {uri} is in the blob store, but none is configured"
            )
        local = cache_dir / "base"
        if local.exists():
            shutil.rmtree(local)
        if mirror_from_store(store, prefix, local) == 0:
            raise TrainingFailed(f"base checkpoint {uri} not found in the blob store")
        return local
    if not local_checkpoint_exists(uri):
        raise TrainingFailed(f"base checkpoint {uri} not found")
    return Path(uri)


def restore_base(model: Pix2Pix, base_dir: Path, *, label_map: str) -> dict[str, Any]:
    """Warm start: the base's generator and its Adam moments; a fresh discriminator.

    Both choices were measured on an unseen synthetic attendee (bench/warmstart.py,
    64 px, lr 2e-4, steps to SSIM 0.85 on held-out frames): restoring the base's
    discriminator as well took 50-55 steps, a fresh discriminator 25, and a fresh
    discriminator with the generator's Adam moments 20. The base's discriminator has
    learnt what the *base's* attendees look like, so its first verdicts pull the new
    attendee towards them; fresh Adam moments make the first steps move every weight
    by about the learning rate, which undoes some of what the base learnt. The
    learning rate stays the job's. Older bases without moments (or with a differently
    wrapped optimizer) restore the generator alone, with fresh moments.
    """
    meta: dict[str, Any] = {}
    meta_file = base_dir / BASE_META if base_dir.is_dir() else None
    if meta_file is not None and meta_file.exists():
        try:
            meta = json.loads(meta_file.read_text())
            spec = ModelSpec.from_dict(meta["spec"])
        except (ValueError, KeyError, TypeError) as e:
            raise TrainingFailed(
                f"base checkpoint {base_dir}: {BASE_META} is unreadable ({_short(e)})"
            ) from e
        if spec != model.spec:
            raise TrainingFailed(
                f"base checkpoint {base_dir} is for {spec.size_px} px models "
                f"({spec}); this job trains {model.spec.size_px} px ({model.spec})"
            )
        if meta.get("label_map") not in (None, label_map):
            raise TrainingFailed(
                f"base checkpoint {base_dir} was trained on {meta['label_map']} label maps, "
                f"this job uses {label_map}"
            )
    prefix = tf.train.latest_checkpoint(str(base_dir)) if base_dir.is_dir() else str(base_dir)
    if prefix is None:
        raise TrainingFailed(f"base checkpoint {base_dir} holds no checkpoint")
    try:
        names = {name for name, _ in tf.train.list_variables(prefix)}
        tf.train.Checkpoint(generator=model.generator).restore(
            prefix
        ).expect_partial().assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.OpError) as e:
        raise TrainingFailed(
            f"base checkpoint {base_dir} does not fit this model ({_short(e)})"
        ) from e
    moments = _restore_moments(model, prefix, names)
    log.info("warm start from base checkpoint", extra={"base": str(base_dir), "moments": moments})
    return meta


def _restore_moments(model: Pix2Pix, prefix: str, names: set[str]) -> bool:
    """The generator's Adam moments from a base, keeping the job's learning rate."""
    adam = _inner(model.g_opt)
    if not any(n.startswith("g_opt/") for n in names):
        return False
    lr = float(adam.learning_rate.numpy())
    backup = [v.numpy() for v in adam.variables]
    try:
        tf.train.Checkpoint(g_opt=adam).restore(
            prefix
        ).expect_partial().assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.OpError) as e:
        for v, x in zip(adam.variables, backup, strict=True):
            v.assign(x)
        log.warning(
            "base optimizer moments do not fit; starting them fresh", extra={"error": _short(e)}
        )
        return False
    adam.learning_rate.assign(lr)
    return True


# ---- export -----------------------------------------------------------------------------


def export_generator(
    model: Pix2Pix, out_dir: Path, *, label_map: str, meta: dict[str, Any]
) -> dict[str, Any]:
    """Write SavedModel + TFLite + generator.json to ``out_dir`` (replaced atomically)."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    s = model.spec.size_px
    # A float32 copy: TFLite has no bfloat16 kernels, and serving needs no loss scaling.
    gen = build_generator(model.spec)
    gen.set_weights(model.generator.get_weights())

    @tf.autograph.experimental.do_not_convert  # straight-line code; autograph only warns
    def run(label: tf.Tensor) -> dict[str, tf.Tensor]:
        y = gen(tf.cast(label, tf.float32) / 127.5 - 1.0, training=False)
        return {"image": tf.cast(tf.clip_by_value(tf.round((y + 1.0) * 127.5), 0, 255), tf.uint8)}

    module = tf.Module()
    module.generator = gen
    module.serve = tf.function(
        run, input_signature=[tf.TensorSpec([None, s, s, 3], tf.uint8, name="label")]
    )
    single = tf.function(run, input_signature=[tf.TensorSpec([1, s, s, 3], tf.uint8, name="label")])
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tf.saved_model.save(
        module, str(tmp / "saved_model"), signatures={"serving_default": module.serve}
    )
    # Keras 3 variables survive the converter as resource variables (read as zeros by
    # LiteRT): fold them into constants first.
    frozen = convert_variables_to_constants_v2(single.get_concrete_function())
    tflite = tf.lite.TFLiteConverter.from_concrete_functions([frozen]).convert()
    (tmp / "generator.tflite").write_bytes(tflite)
    info = {
        "format": EXPORT_FORMAT,
        "label_map": label_map,
        "size_px": s,
        "spec": model.spec.to_dict(),
        "input": f"label map, uint8 RGB [N, {s}, {s}, 3] (tflite: N = 1)",
        "output": f"image, uint8 RGB [N, {s}, {s}, 3]",
        "signature": "serving_default",
        **meta,
    }
    _write_json(tmp / "generator.json", info)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return info


def read_export(export_dir: str | Path) -> dict[str, Any]:
    path = Path(export_dir) / "generator.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise TrainingFailed(f"no exported generator at {export_dir}") from e


def require_label_map(export_meta: dict[str, Any], label_map: str) -> None:
    """Refuse a generator trained on another kind of label map than the renderer draws."""
    trained = export_meta.get("label_map")
    if trained != label_map:
        raise TrainingFailed(
            f"the generator was trained on {trained} label maps but {label_map} maps were "
            "given: render with the label map it was trained on"
        )


# ---- jobs -------------------------------------------------------------------------------


# TakeData, a take directory, a ``blob:`` prefix, or a function that loads the take.
TakeRef = TakeData | str | Path | Callable[[], TakeData]


@dataclass
class JobSpec:
    """One training job: a session's takes (see ``TakeRef``)."""

    session_id: str
    takes: Sequence[TakeRef]
    base_checkpoint: str | None = None  # overrides trainer.base_checkpoint
    job_id: str | None = None


@dataclass
class Progress:
    stage: str  # loading | training | scoring | exporting | done
    step: int = 0
    max_steps: int | None = None
    loss: float | None = None  # generator L1 (the number that means something to people)
    eta_s: float | None = None
    elapsed_s: float = 0.0
    message: str = ""


@dataclass
class JobResult:
    session_id: str
    steps: int
    best_step: int
    resumed_from: int | None  # job step restored from a checkpoint, None on a fresh start
    warm_start: bool
    stopped: str  # budget | max_steps | done-before
    elapsed_s: float
    score: dict[str, Any]
    export_dir: Path
    model_prefix: str | None  # blob prefix of the export
    plot_path: Path
    nan_rollbacks: int = 0
    learning_rate: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    runtime: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, this attempt

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["export_dir"] = str(self.export_dir)
        d["plot_path"] = str(self.plot_path)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobResult:
        d = dict(d)
        d["export_dir"] = Path(d["export_dir"])
        d["plot_path"] = Path(d["plot_path"])
        return cls(**d)


class TrainHooks:
    """Test seams: called after every training step (fault injection, kill simulation)."""

    def after_step(self, step: int, model: Pix2Pix) -> None:
        pass


ProgressFn = Callable[[Progress], None]


class Interrupted(Exception):
    """The worker asked the job to stop; its state is checkpointed for the next attempt.

    Not a BoothError: nothing is wrong with the job, so it must not fail.
    """

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped at step {step} on request; the next attempt resumes there")
        self.step = step


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def _short(e: BaseException) -> str:
    msg = getattr(e, "message", None) or str(e)
    return msg.strip().splitlines()[0][:200] if msg.strip() else type(e).__name__


def open_take(ref: TakeRef, store, cache_dir: Path) -> TakeData:
    """A job's take reference -> TakeData.

    ``blob:<prefix>`` mirrors a take directory from the blob store first (the seam where
    ingest's frame shards and the repository's frame index plug in). A callable is a
    take loaded only when the corpus reaches it (``booth pretrain`` renders its
    synthetic attendees that way, one at a time).
    """
    if isinstance(ref, TakeData):
        return ref
    if callable(ref):
        return ref()
    ref = str(ref)
    prefix = blob_prefix(ref)
    if prefix is not None:
        if store is None:
            raise TrainingFailed(f"take {ref} is in the blob store, but none is configured")
        local = cache_dir / prefix.replace("/", "_")
        if mirror_from_store(store, prefix, local) == 0:
            raise TrainingFailed(f"take {ref} not found in the blob store")
        return load_take_dir(local)
    return load_take_dir(Path(ref))


def prepare_corpus(
    job: JobSpec,
    cfg: TrainerConfig,
    job_dir: Path,
    store,
    *,
    models_dir: Path | None,
) -> Corpus:
    """The job's corpus: reused from disk or the store when present, else built (and uploaded)."""
    local = job_dir / "corpus"
    prefix = f"sessions/{job.session_id}/corpus"

    def fits(c: Corpus) -> bool:
        return c.size_px == cfg.size_px and c.label_map == cfg.label_map

    if not Corpus.exists(local) and store is not None and store.exists(f"{prefix}/corpus.json"):
        mirror_from_store(store, prefix, local)
    if Corpus.exists(local):
        corpus = Corpus.open(local)
        if fits(corpus):
            try:
                corpus.verify()
                return corpus
            except TrainingFailed as e:
                # A copy cut short (a worker killed while writing or fetching it): the
                # takes are still there to build it again from.
                log.warning("corpus on disk unusable (%s); building it again", e)
    takes = (open_take(t, store, job_dir / "takes") for t in job.takes)
    segmenter = None
    if cfg.label_map == "parts":
        segmenter = lambda: default_segmenter(models_dir or Path("models"))  # noqa: E731
    corpus = build_corpus(
        takes,
        local,
        size_px=cfg.size_px,
        label_map=cfg.label_map,
        holdout_fraction=cfg.holdout_fraction,
        segmenter=segmenter,
        total=len(job.takes),
    )
    corpus.verify()
    if store is not None:
        mirror_to_store(local, store, prefix)
    return corpus


def _load_state(path: Path) -> _State | None:
    try:
        return _State.load(path)
    except (ValueError, TypeError) as e:  # TypeError: a field of the wrong kind
        raise TrainingFailed(f"the job's training state {path.name} is unreadable ({e})") from e


def _state_step(read: Callable[[], bytes | str]) -> int:
    """The step a checkpoint tree's state file records; -1 when it is missing or unreadable."""
    try:
        return _State.from_json(read()).step
    except (OSError, BoothError, ValueError, TypeError):
        return -1


def _fetch_newer_checkpoints(store, prefix: str, ckpt_root: Path) -> None:
    """Replace the local checkpoint tree with the store's when the store's is newer.

    The store is where every attempt mirrors its checkpoints; a local tree is only a
    cache of one machine's last attempt. Resuming from a stale one would retrain steps
    another worker already took, understate the budget spent, and its next mirror would
    delete the newer checkpoint files from the store.
    """
    if not store.exists(f"{prefix}/ckpt/checkpoint"):
        return
    if (ckpt_root / "ckpt" / "checkpoint").exists():
        remote_step = _state_step(lambda: store.get(f"{prefix}/{STATE}"))
        local_step = _state_step((ckpt_root / STATE).read_bytes)
        if remote_step <= local_step:
            return
        log.info(
            "the store holds newer checkpoints than this machine",
            extra={"local_step": local_step, "store_step": remote_step},
        )
    shutil.rmtree(ckpt_root, ignore_errors=True)
    ckpt_root.mkdir(parents=True)
    mirror_from_store(store, prefix, ckpt_root)


@dataclass
class _State:
    step: int = 0
    elapsed_s: float = 0.0
    learning_rate: float = 0.0
    nan_rollbacks: int = 0
    best: dict[str, float] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    done: dict[str, Any] | None = None

    @classmethod
    def load(cls, path: Path) -> _State | None:
        if not path.exists():
            return None
        return cls.from_json(path.read_bytes())

    @classmethod
    def from_json(cls, data: bytes | str) -> _State:
        d = json.loads(data)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class _Fit:
    """One training run of a job: the loop, its checkpoints, best tracking and rollback."""

    def __init__(
        self,
        model: Pix2Pix,
        corpus: Corpus,
        cfg: TrainerConfig,
        ckpt_root: Path,
        budget: Budget,
        state: _State,
        *,
        store,
        store_prefix: str | None,
        progress: ProgressFn,
        hooks: TrainHooks | None,
        score_frames: int,
        pose_metric: bool,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.model, self.corpus, self.cfg = model, corpus, cfg
        self.should_stop = should_stop
        self.root = ckpt_root
        self.budget, self.state = budget, state
        self.store, self.store_prefix = store, store_prefix
        self.progress, self.hooks = progress, hooks
        self.manager = tf.train.CheckpointManager(model.checkpoint, str(ckpt_root / "ckpt"), 2)
        self.best_ckpt = tf.train.Checkpoint(generator=model.generator)
        self.best_manager = tf.train.CheckpointManager(self.best_ckpt, str(ckpt_root / "best"), 1)
        holdout_split = "holdout" if corpus.count("holdout") else "train"
        n = corpus.count(holdout_split)
        # The held-out half the final score leaves alone (score.holdout_part).
        self.holdout = corpus.examples(holdout_split, keep=holdout_part(n, EVAL_FRAMES, "select"))
        self.step_s: float | None = None
        self.first_step_s: float | None = None
        self.predict_trace_s: float | None = None
        self.eval_s: float | None = None
        self.save_s = 0.5 + SAVE_S_PER_MPARAM * model.params_m
        self.export_s = EXPORT_S + EXPORT_S_PER_MPARAM * model.params_m
        self.score_frames = score_frames
        self.pose_metric = pose_metric
        self.snapshot: list[np.ndarray] | None = None

    # -- estimates ------------------------------------------------------------------------

    def reserve_s(self) -> float:
        """Seconds that must stay in the budget before starting another step."""
        eval_s = self.eval_s or 1.0
        per_frame = eval_s / max(1, len(self.holdout))
        score_s = 2.0 + self.score_frames * (
            2 * per_frame + (POSE_S_PER_FRAME if self.pose_metric else 0.0)
        )
        export_s = self.export_s
        first = self.first_step_s
        if first is None and self.predict_trace_s is not None:
            first = FIRST_STEP_PER_PREDICT_TRACE * self.predict_trace_s
        if first is not None:
            # Exporting traces the generator twice and converts it: graph work like the
            # first step's tracing, and slowed alike when other jobs share the cores.
            export_s = max(export_s, EXPORT_PER_TRACE * first)
            score_s = max(score_s, SCORE_PER_TRACE * first)
        step_s = self.step_s
        if step_s is None and self.first_step_s is None and first is not None:
            step_s = first  # the first step is about to trace
        return (step_s or 0.0) + eval_s + self.save_s + score_s + export_s + MARGIN_S

    def floor_s(self) -> float:
        """The least a job needs after a step: a checkpoint, scoring and export at their
        fastest. With less left, a budget cannot deliver anything."""
        export_s = EXPORT_FLOOR_S + EXPORT_FLOOR_S_PER_MPARAM * self.model.params_m
        return (self.eval_s or 0.0) + self.save_s + SCORE_FLOOR_S + export_s + MARGIN_S

    def too_short(self) -> str:
        """Why a budget that cannot pay for a single step fails the job, with a way out."""
        spent = self.budget.elapsed()
        least = 5 * math.ceil((spent + self.reserve_s()) / 5)
        return (
            f"the training budget of {self.cfg.budget_s:g} s is too short to train at all: "
            f"{spent:.0f} s went to loading the take and building the model, and scoring "
            f"and exporting the result alone need at least {self.floor_s():.0f} s more; one "
            f"training step needs a budget of about {least} s or more on this machine now, "
            "a useful model minutes (trainer.budget_s)"
        )

    # -- checkpoints -----------------------------------------------------------------------

    def _trace_predict(self) -> None:
        """Trace the generator's predict once, timed: what the first step's tracing is
        estimated from (``reserve_s``)."""
        t = time.monotonic()
        self.model.generate(self.holdout.labels[:1])
        self.predict_trace_s = time.monotonic() - t

    def evaluate(self) -> dict[str, float]:
        if self.eval_s is None:
            self._trace_predict()  # outside the eval timing
        t = time.monotonic()
        e = evaluate(self.model, self.holdout)
        self.eval_s = time.monotonic() - t
        entry = {"step": self.state.step, "t": round(self.budget.elapsed(), 2), **e}
        self.state.evals.append(entry)
        return entry

    def _is_better(self, e: dict[str, float]) -> bool:
        b = self.state.best
        return b is None or (e["ssim"], -e["l1"]) > (b["ssim"], -b["l1"])

    def _write_state(self) -> None:
        self.state.elapsed_s = self.budget.elapsed()
        _write_json(self.root / STATE, asdict(self.state))

    def checkpoint(self) -> None:
        """Evaluate, keep the best generator, save the full state, mirror to the store."""
        if not self.model.weights_finite():
            raise _Diverged(self.state.step)
        t = time.monotonic()
        e = self.evaluate()
        changed = ["state.json"]
        if self._is_better(e):
            self.state.best = {"step": e["step"], "ssim": e["ssim"], "l1": e["l1"]}
            self.best_manager.save(checkpoint_number=self.state.step)
            changed += [str(p.relative_to(self.root)) for p in (self.root / "best").iterdir()]
        self.manager.save(checkpoint_number=self.state.step)
        self._write_state()
        if self.store is not None and self.store_prefix:
            latest = Path(self.manager.latest_checkpoint).name
            changed += [
                str(p.relative_to(self.root))
                for p in (self.root / "ckpt").iterdir()
                if p.name.startswith(latest + ".") or p.name == "checkpoint"
            ]
            mirror_to_store(self.root, self.store, self.store_prefix, only=changed, record=STATE)
        self.save_s = max(0.2, time.monotonic() - t - (self.eval_s or 0.0))
        log.info(
            "checkpoint",
            extra={"step": self.state.step, "ssim": round(e["ssim"], 4), "best": self.state.best},
        )

    def rollback(self, bad_step: int) -> None:
        """Back to the last good checkpoint (or the start), at half the learning rate, once."""
        if self.state.nan_rollbacks >= 1:
            raise TrainingFailed(
                f"training diverged (NaN loss) at step {bad_step} again after rolling back "
                f"once with learning rate {self.state.learning_rate:g}; try a lower "
                "trainer.learning_rate or check the take"
            )
        latest = self.manager.latest_checkpoint
        if latest:
            self.model.checkpoint.restore(latest).assert_existing_objects_matched()
            where = f"checkpoint at step {int(self.model.step.numpy())}"
        elif self.snapshot is not None:
            self.model.restore_snapshot(self.snapshot)
            where = f"the start (step {int(self.model.step.numpy())})"
        else:
            raise TrainingFailed(
                f"training diverged (NaN loss) at step {bad_step} with nothing to roll back to"
            )
        self.state.nan_rollbacks += 1
        self.state.learning_rate /= 2
        self.model.set_learning_rate(self.state.learning_rate)
        self.state.step = int(self.model.step.numpy())
        # Recorded at once: a worker killed before the next checkpoint must not resume
        # with a second rollback in hand.
        self._write_state()
        if self.store is not None and self.store_prefix:
            mirror_to_store(self.root, self.store, self.store_prefix, only=[STATE])
        log.warning(
            "NaN loss: rolled back",
            extra={"bad_step": bad_step, "to": where, "learning_rate": self.state.learning_rate},
        )

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> str:
        cfg, model, state = self.cfg, self.model, self.state
        dataset = self.corpus.dataset(cfg.batch * model.runtime.replicas, seed=state.step)
        if model.runtime.replicas > 1:
            iterator = iter(model.runtime.strategy.experimental_distribute_dataset(dataset))
        else:
            # One replica needs no distributed iterator, whose teardown blocks for seconds
            # (measured 0.7-6 s idle, over a minute under load) on its prefetch threads.
            iterator = iter(dataset)
        if self.manager.latest_checkpoint is None:
            self.snapshot = model.snapshot()
        if state.evals and state.evals[-1]["step"] == state.step:
            # Resumed at an evaluated checkpoint: no evaluation to time, but the first step
            # still traces. Without this measure the budget reserved nothing for it, and a
            # job resumed near its end overran by the tracing time.
            self._trace_predict()
        else:
            e = self.evaluate()  # the starting point, and a measured eval cost
            if self._is_better(e) and self.manager.latest_checkpoint is None:
                # Until a checkpoint is written, the starting weights are the best known.
                state.best = {"step": e["step"], "ssim": e["ssim"], "l1": e["l1"]}
                self.best_manager.save(checkpoint_number=state.step)
        last_ckpt_step, last_ckpt_t = state.step, time.monotonic()
        window: list[dict[str, float]] = []
        history_every_s = max(1.0, cfg.budget_s / 300)
        last_hist_t = last_report_t = time.monotonic()
        first = True
        stopped = "budget"
        while True:
            if cfg.max_steps is not None and state.step >= cfg.max_steps:
                stopped = "max_steps"
                break
            if self.should_stop is not None and self.should_stop():
                stopped = "interrupted"  # the checkpoint below keeps every step taken
                break
            if state.step == 0:
                # The first step is what the job is for: it runs unless the budget cannot
                # pay for scoring and export even at their best. Exporting untrained (or
                # untouched base) weights would hand the attendee a model that never saw
                # them.
                if self.budget.remaining() <= self.floor_s():
                    raise TrainingFailed(self.too_short())
            elif self.budget.remaining() <= self.reserve_s():
                stopped = "budget"
                break
            try:
                label, target = next(iterator)
            except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
                raise TrainingFailed(f"a corpus shard is corrupt ({_short(e)})") from e
            t = time.monotonic()
            try:
                losses = model.train_step(label, target)
                if not all(math.isfinite(v) for v in losses.values()):
                    raise _Diverged(state.step + 1)
                state.step = int(model.step.numpy())
                if self.hooks is not None:
                    self.hooks.after_step(state.step, model)
                dt = time.monotonic() - t
                if first:
                    first = False  # includes tracing: no estimate of the next steps
                    if self.first_step_s is None:
                        self.first_step_s = dt
                else:
                    self.step_s = dt if self.step_s is None else 0.8 * self.step_s + 0.2 * dt
                window.append(losses)
                now = time.monotonic()
                if now - last_hist_t >= history_every_s:
                    self._push_history(window)
                    window, last_hist_t = [], now
                if (
                    state.step - last_ckpt_step >= cfg.checkpoint_every_steps
                    or now - last_ckpt_t >= cfg.checkpoint_every_s
                ):
                    self._push_history(window)
                    window = []
                    self.checkpoint()
                    last_ckpt_step, last_ckpt_t = state.step, time.monotonic()
                if now - last_report_t >= 1.0:
                    self._report(losses)
                    last_report_t = now
            except _Diverged as d:
                window = []
                self.rollback(d.step)
                last_ckpt_step, last_ckpt_t = state.step, time.monotonic()
                first = True
        self._push_history(window)
        if stopped == "interrupted" and state.step == last_ckpt_step:
            return stopped  # nothing new since the last checkpoint (or since the start)
        if state.step != last_ckpt_step or not self.manager.latest_checkpoint:
            try:
                self.checkpoint()
            except _Diverged as d:
                # Diverged in the very last steps: the best checkpoint is still good.
                log.warning(
                    "weights not finite at the end; keeping the best checkpoint",
                    extra={"step": d.step},
                )
        return stopped

    def _push_history(self, window: list[dict[str, float]]) -> None:
        if not window:
            return
        mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
        self.state.history.append(
            {"step": self.state.step, "t": round(self.budget.elapsed(), 2), **mean}
        )

    def _report(self, losses: dict[str, float]) -> None:
        eta = self.budget.remaining()
        if self.cfg.max_steps is not None and self.step_s:
            eta = min(eta, (self.cfg.max_steps - self.state.step) * self.step_s + self.reserve_s())
        self.progress(
            Progress(
                "training",
                self.state.step,
                self.cfg.max_steps,
                losses["l1"],
                max(0.0, eta),
                self.budget.elapsed(),
            )
        )


class _Diverged(Exception):
    def __init__(self, step: int) -> None:
        super().__init__(f"non-finite loss at step {step}")
        self.step = step


def _checkpoint_prefix(job: JobSpec) -> str:
    return f"sessions/{job.session_id}/checkpoints"


def train_job(
    job: JobSpec,
    cfg: TrainerConfig,
    store=None,
    progress: ProgressFn | None = None,
    *,
    models_dir: Path | None = Path("models"),
    hooks: TrainHooks | None = None,
    runtime: Runtime | None = None,
    should_stop: Callable[[], bool] | None = None,
    started_at: float | None = None,
) -> JobResult:
    """Train, score and export the generator of one session; resumable (see module docstring).

    ``started_at`` (``time.monotonic()``) is when this attempt began, if before the call:
    the worker reads the take from ingest first, and that loading counts in the budget.

    Raises TrainingFailed (a BoothError) with a readable reason on bad input: an empty or
    tiny take, no person, a corrupt shard, a missing or mismatched base checkpoint, a
    budget too short for one training step, or losses that stay NaN after one rollback.
    """
    report = progress or (lambda p: None)
    job_dir = Path(cfg.work_dir) / job.session_id
    ckpt_root = job_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    prefix = _checkpoint_prefix(job) if store is not None else None
    model_prefix = f"sessions/{job.session_id}/model" if store is not None else None

    # A restarted job picks up its checkpoints from the store unless this machine holds
    # ones as new: a work directory left by an earlier attempt here may be older than
    # what another machine trained since.
    if store is not None:
        _fetch_newer_checkpoints(store, prefix, ckpt_root)
    state = _load_state(ckpt_root / STATE) or _State(learning_rate=cfg.learning_rate)
    if state.done is not None:
        export_dir = job_dir / "export"
        if not (export_dir / "generator.json").exists() and store is not None:
            mirror_from_store(store, model_prefix, export_dir)
        if (export_dir / "generator.json").exists():
            # A redelivered job that already finished: same result, no second training.
            log.info("job already finished", extra={"session": job.session_id})
            done = {**state.done, "stopped": "done-before", "export_dir": str(export_dir)}
            done["plot_path"] = str(export_dir / "progress.png")
            return JobResult.from_dict(done)
    budget = Budget(cfg.budget_s, spent_s=state.elapsed_s, started_at=started_at)
    if should_stop is not None and should_stop():
        raise Interrupted(state.step)
    report(
        Progress(
            "loading",
            state.step,
            cfg.max_steps,
            elapsed_s=budget.elapsed(),
            message="building the corpus",
        )
    )
    timings: dict[str, float] = {}
    t_stage = time.monotonic()
    corpus = prepare_corpus(job, cfg, job_dir, store, models_dir=models_dir)
    timings["corpus_s"] = round(time.monotonic() - t_stage, 2)

    latest = tf.train.latest_checkpoint(str(ckpt_root / "ckpt"))
    base_uri = job.base_checkpoint or cfg.base_checkpoint
    # Found before the model is built: a missing base fails the job in seconds.
    base_dir = resolve_base(base_uri, store, job_dir) if base_uri and not latest else None
    runtime = runtime or select_runtime(cfg)
    spec = ModelSpec.for_size(cfg.size_px)
    model = Pix2Pix(
        spec,
        learning_rate=state.learning_rate or cfg.learning_rate,
        l1_weight=cfg.l1_weight,
        global_batch=cfg.batch * runtime.replicas,
        runtime=runtime,
    )
    resumed_from: int | None = None
    warm = False
    if latest:
        try:
            model.checkpoint.restore(latest).assert_existing_objects_matched()
        except (ValueError, AssertionError, tf.errors.OpError) as e:
            raise TrainingFailed(
                f"the job's checkpoint {latest} does not fit this model ({_short(e)})"
            ) from e
        resumed_from = int(model.step.numpy())
        state.step = resumed_from
        state.history = [h for h in state.history if h["step"] <= resumed_from]
        state.evals = [e for e in state.evals if e["step"] <= resumed_from]
        warm = bool(base_uri)
        log.info("resuming job", extra={"session": job.session_id, "step": resumed_from})
    elif base_dir is not None:
        restore_base(model, base_dir, label_map=cfg.label_map)
        warm = True
    model.set_learning_rate(state.learning_rate)

    # The score runs on the held-out half the checkpoint choice leaves (holdout_part).
    score_frames = min((corpus.count("holdout") + 1) // 2, 48) + min(corpus.count("transfer"), 48)
    pose_available = models_dir is not None and Path(models_dir).is_dir()
    fit = _Fit(
        model,
        corpus,
        cfg,
        ckpt_root,
        budget,
        state,
        store=store,
        store_prefix=prefix,
        progress=report,
        hooks=hooks,
        score_frames=score_frames,
        pose_metric=pose_available,
        should_stop=should_stop,
    )
    report(Progress("training", state.step, cfg.max_steps, elapsed_s=budget.elapsed()))
    t_stage = time.monotonic()
    stopped = fit.run()
    if stopped == "interrupted":
        log.info("job interrupted", extra={"session": job.session_id, "step": state.step})
        raise Interrupted(state.step)
    timings["train_s"] = round(time.monotonic() - t_stage, 2)
    timings["first_step_s"] = round(fit.first_step_s or 0.0, 2)
    timings["step_s"] = round(fit.step_s or 0.0, 4)

    # The best generator, not the last, is what the attendee gets.
    best_path = fit.best_manager.latest_checkpoint
    best_step = state.step
    if best_path and state.best is not None:
        fit.best_ckpt.restore(best_path).assert_existing_objects_matched()
        best_step = int(state.best["step"])
    report(Progress("scoring", state.step, cfg.max_steps, elapsed_s=budget.elapsed()))
    t_stage = time.monotonic()
    export_dir = job_dir / "export"
    work_out = job_dir / "out"
    work_out.mkdir(exist_ok=True)
    if corpus.count("holdout"):
        score = score_generator(
            model.generate,
            corpus,
            models_dir=models_dir if pose_available else None,
            samples_path=work_out / "samples.png",
        )
    else:
        score = {"notes": ["not scored: the corpus has no held-out frames (holdout_fraction = 0)"]}
    score.setdefault("notes", []).extend(
        f"take {t['take']} not used: {t['reason']}" for t in corpus.manifest.get("skipped", [])
    )
    plot_path = work_out / "progress.png"
    plot_progress(
        state.history,
        state.evals,
        score if "ssim" in score else None,
        plot_path,
        title=job.session_id,
    )

    timings["score_s"] = round(time.monotonic() - t_stage, 2)
    report(Progress("exporting", state.step, cfg.max_steps, elapsed_s=budget.elapsed()))
    t_stage = time.monotonic()
    framings = [{"take": t["name"], "camera": t["camera"], **t["framing"]} for t in corpus.takes]
    export_generator(
        model,
        export_dir,
        label_map=cfg.label_map,
        meta={"framing": framings, "step": best_step, "score": score, "session_id": job.session_id},
    )
    for name in ("progress.png", "samples.png"):
        if (work_out / name).exists():
            shutil.copy2(work_out / name, export_dir / name)
    _write_json(export_dir / "score.json", score)
    if store is not None:
        mirror_to_store(export_dir, store, model_prefix)
    timings["export_s"] = round(time.monotonic() - t_stage, 2)
    result = JobResult(
        session_id=job.session_id,
        steps=state.step,
        best_step=best_step,
        resumed_from=resumed_from,
        warm_start=warm,
        stopped=stopped,
        elapsed_s=round(budget.elapsed(), 2),
        score=score,
        export_dir=export_dir,
        model_prefix=model_prefix,
        plot_path=export_dir / "progress.png",
        nan_rollbacks=state.nan_rollbacks,
        learning_rate=state.learning_rate,
        history=state.history,
        evals=state.evals,
        runtime=runtime.describe(),
        timings=timings,
    )
    state.elapsed_s = budget.elapsed()
    state.done = result.to_dict()
    _write_json(ckpt_root / STATE, asdict(state))
    if store is not None:
        mirror_to_store(ckpt_root, store, prefix, only=[STATE])
    report(Progress("done", state.step, cfg.max_steps, elapsed_s=budget.elapsed(), eta_s=0.0))
    log.info(
        "job finished",
        extra={
            "session": job.session_id,
            "steps": state.step,
            "stopped": stopped,
            "elapsed_s": result.elapsed_s,
        },
    )
    return result
