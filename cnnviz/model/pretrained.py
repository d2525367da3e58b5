"""Pretrained `keras.applications` models by name (`keras:ResNet50`), with the input mode of their
family and the 1,000 ImageNet class names, so they can be explained like a run.

ImageNet weights are what Keras downloads once into its cache (`$KERAS_HOME/models`, by default
`~/.keras/models`) and reuses after; a local weights file replaces them (`weights=`), for a
machine without internet.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from cnnviz.errors import CnnvizError, first_line

PREFIX = "keras:"

# What each family's own `preprocess_input` computes (keras/src/applications/<family>.py), as a
# mode of cnnviz.model.inputs. First matching prefix wins: "ResNet50V2" is not a "ResNet".
# "none": the model rescales raw 0..255 pixels itself (its `preprocess_input` is the identity).
_FAMILY_MODES = (
    ("ResNet", "V2", "unit"),  # resnet_v2: mode "tf"
    ("ResNet", "", "caffe"),  # resnet: mode "caffe"
    ("VGG", "", "caffe"),
    ("MobileNetV3", "", "none"),  # include_preprocessing: Rescaling to [-1, 1] inside
    ("MobileNet", "", "unit"),  # MobileNet and MobileNetV2: mode "tf"
    ("Xception", "", "unit"),
    ("Inception", "", "unit"),  # InceptionV3, InceptionResNetV2
    ("NASNet", "", "unit"),
    ("DenseNet", "", "torch"),
    ("EfficientNet", "", "none"),  # EfficientNet and EfficientNetV2: rescaling inside
    ("ConvNeXt", "", "none"),  # Normalization inside
)


@dataclass(frozen=True)
class Pretrained:
    """A `keras.applications` model with what explaining it needs.

    model: the Keras model (its default input size, e.g. (None, 224, 224, 3); 299 for Xception).
    preprocess_mode: how 8-bit pixels become its inputs (a mode of `cnnviz.model.inputs.prepare`).
    class_names: its 1,000 output names (`imagenet_class_names`).
    description: one line saying which model and weights these are.
    """

    model: object
    preprocess_mode: str
    class_names: list[str]
    description: str


def pretrained_model(spec: str, *, weights: str | Path | None = None) -> Pretrained:
    """Build `keras.applications.NAME` for `spec` "keras:NAME" (or "NAME"), spelled as in Keras.

    Args:
        spec: "keras:ResNet50", "keras:MobileNetV2", ... (any model function of
            keras.applications, with Keras's capitals).
        weights: None for the ImageNet weights (Keras's download cache), or the path of a local
            weights file: a `.weights.h5` (what `model.save_weights` writes), a legacy `.h5`
            such as Keras's own ImageNet files, or a `.keras` file of the same architecture.

    Returns:
        A `Pretrained` (model, preprocess_mode, class_names, description).

    Raises:
        CnnvizError: an unknown name (close matches listed), a weights file that is missing or
            does not fit, or ImageNet weights neither cached nor downloadable.
    """
    import keras

    name = spec.removeprefix(PREFIX)
    application = _application(keras, name)

    def build(**weights_argument):
        with warnings.catch_warnings():  # MobileNetV3 warns of its own default input size
            warnings.filterwarnings("ignore", message="`input_shape` is undefined")
            return application(**weights_argument)

    mode = _preprocess_mode(name)
    if weights is None:
        try:
            model = build(weights="imagenet")
        except Exception as error:  # noqa: BLE001 - a download fails in many ways
            raise CnnvizError(_no_imagenet_weights(name, error)) from None
        source = "ImageNet weights"
    else:
        path = Path(weights)
        if not path.is_file():
            raise CnnvizError(f"--weights {path} does not exist; give a weights file for "
                              f"{PREFIX}{name} (e.g. what model.save_weights writes)")
        try:  # keras.applications builds the model and loads the file itself
            model = build(weights=str(path))
        except Exception as error:  # noqa: BLE001 - Keras raises many types for a bad file
            raise CnnvizError(f"cannot load --weights {path} into {PREFIX}{name}: "
                              f"{first_line(error)}") from None
        source = f"weights from {path}"
    size = "x".join(str(side) for side in model.input_shape[1:])
    return Pretrained(model=model, preprocess_mode=mode, class_names=imagenet_class_names(),
                      description=f"{PREFIX}{name} (keras.applications, {source}; input {size}, "
                                  f"preprocess {mode})")


@lru_cache(maxsize=1)
def _imagenet_names() -> tuple[str, ...]:
    text = resources.files("cnnviz.model").joinpath("imagenet_classes.txt").read_text("utf-8")
    return tuple(text.splitlines())


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet class names in output order, exactly as
    `keras.applications.imagenet_utils.decode_predictions` gives them: its class index's second
    field, underscores kept ("tench", ..., 281 "tabby", 282 "tiger_cat", ..., "toilet_tissue").
    Two names occur twice there and here: "crane" (134 the bird, 517 the machine) and "maillot"
    (638, 639)."""
    return list(_imagenet_names())


def application_names(keras) -> list[str]:
    """The model functions of `keras.applications` ("ConvNeXtBase", ..., "Xception")."""
    return sorted(name for name in dir(keras.applications)
                  if name[:1].isupper() and callable(getattr(keras.applications, name)))


def _application(keras, name: str):
    names = application_names(keras)
    if name in names:
        return getattr(keras.applications, name)
    by_lower = {known.lower(): known for known in names}
    close = [by_lower[match] for match in
             difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)]
    hint = (f"did you mean {' or '.join(PREFIX + match for match in close)}? "
            if close else f"for example {PREFIX}ResNet50 or {PREFIX}MobileNetV2; ")
    raise CnnvizError(f"{PREFIX}{name} is not a keras.applications model: {hint}names are "
                      "spelled as in keras.applications")


def _preprocess_mode(name: str) -> str:
    for prefix, suffix, mode in _FAMILY_MODES:
        if name.startswith(prefix) and name.endswith(suffix):
            return mode
    raise CnnvizError(f"cnnviz does not know how {PREFIX}{name}'s inputs are prepared (a "
                      "keras.applications family newer than cnnviz); save it with model.save() "
                      "and pass the .keras file with --preprocess")


def _no_imagenet_weights(name: str, error: Exception) -> str:
    import os

    from cnnviz._keras import keras_cache_dir

    cache = os.path.join(keras_cache_dir(), "models")
    return (f"cannot get the ImageNet weights of {PREFIX}{name} ({first_line(error)}): Keras "
            f"looks for them in {cache} (set KERAS_HOME to move it) and downloads them there "
            "once; offline, pass --weights FILE, a local weights file (e.g. what "
            "model.save_weights('x.weights.h5') writes)")
