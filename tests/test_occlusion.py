"""Occlusion checked against a direct loop that calls the model once per window."""

from __future__ import annotations

from collections import Counter

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
from cnnviz.explain.occlusion import occlusion


def probabilities(model, x: np.ndarray) -> np.ndarray:
    """The model's class probabilities for one image; a sigmoid unit p reads as [1 - p, p]."""
    p = np.asarray(model(x[None]), np.float64)[0]
    return np.array([1 - p[0], p[0]]) if p.shape == (1,) else p


def direct_occlusion(model, batch, targets, patch, stride, fill):
    """The slow, obvious way: one model call per window, per-pixel bookkeeping in python."""
    count, height, width, _ = batch.shape

    def starts(size):
        edges = list(range(0, size - patch + 1, stride))
        return edges if edges[-1] == size - patch else edges + [size - patch]

    rows, cols = starts(height), starts(width)
    window_probability = np.zeros((count, len(rows), len(cols)))
    window_class = np.zeros((count, len(rows), len(cols)), int)
    probability = np.zeros((count, height, width))
    predicted_class = np.zeros((count, height, width), int)
    chosen = []
    for n, x in enumerate(batch):
        intact = probabilities(model, x)
        target = int(intact.argmax()) if targets is None else targets[n]
        chosen.append(target)
        seen = [[[] for _ in range(width)] for _ in range(height)]
        for i, top in enumerate(rows):
            for j, left in enumerate(cols):
                hidden = x.copy()
                hidden[top : top + patch, left : left + patch, :] = fill
                p = probabilities(model, hidden)
                window_probability[n, i, j] = p[target]
                window_class[n, i, j] = p.argmax()
                for r in range(top, top + patch):
                    for c in range(left, left + patch):
                        seen[r][c].append((p[target], int(p.argmax())))
        for r in range(height):
            for c in range(width):
                if not seen[r][c]:
                    probability[n, r, c] = intact[target]
                    predicted_class[n, r, c] = intact.argmax()
                    continue
                probability[n, r, c] = np.mean([p for p, _ in seen[r][c]])
                votes = Counter(label for _, label in seen[r][c])
                predicted_class[n, r, c] = max(sorted(votes), key=votes.get)  # ties: lowest
    return probability, predicted_class, window_probability, window_class, np.array(chosen)


MODELS = {
    "softmax": (two_conv_functional, None),
    "sigmoid": (lambda: cam_net(units=1, last="sigmoid"), [0, 1, 1]),
}


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize(
    "patch, stride", [(3, None), (3, 2), (2, 4)], ids=["tiles+edge", "overlap", "gaps"]
)
def test_occlusion_matches_a_direct_loop_over_windows(kind, patch, stride):
    build, targets = MODELS[kind]
    model = build()
    batch = images(3, (8, 8, 1), seed=1)
    result = occlusion(model, batch, targets, patch=patch, stride=stride, fill=0.3)
    probability, predicted, window_probability, window_class, chosen = direct_occlusion(
        model, batch, targets, patch, stride or patch, 0.3
    )
    np.testing.assert_array_equal(result.targets, chosen)
    np.testing.assert_allclose(result.window_probability, window_probability, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.window_class, window_class)
    np.testing.assert_allclose(result.probability, probability, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.predicted_class, predicted)
    assert result.probability.dtype == np.float32 and result.predicted_class.dtype == np.int32
    # The windows must actually matter here, or the comparison proves little.
    assert np.ptp(result.window_probability, axis=(1, 2)).min() > 1e-3


def test_a_patch_of_the_image_own_value_changes_nothing():
    model = two_conv_functional()
    flat = np.full((2, 8, 8, 1), 0.5, np.float32)
    result = occlusion(model, flat, patch=3, fill=0.5)
    np.testing.assert_allclose(
        result.probability,
        result.unoccluded_probability[:, None, None] * np.ones((1, 8, 8)),
        rtol=1e-5,
    )


def test_batch_equals_one_at_a_time():
    model = two_conv_functional()
    batch = images(4, (8, 8, 1), seed=2)
    together = occlusion(model, batch, patch=3, batch_size=7)  # 36 windows: chunks of 8, padded
    for n, x in enumerate(batch):
        alone = occlusion(model, x, patch=3)
        np.testing.assert_allclose(together.probability[n], alone.probability[0], atol=1e-6)
        np.testing.assert_allclose(
            together.window_probability[n], alone.window_probability[0], atol=1e-6
        )
        np.testing.assert_array_equal(together.predicted_class[n], alone.predicted_class[0])
        assert together.targets[n] == alone.targets[0]


@pytest.mark.parametrize(
    "build, shape",
    [
        (lambda: cam_net(channels=3), (8, 8, 3)),
        (two_conv_functional, (8, 8, 1)),
        (sequential_without_input, (8, 8, 1)),
        (lambda: cam_net(units=1, last="sigmoid"), (8, 8, 1)),
    ],
    ids=["rgb", "functional", "sequential_without_input", "sigmoid"],
)
def test_runs_on_every_kind_of_model(build, shape):
    result = occlusion(build(), images(3, shape, seed=3), patch=3, stride=2)
    assert result.probability.shape == result.predicted_class.shape == (3, 8, 8)
    assert result.window_probability.shape == result.window_class.shape == (3, 4, 4)
    assert result.targets.shape == (3,)
    assert 0 <= result.probability.min() and result.probability.max() <= 1


def test_the_users_model_is_unchanged():
    model = cam_net()
    batch = images(2, (8, 8, 1), seed=4)
    before = snapshot(model)
    outputs = np.asarray(model(batch))
    occlusion(model, batch, patch=4)
    assert_unchanged(model, before)
    np.testing.assert_array_equal(np.asarray(model(batch)), outputs)


def test_bad_inputs_raise_cnnviz_error_quoting_the_value():
    model = cam_net()
    batch = images(2, (8, 8, 1))
    with pytest.raises(CnnvizError, match=r"patch=9 is larger than the images \(8 x 8\)"):
        occlusion(model, batch, patch=9)
    with pytest.raises(CnnvizError, match="patch must be a positive integer; received 0"):
        occlusion(model, batch, patch=0)
    with pytest.raises(CnnvizError, match="stride must be a positive integer; received 0"):
        occlusion(model, batch, patch=2, stride=0)
    with pytest.raises(CnnvizError, match="target class 5 "):
        occlusion(model, batch, targets=5)
    with pytest.raises(CnnvizError, match="targets has 1 entries for 2 images"):
        occlusion(model, batch, targets=[1])
