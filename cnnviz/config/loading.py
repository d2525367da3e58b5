"""The YAML config: typed, strict, validated once before anything is built.

A config has four sections, `data`, `model`, `train` and `seed` (plus an optional `name`). Unknown
keys, wrong types and impossible values fail here with the key path, the value and what is
allowed (`model.layers.2.kernel: ...`), never half-way through a run.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)

from cnnviz.errors import CnnvizError, ConfigError

Activation = Literal[
    "relu", "leaky_relu", "tanh", "sigmoid", "elu", "selu", "swish", "gelu", "linear"
]
Padding = Literal["valid", "same"]
PositiveInt = Annotated[int, Field(gt=0)]

# Upper bounds that keep absurd numbers from reaching TensorFlow (which would fail with
# ResourceExhausted or run out of memory long after the run started).
MAX_FILTERS = 65_536
MAX_UNITS = 1_048_576
MAX_PARAMETERS = 1_000_000_000  # 4 GB of float32 weights, ~16 GB to train with Adam
MAX_WINDOW = 4_096  # kernel, pool and stride sides
MAX_IMAGE_SIDE = 16_384


class _Strict(BaseModel):
    # strict: `filters: true` is not 1 and `epochs: 2.0` is not 2 (pydantic's lax mode coerces both).
    model_config = ConfigDict(extra="forbid", validate_default=True, strict=True)


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def _window(value: Any) -> int | list[int]:
    """A kernel, pool or stride: one positive int, or [height, width]; one clear message otherwise."""

    def side(item: Any) -> bool:
        return type(item) is int and 0 < item <= MAX_WINDOW

    if side(value) or (isinstance(value, list) and len(value) == 2 and all(map(side, value))):
        return value
    raise ValueError(
        f"must be a whole number from 1 to {MAX_WINDOW}, or a list [height, width] of two such "
        "numbers"
    )


IntOrPair = Annotated[int | list[int], PlainValidator(_window)]


# ----------------------------------------------------------------------------------------- data
class ShapesOptions(_Strict):
    """Options of the generated `shapes` data set."""

    count: PositiveInt = Field(3000, description="Images generated in all (train+val+test).")
    classes: list[Literal["circle", "square", "triangle", "cross", "ring"]] = Field(
        default_factory=lambda: ["circle", "square", "triangle"],
        min_length=2,
        description="Shape classes to draw.",
    )
    spurious: Literal["corner_mark", "background"] | None = Field(
        None,
        description="A cue that predicts the class in the training split only "
        "(absent from the test split): a bright corner mark or a per-class background level.",
    )
    test_cue: Literal["absent", "shuffled"] = Field(
        "absent", description="In the test split the cue is absent, or shuffled across classes."
    )


# ------------------------------------------------------------------------------- augmentation
# Each entry becomes the Keras preprocessing layer of the same name (keras.layers.RandomFlip,
# ...), applied to training batches only, inside the tf.data pipeline on the CPU.
Factor = Annotated[float, Field(ge=0.0, le=1.0)]
FactorOrRange = Factor | Annotated[list[Annotated[float, Field(ge=-1.0, le=1.0)]],
                                   Field(min_length=2, max_length=2)]
FillMode = Literal["reflect", "wrap", "constant", "nearest"]


class RandomFlip(_Strict):
    type: Literal["random_flip"]
    mode: Literal["horizontal", "vertical", "horizontal_and_vertical"] = "horizontal"


class RandomRotation(_Strict):
    type: Literal["random_rotation"]
    factor: FactorOrRange = Field(
        0.1, description="Fraction of a full turn: 0.1 rotates by up to +-36 degrees.")
    fill_mode: FillMode = "reflect"


class RandomZoom(_Strict):
    type: Literal["random_zoom"]
    height_factor: FactorOrRange = Field(
        0.1, description="Zoom by up to this share of the height (negative: in, positive: out).")
    width_factor: FactorOrRange | None = Field(
        None, description="Default: the same zoom as the height (aspect ratio kept).")
    fill_mode: FillMode = "reflect"


class RandomTranslation(_Strict):
    type: Literal["random_translation"]
    height_factor: FactorOrRange = Field(0.1, description="Shift by up to this share of the height.")
    width_factor: FactorOrRange = Field(0.1, description="Shift by up to this share of the width.")
    fill_mode: FillMode = "reflect"


class RandomContrast(_Strict):
    type: Literal["random_contrast"]
    factor: FactorOrRange = Field(
        0.2, description="Scale the contrast around the mean by a factor in [1 - f, 1 + f].")


class RandomBrightness(_Strict):
    type: Literal["random_brightness"]
    factor: FactorOrRange = Field(
        0.2, description="Add up to this share of the value range (0..255) to every pixel.")


AugmentConfig = Annotated[
    RandomFlip | RandomRotation | RandomZoom | RandomTranslation | RandomContrast
    | RandomBrightness,
    Field(discriminator="type"),
]
AUGMENT_TYPES = ("random_flip", "random_rotation", "random_zoom", "random_translation",
                 "random_contrast", "random_brightness")


class DataConfig(_Strict):
    """Where images come from and how they are prepared."""

    source: Literal[
        "digits", "mnist", "fashion_mnist", "cifar10", "directory", "npz", "shapes", "inline"
    ] = Field("digits", description="Data set. `digits` ships with scikit-learn (offline).")
    path: str | None = Field(
        None,
        description="Folder (directory), .npz file (npz), or a local copy of the keras.datasets "
        "file (mnist: mnist.npz; fashion_mnist: folder of the four .gz files; cifar10: the "
        "cifar-10-batches-py folder) to use instead of the Keras cache/download.",
    )
    image_size: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)] | None = Field(
        None, description="Resize images to [height, width]; null keeps the native size."
    )
    color_mode: Literal["grayscale", "rgb"] | None = Field(
        None, description="directory source: read images as grayscale or rgb (default rgb); "
        "other modes are converted (see README, Image files)."
    )
    preprocessing: Literal["scale", "standardize", "mean_subtract", "none"] = Field(
        "scale",
        description="Done by the model's first layers (Keras Rescaling, Normalization), so the "
        "saved model takes raw pixels: scale: divide by scale_divisor into [0,1]; standardize: "
        "(x-mean)/std of the training split; mean_subtract: x-mean (per channel); none: raw "
        "values.",
    )
    scale_divisor: float | None = Field(
        None,
        gt=0,
        description="Divisor for `scale` and applied before standardize/mean_subtract, in the "
        "source's own units; default: the source's maximum (16 for digits, 255 for 8-bit images, "
        "1 for shapes).",
    )
    validation_split: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of the training split held out for validation."
    )
    test_split: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="Share held out for testing, for sources without their own test split.",
    )
    limit: PositiveInt | None = Field(
        None, description="Use at most this many training images, a stratified seeded subset "
        "(quick runs)."
    )
    augment: list[AugmentConfig] = Field(
        default_factory=list,
        description="Random transformations of the training images (Keras preprocessing layers, "
        "in this order): random_flip, random_rotation, random_zoom, random_translation, "
        "random_contrast, random_brightness. See `cnnviz augment CONFIG`.",
    )
    cache: Literal["none", "memory", "disk"] = Field(
        "none",
        description="directory source: keep decoded images after the first epoch (tf.data cache) "
        "in memory, or on disk (in <run>/cache, or data.cache_dir); for when decoding dominates.",
    )
    cache_dir: str | None = Field(
        None, description="Folder for data.cache: disk (default: the run directory's cache/)."
    )
    skip_bad_files: bool = Field(
        False,
        description="directory source: skip image files that cannot be read (and say which) "
        "instead of stopping; every file is then decoded once before training.",
    )
    max_image_pixels: PositiveInt = Field(
        89_478_485,
        description="Refuse image files with more pixels than this, before decoding them "
        "(Pillow's decompression-bomb limit, 89 megapixels).",
    )
    download_timeout: float = Field(
        30.0, gt=0, description="Seconds a keras.datasets download may wait to connect or read."
    )
    test_limit: PositiveInt | None = Field(
        None, description="Use at most this many test images, a stratified seeded subset "
        "(quick runs; `--smoke` sets 256)."
    )
    shapes: ShapesOptions = Field(default_factory=ShapesOptions)
    images: list[Any] | None = Field(
        None, description="inline source: a list of images, each [H][W] or [H][W][C] numbers."
    )
    labels: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="inline source: one class index per image."
    )
    class_names: list[str] | None = Field(
        None, description="Names of the classes, in index order (default: from the source)."
    )

    @model_validator(mode="after")
    def _source_needs(self) -> DataConfig:
        if self.source == "shapes" and self.image_size and min(self.image_size) < 24:
            raise ValueError(
                f"data.image_size={self.image_size}: the shapes source draws images of at least "
                "24x24 (smaller shapes vanish); use 24 or more"
            )
        if self.source == "shapes" and self.image_size and self.image_size[0] != self.image_size[1]:
            raise ValueError(
                f"data.image_size={self.image_size}: the shapes source draws square images; "
                "give equal height and width"
            )
        if self.source in ("directory", "npz") and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        if self.source == "inline":
            if not self.images or self.labels is None:
                raise ValueError("data.source 'inline' needs data.images and data.labels")
            if len(self.images) != len(self.labels):
                raise ValueError(
                    f"data.images has {len(self.images)} images but data.labels has "
                    f"{len(self.labels)} labels"
                )
        return self


# ---------------------------------------------------------------------------------------- model
class Conv2DLayer(_Strict):
    type: Literal["conv2d"]
    filters: Annotated[int, Field(gt=0, le=MAX_FILTERS)]
    kernel: IntOrPair = 3
    stride: IntOrPair = 1
    padding: Padding = "valid"
    activation: Activation = "relu"
    name: str | None = None


class PoolLayer(_Strict):
    type: Literal["max_pool2d", "avg_pool2d"]
    pool: IntOrPair = 2
    stride: IntOrPair | None = Field(None, description="Default: the pool size.")
    padding: Padding = "valid"
    name: str | None = None


class DropoutLayer(_Strict):
    type: Literal["dropout"]
    rate: float = Field(0.5, ge=0.0, lt=1.0)
    name: str | None = None


class BatchNormLayer(_Strict):
    type: Literal["batch_norm"]
    name: str | None = None


class FlattenLayer(_Strict):
    type: Literal["flatten", "global_avg_pool2d"]
    name: str | None = None


class DenseLayer(_Strict):
    type: Literal["dense"]
    units: Annotated[int, Field(gt=0, le=MAX_UNITS)]
    activation: Activation = "relu"
    name: str | None = None


LayerConfig = Annotated[
    Conv2DLayer | PoolLayer | DropoutLayer | BatchNormLayer | FlattenLayer | DenseLayer,
    Field(discriminator="type"),
]


class OutputConfig(_Strict):
    """The classification head, sized from the data's classes."""

    activation: Literal["softmax", "sigmoid"] = Field(
        "softmax",
        description="softmax over all classes; sigmoid: one unit, for two-class data only.",
    )
    name: str = Field("preds", description="Name of the output layer.")


