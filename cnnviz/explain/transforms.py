"""Random transforms applied to the image before each activation-maximization step.

Olah et al. 2017 ("Feature Visualization", "transformation robustness"), as Lucid's
`transform.standard_transforms`: pad with mid-grey, jitter (a random crop), scale by 0.9..1.1,
rotate by -10..10 degrees (scale and rotate about the centre, at the same size, a bilinear
read each); the result is resized back to the model's input size. Sizes follow
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
    `names` in order with step `step`'s draws (`keras.ops`, differentiable, static shapes, so a
    compiled loop of steps traces once on every backend; `step` an int or a scalar tensor);
    the identity for no names (and no draw from `rng`)."""
    from keras import ops

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
            operations.append(lambda x, step: ops.pad(
                x, [[0, 0], [pad, pad], [pad, pad], [0, 0]], constant_values=0.5))
        elif name == "jitter":
            offsets = rng.integers(0, shift + 1, size=(draws, 2)).astype(np.int32)
            operations.append(lambda x, step, offsets=offsets: _crop(
                x, _draw(offsets, step), shift))
        elif name == "scale":
            factors = rng.choice(_SCALES, size=draws).astype(np.float32)
            operations.append(lambda x, step, factors=factors: _affine(
                x, _draw(factors, step), 0.0))
        else:
            angles = np.deg2rad(rng.choice(_DEGREES, size=draws)).astype(np.float32)
            operations.append(lambda x, step, angles=angles: _affine(
                x, 1.0, _draw(angles, step)))

    def transform(images, step):
        for operation in operations:
            images = operation(images, step)
        return ops.image.resize(images, (height, width), interpolation="bilinear",
                                antialias=False)

    return transform


def _draw(values: np.ndarray, step):
    """Step `step`'s draw: a plain value for a Python step (PyTorch's eager loop), else read
    from the table inside the compiled loop."""
    from keras import ops

    if isinstance(step, int):
        drawn = values[step]
        return drawn.tolist() if drawn.ndim else float(drawn)
    return ops.take(ops.convert_to_tensor(values), step, axis=0)


def _crop(images, offset, shift: int):
    """The (H - shift, W - shift) window at `offset` (top, left): a random crop."""
    from keras import ops

    _, height, width, _ = images.shape
    count, channels = ops.shape(images)[0], images.shape[-1]
    return ops.slice(images, [0, offset[0], offset[1], 0],
                     [count, height - shift, width - shift, channels])


def _affine(images, factor, angle):
    """Zoom by `factor` and rotate by `angle` (radians) about the centre, bilinear, mid-grey
    outside, same size: the output pixel (x, y) reads the input at the inverse of both.

    The bilinear read is four gathers (`ops.take`), so its gradient is the exact adjoint on
    every backend; TensorFlow's ImageProjectiveTransform (what `ops.image.affine_transform`
    runs there) back-propagates through the inverse transform instead, an approximation.
    Forward, the two agree (tests/test_parameterization.py).
    """
    from keras import ops

    _, height, width, channels = images.shape
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    down, across = rows.ravel() - (height - 1) / 2, columns.ravel() - (width - 1) / 2
    cos, sin = ops.cos(angle) / factor, ops.sin(angle) / factor
    source_x = cos * across + sin * down + (width - 1) / 2
    source_y = -sin * across + cos * down + (height - 1) / 2
    top, left = ops.floor(source_y), ops.floor(source_x)
    below, right = source_y - top, source_x - left
    flat = ops.reshape(images, (-1, height * width, channels))

    def corner(row, column, weight):
        inside = (row >= 0) & (row <= height - 1) & (column >= 0) & (column <= width - 1)
        index = ops.clip(row, 0, height - 1) * width + ops.clip(column, 0, width - 1)
        values = ops.take(flat, ops.cast(index, "int32"), axis=1)  # (N, H * W, C)
        values = ops.where(inside[None, :, None], values, ops.cast(0.5, images.dtype))
        return values * ops.cast(weight, images.dtype)[None, :, None]

    mixed = (corner(top, left, (1 - below) * (1 - right))
             + corner(top, left + 1, (1 - below) * right)
             + corner(top + 1, left, below * (1 - right))
             + corner(top + 1, left + 1, below * right))
    return ops.reshape(mixed, (-1, height, width, channels))
