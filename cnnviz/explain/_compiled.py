"""Model copies and compiled, fixed-shape batched runs: what every explanation method shares.

Each method runs on a cached clone of the user's model (never the model itself): the logits
copy, a copy whose ReLUs have a guided or deconvnet backward pass, or a plain copy for forward
probabilities. Functions compiled on a clone are cached by chunk shape, and every batch is cut
into chunks of one size (the last one padded) so nothing retraces.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cnnviz.errors import CnnvizError
from cnnviz.explain._common import logits_model, resolve_targets


@dataclass
class CompiledCopy:
    """One clone of a user model and the `tf.function`s compiled on it, keyed by name and shape."""

    model: object
    functions: dict = field(default_factory=dict)


# user model -> {kind: CompiledCopy}. Weak keys: the cache dies with the user's model, and the
# values hold clones only (never the user's model), so they do not keep their key alive.
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def require_built(model) -> None:
    try:
        model.inputs  # noqa: B018 - a Sequential without Input raises until it is built
    except (AttributeError, ValueError):
        raise CnnvizError(
            f"model {model.name!r} has not been built yet; give it an Input layer or call it "
            "on a batch of images once before explaining it"
        ) from None


def check_images(model, images: np.ndarray) -> None:
    expected = tuple(model.inputs[0].shape[1:])
    received = images.shape[1:]
    if len(expected) != len(received) or any(
        e is not None and e != r for e, r in zip(expected, received)
    ):
        raise CnnvizError(
            f"images have shape (H, W, C) = {received} but model {model.name!r} expects {expected}"
        )


def _build_copy(model, kind: str):
    import keras

    if kind == "logits":
        return logits_model(model)
    if kind == "output":
        return keras.models.clone_model(model)
    if kind in ("guided", "rectified"):
        logits = model_copy(model, "logits").model
        return keras.models.clone_model(
            logits, clone_function=_relu_swapper(_modified_relu(kind)), recursive=True
        )
    raise ValueError(f"unknown model copy kind {kind!r}")  # internal: never user input


def model_copy(model, kind: str) -> CompiledCopy:
    """The cached clone of `model` of one kind, carrying `model`'s current weights.

    Kinds: "logits" (last softmax/sigmoid made linear), "guided" / "rectified" (logits clone with
    modified ReLU backward passes), "output" (plain clone: the model's own output).
    The weights are copied on every call (cheap next to a gradient pass) so a model trained
    further between two calls is explained with its new weights.
    """
    require_built(model)
    copies = _COPIES.setdefault(model, {})
    if kind not in copies:
        copies[kind] = CompiledCopy(_build_copy(model, kind))
    copies[kind].model.set_weights(model.get_weights())
    return copies[kind]


def chunk_size(count: int, batch_size: int) -> int:
    """The one chunk size used for `count` items: the smallest power of two >= count, at most
    batch_size.

    Powers of two keep a small request from padding up to a whole batch while bounding the
    number of distinct shapes (hence traces) to about log2(batch_size) + 1.
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise CnnvizError(f"batch_size must be a positive integer; received {batch_size!r}")
    if count < 1:
        raise CnnvizError("there are no images to explain: received an empty batch (N = 0)")
    return min(int(batch_size), 1 << max(count - 1, 0).bit_length())


def run_batched(
    copy: CompiledCopy,
    name: str,
    make_body: Callable,
    count: int,
    fetch: Callable[[int, int], list[np.ndarray]],
    batch_size: int,
    *,
    consume: Callable[[int, int, list[np.ndarray]], None] | None = None,
) -> list[np.ndarray]:
    """Run a compiled function over `count` items in chunks of one fixed size; concatenate.

    Args:
        copy: the model clone the function runs on; compiled functions are cached on it.
        name: identifies the function in the cache, together with the chunk shapes.
        make_body: `make_body(clone) -> body(*tensors) -> tuple of tensors`, each (B, ...).
        count: number of items N.
        fetch: `fetch(start, stop) -> list of arrays` for items start..stop-1 (made lazily so
            e.g. occluded copies never exist all at once).
        batch_size: the largest chunk.
        consume: `consume(start, stop, outputs)` receives each chunk's outputs (items
            start..stop-1) instead of keeping them, for methods that reduce many items to a few
            (integrated gradients, RISE): memory stays one chunk, whatever the item count.

    Returns:
        The body's outputs for all N items, as numpy arrays with leading dimension N; an empty
        list when `consume` took them.
    """
    import tensorflow as tf

    size = chunk_size(count, batch_size)
    function = None
    results = []
    for start in range(0, count, size):
        arrays = fetch(start, min(start + size, count))
        real = len(arrays[0])
        if real < size:  # pad the last chunk: one input shape, no retracing
            arrays = [
                np.concatenate([a, np.zeros((size - real,) + a.shape[1:], a.dtype)]) for a in arrays
            ]
        if function is None:
            key = (name,) + tuple((a.shape, a.dtype.str) for a in arrays)
            function = copy.functions.get(key)
            if function is None:
                signature = [tf.TensorSpec(a.shape, tf.as_dtype(a.dtype)) for a in arrays]
                function = tf.function(make_body(copy.model), input_signature=signature)
                copy.functions[key] = function
        outputs = [np.asarray(output)[:real] for output in function(*arrays)]
        if consume is None:
            results.append(outputs)
        else:
            consume(start, start + real, outputs)
    return [np.concatenate(parts) for parts in zip(*results)]


def num_classes(logits_copy) -> int:
    width = int(logits_copy.outputs[0].shape[-1])
    return 2 if width == 1 else width


def check_target_count(targets, count: int) -> None:
    if targets is not None and np.ndim(targets) > 0 and np.size(targets) != count:
        raise CnnvizError(
            f"targets has {np.size(targets)} entries for {count} images; give one per image, "
            "a single int for all, or None for the predicted classes"
        )


def target_array(logits_copy, targets, count: int) -> np.ndarray:
    """Validated int32 targets (N,), or -1 everywhere meaning "the predicted class"."""
    check_target_count(targets, count)
    if targets is None:
        return np.full(count, -1, dtype=np.int32)
    return resolve_targets(targets, np.zeros(count, np.int32), num_classes(logits_copy))


def choose_targets(logits, targets):
    """Inside a compiled body: the given targets, and the predicted class where a target is -1."""
    import tensorflow as tf

    if logits.shape[-1] == 1:  # one sigmoid unit: class 1 when its logit is positive
        predicted = tf.cast(logits[:, 0] > 0, tf.int32)
    else:
        predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.where(targets < 0, predicted, targets)


# --------------------------------------------------------------------------------------------
# Modified ReLU backward passes (guided backprop, deconvnet).
# --------------------------------------------------------------------------------------------


def _modified_relu(rule: str):
    """A ReLU whose backward pass follows `rule`.

    guided (Springenberg et al. 2015): pass the gradient where the forward input > 0 AND the
    incoming gradient > 0. rectified (deconvnet, Zeiler & Fergus 2014): pass it where the
    incoming gradient > 0, whatever the forward sign.
    """
    import tensorflow as tf

    @tf.custom_gradient
    def relu(x):
        def backward(upstream):
            passed = tf.nn.relu(upstream)
            if rule == "guided":
                passed = passed * tf.cast(x > 0, upstream.dtype)
            return passed

        return tf.nn.relu(x), backward

    return relu


def _is_relu(activation) -> bool:
    import keras

    return activation is keras.activations.relu or getattr(activation, "__name__", "") == "relu"


def _relu_swapper(replacement):
    """A `clone_model` clone_function that puts `replacement` wherever the model applies a ReLU.

    Covers `activation="relu"` on any layer (Conv2D, Dense, Activation) and plain `ReLU` layers;
    a ReLU layer with max_value/negative_slope/threshold is not a plain ReLU and is kept.
    """
    import keras

    def clone_layer(layer):
        config = layer.get_config()
        if _is_relu(getattr(layer, "activation", None)):
            config["activation"] = replacement
            return layer.__class__.from_config(config)
        if (
            isinstance(layer, keras.layers.ReLU)
            and config.get("max_value") is None
            and not config.get("negative_slope")
            and not config.get("threshold")
        ):
            return keras.layers.Activation(replacement, name=layer.name)
        return layer.__class__.from_config(config)

    return clone_layer


def forward_body(clone):
    """A compiled body returning the clone's own output for a chunk of images."""

    def body(images):
        return (clone(images, training=False),)

    return body
