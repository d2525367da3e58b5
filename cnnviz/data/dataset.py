"""A config's data set: three splits, class names, and how the model preprocesses pixels.

Splits depend only on the config and its seed (stratified by class, split by file for image
folders), so a run's test images are the same in every later process; a folder-trained run
reads them back from the file lists it recorded instead of listing the folder again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnviz.config.root import Config
from cnnviz.data.folders import (
    check_listing,
    has_split_files,
    list_class_folder,
    read_split_files,
    write_skipped_files,
    write_split_files,
)
from cnnviz.data.pipeline import Pixels, Split
from cnnviz.data.sources import UNITS, load_arrays
from cnnviz.errors import CnnvizError

DEFAULT_FOLDER_SIZE = (256, 256)  # keras.utils.image_dataset_from_directory's default


@dataclass
class Preprocessing:
    """What the model's first layers do to its input (pixels in the data's units).

    `scale` divides by `divisor`; `standardize` then subtracts the training split's per-channel
    `mean` and divides by its `std`; `mean_subtract` only subtracts; `none` adds no layer. The
    data's full scale in the model's units is `divisor` for every kind (for `none`, what the
    model is fed goes up to it: augmentation's value range, image files' mapping).
    """

    kind: str
    divisor: float
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    @property
    def needs_statistics(self) -> bool:
        return self.kind in ("standardize", "mean_subtract")

    def layers(self, channels: int) -> list:
        """The Keras layers that do it (statistics not yet measured count as mean 0, std 1)."""
        import keras

        if self.kind == "none":
            return []
        layers = [keras.layers.Rescaling(1.0 / self.divisor, name="input_rescaling")]
        if self.needs_statistics:
            mean = np.zeros(channels) if self.mean is None else np.asarray(self.mean)
            std = np.ones(channels) if self.std is None or self.kind == "mean_subtract" \
                else np.asarray(self.std)
            layers.append(keras.layers.Normalization(
                axis=-1, mean=mean.astype(np.float32).tolist(),
                variance=np.square(std).astype(np.float32).tolist(), name="input_normalization"))
        return layers

    @classmethod
    def from_dict(cls, saved: dict) -> Preprocessing:
        """The inverse of `to_dict` (how metrics.json stores it)."""
        return cls(
            kind=saved["kind"], divisor=saved["divisor"],
            mean=None if saved["mean"] is None else np.asarray(saved["mean"], np.float32),
            std=None if saved["std"] is None else np.asarray(saved["std"], np.float32),
        )

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "divisor": float(self.divisor),
            "mean": None if self.mean is None else np.asarray(self.mean).ravel().tolist(),
            "std": None if self.std is None else np.asarray(self.std).ravel().tolist(),
        }


@dataclass
class Dataset:
    """A data set split three ways.

    Images stay where they are (an array held once, or files) until a split's `images(...)`
    or `pipeline(...)` asks for them, in the model's input units: 8-bit pixel units for image
    sources. `x_train` etc. read a whole split at once: for small data and tests only.
    """

    train: Split
    val: Split
    test: Split
    class_names: list[str]
    preprocessing: Preprocessing
    # Per-split extras a source may carry (the shapes set's spurious-cue masks).
    extras: dict = field(default_factory=dict)
    folder: Path | None = None  # an image folder's root (directory source)
    skipped: list = field(default_factory=list)  # unreadable files left out

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "val": self.val, "test": self.test}

    @property
    def value_range(self) -> tuple[float, float]:
        """The range the preprocessing maps onto [0, 1]: (0, 255) for 8-bit pixels."""
        return (0.0, float(self.preprocessing.divisor))

    x_train = property(lambda self: self.train.images())
    x_val = property(lambda self: self.val.images())
    x_test = property(lambda self: self.test.images())
    y_train = property(lambda self: self.train.labels)
    y_val = property(lambda self: self.val.labels)
    y_test = property(lambda self: self.test.labels)

    def record(self, run_dir: Path) -> None:
        """Write the split file lists into the run directory (image folders only)."""
        if self.folder is None:
            return
        write_split_files(run_dir, self.folder,
                          {name: (split.files, split.labels)
                           for name, split in self.splits.items()},
                          self.class_names)
        if self.skipped:
            write_skipped_files(run_dir, self.skipped)


# ----------------------------------------------------------------------------- splitting
def split_indices(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: (kept, held_out) indices, held-out ~share of each class."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = round(share * len(members))
        held.append(members[:count])
        kept.append(members[count:])
    if not kept:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def stratified_subset(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted indices of exactly `count` items, each class in its share (seeded)."""
    if count >= len(labels):
        return np.arange(len(labels))
    order = np.random.default_rng(seed).permutation(len(labels))
    rank = np.empty(len(labels))
    for label in np.unique(labels):
        members = order[labels[order] == label]
        rank[members] = (np.arange(len(members)) + 0.5) / len(members)
    return np.sort(np.argsort(rank, kind="stable")[:count])


