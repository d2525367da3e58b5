"""The CAM family checked against the papers' formulas computed here in numpy.

Two independent routes: on a conv -> GlobalAveragePooling2D -> Dense head every gradient is
known in closed form (d logit_c / dA_k = W[k, c] / hw), so the maps follow from the feature
maps and the head's weights alone; on a two-conv model the activations and gradients come from a
plain per-image GradientTape and the logit is rebuilt from the head's kernel.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from _models import (
    assert_unchanged,
    cam_net,
    images,
    randomize,
    sequential_without_input,
    snapshot,
    two_conv_functional,
)

from cnnviz.errors import CnnvizError
from cnnviz.explain import CAM_METHODS, cam, gradcam

GRADIENT_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")


def upsample(maps: np.ndarray, size: tuple) -> np.ndarray:
    import tensorflow as tf

    return tf.image.resize(
        np.asarray(maps, np.float32)[..., None], size, "bilinear")[..., 0].numpy()


def finish(raw: np.ndarray, size: tuple) -> np.ndarray:
    """ReLU, min-max per image, resize: what every method does to its (h, w) map."""
    raw = np.maximum(raw, 0.0)
    low, high = raw.min(axis=(1, 2), keepdims=True), raw.max(axis=(1, 2), keepdims=True)
    return upsample((raw - low) / (high - low + 1e-12), size)


def paper_map(method: str, features: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """The papers' formulas on (h, w, K) activations and gradients of ONE image -> (h, w)."""
    total = features.sum(axis=(0, 1))
    if method == "gradcam":
        return features @ gradients.mean(axis=(0, 1))
    if method == "gradcam++":
        g2, g3 = gradients**2, gradients**3
        denominator = 2 * g2 + total * g3
        alpha = np.divide(g2, denominator, out=np.zeros_like(g2), where=gradients != 0)
        return features @ (np.maximum(gradients, 0) * alpha).sum(axis=(0, 1))
    if method == "xgradcam":
        return features @ ((gradients * features).sum(axis=(0, 1)) / (total + 1e-7))
    if method == "layercam":
        return (np.maximum(gradients, 0) * features).sum(axis=-1)
    if method == "hirescam":
        return (gradients * features).sum(axis=-1)
    raise AssertionError(method)


def eigen_map(features: np.ndarray) -> np.ndarray:
    """First principal component of one image's (hw, K) activations, sign fixed by the mean."""
    flat = features.reshape(-1, features.shape[-1]).astype(np.float64)
    centred = flat - flat.mean(axis=0)
    _, _, right = np.linalg.svd(centred, full_matrices=False)
    projection = centred @ right[0]
    mean = flat.mean(axis=1)
    if np.dot(projection - projection.mean(), mean - mean.mean()) < 0:
        projection = -projection
    return projection.reshape(features.shape[:2])


# ---------------------------------------------------------------- closed form on a GAP head
def gap_features(model, batch):
    import keras

    return np.asarray(keras.Model(model.inputs[0], model.get_layer("conv").output)(batch),
                      np.float64)


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_on_a_global_average_pooling_head_every_gradient_method_has_its_closed_form(method):
    model = cam_net(units=3)
    batch = images(3, (8, 8, 1), seed=2)
    features = gap_features(model, batch)  # (3, 6, 6, 4)
    head = model.get_layer("head").get_weights()[0]  # (K, classes)
    area = features.shape[1] * features.shape[2]
    for target in range(3):
        w = head[:, target] / area  # d logit / dA_k at every position
        if method in ("gradcam", "xgradcam", "hirescam"):  # all reduce to CAM here
            raw = features @ w
        elif method == "layercam":
            raw = features @ np.maximum(w, 0)
        else:  # gradcam++: sum over space of relu(w_k) / (2 + S_k w_k)
            total = features.sum(axis=(1, 2))  # (3, K)
            alpha = np.where(w != 0, 1.0 / (2 + total * w), 0.0)
            raw = np.einsum("nhwk,nk->nhw", features, area * np.maximum(w, 0) * alpha)
        if method == "xgradcam":  # sum(g A) / sum(A) = w_k, up to the eps
            total = features.sum(axis=(1, 2))
            raw = np.einsum("nhwk,nk->nhw", features, w * total / (total + 1e-7))
        expected = finish(raw, (8, 8))
        result = cam(model, batch, target, method=method)
        np.testing.assert_allclose(result, expected, atol=1e-5)
        assert result.shape == (3, 8, 8) and result.dtype == np.float32


