"""Benchmark: our pix2pix training step vs the TensorFlow pix2pix tutorial's, same G and D.

``tutorial`` re-implements the tutorial's ``train_step`` and ``fit`` as written
(https://www.tensorflow.org/tutorials/generative/pix2pix): two gradient tapes, a
mean-reduced ``BinaryCrossentropy`` loss object, four summary writes per step
(``tf.summary.write``, the op ``tf.summary.scalar`` wraps: TensorBoard, which
provides ``scalar``, is not installed here), an input pipeline that decodes and randomly jitters every image
(resize to 286/256 of the size, random crop, random flip) with no cache and no
prefetch, batch 1, iterated with ``ds.repeat().take(n).enumerate()``. It uses
our generator and discriminator (``cloud_trainer.model``), so only the step and
its pipeline differ.

``ours`` is ``cloud_trainer.train.Pix2Pix.train_step`` with the runtime a job
picks on this machine (``select_runtime`` with ``auto`` settings) fed by
``Corpus.dataset`` (decoded once, cached, shuffled, prefetched). Two more
variants say what the tunings give: ``fp32`` (mixed precision off) and ``xla``
(``jit_compile`` on, otherwise as ``ours``).

All variants are built first, then measured in interleaved rounds (a few steps
each, in turn), so load from other processes hits them alike; steps/s is from
the median round. Sizes 256 and 128 at batch 1; the JSON's top-level keys are
256 px, ``size_128`` holds the same at 128 px.

Prints progress to stderr and one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from cloud_trainer.config import TrainerConfig  # noqa: E402
from cloud_trainer.corpus import Corpus, build_corpus  # noqa: E402
from cloud_trainer.model import ModelSpec, build_discriminator, build_generator  # noqa: E402
from cloud_trainer.pretrain import synthetic_takes  # noqa: E402
from cloud_trainer.train import Pix2Pix, select_runtime  # noqa: E402

LAMBDA = 100


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the tutorial, as written there -----------------------------------------------------


class Tutorial:
    def __init__(self, corpus: Corpus, logdir: str) -> None:
        spec = ModelSpec.for_size(corpus.size_px)
        self.generator = build_generator(spec)
        self.discriminator = build_discriminator(spec)
        self.generator_optimizer = keras.optimizers.Adam(2e-4, beta_1=0.5)
        self.discriminator_optimizer = keras.optimizers.Adam(2e-4, beta_1=0.5)
        self.loss_object = keras.losses.BinaryCrossentropy(from_logits=True)
        self.summary_writer = tf.summary.create_file_writer(logdir)
        self.size = corpus.size_px
        self.train_step = tf.function(self._train_step)
        self.dataset = self._dataset(corpus)
        self._batches = None  # one iterator for the whole run, as fit() keeps

    def _dataset(self, corpus: Corpus) -> tf.data.Dataset:
        s = self.size
        jitter = round(s * 286 / 256)

        def load_image_train(record):
            e = corpus._parse(record)
            input_image = tf.cast(e["label"], tf.float32)
            real_image = tf.cast(e["frame"], tf.float32)
            # random_jitter: resize, random crop back, random mirror.
            input_image = tf.image.resize(input_image, [jitter, jitter], method="nearest")
            real_image = tf.image.resize(real_image, [jitter, jitter], method="nearest")
            stacked = tf.stack([input_image, real_image], axis=0)
            cropped = tf.image.random_crop(stacked, size=[2, s, s, 3])
            input_image, real_image = cropped[0], cropped[1]
            if tf.random.uniform(()) > 0.5:
                input_image = tf.image.flip_left_right(input_image)
                real_image = tf.image.flip_left_right(real_image)
            return (input_image / 127.5) - 1, (real_image / 127.5) - 1

        ds = tf.data.TFRecordDataset(corpus.files("train"))
        ds = ds.map(load_image_train, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.shuffle(400).batch(1)

    def generator_loss(self, disc_generated_output, gen_output, target):
        gan_loss = self.loss_object(tf.ones_like(disc_generated_output), disc_generated_output)
        l1_loss = tf.reduce_mean(tf.abs(target - gen_output))
        total_gen_loss = gan_loss + (LAMBDA * l1_loss)
        return total_gen_loss, gan_loss, l1_loss

    def discriminator_loss(self, disc_real_output, disc_generated_output):
        real_loss = self.loss_object(tf.ones_like(disc_real_output), disc_real_output)
        generated_loss = self.loss_object(
            tf.zeros_like(disc_generated_output), disc_generated_output
        )
        return real_loss + generated_loss

    def _train_step(self, input_image, target, step):
        with tf.GradientTape() as gen_tape, tf.GradientTape() as disc_tape:
            gen_output = self.generator(input_image, training=True)
            disc_real_output = self.discriminator([input_image, target], training=True)
            disc_generated_output = self.discriminator([input_image, gen_output], training=True)
            gen_total_loss, gen_gan_loss, gen_l1_loss = self.generator_loss(
                disc_generated_output, gen_output, target
            )
            disc_loss = self.discriminator_loss(disc_real_output, disc_generated_output)
        generator_gradients = gen_tape.gradient(gen_total_loss, self.generator.trainable_variables)
        discriminator_gradients = disc_tape.gradient(
            disc_loss, self.discriminator.trainable_variables
        )
        self.generator_optimizer.apply_gradients(
            zip(generator_gradients, self.generator.trainable_variables, strict=True)
        )
        self.discriminator_optimizer.apply_gradients(
            zip(discriminator_gradients, self.discriminator.trainable_variables, strict=True)
        )
        with self.summary_writer.as_default():
            tf.summary.write("gen_total_loss", gen_total_loss, step=step // 1000)
            tf.summary.write("gen_gan_loss", gen_gan_loss, step=step // 1000)
            tf.summary.write("gen_l1_loss", gen_l1_loss, step=step // 1000)
            tf.summary.write("disc_loss", disc_loss, step=step // 1000)

    def run(self, steps: int) -> None:
        # The tutorial's fit() makes one iterator over repeat().take(steps).enumerate() for
        # the whole run; here it is made once too and read in rounds, so each round does not
        # refill the shuffle buffer (decode and jitter every record) as a fresh one would.
        if self._batches is None:
            self._batches = iter(self.dataset.repeat().enumerate())
        for _ in range(steps):
            step, (input_image, target) = next(self._batches)
            self.train_step(input_image, target, step)
        self.generator.trainable_variables[0].numpy()  # wait for the last step


# ---- ours ---------------------------------------------------------------------------------


class Ours:
    def __init__(self, corpus: Corpus, **settings: str) -> None:
        cfg = TrainerConfig(size_px=corpus.size_px, batch=1, **settings)
        self.runtime = select_runtime(cfg)
        self.model = Pix2Pix(
            ModelSpec.for_size(corpus.size_px),
            learning_rate=cfg.learning_rate,
            l1_weight=cfg.l1_weight,
            global_batch=1,
            runtime=self.runtime,
        )
        self.data = iter(corpus.dataset(1))

    def run(self, steps: int) -> None:
        for _ in range(steps):
            label, target = next(self.data)
            self.model.train_step(label, target)  # returns floats: synchronous


def measure(variants: dict, rounds: int, steps: int) -> dict[str, float]:
    for name, v in variants.items():
        t = time.monotonic()
        v.run(2)  # trace and warm up
        say(f"  {name}: first 2 steps {time.monotonic() - t:.1f} s")
    times: dict[str, list[float]] = {n: [] for n in variants}
    for r in range(rounds):
        for name, v in variants.items():
            t = time.monotonic()
            v.run(steps)
            times[name].append((time.monotonic() - t) / steps)
        say(
            f"  round {r + 1}/{rounds}: "
            + ", ".join(f"{n} {times[n][-1]:.3f} s/step" for n in times)
        )
    return {n: 1.0 / statistics.median(ts) for n, ts in times.items()}


def bench_size(size: int, rounds: int, steps: int, work: Path) -> dict:
    say(f"size {size}: building corpus")
    (take,) = synthetic_takes([1], size_px=size, seconds=4, fps=10)
    corpus = build_corpus(
        [take], work / f"corpus-{size}", size_px=size, label_map="skeleton", holdout_fraction=0.1
    )
    variants = {
        "tutorial": Tutorial(corpus, str(work / f"logs-{size}")),
        "ours": Ours(corpus),
        "fp32": Ours(corpus, mixed_precision="off"),
        "xla": Ours(corpus, jit_compile="on"),
    }
    precision = variants["ours"].runtime.policy or "float32"
    rates = measure(variants, rounds, steps)
    del variants
    gc.collect()
    return {
        "size": size,
        "batch": 1,
        "ours_steps_s": round(rates["ours"], 3),
        "tutorial_steps_s": round(rates["tutorial"], 3),
        "ratio": round(rates["ours"] / rates["tutorial"], 3),
        "ours_precision": precision,
        "fp32_steps_s": round(rates["fp32"], 3),
        "fp32_ratio": round(rates["fp32"] / rates["tutorial"], 3),
        "mixed_precision_speedup": round(rates["ours"] / rates["fp32"], 3),
        "xla_steps_s": round(rates["xla"], 3),
        "xla_speedup": round(rates["xla"] / rates["ours"], 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    p.add_argument("--sizes", default="256,128")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        results = [bench_size(s, args.rounds, args.steps, Path(tmp)) for s in sizes]
    out = dict(results[0])
    for r in results[1:]:
        out[f"size_{r['size']}"] = r
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    from _guard import guarded

    sys.exit(guarded(main))