class BackboneConfig(_Strict):
    """A keras.applications model reused as the feature extractor (fine-tuning)."""

    name: Literal[
        "VGG16", "VGG19", "ResNet50", "MobileNetV2", "MobileNet", "EfficientNetB0", "DenseNet121"
    ]
    weights: Literal["imagenet"] | None = Field(
        "imagenet", description="Pretrained weights (downloaded by Keras), or null for random."
    )
    trainable_layers: Annotated[int, Field(ge=0)] = Field(
        0, description="How many of the backbone's last layers are trained; the rest are frozen."
    )
    learning_rate_multiplier: float = Field(
        0.1, gt=0.0, le=1.0, description="Backbone learning rate = this x train.learning_rate."
    )
    pooling: Literal["avg", "max", "flatten"] = Field(
        "avg", description="How the backbone's feature map meets the head."
    )


class ModelConfig(_Strict):
    layers: list[LayerConfig] = Field(default_factory=list)
    backbone: BackboneConfig | None = None
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _has_something(self) -> ModelConfig:
        if not self.layers and self.backbone is None:
            raise ValueError("model needs at least one entry in model.layers, or a model.backbone")
        check_layer_names(self)
        return self


# ---------------------------------------------------------------------------------- layer names
# What TensorFlow accepts inside a name scope, minus `/` (Keras's path separator) and `>`/`\`,
# not starting with `.` or `-` (figure files are named after layers), and short enough for a
# file name.
_LAYER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
# Names Keras gives layers it adds itself (the model's input layer).
_KERAS_OWN_NAME = re.compile(r"^input_layer(_\d+)?$")


