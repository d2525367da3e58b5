"""Integrated gradients and gradient x input against known answers and a per-point GradientTape."""

from __future__ import annotations

import numpy as np
import pytest
from _models import assert_unchanged, images, relu_net, snapshot, tanh_convnet

from cnnviz.errors import CnnvizError
from cnnviz.explain import gradient_x_input, integrated_gradients
from cnnviz.explain.baselines import blurred
from cnnviz.explain.integrated_gradients import score_difference


def logit_of(model, batch: np.ndarray, targets) -> np.ndarray:
    """The target's pre-softmax score, rebuilt from the Dense head's kernel and bias."""
    import keras

    head = model.layers[-1]
    penultimate = np.asarray(keras.Model(model.inputs[0], head.input)(batch), np.float64)
    kernel, bias = (np.asarray(w, np.float64) for w in head.get_weights())
    return (penultimate @ kernel + bias)[np.arange(len(batch)), targets]


def tape_gradient(model, x: np.ndarray, target: int) -> np.ndarray:
    import keras
    import tensorflow as tf

    head = model.layers[-1]
    penultimate = keras.Model(model.inputs[0], head.input)
    x = tf.constant(x[None])
    with tf.GradientTape() as tape:
        tape.watch(x)
        logit = (tf.matmul(penultimate(x), head.kernel) + head.bias)[0, target]
    return tape.gradient(logit, x)[0].numpy().astype(np.float64)


def linear_model(weights: np.ndarray, bias: np.ndarray):
    """(4, 4, 2) -> Flatten -> Dense(3, softmax): logit_c = x . weights[c] + bias[c]."""
    import keras

    model = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    model.set_weights([weights.reshape(3, -1).T, bias])
    return model


def test_on_a_linear_model_the_answers_are_known_exactly():
    rng = np.random.default_rng(0)
    weights, bias = rng.normal(size=(3, 4, 4, 2)), rng.normal(size=3)
    model = linear_model(weights, bias)
    batch = images(3, (4, 4, 2), seed=1)
    targets = np.array([0, 2, 1])
    baseline = rng.random((4, 4, 2)).astype(np.float32)
    for steps in (1, 64):  # the gradient is constant: any rule is exact
        result = integrated_gradients(model, batch, targets, baseline=baseline, steps=steps)
        np.testing.assert_allclose(result, (batch - baseline) * weights[targets], atol=1e-5)
    np.testing.assert_allclose(gradient_x_input(model, batch, targets), batch * weights[targets],
                               atol=1e-5)


@pytest.mark.parametrize("baseline", (0.0, 0.5, "image", "blur"))
def test_completeness_within_one_percent_at_64_steps(baseline):
    """On a smooth model. (A ReLU net's gradient jumps at each kink, so the trapezoid error
    depends on how many there are: a few large ones on a 50-unit toy, many tiny ones on a
    trained CNN, which the slow test below checks.)"""
    model = tanh_convnet()
    shape = tuple(model.inputs[0].shape[1:])
    batch = images(6, shape, seed=2)
    if baseline == "image":
        baseline = images(1, shape, seed=3)[0] * 0.5
    predicted = np.asarray(model(batch)).argmax(axis=-1)
    attributions = integrated_gradients(model, batch, baseline=baseline, steps=64)
    assert attributions.shape == batch.shape and attributions.dtype == np.float32
    if isinstance(baseline, str):
        start = blurred(batch)
    else:
        start = np.broadcast_to(np.float32(baseline), batch.shape)
    expected = logit_of(model, batch, predicted) - logit_of(model, start, predicted)
    assert (np.abs(expected) > 0.05).all()  # a non-trivial difference to recover
    total = attributions.sum(axis=(1, 2, 3))
    np.testing.assert_array_less(np.abs(total - expected), 0.01 * np.abs(expected))
    np.testing.assert_allclose(score_difference(model, batch, predicted, baseline=baseline),
                               expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("baseline", (0.0, "blur"))
def test_completeness_within_one_percent_at_64_steps_on_a_trained_relu_cnn(digits_run,
                                                                          baseline):
    from cnnviz.runs.load import load_run

    run = load_run(digits_run)
    batch = run.dataset().x_test[:32]
    predicted = np.asarray(run.model(batch)).argmax(axis=-1)
    attributions = integrated_gradients(run.model, batch, baseline=baseline, steps=64)
    start = blurred(batch) if baseline == "blur" else np.zeros_like(batch)
    expected = logit_of(run.model, batch, predicted) - logit_of(run.model, start, predicted)
    assert (np.abs(expected) > 1.0).all()
    total = attributions.sum(axis=(1, 2, 3))
    np.testing.assert_array_less(np.abs(total - expected), 0.01 * np.abs(expected))


def test_matches_the_trapezoid_rule_on_tape_gradients():
    model = relu_net()
    batch = images(3, (5, 5, 1), seed=4)
    targets = [0, 1, 2]
    steps = 6
    expected = []
    for x, target in zip(batch, targets):
        points = [alpha * x for alpha in np.linspace(0, 1, steps + 1)]
        gradients = np.stack([tape_gradient(model, p, target) for p in points])
        expected.append(x * np.trapezoid(gradients, dx=1 / steps, axis=0))
    result = integrated_gradients(model, batch, targets, steps=steps, batch_size=4)
    np.testing.assert_allclose(result, np.stack(expected), atol=1e-5)


def test_gradient_x_input_is_the_tape_gradient_times_the_input():
    model = tanh_convnet()
    batch = images(3, (6, 6, 2), seed=5)
    targets = [3, 0, 1]
    expected = np.stack([x * tape_gradient(model, x, t) for x, t in zip(batch, targets)])
    np.testing.assert_allclose(gradient_x_input(model, batch, targets), expected, atol=1e-5)


def test_batch_equals_one_at_a_time_and_the_model_is_unchanged():
    model = relu_net()
    batch = images(4, (5, 5, 1), seed=6)
    before = snapshot(model)
    together = integrated_gradients(model, batch, steps=8, batch_size=8)
    alone = np.concatenate([integrated_gradients(model, x, steps=8) for x in batch])
    np.testing.assert_allclose(together, alone, atol=1e-6)
    assert_unchanged(model, before)


@pytest.mark.parametrize(("arguments", "message"), [
    ({"steps": 0}, "steps must be a positive integer; received 0"),
    ({"baseline": "noise"}, "baseline must be a number, an image or 'blur'; received 'noise'"),
    ({"baseline": np.zeros((3, 3, 1))}, r"baseline image has shape \(3, 3, 1\)"),
    ({"targets": 7}, "target class 7 is out of range"),
])
def test_bad_arguments_are_refused(arguments, message):
    with pytest.raises(CnnvizError, match=message):
        integrated_gradients(relu_net(), images(2, (5, 5, 1)), **arguments)
