"""What every explanation method shares: the logits copy, the target scores, the default layer.

One place decides "what do we differentiate" (tf-keras-vis's model modifier + score): the
pre-softmax output of a *copy* of the model, and for each image the score of its target class.
"""

from __future__ import annotations

import numpy as np

from cnnviz.errors import CnnvizError

_SQUASHING = ("softmax", "sigmoid")
# Layers that only carry or preprocess the input: never a layer to explain.
INPUT_LAYERS = ("InputLayer", "Rescaling", "Normalization")


def as_image_batch(images) -> np.ndarray:
    """Return `images` as a float32 array of shape (N, H, W, C); a single (H, W, C) image gets N=1."""
    batch = np.asarray(images, dtype=np.float32)
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4:
        raise CnnvizError(
            f"images must have shape (N, H, W, C) or (H, W, C); received shape {batch.shape}"
        )
    return batch


def _first_layer(model):
    """The first layer that computes something (InputLayer skipped), looking inside a nested
    model that comes first (`x = base(inputs)` with the preprocessing inside `base`)."""
    layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    if not layers:
        return None
    first = layers[0]
    if hasattr(first, "layers") and first.layers:
        return _first_layer(first)
    return first


def input_range(model) -> tuple[float, float]:
    """(low, high): the values the model's inputs take, in the units it is fed.

    A model that begins with Keras preprocessing layers takes raw pixels (DECISIONS D1):
    a `Rescaling(scale)` without offset maps (0, 1/scale) onto [0, 1], so cnnviz's own models
    give (0, 255) for images (x / 255), (0, 16)-style ranges only for data in other units; any
    other Rescaling or a leading Normalization means 8-bit pixels, (0, 255). Every other model
    takes inputs in [0, 1]. Explanations take every value in input units (occlusion fill,
    activation-maximization start and clip range) from this one function.

    Args:
        model: a built Keras model.

    Returns:
        (low, high) as floats.
    """
    first = _first_layer(model)
    kind = type(first).__name__
    if kind == "Rescaling":
        scale, offset = first.scale, first.offset
        if np.ndim(scale) == 0 and np.ndim(offset) == 0 and float(offset) == 0.0 and scale > 0:
            return (0.0, float(np.float32(1.0 / float(scale))))
        return (0.0, 255.0)
    if kind == "Normalization":
        return (0.0, 255.0)
    return (0.0, 1.0)


def blurred(images, sigma: float | None = None) -> np.ndarray:
    """A Gaussian blur of each image, per channel: (N, H, W, C) float32.

    The "blur" baseline of integrated gradients and of deletion/insertion: it removes detail but
    keeps the overall intensity, so the model does not see an out-of-distribution blank.

    Args:
        images: (N, H, W, C).
        sigma: standard deviation in pixels; None means min(H, W) / 5.
    """
    from scipy.ndimage import gaussian_filter

    batch = as_image_batch(images)
    sigma = min(batch.shape[1:3]) / 5 if sigma is None else float(sigma)
    if not sigma > 0:
        raise CnnvizError(f"blur sigma must be > 0; received {sigma!r}")
    return gaussian_filter(batch, sigma=(0, sigma, sigma, 0), mode="nearest").astype(np.float32)


def _activation_name(layer) -> str | None:
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    return getattr(activation, "__name__", str(activation))


def is_binary_sigmoid(model) -> bool:
    """True when the model ends in one sigmoid unit (a binary classifier)."""
    last = model.layers[-1]
    return model.outputs[0].shape[-1] == 1 and (
        _activation_name(last) == "sigmoid" or type(last).__name__ == "Activation"
    )


