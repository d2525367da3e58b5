"""The generated shapes data set and its spurious cues."""

import numpy as np
import pytest

from cnnviz.data.shapes import (
    SHAPE_CLASSES,
    cue_area_share,
    cue_share,
    make_shapes,
    mark_origins,
    mark_size,
)
from cnnviz.errors import CnnvizError


def test_same_seed_same_data_other_seed_other_data():
    first = make_shapes(40, spurious="corner_mark", seed=3)
    again = make_shapes(40, spurious="corner_mark", seed=3)
    other = make_shapes(40, spurious="corner_mark", seed=4)

    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.labels, again.labels)
    np.testing.assert_array_equal(first.cue_masks, again.cue_masks)
    assert not np.array_equal(first.images, other.images)


@pytest.mark.parametrize("channels", [1, 3])
def test_images_labels_and_masks_have_the_promised_form(channels):
    data = make_shapes(101, image_size=24, classes=SHAPE_CLASSES, channels=channels, seed=0)

    assert data.images.shape == (101, 24, 24, channels) and data.images.dtype == np.float32
    assert 0.0 <= data.images.min() and data.images.max() <= 1.0
    assert data.labels.shape == (101,) and data.labels.dtype == np.int32
    assert data.class_names == SHAPE_CLASSES
    counts = np.bincount(data.labels, minlength=5)
    assert counts.max() - counts.min() <= 1  # balanced
    assert data.cue_masks.shape == (101, 24, 24) and not data.cue_masks.any()
    assert (data.cue_classes == -1).all()
    # every image shows a shape: some pixels stand out from the rest
    spread = data.images.reshape(101, -1).max(axis=1) - data.images.reshape(101, -1).min(axis=1)
    assert spread.min() > 0.2


def test_corner_mark_pixels_are_exactly_where_the_masks_say():
    data = make_shapes(60, image_size=32, spurious="corner_mark", seed=1)

    at_one = (data.images == 1.0).all(axis=-1)
    np.testing.assert_array_equal(at_one, data.cue_masks)
    assert (data.cue_masks.sum(axis=(1, 2)) == mark_size(32) ** 2).all()  # 3x3 at size 32
    assert (data.images[~data.cue_masks] <= 0.9).all()  # nothing else is that bright
    np.testing.assert_array_equal(data.cue_classes, data.labels)


@pytest.mark.parametrize("spurious", [None, "corner_mark", "background"])
def test_no_cue_without_spurious_or_with_cue_off(spurious):
    data = make_shapes(30, spurious=spurious, with_cue=False, seed=2)

    assert not data.cue_masks.any()
    assert (data.images < 1.0).all()
    assert (data.cue_classes == -1).all()


def _nearest_mark_class(data, image_size):
    """Classify by the mark position alone: the anchor whose square is brightest."""
    side = mark_size(image_size)
    bright = (data.images == 1.0).all(axis=-1)
    scores = np.stack([
        bright[:, top:top + side, left:left + side].sum(axis=(1, 2))
        for top, left in mark_origins(image_size)[:len(data.class_names)]
    ], axis=1)
    return scores.argmax(axis=1)


def test_corner_mark_alone_predicts_the_class_in_training_data():
    data = make_shapes(200, image_size=40, classes=SHAPE_CLASSES, spurious="corner_mark", seed=5)

    assert (_nearest_mark_class(data, 40) == data.labels).all()


def test_shuffled_corner_mark_points_at_random_classes():
    data = make_shapes(600, spurious="corner_mark", shuffle_cue=True, seed=6)

    predicted = _nearest_mark_class(data, 32)
    np.testing.assert_array_equal(predicted, data.cue_classes)
    accuracy = (predicted == data.labels).mean()
    assert 0.2 < accuracy < 0.47  # chance is 1/3: the shortcut no longer works


def test_background_level_alone_predicts_the_class_in_training_data():
    data = make_shapes(150, classes=("circle", "ring", "cross", "square"),
                       spurious="background", seed=7)

    assert data.cue_masks.any(axis=(1, 2)).all()
    levels = np.array([data.images[i][data.cue_masks[i]].mean() for i in range(150)])
    class_levels = np.linspace(0.1, 0.7, 4)
    nearest = np.abs(levels[:, None] - class_levels[None]).argmin(axis=1)
    assert (nearest == data.labels).all()
    # the mask is the background: the shape pixels are what is left, and there are some
    shape_share = 1 - cue_area_share(data.cue_masks)
    assert (shape_share > 0.02).all() and (shape_share < 0.6).all()


def test_background_without_cue_does_not_predict_the_class():
    data = make_shapes(600, spurious="background", with_cue=False, seed=8)

    corners = data.images[:, :2, :2].mean(axis=(1, 2, 3))
    nearest = np.abs(corners[:, None] - np.linspace(0.1, 0.7, 3)[None]).argmin(axis=1)
    assert (nearest == data.labels).mean() < 0.45


