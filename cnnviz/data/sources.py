"""In-memory data sources: each returns its raw images once, in the smallest faithful dtype.

mnist, fashion_mnist and cifar10 stay uint8 as they ship. Sources whose native range is not
0..255 are converted to 8-bit pixel units here (digits 0..16 -> x * 255/16, shapes [0, 1] ->
x * 255), so every image source reaches the model in the same units (docs/decisions.md D1). npz and
inline data are not images of a known range: they keep their own units.

The keras.datasets files come from the Keras cache, else are downloaded by Keras with a connect
and read timeout; with no network the error says where to put the file by hand.
"""

from __future__ import annotations

import gzip
import os
import pickle
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnviz.config.data import DataConfig
from cnnviz.config.root import Config
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


# (maximum in the source's own units, factor to 8-bit units) where they are not (255, 1).
UNITS = {"digits": (16.0, 255.0 / 16.0), "shapes": (1.0, 255.0), "inline": (1.0, 1.0)}


@dataclass
class ArraySource:
    """What an in-memory source loaded.

    Attributes:
        train: (images (N, H, W) or (N, H, W, C), labels (N,)).
        test: the source's own test split, or None to split one off `train`.
        class_names: the source's names, or None.
        unit_scale: raw value * unit_scale = 8-bit units (1 when already there, or own units).
        native_max: the source's maximum in its own units (the default scale_divisor).
        extras: per-split arrays a source may carry (the shapes set's cue masks).
    """

    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray] | None
    class_names: list[str] | None
    unit_scale: float = 1.0
    native_max: float = 255.0
    extras: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------- downloads
def _keras_cache_dir() -> str:
    # Keras reads KERAS_HOME once at import; read it at call time so it can be moved per run/test.
    return os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")


