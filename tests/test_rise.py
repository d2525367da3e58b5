"""RISE against its reference code: the masks of eclique/RISE (skimage resize) and its formula."""

from __future__ import annotations

import numpy as np
import pytest
from _models import assert_unchanged, images, snapshot, two_conv_functional
from skimage.transform import resize

from cnnviz.errors import CnnvizError
from cnnviz.explain import rise
from cnnviz.explain.rise import MaskSet


def reference_masks(count, height, width, cell, keep, seed):
    """RISE's generate_masks (Petsiuk et al.'s code), with the draws in the documented order."""
    rng = np.random.default_rng(seed)
    grids = (rng.random((count, cell, cell)) < keep).astype(np.float64)
    cell_rows, cell_cols = int(np.ceil(height / cell)), int(np.ceil(width / cell))
    rows, cols = rng.integers(0, cell_rows, count), rng.integers(0, cell_cols, count)
    up = ((cell + 1) * cell_rows, (cell + 1) * cell_cols)
    return np.stack([
        resize(grid, up, order=1, mode="reflect", anti_aliasing=False)[r:r + height, c:c + width]
        for grid, r, c in zip(grids, rows, cols)
    ])


@pytest.mark.parametrize(("height", "width", "cell"), [(28, 28, 7), (12, 10, 3), (8, 8, 8)])
def test_masks_are_the_reference_codes(height, width, cell):
    masks = MaskSet(40, height, width, cell=cell, keep=0.5, seed=3)[0:40]
    expected = reference_masks(40, height, width, cell, 0.5, 3)
    np.testing.assert_allclose(masks, expected, atol=1e-6)
    assert masks.shape == (40, height, width) and masks.dtype == np.float32
    assert 0.0 <= masks.min() and masks.max() <= 1.0
    np.testing.assert_allclose(MaskSet(40, height, width, cell=cell, keep=0.5, seed=3)[5:9],
                               expected[5:9], atol=1e-6)  # any slice: the same masks


def test_saliency_is_the_probability_weighted_mean_of_the_masks():
    model = two_conv_functional()
    batch = images(3, (8, 8, 1), seed=1)
    count, cell, keep = 60, 3, 0.4
    masks = reference_masks(count, 8, 8, cell, keep, seed=5)
    targets = np.array([1, 0, 2])
    expected = []
    for x, target in zip(batch, targets):
        probabilities = np.asarray(model(x[None] * masks[..., None].astype(np.float32)))
        expected.append(np.tensordot(probabilities[:, target], masks, axes=1) / (count * keep))
    result = rise(model, batch, targets, masks=count, cell=cell, keep=keep, seed=5,
                  batch_size=32)  # several chunks; chunks cut across masks and images
    np.testing.assert_allclose(result, np.stack(expected), rtol=1e-5, atol=1e-6)
    assert result.shape == (3, 8, 8) and result.dtype == np.float32


def quadrant_model():
    """(8, 8, 1) -> Flatten -> Dense(2, softmax): class 1's logit is 10 x the top-left quadrant's
    mean minus 5; no other pixel matters."""
    import keras

    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(2, activation="softmax")])
    kernel = np.zeros((8, 8, 2))
    kernel[:4, :4, 1] = 10.0 / 16
    model.set_weights([kernel.reshape(64, 2), np.array([0.0, -5.0])])
    return model


def test_the_pixels_the_model_reads_come_out_on_top():
    batch = np.full((2, 8, 8, 1), 0.9, np.float32)
    saliency = rise(quadrant_model(), batch, 1, masks=500, cell=4)
    # Each pixel of the read quadrant above every pixel of the opposite one (0.54 vs 0.45 here).
    assert (saliency[:, :4, :4].min(axis=(1, 2)) > saliency[:, 4:, 4:].max(axis=(1, 2))).all()


def test_seeded_reproducible_and_independent_of_the_chunk_size():
    model = two_conv_functional()
    batch = images(2, (8, 8, 1), seed=2)
    before = snapshot(model)
    first = rise(model, batch, masks=100, seed=7, batch_size=64)
    np.testing.assert_allclose(rise(model, batch, masks=100, seed=7, batch_size=16), first,
                               rtol=1e-5, atol=1e-7)
    assert not np.allclose(rise(model, batch, masks=100, seed=8), first)
    assert_unchanged(model, before)


@pytest.mark.parametrize(("arguments", "message"), [
    ({"masks": 0}, "masks must be a positive integer; received 0"),
    ({"cell": 9}, "cell=9 grid cells do not fit in 8 x 8 images; use at most 8"),
    ({"keep": 0.0}, r"keep must be in \(0, 1\]; received 0.0"),
    ({"targets": [0, 1, 2]}, "targets has 3 entries for 2 images"),
])
def test_bad_arguments_are_refused(arguments, message):
    with pytest.raises(CnnvizError, match=message):
        rise(two_conv_functional(), images(2, (8, 8, 1)), **arguments)
