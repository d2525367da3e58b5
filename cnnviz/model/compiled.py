"""Model copies and compiled, fixed-shape batched runs: what every explanation method shares.

Each method runs on a cached copy of the user's model (never the model itself): the logits
copy, a copy whose ReLUs have a guided or deconvnet backward pass, or a copy returning the
model's own output or its probabilities. A copy is a flat functional model over the user's own
layers (`_graph.rebuild`): it reads the user's variables, so it is built once per model, never
copies a weight, and is never stale when the model is trained further or randomized in place.
Functions compiled on a copy are cached by chunk shape, and every batch is cut into chunks of
one size (the last one padded) so nothing retraces.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cnnviz import backend
from cnnviz.errors import CnnvizError, CnnvizWarning
from cnnviz.model.exported import is_exported
from cnnviz.model.folding import folding_substitute
from cnnviz.model.graph import layer_tensor, layer_tensors, rebuild
from cnnviz.model.inputs import as_image_batch
from cnnviz.model.outputs import (
    class_probabilities,
    linear_output_substitute,
    logits_model,
    output_activation,
    output_index,
    output_producer,
    probabilities_model,
    resolve_targets,
    swapped_activation,
)
from cnnviz.model.taps import tapped_logits_model


@dataclass
class CompiledCopy:
    """One copy of a user model and the functions compiled on it, keyed by name and shape.

    `activation_bytes`: bytes of all layer outputs for one image (None when a size is unknown),
    what `batch_size_for` sizes chunks by.
    """

    model: object
    functions: dict = field(default_factory=dict)
    activation_bytes: int | None = None


# user model -> {(kind, output): CompiledCopy}. Weak keys: the cache dies with the user's model;
# the copies hold the user's layers but never the model object, so they do not keep it alive.
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
KINDS = ("logits", "output", "probabilities", "guided", "rectified")


def require_built(model, *, single_input: bool = True) -> None:
    """A CnnvizError unless `model` is built and (with `single_input`) takes one input."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:  # a Sequential without Input raises or has none until it is built
        raise CnnvizError(
            f"model {model.name!r} has not been built yet; give it an Input layer or call it "
            "on a batch of images once before explaining it"
        )
    if single_input and len(inputs) > 1:
        names = ", ".join(f"{t.name!r} {tuple(t.shape[1:])}" for t in inputs)
        raise CnnvizError(
            f"model {model.name!r} has {len(inputs)} inputs ({names}); cnnviz explains models "
            "with one image input. Wrap it: keras.Model(image_input, model([image_input, "
            "fixed_other_inputs])) with the other inputs fixed, and explain that model"
        )


def check_images(model, images: np.ndarray) -> None:
    expected = tuple(model.inputs[0].shape[1:])
    received = images.shape[1:]
    if len(expected) != len(received) or any(
        e is not None and e != r for e, r in zip(expected, received)
    ):
        raise CnnvizError(
            f"images have shape (H, W, C) = {received} but model {model.name!r} expects {expected}"
        )


def _build_copy(model, kind: str, output: int, tap: str | None, folded: bool):
    if kind == "logits" and tap is not None:
        return tapped_logits_model(model, output, tap)
    if kind == "logits" and folded:
        keep = {output_producer(model, output).path}
        return rebuild(model, output=output, substitute=folding_substitute(
            model, keep=keep, then=linear_output_substitute(model, output))).model
    if kind == "logits":
        return logits_model(model, output=output)
    if kind == "output":
        return rebuild(model, output=output).model
    if kind == "probabilities":
        return probabilities_model(model, output=output)
    if kind in ("guided", "rectified"):
        return _modified_relu_copy(model, kind, output)
    raise ValueError(f"unknown model copy kind {kind!r}")  # internal: never user input


