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

MODES = ("auto", "scale", "unit", "caffe", "torch", "none")
RESIZE_MODES = ("stretch", "crop", "pad")

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
    _check_mode(mode)
    if mode == "auto":
        raise CnnvizError("--preprocess auto has no range of its own; resolve it (resolve_mode)")
    ends = prepare(np.array([[[[0.0, 0.0, 0.0]], [[255.0, 255.0, 255.0]]]], np.float32), mode)
    return float(ends.min()), float(ends.max())


def resolve_mode(model, mode: str) -> tuple[str, str | None]:
    """The mode "auto" means for `model`, and a one-line note when it had to guess.

    auto: raw 0..255 ("none") when the model begins with a Rescaling or Normalization layer
    (also as the first layer of a nested first model), else "scale" (x / 255).
    """
    from cnnviz.model.outputs import first_layer

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


def resize_pixels(pixels, size: tuple[int, int], how: str = "stretch") -> np.ndarray:
    """One image (H, W, C) resized to `size` = (height, width), bilinear, as float32.

    stretch: to the size whatever the aspect ratio (image_dataset_from_directory's default);
    crop: the largest centred window of the target aspect ratio, then resized (Keras's
    `smart_resize`, `crop_to_aspect_ratio=True`); pad: black borders to the target aspect ratio,
    centred, then resized (Keras's `pad_to_aspect_ratio=True`).
    """
    import keras

    if how not in RESIZE_MODES:
        raise CnnvizError(f"--resize {how!r} is not a mode; choose one of {', '.join(RESIZE_MODES)}")
    image = np.asarray(pixels, dtype=np.float32)
    height, width = (int(side) for side in size)
    if image.shape[:2] == (height, width):
        return image
    resizing = keras.layers.Resizing(height, width, interpolation="bilinear",
                                     crop_to_aspect_ratio=how == "crop",
                                     pad_to_aspect_ratio=how == "pad", fill_value=0.0)
    return np.asarray(resizing(image), dtype=np.float32)
