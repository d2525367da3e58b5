"""A model's graph, nested models included: layer paths, and flat copies that share its weights.

Users' models hold whole models as layers (the Keras fine-tuning guide's `x = base(inputs)`),
where `model.get_layer` sees one layer and a gradient to an inner layer needs the inner model
called inside the same tape. Here every layer gets a path (`base/block_13_expand_relu`), and
`rebuild` replays the model's graph on new inputs with the *same* layer objects, opening nested
models up: the result is one flat functional model in which every inner layer's output is a
tensor, whose variables are the user's own (never copied, so never stale), and in which chosen
layers can be swapped for others (a linear output layer, guided ReLUs) without touching the
user's model.

Keras 3 has no public graph API: the replay, telling a functional model from a subclassed one
and naming the layer behind an output go through cnnviz._keras (the one home of Keras internals).
"""

from __future__ import annotations

import difflib
import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from cnnviz._keras import is_functional, producer, run_through_graph
from cnnviz.errors import CnnvizError

SEPARATOR = "/"
# Name every layer in an error message only for models this small; else point at `cnnviz layers`.
_LISTED_LAYERS = 40


def is_nested_model(layer) -> bool:
    """True for a Sequential or functional model used as a layer (a graph we can open)."""
    import keras

    if not isinstance(layer, keras.Model):
        return False
    return isinstance(layer, keras.Sequential) or is_functional(layer)


def check_graph(model) -> None:
    """A CnnvizError unless `model` is a Sequential or functional model (not a subclassed one)."""
    if not is_nested_model(model):
        raise CnnvizError(
            f"model {model.name!r} is a subclassed keras.Model ({type(model).__name__}) whose "
            "layers cannot be traced; cnnviz explains Sequential and functional models"
        )


@dataclass(frozen=True)
class LayerEntry:
    """One layer of a model, nested models opened: its path and the layer object."""

    path: str
    layer: object

    @property
    def depth(self) -> int:
        return self.path.count(SEPARATOR)


def layer_entries(model) -> list[LayerEntry]:
    """Every layer of `model` in order, InputLayers left out, each nested model followed by its
    own layers (paths `base`, `base/conv1`, ...)."""
    entries: list[LayerEntry] = []

    def add(container, prefix: str) -> None:
        for layer in container.layers:
            if type(layer).__name__ == "InputLayer":
                continue
            path = prefix + layer.name
            entries.append(LayerEntry(path, layer))
            if is_nested_model(layer):
                add(layer, path + SEPARATOR)

    add(model, "")
    return entries


def list_paths(paths: list[str]) -> str:
    """Layer paths for an error message: all of them for a small model, else how many and
    where to see them."""
    if len(paths) <= _LISTED_LAYERS:
        return ", ".join(paths) or "none"
    return f"{len(paths)} layers (list them with `cnnviz layers`)"


