"""The generated `shapes` data set: simple shapes on varied backgrounds, with an optional shortcut.

A shortcut ("spurious cue") is a feature that predicts the label in the training split but is
not the thing to learn. A model that takes it fails on a test split where the cue is absent or
shuffled, and an honest explanation should point at the cue. Two cues:

* `"corner_mark"`: a small bright square (pixel value exactly 1.0 in every channel, 3x3 at
  image_size 32, scaled with the size) at a position fixed per class: class k -> corner k
  (top-left, top-right, bottom-right, bottom-left), then the edge middles for k >= 4, so the mark
  predicts the class for up to 8 classes. Nothing else in an image reaches 1.0 (shapes and
  backgrounds stay <= 0.9), and shapes keep away from the border, so a mark never touches a shape.
* `"background"`: the background's brightness level is set per class (evenly spaced over
  0.1..0.7); without the cue it is drawn uniformly from the same range.

`cue_masks` marks where the cue is: the mark's pixels, or every background pixel (not the shape).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnnviz.errors import CnnvizError

__all__ = ["SHAPE_CLASSES", "SPURIOUS_CUES", "ShapesData", "cue_area_share", "cue_share",
           "make_shapes"]

SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "ring")
SPURIOUS_CUES = ("corner_mark", "background")

_BRIGHTEST = 0.9  # shapes and backgrounds stay at or below this; the corner mark alone is 1.0
_LEVELS = (0.1, 0.7)  # background brightness range
_CONTRAST = 0.3  # least difference between a shape's intensity and its background level
_CHUNK = 1024  # images drawn at once (bounds the (chunk, H, W) coordinate arrays)
# The farthest a shape pixel lies from its centre, in half-extents, at any rotation (a triangle's
# base corners: sqrt(0.95**2 + 0.8**2) = 1.24).
_REACH = 1.25


@dataclass(frozen=True)
class ShapesData:
    """A generated shapes data set.

    Attributes:
        images: float32 (N, H, W, C) in [0, 1].
        labels: int32 (N,), indices into `class_names`.
        class_names: the classes, in label order.
        cue_masks: bool (N, H, W), True where the spurious cue is; all False without a cue.
        shape_masks: bool (N, H, W), True on the shape: where an explanation should point.
        cue_classes: int32 (N,), the class whose cue each image carries (its label, another
            class's when shuffled), -1 when it carries none.
        spurious: the cue kind, or None.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    cue_masks: np.ndarray
    shape_masks: np.ndarray
    cue_classes: np.ndarray
    spurious: str | None


def mark_size(image_size: int) -> int:
    """Side of the corner mark in pixels: 3 at image_size 32, scaled, at least 2."""
    return max(2, round(3 * image_size / 32))


def mark_origins(image_size: int) -> list[tuple[int, int]]:
    """(row, col) of the mark's top-left pixel for class 0, 1, ...: four corners, then edge
    middles."""
    side = mark_size(image_size)
    far, middle = image_size - 1 - side, (image_size - side) // 2
    return [(1, 1), (1, far), (far, far), (far, 1),
            (1, middle), (middle, far), (far, middle), (middle, 1)]


def _check(count, image_size, classes, channels, spurious, with_cue, shuffle_cue) -> tuple:
    if not isinstance(count, (int, np.integer)) or count < 1:
        raise CnnvizError(f"count must be a positive int; received count={count!r}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 24:
        raise CnnvizError("image_size must be an int >= 24 (smaller shapes stop being "
                          f"recognisable); received image_size={image_size!r}")
    if channels not in (1, 3):
        raise CnnvizError(f"channels must be 1 or 3; received channels={channels!r}")
    classes = tuple(classes)
    unknown = [name for name in classes if name not in SHAPE_CLASSES]
    if unknown or len(classes) < 2 or len(set(classes)) != len(classes):
        raise CnnvizError(
            f"classes must be at least two distinct names out of {', '.join(SHAPE_CLASSES)}; "
            f"received classes={classes!r}"
        )
    if spurious is not None and spurious not in SPURIOUS_CUES:
        raise CnnvizError(
            f"spurious must be None or one of {', '.join(SPURIOUS_CUES)}; "
            f"received spurious={spurious!r}"
        )
    if shuffle_cue and not with_cue:
        raise CnnvizError("shuffle_cue=True puts the cue at a random class's place; it needs "
                          "with_cue=True (use with_cue=False for no cue)")
    return classes


def _shape_masks(kind: str, dy: np.ndarray, dx: np.ndarray, half: np.ndarray,
                 angle: np.ndarray) -> np.ndarray:
    """Filled shape masks (n, H, W) from offsets to the centre and half-extents (n, 1, 1)."""
    # Rotate the offsets; circles and rings are unchanged by it.
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    if kind == "circle":
        return u**2 + v**2 <= half**2
    if kind == "ring":
        radius = np.sqrt(u**2 + v**2)
        return (radius <= half) & (radius >= 0.55 * half)
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85 * half
    if kind == "triangle":
        # apex at v = -half, base at v = 0.8 * half, base width 1.9 * half
        return (v >= -half) & (v <= 0.8 * half) & (np.abs(u) <= 0.95 * (v + half) / 1.8)
    # cross: two bars of width 0.6 * half
    bar = 0.3 * half
    return ((np.abs(u) <= bar) & (np.abs(v) <= half)) | ((np.abs(v) <= bar) & (np.abs(u) <= half))


def _per_image(values: np.ndarray, part: slice) -> np.ndarray:
    """values[part] shaped (n, 1, 1) to broadcast against (n, H, W) pixel grids."""
    return values[part][:, None, None]


def _intensities(rng: np.random.Generator, levels: np.ndarray) -> np.ndarray:
    """A shape intensity per image, at least _CONTRAST away from its background level."""
    below = np.clip(levels - _CONTRAST, 0.0, None)  # interval [0, level - contrast]
    above = np.clip(_BRIGHTEST - (levels + _CONTRAST), 0.0, None)  # [level + contrast, 0.9]
    pick = rng.uniform(0.0, below + above)
    return np.where(pick < below, pick, levels + _CONTRAST + (pick - below))


def make_shapes(
    count: int,
    *,
    image_size: int = 32,
    classes: tuple[str, ...] = ("circle", "square", "triangle"),
    channels: int = 3,
    spurious: str | None = None,
    with_cue: bool = True,
    shuffle_cue: bool = False,
    seed: int = 0,
) -> ShapesData:
    """Draw `count` images of filled shapes, one shape per image, labels balanced.

    Each shape has a random size, position, rotation (square, triangle, cross) and
    intensity/colour, always at least 0.3 brighter or darker than its background; the background
    is a random level with a gradient and pixel noise (per-channel tint with 3 channels).

    Generate the training split with the cue and the test split without it (or shuffled), with
    another seed: `make_shapes(n, spurious="corner_mark", seed=1)` and
    `make_shapes(m, spurious="corner_mark", with_cue=False, seed=2)`.

    Args:
        count: number of images N.
        image_size: height = width, >= 24.
        classes: shape names out of SHAPE_CLASSES (any two or more, in label order).
        channels: 1 (grayscale) or 3 (colour).
        spurious: None, "corner_mark" or "background" (see the module docstring).
        with_cue: draw the cue (when `spurious` is set). With the same seed, False gives the same
            shapes (and, for "corner_mark", the same pixels) without the cue.
        shuffle_cue: draw the cue of a uniformly random class instead of the label's, so the cue
            no longer predicts the class (chance level); needs `with_cue`.
        seed: the random seed; the same arguments give the same data.

    Returns:
        ShapesData with images float32 (N, H, W, C) in [0, 1], labels int32 (N,), class_names,
        cue_masks and shape_masks bool (N, H, W), cue_classes int32 (N,), spurious.
    """
    classes = _check(count, image_size, classes, channels, spurious, with_cue, shuffle_cue)
    rng = np.random.default_rng(seed)
    num_classes = len(classes)
    labels = rng.permutation(np.arange(count) % num_classes).astype(np.int32)

    # Drawn whatever the cue options, so one seed gives the same shapes with, without and with a
    # shuffled cue: the splits differ in the cue only.
    random_classes = rng.integers(0, num_classes, count).astype(np.int32)
    random_levels = rng.uniform(*_LEVELS, count)

    has_cue = spurious is not None and with_cue
    if not has_cue:
        cue_classes = np.full(count, -1, np.int32)
    else:
        cue_classes = random_classes if shuffle_cue else labels.copy()

    # Background level: per class when the background is the cue, else uniformly random.
    class_levels = np.linspace(*_LEVELS, num_classes)
    levels = class_levels[cue_classes] if spurious == "background" and has_cue else random_levels

    # Shapes stay this far from the border, where the marks go, with or without a mark.
    side = mark_size(image_size)
    margin = side + 2
    usable = image_size - 2 * margin
    half = rng.uniform(0.45, 0.95, count) * usable / 2 / _REACH
    centre_y = rng.uniform(margin + _REACH * half, image_size - margin - _REACH * half)
    centre_x = rng.uniform(margin + _REACH * half, image_size - margin - _REACH * half)
    angle = rng.uniform(0.0, 2 * np.pi, count)
    intensity = _intensities(rng, levels)
    tint = rng.uniform(-0.05, 0.05, (count, channels)) if channels == 3 else np.zeros((count, 1))
    shape_colour = intensity[:, None] + (
        rng.uniform(-0.15, 0.15, (count, channels)) if channels == 3 else 0.0
    )
    gradient_angle = rng.uniform(0.0, 2 * np.pi, count)
    gradient_size = rng.uniform(0.0, 0.12, count)
    noise_std = rng.uniform(0.0, 0.03, count)
    # Pixel noise from its own stream, so the per-image draws above do not depend on chunking.
    noise_seed = int(rng.integers(2**31))

    images = np.empty((count, image_size, image_size, channels), np.float32)
    shape_masks = np.empty((count, image_size, image_size), bool)
    rows, cols = np.mgrid[0:image_size, 0:image_size] + 0.5  # pixel centres
    noise_rng = np.random.default_rng(noise_seed)
    for start in range(0, count, _CHUNK):
        part = slice(start, min(start + _CHUNK, count))
        n = part.stop - part.start
        ramp = ((cols - image_size / 2) * np.cos(_per_image(gradient_angle, part))
                + (rows - image_size / 2) * np.sin(_per_image(gradient_angle, part)))
        background = (_per_image(levels, part)
                      + _per_image(gradient_size, part) * ramp / (image_size / 2))[..., None]
        background = background + tint[part, None, None, :] + _per_image(noise_std, part)[
            ..., None] * noise_rng.standard_normal((n, image_size, image_size, channels))
        masks = np.zeros((n, image_size, image_size), bool)
        dy, dx = rows - _per_image(centre_y, part), cols - _per_image(centre_x, part)
        for k, kind in enumerate(classes):
            chosen = labels[part] == k
            if chosen.any():
                masks[chosen] = _shape_masks(kind, dy[chosen], dx[chosen],
                                             _per_image(half, part)[chosen],
                                             _per_image(angle, part)[chosen])
        picture = np.where(masks[..., None], shape_colour[part, None, None, :], background)
        images[part] = np.clip(picture, 0.0, _BRIGHTEST)
        shape_masks[part] = masks

    cue_masks = np.zeros((count, image_size, image_size), bool)
    if has_cue and spurious == "corner_mark":
        origins = mark_origins(image_size)
        for index, cue_class in enumerate(cue_classes):
            top, left = origins[cue_class]
            cue_masks[index, top:top + side, left:left + side] = True
        images[cue_masks] = 1.0
    elif has_cue and spurious == "background":
        cue_masks = ~shape_masks

    return ShapesData(images, labels, classes, cue_masks, shape_masks, cue_classes, spurious)


def _check_maps(attribution, cue_masks) -> tuple[np.ndarray, np.ndarray]:
    attribution = np.asarray(attribution, np.float64)
    cue_masks = np.asarray(cue_masks, bool)
    if cue_masks.ndim != 3 or attribution.shape != cue_masks.shape:
        raise CnnvizError(
            f"attribution and cue_masks must both have shape (N, H, W); received "
            f"{attribution.shape} and {cue_masks.shape} (reduce channels of an attribution first)"
        )
    return attribution, cue_masks


def cue_share(attribution, cue_masks) -> np.ndarray:
    """The share of each image's positive attribution that lies inside the cue region.

    1.0 means the explanation points only at the shortcut; compare with `cue_area_share`, the
    share a uniform map would give. An image without positive attribution gets 0.

    Args:
        attribution: (N, H, W) per-pixel attribution (negative values are left out).
        cue_masks: bool (N, H, W), e.g. `ShapesData.cue_masks`.

    Returns:
        float32 (N,) in [0, 1].
    """
    attribution, cue_masks = _check_maps(attribution, cue_masks)
    positive = np.maximum(attribution, 0.0)
    total = positive.sum(axis=(1, 2))
    inside = np.where(cue_masks, positive, 0.0).sum(axis=(1, 2))
    share = np.divide(inside, total, out=np.zeros_like(total), where=total > 0)
    return share.astype(np.float32)


def cue_area_share(cue_masks) -> np.ndarray:
    """The cue region's share of the image area, float32 (N,): the baseline for `cue_share`."""
    cue_masks = np.asarray(cue_masks, bool)
    if cue_masks.ndim != 3:
        raise CnnvizError(f"cue_masks must have shape (N, H, W); received {cue_masks.shape}")
    return cue_masks.mean(axis=(1, 2)).astype(np.float32)
