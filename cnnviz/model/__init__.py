"""Keras models: built from a config, compiled, read whatever their shape (nested, several outputs),
prepared for explanation (input preprocessing, output scores, compiled copies over the same
variables)."""

from cnnviz.model.build import backbone_layer_names, build_model
from cnnviz.model.optimizers import compile_model, make_optimizer

__all__ = ["backbone_layer_names", "build_model", "compile_model", "make_optimizer"]
