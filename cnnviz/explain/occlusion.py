"""Occlusion sensitivity (Zeiler & Fergus 2014): the target's probability as a patch hides each
spot.

Every window of every image is one occluded copy; the intact images and all copies go through
one compiled forward pass of the model's probabilities copy, in chunks that split the count
evenly (no padded windows) and are sized to the model's activation memory, built lazily chunk
by chunk. Per-pixel maps are separable sums over the window grid (row cover x column cover),
so nothing of size windows x pixels is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnnviz.errors import CnnvizError
from cnnviz.model.compiled import check_images, check_target_count, model_copy, probabilities_of
from cnnviz.model.inputs import as_image_batch, channel_range
from cnnviz.model.outputs import resolve_targets


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


def _cover(starts: np.ndarray, patch: int, size: int) -> np.ndarray:
    """(windows along one axis, size) float32: 1 where that window covers the pixel row/column."""
    positions = np.arange(size)
    return ((positions >= starts[:, None]) & (positions < starts[:, None] + patch)).astype(
        np.float32)


def _pixel_sum(per_window: np.ndarray, row_cover: np.ndarray, col_cover: np.ndarray):
    """Per pixel, the sum over the windows covering it: (N, rows, cols) -> (N, H, W).

    Window (i, j) covers pixel (y, x) iff row_cover[i, y] and col_cover[j, x], so the sum is
    row_cover^T @ values @ col_cover for each image.
    """
    return row_cover.T @ per_window @ col_cover


def _most_frequent(window_class, row_cover, col_cover, fallback: np.ndarray) -> np.ndarray:
    """Per pixel, the class most windows covering it predicted (ties: the lowest class).

    window_class: (N, rows, cols) int; fallback: (N,) for pixels no window covers.
    Returns (N, H, W) int32.
    """
    count = len(window_class)
    height, width = row_cover.shape[1], col_cover.shape[1]
    best = np.repeat(fallback[:, None, None], height, 1).repeat(width, 2).astype(np.int32)
    best_votes = np.zeros(best.shape, np.float32)
    for label in np.unique(window_class):  # ascending, and only strict wins: lowest on ties
        votes = _pixel_sum((window_class == label).astype(np.float32), row_cover, col_cover)
        wins = votes > best_votes
        best[wins] = label
        best_votes[wins] = votes[wins]
    return best.reshape(count, height, width)


def occlusion(
    model,
    images,
    targets=None,
    *,
    patch: int = 4,
    stride: int | None = None,
    fill: float = 0.5,
    output=None,
    batch_size: int | None = None,
    input_range=None,
) -> OcclusionResult:
    """Slide a `patch` x `patch` square of value `fill` over each image; record the target's
    probability.

    Windows start at 0, stride, 2 * stride, ... while they fit; when the image size is not
    reached exactly, one more window flush with the bottom/right edge is added, so with
    stride <= patch every pixel is covered.

    Args:
        model: a built Keras classifier (softmax, sigmoid, or logits: softmax/sigmoid is
            applied to a linear output; one sigmoid unit reads as [1 - p, p]); not modified.
            Or an exported one (`cnnviz.model.exported.ExportedModel`), run by its runtime.
        images: (N, H, W, C) or (H, W, C) array.
        targets: None (each image's class predicted on the intact image), an int, or N ints.
        patch: side of the square, in pixels; at most min(H, W).
        stride: step between windows; None means `patch` (windows tile the image).
        fill: what the patch holds, as a share of the input range per channel
            (`input_range`): 0 its low end (black), 1 its high end, 0.5 mid-grey; for a model
            taking [0, 1] this is the value itself.
        output: which output of a multi-output model (index or name); None for one output.
        batch_size: most occluded copies per compiled forward chunk; None sizes it to the
            model's activation memory (`_compiled.batch_size_for`).
        input_range: (lows, highs) per input channel of the inputs given (how they were
            prepared, `cnnviz.model.inputs.channel_range`); None: what the model says.

    Returns:
        An `OcclusionResult` (per-pixel maps, per-window grids, targets).
    """
    batch = as_image_batch(images)
    stride = _check_window(patch, stride, *batch.shape[1:3])
    check_images(model_copy(model, "probabilities", output=output).model, batch)
    check_target_count(targets, len(batch))
    probabilities = occluded_probabilities(model, batch, patch=patch, stride=stride, fill=fill,
                                           output=output, batch_size=batch_size,
                                           input_range=input_range)
    return occlusion_from_probabilities(probabilities, targets, patch=patch, stride=stride)


def occluded_probabilities(model, images, *, patch: int = 4, stride: int | None = None,
                           fill: float = 0.5, output=None, batch_size: int | None = None,
                           input_range=None) -> tuple[np.ndarray, int, int]:
    """The forward passes of `occlusion`, which do not depend on the target.

    Returns:
        ((N, 1 + windows, K) float32, the class probabilities of each image intact (copy 0),
        then with window i * cols + j hidden (copy 1 + i * cols + j); H; W), what
        `occlusion_from_probabilities` reads for any targets.
    """
    batch = as_image_batch(images)
    count, height, width = batch.shape[:3]
    stride = _check_window(patch, stride, height, width)
    check_images(model_copy(model, "probabilities", output=output).model, batch)
    lows, highs = channel_range(model) if input_range is None else input_range
    fill_value = (lows + np.float32(fill) * (highs - lows)).astype(np.float32)
    rows_at = _window_starts(height, patch, stride)
    cols_at = _window_starts(width, patch, stride)
    # Per image: copy 0 is the intact image, copy 1 + i * cols + j hides window (i, j).
    copies = 1 + len(rows_at) * len(cols_at)
    tops = np.concatenate([[height], np.repeat(rows_at, len(cols_at))])  # intact: off the image
    lefts = np.concatenate([[width], np.tile(cols_at, len(rows_at))])
    rows, cols = np.arange(height), np.arange(width)

    def occluded(start: int, stop: int) -> np.ndarray:
        flat = np.arange(start, stop)
        window = flat % copies
        top, left = tops[window][:, None], lefts[window][:, None]
        covered = (((rows >= top) & (rows < top + patch))[:, :, None]
                   & ((cols >= left) & (cols < left + patch))[:, None, :])
        return np.where(covered[..., None], fill_value, batch[flat // copies])

    probabilities = probabilities_of(model, count * copies, occluded, output=output,
                                     batch_size=batch_size)
    return probabilities.reshape(count, copies, -1), height, width


def occlusion_from_probabilities(occluded: tuple[np.ndarray, int, int], targets=None, *,
                                 patch: int = 4, stride: int | None = None) -> OcclusionResult:
    """`occlusion`'s result for `targets` from what `occluded_probabilities` returned (for the
    same patch and stride)."""
    probabilities, height, width = occluded
    count = len(probabilities)
    stride = _check_window(patch, stride, height, width)
    rows_at = _window_starts(height, patch, stride)
    cols_at = _window_starts(width, patch, stride)
    intact, probabilities = probabilities[:, 0], probabilities[:, 1:]
    predicted = intact.argmax(axis=-1).astype(np.int32)
    chosen = resolve_targets(targets, predicted, intact.shape[-1])
    grid = (count, len(rows_at), len(cols_at))
    window_probability = np.take_along_axis(
        probabilities, chosen[:, None, None].astype(np.int64), axis=-1
    )[..., 0].reshape(grid)
    window_class = probabilities.argmax(axis=-1).astype(np.int32).reshape(grid)

    row_cover, col_cover = _cover(rows_at, patch, height), _cover(cols_at, patch, width)
    covering = np.outer(row_cover.sum(axis=0), col_cover.sum(axis=0))
    unoccluded = intact[np.arange(count), chosen]
    mean = _pixel_sum(window_probability, row_cover, col_cover) / np.maximum(covering, 1.0)
    probability = np.where(covering > 0, mean, unoccluded[:, None, None])
    return OcclusionResult(
        probability=probability.astype(np.float32),
        predicted_class=_most_frequent(window_class, row_cover, col_cover, predicted),
        window_probability=window_probability.astype(np.float32),
        window_class=window_class,
        targets=chosen,
        unoccluded_probability=unoccluded.astype(np.float32),
    )