def test_cue_share_of_the_mask_itself_is_one_and_of_a_uniform_map_the_area():
    data = make_shapes(10, spurious="corner_mark", seed=9)
    masks = data.cue_masks

    np.testing.assert_allclose(cue_share(masks.astype(float), masks), 1.0)
    uniform = np.full(masks.shape, 0.7)
    np.testing.assert_allclose(cue_share(uniform, masks), cue_area_share(masks), rtol=1e-6)
    np.testing.assert_allclose(cue_area_share(masks), 9 / (32 * 32))


def test_cue_share_counts_positive_attribution_only_and_never_nans():
    masks = np.zeros((3, 4, 4), bool)
    masks[:, 0, 0] = True
    attribution = np.zeros((3, 4, 4))
    attribution[0, 0, 0], attribution[0, 3, 3] = 3.0, 1.0  # 3 of 4 inside
    attribution[1, 0, 0], attribution[1, 2, 2] = -5.0, 2.0  # negative inside is left out
    # image 2: all zeros

    share = cue_share(attribution, masks)

    np.testing.assert_allclose(share, [0.75, 0.0, 0.0])
    assert share.dtype == np.float32


@pytest.mark.parametrize("kwargs, message", [
    ({"count": 0}, "count"),
    ({"image_size": 20}, "image_size"),
    ({"channels": 2}, "channels"),
    ({"classes": ("circle", "hexagon")}, "hexagon"),
    ({"classes": ("circle",)}, "at least two"),
    ({"spurious": "watermark"}, "corner_mark, background"),
    ({"spurious": "corner_mark", "with_cue": False, "shuffle_cue": True}, "with_cue"),
])
def test_bad_arguments_are_refused_with_the_value_quoted(kwargs, message):
    arguments = {"count": 10, **kwargs}
    with pytest.raises(CnnvizError, match=message):
        make_shapes(arguments.pop("count"), **arguments)


def test_cue_share_refuses_mismatched_shapes():
    with pytest.raises(CnnvizError, match="shape"):
        cue_share(np.zeros((2, 4, 4, 3)), np.zeros((2, 4, 4), bool))


@pytest.mark.slow
def test_a_small_cnn_learns_shapes_without_a_cue():
    import keras

    keras.utils.set_random_seed(0)
    train = make_shapes(1500, seed=1)
    test = make_shapes(300, seed=2)
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.GlobalMaxPooling2D(),
        keras.layers.Dense(3, activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train.images, train.labels, epochs=8, batch_size=32, verbose=0)

    accuracy = model.evaluate(test.images, test.labels, verbose=0)[1]
    assert accuracy > 0.6  # chance is 1/3


@pytest.mark.slow
def test_a_model_trained_with_the_cue_fails_when_it_is_shuffled():
    import keras

    keras.utils.set_random_seed(0)
    train = make_shapes(1500, spurious="background", seed=1)
    with_cue = make_shapes(300, spurious="background", seed=2)
    shuffled = make_shapes(300, spurious="background", shuffle_cue=True, seed=2)
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train.images, train.labels, epochs=4, batch_size=32, verbose=0)

    accuracy_with_cue = model.evaluate(with_cue.images, with_cue.labels, verbose=0)[1]
    accuracy_shuffled = model.evaluate(shuffled.images, shuffled.labels, verbose=0)[1]
    assert accuracy_with_cue > 0.9
    assert accuracy_shuffled < accuracy_with_cue - 0.3


def test_one_seed_gives_the_same_shapes_with_and_without_the_mark():
    marked = make_shapes(50, spurious="corner_mark", seed=11)
    plain = make_shapes(50, spurious="corner_mark", with_cue=False, seed=11)
    shuffled = make_shapes(50, spurious="corner_mark", shuffle_cue=True, seed=11)

    outside = ~marked.cue_masks[..., None].repeat(3, axis=-1)
    np.testing.assert_array_equal(marked.images[outside], plain.images[outside])
    np.testing.assert_array_equal(marked.shape_masks, shuffled.shape_masks)
    np.testing.assert_array_equal(marked.labels, shuffled.labels)


@pytest.mark.parametrize("image_size", [24, 32, 45])
def test_shapes_never_touch_any_mark_position(image_size):
    data = make_shapes(300, image_size=image_size, classes=SHAPE_CLASSES, seed=12)
    side = mark_size(image_size)
    near_marks = np.zeros((image_size, image_size), bool)
    for top, left in mark_origins(image_size):  # each mark with a 1-pixel border
        near_marks[max(top - 1, 0):top + side + 1, max(left - 1, 0):left + side + 1] = True

    assert not (data.shape_masks & near_marks).any()
    assert data.shape_masks.sum(axis=(1, 2)).min() >= 4  # and every image has a shape
