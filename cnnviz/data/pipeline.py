"""A split's images as a tf.data pipeline, streaming: memory is bounded by the batch and the
prefetch buffer, not by the number of images.

In-memory sources: shuffled row indices, batched, then one `tf.gather` per batch from the raw
array held once (uint8 where the source is uint8), cast and resized inside the pipeline.
Image folders: shuffled file paths, decoded and resized in a parallel `map`
(`cnnviz.images.load_image`), optionally cached, batched. Both then apply the configured
augmentation (Keras preprocessing layers, training only) and prefetch. Preprocessing proper
(Rescaling, Normalization) is not here: it is the model's first layers (docs/decisions.md D1).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cnnviz.data.images import MAX_IMAGE_PIXELS, load_image, read_images, resize

# Cached images are shuffled in a window of this many (the first pass is fully shuffled).
CACHE_SHUFFLE_BUFFER = 2048


class Pixels:
    """A raw image array (N, H, W, C) shared by the splits cut from it; its TensorFlow copy is
    made once, on first use, and the numpy array then becomes a view of it (one copy in all)."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self._tensor = None

    def tensor(self):
        import tensorflow as tf

        if self._tensor is None:
            self._tensor = tf.constant(self.array)
            # A read-only view of the tensor's buffer (`.numpy()` would copy): one copy in all.
            self.array = np.asarray(memoryview(self._tensor))
        return self._tensor


class Split:
    """One split of a data set: its labels, and its images as rows of an in-memory array or
    as files. Images come out as float32 (N, H, W, C) in the model's input units.

    Args:
        labels: (N,) int class indices.
        image_size: (height, width) the images are resized to.
        channels: 1 or 3.
        pixels, rows: in-memory images: `pixels.array[rows]`.
        files, root: image files, relative to `root`.
        max_pixels: refuse larger image files (read through `images`).
        resize: files only: "stretch", "crop" or "pad" (`cnnviz.data.images.resize_pixels`).
    """

    def __init__(self, labels, *, image_size: Sequence[int], channels: int,
                 pixels: Pixels | None = None, rows: np.ndarray | None = None,
                 files: Sequence[str] | None = None, root: Path | None = None,
                 max_pixels: int = MAX_IMAGE_PIXELS, resize: str = "stretch"):
        self.labels = np.asarray(labels, np.int32).reshape(-1)
        self.image_size = tuple(int(side) for side in image_size)
        self.channels = int(channels)
        self._pixels = pixels
        self.rows = None if rows is None else np.asarray(rows, np.int64)
        self.files = None if files is None else list(files)
        self.root = None if root is None else Path(root)
        self.max_pixels = max_pixels
        self.resize = resize

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), *self.image_size, self.channels)

    def part(self, where: range) -> Split:
        """The images at the contiguous `where`, as a split of their own."""
        cut = slice(where.start, where.stop)
        return Split(self.labels[cut], image_size=self.image_size, channels=self.channels,
                     pixels=self._pixels, rows=None if self.rows is None else self.rows[cut],
                     files=None if self.files is None else self.files[cut], root=self.root,
                     max_pixels=self.max_pixels, resize=self.resize)

    def paths(self, indices=None) -> list[str]:
        """Absolute paths of the split's files (all, or those at `indices`)."""
        chosen = self.files if indices is None else [self.files[int(i)] for i in indices]
        return [str(self.root / name) for name in chosen]

    def images(self, indices=None) -> np.ndarray:
        """float32 (k, H, W, C): the images at `indices` (all when None), reading only those."""
        indices = np.arange(len(self)) if indices is None else np.asarray(indices, np.int64)
        if self.files is not None:
            return read_images(self.paths(indices), self.shape[1:], max_pixels=self.max_pixels,
                               what="data.path:")
        raw = self._pixels.array[self.rows[indices]]
        if tuple(raw.shape[1:3]) == self.image_size or len(raw) == 0:
            return raw.astype(np.float32)
        return resize(raw.astype(np.float32), self.image_size).numpy()

    # ---------------------------------------------------------------------------- tf.data
    def pipeline(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 augment: Sequence = (), cache: str | None = None, workers: tuple | None = None,
                 one_hot: int | None = None):
        """This split as a `tf.data.Dataset` of (images, labels) batches.

        Args:
            batch_size: images per batch (the global batch under a tf.distribute strategy).
            shuffle: reshuffle every epoch (seeded: the same order sequence every run).
            seed: the shuffle seed.
            augment: Keras preprocessing layers applied to each batch, in order.
            cache: files only: None, "" (in memory) or a file-name prefix (on disk).
            workers: (count, index) under MultiWorkerMirroredStrategy: files are sharded by
                file (each worker decodes only its share); arrays by element.
            one_hot: give labels as one-hot float vectors of this depth (label smoothing).
        """
        import tensorflow as tf

        if self.files is not None:
            data = self._file_batches(batch_size, shuffle, seed, cache, workers)
        else:
            data = self._array_batches(batch_size, shuffle, seed)
        if one_hot:
            data = data.map(lambda images, labels: (images, tf.one_hot(labels, one_hot)))
        if augment:
            layers = tuple(augment)

            def apply(images, labels):
                for layer in layers:
                    images = layer(images, training=True)
                return images, labels

            # Sequential on purpose: the layers' seed generators then advance in one order,
            # so a seeded run augments the same way every time.
            data = data.map(apply)
        data = data.prefetch(tf.data.AUTOTUNE)
        if workers is None:
            return data
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.OFF if self.files is not None
            # Arrays: every worker holds them in the same shuffled order and takes its share
            # of each global batch (there are no files to shard by).
            else tf.data.experimental.AutoShardPolicy.DATA)
        return data.with_options(options)

    def _array_batches(self, batch_size, shuffle, seed):
        import tensorflow as tf

        count = len(self)
        pixels = self._pixels.tensor()
        rows = tf.constant(self.rows)
        labels = tf.constant(self.labels)
        size = self.image_size
        resized = tuple(pixels.shape[1:3]) != size
        positions = tf.data.Dataset.range(count)
        if shuffle:
            positions = positions.shuffle(count, seed=seed, reshuffle_each_iteration=True)

        def gather(batch):
            images = tf.cast(tf.gather(pixels, tf.gather(rows, batch)), tf.float32)
            if resized:
                images = resize(images, size)
            return images, tf.gather(labels, batch)

        # One gather per batch from memory: cheap enough that parallel calls only add threads.
        return positions.batch(batch_size).map(gather)

    def _file_batches(self, batch_size, shuffle, seed, cache, workers):
        import tensorflow as tf

        count = len(self)
        elements = tf.data.Dataset.from_tensor_slices(
            (tf.constant(self.paths()), tf.constant(self.labels)))
        if shuffle:
            # With a cache the file order is fixed once (the cache replays it) and the decoded
            # images are reshuffled in a window below; without one every epoch reshuffles.
            elements = elements.shuffle(count, seed=seed, reshuffle_each_iteration=cache is None)
        if workers is not None and workers[0] > 1:
            total, index = workers
            # Every worker shuffles the same way (same seed), so the shards are disjoint; each
            # keeps the same number of files, or one worker would wait for a batch forever.
            elements = elements.take(count - count % total).shard(total, index)
            # Keras counts an epoch's steps from the cardinality, here this worker's batches;
            # TensorFlow then splits each batch across all the replicas, so an epoch takes
            # `total` times more steps than that count. Unknown cardinality: Keras runs until
            # the data ends, which every worker reaches at the same step (equal shares).
            elements = elements.filter(lambda path, label: True)
        size, channels, how = self.image_size, self.channels, self.resize
        images = elements.map(lambda path, label: (load_image(path, size, channels, how), label),
                              num_parallel_calls=tf.data.AUTOTUNE)
        if cache is not None:
            images = images.cache(cache)
            if shuffle:
                images = images.shuffle(min(count, CACHE_SHUFFLE_BUFFER), seed=seed,
                                        reshuffle_each_iteration=True)
        return images.batch(batch_size)

    def cache_key(self) -> str:
        """Identifies what a disk cache of this split holds (files, size, channels)."""
        digest = hashlib.sha1()
        digest.update(repr((self.image_size, self.channels)).encode())
        for name in self.files or ():
            digest.update(name.encode() + b"\n")
        return digest.hexdigest()[:12]