def layer_names(layers: list) -> list[str]:
    """Each layer's name: its own, or `<type>_<n>` (the n-th unnamed-or-named layer of that type),
    so `--layer conv2d_2` means the same layer in every process."""
    counts: dict[str, int] = {}
    names = []
    for spec in layers:
        counts[spec.type] = counts.get(spec.type, 0) + 1
        names.append(spec.name or f"{spec.type}_{counts[spec.type]}")
    return names


def check_layer_names(model: ModelConfig) -> None:
    """Refuse layer names Keras cannot use or that collide (with each other, with an automatic
    name, or with a layer Keras adds), so the model builds under exactly the names of the config."""
    given = [(f"model.layers.{index}.name", layer.name) for index, layer in enumerate(model.layers)
             if layer.name is not None] + [("model.output.name", model.output.name)]
    for where, name in given:
        if not _LAYER_NAME.match(name):
            raise ValueError(
                f"{where}={name!r} is not a usable layer name: use 1 to 64 of the characters "
                "A-Z a-z 0-9 _ . - (not starting with . or -)"
            )
        if _KERAS_OWN_NAME.match(name) or name.startswith("backbone_"):
            raise ValueError(
                f"{where}={name!r} is a name Keras or cnnviz gives its own layers "
                "(input_layer, backbone_*); choose another"
            )
    final = [(f"model.layers.{index}", name, spec.name is None)
             for index, (spec, name) in enumerate(zip(model.layers, layer_names(model.layers)))]
    final.append(("model.output", model.output.name, False))
    seen: dict[str, tuple[str, bool]] = {}
    for where, name, automatic in final:
        if name not in seen:
            seen[name] = (where, automatic)
            continue
        first, first_automatic = seen[name]
        if not (automatic or first_automatic):
            raise ValueError(f"layer names must be unique; {first} and {where} are both {name!r}")
        named, unnamed = (first, where) if automatic else (where, first)
        raise ValueError(
            f"{named}.name={name!r} is also the automatic name of {unnamed}, which has no name; "
            f"give {unnamed} a name or choose another one"
        )


