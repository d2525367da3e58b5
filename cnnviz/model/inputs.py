"""From 8-bit pixels to what a bare .keras model expects: resizing and input scaling modes.

A run directory records how its images were prepared; a bare `.keras` file does not, so the
user says it with `--preprocess` (the modes of `keras.applications.imagenet_utils.
preprocess_input`) and `--resize` (the aspect-ratio conventions of Keras's `Resizing` layer,
`smart_resize` and `image_dataset_from_directory`). Pixels are float arrays in 0..255, RGB
(or one gray channel), channels last; everything here is a pure function of them.
"""

from __future__ import annotations

import numpy as np

from cnnviz.errors import CnnvizError
from cnnviz.model.exported import is_exported
from cnnviz.model.graph import (
    is_nested_model,
)

MODES = ("auto", "scale", "unit", "caffe", "torch", "none")

# keras.applications.imagenet_utils: "caffe" subtracts these from BGR pixels; "torch" scales to
# [0, 1] and standardizes RGB with these.
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
_TORCH_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_TORCH_STD = np.array([0.229, 0.224, 0.225], np.float32)

DESCRIPTIONS = {
    "scale": "x / 255, in [0, 1]",
    "unit": "x / 127.5 - 1, in [-1, 1] (MobileNet, ResNetV2, Inception: mode 'tf')",
    "caffe": "RGB -> BGR, minus the ImageNet mean per channel (VGG, ResNet50)",
    "torch": "x / 255, minus the ImageNet mean, over its std per channel (DenseNet)",
    "none": "raw 0..255 pixels (the model rescales them itself)",
}


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise CnnvizError(f"--preprocess {mode!r} is not a mode; choose one of {', '.join(MODES)}")


def _three_channels(pixels: np.ndarray, mode: str) -> None:
    if pixels.shape[-1] != 3:
        raise CnnvizError(
            f"--preprocess {mode} needs RGB images (3 channels); the model takes "
            f"{pixels.shape[-1]} channel(s): use scale, unit or none"
        )


def prepare(pixels, mode: str) -> np.ndarray:
    """Model inputs from pixels: (N, H, W, C) float32 0..255 -> (N, H, W, C) float32.

    Modes (as `keras.applications.imagenet_utils.preprocess_input` computes them):
    scale: x / 255; unit: x / 127.5 - 1 (Keras's "tf" mode); caffe: RGB -> BGR then minus
    the ImageNet channel means; torch: x / 255, minus the ImageNet mean, divided by its std;
    none: x unchanged. ("auto" is resolved by `resolve_mode` first.)
    """
    _check_mode(mode)
    x = np.asarray(pixels, dtype=np.float32)
    if mode == "scale":
        return x / np.float32(255.0)
    if mode == "unit":
        return x / np.float32(127.5) - np.float32(1.0)
    if mode == "caffe":
        _three_channels(x, mode)
        return x[..., ::-1] - _CAFFE_MEAN_BGR
    if mode == "torch":
        _three_channels(x, mode)
        return (x / np.float32(255.0) - _TORCH_MEAN) / _TORCH_STD
    if mode == "none":
        return x.copy()
    raise CnnvizError("--preprocess auto must be resolved against a model first (resolve_mode)")


def to_pixels(inputs, mode: str) -> np.ndarray:
    """The inverse of `prepare`: model inputs back to 0..255 RGB pixels (for display)."""
    _check_mode(mode)
    x = np.asarray(inputs, dtype=np.float32)
    if mode == "scale":
        return x * np.float32(255.0)
    if mode == "unit":
        return (x + np.float32(1.0)) * np.float32(127.5)
    if mode == "caffe":
        return (x + _CAFFE_MEAN_BGR)[..., ::-1]
    if mode == "torch":
        return (x * _TORCH_STD + _TORCH_MEAN) * np.float32(255.0)
    return x.copy()


def value_range(mode: str) -> tuple[float, float]:
    """(low, high) of the values `prepare` gives for pixels in 0..255 (over all channels)."""
    lows, highs = mode_range(mode, 3 if mode in ("caffe", "torch") else 1)
    return float(lows.min()), float(highs.max())


