"""The model builder: parameter counts, output heads, backbones and the per-layer learning rate."""

import numpy as np
import pytest

from cnnviz.config.loading import load_config, validate
from cnnviz.config.shapes import native_input_shape
from cnnviz.errors import CnnvizError
from cnnviz.model.build import backbone_layer_names, build_model
from cnnviz.model.optimizers import make_optimizer


def _built(name, num_classes=10):
    config = load_config(f"configs/{name}.yaml")
    return build_model(config, native_input_shape(config.data), num_classes)


def test_mnist_is_the_classic_keras_cnn():
    model = _built("mnist")
    assert [layer.count_params() for layer in model.layers] == [
        0, 320, 18_496, 0, 0, 0, 1_179_776, 0, 1_290]
    assert model.count_params() == 1_199_882
    assert model.layers[-1].name == "preds"
    # The preprocessing is the model's first layer (DECISIONS D1): it takes 8-bit pixels.
    assert [type(layer).__name__ for layer in model.layers] == [
        "Rescaling", "Conv2D", "Conv2D", "MaxPooling2D", "Dropout", "Flatten", "Dense",
        "Dropout", "Dense"]
    assert model.layers[0].scale == pytest.approx(1 / 255)
    assert model.layers[4].rate == 0.25 and model.layers[7].rate == 0.5


def test_toy4x4_has_twelve_parameters_and_one_sigmoid_unit():
    model = _built("toy4x4", num_classes=2)
    assert model.count_params() == 12
    assert model.outputs[0].shape[-1] == 1
    assert model.layers[-1].activation.__name__ == "sigmoid"


def test_every_shipped_config_builds():
    for name in ("digits", "lenet5", "cifar10"):
        model = _built(name)
        assert model.outputs[0].shape[-1] == 10


def test_layer_names_are_stable_and_options_are_applied():
    config = validate({"data": {"source": "digits"}, "model": {"layers": [
        {"type": "conv2d", "filters": 3, "kernel": [3, 2], "stride": 2, "padding": "same",
         "activation": "leaky_relu"},
        {"type": "conv2d", "filters": 5, "activation": "tanh"},
        {"type": "avg_pool2d", "pool": 2},
        {"type": "batch_norm"},
        {"type": "global_avg_pool2d"},
        {"type": "dense", "units": 7, "activation": "sigmoid"}]}})
    model = build_model(config, (8, 8, 1), 4)
    assert [layer.name for layer in model.layers] == [
        "input_rescaling", "conv2d_1", "conv2d_2", "avg_pool2d_1", "batch_norm_1",
        "global_avg_pool2d_1", "dense_1", "preds"]
    first = model.layers[1]
    assert first.kernel_size == (3, 2) and first.strides == (2, 2) and first.padding == "same"
    assert first.activation.__name__ == "leaky_relu"
    assert model.outputs[0].shape[-1] == 4


def test_sigmoid_output_refuses_more_than_two_classes():
    config = validate({"model": {"layers": [{"type": "flatten"}],
                                 "output": {"activation": "sigmoid"}}})
    with pytest.raises(CnnvizError, match="sigmoid.*two classes.*10"):
        build_model(config, (8, 8, 1), 10)


def test_shape_errors_for_data_known_only_at_build_time():
    config = validate({"data": {"source": "npz", "path": "x.npz"}, "model": {"layers": [
        {"type": "conv2d", "filters": 2, "kernel": 5}, {"type": "flatten"}]}})
    with pytest.raises(CnnvizError, match=r"model.layers.0.kernel=\[5, 5\].*4x4"):
        build_model(config, (4, 4, 1), 2)


def _backbone_config(weights=None, trainable_layers=5):
    return validate({
        "data": {"source": "shapes", "image_size": [32, 32]},
        "model": {"backbone": {"name": "MobileNetV2", "weights": weights,
                               "trainable_layers": trainable_layers,
                               "learning_rate_multiplier": 0.1},
                  "layers": [{"type": "dropout", "rate": 0.2},
                             {"type": "dense", "units": 16}]},
        "train": {"optimizer": {"name": "sgd", "learning_rate": 0.1}}})


def test_backbone_is_inlined_frozen_and_gets_a_smaller_learning_rate():
    config = _backbone_config()
    model = build_model(config, (32, 32, 3), 3)
    slow = backbone_layer_names(model, config)
    names = [layer.name for layer in model.layers]
    assert "Conv1" in slow and "preds" not in slow and "dense_1" not in slow
    assert "out_relu" in names, "backbone layers are part of the model, so Grad-CAM can reach them"
    trainable_backbone = [layer for layer in model.layers if layer.name in slow and layer.trainable]
    assert 0 < len(trainable_backbone) <= 5
    optimizer = make_optimizer(config, slow)
    assert optimizer.slow_multiplier == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop"])
def test_layerwise_learning_rate_scales_the_update_not_the_gradient(name):
    import keras

    config = validate({
        "model": {"backbone": {"name": "VGG16", "weights": None,
                               "learning_rate_multiplier": 0.25},
                  "layers": []},
        "data": {"source": "shapes"},
        "train": {"optimizer": {"name": name, "learning_rate": 0.01}}})
    optimizer = make_optimizer(config, {"slow"})
    slow = keras.Variable(np.zeros(3, np.float32), name="kernel")
    fast = keras.Variable(np.zeros(3, np.float32), name="kernel")
    slow._path, fast._path = "slow/kernel", "fast/kernel"
    gradient = np.array([1.0, -2.0, 0.5], np.float32)
    optimizer.apply_gradients([(gradient, slow), (gradient, fast)])
    # Adam and RMSprop are invariant to the gradient's scale: only a scaled step passes this.
    np.testing.assert_allclose(slow.numpy(), 0.25 * fast.numpy(), rtol=1e-5, atol=1e-8)
    assert np.all(fast.numpy() != 0)


def test_imagenet_weights_are_loaded_through_the_keras_fetch(tmp_path, monkeypatch):
    """The real download path, with the fetch replaced by a local weights file."""
    import keras
    from keras.src.applications import mobilenet_v2
    from keras.src.legacy.saving import legacy_h5_format

    reference = keras.applications.MobileNetV2(include_top=False, weights=None,
                                               input_shape=(32, 32, 3))
    for variable in reference.weights:
        variable.assign(np.random.default_rng(0).normal(size=variable.shape).astype(np.float32))
    import h5py

    weights_file = tmp_path / "mobilenet_v2_no_top.h5"
    with h5py.File(weights_file, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, reference)
    fetched = []

    def local_fetch(fname, origin, **kwargs):
        fetched.append(origin)
        return str(weights_file)

    monkeypatch.setattr(mobilenet_v2.file_utils, "get_file", local_fetch)
    model = build_model(_backbone_config(weights="imagenet"), (32, 32, 3), 3)
    assert fetched and "mobilenet_v2" in fetched[0]
    np.testing.assert_array_equal(model.get_layer("Conv1").get_weights()[0],
                                  reference.get_layer("Conv1").get_weights()[0])


def test_imagenet_weights_need_three_channels():
    config = validate({"data": {"source": "digits", "image_size": [32, 32]},
                       "model": {"backbone": {"name": "MobileNetV2", "weights": "imagenet"}}})
    with pytest.raises(CnnvizError, match="3-channel"):
        build_model(config, (32, 32, 1), 10)
