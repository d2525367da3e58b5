"""Input-gradient maps: vanilla saliency, guided backprop, deconvnet ("rectified"), SmoothGrad.

Every map is the gradient of one pre-softmax score per image (`_common.target_scores` on
`_common.logits_model`) with respect to the input pixels, computed for a whole batch at once by a
`tf.function` compiled for one fixed chunk shape. Guided and rectified maps run on a cached clone
of the logits model whose ReLUs have a modified backward pass; the caller's model is never changed.

This module also holds the small machinery the other gradient/perturbation methods share
(`gradcam.py`, `occlusion.py`): the per-model cache of clones and compiled functions, and the
fixed-shape chunked runner.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cnnviz.errors import CnnvizError
from cnnviz.explain._common import (
    as_image_batch,
    logits_model,
    resolve_targets,
    target_scores,
)

METHODS = ("vanilla", "guided", "rectified", "smoothgrad")
GRADIENT_METHODS = ("vanilla", "guided", "rectified")


# --------------------------------------------------------------------------------------------
# Shared machinery: clones of the user's model, compiled once per chunk shape.
# --------------------------------------------------------------------------------------------


@dataclass
class _CompiledCopy:
    """One clone of a user model and the `tf.function`s compiled on it, keyed by name and shape."""

    model: object
    functions: dict = field(default_factory=dict)


# user model -> {kind: _CompiledCopy}. Weak keys: the cache dies with the user's model, and the
# values hold clones only (never the user's model), so they do not keep their key alive.
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _require_built(model) -> None:
    try:
        model.inputs  # noqa: B018 - a Sequential without Input raises until it is built
    except (AttributeError, ValueError):
        raise CnnvizError(
            f"model {model.name!r} has not been built yet; give it an Input layer or call it "
            "on a batch of images once before explaining it"
        ) from None


def _check_images(model, images: np.ndarray) -> None:
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
        logits = _model_copy(model, "logits").model
        return keras.models.clone_model(
            logits, clone_function=_relu_swapper(_modified_relu(kind)), recursive=True
        )
    raise ValueError(f"unknown model copy kind {kind!r}")  # internal: never user input


def _model_copy(model, kind: str) -> _CompiledCopy:
    """The cached clone of `model` of one kind, carrying `model`'s current weights.

    Kinds: "logits" (last softmax/sigmoid made linear), "guided" / "rectified" (logits clone with
    modified ReLU backward passes), "output" (plain clone: the model's own output).
    The weights are copied on every call (cheap next to a gradient pass) so a model trained
    further between two calls is explained with its new weights.
    """
    _require_built(model)
    copies = _COPIES.setdefault(model, {})
    if kind not in copies:
        copies[kind] = _CompiledCopy(_build_copy(model, kind))
    copies[kind].model.set_weights(model.get_weights())
    return copies[kind]


def _chunk_size(count: int, batch_size: int) -> int:
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


def _run_batched(
    copy: _CompiledCopy,
    name: str,
    make_body: Callable,
    count: int,
    fetch: Callable[[int, int], list[np.ndarray]],
    batch_size: int,
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

    Returns:
        The body's outputs for all N items, as numpy arrays with leading dimension N.
    """
    import tensorflow as tf

    size = _chunk_size(count, batch_size)
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
        outputs = function(*arrays)
        results.append([np.asarray(output)[:real] for output in outputs])
    return [np.concatenate(parts) for parts in zip(*results)]


def _num_classes(logits_copy) -> int:
    width = int(logits_copy.outputs[0].shape[-1])
    return 2 if width == 1 else width


def _check_target_count(targets, count: int) -> None:
    if targets is not None and np.ndim(targets) > 0 and np.size(targets) != count:
        raise CnnvizError(
            f"targets has {np.size(targets)} entries for {count} images; give one per image, "
            "a single int for all, or None for the predicted classes"
        )


def _target_array(logits_copy, targets, count: int) -> np.ndarray:
    """Validated int32 targets (N,), or -1 everywhere meaning "the predicted class"."""
    _check_target_count(targets, count)
    if targets is None:
        return np.full(count, -1, dtype=np.int32)
    return resolve_targets(targets, np.zeros(count, np.int32), _num_classes(logits_copy))


def _choose_targets(logits, targets):
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


# --------------------------------------------------------------------------------------------
# Gradients and maps.
# --------------------------------------------------------------------------------------------


def _gradient_body(clone):
    import tensorflow as tf

    def body(images, targets):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(images)
            logits = clone(images, training=False)
            chosen = _choose_targets(logits, targets)
            # Images are independent (inference mode), so d(sum of scores)/d(image i) is
            # image i's own gradient: one backward pass for the whole chunk.
            scores = target_scores(logits, chosen)
        return tape.gradient(scores, images), chosen

    return body


def _gradients(model, images, targets, method: str, batch_size: int):
    """Signed input gradients (N, H, W, C) of each target score, and the targets used (N,)."""
    if method not in GRADIENT_METHODS:
        raise CnnvizError(
            f"unknown gradient method {method!r}; choose one of {', '.join(GRADIENT_METHODS)}"
        )
    batch = as_image_batch(images)
    logits = _model_copy(model, "logits")
    _check_images(logits.model, batch)
    wanted = _target_array(logits.model, targets, len(batch))
    copy = logits if method == "vanilla" else _model_copy(model, method)
    gradients, chosen = _run_batched(
        copy,
        "gradients",
        _gradient_body,
        len(batch),
        lambda start, stop: [batch[start:stop], wanted[start:stop]],
        batch_size,
    )
    return gradients.astype(np.float32), chosen.astype(np.int32)


def _gradient_maps(model, images, targets, method: str, batch_size: int):
    """|gradient| maxed over channels (N, H, W), and the targets used (N,)."""
    gradients, chosen = _gradients(model, images, targets, method, batch_size)
    return np.abs(gradients).max(axis=-1), chosen


def _smoothgrad(
    map_function: Callable,
    images: np.ndarray,
    targets: np.ndarray,
    *,
    samples: int,
    noise: float,
    seed: int,
    batch_size: int,
) -> np.ndarray:
    """SmoothGrad (Smilkov et al. 2017) around any map: mean of `map_function` over noisy copies.

    Like Captum's NoiseTunnel it wraps the map function, so it composes with vanilla or guided
    gradients alike. Each image gets `samples` copies with Gaussian noise of standard deviation
    `noise * (max - min)` of that image; all copies are explained for the image's own target.
    Noise is drawn in image order from one generator seeded by `seed`, so the result does not
    depend on `batch_size`.

    Args:
        map_function: `(images (M, H, W, C), targets (M,)) -> (maps (M, ...), targets)`.
        images: (N, H, W, C) float32.
        targets: (N,) int32, already resolved (no -1).

    Returns:
        (N, ...) float32, the mean map per image.
    """
    if samples < 1:
        raise CnnvizError(f"samples must be a positive integer; received {samples!r}")
    if noise < 0:
        raise CnnvizError(f"noise must be >= 0; received {noise!r}")
    rng = np.random.default_rng(seed)
    spread = images.max(axis=(1, 2, 3)) - images.min(axis=(1, 2, 3))
    # Enough images per group that their copies fill a couple of whole chunks.
    group = max(1, 2 * batch_size // samples)
    means = []
    for start in range(0, len(images), group):
        clean = images[start : start + group]
        draws = rng.standard_normal((len(clean), samples) + clean.shape[1:], dtype=np.float32)
        scale = (noise * spread[start : start + group]).astype(np.float32)
        noisy = clean[:, None] + draws * scale[:, None, None, None, None]
        maps, _ = map_function(
            noisy.reshape((-1,) + clean.shape[1:]),
            np.repeat(targets[start : start + group], samples),
        )
        means.append(maps.reshape((len(clean), samples) + maps.shape[1:]).mean(axis=1))
    return np.concatenate(means).astype(np.float32)


def _predicted_targets(model, images: np.ndarray, targets, batch_size: int) -> np.ndarray:
    """Targets (N,) int32: validated `targets`, or each image's predicted class."""
    logits = _model_copy(model, "logits")
    wanted = _target_array(logits.model, targets, len(images))
    if targets is not None:
        return wanted

    def make_body(clone):
        def body(batch, requested):
            return (_choose_targets(clone(batch, training=False), requested),)

        return body

    (chosen,) = _run_batched(
        logits,
        "targets",
        make_body,
        len(images),
        lambda start, stop: [images[start:stop], wanted[start:stop]],
        batch_size,
    )
    return chosen.astype(np.int32)


def input_gradients(
    model, images, targets=None, *, method: str = "vanilla", batch_size: int = 128
) -> np.ndarray:
    """Signed gradient of each image's target score (pre-softmax) with respect to its pixels.

    Args:
        model: a built Keras classifier (softmax or single-sigmoid output); not modified.
        images: (N, H, W, C) or (H, W, C) array.
        targets: None (each image's predicted class), an int, or a sequence of N ints.
        method: "vanilla" (plain gradient), "guided" (guided backprop) or "rectified"
            (deconvnet ReLU rule).
        batch_size: images per compiled chunk.

    Returns:
        (N, H, W, C) float32 gradients.
    """
    gradients, _ = _gradients(model, images, targets, method, batch_size)
    return gradients


def saliency(
    model,
    images,
    targets=None,
    *,
    method: str = "vanilla",
    samples: int = 20,
    noise: float = 0.15,
    seed: int = 0,
    batch_size: int = 128,
) -> np.ndarray:
    """Saliency map: |d score / d pixel|, maxed over channels (Simonyan et al. 2014).

    The score is the target class's pre-softmax logit (for one sigmoid unit z: z for class 1,
    -z for class 0).

    Args:
        model: a built Keras classifier (softmax or single-sigmoid output); not modified.
        images: (N, H, W, C) or (H, W, C) array.
        targets: None (each image's predicted class), an int, or a sequence of N ints.
        method: "vanilla"; "guided" (guided backprop: a ReLU passes gradient where its input > 0
            and the incoming gradient > 0); "rectified" (deconvnet: where the incoming gradient
            > 0); "smoothgrad" (mean vanilla map over `samples` noisy copies).
        samples: SmoothGrad: noisy copies per image.
        noise: SmoothGrad: noise standard deviation as a fraction of each image's max - min.
        seed: SmoothGrad: seed of the noise generator.
        batch_size: images per compiled chunk.

    Returns:
        (N, H, W) float32, >= 0.
    """
    if method not in METHODS:
        raise CnnvizError(f"unknown saliency method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "smoothgrad":
        maps, _ = _gradient_maps(model, images, targets, method, batch_size)
        return maps
    batch = as_image_batch(images)
    _check_images(_model_copy(model, "logits").model, batch)
    chosen = _predicted_targets(model, batch, targets, batch_size)
    return _smoothgrad(
        lambda noisy, wanted: _gradient_maps(model, noisy, wanted, "vanilla", batch_size),
        batch,
        chosen,
        samples=samples,
        noise=noise,
        seed=seed,
        batch_size=batch_size,
    )
