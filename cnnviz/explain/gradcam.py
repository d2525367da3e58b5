"""Grad-CAM (Selvaraju et al. 2017) and Guided Grad-CAM, batched and compiled.

For each image: the gradient of its target's pre-softmax score with respect to one conv layer's
output A (h, w, K) is averaged over space to one weight per channel, w_k; the map is
ReLU(sum_k w_k A_k), divided by its own max and resized to the input size. On a
conv -> GlobalAveragePooling2D -> Dense head this is exactly CAM (Zhou et al. 2016).
"""

from __future__ import annotations

import numpy as np

from cnnviz.errors import CnnvizError
from cnnviz.explain._common import (
    as_image_batch,
    default_layer_path,
    features_and_logits,
    four_d_paths,
    output_rank,
    target_scores,
)
from cnnviz.explain._compiled import (
    batch_size_for,
    check_images,
    choose_targets,
    model_copy,
    require_built,
    run_batched,
    target_array,
)
from cnnviz.explain._graph import find_layer, list_paths
from cnnviz.explain.saliency import _gradient_maps

# Added to a map's max before dividing: an all-zero map stays 0 instead of becoming NaN.
_EPSILON = 1e-12


def gradcam_layer(model, layer=None) -> str:
    """The path of the layer Grad-CAM explains.

    Args:
        model: a built Keras model.
        layer: None (the last layer with a 4-D output, inside nested models too:
            `_common.default_layer_path`), a path through nested models (`base/conv`), a name
            (top-level, or unique in the model), or a layer object of `model`.

    Returns:
        The layer's path (its name for a top-level layer).

    Raises:
        CnnvizError: no such layer in `model`, or its output is not (N, h, w, K).
    """
    require_built(model)
    if layer is None:
        return default_layer_path(model)
    entry = find_layer(model, layer)
    if output_rank(entry.layer) != 4:
        shape = tuple(entry.layer.output.shape)
        raise CnnvizError(
            f"Grad-CAM needs a layer with a 4-D output (N, h, w, K); layer {entry.path!r} "
            f"outputs {shape}. 4-D layers: {list_paths(four_d_paths(model))}"
        )
    return entry.path


def _gradcam_body(layer_name: str, height: int, width: int):
    def make_body(clone):
        import tensorflow as tf

        layer_and_logits = features_and_logits(clone, layer_name)

        def body(images, targets):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(images)  # records the path through `features`; no weight gradients
                features, logits = layer_and_logits(images, training=False)
                chosen = choose_targets(logits, targets)
                scores = target_scores(logits, chosen)
            gradients = tape.gradient(scores, features)
            # Mean over space only, per image and channel (keras.io's example also averages
            # over the batch axis, which is right only for one image).
            weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
            cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
            cam = cam / (tf.reduce_max(cam, axis=(1, 2), keepdims=True) + _EPSILON)
            cam = tf.image.resize(cam[..., None], (height, width), method="bilinear")[..., 0]
            return cam, chosen

        return body

    return make_body


def _normalized(maps: np.ndarray) -> np.ndarray:
    """Each (H, W) map divided by its own max (+ epsilon); maps are >= 0."""
    return maps / (maps.max(axis=(1, 2), keepdims=True) + _EPSILON)


def gradcam(
    model,
    images,
    targets=None,
    *,
    layer=None,
    guided: bool = False,
    output=None,
    batch_size: int | None = None,
) -> np.ndarray:
    """Grad-CAM heatmaps (Selvaraju et al. 2017): where the conv layer saw evidence for the target.

    Args:
        model: a built Keras classifier (softmax or single-sigmoid output); not modified.
        images: (N, H, W, C) or (H, W, C) array.
        targets: None (each image's predicted class), an int, or a sequence of N ints.
        layer: the conv layer: a path through nested models (`base/conv`), a name, or a layer
            object; None picks the last 4-D layer, nested models searched (`gradcam_layer`).
        guided: multiply by the guided-backprop saliency map, itself scaled to [0, 1] per image
            (Guided Grad-CAM), and scale the product to [0, 1] again.
        output: which output of a multi-output model (index or name); None for one output.
        batch_size: most images per compiled chunk; None sizes it to the model
            (`_compiled.batch_size_for`).

    Returns:
        (N, H, W) float32 in [0, 1]; per image, the map over its own max, upsampled bilinearly
        (tf.image.resize) from the layer's (h, w). A map with no positive evidence is all 0.
    """
    batch = as_image_batch(images)
    name = gradcam_layer(model, layer)
    logits = model_copy(model, "logits", output=output)
    check_images(logits.model, batch)
    wanted = target_array(logits.model, targets, len(batch))
    height, width = batch.shape[1:3]
    cams, chosen = run_batched(
        logits,
        f"gradcam:{name}",
        _gradcam_body(name, height, width),
        len(batch),
        lambda start, stop: [batch[start:stop], wanted[start:stop]],
        batch_size_for(logits, batch_size),
    )
    if guided:
        # Same targets as the CAM (resolved once), so both halves explain the same class.
        maps, _ = _gradient_maps(model, batch, chosen, "guided", batch_size, output=output)
        cams = _normalized(cams * _normalized(maps))
    return cams.astype(np.float32)
