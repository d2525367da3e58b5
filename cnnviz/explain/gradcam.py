"""Grad-CAM (Selvaraju et al. 2017) and Guided Grad-CAM, batched and compiled.

For each image: the gradient of its target's pre-softmax score with respect to one conv layer's
output A (h, w, K) is averaged over space to one weight per channel, w_k; the map is
ReLU(sum_k w_k A_k), min-max scaled and resized to the input size (`cam.cam`, which computes
the whole CAM family). On a conv -> GlobalAveragePooling2D -> Dense head this is exactly CAM
(Zhou et al. 2016). This module also decides which layer every CAM method explains.
"""

from __future__ import annotations

import numpy as np

from cnnviz.explain.gradients import gradient_maps, predicted_targets
from cnnviz.model.inputs import as_image_batch

# Added to a map's max before dividing: an all-zero map stays 0 instead of becoming NaN.
_EPSILON = 1e-12


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
        model, images, targets, layer, output, batch_size: as for `cam`.
        guided: multiply by the guided-backprop saliency map, itself scaled to [0, 1] per image
            (Guided Grad-CAM), and scale the product to [0, 1] again.

    Returns:
        (N, H, W) float32 in [0, 1]: `cam(..., method="gradcam")`, per image the map min-max
        scaled at the layer's (h, w), then upsampled bilinearly (keras.ops.image.resize). A map with
        no positive evidence is all 0.
    """
    from cnnviz.explain.cam import cam  # cam.py imports gradcam_layer from here

    batch = as_image_batch(images)
    cams = cam(model, batch, targets, method="gradcam", layer=layer, output=output,
               batch_size=batch_size)
    if guided:
        # Same targets as the CAM, so both halves explain the same class.
        chosen = predicted_targets(model, batch, targets, batch_size, output=output)
        maps, _ = gradient_maps(model, batch, chosen, "guided", batch_size, output=output)
        cams = _normalized(cams * _normalized(maps))
    return cams.astype(np.float32)