def mode_range(mode: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(lows, highs), (C,) float32 each: what `prepare` makes of black and of white pixels in
    each input channel (caffe: the negated BGR means and 255 minus them)."""
    _check_mode(mode)
    if mode == "auto":
        raise CnnvizError("--preprocess auto has no range of its own; resolve it (resolve_mode)")
    ends = prepare(np.array([[[[0.0] * channels]], [[[255.0] * channels]]], np.float32), mode)
    return ends[0, 0, 0], ends[1, 0, 0]


def resolve_mode(model, mode: str) -> tuple[str, str | None]:
    """The mode "auto" means for `model`, and a one-line note when it had to guess.

    auto: raw 0..255 ("none") when the model begins with a Rescaling or Normalization layer
    (also as the first layer of a nested first model), else "scale" (x / 255).
    """

    _check_mode(mode)
    if mode != "auto":
        return mode, None
    first = first_layer(model)
    kind = type(first).__name__ if first is not None else ""
    if kind in ("Rescaling", "Normalization"):
        return "none", None
    return "scale", (
        f"--preprocess auto: model {model.name!r} does not begin with a Rescaling or "
        "Normalization layer, so image files are divided by 255 (scale); pass --preprocess "
        "unit, caffe, torch or none if it was trained otherwise"
    )


def as_image_batch(images) -> np.ndarray:
    """Return `images` as a float32 array of shape (N, H, W, C); a single (H, W, C) image gets
    N=1."""
    batch = np.asarray(images, dtype=np.float32)
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4:
        raise CnnvizError(
            f"images must have shape (N, H, W, C) or (H, W, C); received shape {batch.shape}"
        )
    return batch


# ---------------------------------------------------------------------------- input range
_PIXEL_LAYERS = ("Rescaling", "Normalization")


def first_layer(model):
    """The first layer that changes the input at inference (inside nested first models too),
    or None: augmentation layers (Keras's Random* preprocessing, identities at inference, as in
    the transfer-learning guide's `data_augmentation -> Rescaling -> base`) are looked through."""
    for layer in _leading_layers(model):
        kind = type(layer).__name__
        if not (kind.startswith("Random") and kind != "RandomCrop"):  # RandomCrop crops
            return layer
    return None


def _leading_layers(model):
    """The layers of `model` in order, nested models opened where they come."""
    for layer in model.layers:
        if type(layer).__name__ == "InputLayer":
            continue
        if is_nested_model(layer):
            yield from _leading_layers(layer)
        else:
            yield layer


def input_range(model, *, preprocess: str | None = None) -> tuple[float, float]:
    """(low, high) over all channels of `channel_range`: for what needs one pair (clip ranges,
    metrics.json's record)."""
    lows, highs = channel_range(model, preprocess=preprocess)
    return float(lows.min()), float(highs.max())


def channel_range(model, *, preprocess: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The range of values the model's input takes, (lows, highs) per input channel, (C,)
    float32 each, in the units it is fed: the one definition every method, figure and command
    uses (black is `lows`, e.g. -1 for "unit", the negated channel means for "caffe").

    (0, 255) when the model begins with a Rescaling or Normalization layer (also as the first
    layer of a nested first model): it takes raw 8-bit pixels (docs/decisions.md D1). A
    `Rescaling(scale)` without offset says more: it maps (0, 1/scale) onto [0, 1] — (0, 255) for
    cnnviz's models
    of images, (0, 9) for toy4x4's data in its own units. Else (0, 1), or, when the caller
    knows how images were prepared (`--preprocess`), that mode's range: "scale" (0, 1),
    "unit" (-1, 1), "none" (0, 255), "caffe" and "torch" their per-channel extremes.
    Explanations take every value in input units (occlusion fill, masking values, baselines,
    activation-maximization start and clip range) from this one function. Without a mode,
    (0, 1) is a guess for a model that says nothing about its input (a bare model without
    --preprocess: `resolve_mode`'s note says so). An exported model (`cnnviz.model.exported`)
    has its recorded range, else (0, 255).
    """
    channels = int(model.inputs[0].shape[-1])
    if preprocess not in (None, "auto"):
        return mode_range(preprocess, channels)
    if is_exported(model):
        low, high = model.input_range
        return np.full(channels, low, np.float32), np.full(channels, high, np.float32)
    first = first_layer(model)
    kind = type(first).__name__ if first is not None else ""
    low, high = 0.0, 1.0
    if kind in _PIXEL_LAYERS:
        low, high = 0.0, 255.0
    if kind == "Rescaling":
        scale, offset = first.scale, first.offset
        if np.ndim(scale) == 0 and np.ndim(offset) == 0 and float(offset) == 0.0 and scale > 0:
            high = float(np.float32(1.0 / float(scale)))
    return np.full(channels, low, np.float32), np.full(channels, high, np.float32)


def pixel_value(value: float, lows: np.ndarray, highs: np.ndarray) -> np.ndarray:
    """A pixel value (0..255, the same in every channel: 0 black) in input units, (C,)."""
    return (lows + np.float32(value / 255.0) * (highs - lows)).astype(np.float32)
