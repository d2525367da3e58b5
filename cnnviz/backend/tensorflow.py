"""The TensorFlow backend: `tf.function` concrete functions, `tf.GradientTape`,
`tf.custom_gradient`."""

from __future__ import annotations

import tensorflow as tf


def compile(body, variables, *, any_batch=True):
    function = None

    def call(*arrays):
        nonlocal function
        if function is None:
            signature = [tf.TensorSpec((None, *a.shape[1:]) if any_batch else a.shape,
                                       tf.as_dtype(a.dtype)) for a in arrays]
            # The concrete function: calling it skips tf.function's argument binding
            # (a fifth of a small request's time).
            # No autograph: the bodies have no Python control flow on tensors (loops and
            # branches are keras.ops.fori_loop / cond), and converting Keras's layer code
            # was ~70% of a first call (Grad-CAM's 0.47 s -> 0.13 s).
            function = tf.function(body, input_signature=signature,
                                   autograph=False).get_concrete_function()
        return function(*(tf.constant(a) for a in arrays))

    return call


def input_gradients(score_fn, inputs):
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(inputs)
        scores, aux = score_fn(inputs)
    return tape.gradient(scores, inputs), aux


def layer_gradients(forward, inputs, *, with_inputs=False):
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(inputs)  # records the path through `features`; no weight gradients
        features, scores, aux = forward(inputs, None)
    if not with_inputs:
        return features, tape.gradient(scores, features), aux
    gradients, input_gradients = tape.gradient(scores, [features, inputs])
    return features, gradients, input_gradients, aux


def modified_relu(rule, relu):
    @tf.custom_gradient
    def modified(x):
        def backward(upstream):
            passed = tf.nn.relu(upstream)
            if rule == "guided":
                with tf.GradientTape() as tape:  # the derivative exactly as Keras computes it
                    tape.watch(x)
                    value = relu(x)
                passed = passed * tape.gradient(value, x)
            return passed

        return relu(x), backward

    return modified
