"""The class activation map family on one conv layer, batched and compiled (pytorch-grad-cam's set).

Every method combines the layer's activations A (h, w, K) into one (h, w) map, ReLU'd, min-max
scaled per image and resized bilinearly to the input. Where gradients are used, g = d(score)/dA
for the target's pre-softmax score, taken per image on the logits copy of the model:

=============  ==========================================================================
method         map
=============  ==========================================================================
gradcam        sum_k w_k A_k, w_k = mean over space of g_k (Selvaraju et al. 2017)
gradcam++      w_k = sum over space of relu(g_k) alpha_k, alpha = g^2 / (2 g^2 + sum(A_k) g^3),
               0 where g = 0 (Chattopadhyay et al. 2018)
xgradcam       w_k = sum(g_k A_k) / (sum(A_k) + eps) (Fu et al. 2020)
layercam       sum_k relu(g_k) * A_k, element-wise (Jiang et al. 2021)
hirescam       sum_k g_k * A_k, element-wise (Draelos & Carin 2020)
scorecam       w = softmax over k of the target score of the input masked by A_k, upsampled and
               min-max scaled; gradient-free, one forward pass per channel (Wang et al. 2020)
eigencam       first principal component of the (hw, K) activations, signed to correlate with
               their channel mean; class-agnostic (Muhammad & Yeasin 2020)
=============  ==========================================================================

The layer is reached through `_common.features_and_logits` and chosen by
`gradcam.gradcam_layer`, like Grad-CAM's, so every method sees the same layers.
"""

from __future__ import annotations

import numpy as np

from cnnviz import backend
from cnnviz.errors import CnnvizError
from cnnviz.model.compiled import (
    batch_size_for,
    check_images,
    choose_targets,
    model_copy,
    require_built,
    run_batched,
    target_array,
)
from cnnviz.model.graph import find_layer, list_paths
from cnnviz.model.inputs import as_image_batch, channel_range
from cnnviz.model.outputs import (
    default_layer_path,
    features_and_logits,
    four_d_paths,
    output_rank,
    target_scores,
)
from cnnviz.model.taps import layer_forward

CAM_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "scorecam", "eigencam")

# Added to a range before dividing: an all-zero (or constant) map becomes 0 instead of NaN.
_EPSILON = 1e-12
# XGrad-CAM's eps in sum(g A) / (sum(A) + eps), as pytorch-grad-cam has it.
_XGRADCAM_EPSILON = 1e-7
# Score-CAM's eps in its per-channel min-max scaling of the upsampled activation.
_SCORECAM_EPSILON = 1e-8


def _scaled_and_resized(maps, height: int, width: int):
    """ReLU, min-max per image, bilinear resize: (B, h, w) -> (B, H, W) in [0, 1]. keras.ops."""
    from keras import ops

    maps = ops.relu(maps)
    low = ops.min(maps, axis=(1, 2), keepdims=True)
    high = ops.max(maps, axis=(1, 2), keepdims=True)
    maps = (maps - low) / (high - low + _EPSILON)
    return ops.image.resize(maps[..., None], (height, width), interpolation="bilinear",
                            data_format="channels_last")[..., 0]


def _combine(method: str, features, gradients):
    """The (B, h, w) map before ReLU and scaling, from A and g (both (B, h, w, K))."""
    from keras import ops

    if method == "gradcam":
        weights = ops.mean(gradients, axis=(1, 2), keepdims=True)
    elif method == "gradcam++":
        # g^2 / (2 g^2 + S g^3) = 1 / (2 + S g) where g != 0: no g^3 underflow. pytorch-grad-cam
        # adds 1e-6 to the denominator, which shrinks alpha wherever |g| < ~1e-3; we don't.
        total = ops.sum(features, axis=(1, 2), keepdims=True)
        alpha = ops.divide_no_nan(ops.ones_like(gradients), 2.0 + total * gradients)
        alpha = ops.where(gradients != 0, alpha, ops.zeros_like(alpha))
        weights = ops.sum(ops.relu(gradients) * alpha, axis=(1, 2), keepdims=True)
    elif method == "xgradcam":
        total = ops.sum(features, axis=(1, 2), keepdims=True)
        weights = ops.sum(gradients * features, axis=(1, 2), keepdims=True) / (
            total + _XGRADCAM_EPSILON
        )
    elif method == "layercam":
        return ops.sum(ops.relu(gradients) * features, axis=-1)
    elif method == "hirescam":
        return ops.sum(gradients * features, axis=-1)
    else:
        raise ValueError(f"not a gradient CAM method: {method!r}")  # internal
    return ops.sum(weights * features, axis=-1)


