"""A logits copy with a tap on one inner layer: what gradients with respect to a layer's output
(Grad-CAM and its family) are taken through, on every Keras backend.

TensorFlow and PyTorch differentiate with respect to any tensor a computation went through; JAX
differentiates only with respect to a function's arguments. The tap gives both one form: it
calls the layer and adds an offset to its output, None (nothing added) or a tensor the compiled
body passes in, whose gradient at 0 is the gradient with respect to that output, all its uses
(skip connections too) included. The offset travels in a slot the compiled body fills while it
calls the copy and empties in `finally`.
"""

from __future__ import annotations

import functools
import weakref

from cnnviz.model.graph import find_layer, is_nested_model, output_producer, rebuild
from cnnviz.model.outputs import linear_output_substitute

# tapped copy -> (path of the tapped layer, its slot). Weak keys: dies with the copy.
_TAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Slot:
    """Where a compiled body puts the offset the tap adds (None: nothing is added)."""

    offset = None


def tapped_logits_model(model, index: int, path: str):
    """The logits copy of `model`'s output `index` (as `outputs.logits_model`) whose layer at
    `path` is tapped (a nested model's path taps the layer that produces its output)."""
    linear_output = linear_output_substitute(model, index)
    leaf = _leaf_path(model, path)
    slot = _Slot()
    tapped = []

    def substitute(candidate_path, layer):
        replacement = linear_output(candidate_path, layer) if linear_output else None
        if candidate_path != leaf or tapped:  # a shared layer: its first call only
            return replacement
        tapped.append(candidate_path)
        return _tap_class()(layer if replacement is None else replacement, slot)

    copy = rebuild(model, output=index, substitute=substitute).model
    _TAPS[copy] = (path, slot)
    return copy


def layer_forward(clone, path: str):
    """`forward(images, offset) -> (layer output, logits)` on a tapped copy (`offset` None or
    shaped like the layer's output, added to it), for `cnnviz.backend.layer_gradients`."""
    import keras

    from cnnviz.model.graph import layer_tensor

    tapped_path, slot = _TAPS[clone]
    if tapped_path != path:
        raise ValueError(f"copy is tapped at {tapped_path!r}, not {path!r}")  # internal
    both = keras.Model(clone.inputs[0], [layer_tensor(clone, path), clone.outputs[0]])

    def forward(images, offset):
        slot.offset = offset
        try:
            features, logits = both(images, training=False)
        finally:
            slot.offset = None
        return features, logits

    return forward


def _leaf_path(model, path: str) -> str:
    entry = find_layer(model, path)
    prefix, layer = entry.path, entry.layer
    while is_nested_model(layer):
        inner = output_producer(layer, 0)
        prefix, layer = f"{prefix}/{inner.path}", inner.layer
    return prefix


@functools.cache
def _tap_class():
    import keras

    class Tap(keras.layers.Layer):
        """Calls `layer` and adds the slot's offset (when there is one) to its output."""

        def __init__(self, layer, slot):
            super().__init__(name=layer.name, dtype=layer.dtype_policy)
            self.layer = layer
            self._cnnviz_slot = slot

        def call(self, *args, **kwargs):
            outputs = self.layer(*args, **kwargs)
            offset = self._cnnviz_slot.offset
            return outputs if offset is None else outputs + offset

    return Tap
