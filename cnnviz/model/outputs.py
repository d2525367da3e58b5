"""What every explanation method shares: which output, its logits copy and target scores, the
model's input range, the default layer.

One place decides "what do we differentiate" (tf-keras-vis's model modifier + score): the
pre-softmax output of a *copy* of the model (one output of a multi-output model), and for each
image the score of its target class. The copies are flat replays of the model's graph over its
own layers (`_graph.rebuild`), so layers inside nested models are reached the same way.
"""

from __future__ import annotations

import functools

import numpy as np

from cnnviz._keras import producer
from cnnviz.errors import CnnvizError
from cnnviz.model.exported import is_exported
from cnnviz.model.graph import (
    IDENTITY,
    find_layer,
    is_nested_model,
    layer_entries,
    layer_tensor,
    output_producer,
    rebuild,
)

_SQUASHING = ("softmax", "sigmoid")
# Layers that only carry or preprocess the input: never a layer to explain.
INPUT_LAYERS = ("InputLayer", "Rescaling", "Normalization")


def _activation_name(layer) -> str | None:
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    return getattr(activation, "__name__", str(activation))


# ----------------------------------------------------------------------------------- outputs
def output_names(model) -> list[str]:
    """One name per output: the name of the layer that produces it (an exported model's own
    output names)."""
    if is_exported(model):
        return [tensor.name for tensor in model.outputs]
    return [producer(tensor)[0].name for tensor in model.outputs]


def output_index(model, output=None) -> int:
    """The index of the output `output` means: None (the only one), an index, or a name.

    Raises:
        CnnvizError: a model with several outputs and `output` None, or an unknown output;
            the message lists the outputs.
    """
    if output is None and len(model.outputs) == 1:
        return 0
    names = output_names(model)
    listing = ", ".join(
        f"{index} {name!r} ({int(model.outputs[index].shape[-1])} units)"
        for index, name in enumerate(names)
    )
    if output is None:
        raise CnnvizError(
            f"model {model.name!r} has {len(names)} outputs: {listing}; choose one with "
            "--output NAME|INDEX (API: output=)"
        )
    if isinstance(output, str) and output.strip().isdigit():
        output = int(output)
    if isinstance(output, (int, np.integer)) and not isinstance(output, bool):
        if 0 <= output < len(names):
            return int(output)
    elif isinstance(output, str) and output in names:
        return names.index(output)
    raise CnnvizError(f"model {model.name!r} has no output {output!r}; its outputs: {listing}")


def output_activation(model, output=None) -> str:
    """What an output holds: "softmax", "sigmoid" (probabilities) or "linear" (logits, scores).

    Read from the layer that produces it: a Softmax layer, or a layer whose `activation` is
    softmax or sigmoid; anything else (Dense without activation, ...) is "linear". An exported
    model says it itself (`ExportedModel.output_activation`).
    """
    if is_exported(model):
        return model.output_activation(output_index(model, output))
    producer = output_producer(model, output_index(model, output)).layer
    kind = type(producer).__name__
    if kind == "Softmax":
        return "softmax"
    name = _activation_name(producer)
    return name if name in _SQUASHING else "linear"


def logits_model(model, *, output=None):
    """A flat copy of `model` whose output is the pre-softmax (pre-sigmoid) score.

    The layer producing the output (inside a nested model too) is called with a linear
    activation, or dropped when it is a trailing Softmax/Activation layer; every layer is the
    user's own (shared variables, no weight copy), and the user's model is never changed
    (keras.io's Grad-CAM sets `layers[-1].activation = None` on the caller's model; we don't).
    An output that is already linear (logits) is returned as it is.

    Args:
        model: a built Keras model (Sequential or functional).
        output: which output (None when there is one; an index or a name).

    Returns:
        A `keras.Model` from the model's input to the chosen output's logits.
    """
    index = output_index(model, output)
    return rebuild(model, output=index, substitute=linear_output_substitute(model, index)).model


def probabilities_model(model, *, output=None):
    """A flat copy of `model` whose output is probabilities: the model's own when it ends in a
    softmax/sigmoid, else softmax (sigmoid for one unit) applied to its logits."""
    import keras

    index = output_index(model, output)
    append = None
    if output_activation(model, index) == "linear":
        squash = "sigmoid" if model.outputs[index].shape[-1] == 1 else "softmax"
        append = keras.layers.Activation(squash, name=f"cnnviz_{squash}")
    return rebuild(model, output=index, append=append).model


def linear_output_substitute(model, index: int):
    """A `rebuild` substitute that makes output `index`'s producing layer linear."""
    producer = output_producer(model, index)
    if output_activation(model, index) == "linear":
        return None
    layer = producer.layer
    if type(layer).__name__ in ("Softmax", "Activation"):
        replacement = IDENTITY
    else:
        replacement = swapped_activation(layer, "linear")

    def substitute(path, candidate):
        return replacement if path == producer.path else None

    return substitute