# ---------------------------------------------------------------------------------------- train
class CosineSchedule(_Strict):
    """keras.optimizers.schedules.CosineDecay over the whole training, after a linear warm-up."""

    type: Literal["cosine"]
    warmup_epochs: float = Field(
        0.0, ge=0.0, description="Epochs of linear warm-up from 0 to train.optimizer.learning_rate.")
    min_learning_rate: float = Field(0.0, ge=0.0, description="The rate the cosine ends at.")


class ExponentialSchedule(_Strict):
    """keras.optimizers.schedules.ExponentialDecay: lr * decay_rate ** (epoch / decay_epochs)."""

    type: Literal["exponential"]
    decay_rate: float = Field(0.9, gt=0.0, lt=1.0)
    decay_epochs: float = Field(1.0, gt=0.0)
    staircase: bool = Field(False, description="Decay in whole steps of decay_epochs.")


class StepSchedule(_Strict):
    """keras.optimizers.schedules.PiecewiseConstantDecay: lr * factor every `every_epochs`."""

    type: Literal["step"]
    factor: float = Field(0.1, gt=0.0, lt=1.0)
    every_epochs: PositiveInt = 10


class PlateauSchedule(_Strict):
    """keras.callbacks.ReduceLROnPlateau: lr * factor when `monitor` stops improving."""

    type: Literal["plateau"]
    monitor: str = "val_loss"
    factor: float = Field(0.1, gt=0.0, lt=1.0)
    patience: PositiveInt = 2
    min_learning_rate: float = Field(0.0, ge=0.0)


ScheduleConfig = Annotated[
    CosineSchedule | ExponentialSchedule | StepSchedule | PlateauSchedule,
    Field(discriminator="type"),
]