def logits_model(model):
    """Return a copy of `model` whose output is the pre-softmax (pre-sigmoid) score.

    The final softmax/sigmoid is swapped for linear on a clone; the user's model is never touched
    (keras.io's Grad-CAM sets `layers[-1].activation = None` on the caller's model; we don't).
    A trailing `Activation`/`Softmax` layer is dropped instead.

    Args:
        model: a built Keras model (Sequential or functional) with one output.

    Returns:
        A new `keras.Model` sharing no variables with `model`, with the same weights.
    """
    import keras

    last = model.layers[-1]
    if type(last).__name__ in ("Softmax", "Activation") and (
        type(last).__name__ == "Softmax" or _activation_name(last) in _SQUASHING
    ):
        inner = keras.Model(model.inputs, last.input)
        copy = keras.models.clone_model(inner)
        copy.set_weights(inner.get_weights())
        return copy

    def _linear_last(layer):
        config = layer.get_config()
        if layer is last and _activation_name(layer) in _SQUASHING:
            config["activation"] = "linear"
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=_linear_last)
    copy.set_weights(model.get_weights())
    return copy


def class_probabilities(model_outputs) -> np.ndarray:
    """Probabilities per class, (N, K); a single sigmoid unit p becomes the two columns [1-p, p]."""
    probabilities = np.asarray(model_outputs, dtype=np.float32)
    if probabilities.shape[-1] == 1:
        probabilities = np.concatenate([1.0 - probabilities, probabilities], axis=-1)
    return probabilities


def resolve_targets(targets, predicted_classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Return one int class per image: `targets` as given (an int or a sequence), else the predicted one.

    `num_classes` counts a binary sigmoid model as 2 classes.
    """
    count = len(predicted_classes)
    if targets is None:
        return np.asarray(predicted_classes, dtype=np.int32)
    resolved = np.broadcast_to(np.asarray(targets, dtype=np.int64), (count,)).astype(np.int32)
    bad = resolved[(resolved < 0) | (resolved >= num_classes)]
    if bad.size:
        raise CnnvizError(
            f"target class {int(bad[0])} is out of range; the model has classes 0..{num_classes - 1}"
        )
    return resolved


def target_scores(logits, targets):
    """The score each image is explained by: its target's logit, shape (N,). TensorFlow ops.

    For one sigmoid unit z, class 1 scores z and class 0 scores -z (its own log-odds), so a
    gradient always points towards "more of the target class".
    """
    import tensorflow as tf

    targets = tf.cast(targets, tf.int32)
    if logits.shape[-1] == 1:
        sign = tf.cast(2 * targets - 1, logits.dtype)
        return logits[:, 0] * sign
    return tf.gather(logits, targets, axis=1, batch_dims=1)


def default_conv_layer(model):
    """The last layer with a 4-D output (N, H, W, C) before the head: Grad-CAM's default layer."""
    for layer in reversed(model.layers):
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        if len(shape) == 4 and type(layer).__name__ not in INPUT_LAYERS:
            return layer
    raise CnnvizError(
        f"model {model.name!r} has no layer with a 4-D output (N, H, W, C) to explain"
    )


def get_layer(model, name: str):
    """The layer called `name`, or a CnnvizError that lists the layers there are."""
    for layer in model.layers:
        if layer.name == name:
            return layer
    names = ", ".join(layer.name for layer in model.layers)
    raise CnnvizError(f"no layer named {name!r} in model {model.name!r}. Layers: {names}")


def features_and_logits(clone, layer_name: str):
    """A callable `images -> (layer output, model output)` on `clone`, for use inside a GradientTape.

    The one way gradient methods that look at a layer (Grad-CAM and the CAM family) reach its
    activations, so a gradient flows from the output back to exactly these tensors.

    Args:
        clone: a model copy (from `_compiled.model_copy`), never the user's model.
        layer_name: a layer of `clone`, as `gradcam_layer` resolved it.

    Returns:
        A `keras.Model` mapping (N, H, W, C) images to [(N, h, w, K) activations, (N, classes)].
    """
    import keras

    return keras.Model(clone.inputs[0], [clone.get_layer(layer_name).output, clone.outputs[0]])
