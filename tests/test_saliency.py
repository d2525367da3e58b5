"""Saliency maps checked against finite differences, hand-set weights and a numpy backward pass."""

from __future__ import annotations

import numpy as np
import pytest
from _models import (
    assert_unchanged,
    cam_net,
    images,
    relu_net,
    sequential_without_input,
    snapshot,
    tanh_convnet,
    two_conv_functional,
)

from cnnviz.errors import CnnvizError
from cnnviz.explain.gradients import gradient_maps
from cnnviz.explain.saliency import _smoothgrad, input_gradients, saliency

METHODS = ("vanilla", "guided", "rectified", "smoothgrad")


def finite_difference_scores(model64, batch: np.ndarray, targets, step: float = 1e-5):
    """Central differences, in float64, of each image's target score (linear-head twin model).

    A single output unit z scores z for class 1 and -z for class 0.
    """
    count, height, width, channels = batch.shape
    size = height * width * channels
    result = np.zeros(batch.shape, np.float64)
    for n in range(count):
        bumps = np.eye(size).reshape(size, height, width, channels) * step
        x = batch[n].astype(np.float64)
        outputs = np.asarray(model64(np.concatenate([x + bumps, x - bumps])))
        if outputs.shape[-1] == 1:
            scores = outputs[:, 0] * (1.0 if targets[n] == 1 else -1.0)
        else:
            scores = outputs[:, targets[n]]
        result[n] = ((scores[:size] - scores[size:]) / (2 * step)).reshape(x.shape)
    return result


def float64_twin(model, **kwargs):
    """The same tanh net in float64 with a linear head, holding `model`'s weights."""
    twin = tanh_convnet(last="linear", dtype="float64", **kwargs)
    twin.set_weights([w.astype(np.float64) for w in model.get_weights()])
    return twin


def test_vanilla_matches_central_finite_differences():
    model = tanh_convnet()
    batch = images(3, (6, 6, 2), seed=1)
    targets = np.array([0, 3, 1])
    expected = finite_difference_scores(float64_twin(model), batch, targets)

    gradients = input_gradients(model, batch, targets)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(gradients, expected, rtol=1e-3, atol=1e-4 * scale)
    np.testing.assert_allclose(
        saliency(model, batch, targets), np.abs(expected).max(axis=-1), rtol=1e-3, atol=1e-4 * scale
    )


def test_sigmoid_scores_class_one_up_and_class_zero_down():
    model = tanh_convnet(classes=1, last="sigmoid")
    batch = images(2, (6, 6, 2), seed=2)
    twin = float64_twin(model, classes=1)
    for target in (0, 1):
        expected = finite_difference_scores(twin, batch, [target, target])
        gradients = input_gradients(model, batch, target)
        np.testing.assert_allclose(
            gradients, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max()
        )
    np.testing.assert_allclose(input_gradients(model, batch, 0), -input_gradients(model, batch, 1))