# ------------------------------------------------------------ tape + numpy on a deeper model
def tape_activations_and_gradients(model, layer_name: str, x: np.ndarray, target: int):
    """One image, the plain way; the logit is rebuilt from the Dense head's kernel and bias."""
    import keras
    import tensorflow as tf

    head = model.layers[-1]
    features_model = keras.Model(model.inputs[0], [model.get_layer(layer_name).output, head.input])
    with tf.GradientTape() as tape:
        features, penultimate = features_model(x[None])
        logit = (tf.matmul(penultimate, head.kernel) + head.bias)[0, target]
    gradients = tape.gradient(logit, features)[0].numpy().astype(np.float64)
    return features[0].numpy().astype(np.float64), gradients


@pytest.mark.parametrize("layer_name", ("conv_a", "conv_b"))
def test_gradient_methods_match_the_formulas_on_tape_gradients(layer_name):
    model = two_conv_functional()
    batch = images(4, (8, 8, 1), seed=1)
    targets = [0, 1, 2, 1]
    pairs = [tape_activations_and_gradients(model, layer_name, x, t)
             for x, t in zip(batch, targets)]
    for method in GRADIENT_METHODS:
        raw = np.stack([paper_map(method, f, g) for f, g in pairs])
        expected = finish(raw, (8, 8))
        result = cam(model, batch, targets, method=method, layer=layer_name)
        np.testing.assert_allclose(result, expected, atol=1e-5, err_msg=method)
        assert (expected.max(axis=(1, 2)) > 0.5).sum() >= 2, method  # non-trivial maps


def test_scorecam_is_the_softmax_of_masked_scores_over_channels():
    import keras

    model = two_conv_functional()
    batch = images(3, (8, 8, 1), seed=4)
    targets = np.array([2, 0, 1])
    head = model.layers[-1]
    penultimate = keras.Model(model.inputs[0], head.input)
    kernel, bias = (np.asarray(w, np.float64) for w in head.get_weights())
    features = np.asarray(keras.Model(model.inputs[0], model.get_layer("conv_a").output)(batch))
    expected = []
    for x, a, target in zip(batch, features, targets):
        channels = np.moveaxis(a, -1, 0)  # (K, h, w)
        up = upsample(channels, (8, 8))
        low, high = up.min(axis=(1, 2), keepdims=True), up.max(axis=(1, 2), keepdims=True)
        masks = (up - low) / (high - low + 1e-8)
        masked = x[None] * masks[..., None]  # input range [0, 1]: masked-out pixels are 0
        scores = (np.asarray(penultimate(masked), np.float64) @ kernel + bias)[:, target]
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        expected.append(a.astype(np.float64) @ weights)
    expected = finish(np.stack(expected), (8, 8))
    result = cam(model, batch, targets, method="scorecam", layer="conv_a", batch_size=8)
    np.testing.assert_allclose(result, expected, atol=1e-5)
    assert (result.max(axis=(1, 2)) > 0.5).all()


def wide_conv_net():
    """(5, 5, 1) -> Conv2D(20, 4x4, relu, 'wide') -> Flatten -> Dense(3): a 2 x 2 x 20 layer,
    more channels than positions (Eigen-CAM then works on the positions' Gram matrix)."""
    import keras

    return randomize(keras.Sequential([
        keras.Input((5, 5, 1)), keras.layers.Conv2D(20, 4, activation="relu", name="wide"),
        keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax"),
    ]), seed=11)


@pytest.mark.parametrize(("build", "layer", "size"),
                         [(two_conv_functional, "conv_a", 8), (wide_conv_net, "wide", 5)],
                         ids=("channels<positions", "channels>positions"))
