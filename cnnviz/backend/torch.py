"""The PyTorch backend: eager calls (faster than torch.compile for the few chunks an
explanation runs), `torch.autograd.grad`, a `torch.autograd.Function`."""

from __future__ import annotations

import keras
import torch


def compile(body, variables, *, any_batch=True):  # any_batch: TensorFlow's concern
    def call(*arrays):
        # No autograd graph for forward passes; the gradient functions below turn it on.
        with torch.no_grad():
            tensors = [keras.ops.convert_to_tensor(a) for a in arrays]
            return [keras.ops.convert_to_numpy(output) for output in body(*tensors)]

    return call


def input_gradients(score_fn, inputs):
    with torch.enable_grad():
        inputs = inputs.detach().requires_grad_(True)
        scores, aux = score_fn(inputs)
        (gradients,) = torch.autograd.grad(torch.sum(scores), inputs)
    return gradients, tuple(_detached(a) for a in aux)


def layer_gradients(forward, inputs, *, with_inputs=False):
    with torch.enable_grad():
        inputs = inputs.detach().requires_grad_(True)  # so `features` is on the graph
        features, scores, aux = forward(inputs, None)
        wanted = [features, inputs] if with_inputs else [features]
        gradients = torch.autograd.grad(torch.sum(scores), wanted)
    aux = tuple(_detached(a) for a in aux)
    return (features.detach(), *gradients, aux)


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


def modified_relu(rule, relu):
    class Modified(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return relu(x)

        @staticmethod
        def backward(ctx, upstream):
            (x,) = ctx.saved_tensors
            passed = torch.relu(upstream)
            if rule == "guided":
                with torch.enable_grad():  # the derivative exactly as Keras computes it
                    leaf = x.detach().requires_grad_(True)
                    (slope,) = torch.autograd.grad(torch.sum(relu(leaf)), leaf)
                passed = passed * slope
            return passed

    def modified(x):
        return Modified.apply(x)

    return modified

