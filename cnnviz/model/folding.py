"""BatchNormalization folded into the convolution before it, for input-gradient copies.

In inference a BatchNormalization is a per-channel affine map, so `conv -> norm` is one
convolution with the kernel scaled by gamma / sqrt(var + eps) and a shifted bias. Folding it
removes two elementwise passes over every normalized activation forward and one backward: on
ResNet50 (53 of them) vanilla saliency drops from ~2.3 to ~2.1 forward passes of the model.
The folded layer computes its kernel and bias from the user's own variables at every call
(a few weight-sized ops a chunk), so, like every copy, it never copies a weight and is never
stale. Only copies that differentiate with respect to the input use it: a conv layer's own
output (the pre-normalization activations a user may name for a CAM or a feature map) is not
in a folded copy.
"""

from __future__ import annotations

import functools

from cnnviz.model.graph import IDENTITY, Substitute, walk


def _foldable_convolution(layer) -> bool:
    import keras

    # Conv1D/2D/3D, channels last, linear: the kernel's last axis is the output channel,
    # which the normalization scales. (Transposed and depthwise kernels lay channels out
    # otherwise; an activation between the two stops the fold.)
    kinds = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
    return (isinstance(layer, kinds)
            and not isinstance(layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                                       keras.layers.Conv3DTranspose,
                                       keras.layers.DepthwiseConv2D))
            and layer.data_format == "channels_last"
            and layer.activation in (None, keras.activations.linear))


def _foldable_normalization(layer, rank: int) -> bool:
    import keras

    return (type(layer) is keras.layers.BatchNormalization
            and layer.axis in (-1, rank - 1)
            and not getattr(layer, "renorm", False))


def batch_norm_folds(model, *, keep: set[str] = frozenset()) -> dict[str, tuple[str, object]]:
    """{conv path: (normalization path, normalization layer)} for every BatchNormalization
    whose one input is a foldable convolution's output used by nothing else.

    `keep`: paths that must keep their own output (the output's producer). Each layer of a
    pair is called once in the graph (a shared layer is left alone).
    """
    import keras

    from cnnviz._keras import all_layers

    if not any(type(layer) is keras.layers.BatchNormalization for layer in all_layers(model)):
        return {}
    producers: dict[int, tuple[str, object]] = {}  # id(tensor) -> (path, layer)
    consumers: dict[int, int] = {}
    calls: dict[int, int] = {}
    normalizations: list[tuple[str, object, list]] = []

    def call_leaf(path, operation, args, kwargs):
        result = operation(*args, **kwargs)
        inputs = [value for value in keras.tree.flatten((args, kwargs))
                  if isinstance(value, keras.KerasTensor)]
        for tensor in inputs:
            consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
        for tensor in keras.tree.flatten(result):
            producers[id(tensor)] = (path, operation)
        calls[id(operation)] = calls.get(id(operation), 0) + 1
        if isinstance(operation, keras.layers.BatchNormalization):
            normalizations.append((path, operation, inputs))
        return result

    inputs = [keras.Input(tuple(t.shape[1:]), dtype=t.dtype) for t in model.inputs]
    for tensor in keras.tree.flatten(walk(model, inputs, call_leaf)):
        consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1  # an output is a use
    folds = {}
    for path, normalization, given in normalizations:
        if len(given) != 1 or path in keep or calls[id(normalization)] != 1:
            continue
        (tensor,) = given
        conv_path, conv = producers.get(id(tensor), (None, None))
        if (conv is None or conv_path in keep or calls[id(conv)] != 1
                or consumers[id(tensor)] != 1 or not _foldable_convolution(conv)
                or not _foldable_normalization(normalization, len(tensor.shape))):
            continue
        folds[conv_path] = (path, normalization)
    return folds


def folding_substitute(model, *, keep: set[str] = frozenset(),
                       then: Substitute | None = None) -> Substitute | None:
    """A `rebuild` substitute calling each foldable conv as `FoldedConvolution` and passing
    its normalization through; any other layer goes to `then`. None when nothing folds."""
    folds = batch_norm_folds(model, keep=keep)
    if not folds:
        return then
    folded = {path for path, _ in folds.values()}

    def substitute(path, layer):
        if path in folds:
            return _folded_class()(layer, folds[path][1])
        if path in folded:
            return IDENTITY
        return then(path, layer) if then is not None else None

    return substitute


@functools.cache
def _folded_class():
    import keras
    from keras import ops

    class FoldedConvolution(keras.layers.Layer):
        """`norm(conv(x))` in inference as one convolution, from the two layers' variables."""

        def __init__(self, conv, norm):
            super().__init__(name=conv.name, dtype=conv.dtype_policy)
            self.conv, self.norm = conv, norm

        def call(self, inputs):
            conv, norm = self.conv, self.norm
            dtype = self.compute_dtype
            scale = ops.rsqrt(ops.cast(norm.moving_variance, dtype) + norm.epsilon)
            if norm.scale:
                scale = scale * ops.cast(norm.gamma, dtype)
            shift = -ops.cast(norm.moving_mean, dtype)
            if conv.use_bias:
                shift = shift + ops.cast(conv.bias, dtype)
            bias = shift * scale
            if norm.center:
                bias = bias + ops.cast(norm.beta, dtype)
            kernel = ops.cast(conv.kernel, dtype) * scale
            return conv.convolution_op(ops.cast(inputs, dtype), kernel) + bias

        def compute_output_shape(self, input_shape):
            return self.conv.compute_output_shape(input_shape)

    return FoldedConvolution
