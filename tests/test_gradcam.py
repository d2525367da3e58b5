"""Grad-CAM checked against a per-image GradientTape implementation and against CAM."""

from __future__ import annotations

import numpy as np
import pytest
from _models import (
    assert_unchanged,
    cam_net,
    images,
    sequential_without_input,
    snapshot,
    two_conv_functional,
)

from cnnviz.errors import CnnvizError
from cnnviz.explain.cam import gradcam_and_saliency, gradcam_layer
from cnnviz.explain.gradcam import gradcam
from cnnviz.explain.saliency import saliency


def upsample(cam: np.ndarray, size: tuple) -> np.ndarray:
    import tensorflow as tf

    return tf.image.resize(cam[..., None], size, method="bilinear")[..., 0].numpy()


def normalized(cam: np.ndarray) -> np.ndarray:
    """Divided by its max: how Guided Grad-CAM scales the guided map and the product."""
    return cam / cam.max() if cam.max() > 0 else cam


def min_max(cam: np.ndarray) -> np.ndarray:
    """How every CAM map is scaled (pytorch-grad-cam's scale_cam_image)."""
    return (cam - cam.min()) / (cam.max() - cam.min()) if cam.max() > cam.min() else 0 * cam


def reference_gradcam(model, layer_name: str, x: np.ndarray, target: int) -> np.ndarray:
    """One image, the plain way: tape -> numpy mean, weighted sum, ReLU, max, resize.

    The logit is rebuilt from the Dense head's kernel and bias, independently of the library's
    logits copy.
    """
    import keras
    import tensorflow as tf

    head = model.layers[-1]
    features_model = keras.Model(model.inputs[0], [model.get_layer(layer_name).output, head.input])
    with tf.GradientTape() as tape:
        features, penultimate = features_model(x[None])
        logit = (tf.matmul(penultimate, head.kernel) + head.bias)[0, target]
    gradients = tape.gradient(logit, features)[0].numpy()
    features = features[0].numpy()
    weights = gradients.mean(axis=(0, 1))
    cam = np.maximum((features * weights).sum(axis=-1), 0.0)
    return upsample(min_max(cam), x.shape[:2])


@pytest.mark.parametrize("layer_name", ("conv_a", None))
def test_gradcam_matches_a_per_image_implementation(layer_name):
    model = two_conv_functional()
    batch = images(4, (8, 8, 1), seed=1)
    targets = [0, 1, 2, 1]
    expected = np.stack(
        [reference_gradcam(model, layer_name or "conv_b", x, t) for x, t in zip(batch, targets)]
    )
    result = gradcam(model, batch, targets, layer=layer_name)
    assert result.shape == (4, 8, 8) and result.dtype == np.float32
    np.testing.assert_allclose(result, expected, atol=1e-5)
    assert (expected.max(axis=(1, 2)) > 0.5).sum() >= 3  # mostly non-trivial maps


def feature_maps(model, batch: np.ndarray) -> np.ndarray:
    import keras

    return np.asarray(keras.Model(model.inputs[0], model.get_layer("conv").output)(batch))


def test_gradcam_equals_cam_on_a_global_average_pooling_head():
    model = cam_net(units=3)
    batch = images(3, (8, 8, 1), seed=2)
    head = model.get_layer("head").get_weights()[0]  # (K, classes)
    features = feature_maps(model, batch)
    for target in range(3):
        cam = np.maximum(features @ head[:, target], 0.0)  # CAM: sum_k W[k, c] A_k
        expected = np.stack([upsample(min_max(c), (8, 8)) for c in cam])
        np.testing.assert_allclose(gradcam(model, batch, target), expected, atol=1e-5)


def test_sigmoid_class_zero_sees_the_opposite_evidence_of_class_one():
    model = cam_net(units=1, last="sigmoid")
    batch = images(3, (8, 8, 1), seed=3)
    evidence = feature_maps(model, batch) @ model.get_layer("head").get_weights()[0][:, 0]
    for target, sign in ((1, 1.0), (0, -1.0)):
        expected = np.stack(
            [upsample(min_max(np.maximum(sign * e, 0)), (8, 8)) for e in evidence]
        )
        assert (expected.max(axis=(1, 2)) > 0.5).all()
        np.testing.assert_allclose(gradcam(model, batch, target), expected, atol=1e-5)


def test_a_map_without_positive_evidence_is_zero_not_nan():
    model = cam_net(units=2)
    kernel, bias = model.get_layer("head").get_weights()
    kernel[:, 0] = -np.abs(kernel[:, 0]) - 0.1  # ReLU features >= 0: class 0 evidence <= 0
    model.get_layer("head").set_weights([kernel, bias])
    batch = images(2, (8, 8, 1), seed=4)
    for guided in (False, True):
        np.testing.assert_array_equal(gradcam(model, batch, 0, guided=guided), 0.0)


