"""Sanity checks for saliency maps (Adebayo et al. 2018): does the map depend on what was learned?

Cascading model randomization re-initializes the layers of the model (in place, every weight
restored afterwards) from the output layer down, one more layer at each step, and recomputes
every method's maps for the same images
and the same target classes. A map that explains the model must change as the weights it
explains are destroyed; a map that stays the same (high rank correlation with the trained
model's map even when every layer is random) shows the input, not the model: the paper's edge
detector. Every step is judged, as the paper reads its figures: a map still similar after the
top layers are random (guided backprop's failure) does not explain those layers, even if it
changes once the first conv layers go too. `class_sensitivity` asks the same question of the
target class: a map that looks the
same for the predicted and for another class does not explain the class.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from cnnviz.errors import CnnvizError
from cnnviz.explain.registry import METHODS, MethodsArgument, resolve_methods, run_methods
from cnnviz.model.compiled import predict_probabilities
from cnnviz.model.inputs import as_image_batch
from cnnviz.model.outputs import resolve_targets

# Added to a map's range before dividing (SSIM's [0, 1] scaling): an all-zero map stays 0.
_EPSILON = 1e-12


# ------------------------------------------------------------------------------ similarities
def rank_correlation(maps_a, maps_b) -> np.ndarray:
    """Spearman rank correlation of |map_a| and |map_b|, per image.

    Ranks with ties averaged, then the Pearson correlation of the ranks (= scipy.stats.spearmanr).
    A constant map has no ranking: the correlation is 1.0 when both maps are constant (they
    agree), 0.0 when only one is (e.g. Grad-CAM all zero after randomization).

    Args:
        maps_a, maps_b: (N, H, W) maps (any sign; absolute values are compared).

    Returns:
        (N,) float64 in [-1, 1].
    """
    from scipy.stats import rankdata

    a, b = _flat_pair(maps_a, maps_b)
    ranks_a = rankdata(np.abs(a), axis=1) - (a.shape[1] + 1) / 2  # ranks, centred
    ranks_b = rankdata(np.abs(b), axis=1) - (b.shape[1] + 1) / 2
    norms = np.sqrt((ranks_a**2).sum(axis=1) * (ranks_b**2).sum(axis=1))
    constant_a = (ranks_a == 0).all(axis=1)
    constant_b = (ranks_b == 0).all(axis=1)
    correlation = np.divide(
        (ranks_a * ranks_b).sum(axis=1), norms, out=np.zeros(len(a)), where=norms > 0
    )
    return np.where(constant_a & constant_b, 1.0, correlation)


def structural_similarity(maps_a, maps_b) -> np.ndarray:
    """SSIM of |map_a| and |map_b| per image, each first min-max scaled to [0, 1] (data_range 1).

    Uses skimage.metrics.structural_similarity with a 7x7 window (smaller, odd, on maps smaller
    than 7 pixels).

    Args:
        maps_a, maps_b: (N, H, W) maps.

    Returns:
        (N,) float64 in [-1, 1].
    """
    from skimage.metrics import structural_similarity as ssim

    a, b = _unit_range(np.abs(_as_maps(maps_a))), _unit_range(np.abs(_as_maps(maps_b)))
    if a.shape != b.shape:
        raise CnnvizError(f"maps to compare have different shapes: {a.shape} and {b.shape}")
    window = min(7, *a.shape[1:])
    window -= 1 - window % 2  # odd
    if window < 3:
        raise CnnvizError(f"maps of {a.shape[1]} x {a.shape[2]} pixels are too small for SSIM")
    return np.array(
        [ssim(x, y, data_range=1.0, win_size=window) for x, y in zip(a, b)], dtype=np.float64
    )


def _as_maps(maps) -> np.ndarray:
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3:
        raise CnnvizError(f"maps must have shape (N, H, W); received {maps.shape}")
    return maps


def _flat_pair(maps_a, maps_b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_maps(maps_a), _as_maps(maps_b)
    if a.shape != b.shape:
        raise CnnvizError(f"maps to compare have different shapes: {a.shape} and {b.shape}")
    return a.reshape(len(a), -1), b.reshape(len(b), -1)


def _unit_range(maps: np.ndarray) -> np.ndarray:
    low = maps.min(axis=(1, 2), keepdims=True)
    high = maps.max(axis=(1, 2), keepdims=True)
    return (maps - low) / (high - low + _EPSILON)


# ------------------------------------------------------------------------- randomization
def _leaf_layers(model) -> list:
    """Layers with weights, in model order; nested models are opened up."""
    leaves = []
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            leaves.extend(_leaf_layers(layer))
        elif layer.weights:
            leaves.append(layer)
    return leaves


def randomization_steps(model) -> tuple[str, ...]:
    """Names of the layers `model_randomization` re-initializes, in order: output layer first."""
    return tuple(layer.name for layer in reversed(_leaf_layers(model)))


@contextmanager
def _weights_restored(model):
    """Run the block, then give every variable of `model` back its value from before it,
    also when the block raises (or is interrupted)."""
    saved = [(variable, np.array(variable)) for variable in model.weights]
    try:
        yield model
    finally:
        for variable, value in saved:
            variable.assign(value)


def _reinitialize(layer, seed: int) -> None:
    """Give every variable of `layer` a fresh value from the layer's own initializer, seeded.

    Kernels get their Glorot/He/... draw, biases and BatchNorm statistics their initial constants,
    as a freshly built layer would. A variable without an initializer attribute gets a seeded
    Glorot-normal draw (matrices) or zeros (vectors).
    """
    import keras

    for index, variable in enumerate(layer.weights):
        name = variable.name.split("/")[-1].split(":")[0]
        initializer = getattr(layer, f"{name}_initializer", None)
        shape = tuple(variable.shape)
        if initializer is not None:
            initializer = keras.initializers.get(initializer)
            config = initializer.get_config()
            if "seed" in config:  # reseed so the draw is reproducible and differs per variable
                initializer = initializer.__class__.from_config({**config, "seed": seed + index})
            value = np.asarray(initializer(shape, dtype=variable.dtype))
        elif len(shape) >= 2:
            receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
            fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
            rng = np.random.default_rng(seed + index)
            value = rng.normal(0.0, np.sqrt(2.0 / (fan_in + fan_out)), shape)
        else:
            value = np.zeros(shape)
        variable.assign(value.astype(variable.dtype))


@dataclass(frozen=True)
class SanityResult:
    """What `model_randomization` measured.

    Attributes:
        methods: the methods compared, in order.
        steps: (S,) names of the layers randomized, output layer first; step s has layers
            steps[:s + 1] randomized (cumulative).
        rank_correlation: {method: (S,)} mean over images of the Spearman correlation between the
            trained model's |map| and the map after each step.
        ssim: {method: (S,)} mean SSIM, same pairs.
        rank_correlation_per_image, ssim_per_image: {method: (S, N)}.
        similar: {method: (S,) bool}, per step: the mean rank correlation OR the mean SSIM is
            above `threshold`, i.e. randomizing down to that layer left the map similar.
        insensitive_to: {method: tuple of step names where `similar`}: the layers the map
            does not depend on, the paper's per-layer reading (guided backprop on a CNN:
            its top layers).
        insensitive: {method: bool}, final-step rank correlation > `threshold`: the map barely
            changes when no learned weight is left.
        threshold: the rank correlation (and SSIM) above which a map counts as unchanged.
        targets: (N,) int32, the classes explained at every step (the trained model's).
        images: (M, H, W, C) the first M images, for figures.
        maps: {method: (S + 1, M, H, W)} their maps: index 0 from the trained model, then one
            per step.
    """

    methods: tuple[str, ...]
    steps: tuple[str, ...]
    rank_correlation: dict
    ssim: dict
    rank_correlation_per_image: dict
    ssim_per_image: dict
    similar: dict
    insensitive_to: dict
    insensitive: dict
    threshold: float
    targets: np.ndarray
    images: np.ndarray
    maps: dict

    def to_dict(self) -> dict:
        """The numbers, JSON-serializable (no maps or images)."""
        return {
            "test": "cascading model randomization (Adebayo et al. 2018)",
            "steps": list(self.steps),
            "images": len(self.targets),
            "threshold": float(self.threshold),
            "methods": {
                name: {
                    "rank_correlation": [float(v) for v in self.rank_correlation[name]],
                    "ssim": [float(v) for v in self.ssim[name]],
                    "similar_per_step": [bool(v) for v in self.similar[name]],
                    "insensitive_to": list(self.insensitive_to[name]),
                    "insensitive": bool(self.insensitive[name]),
                }
                for name in self.methods
            },
        }

    def verdict(self, method: str) -> str:
        """"ok", or the layers whose randomization left `method`'s map similar."""
        if not self.insensitive_to[method]:
            return "ok"
        text = "INSENSITIVE to " + ", ".join(self.insensitive_to[method])
        if self.insensitive[method]:
            text += f" (rank correlation > {self.threshold:g} with every layer random)"
        return text

    def format_table(self) -> str:
        """Rank correlation / SSIM with the trained map after each step, one row per method."""
        columns = ["+" + step for step in self.steps]
        columns[0] = self.steps[0]
        width = max(10, *(len(c) for c in columns))
        name_width = max(len("method"), *(len(m) for m in self.methods))
        lines = [
            ("Cascading randomization (Adebayo et al. 2018): similarity of |map| to the trained "
             "model's map as layers are re-initialized from the output down"),
            (f"(Spearman rank correlation / SSIM; * similar at that step: either above "
             f"{self.threshold:g})"),
            f"{'method':<{name_width}}  " + "  ".join(f"{c:>{width}}" for c in columns)
            + "  verdict",
        ]
        for name in self.methods:
            cells = [
                f"{rank:.2f}/{ssim:.2f}" + ("*" if similar else " ")
                for rank, ssim, similar in zip(
                    self.rank_correlation[name], self.ssim[name], self.similar[name]
                )
            ]
            values = "  ".join(f"{cell:>{width}}" for cell in cells)
            lines.append(f"{name:<{name_width}}  {values}  {self.verdict(name)}")
        return "\n".join(lines)


def model_randomization(
    model,
    images,
    targets=None,
    *,
    methods: MethodsArgument = METHODS,
    seed: int = 0,
    threshold: float = 0.5,
    keep: int = 4,
    input_range=None,
) -> SanityResult:
    """Cascading model randomization (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

    On `model` itself (every weight restored afterwards), the layers with weights are
    re-initialized one more at each step, from
    the output layer down to the first layer, each with its own initializers (seeded); after each
    step every method's maps are recomputed for the same images and the same targets and compared
    with the trained model's maps (Spearman correlation of absolute maps, and SSIM).

    Args:
        model: a built Keras classifier; randomized in place during the call and given back
            exactly as it was (every variable restored, also on an error).
        images: (N, H, W, C) or (H, W, C).
        targets: None (each image's class as predicted by the trained model, kept fixed at every
            step), an int, or N ints.
        methods: registry names (see `cnnviz.explain.registry.METHODS`) or {name: function}.
        seed: seed of the re-initialization (step s uses seed + 1000 * s + variable index).
        threshold: after each step, a method whose mean rank correlation or mean SSIM is above
            this is called insensitive to the layers randomized so far (`insensitive_to`); after
            the last step (rank correlation), insensitive to the whole model (`insensitive`).
            0.5 is far above what a model-dependent map keeps (Adebayo et al. report ~0 for
            gradients) and far below an input-only map (1.0).
        keep: how many images' maps to keep for figures.
        input_range: (lows, highs) per channel of how `images` were prepared, for the
            methods that fill, mask or start from black (`resolve_methods`); None: the model's.

    Returns:
        A `SanityResult`.
    """
    batch = as_image_batch(images)
    resolved = resolve_methods(methods, input_range=input_range)
    if not 0.0 <= threshold <= 1.0:
        raise CnnvizError(f"threshold must be in [0, 1]; received {threshold!r}")
    probabilities = predict_probabilities(model, batch)
    chosen = resolve_targets(targets, probabilities.argmax(axis=-1), probabilities.shape[-1])
    keep = max(0, min(int(keep), len(batch)))

    trained = run_methods(model, batch, chosen, resolved)
    layers = list(reversed(_leaf_layers(model)))
    if not layers:
        raise CnnvizError(f"model {model.name!r} has no layer with weights to randomize")
    correlations = {name: [] for name in resolved}
    similarities = {name: [] for name in resolved}
    kept = {name: [trained[name][:keep]] for name in resolved}
    # The layers are randomized in place and every weight is put back afterwards, whatever
    # happens: the functions compiled on the model (every method's, cached in
    # `cnnviz.model.compiled`) read its variables, so no step builds or compiles anything again,
    # where a clone cost a second compilation of every method.
    with _weights_restored(model):
        for step, layer in enumerate(layers):
            _reinitialize(layer, seed + 1000 * step)
            randomized = run_methods(model, batch, chosen, resolved)
            for name in resolved:
                correlations[name].append(rank_correlation(trained[name], randomized[name]))
                similarities[name].append(structural_similarity(trained[name], randomized[name]))
                kept[name].append(randomized[name][:keep])

    per_image_rank = {name: np.stack(values) for name, values in correlations.items()}
    per_image_ssim = {name: np.stack(values) for name, values in similarities.items()}
    mean_rank = {name: values.mean(axis=1) for name, values in per_image_rank.items()}
    mean_ssim = {name: values.mean(axis=1) for name, values in per_image_ssim.items()}
    steps = tuple(layer.name for layer in layers)
    similar = {name: (mean_rank[name] > threshold) | (mean_ssim[name] > threshold)
               for name in resolved}
    return SanityResult(
        methods=tuple(resolved),
        steps=steps,
        rank_correlation=mean_rank,
        ssim=mean_ssim,
        rank_correlation_per_image=per_image_rank,
        ssim_per_image=per_image_ssim,
        similar=similar,
        insensitive_to={name: tuple(step for step, flag in zip(steps, similar[name]) if flag)
                        for name in resolved},
        insensitive={name: bool(mean_rank[name][-1] > threshold) for name in resolved},
        threshold=float(threshold),
        targets=chosen,
        images=batch[:keep].copy(),
        maps={name: np.stack(values).astype(np.float32) for name, values in kept.items()},
    )


# --------------------------------------------------------------------------- class sensitivity
def class_sensitivity(
    model,
    images,
    *,
    methods: MethodsArgument = METHODS,
    threshold: float = 0.9,
    input_range=None,
) -> dict:
    """Does each method's map change with the class explained?

    For every image the map for the predicted class is compared (Spearman correlation of
    absolute maps, `rank_correlation`) with the map for the second most likely class. A method
    whose maps for two different classes agree on average above `threshold` is flagged
    class-insensitive: it shows where the image has structure, not what makes it one class
    (a failure reported for guided backprop by Nie et al. 2018).

    Args:
        model: a built Keras classifier with at least two classes; not modified.
        images: (N, H, W, C) or (H, W, C).
        methods: registry names or {name: function}.
        threshold: mean correlation above which a method is flagged.
        input_range: (lows, highs) per channel of how `images` were prepared, for the
            methods that fill, mask or start from black (`resolve_methods`); None: the model's.

    Returns:
        A JSON-serializable dict: {"threshold", "images", "methods": {name: {"rank_correlation"
        (mean), "per_image" (list of N), "class_insensitive" (bool)}}}.
    """
    batch = as_image_batch(images)
    resolved = resolve_methods(methods, input_range=input_range)
    if not -1.0 <= threshold <= 1.0:
        raise CnnvizError(f"threshold must be in [-1, 1]; received {threshold!r}")
    probabilities = predict_probabilities(model, batch)
    ranked = np.argsort(-probabilities, axis=-1, kind="stable")
    first, second = ranked[:, 0].astype(np.int32), ranked[:, 1].astype(np.int32)
    maps_first = run_methods(model, batch, first, resolved)
    maps_second = run_methods(model, batch, second, resolved)
    report = {}
    for name in resolved:
        per_image = rank_correlation(maps_first[name], maps_second[name])
        mean = float(per_image.mean())
        report[name] = {
            "rank_correlation": mean,
            "per_image": [float(v) for v in per_image],
            "class_insensitive": bool(mean > threshold),
        }
    return {
        "test": "class sensitivity: map for the predicted class vs the second most likely class",
        "threshold": float(threshold),
        "images": len(batch),
        "methods": report,
    }


def format_class_sensitivity(report: dict) -> str:
    """The `class_sensitivity` dict as a table: one row per method."""
    names: Sequence[str] = list(report["methods"])
    width = max(len("method"), *(len(n) for n in names))
    lines = [
        "Class sensitivity: Spearman rank correlation of |map| for the top-1 vs the top-2 class",
        f"{'method':<{width}}  correlation  verdict",
    ]
    for name in names:
        entry = report["methods"][name]
        verdict = (
            f"CLASS-INSENSITIVE (> {report['threshold']:g})" if entry["class_insensitive"] else "ok"
        )
        lines.append(f"{name:<{width}}  {entry['rank_correlation']:>11.2f}  {verdict}")
    return "\n".join(lines)
