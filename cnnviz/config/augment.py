"""The `data.augment:` list: Keras preprocessing layers applied to training batches."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import (
    Field,
)

from cnnviz.config.base import StrictModel

# ------------------------------------------------------------------------------- augmentation
# Each entry becomes the Keras preprocessing layer of the same name (keras.layers.RandomFlip,
# ...), applied to training batches only, inside the tf.data pipeline on the CPU.
Factor = Annotated[float, Field(ge=0.0, le=1.0)]
FactorOrRange = Factor | Annotated[list[Annotated[float, Field(ge=-1.0, le=1.0)]],
                                   Field(min_length=2, max_length=2)]
FillMode = Literal["reflect", "wrap", "constant", "nearest"]


class RandomFlip(StrictModel):
    type: Literal["random_flip"]
    mode: Literal["horizontal", "vertical", "horizontal_and_vertical"] = "horizontal"


class RandomRotation(StrictModel):
    type: Literal["random_rotation"]
    factor: FactorOrRange = Field(
        0.1, description="Fraction of a full turn: 0.1 rotates by up to +-36 degrees.")
    fill_mode: FillMode = "reflect"


class RandomZoom(StrictModel):
    type: Literal["random_zoom"]
    height_factor: FactorOrRange = Field(
        0.1, description="Zoom by up to this share of the height (negative: in, positive: out).")
    width_factor: FactorOrRange | None = Field(
        None, description="Default: the same zoom as the height (aspect ratio kept).")
    fill_mode: FillMode = "reflect"


class RandomTranslation(StrictModel):
    type: Literal["random_translation"]
    height_factor: FactorOrRange = Field(
        0.1, description="Shift by up to this share of the height.")
    width_factor: FactorOrRange = Field(0.1, description="Shift by up to this share of the width.")
    fill_mode: FillMode = "reflect"


class RandomContrast(StrictModel):
    type: Literal["random_contrast"]
    factor: FactorOrRange = Field(
        0.2, description="Scale the contrast around the mean by a factor in [1 - f, 1 + f].")


class RandomBrightness(StrictModel):
    type: Literal["random_brightness"]
    factor: FactorOrRange = Field(
        0.2, description="Add up to this share of the value range (0..255) to every pixel.")


AugmentConfig = Annotated[
    RandomFlip | RandomRotation | RandomZoom | RandomTranslation | RandomContrast
    | RandomBrightness,
    Field(discriminator="type"),
]
AUGMENT_TYPES = tuple(get_args(member.model_fields["type"].annotation)[0]
                      for member in get_args(get_args(AugmentConfig)[0]))
