"""Activation maximization: the input a trained network finds most typical of a class or a filter.

Gradient ascent on the input image (Erhan et al. 2009, "Visualizing Higher-Layer Features of a
Deep Network"; Simonyan et al. 2014 for class scores), made readable by the regularizers of
Yosinski et al. 2015 ("Understanding Neural Networks Through Deep Visualization") and Olah et al.
2017 ("Feature Visualization"): random jitter, an L2 (Lp) penalty, a total-variation penalty,
periodic Gaussian blur, and clipping to the valid input range.

Each image climbs its own score:
- the class's pre-softmax logit when `layer` is the output layer (or None) — maximizing the
  softmax probability instead would mostly push the other classes down;
- otherwise the mean activation of channel `index` of `layer` (a unit of a 2-D layer).
The score's gradient is divided by its per-image RMS, then the gradients of the weighted
penalties are subtracted: a penalty weight of 1 pulls as hard as the (normalized) score, whatever
the model's logit scale. Penalties are small callables `fn(images (N, H, W, C)) -> (N,)` paired
with a weight, so new ones compose without new flags.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence

import numpy as np

from cnnviz import backend
from cnnviz.errors import CnnvizError
from cnnviz.explain.parameterization import (
    PARAMETERIZATIONS,
    default_parameterization,
    fft_images,
    start_spectrum,
)
from cnnviz.explain.transforms import random_transforms
from cnnviz.model.compiled import batch_size_for, layer_outputs_model, model_copy, num_classes
from cnnviz.model.graph import find_layer, output_producer
from cnnviz.model.inputs import input_range as model_input_range
from cnnviz.model.outputs import output_index, target_scores

Penalty = Callable[..., object]  # images (N, H, W, C) tensor -> (N,) tensor, keras.ops
Regularizers = tuple[tuple[float, Penalty], ...]


# ------------------------------------------------------------------------------- penalties
def l2_norm(images):
    """Sum of squared pixel values per image, (N,): pulls pixels towards 0 (fewer extreme
    values)."""
    from keras import ops

    return ops.sum(ops.square(images), axis=(1, 2, 3))


def lp_norm(p: float) -> Penalty:
    """A penalty computing the sum of |pixel|**p per image, (N,); p=6 mostly punishes outliers."""
    if p <= 0:
        raise CnnvizError(f"lp_norm needs p > 0; received p={p}")

    def penalty(images):
        from keras import ops

        return ops.sum(ops.power(_abs(images) + 1e-12, p), axis=(1, 2, 3))

    penalty.__name__ = f"l{p:g}_norm"
    return penalty


def total_variation(images):
    """Sum of absolute differences between neighbouring pixels per image, (N,): favours smoothness.

    Without it the ascent finds high-frequency patterns that excite the network but look like noise.
    """
    from keras import ops

    down = _abs(images[:, 1:, :, :] - images[:, :-1, :, :])
    right = _abs(images[:, :, 1:, :] - images[:, :, :-1, :])
    return ops.sum(down, axis=(1, 2, 3)) + ops.sum(right, axis=(1, 2, 3))


def _abs(values):
    """|values| whose derivative at 0 is 0 on every backend (JAX's abs has 1 there, TensorFlow's
    and PyTorch's 0): clipped pixels make many exact zeros, and the ascent would differ."""
    from keras import ops

    return values * ops.sign(values)


def default_regularizers(*, l2: float = 0.05, tv: float = 0.1) -> Regularizers:
    """The (weight, penalty) pairs used when none are given; a zero weight drops its term."""
    pairs = ((l2, l2_norm), (tv, total_variation))
    return tuple((float(weight), fn) for weight, fn in pairs if weight)


# ------------------------------------------------------------------------------- public API
def activation_maximization(model, layer=None, index: int = 0, **options) -> np.ndarray:
    """The input that maximizes one class score or one filter's mean activation.

    Takes the keyword arguments of `activation_maximization_batch` (steps, learning_rate, seed,
    jitter, l2, tv, blur_every, blur_sigma, input_range, regularizers, output), with one `index`.

    Returns:
        float32 array (H, W, C) within `input_range`.
    """
    return activation_maximization_batch(model, layer, (index,), **options)[0]


def activation_maximization_batch(
    model,
    layer=None,
    indices: Sequence[int] = (0,),
    *,
    steps: int = 256,
    learning_rate: float = 0.05,
    seed: int = 0,
    jitter: int = 4,
    l2: float = 0.05,
    tv: float = 0.1,
    blur_every: int = 4,
    blur_sigma: float = 0.5,
    input_range: tuple[float, float] | None = None,
    regularizers: Regularizers | None = None,
    output=None,
    batch_size: int | None = None,
    progress=None,
    param: str | None = None,
    transforms: Sequence[str] = (),
) -> np.ndarray:
    """Maximize several classes or filters at once, one image per index, in one batched ascent.

    Each image's objective depends on that image only, so the batch gives the same images as
    one run per index; all images start from the same seeded noise and see the same jitter.
    Every step: roll the image by a random shift (at most `jitter` pixels, shrinking linearly to
    0 over the steps), take the score's gradient, divide it by its per-image RMS (so
    `learning_rate` is a fraction of the input range per step, whatever the model's scale),
    subtract the weighted penalties' gradients, step, clip to `input_range`; every `blur_every`
    steps blur with a Gaussian of `blur_sigma` pixels.

    Args:
        model: a built Keras classifier; the input shape is `model.inputs[0].shape[1:]`.
        layer: None or the output layer (by name or object) for class scores; any other layer
            with a 4-D output (N, h, w, channels) for channel means (or 2-D output for units).
        indices: class indices (output layer) or channel indices, one image per entry.
        steps: gradient-ascent steps.
        learning_rate: step length as a fraction of the width of `input_range`.
        seed: seeds the starting noise and the jitter; the same seed gives the same images.
        jitter: maximum random shift in pixels per step (0 disables).
        l2: weight of the `l2_norm` penalty in the default regularizers.
        tv: weight of the `total_variation` penalty in the default regularizers.
        blur_every: blur every this many steps (0 disables).
        blur_sigma: standard deviation of that Gaussian blur, in pixels.
        input_range: (low, high) valid input values (None: `_common.input_range(model)`, the
            range of the model's own inputs); images start near the middle and stay inside.
            The ascent runs on the image scaled to [0, 1] over this range, so the penalties,
            `learning_rate` and the blur mean the same for any range.
        regularizers: (weight, penalty) pairs to use instead of those built from `l2` and `tv`;
            a penalty maps images (N, H, W, C), scaled to [0, 1], to (N,) with keras.ops.
        output: which output of a multi-output model (index or name); None for one output.
        batch_size: images optimized together; more indices run in chunks of this size (None:
            sized to the model's activation memory, at most 64).
        progress: optional callable `progress(done)` called after each chunk with the number
            of images finished in it (a progress bar's advance).
        param: "pixel" (ascend the pixels) or "fft" (ascend a 1/f-scaled Fourier spectrum,
            colour-decorrelated for RGB: `cnnviz.explain.parameterization`; no blur, no
            clipping: a sigmoid keeps it in range); None: `default_parameterization`, "pixel"
            (its class images transfer to another model at least as well: bench/feature_vis.py).
        transforms: random transforms applied to the image before each step's score, in
            order, from `cnnviz.explain.transforms.TRANSFORMS` (pad, jitter, scale, rotate):
            Lucid's transformation robustness.

    Returns:
        float32 array (len(indices), H, W, C) within `input_range`.

    Raises:
        CnnvizError: an unknown layer, a layer without 4-D/2-D output, an index out of range,
            a model without a fixed input shape, or invalid settings.
    """
    from keras import ops

    if input_range is None:
        input_range = model_input_range(model)
    low, high = (float(value) for value in input_range)
    _check_settings(steps, learning_rate, jitter, blur_every, blur_sigma, low, high, batch_size)
    input_shape = _input_shape(model)
    param = default_parameterization(input_shape) if param is None else param
    if param not in PARAMETERIZATIONS:
        raise CnnvizError(f"param {param!r} is not a parameterization; choose one of "
                          f"{', '.join(PARAMETERIZATIONS)}")
    score, count = _score_function(model, layer, output)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    bad = indices[(indices < 0) | (indices >= count)]
    if bad.size:
        raise CnnvizError(f"index {int(bad[0])} is out of range; valid indices are 0..{count - 1}")
    if regularizers is None:
        regularizers = default_regularizers(l2=l2, tv=tv)
    regularizers = tuple((float(weight), fn) for weight, fn in regularizers)

    rng = np.random.default_rng(seed)
    # The ascent runs on the image scaled to [0, 1] over `input_range` (x = low + width * u),
    # so step sizes, penalties and the blur mean the same for a [0, 1], [-1, 1] or 0..255 model.
    width = high - low
    # Low-variance noise around mid-range: no pattern to start from, nothing saturated.
    if param == "fft":
        start = start_spectrum(rng, input_shape)

        def to_image(variables):
            return fft_images(variables, input_shape)
    else:
        start = 0.5 + 0.01 * rng.standard_normal(input_shape)

        def to_image(variables):
            return variables
    # The jitter bound shrinks linearly to 0: early steps find a shift-robust pattern, the last
    # ones settle it in place (a fixed large jitter leaves a tiny image misaligned at the end).
    bound = jitter * (1 - np.arange(steps) / steps)
    shifts = np.rint(rng.uniform(-1, 1, size=(steps, 2)) * bound[:, None]).astype(np.int32)
    blur = (_gaussian_blur(blur_sigma, input_shape)
            if blur_every and blur_sigma > 0 and param == "pixel" else None)
    transform = random_transforms(transforms, input_shape, steps, rng)
    axes = tuple(range(1, start.ndim + 1))

    def ascent_step(variables, step, targets, shift):
        def objective(current):
            # Jitter: the gradient must work wherever the pattern sits, so no pixel-exact tricks.
            shifted = ops.roll(to_image(current), shift, axis=(1, 2))
            return score(low + width * transform(shifted, step), targets), ()

        gradient, _ = backend.input_gradients(objective, variables)
        # Per-image RMS normalization makes the step independent of the model's logit scale ...
        rms = ops.sqrt(ops.mean(ops.square(gradient), axis=axes, keepdims=True))
        direction = gradient / (rms + 1e-12)
        if regularizers:
            # ... and the penalty weights relative to a unit-RMS score gradient.
            def penalty(current):
                images = to_image(current)
                terms = [weight * fn(images) for weight, fn in regularizers]
                return functools.reduce(operator.add, terms), ()

            direction = direction - backend.input_gradients(penalty, variables)[0]
        stepped = variables + learning_rate * direction
        return ops.clip(stepped, 0.0, 1.0) if param == "pixel" else stepped

    def ascend(variables, targets):
        # The whole ascent is one compiled loop (a while loop on TensorFlow, lax.fori_loop on
        # JAX): no Python overhead per step.
        all_shifts = ops.convert_to_tensor(shifts)

        def one_step(step, current):
            # An eager loop (PyTorch) has Python steps: its shifts are plain ints.
            shift = (tuple(int(v) for v in shifts[step]) if isinstance(step, int)
                     else all_shifts[step])
            current = ascent_step(current, step, targets, shift)
            if blur is None:
                return current
            return ops.cond((step + 1) % blur_every == 0,
                            lambda: ops.clip(blur(current), 0.0, 1.0), lambda: current)

        variables = ops.fori_loop(0, steps, one_step, variables)
        return (low + width * to_image(variables),)

    if len(indices) == 0:
        return np.zeros((0, *input_shape), dtype=np.float32)
    if batch_size is None:
        batch_size = min(64, batch_size_for(model_copy(model, "logits", output=output), None))
    size = min(batch_size, len(indices))
    compiled = backend.compile(ascend, model.variables, any_batch=False)  # one chunk size
    results = []
    for begin in range(0, len(indices), size):
        chunk = indices[begin : begin + size]
        real = len(chunk)
        # Pad with a repeated index so every chunk has the traced shape.
        targets = np.concatenate([chunk, np.repeat(chunk[-1:], size - real)]).astype(np.int32)
        variables = np.broadcast_to(start, (size, *start.shape)).astype(np.float32)
        (images,) = compiled(variables, targets)
        results.append(np.asarray(images)[:real])
        if progress is not None:
            progress(real)
    return np.concatenate(results).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------- helpers
def _check_settings(steps, learning_rate, jitter, blur_every, blur_sigma, low, high, batch_size):
    problems = []
    if steps < 0:
        problems.append(f"steps must be at least 0 (0: the starting image); received "
                        f"steps={steps}")
    if learning_rate <= 0:
        problems.append(f"learning_rate must be > 0; received learning_rate={learning_rate}")
    if jitter < 0:
        problems.append(f"jitter must be >= 0 pixels; received jitter={jitter}")
    if blur_every < 0:
        problems.append(f"blur_every must be >= 0 (0 disables); received blur_every={blur_every}")
    if blur_sigma < 0:
        problems.append(f"blur_sigma must be >= 0; received blur_sigma={blur_sigma}")
    if not low < high:
        problems.append(f"input_range must be (low, high) with low < high; received {(low, high)}")
    if batch_size is not None and batch_size < 1:
        problems.append(f"batch_size must be at least 1; received batch_size={batch_size}")
    if problems:
        raise CnnvizError("\n".join(problems))


def _input_shape(model) -> tuple[int, ...]:
    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3 or any(dim is None for dim in shape):
        raise CnnvizError(
            f"activation maximization needs a fixed (H, W, C) input shape; "
            f"model {model.name!r} has input shape {shape}"
        )
    return tuple(int(dim) for dim in shape)


def _score_function(model, layer, output):
    """`score(images, targets) -> (N,)` (keras.ops) and how many indices it accepts."""
    from keras import ops

    index = output_index(model, output)
    entry = None if layer is None else find_layer(model, layer)
    if entry is None or entry.path == output_producer(model, index).path:
        logits = model_copy(model, "logits", output=index).model

        def class_score(images, targets):
            return target_scores(logits(images, training=False), targets)

        return class_score, num_classes(logits)

    rank = len(entry.layer.output.shape)
    if rank not in (2, 4):
        raise CnnvizError(
            f"layer {entry.path!r} has output shape {tuple(entry.layer.output.shape)}; "
            "activation maximization needs a 4-D (N, h, w, channels) or 2-D (N, units) output"
        )
    sub_model = layer_outputs_model(model, [entry.path], output=index)

    def channel_score(images, targets):
        (activations,) = sub_model(images)
        if rank == 4:
            activations = ops.mean(activations, axis=(1, 2))
        return ops.take_along_axis(activations, ops.cast(targets, "int32")[:, None], axis=1)[:, 0]

    return channel_score, int(entry.layer.output.shape[-1])


def _gaussian_blur(sigma: float, input_shape: tuple[int, int, int]):
    """A separable Gaussian blur with reflected borders (zero padding would darken them),
    keras.ops."""
    from keras import ops

    height, width, channels = input_shape
    radius = min(int(np.ceil(3 * sigma)), height - 1, width - 1)
    if radius < 1:
        return None
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights = (weights / weights.sum()).astype(np.float32)
    vertical = np.tile(weights[:, None, None, None], (1, 1, channels, 1))
    horizontal = np.tile(weights[None, :, None, None], (1, 1, channels, 1))
    pad = [[0, 0], [radius, radius], [radius, radius], [0, 0]]

    def blur(images):
        padded = ops.pad(images, pad, mode="reflect")
        padded = ops.depthwise_conv(padded, ops.convert_to_tensor(vertical), 1, "valid",
                                    data_format="channels_last")
        return ops.depthwise_conv(padded, ops.convert_to_tensor(horizontal), 1, "valid",
                                  data_format="channels_last")

    return blur
