"""RISE (Petsiuk et al. 2018): randomized input sampling, a black-box saliency map.

Random low-resolution binary grids are upsampled bilinearly with a random shift into soft masks;
each image is shown to the model through every mask, and a pixel's saliency is the mean target
probability over the masks weighted by how much each mask kept that pixel:
S(x) = sum_i P(target | x * M_i) M_i / (masks * keep), an estimate of E[P | pixel kept].
Forward-only: masks x images forward passes, all through `probabilities_of` in fixed chunks
(an exported .tflite/.onnx/SavedModel model too).
"""

from __future__ import annotations

import numpy as np

from cnnviz.errors import CnnvizError
from cnnviz.model.compiled import check_images, check_target_count, model_copy, probabilities_of
from cnnviz.model.inputs import as_image_batch, channel_range
from cnnviz.model.outputs import resolve_targets


def _interpolation_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) bilinear weights, pixel centres aligned (half-pixel), mirrored at the
    edges: what skimage.transform.resize(order=1, mode="reflect") does along one axis, the
    upsampling of RISE's reference code."""
    position = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
    if size_in > 1:
        period = 2 * (size_in - 1)
        position = np.abs(position) % period
        position = np.where(position > size_in - 1, period - position, position)
    else:
        position = np.zeros_like(position)
    lower = np.clip(np.floor(position).astype(int), 0, max(size_in - 2, 0))
    fraction = position - lower
    matrix = np.zeros((size_out, size_in))
    rows = np.arange(size_out)
    matrix[rows, lower] += 1 - fraction
    if size_in > 1:
        matrix[rows, lower + 1] += fraction
    return matrix