def model_copy(model, kind: str, *, output=None, tap: str | None = None,
               folded: bool = False) -> CompiledCopy:
    """The cached copy of `model` of one kind, reading `model`'s own variables.

    Kinds: "logits" (the chosen output's softmax/sigmoid made linear), "guided" / "rectified"
    (logits copy whose ReLU-family activations have a modified backward pass), "output" (the
    model's own output), "probabilities" (the output as probabilities: softmax/sigmoid applied
    when the model outputs logits). Every copy has one input and one output: `output` chooses
    it (None for a single-output model; an index or a name, see `_common.output_index`).
    `tap` (a layer path, "logits" only): the copy's layer there is tapped
    (`cnnviz.model.taps`), for gradients with respect to its output. `folded` ("logits"
    without a tap; "guided" and "rectified" always are): BatchNormalization folded into the
    convolution before it (`cnnviz.model.folding`), for gradients with respect to the input
    only, as such a copy lacks the conv layers' own outputs. An exported model
    (`cnnviz.model.exported`) has no copies: it is its own "probabilities" copy (run forward
    by `probabilities_of`), and any other kind is refused.
    """
    require_built(model)
    if is_exported(model):
        if kind != "probabilities":
            raise CnnvizError(model.refusal("methods that need gradients or layers"))
        output_index(model, output)
        return CompiledCopy(model)
    index = output_index(model, output)
    copies = _COPIES.setdefault(model, {})
    folded = folded and kind == "logits" and tap is None
    key = (kind, index, tap, folded)
    if key not in copies:
        built = _build_copy(model, kind, index, tap, folded)
        copies[key] = CompiledCopy(built, activation_bytes=_activation_bytes(built))
    return copies[key]


def layer_outputs(copy_model, paths):
    """A callable `images -> [output of each layer at paths]` on a flat copy (one forward
    pass computes them all)."""
    import keras

    sub_model = keras.Model(copy_model.inputs[0],
                            [layer_tensor(copy_model, path) for path in paths])

    def call(images):
        return keras.tree.flatten(sub_model(images, training=False))

    return call


def layer_outputs_model(model, paths, *, output=None):
    """`layer_outputs` on the cached "output" copy of `model`. The layers do not depend on the
    output chosen; a multi-output model uses its first when `output` is None."""
    copy = model_copy(model, "output", output=0 if output is None else output).model
    return layer_outputs(copy, paths)


def chunk_size(count: int, batch_size: int) -> int:
    """The one chunk size used for `count` items: `count` split evenly into as few chunks of at
    most `batch_size` as will do.

    The last chunk is padded by fewer items than there are chunks (98 windows in chunks of 64
    become two of 49, not 128 with 30 padded), and every chunk has one shape, so the function
    is traced once per call.
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise CnnvizError(f"batch_size must be a positive integer; received {batch_size!r}")
    if count < 1:
        raise CnnvizError("there are no images to explain: received an empty batch (N = 0)")
    chunks = -(-count // int(batch_size))
    return -(-count // chunks)


# Per chunk, the activations of every layer for all its images stay under this (the backward
# pass of a gradient method keeps them all); the chunk is also capped at _MOST_PER_CHUNK,
# beyond which a CPU gains nothing.
_ACTIVATION_BUDGET = 1 << 30
_MOST_PER_CHUNK = 256


def _activation_bytes(flat_copy) -> int | None:
    """Bytes of all layer outputs of one image in a copy's graph; None when a size is unknown."""
    total = 0
    for tensor in layer_tensors(flat_copy):
        shape = tuple(tensor.shape[1:])
        if any(size is None for size in shape):
            return None
        total += int(np.prod(shape, dtype=np.int64)) * 4
    return total


