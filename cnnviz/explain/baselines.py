"""Reference images that attributions compare against: a blurred copy of the input."""

from __future__ import annotations

import numpy as np

from cnnviz.errors import CnnvizError
from cnnviz.model.inputs import as_image_batch


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
