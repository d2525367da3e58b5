"""Receptive fields: the input box each position of a layer's grid sees, from the layer graph.

Along each axis a tensor's position o sees the input pixels [o * jump + start, o * jump + start
+ size): the model input has (start, jump, size) = (0, 1, 1), and every layer that looks at a
neighbourhood (Conv2D, DepthwiseConv2D, SeparableConv2D, max/average pooling, with their kernel
sizes, strides, dilations and "valid"/"same" padding; ZeroPadding2D, Cropping2D) composes its
own (Araujo et al. 2019, "Computing Receptive Fields of Convolutional Neural Networks"). Merges
(Add, Concatenate) take the union of their inputs' boxes; pointwise layers (activations,
normalization, dropout, Rescaling) pass them on. Nested models are opened by `walk`. The box is
the bounding box (a dilated kernel's holes included), clipped to the image.
"""

from __future__ import annotations

from dataclasses import dataclass

from cnnviz.errors import CnnvizError
from cnnviz.model.compiled import model_copy, require_built
from cnnviz.model.graph import find_layer, layer_tensor, walk

_CONVOLUTIONS = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D")
_POOLINGS = ("MaxPooling2D", "AveragePooling2D")
_GLOBAL = ("GlobalMaxPooling2D", "GlobalAveragePooling2D")


@dataclass(frozen=True)
class _Axis:
    """One spatial axis of a tensor: position o sees input [o * jump + start, ... + size)."""

    start: int
    jump: int
    size: int
    length: int  # the tensor's own length along this axis