def find_layer(model, layer) -> LayerEntry:
    """The entry a user's `layer` means: a path, a name unique in the model, or a layer object.

    Args:
        model: a built Keras model.
        layer: "base/conv" (a path through nested models), "conv" (a top-level name, or a name
            that only one layer anywhere in the model has), or a layer object of the model.

    Raises:
        CnnvizError: no such layer (naming close matches), or a name several layers share
            (listing their paths).
    """
    entries = layer_entries(model)
    if not isinstance(layer, str):
        for entry in entries:
            if entry.layer is layer:
                return entry
        raise CnnvizError(
            f"layer {getattr(layer, 'name', layer)!r} is not a layer of model {model.name!r}"
        )
    path = layer.strip().strip(SEPARATOR)
    for entry in entries:
        if entry.path == path:
            return entry
    if SEPARATOR not in path:
        named = [entry for entry in entries if entry.path.rsplit(SEPARATOR, 1)[-1] == path]
        top = [entry for entry in named if entry.depth == 0]
        if len(top) == 1:
            return top[0]
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            paths = ", ".join(entry.path for entry in named)
            raise CnnvizError(
                f"layer name {path!r} is used by {len(named)} layers of model {model.name!r}: "
                f"{paths}; give the path"
            )
    close = difflib.get_close_matches(path, [entry.path for entry in entries], n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise CnnvizError(
        f"no layer named {path!r} in model {model.name!r}.{hint} Layers: "
        f"{list_paths([entry.path for entry in entries])}"
    )


def output_producer(model, index: int) -> LayerEntry:
    """The innermost layer whose call produces output `index` (a nested model is opened)."""
    tensor = model.outputs[index]
    prefix = ""
    while True:
        operation, _, tensor_index = producer(tensor)
        path = prefix + operation.name
        if not is_nested_model(operation):
            return LayerEntry(path, operation)
        tensor = operation.outputs[tensor_index]
        prefix = path + SEPARATOR


# ------------------------------------------------------------------------------ flat copies
Substitute = Callable[[str, object], object]  # (path, layer) -> the layer to call instead, or None


@dataclass
class Rebuilt:
    """A flat functional model over the user's own layers, and each layer path's output in it."""

    model: object
    tensors: dict


def walk(model, inputs: list, call_leaf: Callable, *, record: dict | None = None,
         prefix: str = ""):
    """Run `model`'s graph on `inputs`, nested models opened, every other layer computed by
    `call_leaf(path, layer, args, kwargs)`.

    The values flowing through can be anything `call_leaf` makes of them: symbolic tensors
    (`rebuild`), tensors, or numpy arrays (the reference forward pass). `record`, when given,
    receives {path: output} for every layer, nested models included (first call of a shared
    layer only).

    Returns:
        The model's outputs, structured as the model returns them.
    """
    import keras

    def call(operation, args, kwargs):
        path = prefix + operation.name
        if is_nested_model(operation):
            result = walk(operation, keras.tree.flatten(args), call_leaf, record=record,
                          prefix=path + SEPARATOR)
        else:
            result = call_leaf(path, operation, args, kwargs)
        if record is not None:
            record.setdefault(path, result)
        return result

    if isinstance(model, keras.Sequential):
        (current,) = inputs
        for layer in model.layers:
            if type(layer).__name__ != "InputLayer":
                current = call(layer, (current,), {})
        return current
    return run_through_graph(
        model, inputs, lambda operation, *args, **kwargs: call(operation, args, kwargs))


def rebuild(model, *, output: int | None = 0, substitute: Substitute | None = None,
            append: Callable | None = None) -> Rebuilt:
    """Replay `model`'s graph on new inputs with its own layers, nested models opened up.

    Args:
        model: a built Sequential or functional model.
        output: which output the copy returns (None: all of them, as a list).
        substitute: `(path, layer) -> replacement or None`, asked for every leaf layer; a
            replacement is called instead (it must compute from the same inputs). Returning
            `IDENTITY` passes the layer's first input through.
        append: optional `tensor -> tensor` applied to the chosen output (e.g. a softmax).

    Returns:
        A `Rebuilt`: the flat `keras.Model` (one input) and {path: output tensor of that layer
        in it}; a nested model's path maps to its output.
    """
    import keras

    check_graph(model)
    tensors: dict = {}
    used_names: set[str] = set()

    def named(layer, path: str):
        """`layer`, or an alias of it when its name is taken (two backbones both have `conv`)."""
        if layer.name not in used_names:
            used_names.add(layer.name)
            return layer
        alias = _Alias(layer, name=path.replace(SEPARATOR, "__"))
        used_names.add(alias.name)
        return alias

    def call_leaf(path, operation, args, kwargs):
        replacement = substitute(path, operation) if substitute is not None else None
        if replacement is IDENTITY:
            return keras.tree.flatten(args)[0]
        return named(replacement or operation, path)(*args, **kwargs)

    inputs = [keras.Input(tuple(t.shape[1:]), dtype=t.dtype) for t in model.inputs]
    outputs = keras.tree.flatten(walk(model, inputs, call_leaf, record=tensors))
    chosen = outputs if output is None else outputs[output]
    if append is not None:
        chosen = append(chosen)
    flat = keras.Model(inputs[0] if len(inputs) == 1 else inputs, chosen,
                       name=f"{model.name}_flat")
    _TENSORS[flat] = tensors
    return Rebuilt(flat, tensors)


# flat copy -> {path: tensor}. Weak keys: the entry dies with the copy (the tensors refer to
# layers and nodes, never to the copy itself).
_TENSORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layer_tensors(copy) -> list:
    """Every layer output tensor of a flat copy from `rebuild`, each once."""
    import keras

    unique = {id(tensor): tensor for value in _TENSORS.get(copy, {}).values()
              for tensor in keras.tree.flatten(value)}
    return list(unique.values())


def layer_tensor(copy, path: str):
    """The output tensor of layer `path` in `copy`'s graph.

    `copy` is a flat model from `rebuild` (every path of the original model is known), or any
    other model, whose own layers are looked up with `find_layer`.
    """
    tensors = _TENSORS.get(copy, {})
    if path in tensors:
        return tensors[path]
    found = find_layer(copy, path)
    return tensors.get(found.path, found.layer.output)


class _Identity:
    """Marker: pass the layer's input through (drop a trailing softmax layer)."""


IDENTITY = _Identity()


@functools.cache
def _alias_class():
    import keras

    class Alias(keras.layers.Layer):
        """Calls `layer` under another name: a flat model needs unique operation names."""

        def __init__(self, layer, **kwargs):
            super().__init__(dtype=layer.dtype_policy, **kwargs)
            self.layer = layer

        def call(self, *args, **kwargs):
            return self.layer(*args, **kwargs)

    return Alias


def _Alias(layer, **kwargs):
    return _alias_class()(layer, **kwargs)
