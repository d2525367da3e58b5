"""Every data source loads real files into the same three splits, in the model's input units
(8-bit pixel units for image sources, DECISIONS D1); the downloading ones from the Keras cache
(a planted file in a temporary KERAS_HOME), never from the network."""

import gzip
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from cnnviz.config.loading import validate
from cnnviz.data import load_dataset, measure_statistics
from cnnviz.errors import CnnvizError

MODEL = {"layers": [{"type": "flatten"}]}


def _config(data: dict, **extra):
    return validate({"data": data, "model": MODEL, **extra})


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    home = tmp_path / "keras_home"
    (home / "datasets").mkdir(parents=True)
    monkeypatch.setenv("KERAS_HOME", str(home))
    # Any attempt to download fails loudly instead of silently reaching the network.
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError(f"tried to download {args[0]}")

    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    from keras.src.utils import file_utils

    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    return home


def _fake_images(count, shape, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(count, *shape), dtype=np.uint8)


def test_digits_is_the_real_scikit_learn_set_resized_and_split():
    data = load_dataset(_config({"source": "digits", "image_size": [28, 28],
                                 "validation_split": 0.1, "test_split": 0.2}))
    total = len(data.x_train) + len(data.x_val) + len(data.x_test)
    assert total == 1797
    assert data.x_train.shape[1:] == (28, 28, 1) and data.x_train.dtype == np.float32
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 255.0 + 1e-3
    assert data.x_train.max() > 200, "8-bit pixel units, not [0, 1]"
    assert data.class_names == [str(digit) for digit in range(10)]
    assert abs(len(data.x_test) / 1797 - 0.2) < 0.01
    # stratified: every class in every split
    for labels in (data.y_train, data.y_val, data.y_test):
        assert set(np.unique(labels)) == set(range(10))


def test_digits_native_size_is_in_8_bit_units_and_the_model_divides_by_255():
    from sklearn.datasets import load_digits

    from cnnviz.model.build import build_model

    config = _config({"source": "digits", "validation_split": 0.0})
    data = load_dataset(config)
    assert data.x_train.shape[1:] == (8, 8, 1)
    raw = load_digits().images
    # each training image equals some raw digit * 255/16 (0..16 -> 8-bit units)
    first = data.x_train[0, :, :, 0]
    assert np.min(np.abs(raw * 255 / 16 - first).reshape(len(raw), -1).max(axis=1)) < 1e-4
    # ... and the model's own first layer brings it back to raw / 16, the old training scale.
    model = build_model(config, data.input_shape, data.num_classes, data.preprocessing)
    assert type(model.layers[0]).__name__ == "Rescaling"
    np.testing.assert_allclose(model.layers[0](data.x_train[:4]), data.x_train[:4] / 255,
                               atol=1e-6)


def test_splits_are_reproducible_and_seed_dependent():
    first = load_dataset(_config({"source": "digits"}, seed=1))
    again = load_dataset(_config({"source": "digits"}, seed=1))
    other = load_dataset(_config({"source": "digits"}, seed=2))
    np.testing.assert_array_equal(first.x_test, again.x_test)
    assert not np.array_equal(first.y_test, other.y_test)


def test_mnist_loads_from_the_keras_cache(keras_home):
    x_train, x_test = _fake_images(50, (28, 28), 0), _fake_images(20, (28, 28), 1)
    y_train, y_test = np.arange(50) % 10, np.arange(20) % 10
    np.savez(keras_home / "datasets" / "mnist.npz", x_train=x_train, y_train=y_train,
             x_test=x_test, y_test=y_test)
    data = load_dataset(_config({"source": "mnist", "validation_split": 0.2}))
    assert len(data.x_train) == 40 and len(data.x_val) == 10
    np.testing.assert_array_equal(data.x_test[..., 0], x_test)
    np.testing.assert_array_equal(data.y_test, y_test)