def disk_cache(folder: Path, name: str, split: Split) -> str:
    """A tf.data cache file prefix for `split` in `folder`; a cache a killed run left half
    written (no .index file, a stale lock) is removed first, so it is rebuilt."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / f"{name}-{split.cache_key()}"
    if not Path(f"{prefix}.index").is_file():
        for partial in folder.glob(f"{prefix.name}*"):
            partial.unlink(missing_ok=True)
    return str(prefix)


def augmentation_layers(augment: Sequence, *, seed: int, value_range: tuple[float, float]):
    """The Keras preprocessing layers for `data.augment`, seeded one after another."""
    import keras

    layers = []
    for index, spec in enumerate(augment):
        options = spec.model_dump(exclude={"type"})
        layer_seed = seed + index
        if spec.type == "random_flip":
            layer = keras.layers.RandomFlip(options["mode"], seed=layer_seed)
        elif spec.type == "random_rotation":
            layer = keras.layers.RandomRotation(options["factor"], fill_mode=options["fill_mode"],
                                                seed=layer_seed)
        elif spec.type == "random_zoom":
            layer = keras.layers.RandomZoom(options["height_factor"], options["width_factor"],
                                            fill_mode=options["fill_mode"], seed=layer_seed)
        elif spec.type == "random_translation":
            layer = keras.layers.RandomTranslation(
                options["height_factor"], options["width_factor"], fill_mode=options["fill_mode"],
                seed=layer_seed)
        elif spec.type == "random_contrast":
            layer = keras.layers.RandomContrast(options["factor"], value_range=value_range,
                                                seed=layer_seed)
        else:
            layer = keras.layers.RandomBrightness(options["factor"], value_range=value_range,
                                                  seed=layer_seed)
        layers.append(layer)
    return layers
