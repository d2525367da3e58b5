"""Sanity checks (Adebayo et al. 2018) on hand-set models whose maps are known in advance.

The quadrant model reads only the top-left quadrant through a hidden Dense layer whose weights
are zero elsewhere, so its saliency is exactly zero outside the quadrant until that hidden layer
is randomized. An "edge detector" that looks only at the image must be flagged insensitive.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _models import QUADRANT_HALF as HALF
from _models import QUADRANT_SIZE as SIZE
from _models import assert_unchanged, quadrant_reader, snapshot
from matplotlib.figure import Figure
from scipy.stats import spearmanr

from cnnviz.errors import CnnvizError
from cnnviz.plot.trust import sanity_curves_figure, sanity_maps_figure
from cnnviz.trust.sanity import (
    _reinitialize,
    class_sensitivity,
    format_class_sensitivity,
    model_randomization,
    randomization_steps,
    rank_correlation,
    structural_similarity,
)


def images(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, (count, SIZE, SIZE, 1)).astype(np.float32)


def edge_detector(model, batch, targets):
    """Not an explanation: |Sobel gradient| of the image, whatever the model or the class."""
    from scipy.ndimage import sobel

    gray = batch[..., 0]
    return np.hypot(sobel(gray, axis=1), sobel(gray, axis=2)).astype(np.float32)


# ------------------------------------------------------------------------------ similarities
def test_rank_correlation_is_spearman_of_absolute_maps():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 6, 7)), rng.normal(size=(5, 6, 7))
    b[0] = -3 * a[0]  # same magnitudes, opposite sign: identical |map| ranking
    b[1, :3] = 0.0  # ties
    expected = [spearmanr(np.abs(x).ravel(), np.abs(y).ravel())[0] for x, y in zip(a, b)]
    np.testing.assert_allclose(rank_correlation(a, b), expected, atol=1e-12)
    assert rank_correlation(a, b)[0] == pytest.approx(1.0)


def test_constant_maps_give_defined_correlations():
    zero, ramp = np.zeros((1, 4, 4)), np.arange(16.0).reshape(1, 4, 4)
    assert rank_correlation(zero, zero)[0] == 1.0  # both flat: they agree
    assert rank_correlation(ramp, zero)[0] == 0.0  # one flat: no shared ranking
    assert structural_similarity(ramp, ramp)[0] == pytest.approx(1.0)
    assert structural_similarity(ramp, 5 * ramp)[0] == pytest.approx(1.0)  # both scaled to [0, 1]
    assert np.isfinite(structural_similarity(zero, ramp)).all()


# ------------------------------------------------------------------------------ randomization
def test_steps_go_from_the_output_layer_down():
    assert randomization_steps(quadrant_reader()) == ("head", "hidden", "conv")


def test_reinitialization_uses_the_layers_own_initializers_seeded():
    import keras

    layer = keras.layers.Dense(3, name="d")
    layer.build((None, 4))
    layer.set_weights([np.full((4, 3), 7.0), np.full(3, 7.0)])
    _reinitialize(layer, seed=5)
    kernel, bias = layer.get_weights()
    np.testing.assert_array_equal(bias, 0.0)  # Dense's bias_initializer: zeros
    limit = np.sqrt(6 / (4 + 3))  # Glorot uniform
    assert np.abs(kernel).max() <= limit and kernel.std() > 0.1
    _reinitialize(layer, seed=5)
    np.testing.assert_array_equal(layer.get_weights()[0], kernel)  # seeded: reproducible


def test_cascade_keeps_the_quadrant_until_its_layer_is_randomized():
    model = quadrant_reader()
    before = snapshot(model)
    result = model_randomization(
        model, images(6), methods={"saliency": "saliency", "edges": edge_detector}, keep=2
    )
    assert_unchanged(model, before)
    assert result.steps == ("head", "hidden", "conv")
    maps = result.maps["saliency"]  # (steps + 1, kept, H, W)
    assert maps.shape == (4, 2, SIZE, SIZE)
    outside = np.ones((SIZE, SIZE), bool)
    outside[:HALF, :HALF] = False
    # Trained, and after the head alone: the hidden layer still reads the quadrant only.
    assert (maps[0][:, outside] == 0).all() and (maps[1][:, outside] == 0).all()
    # Once the hidden layer is random, the gradient reaches every pixel.
    assert (maps[2][:, outside] > 0).mean() > 0.5
    saliency = result.rank_correlation["saliency"]
    assert saliency[-1] < 0.3  # trained: 1.0
    assert not result.insensitive["saliency"]


def test_an_edge_detector_is_flagged_insensitive():
    result = model_randomization(
        quadrant_reader(), images(4), methods={"saliency": "saliency", "edges": edge_detector}
    )
    np.testing.assert_allclose(result.rank_correlation["edges"], 1.0)
    np.testing.assert_allclose(result.ssim["edges"], 1.0)
    assert result.insensitive == {"saliency": False, "edges": True}
    table = result.format_table()
    assert "edges" in table and "INSENSITIVE" in table
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["methods"]["edges"]["insensitive"] is True
    assert payload["steps"] == ["head", "hidden", "conv"]


def test_every_step_is_judged_and_the_layers_a_map_ignores_are_named():
    """Saliency of the quadrant model is still the quadrant once the head is random (the hidden
    layer alone decides where the gradient goes): insensitive to the head, not to the rest."""
    model = quadrant_reader()
    result = model_randomization(
        model, images(6), methods={"saliency": "saliency", "edges": edge_detector}
    )
    # By construction: the edge map never changes; saliency stays inside the quadrant until the
    # hidden layer is random, then reaches every pixel.
    assert result.similar["saliency"].tolist() == [True, False, False]
    assert result.similar["edges"].tolist() == [True, True, True]
    saliency = result.rank_correlation["saliency"]
    assert saliency[0] > 0.9 and saliency[1] < 0.1
    assert result.insensitive_to == {"saliency": ("head",), "edges": ("head", "hidden", "conv")}
    assert result.insensitive == {"saliency": False, "edges": True}  # the final verdict, kept
    table = result.format_table()
    saliency_row = next(line for line in table.splitlines() if line.startswith("saliency"))
    assert saliency_row.endswith("INSENSITIVE to head") and "0.97/" in saliency_row
    assert ("INSENSITIVE to head, hidden, conv (rank correlation > 0.5 with every layer random)"
            in table)
    payload = json.loads(json.dumps(result.to_dict()))["methods"]
    assert payload["saliency"]["insensitive_to"] == ["head"]
    assert payload["saliency"]["similar_per_step"] == [True, False, False]
    assert payload["edges"]["insensitive"] is True


def test_targets_stay_those_of_the_trained_model():
    model = quadrant_reader(((0, 0), (1, 1)))
    batch = images(5)
    predicted = np.asarray(model(batch)).argmax(axis=-1)
    result = model_randomization(model, batch, methods=("saliency",))
    np.testing.assert_array_equal(result.targets, predicted)
    given = model_randomization(model, batch, 1, methods=("saliency",))
    np.testing.assert_array_equal(given.targets, 1)


def test_every_registry_method_runs_under_randomization():
    result = model_randomization(quadrant_reader(), images(2), keep=1)
    for method in result.methods:
        values = result.rank_correlation[method]
        assert values.shape == (3,) and np.isfinite(values).all()
        assert result.ssim_per_image[method].shape == (3, 2)


def test_bad_arguments_are_refused():
    with pytest.raises(CnnvizError, match="unknown attribution method 'lrp'"):
        model_randomization(quadrant_reader(), images(1), methods=("lrp",))
    with pytest.raises(CnnvizError, match="threshold must be in"):
        model_randomization(quadrant_reader(), images(1), threshold=2.0)


# ------------------------------------------------------------------------- class sensitivity
def test_maps_change_with_the_class_when_classes_read_different_quadrants():
    model = quadrant_reader(((0, 0), (1, 1)))  # class 0: top-left, class 1: bottom-right
    report = class_sensitivity(
        model, images(4), methods={"saliency": "saliency", "guided": "guided",
                                   "edges": edge_detector}
    )
    for method in ("saliency", "guided"):
        assert report["methods"][method]["rank_correlation"] < 0.0
        assert report["methods"][method]["class_insensitive"] is False
    assert report["methods"]["edges"]["rank_correlation"] == pytest.approx(1.0)
    assert report["methods"]["edges"]["class_insensitive"] is True
    assert "CLASS-INSENSITIVE" in format_class_sensitivity(report)
    json.dumps(report)


# ---------------------------------------------------------------------------------- figures
def test_figures():
    result = model_randomization(
        quadrant_reader(), images(3), methods={"saliency": "saliency", "edges": edge_detector},
        keep=2,
    )
    grid = sanity_maps_figure(result, image_index=1)
    assert isinstance(grid, Figure)
    assert len(grid.axes) == 2 * (2 + 3)  # methods x (input, trained, 3 steps)
    assert grid.axes[0].get_ylabel() == "saliency\ninsensitive to\nhead"
    assert grid.axes[5].get_ylabel() == "edges\ninsensitive to\nhead, hidden, conv"
    framed = [[ax.spines["top"].get_visible() for ax in grid.axes[row * 5 + 2: row * 5 + 5]]
              for row in range(2)]
    assert framed == [[True, False, False], [True, True, True]]  # the similar steps
    curves = sanity_curves_figure(result)
    assert isinstance(curves, Figure) and len(curves.axes) == 2
    with pytest.raises(CnnvizError, match="image_index 2 is out of range"):
        sanity_maps_figure(result, image_index=2)