def _principal_component(features):
    """Eigen-CAM: each image's (hw, K) activations, centred, projected on their first right
    singular vector; the sign chosen so the map correlates positively with the channel mean.
    Returns (B, h, w). keras.ops.

    The singular vector comes from the eigendecomposition of the smaller Gram matrix, K x K or
    hw x hw (7x faster than a batched SVD on CPU for a 7 x 7 x 32 layer, and cheap for a
    7 x 7 x 2048 one); if centred = U S V^T, the projection centred v_1 is s_1 u_1.
    """
    from keras import ops

    batch, height, width, channels = (ops.shape(features)[0], *features.shape[1:])
    flat = ops.reshape(features, (batch, height * width, channels))
    centred = flat - ops.mean(flat, axis=1, keepdims=True)
    if channels <= height * width:
        _, vectors = ops.eigh(ops.matmul(ops.transpose(centred, (0, 2, 1)), centred))
        projection = ops.einsum("bpk,bk->bp", centred, vectors[:, :, -1])  # (B, hw)
    else:
        values, vectors = ops.eigh(ops.matmul(centred, ops.transpose(centred, (0, 2, 1))))
        projection = vectors[:, :, -1] * ops.sqrt(ops.relu(values[:, -1:]))
    mean = ops.mean(flat, axis=-1)
    agreement = ops.sum(
        (projection - ops.mean(projection, axis=1, keepdims=True))
        * (mean - ops.mean(mean, axis=1, keepdims=True)),
        axis=1,
        keepdims=True,
    )
    projection = ops.where(agreement < 0, -projection, projection)
    return ops.reshape(projection, (batch, height, width))


def _scored_forward(clone, layer_name: str):
    """`forward(images, targets, offset) -> (layer output, target scores, (targets used,))` on
    a copy tapped at the layer, what `backend.layer_gradients` differentiates."""
    layer_forward_of = layer_forward(clone, layer_name)

    def forward(images, targets, offset):
        features, logits = layer_forward_of(images, offset)
        chosen = choose_targets(logits, targets)
        return features, target_scores(logits, chosen), (chosen,)

    return forward


def _cam_body(method: str, layer_name: str, height: int, width: int):
    """Compiled body for the gradient methods: (images, targets) -> (maps, targets used)."""

    def make_body(clone):
        forward = _scored_forward(clone, layer_name)

        def body(images, targets):
            # Images are independent (inference mode): d(sum of scores)/dA_i is image i's own.
            features, gradients, (chosen,) = backend.layer_gradients(
                lambda inputs, offset: forward(inputs, targets, offset), images)
            maps = _combine(method, features, gradients)
            return _scaled_and_resized(maps, height, width), chosen

        return body

    return make_body


def _eigencam_body(layer_name: str, height: int, width: int):
    """Compiled body for Eigen-CAM (gradient-free, class-agnostic): (images, targets) ->
    (maps, targets used)."""

    def make_body(clone):
        layer_and_logits = features_and_logits(clone, layer_name)

        def body(images, targets):
            features, logits = layer_and_logits(images, training=False)
            return (_scaled_and_resized(_principal_component(features), height, width),
                    choose_targets(logits, targets))

        return body

    return make_body


def _activations_body(layer_name: str):
    def make_body(clone):
        layer_and_logits = features_and_logits(clone, layer_name)

        def body(images, targets):
            features, logits = layer_and_logits(images, training=False)
            return features, choose_targets(logits, targets)

        return body

    return make_body


def _masked_scores_body(fill: float):
    """Score-CAM's forward pass: each image times one upsampled, min-max scaled channel."""
    from keras import ops

    def make_body(clone):
        def body(images, channel_maps, targets):
            height, width = images.shape[1:3]
            upsampled = ops.image.resize(channel_maps[..., None], (height, width),
                                         interpolation="bilinear", data_format="channels_last")
            low = ops.min(upsampled, axis=(1, 2, 3), keepdims=True)
            high = ops.max(upsampled, axis=(1, 2, 3), keepdims=True)
            mask = (upsampled - low) / (high - low + _SCORECAM_EPSILON)
            low_end = ops.convert_to_tensor(fill, images.dtype)
            logits = clone(low_end + (images - low_end) * mask, training=False)
            return (target_scores(logits, targets),)

        return body

    return make_body


def _scorecam(model, copy, batch, wanted, layer_name: str, batch_size: int,
              input_range=None) -> np.ndarray:
    from keras import ops

    count = len(batch)
    features, chosen = run_batched(
        copy,
        f"cam-activations:{layer_name}",
        _activations_body(layer_name),
        count,
        lambda start, stop: [batch[start:stop], wanted[start:stop]],
        batch_size,
    )
    channels = features.shape[-1]

    def masked(start: int, stop: int) -> list[np.ndarray]:
        # Item i is image i // channels masked by its channel i % channels.
        flat = np.arange(start, stop)
        image, channel = flat // channels, flat % channels
        return [batch[image], features[image, :, :, channel], chosen[image]]

    # masked-out pixels go to the input range's low end, black (docs/decisions.md D1)
    fill = (channel_range(model) if input_range is None else input_range)[0].astype(np.float32)
    (scores,) = run_batched(
        copy, f"scorecam:{tuple(fill.tolist())}", _masked_scores_body(fill), count * channels,
        masked,
        batch_size,
    )
    scores = scores.reshape(count, channels).astype(np.float64)
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))  # softmax over channels
    weights /= weights.sum(axis=1, keepdims=True)
    maps = np.einsum("nhwk,nk->nhw", features.astype(np.float64), weights).astype(np.float32)
    return ops.convert_to_numpy(_scaled_and_resized(ops.convert_to_tensor(maps),
                                                    *batch.shape[1:3]))


