"""The whole config (`Config`) and the run slug derived from its name."""

from __future__ import annotations

import hashlib
import re
import unicodedata

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from cnnviz.config.base import StrictModel
from cnnviz.config.data import DataConfig
from cnnviz.config.model import ModelConfig
from cnnviz.config.shapes import check_layer_shapes, native_input_shape
from cnnviz.config.train import (
    DEFAULT_EXPLAIN_METRICS,
    CosineSchedule,
    PlateauSchedule,
    TrainConfig,
)
from cnnviz.errors import CnnvizError


# --------------------------------------------------------------------------------------- config
class Config(StrictModel):
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
        from cnnviz.config.expect import parse_expectation

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
        explain = self.train.explain
        if explain is not None and "cue_share" in (explain.metrics or ()) and not has_cue(self):
            raise ValueError(
                f"train.explain.metrics cue_share needs a spurious cue in the {explain.split} "
                "split: data.source shapes with data.shapes.spurious set (and, for split test, "
                "data.shapes.test_cue shuffled)")
        input_shape = native_input_shape(self.data)
        if input_shape is not None:
            check_layer_shapes(self.model, input_shape)
        return self


def has_cue(config: Config) -> bool:
    """Whether the images `train.explain` looks at carry the shapes set's spurious cue."""
    data, explain = config.data, config.train.explain
    if data.source != "shapes" or not data.shapes.spurious:
        return False
    return explain is None or explain.split == "train" or data.shapes.test_cue == "shuffled"


def explain_metrics(config: Config) -> tuple[str, ...]:
    """The metrics `train.explain` records per method (its `metrics`, or the default)."""
    explain = config.train.explain
    if explain is None:
        return ()
    if explain.metrics is not None:
        return tuple(dict.fromkeys(explain.metrics))
    return tuple(name for name in DEFAULT_EXPLAIN_METRICS
                 if name != "cue_share" or has_cue(config))


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