def test_guided_gradcam_is_the_normalized_product_with_guided_saliency():
    model = two_conv_functional()
    batch = images(4, (8, 8, 1), seed=5)
    targets = None  # predicted classes: mostly maps with positive evidence
    cams = gradcam(model, batch, targets)
    guided = saliency(model, batch, targets, method="guided")
    expected = np.stack([normalized(c * normalized(g)) for c, g in zip(cams, guided)])
    result = gradcam(model, batch, targets, guided=True)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)
    peaks = result.max(axis=(1, 2))
    assert result.min() >= 0 and np.allclose(peaks[peaks > 0], 1.0) and (peaks > 0).sum() >= 3
    assert not np.allclose(result, cams, atol=1e-2)


def test_batch_equals_one_at_a_time():
    model = two_conv_functional()
    batch = images(5, (8, 8, 1), seed=6)
    together = gradcam(model, batch, batch_size=4)  # 2 chunks, the last one padded
    alone = np.concatenate([gradcam(model, x) for x in batch])
    np.testing.assert_allclose(together, alone, atol=1e-6)


MODELS = {
    "sigmoid": (lambda: cam_net(units=1, last="sigmoid"), (8, 8, 1), "conv"),
    "rgb": (lambda: cam_net(channels=3), (8, 8, 3), "conv"),
    "functional": (two_conv_functional, (8, 8, 1), "conv_b"),
    "sequential_without_input": (sequential_without_input, (8, 8, 1), "relu"),
}


@pytest.mark.parametrize("kind", MODELS)
def test_runs_on_every_kind_of_model_and_names_its_default_layer(kind):
    build, shape, default = MODELS[kind]
    model = build()
    assert gradcam_layer(model) == default
    batch = images(3, shape, seed=7)
    for guided in (False, True):
        maps = gradcam(model, batch, guided=guided)
        assert maps.shape == (3, 8, 8) and maps.dtype == np.float32
        assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6


@pytest.mark.parametrize("kind", MODELS)
def test_together_they_equal_gradcam_and_saliency_alone(kind):
    """One pass for both (what the registry runs when a check asks for the two) gives each
    method's own numbers, for the predicted class and for given targets."""
    from cnnviz.explain.registry import resolve_methods, run_methods

    build, shape, _ = MODELS[kind]
    model = build()
    batch = images(4, shape, seed=9)
    for targets in (None, [0, 1, 1, 0]):
        cams, saliency_maps = gradcam_and_saliency(model, batch, targets)
        np.testing.assert_allclose(cams, gradcam(model, batch, targets), atol=1e-6)
        alone = saliency(model, batch, targets)
        np.testing.assert_allclose(saliency_maps, alone, atol=1e-6 * alone.max())
        maps = run_methods(model, batch, targets, resolve_methods(("saliency", "gradcam")),
                           remember=False)
        np.testing.assert_array_equal(maps["gradcam"], cams)
        np.testing.assert_array_equal(maps["saliency"], saliency_maps)


def test_a_layer_object_or_its_name_give_the_same_map():
    model = two_conv_functional()
    batch = images(2, (8, 8, 1), seed=8)
    assert gradcam_layer(model, model.get_layer("conv_a")) == "conv_a"
    np.testing.assert_array_equal(
        gradcam(model, batch, layer=model.get_layer("conv_a")),
        gradcam(model, batch, layer="conv_a"),
    )


def test_the_users_model_is_unchanged():
    model = two_conv_functional()
    batch = images(2, (8, 8, 1), seed=9)
    before = snapshot(model)
    outputs = np.asarray(model(batch))
    gradcam(model, batch)
    gradcam(model, batch, layer="conv_a", guided=True)
    assert_unchanged(model, before)
    np.testing.assert_array_equal(np.asarray(model(batch)), outputs)


def test_bad_inputs_raise_cnnviz_error_quoting_the_value():
    model = two_conv_functional()
    batch = images(2, (8, 8, 1))
    with pytest.raises(CnnvizError, match="'conv9'.*conv_a, conv_b"):
        gradcam(model, batch, layer="conv9")
    with pytest.raises(CnnvizError, match="'head'.*4-D layers: conv_a, conv_b"):
        gradcam(model, batch, layer="head")
    with pytest.raises(CnnvizError, match="not a layer of model"):
        gradcam(model, batch, layer=two_conv_functional().get_layer("conv_a"))
    with pytest.raises(CnnvizError, match="target class 3 "):
        gradcam(model, batch, targets=[0, 3])