def cam(
    model,
    images,
    targets=None,
    *,
    method: str = "gradcam",
    layer=None,
    output=None,
    batch_size: int | None = None,
    input_range=None,
) -> np.ndarray:
    """Class activation maps of one conv layer by one of `CAM_METHODS` (see the module table).

    Args:
        model: a built Keras classifier (softmax or single-sigmoid output); not modified.
        images: (N, H, W, C) or (H, W, C) array.
        targets: None (each image's predicted class), an int, or a sequence of N ints. Eigen-CAM
            ignores it (it is class-agnostic).
        method: one of `CAM_METHODS`.
        layer: the layer: a path through nested models (`base/conv`), a name, or a layer
            object; None picks the last layer with a 4-D output, nested models searched
            (`gradcam.gradcam_layer`).
        output: which output of a multi-output model (index or name); None for one output.
        batch_size: most images per compiled chunk (None: sized to the model's activation
            memory); for Score-CAM, masked copies per chunk (it runs one forward pass per
            image and channel of the layer).
        input_range: Score-CAM: (lows, highs) per input channel of the inputs given
            (`cnnviz.model.inputs.channel_range`); masked-out pixels become `lows` (black).
            None: what the model says.

    Returns:
        (N, H, W) float32 in [0, 1]: per image the map at the layer's resolution, ReLU'd,
        min-max scaled, then resized bilinearly (keras.ops.image.resize) to the input's
        (H, W). A map with no positive evidence, or a constant one, is all 0.
    """

    if method not in CAM_METHODS:
        raise CnnvizError(f"unknown CAM method {method!r}; choose one of {', '.join(CAM_METHODS)}")
    batch = as_image_batch(images)
    name = gradcam_layer(model, layer)
    logits = model_copy(model, "logits", output=output)
    check_images(logits.model, batch)
    wanted = target_array(logits.model, targets, len(batch))
    batch_size = batch_size_for(logits, batch_size)
    if method == "scorecam":
        return _scorecam(model, logits, batch, wanted, name, batch_size, input_range)
    height, width = batch.shape[1:3]
    if method == "eigencam":
        copy, make_body = logits, _eigencam_body(name, height, width)
    else:  # the gradient methods differentiate through a tap on the layer (model.taps)
        copy = model_copy(model, "logits", output=output, tap=name)
        make_body = _cam_body(method, name, height, width)
    maps, _ = run_batched(
        copy,
        f"cam:{method}:{name}",
        make_body,
        len(batch),
        lambda start, stop: [batch[start:stop], wanted[start:stop]],
        batch_size,
    )
    return maps.astype(np.float32)


def gradcam_and_saliency(model, images, targets=None, *, layer=None, output=None,
                         batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`cam(..., method="gradcam")` and vanilla `saliency.saliency` of the same images and
    targets from one forward and one backward pass (`backend.layer_gradients(with_inputs)`):
    what a training callback that shows both after every epoch needs, for one trace instead
    of two. Arguments as for `cam`; returns (Grad-CAM maps, saliency maps), each (N, H, W)."""
    batch = as_image_batch(images)
    name = gradcam_layer(model, layer)
    logits = model_copy(model, "logits", output=output)
    check_images(logits.model, batch)
    wanted = target_array(logits.model, targets, len(batch))
    height, width = batch.shape[1:3]

    def make_body(clone):
        forward = _scored_forward(clone, name)

        def body(images, chosen_targets):
            from keras import ops

            features, gradients, input_gradients, _ = backend.layer_gradients(
                lambda inputs, offset: forward(inputs, chosen_targets, offset), images,
                with_inputs=True)
            maps = _scaled_and_resized(_combine("gradcam", features, gradients), height, width)
            return maps, ops.max(ops.abs(input_gradients), axis=-1)

        return body

    cams, saliency_maps = run_batched(
        model_copy(model, "logits", output=output, tap=name), f"gradcam+saliency:{name}",
        make_body, len(batch), lambda start, stop: [batch[start:stop], wanted[start:stop]],
        batch_size_for(logits, batch_size))
    return cams.astype(np.float32), saliency_maps.astype(np.float32)


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