def test_eigencam_is_the_first_principal_component_and_ignores_the_class(build, layer, size):
    import keras

    model = build()
    batch = images(4, (size, size, 1), seed=5)
    features = np.asarray(keras.Model(model.inputs[0], model.get_layer(layer).output)(batch))
    expected = finish(np.stack([eigen_map(a) for a in features]), (size, size))
    assert (expected.max(axis=(1, 2)) > 0.5).all()
    for target in (0, 2):
        result = cam(model, batch, target, method="eigencam", layer=layer)
        np.testing.assert_allclose(result, expected, atol=1e-4)
    # The sign rule: the map agrees with where the layer is active on average.
    mean = upsample(features.mean(axis=-1), (size, size))
    for m, e in zip(mean, expected):
        assert np.corrcoef(m.ravel(), e.ravel())[0, 1] > 0


# ------------------------------------------------------------------------- shared behaviour
@pytest.mark.parametrize("layer", (None, "conv_a"))
def test_gradcam_is_grad_cam_computed_by_hand_on_tape_gradients(layer):
    """gradcam(): ReLU(sum_k mean(dy/dA_k) A_k), scaled and resized, on the last conv layer
    (conv_b) by default and for the predicted class unless targets are given."""
    model = two_conv_functional()
    batch = images(3, (8, 8, 1), seed=6)
    predicted = np.asarray(model(batch)).argmax(axis=-1)
    targets = predicted if layer is None else np.array([2, 0, 1])
    raw = []
    for x, target in zip(batch, targets):
        features, gradients = tape_activations_and_gradients(model, layer or "conv_b", x, target)
        raw.append(np.einsum("hwk,k->hw", features, gradients.mean(axis=(0, 1))))
    expected = finish(np.stack(raw), (8, 8))
    assert (expected.max(axis=(1, 2)) > 0.5).sum() >= 2  # non-trivial maps
    result = gradcam(model, batch, None if layer is None else targets, layer=layer)
    np.testing.assert_allclose(result, expected, atol=1e-5)
    assert result.shape == (3, 8, 8) and result.dtype == np.float32


@pytest.mark.parametrize("method", CAM_METHODS)
def test_batch_equals_one_at_a_time(method):
    model = two_conv_functional()
    batch = images(5, (8, 8, 1), seed=7)
    together = cam(model, batch, method=method, batch_size=4)  # 2 chunks, the last padded
    alone = np.concatenate([cam(model, x, method=method) for x in batch])
    np.testing.assert_allclose(together, alone, atol=1e-5)


MODELS = {
    "sigmoid": (lambda: cam_net(units=1, last="sigmoid"), (8, 8, 1)),
    "rgb": (lambda: cam_net(channels=3), (8, 8, 3)),
    "sequential_without_input": (sequential_without_input, (8, 8, 1)),
}


@pytest.mark.parametrize("kind", MODELS)
def test_every_method_runs_on_every_kind_of_model_and_leaves_it_alone(kind):
    build, shape = MODELS[kind]
    model = build()
    batch = images(3, shape, seed=8)
    before = snapshot(model)
    outputs = np.asarray(model(batch))
    for method in CAM_METHODS:
        maps = cam(model, batch, method=method)
        assert maps.shape == (3, 8, 8) and maps.dtype == np.float32, method
        assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6, method
    assert_unchanged(model, before)
    np.testing.assert_array_equal(np.asarray(model(batch)), outputs)


def test_sigmoid_class_zero_is_the_negated_evidence():
    model = cam_net(units=1, last="sigmoid")
    batch = images(3, (8, 8, 1), seed=9)
    evidence = gap_features(model, batch) @ model.get_layer("head").get_weights()[0][:, 0]
    for target, sign in ((1, 1.0), (0, -1.0)):
        np.testing.assert_allclose(cam(model, batch, target, method="hirescam"),
                                   finish(sign * evidence, (8, 8)), atol=1e-5)


def test_bad_arguments_raise_cnnviz_error_quoting_the_value():
    model = two_conv_functional()
    batch = images(2, (8, 8, 1))
    message = "unknown CAM method 'gradcam+'; choose one of gradcam, gradcam++, xgradcam"
    with pytest.raises(CnnvizError, match=re.escape(message)):
        cam(model, batch, method="gradcam+")
    with pytest.raises(CnnvizError, match="'head'.*4-D layers: conv_a, conv_b"):
        cam(model, batch, method="scorecam", layer="head")
    with pytest.raises(CnnvizError, match="target class 3 "):
        cam(model, batch, [0, 3], method="layercam")
