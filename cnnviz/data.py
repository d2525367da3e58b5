"""Data sets -> float32 arrays split into train/validation/test, and tf.data pipelines for training.

Every source returns raw images (N, H, W, C) and int labels; one function then resizes, splits and
preprocesses them, so every source behaves the same. Splits depend only on the config and its
seed, so a run's test images can be loaded again later by index.
"""

from __future__ import annotations

import gzip
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnviz.config import Config, DataConfig
from cnnviz.errors import CnnvizError

_KERAS_DATASETS = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
_CIFAR10_ORIGIN = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_FASHION_FILES = (
    "train-labels-idx1-ubyte.gz",
    "train-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


@dataclass
class Preprocessing:
    """How raw pixel values become model inputs; kept so new image files get the same treatment."""

    kind: str
    divisor: float
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    def apply(self, raw: np.ndarray) -> np.ndarray:
        images = np.asarray(raw, dtype=np.float32) / np.float32(self.divisor)
        if self.kind in ("standardize", "mean_subtract"):
            images = images - self.mean
        if self.kind == "standardize":
            images = images / self.std
        return images.astype(np.float32)

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
    """A data set split three ways. Images are float32 (N, H, W, C); labels int32 (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    preprocessing: Preprocessing
    # Per-split extras a source may carry (the shapes set's spurious-cue masks).
    extras: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(size) for size in self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ------------------------------------------------------------------------------------ sources
def _keras_cache_dir() -> str:
    # Keras reads KERAS_HOME once at import; read it at call time so it can be moved per run/test.
    return os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")


def _fetch(fname: str, origin: str, cache_subdir: str = "datasets", extract: bool = False) -> str:
    """A keras.datasets file: from the Keras cache when it is there, else downloaded by Keras.

    No `file_hash`: keras.datasets' own loaders delete a cached file whose hash differs, which
    makes them unusable with a local or mirrored copy.
    """
    import keras

    cached = os.path.join(_keras_cache_dir(), cache_subdir, fname)
    if not extract and os.path.isfile(cached):  # also from a read-only cache, which Keras skips
        return cached
    # Keras reads and writes /tmp/.keras instead of a cache it cannot write: an archive to
    # extract must go there.
    folder = _keras_cache_dir() if not extract or os.access(_keras_cache_dir(), os.W_OK) else (
        os.path.join("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir(), ".keras"))
    try:
        return keras.utils.get_file(
            fname, origin=origin, cache_subdir=cache_subdir, extract=extract,
            cache_dir=_keras_cache_dir(),
        )
    except Exception as error:  # noqa: BLE001 - urllib wraps every network failure differently
        raise CnnvizError(
            f"could not download {fname} from {origin} ({error}); with no network, put the file in "
            f"{os.path.join(folder, cache_subdir)} or set data.path to a local copy"
        ) from None


def _load_mnist(data: DataConfig):
    path = data.path or _fetch("mnist.npz", _KERAS_DATASETS + "mnist.npz")
    with np.load(_existing(path, "data.path"), allow_pickle=False) as arrays:
        return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"]), None


def _read_idx(path: str, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), np.uint8, offset=offset)


def _load_fashion_mnist(data: DataConfig):
    if data.path:
        folder = _existing(data.path, "data.path")
        paths = [str(Path(folder) / name) for name in _FASHION_FILES]
    else:
        subdir = os.path.join("datasets", "fashion-mnist")
        paths = [_fetch(name, _KERAS_DATASETS + name, cache_subdir=subdir) for name in _FASHION_FILES]
    y_train = _read_idx(paths[0], 8)
    x_train = _read_idx(paths[1], 16).reshape(len(y_train), 28, 28)
    y_test = _read_idx(paths[2], 8)
    x_test = _read_idx(paths[3], 16).reshape(len(y_test), 28, 28)
    return (x_train, y_train), (x_test, y_test), list(FASHION_MNIST_CLASSES)


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(batch[b"labels"], dtype=np.int64)


def _load_cifar10(data: DataConfig):
    if data.path:
        folder = Path(_existing(data.path, "data.path"))
    else:
        extracted = _fetch("cifar-10-python.tar.gz", _CIFAR10_ORIGIN, extract=True)
        folder = Path(extracted) / "cifar-10-batches-py"
    train = [_cifar_batch(folder / f"data_batch_{index}") for index in range(1, 6)]
    x_test, y_test = _cifar_batch(folder / "test_batch")
    x_train = np.concatenate([images for images, _ in train])
    y_train = np.concatenate([labels for _, labels in train])
    return (x_train, y_train), (x_test, y_test), list(CIFAR10_CLASSES)


def _load_digits(data: DataConfig):
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target, [str(digit) for digit in range(10)]


def _load_directory(data: DataConfig):
    import keras

    folder = _existing(data.path, "data.path")
    size = tuple(data.image_size) if data.image_size else (256, 256)
    try:
        dataset = keras.utils.image_dataset_from_directory(
            folder, labels="inferred", label_mode="int", color_mode=data.color_mode or "rgb",
            image_size=size, shuffle=False, batch_size=None, verbose=False,
        )
    except ValueError as error:
        raise CnnvizError(f"data.path {folder}: {error}") from None
    class_names = list(dataset.class_names)
    images, labels = [], []
    for image, label in dataset.as_numpy_iterator():
        images.append(image)
        labels.append(label)
    if not images:
        raise CnnvizError(f"data.path {folder}: no images found in its class sub-folders")
    return np.stack(images), np.asarray(labels), class_names


def _load_npz(data: DataConfig):
    path = _existing(data.path, "data.path")
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise CnnvizError(f"data.path {path}: not a readable .npz file ({error})") from None
    with arrays:
        missing = [key for key in ("x_train", "y_train", "x_test", "y_test") if key not in arrays]
        if missing:
            raise CnnvizError(
                f"data.path {path}: missing arrays {', '.join(missing)}; an npz data file needs "
                "x_train, y_train, x_test, y_test (and may have class_names)"
            )
        names = [str(name) for name in arrays["class_names"]] if "class_names" in arrays else None
        return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"]), names


def _load_inline(data: DataConfig):
    images = np.asarray(data.images, dtype=np.float32)
    return images, np.asarray(data.labels), None


def _existing(path: str, field_name: str) -> str:
    if not Path(path).exists():
        raise CnnvizError(f"{field_name}: {path} does not exist")
    return str(path)


# ------------------------------------------------------------------------------ preparation
def _as_nhwc(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise CnnvizError(f"images must be (N, H, W) or (N, H, W, C); received shape {images.shape}")
    return images


def _resize(images: np.ndarray, size: list[int] | None) -> np.ndarray:
    if not size or tuple(images.shape[1:3]) == tuple(size):
        return images.astype(np.float32)
    import tensorflow as tf

    resized = tf.image.resize(images.astype(np.float32), size, method="bilinear", antialias=True)
    return resized.numpy()


def _default_divisor(source: str, raw: np.ndarray) -> float:
    if source == "digits":
        return 16.0
    if source in ("shapes", "inline"):
        return 1.0
    if np.issubdtype(raw.dtype, np.integer) or float(np.max(raw)) > 1.0:
        return 255.0
    return 1.0


def _split_indices(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: (kept, held_out) indices, held-out ~share of each class."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = round(share * len(members))
        held.append(members[:count])
        kept.append(members[count:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def load_dataset(config: Config) -> Dataset:
    """Load, resize, split and preprocess the config's data set.

    Returns:
        A `Dataset` whose images are float32 (N, H, W, C) and labels int32 (N,).
    """
    data = config.data
    extras: dict = {}
    if data.source == "shapes":
        raw_train, raw_test, class_names, extras = _load_shapes(config)
    else:
        loader = {
            "mnist": _load_mnist, "fashion_mnist": _load_fashion_mnist, "cifar10": _load_cifar10,
            "digits": _load_digits, "directory": _load_directory, "npz": _load_npz,
            "inline": _load_inline,
        }[data.source]
        loaded = loader(data)
        if len(loaded) == 3 and isinstance(loaded[0], tuple):
            raw_train, raw_test, class_names = loaded
        else:
            images, labels, class_names = loaded
            if data.source == "inline":
                # Two hand-written examples are both the training and the test set.
                raw_train = raw_test = (images, labels)
            else:
                train_idx, test_idx = _split_indices(np.asarray(labels), data.test_split, config.seed)
                raw_train = (images[train_idx], labels[train_idx])
                raw_test = (images[test_idx], labels[test_idx])

    x_train, y_train = _as_nhwc(raw_train[0]), np.asarray(raw_train[1]).reshape(-1).astype(np.int32)
    x_test, y_test = _as_nhwc(raw_test[0]), np.asarray(raw_test[1]).reshape(-1).astype(np.int32)
    divisor = data.scale_divisor or _default_divisor(data.source, x_train)
    x_train, x_test = _resize(x_train, data.image_size), _resize(x_test, data.image_size)

    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if data.class_names:
        if len(data.class_names) < num_classes:
            raise CnnvizError(
                f"data.class_names has {len(data.class_names)} names but the labels go up to "
                f"{num_classes - 1}"
            )
        class_names = list(data.class_names)
    elif not class_names:
        class_names = [str(index) for index in range(num_classes)]

    if data.test_limit is not None and data.test_limit < len(y_test):
        # Exactly test_limit images, each class in its share: rank every image within its
        # class (seeded order), keep the lowest ranks.
        order = np.random.default_rng(config.seed + 3).permutation(len(y_test))
        rank = np.empty(len(y_test))
        for label in np.unique(y_test):
            members = order[y_test[order] == label]
            rank[members] = (np.arange(len(members)) + 0.5) / len(members)
        kept = np.sort(np.argsort(rank, kind="stable")[: data.test_limit])
        x_test, y_test = x_test[kept], y_test[kept]
        for key in [key for key in extras if key.endswith("_test")]:
            extras[key] = extras[key][kept]
    if data.limit is not None:
        x_train, y_train = x_train[: data.limit], y_train[: data.limit]
        for key in [key for key in extras if key.endswith("_train")]:
            extras[key] = extras[key][: data.limit]
    if data.validation_split > 0 and data.source != "inline":
        fit_idx, val_idx = _split_indices(y_train, data.validation_split, config.seed + 1)
    else:
        fit_idx, val_idx = np.arange(len(y_train)), np.arange(len(y_train))
    for key in [key for key in extras if key.endswith("_train")]:
        extras[key.replace("_train", "_val")] = extras[key][val_idx]
        extras[key] = extras[key][fit_idx]

    preprocessing = Preprocessing(kind=data.preprocessing, divisor=divisor)
    if data.preprocessing == "none":
        preprocessing.divisor = 1.0
    fit_images = x_train[fit_idx] / np.float32(preprocessing.divisor)
    if data.preprocessing in ("standardize", "mean_subtract"):
        preprocessing.mean = fit_images.mean(axis=(0, 1, 2)).astype(np.float32)
        preprocessing.std = (fit_images.std(axis=(0, 1, 2)) + 1e-7).astype(np.float32)

    return Dataset(
        x_train=preprocessing.apply(x_train[fit_idx]), y_train=y_train[fit_idx],
        x_val=preprocessing.apply(x_train[val_idx]), y_val=y_train[val_idx],
        x_test=preprocessing.apply(x_test), y_test=y_test,
        class_names=class_names, preprocessing=preprocessing, extras=extras,
    )


def _load_shapes(config: Config):
    """The generated shapes set: train (with the spurious cue, if any) and test (without)."""
    from cnnviz.shapes import make_shapes

    options = config.data.shapes
    size = tuple(config.data.image_size or (32, 32))
    test_count = max(1, round(options.count * config.data.test_split))
    common = {"image_size": size[0], "classes": tuple(options.classes),
              "spurious": options.spurious}
    train = make_shapes(options.count - test_count, with_cue=True, seed=config.seed, **common)
    shuffled = options.test_cue == "shuffled"
    # The test split never carries the training cue: absent, or at a random class's place.
    test = make_shapes(test_count, with_cue=shuffled, shuffle_cue=shuffled,
                       seed=config.seed + 10_000, **common)
    extras = {"cue_masks_train": train.cue_masks, "cue_masks_test": test.cue_masks}
    return (train.images, train.labels), (test.images, test.labels), list(train.class_names), extras


def training_pipeline(images: np.ndarray, labels: np.ndarray, batch_size: int, *,
                      shuffle: bool, seed: int):
    """A tf.data pipeline over in-memory arrays: shuffled, batched and prefetched."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
