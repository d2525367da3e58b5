"""The `model:` section: a stack of layers or a keras.applications backbone, and the output head."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    Field,
    model_validator,
)

from cnnviz.config.base import MAX_FILTERS, MAX_UNITS, Activation, IntOrPair, Padding, StrictModel


# ---------------------------------------------------------------------------------------- model
class Conv2DLayer(StrictModel):
    type: Literal["conv2d"]
    filters: Annotated[int, Field(gt=0, le=MAX_FILTERS)]
    kernel: IntOrPair = 3
    stride: IntOrPair = 1
    padding: Padding = "valid"
    activation: Activation = "relu"
    name: str | None = None


class PoolLayer(StrictModel):
    type: Literal["max_pool2d", "avg_pool2d"]
    pool: IntOrPair = 2
    stride: IntOrPair | None = Field(None, description="Default: the pool size.")
    padding: Padding = "valid"
    name: str | None = None


class DropoutLayer(StrictModel):
    type: Literal["dropout"]
    rate: float = Field(0.5, ge=0.0, lt=1.0)
    name: str | None = None


class BatchNormLayer(StrictModel):
    type: Literal["batch_norm"]
    name: str | None = None


class FlattenLayer(StrictModel):
    type: Literal["flatten", "global_avg_pool2d"]
    name: str | None = None


class DenseLayer(StrictModel):
    type: Literal["dense"]
    units: Annotated[int, Field(gt=0, le=MAX_UNITS)]
    activation: Activation = "relu"
    name: str | None = None


LayerConfig = Annotated[
    Conv2DLayer | PoolLayer | DropoutLayer | BatchNormLayer | FlattenLayer | DenseLayer,
    Field(discriminator="type"),
]


class OutputConfig(StrictModel):
    """The classification head, sized from the data's classes."""

    activation: Literal["softmax", "sigmoid"] = Field(
        "softmax",
        description="softmax over all classes; sigmoid: one unit, for two-class data only.",
    )
    name: str = Field("preds", description="Name of the output layer.")


class BackboneConfig(StrictModel):
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


class ModelConfig(StrictModel):
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