class OptimizerConfig(_Strict):
    name: Literal["adam", "sgd", "rmsprop"] = "adam"
    learning_rate: float = Field(1e-3, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="sgd and rmsprop only.")
    schedule: ScheduleConfig | None = Field(
        None,
        description="Learning-rate schedule: cosine (warmup_epochs, min_learning_rate), "
        "exponential (decay_rate, decay_epochs, staircase), step (factor, every_epochs) or "
        "plateau (monitor, factor, patience, min_learning_rate). The rate of each epoch goes "
        "into history.csv and curves.png.",
    )

    @model_validator(mode="after")
    def _momentum_applies(self) -> OptimizerConfig:
        if self.name == "adam" and self.momentum:
            raise ValueError(
                f"train.optimizer.momentum={self.momentum} has no meaning for adam; "
                "use sgd or rmsprop, or remove it"
            )
        return self


class EarlyStoppingConfig(_Strict):
    monitor: str = "val_loss"
    patience: PositiveInt = 3
    restore_best_weights: bool = True


class TrainConfig(_Strict):
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 64
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    loss: Literal["auto", "categorical_crossentropy", "binary_crossentropy"] = Field(
        "auto", description="auto: categorical for softmax, binary for a sigmoid output."
    )
    metrics: list[Literal["accuracy", "auc", "precision", "recall"]] = Field(
        default_factory=lambda: ["accuracy"]
    )
    early_stopping: EarlyStoppingConfig | None = None
    class_weight: Literal["balanced"] | dict[int | str, Annotated[float, Field(gt=0.0)]] | None = Field(
        None,
        description="Weight of each class in the loss: balanced (n / (classes x count), from the "
        "training split) or a mapping of class name or index to weight (others: 1).",
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0, description="Keras label smoothing of the cross-entropy targets."
    )
    tensorboard: bool = Field(False, description="Write TensorBoard logs to <run>/tensorboard.")
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="auto: a GPU when TensorFlow sees one, else the CPU."
    )
    distribute: Literal["none", "mirrored", "multi_worker"] = Field(
        "none",
        description="mirrored: all local GPUs (or logical CPUs); multi_worker: several machines "
        "configured by TF_CONFIG.",
    )
    cpu_replicas: PositiveInt = Field(
        1,
        description="distribute: mirrored without a GPU (or with device: cpu): split the CPU into "
        "this many logical devices, one replica each (train.batch_size is split across them).",
    )
    mixed_precision: bool = Field(False, description="float16 compute (for GPUs).")
    jit_compile: bool = Field(False, description="XLA-compile the train step.")
    verbose: Literal["auto", 0, 1, 2] = Field(
        "auto",
        description="Keras progress: 0 silent, 1 bar, 2 one line per epoch; auto: 1 on a "
        "terminal, 2 when output goes to a file or CI log.",
    )
    checkpoint_interval: float = Field(
        30.0,
        ge=0.0,
        description="Seconds between writes of checkpoints/last.keras and best.keras (0: every "
        "epoch); both are always written when training ends.",
    )

    @field_validator("verbose", mode="before")
    @classmethod
    def _verbose_is_not_a_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # True == 1 would pass the Literal
            # ValueError, not TypeError: pydantic reports it with the config location.
            raise ValueError("must be auto, 0, 1 or 2, not a true/false value")  # noqa: TRY004
        return value

    @model_validator(mode="after")
    def _cpu_replicas_need_mirrored(self) -> TrainConfig:
        if self.cpu_replicas > 1 and self.distribute != "mirrored":
            raise ValueError(
                f"train.cpu_replicas={self.cpu_replicas} needs train.distribute 'mirrored' "
                f"(received {self.distribute!r}); set distribute: mirrored or cpu_replicas: 1"
            )
        return self