def batch_size_for(copy: CompiledCopy, batch_size: int | None) -> int:
    """`batch_size` when given, else as many images as fit `_ACTIVATION_BUDGET` of activations
    (at most 256, at least 1): 256 for the digits CNN, 7 for ResNet50 at 224 x 224."""
    if batch_size is not None:
        return batch_size
    per_image = copy.activation_bytes
    if not per_image:
        return 32
    return int(max(1, min(_MOST_PER_CHUNK, _ACTIVATION_BUDGET // per_image)))


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
    return _run_chunks(count, fetch, batch_size, _compiled_call(copy, name, make_body),
                       consume=consume)


def _compiled_call(copy: CompiledCopy, name: str, make_body: Callable) -> Callable:
    """`call(arrays) -> outputs`: the function `make_body` builds, compiled on `copy` for the
    backend Keras runs on (`cnnviz.backend.compile`) at the first call and cached by `name`
    and the arrays' item shapes."""
    function = None

    def call(arrays: list[np.ndarray]):
        nonlocal function
        if function is None:
            # One trace per item shape, whatever the chunk size: the figures' 10 images, the
            # trust checks' 32 and occlusion's windows share one graph of each function.
            key = (name,) + tuple((a.shape[1:], a.dtype.str) for a in arrays)
            function = copy.functions.get(key)
            if function is None:
                function = backend.compile(make_body(copy.model), copy.model.variables)
                copy.functions[key] = function
        return function(*arrays)

    return call


def _run_chunks(count: int, fetch: Callable[[int, int], list[np.ndarray]], batch_size: int,
                call: Callable, *, consume: Callable | None = None) -> list[np.ndarray]:
    """`call(arrays) -> outputs` over `count` items in chunks of one size (`chunk_size`; the
    last chunk padded, so the shape never changes); `fetch` and `consume` as in `run_batched`."""
    size = chunk_size(count, batch_size)
    results = []
    for start in range(0, count, size):
        arrays = fetch(start, min(start + size, count))
        real = len(arrays[0])
        if real < size:  # pad the last chunk: one input shape, no retracing
            arrays = [
                np.concatenate([a, np.zeros((size - real,) + a.shape[1:], a.dtype)]) for a in arrays
            ]
        outputs = [np.asarray(output)[:real] for output in call(arrays)]
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
    """Inside a compiled body: the given targets, and the predicted class where a target is -1.
    `keras.ops`, any backend."""
    from keras import ops

    if logits.shape[-1] == 1:  # one sigmoid unit: class 1 when its logit is positive
        predicted = ops.cast(logits[:, 0] > 0, "int32")
    else:
        predicted = ops.cast(ops.argmax(logits, axis=-1), "int32")
    return ops.where(targets < 0, predicted, targets)


# --------------------------------------------------------------------------------------------
# Modified ReLU backward passes (guided backprop, deconvnet), for the whole ReLU family.
# --------------------------------------------------------------------------------------------
# Activations with a ReLU shape (0 or a small slope below a threshold, identity above, maybe a
# cap): guided backprop's rule is defined for them. Others are left as they are (vanilla).
_RELU_FUNCTIONS = ("relu", "relu6", "leaky_relu")
_LINEAR = ("linear", None)


def _modified_relu(rule: str, **relu_arguments):
    """`keras.activations.relu(x, **relu_arguments)` whose backward pass follows `rule`
    (`cnnviz.backend.modified_relu`, on every backend).

    guided (Springenberg et al. 2015): the incoming gradient where it is > 0, times the
    activation's own derivative (1 where a ReLU is on, 0 where off or capped, the slope of a
    leaky ReLU below 0). rectified (deconvnet, Zeiler & Fergus 2014): the incoming gradient
    where it is > 0, whatever the forward input.
    """
    import keras

    def relu(x):
        return keras.activations.relu(x, **relu_arguments)

    modified = backend.modified_relu(rule, relu)
    modified.__name__ = f"{rule}_relu"
    return modified


def _relu_arguments(layer) -> dict | None:
    """keras.activations.relu's arguments for the ReLU-family function `layer` applies, or None."""
    kind = type(layer).__name__
    if kind in ("ReLU", "LeakyReLU"):
        config = layer.get_config()
        if kind == "LeakyReLU":
            return {"negative_slope": float(config["negative_slope"])}
        return {"negative_slope": float(config.get("negative_slope") or 0.0),
                "max_value": config.get("max_value"),
                "threshold": float(config.get("threshold") or 0.0)}
    name = _activation_of(layer)
    if name == "relu":
        return {}
    if name == "relu6":
        return {"max_value": 6.0}
    if name == "leaky_relu":  # keras.activations.leaky_relu's default slope
        return {"negative_slope": 0.2}
    return None


def _activation_of(layer) -> str | None:
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    return getattr(activation, "__name__", type(activation).__name__)


_ACTIVATION_LAYERS = ("ELU", "PReLU", "Softmax")


def _modified_relu_copy(model, rule: str, output: int):
    """The logits copy of `model` with every ReLU-family activation's backward pass modified.

    Covers `activation=` relu / relu6 / leaky_relu on any layer (Conv2D, Dense, Activation, ...)
    and `ReLU` (max_value, negative_slope, threshold) / `LeakyReLU` layers, inside nested models
    too. Other non-linear activations keep their own gradient; a `CnnvizWarning` names them.
    """
    import keras

    producer = output_producer(model, output).path
    linear_output = linear_output_substitute(model, output)
    untouched: list[tuple[object, str]] = []  # (layer, activation name)

    def substitute(path, layer):
        if path == producer:
            return linear_output(path, layer) if linear_output is not None else None
        arguments = _relu_arguments(layer)
        if arguments is None:
            name = _activation_of(layer) if hasattr(layer, "activation") else None
            if type(layer).__name__ in _ACTIVATION_LAYERS:
                name = type(layer).__name__
            if name not in _LINEAR:
                untouched.append((layer, name))
            return None
        replacement = _modified_relu(rule, **arguments)
        if layer.weights or type(layer).__name__ not in ("ReLU", "LeakyReLU", "Activation"):
            return swapped_activation(layer, replacement)
        return keras.layers.Activation(replacement, name=layer.name)

    copy = rebuild(model, output=output, substitute=folding_substitute(
        model, keep={producer}, then=substitute)).model
    # Only layers the chosen output depends on: another head's softmax is no concern here.
    used = {id(getattr(layer, "layer", layer)) for layer in copy.layers}
    counts: dict[str, int] = {}
    for layer, name in untouched:
        if id(layer) in used:
            counts[name] = counts.get(name, 0) + 1
    if counts:
        counted = ", ".join(f"{count} {name}" for name, count in sorted(counts.items()))
        warnings.warn(
            f"{rule} backprop is defined for the ReLU family only; model {model.name!r} has "
            f"other activations ({counted} layer(s)) whose gradient passes unchanged, as in "
            "vanilla saliency",
            CnnvizWarning, stacklevel=2,
        )
    return copy


def forward_body(clone):
    """A compiled body returning the clone's own output for a chunk of images."""

    def body(images):
        return (clone(images, training=False),)

    return body


def predict_probabilities(model, images, *, output=None,
                          batch_size: int | None = None) -> np.ndarray:
    """Class probabilities (N, K), one compiled pass over fixed chunks.

    The model's own output when it is a softmax/sigmoid; softmax (sigmoid for one unit) of
    its logits when it is linear. A single sigmoid unit p becomes the two columns [1 - p, p].
    `output` chooses the output of a multi-output model (index or name).
    """
    from cnnviz.model.compiled import check_images, model_copy

    batch = as_image_batch(images)
    check_images(model_copy(model, "probabilities", output=output).model, batch)
    return probabilities_of(model, len(batch), lambda a, b: batch[a:b], output=output,
                            batch_size=batch_size)


def probabilities_of(
    model, count: int, fetch: Callable[[int, int], np.ndarray], *, output=None,
    batch_size: int | None = None,
    consume: Callable[[int, int, np.ndarray], None] | None = None,
) -> np.ndarray | None:
    """Class probabilities (count, K) of images made on demand by `fetch(start, stop)`.

    For many perturbed copies of a few images: they are built chunk by chunk (never all in
    memory) and go through one compiled forward pass per fixed-size chunk; an exported model
    (`cnnviz.model.exported`) through its own runtime, in the same chunks. `consume(start,
    stop, probabilities)` receives each chunk's instead of keeping them (then None is
    returned), as in `run_batched`.
    """
    copy = model_copy(model, "probabilities", output=output)
    if is_exported(model):
        call = _exported_probabilities(model, output_index(model, output))
    else:
        call = _compiled_call(copy, "forward", forward_body)
    kept = None if consume is None else (
        lambda start, stop, outputs: consume(start, stop, class_probabilities(outputs[0])))
    outputs = _run_chunks(count, lambda a, b: [fetch(a, b)], batch_size_for(copy, batch_size),
                          call, consume=kept)
    return None if consume is not None else class_probabilities(outputs[0])


def _exported_probabilities(model, index: int) -> Callable:
    """`call(arrays) -> [probabilities]` of an exported model's output `index`: softmax
    (sigmoid for one unit) applied when it outputs logits, as `probabilities_model` does."""
    squash = output_activation(model, index) == "linear"

    def call(arrays):
        values = model.predict(arrays[0], index)
        if squash and values.shape[-1] == 1:
            values = 1.0 / (1.0 + np.exp(-values))
        elif squash:
            shifted = np.exp(values - values.max(axis=-1, keepdims=True))
            values = shifted / shifted.sum(axis=-1, keepdims=True)
        return [values.astype(np.float32)]

    return call