def _check(masks, cell, keep, height: int, width: int) -> None:
    for name, value in (("masks", masks), ("cell", cell)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise CnnvizError(f"{name} must be a positive integer; received {value!r}")
    if cell > min(height, width):
        raise CnnvizError(
            f"cell={cell} grid cells do not fit in {height} x {width} images; use at most "
            f"{min(height, width)}"
        )
    if not 0.0 < keep <= 1.0:
        raise CnnvizError(f"keep must be in (0, 1]; received {keep!r}")


class MaskSet:
    """RISE's masks, drawn once from `seed` and upsampled on demand (never all in memory).

    Draws, in this order from `numpy.random.default_rng(seed)`: the grids, `random((masks, cell,
    cell)) < keep`; the row shifts, `integers(0, ceil(H / cell), masks)`; the column shifts,
    `integers(0, ceil(W / cell), masks)`. Mask i is grid i upsampled bilinearly to
    (cell + 1) * ceil(size / cell) per axis and cropped to (H, W) at its shifts.
    """

    def __init__(self, count: int, height: int, width: int, *, cell: int, keep: float,
                 seed: int) -> None:
        _check(count, cell, keep, height, width)
        rng = np.random.default_rng(seed)
        self.count, self.height, self.width, self.keep = int(count), height, width, float(keep)
        self.grids = (rng.random((count, cell, cell)) < keep).astype(np.float64)
        cell_rows, cell_cols = -(-height // cell), -(-width // cell)
        self.row_shifts = rng.integers(0, cell_rows, count)
        self.col_shifts = rng.integers(0, cell_cols, count)
        self._rows = _interpolation_matrix(cell, (cell + 1) * cell_rows)
        self._cols = _interpolation_matrix(cell, (cell + 1) * cell_cols)

    def __getitem__(self, index: slice) -> np.ndarray:
        """Masks start..stop-1, (M, H, W) float32 in [0, 1]."""
        grids = self.grids[index]
        rows = self.row_shifts[index][:, None] + np.arange(self.height)  # (M, H)
        cols = self.col_shifts[index][:, None] + np.arange(self.width)  # (M, W)
        return np.einsum(
            "mhi,mij,mwj->mhw", self._rows[rows], grids, self._cols[cols], optimize=True
        ).astype(np.float32)


def rise(
    model,
    images,
    targets=None,
    *,
    masks: int = 2000,
    cell: int = 7,
    keep: float = 0.5,
    seed: int = 0,
    output=None,
    batch_size: int | None = None,
    input_range=None,
) -> np.ndarray:
    """RISE saliency: E[P(target | masked image) | pixel kept], estimated with random masks.

    Args:
        model: a built Keras classifier (softmax, sigmoid, or logits: softmax/sigmoid is
            applied to a linear output; one sigmoid unit reads as [1 - p, p]); not modified.
            Or an exported one (`cnnviz.model.exported.ExportedModel`), run by its runtime.
        images: (N, H, W, C) or (H, W, C) array.
        targets: None (each image's class predicted on the intact image), an int, or N ints.
        masks: how many random masks (the same set for every image).
        cell: the binary grid is cell x cell before upsampling (the paper's s).
        keep: probability that a grid cell is kept (the paper's p).
        seed: seeds the masks; the same seed gives the same maps.
        output: which output of a multi-output model (index or name); None for one output.
        batch_size: most masked copies per compiled forward chunk; None sizes it to the model.
        input_range: (lows, highs) per input channel of the inputs given (how they were
            prepared, `cnnviz.model.inputs.channel_range`); None: what the model says.

    Returns:
        (N, H, W) float32 >= 0, in units of the target probability (not rescaled). A masked-out
        pixel takes the low end of the input range (black), x * M for [0, 1] inputs.
    """
    batch = as_image_batch(images)
    saliency, _, _ = _rise_sums(model, batch, targets, every_class=False, masks=masks, cell=cell,
                                keep=keep, seed=seed, output=output, batch_size=batch_size,
                                input_range=input_range)
    return saliency[:, 0]


def rise_every_class(model, images, **options) -> tuple[np.ndarray, np.ndarray]:
    """`rise`'s maps for every class at once, from the same forward passes (one target costs
    as much as all of them: the masked images are the same, only the probability read differs).
    Takes `rise`'s keyword arguments (masks, cell, keep, seed, output, batch_size,
    input_range).

    Returns:
        ((N, K, H, W) float32, map k being `rise(..., targets=k)`'s up to float rounding;
        (N, K) float32, the intact images' probabilities).
    """
    saliency, intact, _ = _rise_sums(model, as_image_batch(images), None, every_class=True,
                                     **options)
    return saliency, intact


def _rise_sums(model, batch, targets, *, every_class: bool, masks: int = 2000, cell: int = 7,
               keep: float = 0.5, seed: int = 0, output=None, batch_size: int | None = None,
               input_range=None):
    """(saliency (N, T, H, W) float32 with T = 1 (the targets) or K (`every_class`), intact
    probabilities (N, K), targets (N,))."""
    count, height, width = batch.shape[:3]
    mask_set = MaskSet(masks, height, width, cell=cell, keep=keep, seed=seed)
    check_images(model_copy(model, "probabilities", output=output).model, batch)
    check_target_count(targets, count)
    intact = probabilities_of(model, count, lambda a, b: batch[a:b], output=output,
                              batch_size=batch_size)
    chosen = resolve_targets(targets, intact.argmax(axis=-1), intact.shape[-1])
    classes = intact.shape[-1] if every_class else 1
    fill = (channel_range(model) if input_range is None else input_range)[0].astype(np.float32)
    # Per mask, image and class, the probability read through that mask; the weighted sum of
    # the masks is taken once at the end, in blocks of masks (one large product instead of a
    # small one per chunk, which cost as much as the forward passes).
    read = np.zeros((mask_set.count, count, classes), np.float64)

    def mask_range(start: int, stop: int) -> tuple[int, np.ndarray]:
        # Items are mask-major: item i is image i % count seen through mask i // count.
        first = start // count
        return first, mask_set[first : (stop - 1) // count + 1]

    def masked(start: int, stop: int) -> np.ndarray:
        first, chunk_masks = mask_range(start, stop)
        flat = np.arange(start, stop)
        kept = chunk_masks[flat // count - first][..., None]
        return fill + (batch[flat % count] - fill) * kept

    def record(start: int, stop: int, probability: np.ndarray) -> None:
        flat = np.arange(start, stop)
        image = flat % count
        if not every_class:
            probability = probability[np.arange(len(flat)), chosen[image]][:, None]
        read[flat // count, image] = probability

    probabilities_of(model, count * mask_set.count, masked, output=output,
                     batch_size=batch_size, consume=record)
    saliency = np.zeros((count * classes, height * width), np.float64)
    block = max(1, (1 << 24) // (height * width))  # masks per block: at most 64 MiB of them
    for first in range(0, mask_set.count, block):
        stop = min(first + block, mask_set.count)
        saliency += read[first:stop].reshape(stop - first, -1).T @ mask_set[first:stop].reshape(
            stop - first, -1)
    saliency /= mask_set.count * mask_set.keep
    return (saliency.reshape(count, classes, height, width).astype(np.float32),
            intact.astype(np.float32), chosen)