# --------------------------------------------------------------------------------------- config
class Config(_Strict):
    """A whole cnnviz config."""

    name: str | None = Field(
        None,
        description="Run name, any text; the run folder is a safe slug of it (the full name stays "
        "in config.yaml). Default: the config file's stem.",
    )
    seed: int = Field(42, ge=0, lt=2**32, description="Seed of every random choice, 0 to 2**32-1.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    expect: list[str] = Field(
        default_factory=list,
        description="Quality gates checked after `train`/`run`, e.g. ['test_accuracy>=0.95']; "
        "a failed one exits 1 (see \"Use in CI\").",
    )

    @field_validator("expect")
    @classmethod
    def _expectations_parse(cls, value: list[str]) -> list[str]:
        from cnnviz.ci.gates import parse_expectation

        for index, text in enumerate(value):
            try:
                parse_expectation(text, source=None)
            except CnnvizError as error:  # pydantic adds the location (expect)
                raise ValueError(f"item {index} {text!r}: {error}") from None
        return value

    @field_validator("name")
    @classmethod
    def _name_is_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("name must contain some visible characters")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if self.train.loss == "binary_crossentropy" and self.model.output.activation != "sigmoid":
            raise ValueError(
                "train.loss 'binary_crossentropy' needs model.output.activation 'sigmoid'"
            )
        if self.data.source == "inline" and self.data.labels is not None:
            classes = max(self.data.labels) + 1
            if self.model.output.activation == "sigmoid" and classes > 2:
                raise ValueError(
                    f"model.output.activation 'sigmoid' is for two classes; data has {classes}"
                )
        schedule = self.train.optimizer.schedule
        if isinstance(schedule, CosineSchedule) and schedule.warmup_epochs >= self.train.epochs:
            raise ValueError(
                f"train.optimizer.schedule.warmup_epochs={schedule.warmup_epochs:g} leaves no "
                f"epoch of the {self.train.epochs} (train.epochs) to decay; use fewer")
        if (isinstance(schedule, PlateauSchedule) and schedule.monitor.startswith("val_")
                and self.data.validation_split == 0):
            raise ValueError(
                f"train.optimizer.schedule.monitor {schedule.monitor!r} needs validation data; "
                "set data.validation_split > 0 or monitor 'loss'")
        input_shape = native_input_shape(self.data)
        if input_shape is not None:
            check_layer_shapes(self.model, input_shape)
        return self


# ---------------------------------------------------------------------------------- run folders
_SLUG_LENGTH = 64


def run_slug(name: str | None) -> str:
    """A folder name (and Keras model name) for a run name: ASCII letters, digits, `-`, `_`, `.`.

    Accents are dropped ("Été" -> "Ete"), every other run of characters becomes one `-`, and
    a name with nothing left (Chinese, say) or longer than 64 characters gets a short hash of
    the full name so different names keep different folders. The result starts with a letter or
    digit, which TensorFlow requires of a model's name.
    """
    name = name or "cnnviz"
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", ascii_name)
    slug = re.sub(r"-{2,}", "-", slug).strip("-_.")
    if slug and len(slug) <= _SLUG_LENGTH:
        return slug
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
    head = slug[: _SLUG_LENGTH - 9].rstrip("-_.")
    return f"{head}-{digest}" if head else f"run-{digest}"


# ------------------------------------------------------------------------------ shape checking
_NATIVE_SHAPES = {
    "digits": (8, 8, 1),
    "mnist": (28, 28, 1),
    "fashion_mnist": (28, 28, 1),
    "cifar10": (32, 32, 3),
}


def native_input_shape(data: DataConfig) -> tuple[int, int, int] | None:
    """The model's input shape as the config determines it, or None when only the data can tell."""
    if data.source == "shapes":
        size = data.image_size or [32, 32]
        return (size[0], size[1], 3)
    if data.source == "directory":
        if data.image_size is None:
            return (256, 256, 1 if data.color_mode == "grayscale" else 3)
        return (*data.image_size, 1 if data.color_mode == "grayscale" else 3)
    if data.source == "inline":
        import numpy as np

        try:
            first = np.asarray(data.images[0], dtype=np.float32)
        except (ValueError, TypeError) as error:
            raise ValueError(f"data.images.0 is not a numeric matrix: {error}") from None
        if first.ndim not in (2, 3):
            raise ValueError(f"data.images.0 must be [H][W] or [H][W][C]; got {first.ndim} dims")
        shape = first.shape if first.ndim == 3 else (*first.shape, 1)
        return tuple(data.image_size or shape[:2]) + (shape[2],)
    native = _NATIVE_SHAPES.get(data.source)
    if native is None:
        return None
    if data.image_size:
        return (data.image_size[0], data.image_size[1], native[2])
    return native


