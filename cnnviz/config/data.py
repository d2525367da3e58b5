"""The `data:` section: where images come from, their size and preprocessing, splits and limits."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    model_validator,
)

from cnnviz.config.augment import AugmentConfig
from cnnviz.config.base import PositiveInt, StrictModel


# ----------------------------------------------------------------------------------------- data
class ShapesOptions(StrictModel):
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


class DataConfig(StrictModel):
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
