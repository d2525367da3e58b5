"""Explanation methods: pure functions from (model, images, targets) to float32 numpy arrays.

Every method explains the pre-softmax score of a copy of the model (never the caller's model),
works batched on (N, H, W, C) images, and picks the predicted class when `targets` is None.
"""

from cnnviz.explain.activation_max import activation_maximization, activation_maximization_batch
from cnnviz.explain.gradcam import gradcam, gradcam_layer
from cnnviz.explain.layers import feature_maps, filters
from cnnviz.explain.occlusion import OcclusionResult, occlusion
from cnnviz.explain.saliency import input_gradients, saliency

SALIENCY_METHODS = ("vanilla", "guided", "rectified", "smoothgrad")

__all__ = [
    "SALIENCY_METHODS",
    "OcclusionResult",
    "activation_maximization",
    "activation_maximization_batch",
    "feature_maps",
    "filters",
    "gradcam",
    "gradcam_layer",
    "input_gradients",
    "occlusion",
    "saliency",
]