def dense_only(weights: np.ndarray, bias: np.ndarray):
    import keras

    model = keras.Sequential(
        [
            keras.Input((2, 2, 2)),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.set_weights([weights, bias])
    return model


def test_single_dense_layer_saliency_is_the_absolute_weight_column():
    weights = (np.arange(24, dtype=np.float32).reshape(8, 3) - 11.5) * 0.25
    bias = np.array([0.5, -1.0, 0.25], np.float32)
    model = dense_only(weights, bias)
    batch = images(4, (2, 2, 2), seed=3)
    for target in range(3):
        expected = np.abs(weights[:, target]).reshape(2, 2, 2).max(axis=-1)
        np.testing.assert_array_equal(saliency(model, batch, target), np.stack([expected] * 4))
        np.testing.assert_array_equal(
            input_gradients(model, batch, target)[0], weights[:, target].reshape(2, 2, 2)
        )
    predicted = (batch.reshape(4, 8) @ weights + bias).argmax(axis=1)
    np.testing.assert_array_equal(saliency(model, batch), saliency(model, batch, predicted))


def test_new_weights_are_used_on_the_next_call():
    weights = np.linspace(-1, 1, 24, dtype=np.float32).reshape(8, 3)
    model = dense_only(weights, np.zeros(3, np.float32))
    batch = images(2, (2, 2, 2))
    saliency(model, batch, 0)
    model.set_weights([3 * weights[::-1].copy(), np.zeros(3, np.float32)])
    expected = np.abs(3 * weights[::-1, 0]).reshape(2, 2, 2).max(axis=-1)
    np.testing.assert_array_equal(saliency(model, batch, 0)[1], expected)


def numpy_backward(model, x: np.ndarray, target: int, rule: str) -> np.ndarray:
    """d logit[target] / d x for `relu_net`, by hand, with the ReLU backward `rule`."""
    kernel, b1, w2, b2, w3, _ = model.get_weights()
    k = kernel.shape[0]
    out = x.shape[0] - k + 1
    pre1 = np.zeros((out, out, kernel.shape[-1]))
    for i in range(out):
        for j in range(out):
            pre1[i, j] = np.tensordot(x[i : i + k, j : j + k], kernel, axes=3) + b1
    pre2 = np.maximum(pre1, 0).reshape(-1) @ w2 + b2

    def through_relu(upstream, pre):
        if rule == "vanilla":
            return upstream * (pre > 0)
        if rule == "guided":
            return upstream * (pre > 0) * (upstream > 0)
        return upstream * (upstream > 0)  # rectified: the forward sign is ignored

    g_pre2 = through_relu(w3[:, target], pre2)
    g_pre1 = through_relu((w2 @ g_pre2).reshape(pre1.shape), pre1)
    g_x = np.zeros(x.shape)
    for i in range(out):
        for j in range(out):
            g_x[i : i + k, j : j + k] += np.tensordot(kernel, g_pre1[i, j], axes=([3], [0]))
    return g_x


@pytest.mark.parametrize("relu_layers", (False, True), ids=("activation_args", "relu_layers"))
def test_guided_and_rectified_match_a_numpy_backward_pass(relu_layers):
    model = relu_net(relu_layers=relu_layers)
    batch = images(3, (5, 5, 1), seed=4)
    targets = [0, 1, 2]
    maps = {}
    for rule in ("vanilla", "guided", "rectified"):
        expected = np.stack([numpy_backward(model, x, t, rule) for x, t in zip(batch, targets)])
        np.testing.assert_allclose(
            input_gradients(model, batch, targets, method=rule), expected, rtol=1e-5, atol=1e-6
        )
        maps[rule] = saliency(model, batch, targets, method=rule)
        np.testing.assert_allclose(maps[rule], np.abs(expected)[..., 0], rtol=1e-5, atol=1e-6)
    # The three rules must actually disagree on this net, or the test proves nothing.
    assert not np.allclose(maps["guided"], maps["vanilla"])
    assert not np.allclose(maps["guided"], maps["rectified"])


def test_smoothgrad_with_almost_no_noise_is_vanilla():
    model = tanh_convnet()
    batch = images(3, (6, 6, 2), seed=5)
    np.testing.assert_allclose(
        saliency(model, batch, method="smoothgrad", noise=1e-6, samples=4),
        saliency(model, batch),
        rtol=1e-4,
        atol=1e-6,
    )


def test_smoothgrad_is_reproducible_per_seed_and_independent_of_batch_size():
    model = tanh_convnet()
    batch = images(5, (6, 6, 2), seed=6)
    first = saliency(model, batch, method="smoothgrad", samples=6, seed=1)
    np.testing.assert_array_equal(
        first, saliency(model, batch, method="smoothgrad", samples=6, seed=1)
    )
    other = saliency(model, batch, method="smoothgrad", samples=6, seed=2)
    assert not np.allclose(first, other, rtol=1e-3)
    chunked = saliency(model, batch, method="smoothgrad", samples=6, seed=1, batch_size=4)
    np.testing.assert_allclose(first, chunked, rtol=1e-5, atol=1e-7)
    single = saliency(model, batch[:1], method="smoothgrad", samples=6, seed=1)
    np.testing.assert_allclose(first[:1], single, rtol=1e-5, atol=1e-7)


def test_smoothgrad_noise_has_std_noise_times_each_images_range():
    # A "map" that returns the noisy pixels and their squares: the mean over samples gives
    # each pixel's noise variance as E[x^2] - E[x]^2.
    batch = np.stack([np.full((2, 2, 1), v, np.float32) for v in (0.0, 1.0, 2.0)])
    batch[:, 0, 0, 0] += np.array([1.0, 2.0, 4.0], np.float32)  # ranges 1, 2, 4
    targets = np.array([0, 1, 2], np.int32)
    seen = []

    def moments(noisy, repeated):
        seen.append(repeated)
        return np.concatenate([noisy, noisy**2], axis=-1).astype(np.float64), repeated

    means = _smoothgrad(moments, batch, targets, samples=4000, noise=0.1, seed=0, batch_size=128)
    variance = (means[..., 1] - means[..., 0] ** 2).mean(axis=(1, 2))
    np.testing.assert_allclose(variance, (0.1 * np.array([1.0, 2.0, 4.0])) ** 2, rtol=0.05)
    # Every noisy copy is explained for its own image's target.
    np.testing.assert_array_equal(np.concatenate(seen), np.repeat(targets, 4000))


def test_smoothgrad_wraps_guided_backprop_too():
    model = relu_net()
    batch = images(3, (5, 5, 1), seed=10)
    targets = np.array([0, 1, 2], np.int32)
    smoothed = _smoothgrad(
        lambda noisy, wanted: gradient_maps(model, noisy, wanted, "guided", 64),
        batch,
        targets,
        samples=3,
        noise=1e-7,
        seed=0,
        batch_size=64,
    )
    np.testing.assert_allclose(
        smoothed, saliency(model, batch, targets, method="guided"), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("method", ("vanilla", "guided", "rectified"))
def test_batch_equals_one_at_a_time(method):
    model = relu_net()
    batch = images(5, (5, 5, 1), seed=7)
    together = saliency(model, batch, method=method, batch_size=4)  # 2 chunks, last one padded
    alone = np.concatenate([saliency(model, x, method=method) for x in batch])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-7)


MODELS = {
    "sigmoid": (lambda: cam_net(units=1, last="sigmoid"), (8, 8, 1)),
    "rgb": (lambda: cam_net(channels=3), (8, 8, 3)),
    "functional": (two_conv_functional, (8, 8, 1)),
    "sequential_without_input": (sequential_without_input, (8, 8, 1)),
}


@pytest.mark.parametrize("kind", MODELS)
def test_every_method_runs_on_every_kind_of_model(kind):
    build, shape = MODELS[kind]
    model = build()
    batch = images(3, shape, seed=8)
    for method in METHODS:
        maps = saliency(model, batch, method=method, samples=3)
        assert maps.shape == (3, 8, 8) and maps.dtype == np.float32
        assert np.isfinite(maps).all() and (maps >= 0).all()
    assert input_gradients(model, batch, method="guided").shape == (3, *shape)


def test_the_users_model_is_unchanged():
    model = relu_net()
    batch = images(3, (5, 5, 1), seed=9)
    before = snapshot(model)
    outputs = np.asarray(model(batch))
    for method in METHODS:
        saliency(model, batch, method=method, samples=2)
    input_gradients(model, batch, method="rectified")
    assert_unchanged(model, before)
    np.testing.assert_array_equal(np.asarray(model(batch)), outputs)
    np.testing.assert_allclose(outputs.sum(axis=1), 1.0, rtol=1e-5)  # still ends in softmax


def test_bad_inputs_raise_cnnviz_error_quoting_the_value():
    model = relu_net()
    batch = images(2, (5, 5, 1))
    with pytest.raises(CnnvizError, match="'bogus'.*vanilla, guided, rectified, smoothgrad"):
        saliency(model, batch, method="bogus")
    with pytest.raises(CnnvizError, match="'smoothgrad'"):
        input_gradients(model, batch, method="smoothgrad")
    with pytest.raises(CnnvizError, match="target class 7 .*0..2"):
        saliency(model, batch, targets=7)
    with pytest.raises(CnnvizError, match=r"\(6, 6, 1\)"):
        saliency(model, images(2, (6, 6, 1)))
    with pytest.raises(CnnvizError, match="batch_size"):
        saliency(model, batch, batch_size=0)
    with pytest.raises(CnnvizError, match="targets has 3 entries for 2 images"):
        saliency(model, batch, targets=[0, 1, 2])
    with pytest.raises(CnnvizError, match="empty batch"):
        saliency(model, batch[:0])


def test_an_unbuilt_model_is_refused():
    import keras

    model = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")])
    with pytest.raises(CnnvizError, match="not been built"):
        saliency(model, images(1, (2, 2, 1)))
