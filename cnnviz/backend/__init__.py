"""The one seam for what differs per Keras backend (TensorFlow, JAX, PyTorch).

Explanation methods are written once over `keras.ops` and the five functions here: the
gradient of a batch's summed scores with respect to the inputs (`input_gradients`) or to an
inner layer's output (`layer_gradients`), a ReLU whose backward pass follows a guided or
deconvnet rule (`modified_relu`), and `compile`, which turns a body of tensors into a fast
callable on numpy arrays (a `tf.function`, a `jax.jit`, eager PyTorch). Each backend's code is
one small module (`tensorflow.py`, `jax.py`, `torch.py`), imported only when Keras runs on it.

The backend is Keras's own choice: KERAS_BACKEND, else ~/.keras/keras.json, else TensorFlow;
Keras reads it once, at its first import. `select` sets it before that (the CLI's `--backend`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence

from cnnviz.errors import CnnvizError

BACKENDS = ("tensorflow", "jax", "torch")


def current() -> str:
    """The name of the backend Keras runs on ("tensorflow", "jax" or "torch"); imports Keras."""
    import keras

    return keras.backend.backend()


def configured() -> str:
    """The backend Keras will use (or uses), without importing it: the imported Keras's own,
    else KERAS_BACKEND, else keras.json's "backend", else "tensorflow"."""
    if "keras" in sys.modules:
        return current()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.path.expanduser(os.environ.get("KERAS_HOME") or os.path.join("~", ".keras"))
    try:
        with open(os.path.join(home, "keras.json")) as file:
            return str(json.load(file).get("backend") or "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def select(name: str) -> None:
    """Make Keras run on backend `name`: sets KERAS_BACKEND before Keras is imported.

    Raises:
        CnnvizError: an unknown name, a backend whose package is not installed, or Keras
            already imported on another backend (it reads the choice once).
    """
    if name not in BACKENDS:
        raise CnnvizError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if "keras" in sys.modules:
        if current() != name:
            raise CnnvizError(
                f"Keras was already imported on the {current()} backend; the backend ({name}) "
                "must be chosen before Keras is imported (KERAS_BACKEND or --backend)"
            )
        return
    if importlib.util.find_spec(name) is None:
        extra = {"jax": "jax[cpu]", "torch": "torch"}.get(name, name)
        raise CnnvizError(f"backend {name!r} needs the {name} package, which is not installed: "
                          f"pip install '{extra}'")
    os.environ["KERAS_BACKEND"] = name


def require_tensorflow(what: str) -> None:
    """Raise a one-line CnnvizError when TensorFlow cannot be imported: `what` (training on
    tf.data, export, a SavedModel) needs it whatever backend Keras runs on."""
    from cnnviz._quiet import tensorflow_available

    if not tensorflow_available():
        raise CnnvizError(
            f"{what} needs TensorFlow, which is not installed here (Keras runs on "
            f"{configured()}): pip install 'cnnviz[tensorflow]'. Without it cnnviz explains, "
            "lists layers, summarizes, verifies and predicts")


@functools.cache
def _module(name: str):
    return importlib.import_module(f"cnnviz.backend.{name}")


def _backend():
    return _module(current())


def compile(body: Callable, variables: Sequence, *, any_batch: bool = True) -> Callable:
    """`call(*arrays) -> outputs`: `body(*tensors) -> tuple of tensors`, compiled.

    Args:
        body: a function of backend tensors (B, ...) built with `keras.ops` and model calls;
            traced once per item shape (the callers keep the chunk shape fixed).
        variables: the Keras variables `body` reads (a model copy's `variables`). JAX passes
            their current values as arguments, so a model trained or randomized in place is
            never seen with stale weights.
        any_batch: trace once for any leading size (TensorFlow: a None batch dimension in
            the signature); False traces for the first call's exact shapes, which lets
            TensorFlow fold shapes in long loops (activation maximization).

    Returns:
        A callable taking numpy arrays (B, ...) and returning a sequence of arrays that
        `numpy.asarray` reads.
    """
    return _backend().compile(body, variables, any_batch=any_batch)


def input_gradients(score_fn: Callable, inputs):
    """d(sum of scores) / d inputs, inside a compiled body.

    Args:
        score_fn: `score_fn(inputs) -> (scores (B,), aux)`; aux is any tuple of tensors
            passed back unchanged (not differentiated). Items must be independent (inference
            mode), so image i's gradient is that of its own score.
        inputs: (B, ...) float tensor.

    Returns:
        (gradients like `inputs`, aux).
    """
    return _backend().input_gradients(score_fn, inputs)


def layer_gradients(forward: Callable, inputs, *, with_inputs: bool = False):
    """An inner layer's output A and d(sum of scores) / dA, inside a compiled body; with
    `with_inputs`, d(sum of scores) / d inputs too, from the same backward pass.

    Args:
        forward: `forward(inputs, offset) -> (features, scores (B,), aux)`, where `offset` is
            None or a tensor shaped like `features` that the model adds to the layer's output
            before computing on (JAX differentiates with respect to it at 0; TensorFlow and
            PyTorch differentiate with respect to `features` itself and pass None).
        inputs: (B, ...) float tensor.

    Returns:
        (features, gradients like `features`, aux), or with `with_inputs`
        (features, gradients like `features`, gradients like `inputs`, aux).
    """
    return _backend().layer_gradients(forward, inputs, with_inputs=with_inputs)


def modified_relu(rule: str, relu: Callable) -> Callable:
    """`relu` (a ReLU-family function of one tensor) whose backward pass follows `rule`.

    guided (Springenberg et al. 2015): the incoming gradient where it is > 0, times relu's own
    derivative (as the backend's autodiff computes it). rectified (deconvnet, Zeiler & Fergus
    2014): the incoming gradient where it is > 0, whatever the forward input.
    """
    if rule not in ("guided", "rectified"):
        raise ValueError(f"unknown backward rule {rule!r}")  # internal: never user input
    return _backend().modified_relu(rule, relu)
