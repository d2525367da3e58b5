"""Attribution registry and deletion/insertion, checked on models whose explanation is known.

The quadrant model reads only the top-left quadrant of a 12x12 image (hand-set Dense weights are
zero elsewhere), so the true importance of every other pixel is exactly 0.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _models import assert_unchanged, snapshot
from matplotlib.figure import Figure

from cnnviz.errors import CnnvizError
from cnnviz.explain.registry import METHODS, attribute, occlusion_window, resolve_methods
from cnnviz.plot.trust import faithfulness_figure
from cnnviz.trust.faithfulness import baseline_images, deletion_insertion, pixel_ranks

SIZE, HALF = 12, 6


def quadrant_weights(seed: int = 0) -> np.ndarray:
    """Positive weight per top-left pixel, 0 elsewhere: (SIZE, SIZE)."""
    weights = np.zeros((SIZE, SIZE))
    weights[:HALF, :HALF] = np.random.default_rng(seed).uniform(0.5, 1.5, (HALF, HALF))
    return weights


def quadrant_model(weights: np.ndarray, threshold: float = 9.0):
    """(12, 12, 1) -> Conv2D 1x1 [relu(x), relu(-x)] -> Flatten -> Dense(1, relu) -> Dense(2).

    hidden = relu(sum_p w_p relu(x_p)); logits = [0, hidden - threshold]: class 1 ("bright
    quadrant") gets likelier with every top-left pixel and does not see any other pixel.
    """
    import keras

    model = keras.Sequential([
        keras.Input((SIZE, SIZE, 1)),
        keras.layers.Conv2D(2, 1, activation="relu", name="conv"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(1, activation="relu", name="hidden"),
        keras.layers.Dense(2, activation="softmax", name="head"),
    ])
    hidden = np.zeros((SIZE * SIZE * 2, 1))
    hidden[0::2, 0] = weights.ravel()  # Flatten order: (row, col, channel); channel 0 = relu(x)
    model.set_weights([
        np.array([[[[1.0, -1.0]]]]), np.zeros(2),
        hidden, np.zeros(1),
        np.array([[0.0, 1.0]]), np.array([0.0, -threshold]),
    ])
    return model


def bright_images(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.3, 1.0, (count, SIZE, SIZE, 1)).astype(np.float32)


def in_quadrant(maps: np.ndarray) -> np.ndarray:
    """Share of each map's positive mass inside the top-left quadrant."""
    positive = np.maximum(maps, 0.0)
    return positive[:, :HALF, :HALF].sum(axis=(1, 2)) / positive.sum(axis=(1, 2))


# ------------------------------------------------------------------------------ registry
@pytest.mark.parametrize("method", ["saliency", "guided", "rectified", "smoothgrad",
                                    "gradient_x_input", "integrated_gradients"])
def test_gradient_maps_put_all_mass_in_the_read_quadrant(method):
    model = quadrant_model(quadrant_weights())
    maps = attribute(model, bright_images(4), 1, method=method)
    assert maps.shape == (4, SIZE, SIZE) and maps.dtype == np.float32
    assert (maps >= 0).all()
    np.testing.assert_array_equal(maps[:, HALF:, :], 0.0)
    np.testing.assert_array_equal(maps[:, :, HALF:], 0.0)
    np.testing.assert_allclose(in_quadrant(maps), 1.0, rtol=1e-6)


def test_vanilla_saliency_equals_the_hand_computed_gradient():
    # d logit_1 / d x_p = w_p for a positive pixel while the hidden unit is active.
    weights = quadrant_weights()
    maps = attribute(quadrant_model(weights), bright_images(3), 1, method="saliency")
    np.testing.assert_allclose(maps, np.broadcast_to(weights, maps.shape), rtol=1e-6)


def test_occlusion_is_the_probability_drop_and_stays_near_the_quadrant():
    # Threshold near the typical evidence: probabilities away from 0 and 1 so drops show.
    model = quadrant_model(quadrant_weights(), threshold=23.0)
    maps = attribute(model, bright_images(3), 1, method="occlusion")
    assert occlusion_window(SIZE, SIZE) == (2, 1)
    # A 2x2 patch with stride 1 straddles the quadrant's edge by one pixel at most.
    assert (in_quadrant(maps) > 0.8).all()
    np.testing.assert_allclose(maps[:, HALF + 1 :, :], 0.0, atol=1e-6)
    np.testing.assert_allclose(maps[:, :, HALF + 1 :], 0.0, atol=1e-6)


def test_every_registry_method_returns_float32_maps_and_leaves_the_model_alone():
    model = quadrant_model(quadrant_weights())
    before = snapshot(model)
    for method in METHODS:
        maps = attribute(model, bright_images(2), method=method)
        assert maps.shape == (2, SIZE, SIZE) and maps.dtype == np.float32
        assert np.isfinite(maps).all()
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        (("saliency", "lime"), "unknown attribution method 'lime'; choose from saliency"),
        ((), "methods is empty"),
        (("gradcam", "gradcam"), "listed twice"),
        (("random",), "'random' is the reference order"),
    ],
)
def test_bad_method_lists_are_refused(methods, message):
    with pytest.raises(CnnvizError, match=message):
        resolve_methods(methods)


# ---------------------------------------------------------------------------- faithfulness
def linear_model(vectors: np.ndarray, bias: np.ndarray):
    """(8, 8, 1) -> Flatten -> Dense(2, softmax) with logits = x . vectors[k] + bias[k]."""
    import keras

    model = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")
    ])
    model.set_weights([vectors.T, bias])
    return model