def fetch(fname: str, origin: str, *, timeout: float = 30.0, cache_subdir: str = "datasets",
          extract: bool = False) -> str:
    """A keras.datasets file: from the Keras cache when it is there, else downloaded by Keras.

    No `file_hash`: keras.datasets' own loaders delete a cached file whose hash differs, which
    makes them unusable with a local or mirrored copy. `urlretrieve` has no timeout argument;
    the socket default timeout bounds both the connect and every read.
    """
    import keras

    cached = os.path.join(_keras_cache_dir(), cache_subdir, fname)
    if not extract and os.path.isfile(cached):  # also from a read-only cache, which Keras skips
        return cached
    # Keras reads and writes /tmp/.keras instead of a cache it cannot write: an archive to
    # extract must go there.
    folder = _keras_cache_dir() if not extract or os.access(_keras_cache_dir(), os.W_OK) else (
        os.path.join("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir(), ".keras"))
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        return keras.utils.get_file(
            fname, origin=origin, cache_subdir=cache_subdir, extract=extract,
            cache_dir=_keras_cache_dir(),
        )
    except Exception as error:  # noqa: BLE001 - urllib wraps every network failure differently
        reason = _reason(error, timeout)
        raise CnnvizError(
            f"could not download {fname} from {origin} ({reason}); download it by hand and put "
            f"the file in {os.path.join(folder, cache_subdir)} or set data.path to a local copy"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def _reason(error: Exception, timeout: float) -> str:
    cause = error
    while cause is not None:
        if isinstance(cause, (TimeoutError, socket.timeout)) or "timed out" in str(cause):
            return f"no answer within {timeout:g} s (data.download_timeout)"
        cause = cause.__cause__ or cause.__context__ or getattr(cause, "reason", None)
        if not isinstance(cause, BaseException):
            break
    return " ".join(str(error).split()) or type(error).__name__


def existing(path: str, field_name: str = "data.path") -> str:
    if not Path(path).exists():
        raise CnnvizError(f"{field_name}: {path} does not exist")
    return str(path)


# --------------------------------------------------------------------------------- sources
def _load_mnist(data: DataConfig, config: Config) -> ArraySource:
    path = data.path or fetch("mnist.npz", _KERAS_DATASETS + "mnist.npz",
                              timeout=data.download_timeout)
    with np.load(existing(path), allow_pickle=False) as arrays:
        return ArraySource((arrays["x_train"], arrays["y_train"]),
                           (arrays["x_test"], arrays["y_test"]), None)


def _read_idx(path: str, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), np.uint8, offset=offset)


def _load_fashion_mnist(data: DataConfig, config: Config) -> ArraySource:
    if data.path:
        folder = existing(data.path)
        paths = [str(Path(folder) / name) for name in _FASHION_FILES]
    else:
        subdir = os.path.join("datasets", "fashion-mnist")
        paths = [fetch(name, _KERAS_DATASETS + name, cache_subdir=subdir,
                       timeout=data.download_timeout) for name in _FASHION_FILES]
    y_train = _read_idx(paths[0], 8)
    x_train = _read_idx(paths[1], 16).reshape(len(y_train), 28, 28)
    y_test = _read_idx(paths[2], 8)
    x_test = _read_idx(paths[3], 16).reshape(len(y_test), 28, 28)
    return ArraySource((x_train, y_train), (x_test, y_test), list(FASHION_MNIST_CLASSES))


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(batch[b"labels"], dtype=np.int64)


def _load_cifar10(data: DataConfig, config: Config) -> ArraySource:
    if data.path:
        folder = Path(existing(data.path))
    else:
        extracted = fetch("cifar-10-python.tar.gz", _CIFAR10_ORIGIN, extract=True,
                          timeout=data.download_timeout)
        folder = Path(extracted) / "cifar-10-batches-py"
    train = [_cifar_batch(folder / f"data_batch_{index}") for index in range(1, 6)]
    x_test, y_test = _cifar_batch(folder / "test_batch")
    x_train = np.concatenate([images for images, _ in train])
    y_train = np.concatenate([labels for _, labels in train])
    return ArraySource((x_train, y_train), (x_test, y_test), list(CIFAR10_CLASSES))


def _load_digits(data: DataConfig, config: Config) -> ArraySource:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 -> 8-bit units, so an 8-bit image file of a digit means what the data means.
    native_max, unit_scale = UNITS["digits"]
    images = (digits.images * unit_scale).astype(np.float32)
    return ArraySource((images, digits.target), None, [str(digit) for digit in range(10)],
                       unit_scale=unit_scale, native_max=native_max)


def _load_npz(data: DataConfig, config: Config) -> ArraySource:
    path = existing(data.path)
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
        x_train = arrays["x_train"]
        return ArraySource((x_train, arrays["y_train"]), (arrays["x_test"], arrays["y_test"]),
                           names, native_max=_own_maximum(x_train, path, data.scale_divisor))


def _own_maximum(images: np.ndarray, path, divisor: float | None) -> float:
    """The full scale of npz images: 1 for values in [0, 1], 255 for 8-bit pixels (integers,
    or values up to 255), else their own maximum (16-bit scans, physical units), with a note."""
    import warnings

    from cnnviz.errors import CnnvizNotice

    maximum = float(np.max(images)) if images.size else 0.0
    if maximum <= 1.0 and not np.issubdtype(images.dtype, np.integer):
        return 1.0
    if maximum <= 255.0:
        return 255.0
    if divisor is None:
        warnings.warn(f"data.path {path}: values go up to {maximum:g}, above 8-bit pixels; "
                      "that maximum is taken as their full scale (set data.scale_divisor to "
                      "give another)", CnnvizNotice, stacklevel=2)
    return maximum


def _load_inline(data: DataConfig, config: Config) -> ArraySource:
    images = np.asarray(data.images, dtype=np.float32)
    labels = np.asarray(data.labels)
    # Two hand-written examples are both the training and the test set.
    native_max, unit_scale = UNITS["inline"]
    return ArraySource((images, labels), (images, labels), None, unit_scale=unit_scale,
                       native_max=native_max)


def _load_shapes(data: DataConfig, config: Config) -> ArraySource:
    """The generated shapes set: train (with the spurious cue, if any) and test (without)."""
    from cnnviz.data.shapes import make_shapes

    options = data.shapes
    size = tuple(data.image_size or (32, 32))
    test_count = max(1, round(options.count * data.test_split))
    common = {"image_size": size[0], "classes": tuple(options.classes),
              "spurious": options.spurious}
    train = make_shapes(options.count - test_count, with_cue=True, seed=config.seed, **common)
    shuffled = options.test_cue == "shuffled"
    # The test split never carries the training cue: absent, or at a random class's place.
    test = make_shapes(test_count, with_cue=shuffled, shuffle_cue=shuffled,
                       seed=config.seed + 10_000, **common)
    extras = {"cue_masks_train": train.cue_masks, "cue_masks_test": test.cue_masks,
              "shape_masks_train": train.shape_masks, "shape_masks_test": test.shape_masks}
    # [0, 1] -> 8-bit units, in place (the generator's arrays are ours).
    native_max, unit_scale = UNITS["shapes"]
    train_images = np.multiply(train.images, np.float32(unit_scale), out=train.images)
    test_images = np.multiply(test.images, np.float32(unit_scale), out=test.images)
    return ArraySource((train_images, train.labels), (test_images, test.labels),
                       list(train.class_names), unit_scale=unit_scale, native_max=native_max,
                       extras=extras)


LOADERS = {
    "mnist": _load_mnist, "fashion_mnist": _load_fashion_mnist, "cifar10": _load_cifar10,
    "digits": _load_digits, "npz": _load_npz, "inline": _load_inline, "shapes": _load_shapes,
}


def load_arrays(config: Config) -> ArraySource:
    """The config's in-memory source (every source except `directory`)."""
    return LOADERS[config.data.source](config.data, config)
