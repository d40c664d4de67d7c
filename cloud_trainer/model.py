"""pix2pix: a U-Net generator and a PatchGAN discriminator, sized by the image size.

Follows Isola et al. 2017 ("Image-to-Image Translation with Conditional Adversarial
Networks") as the TensorFlow pix2pix tutorial writes it: 4x4 convolutions with
stride 2, BatchNorm, LeakyReLU(0.2) going down, ReLU and dropout(0.5) on the three
innermost layers going up, tanh out; a conditional PatchGAN on (label, image); the
GAN loss plus ``l1_weight`` (lambda = 100 in the paper) times L1.

Width and depth follow the image size (``ModelSpec.for_size``): the encoder halves
the image down to 1x1, so 64 px has six down-samplings where 256 px has eight, and
the base width shrinks for small images so a 64 px booth model trains in seconds
per hundred steps on a CPU. As in the paper's code (not the tutorial), the 1x1
bottleneck has no BatchNorm: normalising one value per channel would zero it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import keras
import tensorflow as tf
from keras import layers

# Adam as in the paper: lr 2e-4, beta1 0.5.
ADAM_BETA_1 = 0.5
# BatchNorm tracks its running statistics faster than Keras' default (0.99) so a
# fine-tune of a few hundred steps also adapts the statistics used at inference.
BN_MOMENTUM = 0.9


@dataclass(frozen=True)
class ModelSpec:
    """Everything that fixes the networks' shapes; stored with every checkpoint."""

    size_px: int
    gen_filters: int  # width of the generator's first layer
    gen_max_filters: int
    disc_filters: int
    disc_layers: int  # stride-2 layers of the PatchGAN

    @property
    def gen_depth(self) -> int:
        """Down-samplings from ``size_px`` to the 1x1 bottleneck."""
        return int(math.log2(self.size_px))

    @property
    def patch_px(self) -> int:
        """Receptive field of one discriminator output (70 for the paper's 256 px setup)."""
        rf = 1
        # Two stride-1 4x4 convolutions on top, then the stride-2 ones below them.
        for stride in [1, 1] + [2] * self.disc_layers:
            rf = rf * stride + (4 - stride)
        return rf

    @classmethod
    def for_size(cls, size_px: int) -> ModelSpec:
        if size_px < 32 or size_px & (size_px - 1):
            raise ValueError(f"pix2pix needs a power-of-two image size >= 32, got {size_px}")
        # 256 px and up is the paper's model (64 filters, 70x70 patches). Smaller images
        # carry less detail per pixel, so narrower layers and smaller patches suffice.
        base = 64 if size_px >= 256 else 48 if size_px >= 128 else 32 if size_px >= 64 else 16
        disc_layers = 3 if size_px >= 256 else 2 if size_px >= 64 else 1
        return cls(size_px, base, base * 8, base, disc_layers)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        return cls(**{k: int(d[k]) for k in cls.__dataclass_fields__})


def _init() -> keras.initializers.Initializer:
    return keras.initializers.RandomNormal(0.0, 0.02)  # the paper's weight init


def _down(x, filters: int, *, norm: bool, dtype, name: str):
    x = layers.Conv2D(
        filters,
        4,
        strides=2,
        padding="same",
        kernel_initializer=_init(),
        use_bias=not norm,
        dtype=dtype,
        name=f"{name}_conv",
    )(x)
    if norm:
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, dtype=dtype, name=f"{name}_bn")(x)
    return layers.LeakyReLU(0.2, dtype=dtype, name=f"{name}_act")(x)


def _up(x, filters: int, *, dropout: bool, dtype, name: str):
    x = layers.Conv2DTranspose(
        filters,
        4,
        strides=2,
        padding="same",
        kernel_initializer=_init(),
        use_bias=False,
        dtype=dtype,
        name=f"{name}_deconv",
    )(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, dtype=dtype, name=f"{name}_bn")(x)
    if dropout:
        x = layers.Dropout(0.5, dtype=dtype, name=f"{name}_drop")(x)
    return layers.ReLU(dtype=dtype, name=f"{name}_act")(x)


