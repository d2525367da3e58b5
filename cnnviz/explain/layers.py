"""Looking inside a CNN: its layers (nested models opened), their kernels and feature maps.

A layer is named by its path through nested models (`base/block_13_expand_relu`) or, where
unique, by its name alone (`_graph.find_layer`). `filters` reads weights; `layer_activations`
runs one compiled forward pass per chunk for a whole set of layers and can keep only each
image's most active channels; neither takes a gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cnnviz.errors import CnnvizError
from cnnviz.model.compiled import (
    batch_size_for,
    check_images,
    layer_outputs,
    model_copy,
    require_built,
    run_batched,
)
from cnnviz.model.graph import (
    LayerEntry,
    find_layer,
    is_nested_model,
    layer_entries,
    layer_tensor,
    list_paths,
    rebuild,
)
from cnnviz.model.inputs import as_image_batch
from cnnviz.model.outputs import four_d_paths, output_rank

# Layer types whose kernels `filters` draws, and the weight that holds the spatial kernels.
_KERNELS = {"Conv2D": "kernel", "DepthwiseConv2D": "kernel",
            "SeparableConv2D": "depthwise_kernel"}


def resolve_layer(model, layer):
    """The layer object for `layer` (a path, a unique name or a layer of `model`)."""
    return find_layer(model, layer).layer


def kernel_paths(model, kinds: tuple[str, ...] = tuple(_KERNELS)) -> list[str]:
    """Paths of the layers `filters` can draw (Conv2D, DepthwiseConv2D, SeparableConv2D; or
    only `kinds` of them), nested models opened."""
    return [entry.path for entry in layer_entries(model) if type(entry.layer).__name__ in kinds]


def filters(model, layer) -> np.ndarray:
    """The spatial kernels of a Conv2D, DepthwiseConv2D or SeparableConv2D layer.

    Args:
        model: a built Keras model.
        layer: the layer, by path, unique name, or as a layer object of `model`.

    Returns:
        float32 array (kh, kw, in_channels, filters). Conv2D: its kernel, the bias left out.
        DepthwiseConv2D and SeparableConv2D: the depthwise kernels as (kh, kw, 1, in x
        multiplier), one single-channel filter per output channel of the depthwise step, in
        TensorFlow's order (input channel c, multiplier m -> c * multiplier + m); a separable
        layer's 1 x 1 pointwise kernel is not spatial and is left out.

    Raises:
        CnnvizError: the layer is missing or has no spatial kernel (the message lists those
            that do).
    """
    entry = find_layer(model, layer)
    kind = type(entry.layer).__name__
    if kind not in _KERNELS:
        raise CnnvizError(
            f"layer {entry.path!r} is a {kind}, not a Conv2D, DepthwiseConv2D or SeparableConv2D "
            f"layer. Layers with kernels: {list_paths(kernel_paths(model))}"
        )
    kernel = np.asarray(getattr(entry.layer, _KERNELS[kind]), dtype=np.float32)
    if kind != "Conv2D":
        kh, kw, channels, multiplier = kernel.shape
        kernel = kernel.reshape(kh, kw, 1, channels * multiplier)
    return kernel


# ------------------------------------------------------------------------------- layer table
@dataclass(frozen=True)
class LayerRow:
    """One row of `layer_table`."""

    path: str
    kind: str
    output_shape: tuple
    params: int
    gradcam: bool  # a 4-D output: valid for Grad-CAM and feature maps
    filters: bool  # spatial kernels `filters` can draw

    @property
    def uses(self) -> str:
        uses = (["gradcam", "feature-maps"] if self.gradcam else []) + (
            ["filters"] if self.filters else [])
        return ", ".join(uses)


def layer_table(model) -> list[LayerRow]:
    """Every layer path of `model` (nested models opened) with its output shape, its type and
    what it can be shown with.

    Output shapes are those of the layer inside the whole model (a backbone built for any image
    size shows the sizes the model's input gives it).
    """
    require_built(model, single_input=False)
    tensors = rebuild(model, output=None).tensors
    rows = []
    for entry in layer_entries(model):
        tensor = tensors.get(entry.path)
        shape = (tuple(tensor.shape) if tensor is not None and hasattr(tensor, "shape")
                 else _first_output_shape(entry))
        nested = is_nested_model(entry.layer)
        rows.append(LayerRow(
            path=entry.path, kind=type(entry.layer).__name__, output_shape=shape,
            params=int(entry.layer.count_params()) if entry.layer.built else 0,
            gradcam=len(shape) == 4 and not nested,
            filters=type(entry.layer).__name__ in _KERNELS,
        ))
    return rows


def _first_output_shape(entry: LayerEntry) -> tuple:
    try:
        return tuple(entry.layer.output.shape)
    except (AttributeError, ValueError):
        return ()


def format_layer_table(rows: Sequence[LayerRow]) -> str:
    """`layer_table` as aligned text, one layer per line, nested layers indented by path."""
    header = ("layer path", "type", "output shape", "params", "valid for")
    lines = [(row.path, row.kind, str(row.output_shape), f"{row.params:,}", row.uses)
             for row in rows]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
            for line in [header, *lines]]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text)


# ------------------------------------------------------------------------------ feature maps
@dataclass(frozen=True)
class LayerActivations:
    """One layer's feature maps for a batch of images.

    Attributes:
        maps: (N, h, w, k) float32: the kept channels, most active first when capped.
        channels: (N, k) int32: which channel of the layer each map is.
        total_channels: how many channels the layer has.
    """

    maps: np.ndarray
    channels: np.ndarray
    total_channels: int


def _check_feature_layer(model, layer) -> str:
    entry = find_layer(model, layer)
    if output_rank(entry.layer) != 4:
        raise CnnvizError(
            f"layer {entry.path!r} has no 4-D output (N, h, w, channels) to show as feature "
            f"maps. Layers with one: {list_paths(four_d_paths(model))}"
        )
    return entry.path


def layer_activations(
    model,
    images,
    layers: Sequence,
    *,
    max_channels: int | None = None,
    output=None,
    batch_size: int | None = None,
) -> dict[str, LayerActivations]:
    """The feature maps of several layers, all from one compiled forward pass per chunk.

    Args:
        model: a built Keras model; layers inside nested models are reached by path.
        images: (N, H, W, C) or (H, W, C), in the model's input scale.
        layers: layers with a 4-D output (paths, unique names or layer objects).
        max_channels: keep, per image and layer, only this many channels: those with the
            largest mean |activation| for that image, most active first. None keeps all, in
            order.
        output: the output of a multi-output model the copy is built for (it does not change
            the maps; None: the first).
        batch_size: most images per chunk; None sizes it to the model.

    Returns:
        {path: LayerActivations}, in the order given.

    Raises:
        CnnvizError: a missing layer, one without a 4-D output, or max_channels < 1.
    """
    from keras import ops

    if max_channels is not None and (not isinstance(max_channels, (int, np.integer))
                                     or max_channels < 1):
        raise CnnvizError(f"max_channels must be a positive integer; received {max_channels!r}")
    paths = list(dict.fromkeys(_check_feature_layer(model, layer) for layer in layers))
    batch = as_image_batch(images)
    copy = model_copy(model, "output", output=0 if output is None else output)
    check_images(copy.model, batch)
    totals = [int(layer_tensor(copy.model, path).shape[-1]) for path in paths]
    kept = [total if max_channels is None else min(total, int(max_channels)) for total in totals]

    def make_body(clone):
        outputs = layer_outputs(clone, paths)

        def body(chunk):
            results = []
            for maps, keep, total in zip(outputs(chunk), kept, totals):
                if keep == total:
                    order = ops.broadcast_to(ops.arange(total, dtype="int32"),
                                             (ops.shape(maps)[0], total))
                else:
                    strength = ops.mean(ops.abs(maps), axis=(1, 2))
                    order = ops.cast(ops.top_k(strength, k=keep)[1], "int32")
                    maps = ops.take_along_axis(maps, order[:, None, None, :], axis=3)
                results += [maps, order]
            return tuple(results)

        return body

    name = f"feature_maps:{max_channels}:" + "|".join(paths)
    results = run_batched(copy, name, make_body, len(batch), lambda a, b: [batch[a:b]],
                          batch_size_for(copy, batch_size))
    return {
        path: LayerActivations(results[2 * i].astype(np.float32, copy=False),
                               results[2 * i + 1].astype(np.int32), totals[i])
        for i, path in enumerate(paths)
    }


def feature_maps(model, images, layer, *, batch_size: int | None = None) -> np.ndarray:
    """The outputs of `layer` for a batch of images: what each of its channels responds to.

    Args:
        model: a built Keras model (Sequential, with or without an explicit Input, or
            functional; a layer inside a nested model is reached by its path).
        images: (N, H, W, C) or a single (H, W, C) image, in the model's input scale.
        layer: a layer with a 4-D output (N, h, w, channels), by path, name or layer object.
        batch_size: most images per forward pass; None sizes it to the model.

    Returns:
        float32 array (N, h, w, channels).

    Raises:
        CnnvizError: the layer is missing or its output is not 4-D (the message lists the layers
            that have a 4-D output).
    """
    path = _check_feature_layer(model, layer)
    return layer_activations(model, images, [path], batch_size=batch_size)[path].maps
