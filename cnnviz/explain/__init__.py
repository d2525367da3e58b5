"""Explanation methods: pure functions from (model, images, targets) to float32 numpy arrays.

Every method explains the pre-softmax score of a copy of the model (never the caller's model),
works batched on (N, H, W, C) images, and picks the predicted class when `targets` is None.
The forward-only methods read probabilities, as their papers define them: occlusion and RISE.
"""

from cnnviz.explain.activation_max import activation_maximization, activation_maximization_batch
from cnnviz.explain.cam import CAM_METHODS, cam, gradcam_and_saliency, gradcam_layer
from cnnviz.explain.gradcam import gradcam
from cnnviz.explain.integrated_gradients import gradient_x_input, integrated_gradients
from cnnviz.explain.layers import feature_maps, filters
from cnnviz.explain.occlusion import OcclusionResult, occlusion
from cnnviz.explain.rise import rise
from cnnviz.explain.saliency import METHODS as SALIENCY_METHODS
from cnnviz.explain.saliency import input_gradients, saliency

__all__ = [
    "CAM_METHODS",
    "SALIENCY_METHODS",
    "OcclusionResult",
    "activation_maximization",
    "activation_maximization_batch",
    "cam",
    "feature_maps",
    "filters",
    "gradcam",
    "gradcam_and_saliency",
    "gradcam_layer",
    "gradient_x_input",
    "input_gradients",
    "integrated_gradients",
    "occlusion",
    "rise",
    "saliency",
]