def test_mnist_from_a_local_path_option(tmp_path, keras_home):
    path = tmp_path / "my_mnist.npz"
    np.savez(path, x_train=_fake_images(10, (28, 28), 0), y_train=np.arange(10),
             x_test=_fake_images(10, (28, 28), 1), y_test=np.arange(10))
    data = load_dataset(_config({"source": "mnist", "path": str(path), "validation_split": 0.0}))
    assert data.x_test.shape == (10, 28, 28, 1)


def _write_idx(path, array, magic_and_dims_bytes):
    with gzip.open(path, "wb") as handle:
        handle.write(b"\x00" * magic_and_dims_bytes + array.tobytes())


def test_fashion_mnist_loads_from_the_keras_cache(keras_home):
    folder = keras_home / "datasets" / "fashion-mnist"
    folder.mkdir()
    x_train, x_test = _fake_images(30, (28, 28), 2), _fake_images(10, (28, 28), 3)
    y_train, y_test = (np.arange(30) % 10).astype(np.uint8), (np.arange(10) % 10).astype(np.uint8)
    _write_idx(folder / "train-labels-idx1-ubyte.gz", y_train, 8)
    _write_idx(folder / "train-images-idx3-ubyte.gz", x_train, 16)
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", y_test, 8)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", x_test, 16)
    data = load_dataset(_config({"source": "fashion_mnist", "validation_split": 0.0}))
    np.testing.assert_array_equal(data.x_test[..., 0], x_test)
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"


def _cifar_batch(path, images_nhwc, labels):
    payload = {b"data": images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1),
               b"labels": list(labels)}
    with open(path, "wb") as handle:
        pickle.dump(payload, handle)


def test_cifar10_loads_and_extracts_from_the_keras_cache(tmp_path, keras_home):
    source = tmp_path / "cifar-10-batches-py"
    source.mkdir()
    for index in range(1, 6):
        _cifar_batch(source / f"data_batch_{index}", _fake_images(4, (32, 32, 3), index),
                     [index % 10] * 4)
    test_images = _fake_images(6, (32, 32, 3), 9)
    _cifar_batch(source / "test_batch", test_images, [0, 1, 2, 3, 4, 5])
    with tarfile.open(keras_home / "datasets" / "cifar-10-python.tar.gz", "w:gz") as archive:
        archive.add(source, arcname="cifar-10-batches-py")
    data = load_dataset(_config({"source": "cifar10", "validation_split": 0.0}))
    assert data.x_train.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(data.x_test, test_images)
    assert data.class_names[:2] == ["airplane", "automobile"]


def test_missing_cache_without_network_says_where_to_put_the_file(keras_home):
    with pytest.raises(CnnvizError,
                       match="mnist.npz.*KERAS_HOME|mnist.npz.*data.path|put the file"):
        load_dataset(_config({"source": "mnist"}))


def test_directory_source_one_folder_per_class(tmp_path):
    for class_index, name in enumerate(["cat", "dog"]):
        folder = tmp_path / "images" / name
        folder.mkdir(parents=True)
        for image_index in range(6):
            value = 40 + 150 * class_index
            pixels = np.full((12, 10, 3), value, dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{image_index}.png")
    data = load_dataset(_config({"source": "directory", "path": str(tmp_path / "images"),
                                 "image_size": [12, 10], "test_split": 0.5,
                                 "validation_split": 0.0}))
    assert data.class_names == ["cat", "dog"]
    assert data.x_train.shape[1:] == (12, 10, 3)
    for images, labels in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        expected = np.where(labels == 0, 40, 190)
        np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), expected, atol=1e-3)