def _out_size(size: int, window: int, stride: int, padding: str) -> int:
    if padding == "same":
        return math.ceil(size / stride)
    return (size - window) // stride + 1


def check_layer_shapes(model: ModelConfig, input_shape: tuple[int, ...]) -> None:
    """Walk the layer list over `input_shape` and raise ValueError at the first impossible layer.

    Catches a kernel or pool larger than the feature map it meets, and a Dense/Conv layer
    after the map was flattened, before Keras builds anything.
    """
    if model.backbone is not None:
        if min(input_shape[:2]) < 32:
            raise ValueError(
                f"model.backbone {model.backbone.name} needs images of at least 32x32; the data "
                f"gives {input_shape[0]}x{input_shape[1]} (set data.image_size)"
            )
        for index, layer in enumerate(model.layers):
            if not isinstance(layer, (DenseLayer, DropoutLayer, BatchNormLayer)):
                # ValueError, not TypeError: pydantic reports it with the config location.
                raise ValueError(  # noqa: TRY004
                    f"model.layers.{index} ({layer.type}): after a backbone (pooled to a vector) "
                    "only dense, dropout and batch_norm layers fit"
                )
        return
    height, width, channels = input_shape
    flat = False
    parameters: list[tuple[int, str]] = []  # (count, where) per layer with weights
    for index, layer in enumerate(model.layers):
        where = f"model.layers.{index}"
        if isinstance(layer, (Conv2DLayer, PoolLayer)):
            if flat:
                raise ValueError(f"{where} ({layer.type}) comes after the feature map was flattened")
            window = _pair(layer.kernel if isinstance(layer, Conv2DLayer) else layer.pool)
            stride = _pair(layer.stride if layer.stride is not None else window)
            field = "kernel" if isinstance(layer, Conv2DLayer) else "pool"
            if layer.padding == "valid" and (window[0] > height or window[1] > width):
                raise ValueError(
                    f"{where}.{field}={list(window)} is larger than the {height}x{width} feature "
                    f"map it receives; use a window of at most {height}x{width} or padding 'same'"
                )
            height = _out_size(height, window[0], stride[0], layer.padding)
            width = _out_size(width, window[1], stride[1], layer.padding)
            if isinstance(layer, Conv2DLayer):
                parameters.append((window[0] * window[1] * channels * layer.filters + layer.filters,
                                   f"{where} (conv2d, {layer.filters} filters)"))
                channels = layer.filters
        elif isinstance(layer, FlattenLayer):
            flat = True
            channels = height * width * channels if layer.type == "flatten" else channels
        elif isinstance(layer, DenseLayer):
            if not flat:
                raise ValueError(
                    f"{where} (dense) needs a flatten or global_avg_pool2d layer before it"
                )
            parameters.append((channels * layer.units + layer.units,
                               f"{where} (dense, {layer.units} units after {channels:,} features)"))
            channels = layer.units
    if not flat:
        raise ValueError(
            "model.layers must include a flatten or global_avg_pool2d layer before the output"
        )
    total = sum(count for count, _ in parameters)
    if total > MAX_PARAMETERS:
        count, where = max(parameters)
        raise ValueError(
            f"model.layers: the model would have {total:,} parameters, more than the "
            f"{MAX_PARAMETERS:,} cnnviz trains; {where} alone has {count:,} (use fewer "
            "filters or units, or pool before flattening)"
        )


# -------------------------------------------------------------------------------------- loading
def _format_location(location: tuple) -> str:
    # Drop pydantic's discriminator tags ("conv2d") so the path reads like the YAML keys.
    parts = [str(part) for part in location]
    return ".".join(parts)