def reference_curves(vectors, bias, images, blank, maps, targets, steps):
    """The obvious loop: per image, per step, remove / restore the top pixels, numpy softmax."""
    pixels = images[0].size
    curves = np.zeros((2, len(images), steps + 1))
    for i, (image, empty, weight) in enumerate(zip(images, blank, maps)):
        order = np.argsort(-weight.ravel(), kind="stable")  # maps have distinct values
        for s in range(steps + 1):
            top = np.zeros(pixels, bool)
            top[order[: round(s / steps * pixels)]] = True
            for curve, (kept, other) in enumerate(((empty, image), (image, empty))):
                x = np.where(top, kept.ravel(), other.ravel())
                logits = vectors @ x + bias
                p = np.exp(logits - logits.max())
                curves[curve, i, s] = (p / p.sum())[targets[i]]
    return curves


def test_curves_and_areas_match_a_per_image_loop():
    rng = np.random.default_rng(3)
    vectors, bias = rng.normal(0, 0.5, (2, 64)), np.array([0.2, -0.1])
    images = rng.random((3, 8, 8, 1)).astype(np.float32)
    maps = {"a": rng.random((3, 8, 8)), "b": rng.normal(size=(3, 8, 8))}
    targets = np.array([0, 1, 1])
    result = deletion_insertion(
        linear_model(vectors, bias), images, targets,
        methods={name: (lambda m, x, t, v=v: v) for name, v in maps.items()},
        steps=5, baseline="mean", batch_size=16,  # several chunks and a padded last one
    )
    blank = baseline_images(images, "mean")
    fractions = np.round(np.linspace(0, 1, 6) * 64) / 64
    np.testing.assert_allclose(result.fractions, fractions)
    for name, values in maps.items():
        expected = reference_curves(vectors, bias, images, blank, values, targets, 5)
        np.testing.assert_allclose(result.deletion[name], expected[0].mean(axis=0), atol=1e-5)
        np.testing.assert_allclose(result.insertion[name], expected[1].mean(axis=0), atol=1e-5)
        np.testing.assert_allclose(
            result.deletion_auc_per_image[name], np.trapezoid(expected[0], fractions), atol=1e-5
        )
        np.testing.assert_allclose(
            result.insertion_auc_per_image[name], np.trapezoid(expected[1], fractions), atol=1e-5
        )
    assert result.methods == ("a", "b", "random")
    np.testing.assert_array_equal(result.targets, targets)


def test_true_order_beats_random_and_the_inverted_order_is_called_out():
    weights = quadrant_weights()
    model = quadrant_model(weights)
    images = bright_images(6)
    truth = weights[None] * images[..., 0]  # each pixel's contribution to the hidden unit
    before = snapshot(model)
    result = deletion_insertion(
        model, images, 1,
        methods={"truth": lambda m, x, t: truth, "inverted": lambda m, x, t: -truth,
                 "saliency": "saliency"},
        steps=12, baseline="zero", seed=0,
    )
    assert_unchanged(model, before)
    random_deletion, random_insertion = (result.deletion_auc["random"],
                                         result.insertion_auc["random"])
    for good in ("truth", "saliency"):
        assert result.deletion_auc[good] < random_deletion - 0.1
        assert result.insertion_auc[good] > random_insertion + 0.1
        assert result.no_better_than_random[good] == []
    # The quadrant is 1/4 of the image: deleting it first empties the evidence by fraction 0.25.
    assert result.deletion["truth"][3] < 0.01 < result.deletion["truth"][0] - 0.9
    assert result.deletion_auc["inverted"] > random_deletion
    assert result.insertion_auc["inverted"] < random_insertion
    assert result.no_better_than_random["inverted"] == ["deletion", "insertion"]
    assert result.called_out == ["inverted"]
    table = result.format_table()
    assert "inverted" in table and "NO BETTER THAN RANDOM on deletion and insertion" in table
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["called_out"] == ["inverted"]
    assert set(payload["methods"]) == {"truth", "inverted", "saliency", "random"}


def test_ties_are_broken_at_random_not_in_raster_order():
    # An all-zero map must rank like the random order: not the top rows first.
    ranks = pixel_ranks(np.zeros((200, 4, 4)), np.random.default_rng(0))
    assert sorted(ranks[0]) == list(range(16))
    top_row_first = (ranks[:, :4] < 4).mean()
    assert 0.15 < top_row_first < 0.35  # 4/16 = 0.25 under a random order
    ranked = pixel_ranks(np.arange(16.0).reshape(1, 4, 4), np.random.default_rng(0))
    np.testing.assert_array_equal(ranked[0], np.arange(16)[::-1])


def test_baselines():
    images = np.random.default_rng(0).random((2, 10, 10, 3)).astype(np.float32)
    np.testing.assert_array_equal(baseline_images(images, "zero"), 0.0)
    mean = baseline_images(images, "mean")
    np.testing.assert_allclose(mean[:, 3, 4], images.mean(axis=(1, 2)), rtol=1e-6)
    blurred = baseline_images(images, "blur")
    assert blurred.shape == images.shape and blurred.std() < images.std() / 2
    with pytest.raises(CnnvizError, match="unknown baseline 'noise'; choose one of blur, zero"):
        baseline_images(images, "noise")
    with pytest.raises(CnnvizError, match="steps must be a positive integer; received 0"):
        deletion_insertion(quadrant_model(quadrant_weights()), bright_images(1), steps=0)


def test_figure_has_a_deletion_and_an_insertion_panel():
    result = deletion_insertion(
        quadrant_model(quadrant_weights()), bright_images(2), 1, methods=("saliency",), steps=4
    )
    figure = faithfulness_figure(result)
    assert isinstance(figure, Figure)
    deletion, insertion = figure.axes
    assert deletion.get_title() == "Deletion" and insertion.get_title() == "Insertion"
    assert len(deletion.get_lines()) == 2  # saliency + random
