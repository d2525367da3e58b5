"""Shortcut report on shapes with a corner mark: a model that reads only the mark must be caught.

The corner reader is hand-set: a 1x1 conv fires only on pixels brighter than 0.95 (only the mark
reaches 1.0), and class k's logit sums the firing pixels at corner k. It is 100% right on
training images and guesses one class on test images (no mark), and every gradient of it lies
on the mark. The centre reader looks only at the middle of the image, far from every mark.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _models import assert_unchanged, snapshot
from matplotlib.figure import Figure

from cnnviz.config.loading import validate
from cnnviz.data import load_dataset
from cnnviz.data.shapes import mark_origins, mark_size
from cnnviz.errors import CnnvizError
from cnnviz.plot.trust import shortcut_figure
from cnnviz.trust.shortcut import shortcut_report

SIZE = 24


def shapes_dataset(spurious: str | None = "corner_mark", count: int = 240):
    config = validate({
        "seed": 3,
        "data": {"source": "shapes", "image_size": [SIZE, SIZE], "validation_split": 0.1,
                 "shapes": {"count": count, "spurious": spurious}},
        "model": {"layers": [{"type": "flatten"}]},
    })
    return load_dataset(config)


def reader(pixel_weights: np.ndarray, *, bias: float):
    """(24, 24, 3) 8-bit pixels -> Rescaling(1/255) -> Conv2D 1x1 (mean of channels + bias,
    relu) -> Flatten -> Dense(3, softmax). The data set is in 8-bit units (DECISIONS D1)."""
    import keras

    model = keras.Sequential([
        keras.Input((SIZE, SIZE, 3)),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(1, 1, activation="relu", name="detect"),
        keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax", name="head"),
    ])
    model.set_weights([
        np.full((1, 1, 3, 1), 1 / 3), np.array([bias]),
        pixel_weights.reshape(SIZE * SIZE, 3), np.zeros(3),
    ])
    return model


def corner_reader():
    weights = np.zeros((SIZE, SIZE, 3))
    side = mark_size(SIZE)
    for k, (top, left) in enumerate(mark_origins(SIZE)[:3]):
        weights[top : top + side, left : left + side, k] = 100.0
    return reader(weights, bias=-0.95)  # only the mark (1.0) beats 0.95: shapes stay <= 0.9


def centre_reader():
    weights = np.zeros((SIZE, SIZE, 3))
    weights[8:16, 8:16] = np.random.default_rng(0).normal(0, 1, (8, 8, 3))
    return reader(weights, bias=0.0)


def test_a_model_reading_the_corner_mark_is_caught():
    dataset = shapes_dataset()
    model = corner_reader()
    before = snapshot(model)
    result = shortcut_report(model, dataset, count=32, cue="corner_mark")
    assert_unchanged(model, before)
    assert result.train_accuracy == 1.0
    assert result.test_accuracy < 0.5  # no mark: every logit is 0, one class for all
    area = (mark_size(SIZE) / SIZE) ** 2
    assert result.cue_area_share == pytest.approx(area)
    # Every gradient of this model lies on the mark: all of it, 1 / area times chance.
    for method in ("saliency", "guided", "rectified", "smoothgrad", "gradcam", "guided_gradcam"):
        assert result.cue_share[method] == pytest.approx(1.0), method
        assert result.lift[method] == pytest.approx(1 / area), method
    assert result.lift["occlusion"] > 10  # a 3x3 patch smears the drop around the 2x2 mark
    assert result.relies_on_cue
    assert result.verdict.startswith("the model relies on the corner mark: ")
    assert "100% of its attribution on 0.7% of the image" in result.verdict
    assert "accuracy 100% with the cue" in result.verdict
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["relies_on_cue"] is True and payload["verdict"] == result.verdict
    assert "lift" in result.format_table()


def test_a_model_reading_the_centre_is_not_accused():
    result = shortcut_report(
        centre_reader(), shapes_dataset(), methods=("saliency", "occlusion"), count=16
    )
    assert result.cue_share["saliency"] == 0.0
    assert result.lift["occlusion"] < 1.0
    assert not result.relies_on_cue
    assert result.verdict.startswith("no sign in the explanations that the model relies on ")


def test_data_without_a_cue_is_refused():
    with pytest.raises(CnnvizError, match="no spurious cue"):
        shortcut_report(corner_reader(), shapes_dataset(spurious=None, count=60))


def test_bad_arguments_are_refused():
    dataset = shapes_dataset(count=60)
    with pytest.raises(CnnvizError, match="count must be a positive integer; received 0"):
        shortcut_report(corner_reader(), dataset, count=0)
    with pytest.raises(CnnvizError, match="unknown attribution method 'cam'"):
        shortcut_report(corner_reader(), dataset, methods=("cam",))


def test_figure_outlines_the_cue():
    result = shortcut_report(
        corner_reader(), shapes_dataset(count=60), methods=("saliency", "gradcam"), count=8,
        keep=3,
    )
    figure = shortcut_figure(result)
    assert isinstance(figure, Figure)
    assert len(figure.axes) == 3 * 3  # kept images x (input + 2 methods)
    assert all(ax.collections for ax in figure.axes)  # the cue's contour on every panel


@pytest.mark.slow
def test_a_briefly_trained_model_takes_the_shortcut_and_the_report_says_so():
    import keras

    dataset = shapes_dataset(count=900)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((SIZE, SIZE, 3)),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(4),
        keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(dataset.x_train, dataset.y_train, epochs=4, batch_size=32, verbose=0)
    result = shortcut_report(model, dataset, methods=("saliency", "occlusion"), count=32,
                             cue="corner_mark")
    assert result.train_accuracy > 0.95
    assert result.test_accuracy < result.train_accuracy - 0.3
    assert max(result.lift.values()) > 5
    assert result.relies_on_cue
