"""The `train:` section: epochs, batch size, optimizer and schedule, callbacks, devices."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from cnnviz.config.base import PositiveInt, StrictModel


# ---------------------------------------------------------------------------------------- train
class CosineSchedule(StrictModel):
    """keras.optimizers.schedules.CosineDecay over the whole training, after a linear warm-up."""

    type: Literal["cosine"]
    warmup_epochs: float = Field(
        0.0, ge=0.0,
        description="Epochs of linear warm-up from 0 to train.optimizer.learning_rate.")
    min_learning_rate: float = Field(0.0, ge=0.0, description="The rate the cosine ends at.")


class ExponentialSchedule(StrictModel):
    """keras.optimizers.schedules.ExponentialDecay: lr * decay_rate ** (epoch / decay_epochs)."""

    type: Literal["exponential"]
    decay_rate: float = Field(0.9, gt=0.0, lt=1.0)
    decay_epochs: float = Field(1.0, gt=0.0)
    staircase: bool = Field(False, description="Decay in whole steps of decay_epochs.")


class StepSchedule(StrictModel):
    """keras.optimizers.schedules.PiecewiseConstantDecay: lr * factor every `every_epochs`."""

    type: Literal["step"]
    factor: float = Field(0.1, gt=0.0, lt=1.0)
    every_epochs: PositiveInt = 10


class PlateauSchedule(StrictModel):
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


class OptimizerConfig(StrictModel):
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


class EarlyStoppingConfig(StrictModel):
    monitor: str = "val_loss"
    patience: PositiveInt = 3
    restore_best_weights: bool = True


# What `train.explain` measures per epoch (gate names `explain.<method>.<metric>`).
EXPLAIN_METRICS = ("deletion_auc", "insertion_auc", "cue_share", "model_randomization")
# Those measured when `metrics` is not given (cue_share only where the images carry a cue;
# model_randomization, a cascade of re-initializations per epoch, only when listed).
DEFAULT_EXPLAIN_METRICS = ("deletion_auc", "insertion_auc", "cue_share")


class ExplainConfig(StrictModel):
    """Watch it learn: explain the same images after every `every` epochs (README)."""

    every: PositiveInt = Field(1, description="Explain after every this many epochs.")
    images: str | None = Field(
        None,
        description="Indices into the split (0:8, 0,3,7); default: 8 stratified images.")
    split: Literal["test", "train"] = Field(
        "test", description="Where the images come from (train: the shapes set's cue is there).")
    methods: list[str] = Field(
        default_factory=lambda: ["gradcam", "saliency"], min_length=1,
        description="Attribution methods (registry names, as `cnnviz faithfulness`).")
    layer: str | None = Field(None, description="The CAM methods' layer (default: the last conv).")
    metrics: list[Literal["deletion_auc", "insertion_auc", "cue_share",
                          "model_randomization"]] | None = Field(
        None,
        description="Per-epoch metrics; default: deletion_auc, insertion_auc, and cue_share "
        "when the data has a spurious cue. model_randomization (the rank correlation of "
        "`cnnviz sanity`, expensive) only when listed.")
    steps: PositiveInt = Field(10, description="Points on each deletion / insertion curve.")


class TrainConfig(StrictModel):
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
    class_weight: (
        Literal["balanced"] | dict[int | str, Annotated[float, Field(gt=0.0)]] | None
    ) = Field(
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
    jit_compile: bool | None = Field(
        None, description="XLA-compile the train step; null: on JAX only (its step runs "
        "un-jitted otherwise, ~10x slower), off on TensorFlow and PyTorch.")
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
    explain: ExplainConfig | None = Field(
        None,
        description="Explain fixed images after each epoch: RUN/figures/epochs/, "
        "RUN/explain_history.csv, explain.<method>.<metric> in metrics.json. Off by default.")

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
