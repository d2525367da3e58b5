"""BatchNormalization folded into the convolution before it (cnnviz.model.folding): which pairs
fold, that the folded copy computes the model's logits and input gradients, and that it reads
the user's variables (a change to the model shows in the copy)."""

from __future__ import annotations

import keras
import numpy as np
from _models import images

from cnnviz import backend
from cnnviz.explain import integrated_gradients, saliency
from cnnviz.explain.gradients import gradient_body
from cnnviz.model.compiled import model_copy, run_batched
from cnnviz.model.folding import batch_norm_folds


def _with_statistics(norm, seed):
    """Moving statistics and an affine part far from the identity, so a wrong fold shows."""
    generator = np.random.default_rng(seed)
    channels = norm.moving_mean.shape[0]
    if norm.scale:
        norm.gamma.assign(generator.uniform(0.5, 2.0, channels).astype("float32"))
    if norm.center:
        norm.beta.assign(generator.normal(0, 0.5, channels).astype("float32"))
    norm.moving_mean.assign(generator.normal(0, 0.5, channels).astype("float32"))
    norm.moving_variance.assign(generator.uniform(0.2, 3.0, channels).astype("float32"))


def _model():
    """Pairs that fold (a, b, inner/c) and three that must not: a conv whose output is also
    used elsewhere (d), a conv with its own ReLU before the norm (e), a depthwise conv (f)."""
    keras.utils.set_random_seed(5)
    inner_input = keras.Input((8, 8, 6))
    inner = keras.layers.Conv2D(6, 3, padding="same", name="c")(inner_input)
    inner = keras.layers.BatchNormalization(name="c_bn")(inner)
    backbone = keras.Model(inner_input, keras.layers.ReLU(name="c_relu")(inner), name="backbone")

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    x = keras.layers.BatchNormalization(name="a_bn")(x)
    x = keras.layers.ReLU(name="a_relu")(x)
    x = keras.layers.Conv2D(6, 3, padding="same", use_bias=False, name="b")(x)
    x = keras.layers.BatchNormalization(center=False, scale=False, name="b_bn")(x)
    x = backbone(keras.layers.ReLU(name="b_relu")(x))
    d = keras.layers.Conv2D(6, 1, name="d")(x)
    x = keras.layers.Add(name="d_add")([keras.layers.BatchNormalization(name="d_bn")(d), d])
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="e")(x)
    x = keras.layers.BatchNormalization(name="e_bn")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="f")(x)
    x = keras.layers.BatchNormalization(name="f_bn")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(5, activation="softmax", name="head")(x)
    model = keras.Model(inputs, outputs, name="folds")
    for seed, layer in enumerate(layer for layer in model.layers + backbone.layers
                                 if isinstance(layer, keras.layers.BatchNormalization)):
        _with_statistics(layer, seed)
    return model


def test_only_a_conv_whose_one_use_is_the_norm_folds():
    folds = batch_norm_folds(_model())
    assert {conv: norm for conv, (norm, _) in folds.items()} == {
        "a": "a_bn", "b": "b_bn", "backbone/c": "backbone/c_bn"}


def test_the_folded_copy_computes_the_logits_and_their_input_gradients():
    model = _model()
    batch = images(6, (8, 8, 3), seed=1)
    plain, folded = model_copy(model, "logits"), model_copy(model, "logits", folded=True)
    assert len(folded.model.layers) == len(plain.model.layers) - 3  # three norms passed through
    np.testing.assert_allclose(np.asarray(folded.model(batch)), np.asarray(plain.model(batch)),
                               rtol=1e-5, atol=1e-5)
    targets = np.array([0, 1, 2, 3, 4, 0], np.int32)

    def gradients(copy):
        (values, _) = run_batched(copy, "gradients", gradient_body, len(batch),
                                  lambda start, stop: [batch[start:stop], targets[start:stop]], 6)
        return values

    expected = gradients(plain)
    np.testing.assert_allclose(gradients(folded), expected,
                               atol=1e-5 * np.abs(expected).max())


def test_saliency_and_integrated_gradients_match_the_unfolded_model():
    model = _model()
    batch = images(4, (8, 8, 3), seed=2)
    # The same model with the three foldable norms' statistics in the conv weights by hand
    # (numpy) and the norms made identities: an independent fold to compare with.
    by_hand = keras.models.clone_model(model)
    by_hand.set_weights(model.get_weights())
    for conv_name, norm_name in (("a", "a_bn"), ("b", "b_bn")):
        conv, norm = by_hand.get_layer(conv_name), by_hand.get_layer(norm_name)
        _fold_by_hand(conv, norm)
    inner = by_hand.get_layer("backbone")
    _fold_by_hand(inner.get_layer("c"), inner.get_layer("c_bn"))
    np.testing.assert_allclose(np.asarray(by_hand(batch)), np.asarray(model(batch)),
                               rtol=1e-5, atol=1e-6)
    for method in ("vanilla", "guided", "rectified"):
        np.testing.assert_allclose(saliency(model, batch, method=method),
                                   saliency(by_hand, batch, method=method), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(integrated_gradients(model, batch, steps=8),
                               integrated_gradients(by_hand, batch, steps=8),
                               rtol=1e-4, atol=1e-6)


def _fold_by_hand(conv, norm):
    """conv's kernel scaled and its bias shifted in numpy; norm left as an identity (or, for a
    conv without a bias, as the shift alone: x - mean with unit variance)."""
    kernel, *bias = conv.get_weights()
    mean = np.asarray(norm.moving_mean)
    scale = 1 / np.sqrt(np.asarray(norm.moving_variance) + norm.epsilon)
    if norm.scale:
        scale = scale * np.asarray(norm.gamma)
        norm.gamma.assign(np.ones_like(mean))
    shift = ((bias[0] if bias else 0.0) - mean) * scale
    if norm.center:
        shift = shift + np.asarray(norm.beta)
        norm.beta.assign(np.zeros_like(mean))
    conv.set_weights([kernel * scale, shift] if bias else [kernel * scale])
    norm.moving_mean.assign(np.zeros_like(mean) if bias else -shift)
    norm.moving_variance.assign(np.full_like(mean, 1 - norm.epsilon))


def test_the_folded_copy_reads_the_models_variables():
    model = _model()
    batch = images(3, (8, 8, 3), seed=3)
    folded = model_copy(model, "logits", folded=True).model
    before = np.asarray(folded(batch))
    _with_statistics(model.get_layer("a_bn"), 99)  # in place, as a training step would
    model.get_layer("a").kernel.assign(np.asarray(model.get_layer("a").kernel) * 1.5)
    after = np.asarray(folded(batch))
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_allclose(after, np.asarray(model_copy(model, "logits").model(batch)),
                               rtol=1e-5, atol=1e-5)
    compiled = backend.compile(lambda x: (folded(x, training=False),), folded.variables)
    np.testing.assert_allclose(np.asarray(compiled(batch)[0]), after, rtol=1e-5, atol=1e-6)
