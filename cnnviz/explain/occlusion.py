"""Occlusion sensitivity (Zeiler & Fergus 2014): the target's probability as a patch hides each spot.

Every window of every image is one occluded copy; all copies go through one compiled forward
pass of a clone of the model, in fixed-size chunks, built lazily chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnnviz.errors import CnnvizError
from cnnviz.explain._common import (
    as_image_batch,
    class_probabilities,
    input_range,
    resolve_targets,
)
from cnnviz.explain._compiled import (
    check_images,
    check_target_count,
    forward_body,
    model_copy,
    run_batched,
)


@dataclass(frozen=True)
class OcclusionResult:
    """What `occlusion` measured. Probabilities are the ORIGINAL model's output for the target.

    Attributes:
        probability: (N, H, W) float32, per pixel the mean target probability over the windows
            covering it; a pixel no window covers (stride > patch) keeps the unoccluded one.
        predicted_class: (N, H, W) int32, per pixel the class predicted most often over the
            windows covering it (ties: the lowest class index); uncovered pixels keep the
            unoccluded prediction.
        window_probability: (N, rows, cols) float32, target probability per window position.
        window_class: (N, rows, cols) int32, predicted class per window position.
        targets: (N,) int32, the class each image was explained for.
        unoccluded_probability: (N,) float32, the target probability of the intact image.
    """

    probability: np.ndarray
    predicted_class: np.ndarray
    window_probability: np.ndarray
    window_class: np.ndarray
    targets: np.ndarray
    unoccluded_probability: np.ndarray


def _window_starts(size: int, patch: int, stride: int) -> np.ndarray:
    """Top/left edges 0, stride, ... that fit, plus one flush with the far edge if needed."""
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] + patch < size:
        starts.append(size - patch)
    return np.asarray(starts)



def _check_window(patch, stride, height: int, width: int) -> int:
    if not isinstance(patch, (int, np.integer)) or patch < 1:
        raise CnnvizError(f"patch must be a positive integer; received {patch!r}")
    if patch > min(height, width):
        raise CnnvizError(
            f"patch={patch} is larger than the images ({height} x {width}); use at most "
            f"{min(height, width)}"
        )
    stride = patch if stride is None else stride
    if not isinstance(stride, (int, np.integer)) or stride < 1:
        raise CnnvizError(f"stride must be a positive integer; received {stride!r}")
    return int(stride)


def _most_frequent(window_class: np.ndarray, cover: np.ndarray, fallback: np.ndarray):
    """Per pixel, the class most windows covering it predicted (ties: the lowest class).

    window_class: (N, windows) int; cover: (windows, pixels) 0/1; fallback: (N,) for
    pixels no window covers. Returns (N, pixels) int32.
    """
    best = np.repeat(fallback[:, None], cover.shape[1], axis=1).astype(np.int32)
    best_votes = np.zeros(best.shape, np.float32)
    for label in np.unique(window_class):  # ascending, and only strict wins: lowest on ties
        votes = (window_class == label).astype(np.float32) @ cover
        wins = votes > best_votes
        best[wins] = label
        best_votes[wins] = votes[wins]
    return best


def occlusion(
    model,
    images,
    targets=None,
    *,
    patch: int = 4,
    stride: int | None = None,
    fill: float = 0.5,
    batch_size: int = 256,
) -> OcclusionResult:
    """Slide a `patch` x `patch` square of value `fill` over each image; record the target's probability.

    Windows start at 0, stride, 2 * stride, ... while they fit; when the image size is not
    reached exactly, one more window flush with the bottom/right edge is added, so with
    stride <= patch every pixel is covered.

    Args:
        model: a built Keras classifier (softmax, or one sigmoid unit read as [1 - p, p]);
            not modified.
        images: (N, H, W, C) or (H, W, C) array.
        targets: None (each image's class predicted on the intact image), an int, or N ints.
        patch: side of the square, in pixels; at most min(H, W).
        stride: step between windows; None means `patch` (windows tile the image).
        fill: what the patch holds, as a share of the model's input range
            (`_common.input_range`): 0 its low end (black), 1 its high end, 0.5 mid-grey;
            for a model taking [0, 1] this is the value itself.
        batch_size: occluded copies per compiled forward chunk.

    Returns:
        An `OcclusionResult` (per-pixel maps, per-window grids, targets).
    """
    batch = as_image_batch(images)
    count, height, width = batch.shape[:3]
    stride = _check_window(patch, stride, height, width)
    output = model_copy(model, "output")
    check_images(output.model, batch)

    low, high = input_range(model)
    fill_value = np.float32(low + fill * (high - low))
    (intact,) = run_batched(
        output, "forward", forward_body, count, lambda a, b: [batch[a:b]], batch_size
    )
    intact = class_probabilities(intact)
    predicted = intact.argmax(axis=-1).astype(np.int32)
    check_target_count(targets, count)
    chosen = resolve_targets(targets, predicted, intact.shape[-1])
    rows_at = _window_starts(height, patch, stride)
    cols_at = _window_starts(width, patch, stride)
    masks = np.zeros((len(rows_at), len(cols_at), height, width), dtype=bool)
    for i, top in enumerate(rows_at):
        for j, left in enumerate(cols_at):
            masks[i, j, top : top + patch, left : left + patch] = True
    masks = masks.reshape(-1, height, width)
    windows = len(masks)

    def occluded(start: int, stop: int) -> list[np.ndarray]:
        flat = np.arange(start, stop)
        covered = masks[flat % windows][..., None]
        return [np.where(covered, fill_value, batch[flat // windows])]

    (outputs,) = run_batched(
        output, "forward", forward_body, count * windows, occluded, batch_size
    )
    probabilities = class_probabilities(outputs).reshape(count, windows, -1)
    window_probability = np.take_along_axis(
        probabilities, chosen[:, None, None].astype(np.int64), axis=-1
    )[..., 0]
    window_class = probabilities.argmax(axis=-1).astype(np.int32)

    cover = masks.reshape(windows, -1).astype(np.float32)
    covering = cover.sum(axis=0)
    unoccluded = intact[np.arange(count), chosen]
    mean = (window_probability @ cover) / np.maximum(covering, 1.0)
    probability = np.where(covering > 0, mean, unoccluded[:, None])
    pixel_class = _most_frequent(window_class, cover, predicted)
    grid = (count, len(rows_at), len(cols_at))
    return OcclusionResult(
        probability=probability.reshape(count, height, width).astype(np.float32),
        predicted_class=pixel_class.reshape(count, height, width),
        window_probability=window_probability.reshape(grid).astype(np.float32),
        window_class=window_class.reshape(grid),
        targets=chosen,
        unoccluded_probability=unoccluded.astype(np.float32),
    )
