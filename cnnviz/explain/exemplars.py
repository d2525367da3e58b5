"""Exemplars: the images of a data set that activate a unit most (Zeiler & Fergus 2014).

For a channel of a conv layer, each image scores its largest activation over the layer's grid,
at its first such position (row-major), and the image's crop under that position's receptive
field is what the unit saw; for a class, each image scores the class's pre-softmax logit. The
images stream through one compiled forward pass per fixed-size chunk, and only a running top-k
per unit is kept: memory stays flat in the number of images. The result equals a brute-force
ranking of all images, ties going to the earlier image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cnnviz.errors import CnnvizError
from cnnviz.explain.receptive_field import receptive_field
from cnnviz.model.compiled import (
    batch_size_for,
    check_images,
    layer_outputs,
    model_copy,
    num_classes,
    run_batched,
)
from cnnviz.model.graph import layer_tensor

# Above every position index: what the first-maximum search takes where a value is not the max.
_NO_POSITION = np.iinfo(np.int32).max


@dataclass(frozen=True)
class Exemplars:
    """The top images of each unit, best first.

    Attributes:
        layer: the layer's path, or None for classes.
        units: (U,) int32 channels of the layer, or classes.
        images: (U, k) int64 index of each exemplar in the images given.
        activations: (U, k) float32 its score: the unit's largest activation in it, or the
            class logit.
        positions: (U, k, 2) int32 (row, col) of that activation in the layer's grid; (0, 0)
            for classes.
        boxes: (U, k, 4) int32 (top, left, bottom, right) of the input under the position's
            receptive field, bottom and right exclusive; the whole image for classes.
    """

    layer: str | None
    units: np.ndarray
    images: np.ndarray
    activations: np.ndarray
    positions: np.ndarray
    boxes: np.ndarray


class _RunningTop:
    """The `top` highest scores per unit seen so far, over chunks that arrive in image order."""

    def __init__(self, top: int, units: int):
        self.top = top
        self.values = np.zeros((0, units), np.float32)
        self.images = np.zeros((0, units), np.int64)
        self.positions = np.zeros((0, units), np.int64)

    def add(self, start: int, values: np.ndarray, positions: np.ndarray) -> None:
        """Merge a chunk: values and flat positions (B, U) of images start..start+B-1."""
        index = np.broadcast_to(np.arange(start, start + len(values))[:, None], values.shape)
        values = np.concatenate([self.values, values])
        images = np.concatenate([self.images, index])
        positions = np.concatenate([self.positions, positions])
        # Stable on the kept rows first: equal scores keep the earlier image ahead.
        order = np.argsort(-values, axis=0, kind="stable")[: self.top]
        self.values = np.take_along_axis(values, order, axis=0)
        self.images = np.take_along_axis(images, order, axis=0)
        self.positions = np.take_along_axis(positions, order, axis=0)


def unit_exemplars(
    model,
    images,
    layer,
    units: Sequence[int] | None = None,
    *,
    top: int = 9,
    batch_size: int | None = None,
) -> Exemplars:
    """The `top` images that activate each chosen channel of `layer` most, with where.

    Args:
        model: a built Sequential or functional model with one image input.
        images: (N, H, W, C) model inputs: an array, or anything whose slices read lazily
            (`cnnviz.report.selection.ImageFiles`), read one chunk at a time.
        layer: a layer with a 4-D output (path, unique name or object).
        units: its channels to rank (None: all).
        top: exemplars per unit (fewer when there are fewer images).
        batch_size: most images per forward pass; None sizes it to the model.

    Returns:
        `Exemplars` with the receptive-field box of each exemplar's position.
    """
    from keras import ops

    field = receptive_field(model, layer)
    copy = model_copy(model, "output", output=0)
    path = field.layer
    channels = int(layer_tensor(copy.model, path).shape[-1])
    chosen = _units(units, channels, f"{path}'s {channels} channels")
    grid_width = field.grid[1]

    def make_body(clone):
        outputs = layer_outputs(clone, [path])

        def body(chunk):
            (maps,) = outputs(chunk)
            cells = maps.shape[1] * maps.shape[2]
            flat = ops.take(ops.reshape(maps, (ops.shape(maps)[0], cells, channels)), chosen,
                            axis=2)
            best = ops.max(flat, axis=1)
            # The first position holding the maximum (argmax leaves ties unspecified).
            where = ops.arange(cells, dtype="int32")[None, :, None]
            first = ops.min(ops.where(flat == best[:, None, :], where, _NO_POSITION), axis=1)
            return best, first

        return body

    ranked = _ranked(copy, f"exemplars:{path}:{chosen.tolist()}", make_body, images, top,
                     len(chosen), batch_size)
    flat = ranked.positions.T  # (U, k)
    positions = np.stack([flat // grid_width, flat % grid_width], axis=-1).astype(np.int32)
    boxes = np.asarray([[field.box(int(row), int(col)) for row, col in unit]
                        for unit in positions], np.int32).reshape(len(chosen), -1, 4)
    return Exemplars(path, chosen, ranked.images.T.copy(), ranked.values.T.copy(), positions,
                     boxes)


def class_exemplars(
    model,
    images,
    classes: Sequence[int] | None = None,
    *,
    top: int = 9,
    output=None,
    batch_size: int | None = None,
) -> Exemplars:
    """The `top` images with the highest pre-softmax score of each class.

    Args:
        model: a built classifier with one image input.
        images: (N, H, W, C) model inputs, an array or lazily sliced (as `unit_exemplars`).
        classes: the classes to rank (None: all). One sigmoid unit z scores class 1 by z and
            class 0 by -z (`cnnviz.model.outputs.target_scores`).
        top: exemplars per class.
        output: which output of a multi-output model (index or name).
        batch_size: most images per forward pass; None sizes it to the model.

    Returns:
        `Exemplars` with layer None, positions (0, 0) and the whole image as box.
    """
    from keras import ops

    copy = model_copy(model, "logits", output=output)
    count = num_classes(copy.model)
    chosen = _units(classes, count, f"the model's {count} classes")

    def make_body(clone):
        def body(chunk):
            logits = clone(chunk, training=False)
            if logits.shape[-1] == 1:
                logits = ops.concatenate([-logits, logits], axis=1)
            scores = ops.take(logits, chosen, axis=1)
            return scores, ops.zeros(ops.shape(scores), "int32")

        return body

    ranked = _ranked(copy, f"class_exemplars:{chosen.tolist()}", make_body, images, top,
                     len(chosen), batch_size)
    height, width = (int(side) for side in copy.model.inputs[0].shape[1:3])
    shape = ranked.images.T.shape
    return Exemplars(None, chosen, ranked.images.T.copy(), ranked.values.T.copy(),
                     np.zeros((*shape, 2), np.int32),
                     np.broadcast_to(np.asarray([0, 0, height, width], np.int32),
                                     (*shape, 4)).copy())


def _units(units, count: int, domain: str) -> np.ndarray:
    chosen = np.arange(count) if units is None else np.asarray(units, np.int64).reshape(-1)
    bad = chosen[(chosen < 0) | (chosen >= count)]
    if bad.size:
        raise CnnvizError(f"unit {int(bad[0])} is outside {domain} (0..{count - 1})")
    if not chosen.size:
        raise CnnvizError(f"no unit chosen of {domain}")
    return chosen.astype(np.int32)


def _ranked(copy, name: str, make_body, images, top: int, units: int,
            batch_size: int | None) -> _RunningTop:
    """Run `make_body`'s (scores, flat positions) over every image, keeping the running top."""
    if not isinstance(top, (int, np.integer)) or top < 1:
        raise CnnvizError(f"top must be a positive integer; received {top!r}")
    check_images(copy.model, images)
    running = _RunningTop(int(top), units)
    run_batched(copy, name, make_body, len(images),
                lambda a, b: [np.asarray(images[a:b], np.float32)],
                batch_size_for(copy, batch_size),
                consume=lambda start, stop, outputs: running.add(start, *outputs))
    return running
