"""Every use of Keras private API in cnnviz, in one place, each behind a check.

Keras 3 has no public API for replaying a functional graph, for naming the layer behind an output
tensor, or for the few training internals cnnviz must adjust. Each use below says what it is for;
when a Keras release drops or renames one, the call raises a `KerasInternalChanged` that names the
internal and the Keras version, and `tests/test_keras_internals.py` fails with the same message.
pyproject.toml pins Keras to the releases the suite ran on (`TESTED_KERAS`).
"""

from __future__ import annotations

from cnnviz.errors import CnnvizError

TESTED_KERAS = "3.15"  # the Keras minor version the suite ran on (pyproject: keras>=3.15,<3.16)


class KerasInternalChanged(CnnvizError):
    """A Keras private name cnnviz relies on is missing in the installed Keras."""


def _changed(internal: str, why: str) -> KerasInternalChanged:
    import keras

    return KerasInternalChanged(
        f"cnnviz relies on the Keras internal {internal} ({why}), which Keras {keras.__version__} "
        f"does not have; cnnviz was tested with Keras {TESTED_KERAS}.x: install "
        f"'keras>={TESTED_KERAS},<3.16'")


# ---------------------------------------------------------------------------- functional graphs
def is_functional(layer) -> bool:
    """True for a functional model (one with a graph to replay), False for a subclassed one.

    Internal: `Functional._nodes_by_depth` (only graph models have it)."""
    return hasattr(layer, "_nodes_by_depth")


def producer(tensor) -> tuple:
    """(operation, node_index, tensor_index) of the layer call that produced a symbolic tensor.

    Internal: `KerasTensor._keras_history`."""
    try:
        history = tensor._keras_history
    except AttributeError:
        raise _changed("KerasTensor._keras_history", "which layer produced a model output") \
            from None
    return tuple(history)


def run_through_graph(model, inputs, call_fn):
    """Run a functional model's graph on `inputs`, each layer computed by
    `call_fn(operation, *args, **kwargs)`.

    Internal: `Function._run_through_graph`, the loop Keras itself runs a graph with."""
    try:
        replay = model._run_through_graph
    except AttributeError:
        raise _changed("Function._run_through_graph", "replaying a model's graph over its own "
                       "layers") from None
    return replay(inputs, operation_fn=lambda operation: operation, call_fn=call_fn)


def all_layers(model) -> list:
    """Every layer inside `model`, nested models opened (the model itself excluded).

    Internal: `Layer._flatten_layers`."""
    try:
        flatten = model._flatten_layers
    except AttributeError:
        raise _changed("Layer._flatten_layers", "listing the layers of nested models") from None
    return list(flatten(include_self=False, recursive=True))


# ------------------------------------------------------------------------------------ training
def replace_symbolic_build(model, build) -> None:
    """Make this model instance build itself by `build(keras_build, iterator, data_batch)`.

    Internal: `Trainer._maybe_symbolic_build` (TensorFlow, before a distributed fit) and
    `Trainer._symbolic_build` (JAX and PyTorch, before every fit of a model whose metrics are
    not built), which Keras calls with a batch pulled from the data (see cnnviz.train.devices)."""
    import keras

    name = ("_maybe_symbolic_build" if keras.backend.backend() == "tensorflow"
            else "_symbolic_build")
    try:
        keras_build = getattr(model, name)
    except AttributeError:
        raise _changed(f"Trainer.{name}", "building a model from the data's element_spec "
                       "before fitting") from None
    setattr(model, name, lambda iterator=None, data_batch=None: build(
        keras_build, iterator, data_batch))


def pipeline_seed_generators(layers) -> list:
    """The SeedGenerators that Keras's random preprocessing layers draw from inside tf.data,
    once a tf.data map has called them.

    Internal: on JAX and PyTorch a data layer keeps a second, TensorFlow generator for tf.data
    in `_backend_generators`, made when the map first traces it (on TensorFlow it is the
    layer's own `generator`). A resumed run sets their states back to the committed epoch's,
    or it would augment its epochs differently."""
    import keras

    generators = []
    for layer in layers:
        if keras.backend.backend() == "tensorflow":
            generators.append(layer.generator)
            continue
        made = getattr(layer, "_backend_generators", {})
        if "tensorflow" not in made:
            raise _changed(f"{type(layer).__name__}._backend_generators['tensorflow']",
                           "the random generator an augmentation layer uses inside tf.data")
        generators.append(made["tensorflow"])
    return generators


def epoch_iterator_class():
    """Keras's TensorFlow epoch iterator class, or None where this Keras has another layout.

    Internal: `keras.src.backend.tensorflow.trainer.TFEpochIterator` (replaying the shuffle order
    of the epochs a resumed run skips). None is not an error: resume still works, in another data
    order."""
    try:
        from keras.src.backend.tensorflow.trainer import TFEpochIterator
    except ImportError:
        return None
    return TFEpochIterator


def variable_key(optimizer, variable):
    """The key an optimizer knows a variable by inside `update_step` (which gets backend
    variables without Keras paths).

    Internal: `BaseOptimizer._var_key`."""
    try:
        key = optimizer._var_key
    except AttributeError:
        raise _changed("BaseOptimizer._var_key", "per-layer learning rates") from None
    return key(variable)


# ------------------------------------------------------------------------------------ downloads
def keras_cache_dir() -> str:
    """The folder `keras.utils.get_file` keeps downloads under (applications' weights in its
    `models/`): $KERAS_HOME or ~/.keras as Keras read it at import, /tmp/.keras where that is not
    writable, as get_file falls back.

    Internal: `keras.src.backend.config.keras_home` (Keras has no public accessor)."""
    import os
    import tempfile

    try:
        from keras.src.backend.config import keras_home
    except ImportError:
        raise _changed("keras.src.backend.config.keras_home", "naming Keras's download cache") \
            from None
    home = os.path.expanduser(keras_home())
    if not os.access(home, os.W_OK):
        home = os.path.join("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir(), ".keras")
    return home
