"""Random transforms applied to the image before each activation-maximization step.

Olah et al. 2017 ("Feature Visualization", "transformation robustness"), as Lucid's
`transform.standard_transforms`: pad with mid-grey, jitter (a random crop), scale by 0.9..1.1,
rotate by -10..10 degrees; the result is resized back to the model's input size. Sizes follow
Lucid's for 224 px (pad 12, jitter 8), scaled to the image. Every random draw is made up front
from the ascent's seeded generator, one per step, so the same seed gives the same images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from cnnviz.errors import CnnvizError

TRANSFORMS = ("pad", "jitter", "scale", "rotate")
_SCALES = [1 + (i - 5) / 50 for i in range(11)]
_DEGREES = list(range(-10, 11)) + 5 * [0]


def random_transforms(names: Sequence[str], input_shape: tuple[int, int, int], steps: int,
                      rng: np.random.Generator) -> Callable:
    """`transform(images (N, H, W, C) in [0, 1], step) -> images (N, H, W, C)` applying
    `names` in order with step `step`'s draws (TensorFlow ops, differentiable); the identity
    for no names (and no draw from `rng`)."""
    import tensorflow as tf

    names = tuple(names)
    unknown = [name for name in names if name not in TRANSFORMS]
    if unknown:
        raise CnnvizError(f"transform {unknown[0]!r} is unknown; choose from "
                          f"{', '.join(TRANSFORMS)}")
    if not names:
        return lambda images, step: images
    height, width = input_shape[:2]
    side = max(height, width)
    pad, shift = max(1, round(side * 12 / 224)), max(1, round(side * 8 / 224))
    draws = max(steps, 1)
    operations = []
    for name in names:
        if name == "pad":
            operations.append(lambda x, step: tf.pad(
                x, [[0, 0], [pad, pad], [pad, pad], [0, 0]], constant_values=0.5))
        elif name == "jitter":
            offsets = tf.constant(rng.integers(0, shift + 1, size=(draws, 2)), tf.int32)
            operations.append(lambda x, step, offsets=offsets: _crop(x, offsets[step], shift))
        elif name == "scale":
            factors = tf.constant(rng.choice(_SCALES, size=draws), tf.float32)
            operations.append(lambda x, step, factors=factors: _scale(x, factors[step]))
        else:
            angles = tf.constant(np.deg2rad(rng.choice(_DEGREES, size=draws)), tf.float32)
            operations.append(lambda x, step, angles=angles: _rotate(x, angles[step]))

    def transform(images, step):
        for operation in operations:
            images = operation(images, step)
        return tf.image.resize(images, (height, width), "bilinear")

    return transform


def _crop(images, offset, shift: int):
    import tensorflow as tf

    size = tf.shape(images)[1:3] - shift
    return images[:, offset[0]:offset[0] + size[0], offset[1]:offset[1] + size[1], :]


def _scale(images, factor):
    import tensorflow as tf

    size = tf.cast(tf.round(tf.cast(tf.shape(images)[1:3], tf.float32) * factor), tf.int32)
    return tf.image.resize(images, size, "bilinear")


def _rotate(images, angle):
    """Rotate about the centre, bilinear, mid-grey outside (the output pixel (x, y) reads the
    input at the inverse rotation of it)."""
    import tensorflow as tf

    shape = tf.shape(images)
    cy = (tf.cast(shape[1], tf.float32) - 1) / 2
    cx = (tf.cast(shape[2], tf.float32) - 1) / 2
    cos, sin = tf.cos(angle), tf.sin(angle)
    matrix = tf.stack([cos, sin, cx - cos * cx - sin * cy,
                       -sin, cos, cy + sin * cx - cos * cy, 0.0, 0.0])
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=tf.tile(matrix[None], [shape[0], 1]),
        output_shape=shape[1:3], fill_value=0.5, interpolation="BILINEAR", fill_mode="CONSTANT")
