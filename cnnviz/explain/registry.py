"""One registry of attribution methods, shared by the trust checks (sanity, faithfulness, shortcut).

Every entry has the same signature, `(model, images, targets) -> (N, H, W) float32`, larger
meaning "more important for the target class", so the checks can compare methods with one loop:

====================  ===============================================================  ======
name                  map                                                              sign
====================  ===============================================================  ======
saliency              |d logit / d pixel|, max over channels (Simonyan et al. 2014)    >= 0
guided                guided backprop (Springenberg et al. 2015)                       >= 0
rectified             deconvnet ReLU rule (Zeiler & Fergus 2014)                       >= 0
smoothgrad            vanilla saliency over noisy copies (Smilkov et al. 2017)         >= 0
gradient_x_input      input x gradient (Shrikumar et al. 2016)                         signed
integrated_gradients  64 steps from a black baseline (Sundararajan et al. 2017)        signed
gradcam               Grad-CAM on the last 4-D layer (Selvaraju et al. 2017), [0, 1]   >= 0
guided_gradcam        Grad-CAM x guided backprop, [0, 1]                               >= 0
gradcam++, xgradcam,  the rest of the CAM family on the same layer                     >= 0
layercam, hirescam,   (`cnnviz.explain.cam`), [0, 1]
scorecam, eigencam
occlusion             probability drop when a patch hides the pixel (Zeiler & Fergus)  signed
rise                  E[P(target) | pixel kept], 2000 random masks (Petsiuk et al.)    >= 0
====================  ===============================================================  ======

Signed attributions per input value (gradient x input, integrated gradients) are summed over
channels, keeping the sign (Captum's convention): positive is evidence for the target.
`occlusion` is the target probability of the intact image minus the (mean) probability when a
patch covering the pixel is hidden: positive where the pixel is evidence for the target,
negative where hiding it makes the target more likely. Signed maps are left signed on purpose:
ordering pixels by them (faithfulness) and counting their positive part (`cue_share`) both want
the sign; the sanity checks compare absolute maps, as Adebayo et al. do.

Every method is deterministic for a given model (SmoothGrad's noise and RISE's masks are
seeded), so two calls on the same model give the same maps: the sanity checks rely on that.
"""

from __future__ import annotations

import functools
import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from cnnviz.errors import CnnvizError
from cnnviz.model.inputs import as_image_batch
from cnnviz.model.outputs import resolve_targets

AttributionFunction = Callable[..., np.ndarray]


def _saliency(method: str) -> AttributionFunction:
    def attribute(model, images, targets):
        from cnnviz.explain.saliency import saliency

        return saliency(model, images, targets, method=method, seed=0)

    attribute.__name__ = method
    return attribute


def _gradcam(guided: bool) -> AttributionFunction:
    def attribute(model, images, targets):
        from cnnviz.explain.gradcam import gradcam

        return gradcam(model, images, targets, guided=guided)

    attribute.__name__ = "guided_gradcam" if guided else "gradcam"
    return attribute


def _cam(method: str) -> AttributionFunction:
    def attribute(model, images, targets, input_range=None):
        from cnnviz.explain.cam import cam

        return cam(model, images, targets, method=method, input_range=input_range)

    attribute.__name__ = method
    return attribute


def _integrated_gradients(model, images, targets, input_range=None):
    from cnnviz.explain.integrated_gradients import integrated_gradients
    from cnnviz.model.inputs import channel_range

    black = (channel_range(model) if input_range is None else input_range)[0]
    return integrated_gradients(model, images, targets, baseline=black).sum(axis=-1)


def _gradient_x_input(model, images, targets):
    from cnnviz.explain.integrated_gradients import gradient_x_input

    return gradient_x_input(model, images, targets).sum(axis=-1)


# Below this many map values (N x classes x H x W) RISE keeps every class's map of a batch, so
# another target for the same images and weights (class sensitivity's second class) is free.
_EVERY_CLASS_VALUES = 1 << 24


def _rise(model, images, targets, input_range=None):
    from cnnviz.explain.rise import rise, rise_every_class

    batch = as_image_batch(images)
    # The paper's 7 x 7 grid, or one cell per pixel on images smaller than that.
    options = {"cell": min(7, *batch.shape[1:3]), "seed": 0, "input_range": input_range}
    from cnnviz.model.compiled import model_copy, num_classes

    classes = num_classes(model_copy(model, "probabilities").model)
    if batch.size // batch.shape[-1] * classes > _EVERY_CLASS_VALUES:
        return rise(model, batch, targets, **options)
    maps, intact = _MEMO.get(_MEMO.state(model, batch), ("rise-every-class", _key(input_range)),
                             lambda: rise_every_class(model, batch, **options))
    chosen = resolve_targets(targets, intact.argmax(axis=-1), intact.shape[-1])
    return maps[np.arange(len(batch)), chosen]


