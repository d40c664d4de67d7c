"""pix2pix networks: shapes and sizes follow the image size; the losses are the paper's."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

from cloud_trainer.model import (
    ModelSpec,
    build_discriminator,
    build_generator,
    discriminator_loss,
    generator_loss,
)


def test_depth_goes_down_to_one_pixel_so_small_images_have_fewer_downsamplings() -> None:
    assert ModelSpec.for_size(64).gen_depth == 6
    assert ModelSpec.for_size(256).gen_depth == 8
    assert ModelSpec.for_size(64).gen_filters < ModelSpec.for_size(256).gen_filters


def test_256_px_is_the_papers_model_with_70px_patches() -> None:
    spec = ModelSpec.for_size(256)
    assert spec.patch_px == 70
    assert (spec.gen_filters, spec.gen_max_filters, spec.disc_layers) == (64, 512, 3)


@pytest.mark.parametrize("size", [32, 64])
def test_generator_maps_label_to_image_of_the_same_size_in_unit_range(size: int) -> None:
    spec = ModelSpec.for_size(size)
    g = build_generator(spec)
    x = tf.random.uniform((2, size, size, 3), -1, 1)
    y = g(x, training=True).numpy()
    assert y.shape == (2, size, size, 3)
    assert y.min() >= -1 and y.max() <= 1
    downs = [layer for layer in g.layers if layer.name.endswith("_conv")]
    assert len(downs) == spec.gen_depth


def test_discriminator_scores_patches_of_a_label_image_pair() -> None:
    spec = ModelSpec.for_size(64)
    d = build_discriminator(spec)
    x = tf.zeros((1, 64, 64, 3))
    out = d([x, x])
    assert out.shape[0] == 1 and out.shape[-1] == 1 and 4 <= out.shape[1] < 64


def test_spec_round_trips_and_rejects_sizes_that_are_not_powers_of_two() -> None:
    spec = ModelSpec.for_size(128)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="power-of-two"):
        ModelSpec.for_size(100)


def test_generator_loss_is_gan_plus_weighted_l1() -> None:
    logits = tf.zeros((2, 4, 4, 1))  # sigmoid 0.5: BCE log(2)
    fake = tf.zeros((2, 8, 8, 3))
    target = tf.fill((2, 8, 8, 3), 0.5)
    total, gan, l1 = generator_loss(logits, fake, target, 100.0)
    np.testing.assert_allclose(gan.numpy(), np.log(2), rtol=1e-5)
    np.testing.assert_allclose(l1.numpy(), 0.5, rtol=1e-6)
    np.testing.assert_allclose(total.numpy(), np.log(2) + 50.0, rtol=1e-5)
    d = discriminator_loss(tf.fill((2, 4, 4, 1), 20.0), tf.fill((2, 4, 4, 1), -20.0))
    assert (d.numpy() < 1e-6).all()  # a perfect discriminator has no loss