@dataclass(frozen=True)
class ReceptiveField:
    """The input box of every position of one layer's (h, w) grid.

    Attributes:
        layer: the layer's path.
        grid: (h, w) of the layer's output.
        image: (H, W) of the model's input.
        start, jump, size: (rows, columns) pairs: position (i, j) sees input rows
            [i * jump[0] + start[0], ... + size[0]) (before clipping), and so for columns.
    """

    layer: str
    grid: tuple[int, int]
    image: tuple[int, int]
    start: tuple[int, int]
    jump: tuple[int, int]
    size: tuple[int, int]

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of position (row, col), bottom and right exclusive (as
        slices: image[top:bottom, left:right]), clipped to the image."""
        corners = []
        for axis, position in enumerate((row, col)):
            first = position * self.jump[axis] + self.start[axis]
            corners.append((max(first, 0), min(first + self.size[axis], self.image[axis])))
        (top, bottom), (left, right) = corners
        return top, left, bottom, right


@dataclass(frozen=True)
class _Grid:
    """The (rows, cols) axes of one tensor (one object, so it flows through the graph whole)."""

    rows: _Axis
    cols: _Axis


class _NoGrid:
    """What flows out of a layer whose output has no spatial grid (Flatten, Dense)."""


_NO_GRID = _NoGrid()


def receptive_field(model, layer) -> ReceptiveField:
    """The receptive field of `layer`'s output positions in `model`'s input.

    Args:
        model: a built Sequential or functional model with one image input (H, W, C).
        layer: a layer with a 4-D output (N, h, w, channels): a path, unique name or object.

    Returns:
        A `ReceptiveField`; `.box(row, col)` is the input box of one position.

    Raises:
        CnnvizError: a layer without a spatial grid, or a layer on the way whose effect on
            positions cannot be traced (Conv2DTranspose, UpSampling2D, Resizing, ...).
    """
    require_built(model)
    entry = find_layer(model, layer)
    copy = model_copy(model, "output", output=0).model
    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3 or None in shape[:2]:
        raise CnnvizError(f"model {model.name!r} has input shape {shape}; a receptive field "
                          "needs a fixed (H, W, C) image input")
    fields: dict[str, object] = {}

    def call_leaf(path, operation, args, kwargs):
        import keras

        given = [value for value in keras.tree.flatten((args, kwargs))
                 if isinstance(value, _Grid)]
        return _through(path, operation, given, layer_tensor(copy, path).shape)

    image = _Grid(_Axis(0, 1, 1, int(shape[0])), _Axis(0, 1, 1, int(shape[1])))
    walk(model, [image], call_leaf, record=fields)
    found = fields.get(entry.path, _NO_GRID)
    if found is _NO_GRID:
        raise CnnvizError(f"layer {entry.path!r} has output shape "
                          f"{tuple(layer_tensor(copy, entry.path).shape)}; a receptive field "
                          "needs a 4-D (N, h, w, channels) output")
    rows, cols = found.rows, found.cols
    return ReceptiveField(entry.path, (rows.length, cols.length), (shape[0], shape[1]),
                          (rows.start, cols.start), (rows.jump, cols.jump),
                          (rows.size, cols.size))


def _through(path: str, layer, given: list, shape) -> object:
    """The grid of `layer`'s output, from those of its inputs."""
    kind = type(layer).__name__
    if not given or len(shape) != 4:
        return _NO_GRID
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise CnnvizError(f"layer {path!r} is channels_first; receptive fields are traced for "
                          "channels_last layers only")
    if len(given) > 1:
        return _union(path, given)
    axes = (given[0].rows, given[0].cols)
    if kind in _CONVOLUTIONS or kind in _POOLINGS:
        kernel = layer.kernel_size if kind in _CONVOLUTIONS else layer.pool_size
        dilation = layer.dilation_rate if kind in _CONVOLUTIONS else (1, 1)
        traced = tuple(_window(axis, k, s, d, layer.padding)
                       for axis, k, s, d in zip(axes, kernel, layer.strides, dilation))
    elif kind == "ZeroPadding2D":
        traced = tuple(_Axis(a.start - before * a.jump, a.jump, a.size, a.length + before + after)
                       for a, (before, after) in zip(axes, layer.padding))
    elif kind == "Cropping2D":
        traced = tuple(_Axis(a.start + before * a.jump, a.jump, a.size, a.length - before - after)
                       for a, (before, after) in zip(axes, layer.cropping))
    elif kind in _GLOBAL:  # keepdims=True: one position that sees everything its input sees
        traced = tuple(_Axis(a.start, a.jump, a.size + (a.length - 1) * a.jump, 1) for a in axes)
    elif hasattr(layer, "kernel_size") or hasattr(layer, "pool_size"):
        raise CnnvizError(f"layer {path!r} is a {kind}, whose receptive field cnnviz cannot "
                          f"trace (it traces {', '.join(_CONVOLUTIONS + _POOLINGS)}, padding, "
                          "cropping and pointwise layers)")
    else:
        traced = axes
    if (traced[0].length, traced[1].length) != (shape[1], shape[2]):
        raise CnnvizError(f"layer {path!r} ({kind}) changes the grid from "
                          f"{(axes[0].length, axes[1].length)} to {tuple(shape[1:3])}, which "
                          "cnnviz cannot trace back to input pixels")
    return _Grid(*traced)


def _window(axis: _Axis, kernel: int, stride: int, dilation: int, padding: str) -> _Axis:
    """The axis after a sliding window (TensorFlow's padding: "same" pads the total
    max((out - 1) * stride + span - n, 0), the smaller half before)."""
    span = (kernel - 1) * dilation + 1
    if padding == "same":
        length = -(-axis.length // stride)
        before = max((length - 1) * stride + span - axis.length, 0) // 2
    else:
        length = (axis.length - span) // stride + 1
        before = 0
    return _Axis(axis.start - before * axis.jump, axis.jump * stride,
                 axis.size + (span - 1) * axis.jump, length)


def _union(path: str, given: list) -> _Grid:
    """A merge's axes: the bounding box of its inputs' boxes at each position."""
    merged = []
    for axes in zip(*((grid.rows, grid.cols) for grid in given)):
        if len({(a.jump, a.length) for a in axes}) > 1:
            raise CnnvizError(f"layer {path!r} merges grids of different strides or sizes; "
                              "cnnviz cannot trace its receptive field")
        start = min(a.start for a in axes)
        end = max(a.start + a.size for a in axes)
        merged.append(_Axis(start, axes[0].jump, end - start, axes[0].length))
    return _Grid(*merged)