def test_npz_source_with_class_names_and_standardize(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, x_train=rng.normal(5, 3, (40, 6, 6, 2)).astype(np.float32),
             y_train=np.arange(40) % 2, x_test=rng.normal(5, 3, (8, 6, 6, 2)).astype(np.float32),
             y_test=np.arange(8) % 2, class_names=np.array(["no", "yes"]))
    config = _config({"source": "npz", "path": str(path), "preprocessing": "standardize",
                      "scale_divisor": 1, "validation_split": 0.0})
    data = load_dataset(config)
    assert data.class_names == ["no", "yes"]
    measure_statistics(data)  # one streaming pass, batch by batch
    np.testing.assert_allclose(data.preprocessing.mean, data.x_train.mean(axis=(0, 1, 2)),
                               rtol=1e-5)
    np.testing.assert_allclose(data.preprocessing.std, data.x_train.std(axis=(0, 1, 2)),
                               rtol=1e-4)
    # The model standardizes its own input: the training images come out mean 0, std 1.
    from cnnviz.model.build import build_model

    model = build_model(config, data.input_shape, 2, data.preprocessing)
    standardized = np.asarray(model.layers[1](model.layers[0](data.x_train)))
    np.testing.assert_allclose(standardized.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(standardized.std(axis=(0, 1, 2)), 1.0, atol=1e-4)


def test_mean_subtraction_uses_the_training_mean(tmp_path):
    path = tmp_path / "data.npz"
    x_train = np.full((4, 3, 3, 1), 10.0, dtype=np.float32)
    x_test = np.full((2, 3, 3, 1), 12.0, dtype=np.float32)
    np.savez(path, x_train=x_train, y_train=[0, 1, 0, 1], x_test=x_test, y_test=[0, 1])
    config = _config({"source": "npz", "path": str(path), "scale_divisor": 2,
                      "preprocessing": "mean_subtract", "validation_split": 0.0})
    data = load_dataset(config)
    measure_statistics(data)
    from cnnviz.model.build import build_model

    model = build_model(config, data.input_shape, 2, data.preprocessing)
    scaled = model.layers[1](model.layers[0](data.x_test))
    np.testing.assert_allclose(scaled, 1.0)  # 12/2 - 10/2


def test_npz_missing_arrays_named(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x_train=np.zeros((2, 4, 4)), y_train=[0, 1])
    with pytest.raises(CnnvizError, match="missing arrays x_test, y_test"):
        load_dataset(_config({"source": "npz", "path": str(path)}))


def test_missing_path_named(tmp_path):
    with pytest.raises(CnnvizError, match="data.path: .*nowhere does not exist"):
        load_dataset(_config({"source": "directory", "path": str(tmp_path / "nowhere")}))


def test_toy_inline_examples_keep_their_units_and_the_model_divides_by_nine():
    from cnnviz.config.loading import load_config
    from cnnviz.model.build import build_model
    from cnnviz.model.inputs import input_range

    config = load_config("configs/toy4x4.yaml")
    data = load_dataset(config)
    expected = np.array([[1, 2, 3, 3], [2, 3, 4, 5], [4, 5, 6, 7], [1, 3, 4, 6]])
    np.testing.assert_allclose(data.x_train[0, :, :, 0], expected)
    np.testing.assert_array_equal(data.y_train, [0, 1])
    model = build_model(config, data.input_shape, 2, data.preprocessing)
    np.testing.assert_allclose(model.layers[0](data.x_train)[0, :, :, 0], expected / 9, atol=1e-7)
    assert input_range(model) == (0.0, 9.0)


def test_training_pipeline_batches_shuffles_and_prefetches():
    import tensorflow as tf

    data = load_dataset(_config({"source": "digits", "validation_split": 0.0}))
    pipeline = data.train.pipeline(64, shuffle=True, seed=0)
    batches = list(pipeline.as_numpy_iterator())
    assert [len(batch[0]) for batch in batches[:-1]] == [64] * (len(batches) - 1)
    assert sum(len(labels) for _, labels in batches) == len(data.train)
    assert sorted(np.concatenate([labels for _, labels in batches]).tolist()) == sorted(
        data.train.labels.tolist())
    again = np.concatenate([labels for _, labels in pipeline.as_numpy_iterator()])
    assert not np.array_equal(again, np.concatenate([labels for _, labels in batches])), (
        "every epoch is reshuffled")
    assert isinstance(pipeline, tf.data.Dataset)
    assert "PrefetchDataset" in repr(pipeline._variant_tensor), "input must be prefetched"
    # Batches are the split's own images, read through the pipeline.
    first_images, first_labels = next(data.test.pipeline(8).as_numpy_iterator())
    np.testing.assert_array_equal(first_images, data.test.images(range(8)))
    np.testing.assert_array_equal(first_labels, data.test.labels[:8])


def test_in_memory_sources_hold_the_raw_uint8_array_once(keras_home):
    x_train = _fake_images(300, (28, 28), 0)
    np.savez(keras_home / "datasets" / "mnist.npz", x_train=x_train, y_train=np.arange(300) % 10,
             x_test=_fake_images(50, (28, 28), 1), y_test=np.arange(50) % 10)
    data = load_dataset(_config({"source": "mnist", "validation_split": 0.2}))
    # Train and validation are rows of one uint8 array, not copies of it.
    assert data.train._pixels is data.val._pixels
    assert data.train._pixels.array.dtype == np.uint8
    assert data.train._pixels.array.shape == (300, 28, 28, 1), "one array for both splits"
    assert len(np.intersect1d(data.train.rows, data.val.rows)) == 0
    assert len(data.train) + len(data.val) == 300
    list(data.train.pipeline(64).take(1))  # the TensorFlow copy replaces the numpy one
    assert not data.train._pixels.array.flags.owndata


def test_limit_takes_a_stratified_subset():
    data = load_dataset(_config({"source": "digits", "limit": 200, "validation_split": 0.0}))
    assert len(data.train) == 200
    counts = np.bincount(data.train.labels, minlength=10)
    assert counts.min() >= 18 and counts.max() <= 22, counts


def test_a_stalled_download_times_out_with_a_one_line_way_out(tmp_path, monkeypatch):
    """A server that accepts the connection and never answers: the read timeout ends it."""
    import socket
    import threading
    import time

    from cnnviz.data.sources import fetch

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    origin = f"http://127.0.0.1:{server.getsockname()[1]}/mnist.npz"
    started = time.perf_counter()
    try:
        with pytest.raises(CnnvizError) as raised:
            fetch("mnist.npz", origin, timeout=0.5)
    finally:
        server.close()
    assert time.perf_counter() - started < 30
    message = str(raised.value)
    assert accepted, "it connected, then waited for an answer"
    assert "\n" not in message
    assert (f"could not download mnist.npz from {origin} (no answer within 0.5 s "
            "(data.download_timeout))") in message
    assert f"put the file in {tmp_path / 'datasets'} or set data.path" in message
    assert not (tmp_path / "datasets" / "mnist.npz").exists(), "no partial file left"


def test_npz_values_above_8_bit_are_scaled_by_their_own_maximum_with_a_note(tmp_path):
    """16-bit scans (0..4095) are not 8-bit pixels: the scale layer divides by their maximum."""
    from cnnviz.errors import CnnvizNotice

    path = tmp_path / "scans.npz"
    x_train = np.array([[[0, 4095], [1000, 2000]]] * 4, dtype=np.uint16)[..., None]
    np.savez(path, x_train=x_train, y_train=[0, 1, 0, 1], x_test=x_train[:2], y_test=[0, 1])
    with pytest.warns(CnnvizNotice, match="up to 4095"):
        data = load_dataset(_config({"source": "npz", "path": str(path),
                                     "validation_split": 0.0}))
    assert data.preprocessing.divisor == 4095.0 and data.value_range == (0.0, 4095.0)
    for values, divisor in ((np.full((4, 2, 2, 1), 16.0), 255.0),
                            (np.full((4, 2, 2, 1), 0.5), 1.0)):
        np.savez(path, x_train=values, y_train=[0, 1, 0, 1], x_test=values[:2], y_test=[0, 1])
        loaded = load_dataset(_config({"source": "npz", "path": str(path),
                                       "validation_split": 0.0}))
        assert loaded.preprocessing.divisor == divisor
