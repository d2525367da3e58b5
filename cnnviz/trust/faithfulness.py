"""Faithfulness by deletion and insertion (Petsiuk et al. 2018, RISE): do the top pixels matter?

If a map ranks pixels by how much the model needs them, then removing the top-ranked pixels first
should make the target's probability fall fastest (deletion: low area under the curve), and
restoring them first onto a blank image should make it rise fastest (insertion: high area).
Every method is compared with a random pixel order on the same images: a method that does no
better than random on either curve is called out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnnviz.errors import CnnvizError
from cnnviz.explain.baselines import blurred
from cnnviz.explain.registry import METHODS, MethodsArgument, resolve_methods, run_methods
from cnnviz.model.compiled import predict_probabilities, probabilities_of
from cnnviz.model.inputs import as_image_batch
from cnnviz.model.outputs import resolve_targets

BASELINES = ("blur", "zero", "mean")
RANDOM = "random"
_CURVES = ("deletion", "insertion")


def baseline_images(images, baseline: str = "blur", *, blur_sigma: float | None = None):
    """What a removed pixel becomes: (N, H, W, C) float32.

    Args:
        images: (N, H, W, C).
        baseline: "blur" (a Gaussian blur of the image: removes detail but not the overall
            intensity, so the model does not see an out-of-distribution blank), "zero", or
            "mean" (each image's own per-channel mean).
        blur_sigma: blur standard deviation in pixels; None means min(H, W) / 5.

    Returns:
        (N, H, W, C) float32.
    """
    batch = as_image_batch(images)
    if baseline == "zero":
        return np.zeros_like(batch)
    if baseline == "mean":
        return np.broadcast_to(batch.mean(axis=(1, 2), keepdims=True), batch.shape).astype(
            np.float32
        )
    if baseline == "blur":
        return blurred(batch, blur_sigma)
    raise CnnvizError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)}")


def pixel_ranks(maps, rng: np.random.Generator) -> np.ndarray:
    """Rank of every pixel when sorted by attribution, highest first: (N, H*W) int32, 0 = top.

    Ties (a flat Grad-CAM region, an all-zero map) are broken at random, not in raster order,
    which would favour the top rows.
    """
    flat = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    order = np.lexsort((rng.random(flat.shape), -np.nan_to_num(flat, nan=-np.inf)), axis=-1)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(flat.shape[1])[None], axis=1)
    return ranks.astype(np.int32)


@dataclass(frozen=True)
class FaithfulnessResult:
    """What `deletion_insertion` measured; every probability is the ORIGINAL model's.

    Attributes:
        methods: the methods compared, then "random" (the reference order).
        fractions: (steps + 1,) share of pixels removed (deletion) / restored (insertion).
        deletion, insertion: {method: (steps + 1,)} mean target probability over images.
        deletion_auc, insertion_auc: {method: float} mean over images of each image's area
            under its curve (trapezoid over fractions 0..1).
        deletion_auc_per_image, insertion_auc_per_image: {method: (N,)}.
        no_better_than_random: {method: list of "deletion" / "insertion"}: the curves on which
            the method is no better than random (deletion AUC >= random's, insertion AUC <=
            random's); empty when it beats random on both.
        baseline: what removed pixels became.
        targets: (N,) int32, the class whose probability was tracked.
    """

    methods: tuple[str, ...]
    fractions: np.ndarray
    deletion: dict
    insertion: dict
    deletion_auc: dict
    insertion_auc: dict
    deletion_auc_per_image: dict
    insertion_auc_per_image: dict
    no_better_than_random: dict
    baseline: str
    targets: np.ndarray

    @property
    def called_out(self) -> list[str]:
        """Methods no better than random on at least one curve."""
        return [name for name, curves in self.no_better_than_random.items() if curves]

    def to_dict(self) -> dict:
        """The numbers, JSON-serializable."""
        return {
            "test": "deletion / insertion (Petsiuk et al. 2018)",
            "baseline": self.baseline,
            "images": len(self.targets),
            "fractions": [float(f) for f in self.fractions],
            "methods": {
                name: {
                    "deletion_auc": float(self.deletion_auc[name]),
                    "insertion_auc": float(self.insertion_auc[name]),
                    "deletion_curve": [float(v) for v in self.deletion[name]],
                    "insertion_curve": [float(v) for v in self.insertion[name]],
                    "no_better_than_random": list(self.no_better_than_random.get(name, [])),
                }
                for name in self.methods
            },
            "called_out": self.called_out,
        }

    def format_table(self) -> str:
        """One row per method: both AUCs and whether it beats the random order."""
        width = max(len("method"), *(len(name) for name in self.methods))
        lines = [
            (f"Deletion / insertion (Petsiuk et al. 2018): {len(self.targets)} images, "
            f"{len(self.fractions) - 1} steps, removed pixels -> {self.baseline}"),
            (f"{'method':<{width}}  deletion AUC (lower better)  insertion AUC (higher better)"
            "  verdict"),
        ]
        for name in self.methods:
            if name == RANDOM:
                verdict = "(reference)"
            elif self.no_better_than_random.get(name):
                verdict = "NO BETTER THAN RANDOM on " + " and ".join(
                    self.no_better_than_random[name]
                )
            else:
                verdict = "ok"
            lines.append(
                f"{name:<{width}}  {self.deletion_auc[name]:>27.3f}  "
                f"{self.insertion_auc[name]:>29.3f}  {verdict}"
            )
        return "\n".join(lines)


def deletion_insertion(
    model,
    images,
    targets=None,
    *,
    methods: MethodsArgument = METHODS,
    steps: int = 20,
    baseline: str = "blur",
    blur_sigma: float | None = None,
    seed: int = 0,
    batch_size: int = 256,
    input_range=None,
    random_order: bool = True,
) -> FaithfulnessResult:
    """Deletion and insertion curves (Petsiuk et al. 2018) for each method and a random order.

    Pixels are ordered by each method's map (highest first, ties at random). Deletion: after
    step s of `steps`, the top round(s / steps * H * W) pixels (all channels) are replaced by
    the baseline image's; insertion: the baseline image with the top pixels restored. The
    tracked number is the target's probability under the original model (softmax output).
    All perturbed images of all methods and steps go through one compiled forward pass, in
    fixed-size chunks built on demand.

    Args:
        model: a built Keras classifier; not modified.
        images: (N, H, W, C) or (H, W, C).
        targets: None (each image's predicted class), an int, or N ints.
        methods: registry names (see `cnnviz.explain.registry.METHODS`) or {name: function}.
        steps: points on each curve after the first (>= 1).
        baseline: "blur", "zero" or "mean" (see `baseline_images`).
        blur_sigma: for "blur"; None means min(H, W) / 5.
        seed: seeds the random order and the tie-breaking.
        batch_size: perturbed images per compiled forward chunk.
        input_range: (lows, highs) per channel of how `images` were prepared, for the
            methods that fill, mask or start from black (`resolve_methods`); None: the model's.
        random_order: False leaves out the random order's curves (a third of the forward
            passes; no verdicts): the methods' numbers are the same, their tie-breaking
            draws the same random numbers (`cnnviz.report.watch` measures every epoch).

    Returns:
        A `FaithfulnessResult`.
    """
    batch = as_image_batch(images)
    resolved = resolve_methods(methods, input_range=input_range)
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise CnnvizError(f"steps must be a positive integer; received {steps!r}")
    blank = baseline_images(batch, baseline, blur_sigma=blur_sigma)
    count, height, width = batch.shape[:3]
    pixels = height * width
    probabilities = predict_probabilities(model, batch, batch_size=batch_size)
    chosen = resolve_targets(targets, probabilities.argmax(axis=-1), probabilities.shape[-1])

    maps = run_methods(model, batch, chosen, resolved)
    rng = np.random.default_rng(seed)
    random_map = rng.random((count, height, width))  # drawn either way: the same tie-breaks
    if random_order:
        maps[RANDOM] = random_map
    names = tuple(maps)
    ranks = np.stack([pixel_ranks(maps[name], rng) for name in names])  # (M, N, P)
    shown = np.round(np.linspace(0.0, 1.0, steps + 1) * pixels).astype(np.int32)  # (S + 1,)
    inner = steps - 1  # the steps a map decides: step 0 and the last are the image or baseline

    def perturbed(start: int, stop: int) -> np.ndarray:
        # Item layout: the N baselines (every curve's full end), then
        # ((method * 2 + curve) * N + image) * inner + step - 1 for steps 1 .. steps - 1.
        flat = np.arange(start, stop)
        item = np.maximum(flat - count, 0)
        step, rest = item % max(inner, 1) + 1, item // max(inner, 1)
        image, rest = rest % count, rest // count
        curve, method = rest % 2, rest // 2
        end = flat < count  # the baseline: deletion (curve 0) of every pixel
        image = np.where(end, flat, image)
        step, curve, method = (np.where(end, steps, step), np.where(end, 0, curve),
                               np.where(end, 0, method))
        top = (ranks[method, image] < shown[step][:, None]).reshape(-1, height, width, 1)
        deleted = np.where(top, blank[image], batch[image])
        inserted = np.where(top, batch[image], blank[image])
        return np.where((curve == 0)[:, None, None, None], deleted, inserted)

    total = count + len(names) * 2 * count * inner
    outputs = probabilities_of(model, total, perturbed, batch_size=batch_size)
    of_image = np.concatenate([np.arange(count), np.tile(np.repeat(np.arange(count), inner),
                                                         len(names) * 2)])
    scores = outputs[np.arange(total), chosen[of_image]]
    # The curves' ends: the image (its probabilities, above) and the baseline, shared by all.
    whole = np.broadcast_to(probabilities[np.arange(count), chosen][:, None],
                            (len(names), count, 1))
    empty = np.broadcast_to(scores[:count, None], (len(names), count, 1))
    middle = scores[count:].reshape(len(names), 2, count, inner)
    tracked = np.stack([np.concatenate([whole, middle[:, 0], empty], axis=-1),
                        np.concatenate([empty, middle[:, 1], whole], axis=-1)], axis=1)
    fractions = shown / pixels
    areas = np.trapezoid(tracked, fractions, axis=-1)  # (M, 2, N)

    curves = {curve: {n: tracked[m, c].mean(axis=0) for m, n in enumerate(names)}
              for c, curve in enumerate(_CURVES)}
    per_image = {curve: {n: areas[m, c] for m, n in enumerate(names)}
                 for c, curve in enumerate(_CURVES)}
    mean_area = {curve: {n: float(v.mean()) for n, v in per_image[curve].items()}
                 for curve in _CURVES}
    deletion_auc, insertion_auc = mean_area["deletion"], mean_area["insertion"]
    verdicts = {}
    for name in resolved if random_order else ():
        worse = []
        if deletion_auc[name] >= deletion_auc[RANDOM]:
            worse.append("deletion")
        if insertion_auc[name] <= insertion_auc[RANDOM]:
            worse.append("insertion")
        verdicts[name] = worse
    return FaithfulnessResult(
        methods=names,
        fractions=fractions.astype(np.float64),
        deletion=curves["deletion"],
        insertion=curves["insertion"],
        deletion_auc=deletion_auc,
        insertion_auc=insertion_auc,
        deletion_auc_per_image=per_image["deletion"],
        insertion_auc_per_image=per_image["insertion"],
        no_better_than_random=verdicts,
        baseline=baseline,
        targets=chosen,
    )
