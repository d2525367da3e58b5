"""Input gradients of target scores under each backward rule (vanilla, guided, rectified),
batched and compiled: the core every gradient method shares."""

from __future__ import annotations

import numpy as np

from cnnviz import backend
from cnnviz.errors import CnnvizError
from cnnviz.model.compiled import (
    batch_size_for,
    check_images,
    choose_targets,
    model_copy,
    run_batched,
    target_array,
)
from cnnviz.model.inputs import as_image_batch
from cnnviz.model.outputs import target_scores

GRADIENT_METHODS = ("vanilla", "guided", "rectified")


# --------------------------------------------------------------------------------------------
# Gradients and maps.
# --------------------------------------------------------------------------------------------


def gradient_body(clone):
    """A compiled body: (images, targets) -> (input gradients of the target scores, targets
    used), on any backend."""

    def scores_of(images, targets):
        logits = clone(images, training=False)
        chosen = choose_targets(logits, targets)
        return target_scores(logits, chosen), (chosen,)

    def body(images, targets):
        # Images are independent (inference mode), so d(sum of scores)/d(image i) is image
        # i's own gradient: one backward pass for the whole chunk.
        gradients, (chosen,) = backend.input_gradients(
            lambda inputs: scores_of(inputs, targets), images)
        return gradients, chosen

    return body


def rule_gradients(model, images, targets, method: str, batch_size: int | None, *, output=None):
    """Signed input gradients (N, H, W, C) of each target score, and the targets used (N,)."""
    if method not in GRADIENT_METHODS:
        raise CnnvizError(
            f"unknown gradient method {method!r}; choose one of {', '.join(GRADIENT_METHODS)}"
        )
    batch = as_image_batch(images)
    logits = model_copy(model, "logits", output=output)
    check_images(logits.model, batch)
    wanted = target_array(logits.model, targets, len(batch))
    # Input gradients only: the copies with BatchNormalization folded (`model.folding`),
    # chunked as the plain copy (a folded one lists fewer activations).
    copy = model_copy(model, "logits", output=output, folded=True) if method == "vanilla" \
        else model_copy(model, method, output=output)
    gradients, chosen = run_batched(
        copy,
        "gradients",
        gradient_body,
        len(batch),
        lambda start, stop: [batch[start:stop], wanted[start:stop]],
        batch_size_for(logits, batch_size),
    )
    return gradients.astype(np.float32), chosen.astype(np.int32)


def gradient_maps(model, images, targets, method: str, batch_size: int | None, *,
                   output=None):
    """|gradient| maxed over channels (N, H, W), and the targets used (N,)."""
    gradients, chosen = rule_gradients(model, images, targets, method, batch_size, output=output)
    return np.abs(gradients).max(axis=-1), chosen


def predicted_targets(model, images: np.ndarray, targets, batch_size: int | None, *,
                       output=None) -> np.ndarray:
    """Targets (N,) int32: validated `targets`, or each image's predicted class."""
    logits = model_copy(model, "logits", output=output)
    wanted = target_array(logits.model, targets, len(images))
    if targets is not None:
        return wanted

    def make_body(clone):
        def body(batch, requested):
            return (choose_targets(clone(batch, training=False), requested),)

        return body

    (chosen,) = run_batched(
        logits,
        "targets",
        make_body,
        len(images),
        lambda start, stop: [images[start:stop], wanted[start:stop]],
        batch_size_for(logits, batch_size),
    )
    return chosen.astype(np.int32)