def _as_nhwc(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]  # a view: no copy
    if images.ndim != 4:
        raise CnnvizError(
            f"images must be (N, H, W) or (N, H, W, C); received shape {images.shape}")
    return images


def _class_names(config: Config, found: list[str] | None, num_classes: int) -> list[str]:
    data = config.data
    if data.class_names:
        if len(data.class_names) < num_classes:
            raise CnnvizError(
                f"data.class_names has {len(data.class_names)} names but the labels go up to "
                f"{num_classes - 1}"
            )
        return list(data.class_names)
    return list(found) if found else [str(index) for index in range(num_classes)]


def _fit_and_validation(config: Config, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions in the training part: (limited, stratified) fit and validation indices."""
    data = config.data
    positions = np.arange(len(labels))
    if data.limit is not None:
        positions = stratified_subset(labels, data.limit, config.seed + 2)
    if data.validation_split > 0 and data.source != "inline":
        fit, val = split_indices(labels[positions], data.validation_split, config.seed + 1)
        return positions[fit], positions[val]
    return positions, positions  # no held-out data: validate on the training images


def _test_positions(config: Config, labels: np.ndarray) -> np.ndarray:
    """Positions in the test split: all, or a stratified seeded `data.test_limit` of them."""
    if config.data.test_limit is None:
        return np.arange(len(labels))
    return stratified_subset(labels, config.data.test_limit, config.seed + 3)


# ------------------------------------------------------------------------------- loading
def load_dataset(config: Config, *, run_dir: Path | None = None, log=print) -> Dataset:
    """The config's data set, split, with nothing decoded or copied yet.

    Args:
        config: a validated config.
        run_dir: a run directory whose recorded file lists (image folders) replace listing and
            splitting the folder again.
        log: where notes (skipped files) go.

    Returns:
        A `Dataset`; its preprocessing statistics (standardize) are measured by
        `measure_statistics`, when training needs them.
    """
    if config.data.source == "directory":
        return _folder_dataset(config, run_dir, log)
    return _array_dataset(config)


def config_preprocessing(config: Config) -> Preprocessing:
    """The preprocessing the config asks for, without loading data (npz: assumes 8-bit)."""
    return _preprocessing(config, *UNITS.get(config.data.source, (255.0, 1.0)))


def _preprocessing(config: Config, native_max: float, unit_scale: float) -> Preprocessing:
    data = config.data
    # data.scale_divisor is in the source's own units; the model sees 8-bit units.
    divisor = float(data.scale_divisor or native_max) * unit_scale
    return Preprocessing(data.preprocessing, divisor)


def _array_dataset(config: Config) -> Dataset:
    data = config.data
    source = load_arrays(config)
    train_images = _as_nhwc(source.train[0])
    train_labels = np.asarray(source.train[1]).reshape(-1).astype(np.int32)
    train_pixels = Pixels(train_images)
    if source.test is None:
        rest, test_rows = split_indices(train_labels, data.test_split, config.seed)
        test_pixels, test_labels = train_pixels, train_labels[test_rows]
    else:
        rest = np.arange(len(train_labels))
        test_pixels = Pixels(_as_nhwc(source.test[0]))
        test_labels = np.asarray(source.test[1]).reshape(-1).astype(np.int32)
        test_rows = np.arange(len(test_labels))
    fit, val = _fit_and_validation(config, train_labels[rest])
    num_classes = int(max(train_labels.max(), test_labels.max(initial=0))) + 1
    tested = _test_positions(config, test_labels)
    test_rows, test_labels = test_rows[tested], test_labels[tested]
    size = tuple(data.image_size or train_images.shape[1:3])
    channels = train_images.shape[-1]

    def split(pixels, rows, labels):
        return Split(labels, image_size=size, channels=channels, pixels=pixels, rows=rows)

    extras = dict(source.extras)
    for key in [key for key in extras if key.endswith("_test")]:
        extras[key] = extras[key][tested]
    for key in [key for key in extras if key.endswith("_train")]:
        masks = extras[key][rest]
        extras[key.replace("_train", "_val")] = masks[val]
        extras[key] = masks[fit]
    return Dataset(
        train=split(train_pixels, rest[fit], train_labels[rest[fit]]),
        val=split(train_pixels, rest[val], train_labels[rest[val]]),
        test=split(test_pixels, test_rows, test_labels),
        class_names=_class_names(config, source.class_names, num_classes),
        preprocessing=_preprocessing(config, source.native_max, source.unit_scale),
        extras=extras,
    )


def _folder_dataset(config: Config, run_dir: Path | None, log) -> Dataset:
    data = config.data
    root = Path(data.path)
    size = tuple(data.image_size or DEFAULT_FOLDER_SIZE)
    channels = 1 if data.color_mode == "grayscale" else 3
    skipped: list = []
    if has_split_files(run_dir):
        recorded, class_names = read_split_files(run_dir)
    else:
        listing = check_listing(list_class_folder(root), max_pixels=data.max_image_pixels,
                                skip_bad_files=data.skip_bad_files, log=log)
        skipped = listing.skipped
        rest, test = split_indices(listing.labels, data.test_split, config.seed)
        test = test[_test_positions(config, listing.labels[test])]
        fit, val = _fit_and_validation(config, listing.labels[rest])
        files = np.asarray(listing.files, dtype=object)
        recorded = {
            "train": (list(files[rest[fit]]), listing.labels[rest[fit]]),
            "val": (list(files[rest[val]]), listing.labels[rest[val]]),
            "test": (list(files[test]), listing.labels[test]),
        }
        class_names = listing.class_names
    splits = {name: Split(labels, image_size=size, channels=channels, files=files, root=root,
                          max_pixels=data.max_image_pixels)
              for name, (files, labels) in recorded.items()}
    return Dataset(**splits, class_names=_class_names(config, class_names, len(class_names)),
                   preprocessing=_preprocessing(config, 255.0, 1.0), folder=root, skipped=skipped)


def measure_statistics(dataset: Dataset, batch_size: int = 256) -> None:
    """Set the per-channel mean and std (standardize, mean_subtract) of the training split,
    in one streaming pass over its pipeline (float64 sums; nothing held but one batch)."""
    preprocessing = dataset.preprocessing
    if not preprocessing.needs_statistics or preprocessing.mean is not None:
        return
    channels = dataset.input_shape[-1]
    total, squares, count = np.zeros(channels), np.zeros(channels), 0
    for images, _ in dataset.train.pipeline(batch_size).as_numpy_iterator():
        scaled = images.astype(np.float64).reshape(-1, channels) / preprocessing.divisor
        total += scaled.sum(axis=0)
        squares += np.square(scaled).sum(axis=0)
        count += len(scaled)
    if count == 0:
        raise CnnvizError("the training split is empty: nothing to measure the mean and std on")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
    preprocessing.mean = mean.astype(np.float32)
    preprocessing.std = (std + 1e-7).astype(np.float32)


def augmentation_samples(config: Config, dataset: Dataset, count: int = 6, draws: int = 4):
    """A few training images and `draws` augmented versions of each, as training sees them.

    The images are the first of each class in turn (so every class shows), read alone; the
    augmentation is the config's, applied by the same Keras layers and seeds as in training.

    Returns:
        (originals (N, H, W, C), augmented (draws, N, H, W, C), row names).
    """
    from cnnviz.data.pipeline import augmentation_layers

    if not config.data.augment:
        raise CnnvizError(
            "data.augment is empty: there is nothing to show; add transformations, e.g. "
            "data.augment: [{type: random_flip}, {type: random_rotation, factor: 0.1}]")
    labels = dataset.train.labels
    queues = [list(np.flatnonzero(labels == label)) for label in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < min(count, len(labels)):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(int(queue.pop(0)))
    originals = dataset.train.images(chosen)
    layers = augmentation_layers(config.data.augment, seed=config.seed,
                                 value_range=dataset.value_range)
    augmented = []
    for _ in range(draws):
        images = originals
        for layer in layers:
            images = layer(images, training=True)
        augmented.append(np.asarray(images, np.float32))
    split = dataset.train
    names = ([split.files[i] for i in chosen] if split.files is not None
             else [dataset.class_names[labels[i]] for i in chosen])
    return originals, np.stack(augmented), names