def build_generator(spec: ModelSpec, dtype: str | None = None) -> keras.Model:
    """U-Net: label map in [-1, 1] -> image in [-1, 1], both (N, S, S, 3)."""
    s = spec.size_px
    inp = keras.Input((s, s, 3), name="label")
    filters = [min(spec.gen_filters * 2**i, spec.gen_max_filters) for i in range(spec.gen_depth)]
    skips = []
    x = inp
    for i, f in enumerate(filters):
        innermost = i == len(filters) - 1
        x = _down(x, f, norm=i > 0 and not innermost, dtype=dtype, name=f"down{i}")
        skips.append(x)
    skips = skips[:-1][::-1]
    for i, (f, skip) in enumerate(zip(filters[:-1][::-1], skips, strict=True)):
        x = _up(x, f, dropout=i < 3, dtype=dtype, name=f"up{i}")
        x = layers.Concatenate(dtype=dtype, name=f"skip{i}")([x, skip])
    # The output stays float32 under mixed precision: tanh and the losses need the range.
    out = layers.Conv2DTranspose(
        3,
        4,
        strides=2,
        padding="same",
        kernel_initializer=_init(),
        activation="tanh",
        dtype="float32",
        name="image",
    )(x)
    return keras.Model(inp, out, name="generator")


def build_discriminator(spec: ModelSpec, dtype: str | None = None) -> keras.Model:
    """Conditional PatchGAN: (label, image) -> (N, P, P, 1) real/fake logits."""
    s = spec.size_px
    label = keras.Input((s, s, 3), name="label")
    image = keras.Input((s, s, 3), name="image")
    x = layers.Concatenate(dtype=dtype, name="pair")([label, image])
    f = spec.disc_filters
    for i in range(spec.disc_layers):
        x = _down(x, f * 2**i, norm=i > 0, dtype=dtype, name=f"d{i}")
    x = layers.ZeroPadding2D(dtype=dtype, name="pad0")(x)
    x = layers.Conv2D(
        f * 2**spec.disc_layers,
        4,
        kernel_initializer=_init(),
        use_bias=False,
        dtype=dtype,
        name="c0_conv",
    )(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, dtype=dtype, name="c0_bn")(x)
    x = layers.LeakyReLU(0.2, dtype=dtype, name="c0_act")(x)
    x = layers.ZeroPadding2D(dtype=dtype, name="pad1")(x)
    out = layers.Conv2D(1, 4, kernel_initializer=_init(), dtype="float32", name="logits")(x)
    return keras.Model([label, image], out, name="discriminator")


def build_optimizer(
    learning_rate: float, *, loss_scale: bool = False
) -> keras.optimizers.Optimizer:
    opt = keras.optimizers.Adam(learning_rate, beta_1=ADAM_BETA_1)
    if loss_scale:
        # float16 gradients underflow without it; bfloat16 has float32's range and needs none.
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


_bce = keras.losses.BinaryCrossentropy(from_logits=True, reduction="none")


def _per_example(x: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(tf.reshape(tf.cast(x, tf.float32), [tf.shape(x)[0], -1]), axis=1)


def generator_loss(
    disc_fake: tf.Tensor, fake: tf.Tensor, target: tf.Tensor, l1_weight: float
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Per-example (total, gan, l1) losses; the caller averages over the global batch."""
    gan = _per_example(_bce(tf.ones_like(disc_fake), disc_fake)[..., None])
    l1 = _per_example(tf.abs(tf.cast(target, tf.float32) - tf.cast(fake, tf.float32)))
    return gan + l1_weight * l1, gan, l1


def discriminator_loss(disc_real: tf.Tensor, disc_fake: tf.Tensor) -> tf.Tensor:
    real = _per_example(_bce(tf.ones_like(disc_real), disc_real)[..., None])
    fake = _per_example(_bce(tf.zeros_like(disc_fake), disc_fake)[..., None])
    return real + fake
