"""Models as users bring them: nested backbones, several outputs or inputs, logits, sigmoid
units, ReLU6 / leaky ReLU / swish, Rescaling inside. Each is checked against an independent
computation: the equivalent flat model, a GradientTape written here, or numpy."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from _models import images, randomize

from cnnviz.errors import CnnvizError, CnnvizWarning
from cnnviz.explain import gradcam, gradcam_layer, input_gradients, occlusion, saliency
from cnnviz.explain.layers import filters, layer_activations, layer_table
from cnnviz.model.compiled import batch_size_for, chunk_size, model_copy, predict_probabilities
from cnnviz.model.graph import find_layer
from cnnviz.model.inputs import input_range
from cnnviz.model.outputs import output_activation

BATCH = images(5, (8, 8, 1), seed=3)


# ------------------------------------------------------------------------------- models
def _backbone(name: str = "base", *, seed: int = 0):
    """(8, 8, 1) -> conv (linear) -> ReLU(6) -> conv2 (relu) -> (4, 4, 3): a tiny backbone."""
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.ReLU(6.0, name="relu6")(x)
    x = keras.layers.Conv2D(3, 3, activation="relu", name="conv2")(x)
    return randomize(keras.Model(inputs, x, name=name), seed, scale=1.5)


def nested_and_flat(last: str = "softmax"):
    """The fine-tuning guide's `x = base(inputs)` model, and the same network built flat with
    its own layers given the same weights (an independent twin)."""
    base = _backbone()
    inputs = keras.Input((8, 8, 1))
    x = base(inputs, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(3, activation=last, name="head")(x)
    nested = randomize(keras.Model(inputs, outputs, name="nested"), 1)
    flat = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, name="conv"),
        keras.layers.ReLU(6.0, name="relu6"),
        keras.layers.Conv2D(3, 3, activation="relu", name="conv2"),
        keras.layers.GlobalAveragePooling2D(name="pool"),
        keras.layers.Dense(3, activation=last, name="head"),
    ], name="flat")
    flat.set_weights(nested.get_weights())
    return nested, flat


def tape_gradients(model_logits, batch, targets):
    """d logits[i, targets[i]] / d batch[i], with a tape written here."""
    x = tf.constant(batch)
    with tf.GradientTape() as tape:
        tape.watch(x)
        scores = tf.gather(model_logits(x), targets, axis=1, batch_dims=1)
    return tape.gradient(scores, x).numpy()


# ------------------------------------------------------------------------- nested backbones
def test_nested_model_explains_like_its_flat_twin():
    nested, flat = nested_and_flat()
    np.testing.assert_allclose(nested(BATCH), flat(BATCH), atol=1e-6)
    assert gradcam_layer(nested) == "base/conv2"  # the default searches inside the backbone
    for path, name in [("base/conv2", "conv2"), ("base/relu6", "relu6"), ("conv", "conv")]:
        np.testing.assert_allclose(gradcam(nested, BATCH, layer=path),
                                   gradcam(flat, BATCH, layer=name), atol=1e-5)
    for method in ("vanilla", "guided", "rectified"):
        np.testing.assert_allclose(input_gradients(nested, BATCH, method=method),
                                   input_gradients(flat, BATCH, method=method), atol=1e-6)


def test_nested_gradients_equal_a_tape_on_the_pre_softmax_logits():
    nested, _ = nested_and_flat()
    head = nested.get_layer("head")
    base = nested.get_layer("base")

    def logits(x):  # written out by hand: backbone, pooling, head's matmul + bias, no softmax
        pooled = tf.reduce_mean(base(x), axis=(1, 2))
        return pooled @ head.kernel + head.bias

    targets = np.array([0, 1, 2, 1, 0])
    np.testing.assert_allclose(input_gradients(nested, BATCH, targets),
                               tape_gradients(logits, BATCH, targets), atol=1e-6)


def test_layer_paths_names_and_errors():
    nested, _ = nested_and_flat()
    assert find_layer(nested, "base/relu6").path == "base/relu6"
    assert find_layer(nested, "conv2").path == "base/conv2"  # unique inner name
    assert find_layer(nested, nested.get_layer("base").get_layer("conv")).path == "base/conv"
    with pytest.raises(CnnvizError, match=r"no layer named 'base/conv3'.*"
                                          r"Did you mean 'base/conv', 'base/conv2'\?"):
        find_layer(nested, "base/conv3")
    with pytest.raises(CnnvizError, match=r"needs a layer with a 4-D output.*'head'"):
        gradcam_layer(nested, "head")


def test_two_backbones_with_the_same_layer_names():
    first, second = _backbone("a", seed=4), _backbone("b", seed=5)
    inputs = keras.Input((8, 8, 1))
    merged = keras.layers.Concatenate(name="merge")([first(inputs), second(inputs)])
    pooled = keras.layers.GlobalAveragePooling2D()(merged)
    model = randomize(keras.Model(inputs, keras.layers.Dense(2, name="head")(pooled)), 6)
    with pytest.raises(CnnvizError, match=r"'conv2' is used by 2 layers.*a/conv2, b/conv2"):
        find_layer(model, "conv2")
    maps = layer_activations(model, BATCH, ["a/conv2", "b/conv2"])
    for name, backbone in (("a", first), ("b", second)):
        expected = keras.Model(backbone.inputs, backbone.get_layer("conv2").output)(BATCH)
        np.testing.assert_allclose(maps[f"{name}/conv2"].maps, expected, atol=1e-6)


def test_layer_table_lists_inner_layers_with_their_uses():
    nested, _ = nested_and_flat()
    rows = {row.path: row for row in layer_table(nested)}
    assert list(rows) == ["base", "base/conv", "base/relu6", "base/conv2", "pool", "head"]
    assert rows["base/conv"].output_shape == (None, 6, 6, 4) and rows["base/conv"].params == 40
    assert rows["base/conv"].uses == "gradcam, feature-maps, filters"
    assert rows["base/relu6"].uses == "gradcam, feature-maps"
    assert rows["head"].uses == "" and rows["base"].kind == "Functional"


def test_the_users_model_is_unchanged_and_never_stale():
    nested, _ = nested_and_flat(last="softmax")
    head = nested.get_layer("head")
    activation = head.activation
    before = [w.copy() for w in nested.get_weights()]
    input_gradients(nested, BATCH, method="guided")
    gradcam(nested, BATCH, guided=True)
    assert head.activation is activation
    for old, new in zip(before, nested.get_weights()):
        np.testing.assert_array_equal(old, new)
    # Weights changed in place after a first call are what the next call explains.
    randomize(nested, 9)
    targets = np.zeros(len(BATCH), np.int64)

    def logits(x):
        pooled = tf.reduce_mean(nested.get_layer("base")(x), axis=(1, 2))
        return pooled @ head.kernel + head.bias

    np.testing.assert_allclose(input_gradients(nested, BATCH, 0),
                               tape_gradients(logits, BATCH, targets), atol=1e-6)


# ------------------------------------------------------------------- guided backprop, ReLU family
def _relu_family_net(activation):
    """(4, 4, 1) -> Conv2D(2, 2x2) -> activation -> Flatten -> Dense(3) logits."""
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(2, 2, name="conv"),
                              activation, keras.layers.Flatten(), keras.layers.Dense(3)])
    return randomize(model, 11, scale=3.0)  # big weights: values above 6 and below 0 occur


def _numpy_guided(model, batch, target, rule, derivative):
    """The modified backward pass by hand: dense -> activation rule -> conv transpose."""
    kernel, bias, dense, _ = model.get_weights()
    count = len(batch)
    pre = np.zeros((count, 3, 3, 2))
    for i in range(3):
        for j in range(3):
            pre[:, i, j] = np.einsum("nabc,abcf->nf", batch[:, i:i + 2, j:j + 2], kernel) + bias
    upstream = np.broadcast_to(dense[:, target], (count, 18)).reshape(count, 3, 3, 2)
    if rule == "vanilla":
        local = upstream * derivative(pre)
    elif rule == "guided":
        local = np.maximum(upstream, 0) * derivative(pre)
    else:  # rectified
        local = np.maximum(upstream, 0)
    grad = np.zeros_like(batch, dtype=np.float64)
    for i in range(3):
        for j in range(3):
            grad[:, i:i + 2, j:j + 2] += np.einsum("nf,abcf->nabc", local[:, i, j], kernel)
    return grad


RELU_FAMILY = {
    "ReLU(6)": (lambda: keras.layers.ReLU(6.0), lambda x: ((x > 0) & (x < 6)).astype(float)),
    "relu6 fused": (lambda: keras.layers.Activation("relu6"),
                    lambda x: ((x > 0) & (x < 6)).astype(float)),
    "LeakyReLU(0.1)": (lambda: keras.layers.LeakyReLU(0.1), lambda x: np.where(x > 0, 1.0, 0.1)),
}


@pytest.mark.parametrize("name", RELU_FAMILY)
@pytest.mark.parametrize("rule", ["vanilla", "guided", "rectified"])
def test_guided_and_rectified_rules_for_the_relu_family_match_numpy(name, rule):
    build, derivative = RELU_FAMILY[name]
    model = _relu_family_net(build())
    batch = images(4, (4, 4, 1), seed=12)
    expected = _numpy_guided(model, batch.astype(np.float64), 1, rule, derivative)
    got = input_gradients(model, batch, 1, method=rule)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    if rule == "guided":
        assert not np.allclose(got, input_gradients(model, batch, 1)), "guided must differ"


def test_activations_without_a_guided_rule_are_named_once_and_left_as_they_are():
    model = _relu_family_net(keras.layers.Activation("swish"))
    batch = images(3, (4, 4, 1), seed=13)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guided = input_gradients(model, batch, 0, method="guided")
    messages = [str(w.message) for w in caught if issubclass(w.category, CnnvizWarning)]
    assert len(messages) == 1 and "1 silu layer" in messages[0] and "ReLU family" in messages[0]
    np.testing.assert_allclose(guided, input_gradients(model, batch, 0), atol=1e-6)


def test_another_heads_softmax_is_not_named_for_the_guided_rule():
    # The guided copy of one output has only the layers that output needs.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        input_gradients(_two_heads(), BATCH, 0, method="guided", output="parity")
    assert not [w for w in caught if issubclass(w.category, CnnvizWarning)]


# --------------------------------------------------------------------------- outputs
def _two_heads():
    inputs = keras.Input((8, 8, 1))
    features = keras.layers.GlobalAveragePooling2D()(
        keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs))
    digits = keras.layers.Dense(3, activation="softmax", name="digits")(features)
    parity = keras.layers.Dense(2, activation="softmax", name="parity")(features)
    return randomize(keras.Model(inputs, [digits, parity], name="heads"), 14)


def test_multi_output_models_need_an_output_and_explain_its_logits():
    model = _two_heads()
    with pytest.raises(CnnvizError, match=r"has 2 outputs: 0 'digits' \(3 units\), 1 'parity' "
                                          r"\(2 units\); choose one with --output"):
        saliency(model, BATCH)
    conv, parity = model.get_layer("conv"), model.get_layer("parity")

    def parity_logits(x):
        return tf.reduce_mean(conv(x), axis=(1, 2)) @ parity.kernel + parity.bias

    targets = np.array([1, 0, 1, 1, 0])
    expected = tape_gradients(parity_logits, BATCH, targets)
    for output in ("parity", 1, "1"):
        np.testing.assert_allclose(input_gradients(model, BATCH, targets, output=output),
                                   expected, atol=1e-6)
    probabilities = predict_probabilities(model, BATCH, output="parity")
    np.testing.assert_allclose(probabilities, model(BATCH)[1], atol=1e-6)
    assert gradcam(model, BATCH, output=1).shape == (5, 8, 8)
    with pytest.raises(CnnvizError, match=r"no output 'colour'; its outputs: 0 'digits'"):
        occlusion(model, BATCH, output="colour")


def test_multi_input_models_are_refused_naming_the_inputs():
    image = keras.Input((8, 8, 1), name="image")
    extra = keras.Input((2,), name="meta")
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3)(image))
    outputs = keras.layers.Dense(2)(keras.layers.Concatenate()([pooled, extra]))
    model = keras.Model([image, extra], outputs)
    with pytest.raises(CnnvizError, match=r"has 2 inputs \('image' \(8, 8, 1\), 'meta' \(2,\)\)"):
        gradcam(model, BATCH)


def test_logit_outputs_are_explained_as_they_are_and_shown_as_probabilities():
    nested, _ = nested_and_flat(last=None)  # Dense(3) without softmax: from_logits=True
    assert output_activation(nested) == "linear"
    logits = np.asarray(nested(BATCH))
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(predict_probabilities(nested, BATCH), softmax, atol=1e-6)
    np.testing.assert_allclose(input_gradients(nested, BATCH, 2),
                               tape_gradients(nested, BATCH, np.full(5, 2)), atol=1e-6)
    result = occlusion(nested, BATCH, patch=4)
    np.testing.assert_allclose(result.unoccluded_probability, softmax.max(axis=1), atol=1e-6)
    assert (result.probability <= 1).all() and (result.probability >= 0).all()


@pytest.mark.parametrize("last", ["sigmoid", None], ids=["sigmoid", "one logit"])
def test_single_unit_binary_models_score_class_1_by_the_logit_and_class_0_by_its_negative(last):
    model = randomize(keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1, activation=last)]), 15)
    dense = model.layers[-1]
    conv = model.layers[0]

    def logit(x):
        return tf.reduce_mean(conv(x), axis=(1, 2)) @ dense.kernel + dense.bias

    one = tape_gradients(logit, BATCH, np.zeros(5, np.int64))
    np.testing.assert_allclose(input_gradients(model, BATCH, 1), one, atol=1e-6)
    np.testing.assert_allclose(input_gradients(model, BATCH, 0), -one, atol=1e-6)
    p = 1 / (1 + np.exp(-np.asarray(logit(BATCH))[:, 0]))
    np.testing.assert_allclose(predict_probabilities(model, BATCH), np.stack([1 - p, p], 1),
                               atol=1e-6)
    predicted = (p > 0.5).astype(int)
    result = occlusion(model, BATCH, patch=4)
    np.testing.assert_array_equal(result.targets, predicted)


# ---------------------------------------------------------------------- input range
def test_input_range_follows_a_rescaling_layer_also_inside_a_nested_first_model():
    plain, _ = nested_and_flat()
    assert input_range(plain) == (0.0, 1.0)
    rescaled = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Rescaling(1 / 255),
                                 keras.layers.Conv2D(2, 3), keras.layers.Flatten(),
                                 keras.layers.Dense(2)])
    assert input_range(rescaled) == (0.0, 255.0)
    inputs = keras.Input((8, 8, 1))
    wrapped = keras.Model(inputs, keras.layers.Softmax()(rescaled(inputs)))
    assert input_range(wrapped) == (0.0, 255.0)
    assert input_range(plain, preprocess="unit") == (-1.0, 1.0)


# ------------------------------------------------------------------- filters, feature maps
def test_depthwise_and_separable_kernels_are_drawn_one_per_output_channel():
    model = randomize(keras.Sequential([
        keras.Input((8, 8, 2)), keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw"),
        keras.layers.SeparableConv2D(4, 3, depth_multiplier=1, name="sep")]), 16)
    depthwise = np.asarray(model.get_layer("dw").kernel)  # (3, 3, 2, 2)
    kernels = filters(model, "dw")
    assert kernels.shape == (3, 3, 1, 4)
    for channel in range(2):
        for multiplier in range(2):  # TensorFlow's output order: channel * multiplier + m
            np.testing.assert_array_equal(kernels[:, :, 0, channel * 2 + multiplier],
                                          depthwise[:, :, channel, multiplier])
    separable = filters(model, "sep")
    assert separable.shape == (3, 3, 1, 4)
    np.testing.assert_array_equal(separable[:, :, 0, 3],
                                  np.asarray(model.get_layer("sep").depthwise_kernel)[:, :, 3, 0])


def test_most_active_channels_come_first_per_image():
    nested, _ = nested_and_flat()
    base = nested.get_layer("base")
    full = keras.Model(base.inputs, base.get_layer("conv").output)(BATCH).numpy()
    found = layer_activations(nested, BATCH, ["base/conv", "conv2"], max_channels=2)
    kept = found["base/conv"]
    order = np.argsort(-np.abs(full).mean(axis=(1, 2)), axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(kept.channels, order)
    np.testing.assert_allclose(kept.maps, np.take_along_axis(full, order[:, None, None, :], 3),
                               atol=1e-6)
    assert kept.total_channels == 4 and found["base/conv2"].maps.shape == (5, 4, 4, 2)


# -------------------------------------------------------------------------- chunking
def test_chunks_split_the_count_evenly_and_are_sized_to_the_model():
    assert chunk_size(98, 64) == 49 and chunk_size(3, 128) == 3 and chunk_size(300, 128) == 100
    nested, _ = nested_and_flat()
    copy = model_copy(nested, "logits")
    per_image = 4 * (6 * 6 * 4 * 2 + 4 * 4 * 3 + 3 + 3)  # conv, relu6, conv2, pool, head
    assert copy.activation_bytes == per_image
    assert batch_size_for(copy, None) == 256 and batch_size_for(copy, 7) == 7


@pytest.mark.slow
def test_tiny_mobilenet_nested_equals_its_flat_graph():
    base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35,
                                          include_top=False, weights=None)
    head = keras.layers.Dense(4, activation="softmax", name="head")
    pool = keras.layers.GlobalAveragePooling2D(name="pool")
    inputs = keras.Input((32, 32, 3))
    nested = keras.Model(inputs, head(pool(base(inputs))))
    flat = keras.Model(base.inputs, head(pool(base.outputs[0])))  # the same layers, not nested
    randomize(flat, 17, scale=0.3)
    batch = images(3, (32, 32, 3), seed=18)
    assert gradcam_layer(nested) == f"{base.name}/out_relu"
    np.testing.assert_allclose(gradcam(nested, batch), gradcam(flat, batch, layer="out_relu"),
                               atol=1e-5)
    guided = input_gradients(nested, batch, method="guided")  # through 35 ReLU(6) layers
    np.testing.assert_allclose(guided, input_gradients(flat, batch, method="guided"), atol=1e-6)


# ------------------------------------------------------------- the other methods, same helpers
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam",
                                    "scorecam", "eigencam"])
def test_every_cam_method_reaches_into_a_nested_backbone(method):
    from cnnviz.explain import cam

    nested, flat = nested_and_flat()
    np.testing.assert_allclose(cam(nested, BATCH, method=method, layer="base/conv2"),
                               cam(flat, BATCH, method=method, layer="conv2"), atol=1e-5)


def test_signed_and_black_box_methods_explain_the_chosen_output():
    from cnnviz.explain import gradient_x_input, integrated_gradients, rise

    model = _two_heads()
    parity = keras.Model(model.inputs, model.outputs[1])  # that head alone
    targets = np.array([1, 0, 1, 1, 0])
    np.testing.assert_allclose(
        integrated_gradients(model, BATCH, targets, steps=8, output="parity"),
        integrated_gradients(parity, BATCH, targets, steps=8), atol=1e-6)
    np.testing.assert_allclose(gradient_x_input(model, BATCH, targets, output=1),
                               gradient_x_input(parity, BATCH, targets), atol=1e-6)
    np.testing.assert_allclose(rise(model, BATCH, targets, masks=16, cell=2, output="parity"),
                               rise(parity, BATCH, targets, masks=16, cell=2), atol=1e-6)