def occlusion_window(height: int, width: int) -> tuple[int, int]:
    """(patch, stride) the `occlusion` entry uses: a patch ~1/7 of the image, half-patch stride.

    28 x 28 -> (4, 2), 32 x 32 -> (5, 2), 12 x 12 -> (2, 1).
    """
    patch = max(2, round(min(height, width) / 7))
    return patch, max(1, patch // 2)


def _occlusion(model, images, targets, input_range=None):
    from cnnviz.explain.occlusion import occluded_probabilities, occlusion_from_probabilities

    batch = as_image_batch(images)
    patch, stride = occlusion_window(*batch.shape[1:3])
    occluded = _MEMO.get(_MEMO.state(model, batch), ("occlusion", patch, stride, _key(input_range)),
                         lambda: occluded_probabilities(model, batch, patch=patch, stride=stride,
                                                        input_range=input_range))
    # The forward passes are the same for every target: another target is free.
    result = occlusion_from_probabilities(occluded, targets, patch=patch, stride=stride)
    drop = result.unoccluded_probability[:, None, None] - result.probability
    return drop.astype(np.float32)


def _key(input_range) -> tuple | None:
    """A memo key for an input range ((lows, highs) arrays, or None)."""
    if input_range is None:
        return None
    return tuple(tuple(np.asarray(ends).tolist()) for ends in input_range)


# The entries whose maps depend on the inputs' range (a fill, a mask value, a baseline).
_RANGED = {"integrated_gradients", "scorecam", "occlusion", "rise"}

ATTRIBUTIONS: dict[str, AttributionFunction] = {
    "saliency": _saliency("vanilla"),
    "guided": _saliency("guided"),
    "rectified": _saliency("rectified"),
    "smoothgrad": _saliency("smoothgrad"),
    "gradient_x_input": _gradient_x_input,
    "integrated_gradients": _integrated_gradients,
    "gradcam": _gradcam(guided=False),
    "guided_gradcam": _gradcam(guided=True),
    **{method: _cam(method) for method in
       ("gradcam++", "xgradcam", "layercam", "hirescam", "scorecam", "eigencam")},
    "occlusion": _occlusion,
    "rise": _rise,
}
METHODS = tuple(ATTRIBUTIONS)

MethodsArgument = Sequence[str] | Mapping[str, "str | AttributionFunction"]


def resolve_methods(methods: MethodsArgument, *,
                    input_range=None) -> dict[str, AttributionFunction]:
    """Names (or name -> function) to an ordered {name: function} dict.

    Args:
        methods: registry names, e.g. ("saliency", "gradcam"); or a mapping from a display name
            to a registry name or to any function `(model, images, targets) -> (N, H, W)` (how a
            test plugs in a fake method).
        input_range: (lows, highs) per channel of the images the methods will get (how they
            were prepared, `cnnviz.model.inputs.channel_range`), given to the registry entries
            that fill, mask or start from black; None: what each model says.

    Returns:
        {name: function}, in the given order.

    Raises:
        CnnvizError: an unknown name, a duplicate, no methods, or the reserved name "random".
    """
    if isinstance(methods, str):
        methods = (methods,)
    items = list(methods.items()) if isinstance(methods, Mapping) else [(m, m) for m in methods]
    if not items:
        raise CnnvizError(f"methods is empty; choose from {', '.join(METHODS)}")
    resolved: dict[str, AttributionFunction] = {}
    for name, method in items:
        if name in resolved:
            raise CnnvizError(f"method {name!r} is listed twice")
        if name == "random":
            raise CnnvizError("'random' is the reference order every method is compared with; "
                              f"choose from {', '.join(METHODS)}")
        if callable(method):
            resolved[str(name)] = method
        elif method in ATTRIBUTIONS:
            function = ATTRIBUTIONS[method]
            if input_range is not None and method in _RANGED:
                function = functools.partial(function, input_range=input_range)
            resolved[str(name)] = function
        else:
            raise CnnvizError(
                f"unknown attribution method {method!r}; choose from {', '.join(METHODS)}"
            )
    return resolved


def attribute(model, images, targets=None, *, method: str = "saliency") -> np.ndarray:
    """One registry method's maps, checked to be (N, H, W) float32.

    Args:
        model: a built Keras classifier; not modified.
        images: (N, H, W, C) or (H, W, C).
        targets: None (each image's predicted class), an int, or N ints.
        method: a name from `METHODS`.

    Returns:
        (N, H, W) float32; see the module docstring for each method's sign.
    """
    function = resolve_methods((method,))[method]
    batch = as_image_batch(images)
    return _checked_maps(method, function(model, batch, targets), batch)


def _checked_maps(name: str, maps, batch: np.ndarray) -> np.ndarray:
    maps = np.asarray(maps, dtype=np.float32)
    if maps.shape != batch.shape[:3]:
        raise CnnvizError(
            f"method {name!r} returned maps of shape {maps.shape}; expected (N, H, W) = "
            f"{batch.shape[:3]}"
        )
    return maps


def run_methods(
    model, images: np.ndarray, targets: np.ndarray, methods: Mapping[str, AttributionFunction],
    *, remember: bool = True,
) -> dict[str, np.ndarray]:
    """{name: (N, H, W) float32 maps} for every resolved method, all for the same targets.

    A registry method's maps are remembered for the model's current weights, these images and
    these targets (`_MapMemo`): the trust checks ask for the trained model's maps of the same
    images three times (model randomization, class sensitivity, faithfulness) and compute
    them once. Every method is deterministic, so a remembered map is the map. `remember=False`
    computes and keeps nothing, and skips the digest of the weights: for weights that change
    between calls (a training callback).
    """
    batch = np.asarray(images)
    state = None
    maps = {}
    together = _computed_together(methods)
    both: dict[str, np.ndarray] = {}

    def computed(name, function):
        if name not in together:
            return _checked_maps(name, function(model, batch, targets), batch)
        if not both:  # the first of the two computes the other as well
            from cnnviz.explain.cam import gradcam_and_saliency

            both.update(zip(_TOGETHER, gradcam_and_saliency(model, batch, targets)))
        return _checked_maps(name, both[together[name]], batch)

    for name, function in methods.items():
        registered = _REGISTERED.get(id(function))
        if not remember or registered is None or registered[1] is not function:
            maps[name] = computed(name, function)
            continue
        if state is None:
            state = _MEMO.state(model, batch)
            wanted = _digest(np.asarray(targets)) if targets is not None else b"predicted"
        maps[name] = _MEMO.get(
            state, ("maps", registered[0], wanted),
            lambda name=name, function=function: computed(name, function)).copy()
    return maps


# Grad-CAM and vanilla saliency share one forward and one backward pass
# (`cam.gradcam_and_saliency`): asked for together, the registry's entries are computed so.
_TOGETHER = ("gradcam", "saliency")


def _computed_together(methods: Mapping[str, AttributionFunction]) -> dict[str, str]:
    """{display name: registry name} of the `_TOGETHER` entries when `methods` has both."""
    found = {}
    for name, function in methods.items():
        registered = _REGISTERED.get(id(function))
        if registered is not None and registered[1] is function and registered[0] in _TOGETHER:
            found[name] = registered[0]
    return found if set(found.values()) == set(_TOGETHER) else {}


# ---------------------------------------------------------------------------------- memo
def _digest(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((array.shape, array.dtype.str)).encode())
    digest.update(array.data)
    return digest.digest()


def weights_digest(model) -> bytes:
    """A digest of every variable's value: equal digests, equal weights (what a map depends on
    besides the images and targets)."""
    digest = hashlib.blake2b(digest_size=16)
    for variable in model.weights:
        digest.update(_digest(np.asarray(variable)))
    return digest.digest()


class _MapMemo:
    """Results of deterministic computations, per model (weakly: they die with it), per state
    (the model's weights and the images), least recently used states dropped beyond a byte
    budget. Only registry methods and their shared forward passes are remembered; a function
    plugged in by a caller always runs."""

    def __init__(self, budget: int = 256 << 20) -> None:
        self.budget = budget
        self.states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def state(self, model, images: np.ndarray) -> tuple:
        return (model, weights_digest(model), _digest(images))

    def get(self, state: tuple, key: tuple, compute: Callable[[], np.ndarray]):
        model, *identity = state
        try:
            states = self.states.setdefault(model, OrderedDict())
        except TypeError:  # not weak-referenceable: nothing is remembered
            return compute()
        identity = tuple(identity)
        entries = states.get(identity)
        if entries is not None and key in entries:
            states.move_to_end(identity)
            return entries[key]
        value = compute()
        states.setdefault(identity, {})[key] = value
        states.move_to_end(identity)
        self._trim()
        return value

    def _trim(self) -> None:
        def size(value) -> int:
            return sum(int(getattr(part, "nbytes", 0)) for part in
                       (value if isinstance(value, tuple) else (value,)))

        groups = [(states, identity, sum(size(v) for v in entries.values()))
                  for states in self.states.values() for identity, entries in states.items()]
        total = sum(bytes_ for *_, bytes_ in groups)
        for states, identity, bytes_ in groups:  # oldest first within each model
            if total <= self.budget or len(groups) <= 1:
                break
            if identity in states and len(states) > 1:
                del states[identity]
                total -= bytes_

    def clear(self) -> None:
        self.states = weakref.WeakKeyDictionary()


_MEMO = _MapMemo()
_REGISTERED = {id(function): (name, function) for name, function in ATTRIBUTIONS.items()}