def _format_errors(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors(include_url=False):
        location = [
            part
            for part in item["loc"]
            if part not in ("conv2d", "max_pool2d", "avg_pool2d", "dropout", "batch_norm",
                            "flatten", "global_avg_pool2d", "dense")
            and not (isinstance(part, str) and part.startswith("function-"))
        ]
        message = item["msg"].removeprefix("Value error, ")
        value = item.get("input")
        where = _format_location(tuple(location))
        shown = "" if isinstance(value, (dict, list)) or value is None else f" (received {value!r})"
        if item["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key {where!r}; check the spelling (see `cnnviz config show`)")
        elif item["type"] == "union_tag_invalid":
            lines.append(f"{source}: {where}: {message}")
        elif where and not message.startswith(where):
            lines.append(f"{source}: {where}: {message}{shown}")
        else:
            lines.append(f"{source}: {message}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `train.epochs=3` into (["train", "epochs"], 3); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.epochs=3")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"--set {text!r}: the key {key!r} has an empty part")
    try:
        value = load_yaml_text(raw, f"--set {text!r}") if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of the raw config dict with each `a.b.c=value` override set."""
    result = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = result
        for depth, part in enumerate(path[:-1]):
            where = ".".join(path[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"--set {text!r}: {where} is not an index of a list of {len(node)}"
                    )
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                raise ConfigError(f"--set {text!r}: {where} is a value, not a section")
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"--set {text!r}: {last!r} is not an index of a list of {len(node)}")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {text!r}: {'.'.join(path[:-1])} is a value, not a section")
    return result


# A config is a few kilobytes; these bounds refuse a hostile or mistaken file (a "billion laughs"
# of nested aliases, a huge file) before it is expanded, where it would exhaust memory.
MAX_YAML_BYTES = 1_000_000
MAX_YAML_ALIASES = 100
MAX_YAML_VALUES = 1_000_000  # values after aliases are expanded


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Count the YAML graph's aliases and the values it expands to, without expanding it."""
    seen, edges, stack = {id(root)}, 0, [root]
    while stack:
        for child in _children(stack.pop()):
            edges += 1
            if id(child) not in seen:
                seen.add(id(child))
                stack.append(child)
    aliases = edges - (len(seen) - 1)  # every reference beyond a value's first is an alias
    if aliases > MAX_YAML_ALIASES:
        raise ConfigError(
            f"{source}: {aliases} YAML aliases (*name), more than {MAX_YAML_ALIASES}; a config "
            "needs few, and nested aliases can expand a small file into billions of values"
        )
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    pending: list[tuple[yaml.Node, bool]] = [(root, False)]
    while pending:
        node, children_done = pending.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > MAX_YAML_VALUES:
                raise ConfigError(
                    f"{source}: expands to more than {MAX_YAML_VALUES:,} values through its "
                    "aliases (*name); write the values out or use fewer aliases"
                )
        elif key in on_path:
            raise ConfigError(f"{source}: an alias refers to a value that contains it (a loop)")
        elif key not in sizes:
            on_path.add(key)
            pending.append((node, True))
            pending.extend((child, False) for child in _children(node))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def load_yaml_text(text: str, source: str) -> Any:
    """`yaml.safe_load` with bounds: aliases and expanded size are checked on the parsed graph
    before any Python value is built from it (YAMLError for invalid YAML, ConfigError otherwise)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply (hundreds of levels)") from None
    finally:
        loader.dispose()


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping, or raise ConfigError naming the file and the problem."""
    try:
        with open(path, "rb") as stream:
            payload = stream.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (IsADirectoryError, PermissionError) as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    if len(payload) > MAX_YAML_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_YAML_BYTES:,} bytes (1 MB); a config is a few kilobytes "
            "(put image data in an .npz file or a folder, see data.source)"
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"cannot read config file {path}: not UTF-8 text ({error.reason} at "
                          f"byte {error.start})") from None
    try:
        raw = load_yaml_text(text, str(path))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, ...)")
    return raw


def validate(raw: dict, source: str = "config") -> Config:
    """Validate a raw dict into a `Config`, or raise ConfigError with one line per problem."""
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None
    except ValueError as error:  # raised outside pydantic's wrapping (rare)
        raise ConfigError(f"{source}: {error}") from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load, override and validate a YAML config file; the name defaults to the file's stem."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path), list(overrides))
    config = validate(raw, source=str(path))
    if config.name is None:
        config = config.model_copy(update={"name": path.stem})
    return config


def dump_config(config: Config) -> str:
    """The full config, defaults filled in, as YAML (what `config show` prints and runs save)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
