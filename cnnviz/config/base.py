"""Config building blocks shared by every section: strict models, bounded numbers, activation and
padding names."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
)

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


class StrictModel(BaseModel):
    # strict: `filters: true` is not 1 and `epochs: 2.0` is not 2 (pydantic's lax mode coerces
    # both).
    model_config = ConfigDict(extra="forbid", validate_default=True, strict=True)


def as_pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def _window(value: Any) -> int | list[int]:
    """A kernel, pool or stride: one positive int, or [height, width]; one clear message
    otherwise."""

    def side(item: Any) -> bool:
        return type(item) is int and 0 < item <= MAX_WINDOW

    if side(value) or (isinstance(value, list) and len(value) == 2 and all(map(side, value))):
        return value
    raise ValueError(
        f"must be a whole number from 1 to {MAX_WINDOW}, or a list [height, width] of two such "
        "numbers"
    )


IntOrPair = Annotated[int | list[int], PlainValidator(_window)]
