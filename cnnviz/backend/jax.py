"""The JAX backend: `jax.jit` over the variables' values (a `keras.StatelessScope`), `jax.grad`,
`jax.custom_vjp`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras


def compile(body, variables, *, any_batch=True):  # any_batch: TensorFlow's concern
    variables = list(variables)

    @jax.jit
    def run(values, *arrays):
        # The variables read as arguments, not as constants baked in at the first trace:
        # weights changed later (training, a sanity check's randomization) are seen.
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return tuple(body(*arrays))

    def call(*arrays):
        return run([variable.value for variable in variables], *arrays)

    return call


def input_gradients(score_fn, inputs):
    def total(x):
        scores, aux = score_fn(x)
        return jnp.sum(scores), aux

    return jax.grad(total, has_aux=True)(inputs)


def layer_gradients(forward, inputs, *, with_inputs=False):
    # JAX differentiates functions, not tensors: the gradient with respect to an offset added
    # to the layer's output, taken at 0, is the gradient with respect to that output.
    shape = jax.eval_shape(lambda: forward(inputs, None)[0])

    def total(offset, images):
        features, scores, aux = forward(images, offset)
        return jnp.sum(scores), (features, aux)

    zero = jnp.zeros(shape.shape, shape.dtype)
    if not with_inputs:
        gradients, (features, aux) = jax.grad(total, has_aux=True)(zero, inputs)
        return features, gradients, aux
    (gradients, input_gradients), (features, aux) = jax.grad(
        total, argnums=(0, 1), has_aux=True)(zero, inputs)
    return features, gradients, input_gradients, aux


def modified_relu(rule, relu):
    @jax.custom_vjp
    def modified(x):
        return relu(x)

    def forward(x):
        return relu(x), x

    def backward(x, upstream):
        passed = jax.nn.relu(upstream)
        if rule == "guided":
            _, derivative = jax.vjp(relu, x)
            (slope,) = derivative(jnp.ones_like(x))
            passed = passed * slope
        return (passed,)

    modified.defvjp(forward, backward)
    return modified