def swapped_activation(layer, activation):
    """A layer that calls `layer` (its variables, no copy) with `activation` in place of its own.

    The swap lasts only while the wrapper calls `layer` and is undone in `finally`; the
    graphs cnnviz compiles are traced once, so the swapped function stays in them.
    """
    import keras

    return _swapped_class()(layer, keras.activations.get(activation))


@functools.cache
def _swapped_class():
    import keras

    class SwappedActivation(keras.layers.Layer):
        def __init__(self, layer, activation):
            super().__init__(name=layer.name, dtype=layer.dtype_policy)
            self.layer = layer
            self.swapped = activation

        def call(self, inputs):
            saved = self.layer.activation
            self.layer.activation = self.swapped
            try:
                return self.layer(inputs)
            finally:
                self.layer.activation = saved

    return SwappedActivation


def class_probabilities(model_outputs) -> np.ndarray:
    """Probabilities per class, (N, K); a single sigmoid unit p becomes the two columns [1-p, p]."""
    probabilities = np.asarray(model_outputs, dtype=np.float32)
    if probabilities.shape[-1] == 1:
        probabilities = np.concatenate([1.0 - probabilities, probabilities], axis=-1)
    return probabilities


def resolve_targets(targets, predicted_classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Return one int class per image: `targets` as given (an int or a sequence), else the
    predicted one.

    `num_classes` counts a binary sigmoid model as 2 classes.
    """
    count = len(predicted_classes)
    if targets is None:
        return np.asarray(predicted_classes, dtype=np.int32)
    resolved = np.broadcast_to(np.asarray(targets, dtype=np.int64), (count,)).astype(np.int32)
    bad = resolved[(resolved < 0) | (resolved >= num_classes)]
    if bad.size:
        raise CnnvizError(
            f"target class {int(bad[0])} is out of range; "
            f"the model has classes 0..{num_classes - 1}"
        )
    return resolved


def target_scores(logits, targets):
    """The score each image is explained by: its target's logit, shape (N,). `keras.ops`, any
    backend.

    For one sigmoid unit z, class 1 scores z and class 0 scores -z (its own log-odds), so a
    gradient always points towards "more of the target class".
    """
    from keras import ops

    targets = ops.cast(targets, "int32")
    if logits.shape[-1] == 1:
        sign = ops.cast(2 * targets - 1, logits.dtype)
        return logits[:, 0] * sign
    # A select, not a gather: the same number, and TensorFlow builds a gather's gradient
    # graph slowly (~50 ms of a first Grad-CAM's 0.3 s on the digits CNN).
    chosen = ops.arange(logits.shape[-1], dtype="int32")[None, :] == targets[:, None]
    return ops.sum(ops.where(chosen, logits, ops.zeros_like(logits)), axis=1)


def output_rank(layer) -> int | None:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):
        return None


def four_d_paths(model) -> list[str]:
    """Paths of every layer with a 4-D output (N, h, w, channels), nested models opened;
    input and preprocessing layers (`INPUT_LAYERS`) are not layers to explain."""
    return [entry.path for entry in layer_entries(model)
            if output_rank(entry.layer) == 4 and not is_nested_model(entry.layer)
            and type(entry.layer).__name__ not in INPUT_LAYERS]


def default_layer_path(model) -> str:
    """The path of the last layer with a 4-D output (N, H, W, C): Grad-CAM's default layer.

    Nested models are searched: on `x = base(inputs); pool; dense` it is base's last layer.
    """
    paths = four_d_paths(model)
    if not paths:
        raise CnnvizError(
            f"model {model.name!r} has no layer with a 4-D output (N, H, W, C) to explain"
        )
    return paths[-1]


def default_conv_layer(model):
    """The layer object at `default_layer_path(model)`."""
    return get_layer(model, default_layer_path(model))


def get_layer(model, name: str):
    """The layer a path (`base/conv`) or a unique name means, or a CnnvizError naming the
    close matches (see `_graph.find_layer`)."""
    return find_layer(model, name).layer


def features_and_logits(clone, layer_name: str):
    """A callable `images -> (layer output, model output)` on `clone`, for use inside a
    GradientTape.

    The one way gradient methods that look at a layer (Grad-CAM and the CAM family) reach its
    activations, so a gradient flows from the output back to exactly these tensors; layers
    inside nested models are reached through the copy's flat graph.

    Args:
        clone: a model copy (from `_compiled.model_copy`), never the user's model.
        layer_name: a layer path of the user's model, as `gradcam_layer` resolved it.

    Returns:
        A `keras.Model` mapping (N, H, W, C) images to [(N, h, w, K) activations, (N, classes)].
    """
    import keras

    return keras.Model(clone.inputs[0], [layer_tensor(clone, layer_name), clone.outputs[0]])
