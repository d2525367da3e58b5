"""Input-gradient maps: vanilla saliency, guided backprop, deconvnet ("rectified"), SmoothGrad.

Every map is the gradient of one pre-softmax score per image (`_common.target_scores` on
the logits copy, `_compiled.model_copy(model, "logits")`) with respect to the input pixels,
computed for a whole batch at once by a function compiled for one fixed chunk shape on the Keras
backend in use (`cnnviz.backend`). Guided and rectified maps run on a cached copy of the logits
model whose ReLU-family activations have a modified backward pass; the caller's
model is never changed.

The clone cache and the chunked compiled runner live in `_compiled.py`, shared with Grad-CAM,
occlusion and the trust checks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cnnviz.errors import CnnvizError
from cnnviz.explain.gradients import (
    GRADIENT_METHODS,
    gradient_maps,
    predicted_targets,
    rule_gradients,
)
from cnnviz.model.compiled import (
    batch_size_for,
    check_images,
    model_copy,
)
from cnnviz.model.inputs import as_image_batch

METHODS = (*GRADIENT_METHODS, "smoothgrad")


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


def input_gradients(
    model,
    images,
    targets=None,
    *,
    method: str = "vanilla",
    output=None,
    batch_size: int | None = None,
) -> np.ndarray:
    """Signed gradient of each image's target score (pre-softmax) with respect to its pixels.

    Args:
        model, images, targets, output, batch_size: as for `saliency`.
        method: "vanilla" (plain gradient), "guided" (guided backprop) or "rectified"
            (deconvnet ReLU rule).

    Returns:
        (N, H, W, C) float32 gradients.
    """
    gradients, _ = rule_gradients(model, images, targets, method, batch_size, output=output)
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
    output=None,
    batch_size: int | None = None,
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
        output: which output of a multi-output model (index or name); None for one output.
        batch_size: most images per compiled chunk; None sizes it to the model
            (`_compiled.batch_size_for`).

    Returns:
        (N, H, W) float32, >= 0.
    """
    if method not in METHODS:
        raise CnnvizError(f"unknown saliency method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "smoothgrad":
        maps, _ = gradient_maps(model, images, targets, method, batch_size, output=output)
        return maps
    batch = as_image_batch(images)
    logits = model_copy(model, "logits", output=output)
    check_images(logits.model, batch)
    batch_size = batch_size_for(logits, batch_size)
    chosen = predicted_targets(model, batch, targets, batch_size, output=output)
    return _smoothgrad(
        lambda noisy, wanted: gradient_maps(model, noisy, wanted, "vanilla", batch_size,
                                             output=output),
        batch,
        chosen,
        samples=samples,
        noise=noise,
        seed=seed,
        batch_size=batch_size,
    )
