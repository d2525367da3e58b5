"""Shortcut report: does the model, and do its explanations, rely on a spurious cue?

The `shapes` data set can plant a cue that predicts the class in the training split only (a
corner mark, a per-class background). A model that learned it scores ~100% on training images
and much less on test images without the cue. An honest explanation of its training-image
predictions points at the cue: the share of its positive attribution inside the cue region
(`cue_share`) is far above the region's share of the image area (`cue_area_share`), the share
a map spread evenly would give. Their ratio is the "lift" (1 = no preference for the cue).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnnviz.data.shapes import cue_area_share, cue_share
from cnnviz.errors import CnnvizError
from cnnviz.explain.registry import METHODS, MethodsArgument, resolve_methods
from cnnviz.explain.registry import run_methods as _run_methods
from cnnviz.model.compiled import predict_probabilities

CUE_NAMES = {"corner_mark": "the corner mark", "background": "the background"}


def _percent(share: float) -> str:
    """41%, 1%, 0.9%: one decimal below 10% so a small cue region does not read as 0% or 1%."""
    return f"{share:.1%}" if share < 0.1 else f"{share:.0%}"


@dataclass(frozen=True)
class ShortcutResult:
    """What `shortcut_report` measured.

    Attributes:
        cue: how the cue is named in the verdict ("the corner mark").
        train_accuracy: accuracy on the whole training split (cue present).
        test_accuracy: accuracy on the whole test split (cue absent or shuffled).
        count: training images explained.
        cue_area_share: mean share of the image area the cue covers.
        cue_share: {method: mean share of positive attribution inside the cue}.
        lift: {method: cue_share / cue_area_share}; 1 = attribution spread evenly.
        concentration: {method: (cue_share - area) / (1 - area)}: 0 = even, 1 = all on the cue;
            the measure for a cue so large (a background) that the lift cannot grow far.
        relies_on_cue: some method has lift >= lift_threshold or concentration >= 0.5.
        verdict: one line saying so, naming the method with the highest lift.
        lift_threshold: the lift above which the model is said to rely on the cue.
        images, cue_masks, labels, predicted: the first few explained images (M, H, W, C),
            (M, H, W) bool, (M,) int, (M,) int, for figures.
        maps: {method: (M, H, W)} their maps.
        class_names: the data set's classes.
    """

    cue: str
    train_accuracy: float
    test_accuracy: float
    count: int
    cue_area_share: float
    cue_share: dict
    lift: dict
    concentration: dict
    relies_on_cue: bool
    verdict: str
    lift_threshold: float
    images: np.ndarray
    cue_masks: np.ndarray
    labels: np.ndarray
    predicted: np.ndarray
    maps: dict
    class_names: tuple

    def to_dict(self) -> dict:
        """The numbers and the verdict, JSON-serializable."""
        return {
            "test": "shortcut report: attribution on the spurious cue",
            "cue": self.cue,
            "train_accuracy": float(self.train_accuracy),
            "test_accuracy": float(self.test_accuracy),
            "images": int(self.count),
            "cue_area_share": float(self.cue_area_share),
            "lift_threshold": float(self.lift_threshold),
            "methods": {
                name: {
                    "cue_share": float(self.cue_share[name]),
                    "lift": float(self.lift[name]),
                    "concentration": float(self.concentration[name]),
                }
                for name in self.cue_share
            },
            "relies_on_cue": bool(self.relies_on_cue),
            "verdict": self.verdict,
        }

    def format_table(self) -> str:
        """Accuracies, one row per method (share on the cue, lift), and the verdict."""
        width = max(len("method"), *(len(name) for name in self.cue_share))
        lines = [
            (f"Shortcut report ({self.cue}): accuracy {_percent(self.train_accuracy)} on training "
            f"images (cue present), {_percent(self.test_accuracy)} on test images (cue absent)"),
            (f"{self.count} training images; the cue covers {_percent(self.cue_area_share)} of "
            "the image"),
            f"{'method':<{width}}  share on cue   lift",
        ]
        for name in self.cue_share:
            lines.append(
                f"{name:<{width}}  {_percent(self.cue_share[name]):>12}  "
                f"{self.lift[name]:>5.1f}x"
            )
        lines.append("verdict: " + self.verdict)
        return "\n".join(lines)


def _accuracy(model, images: np.ndarray, labels: np.ndarray) -> float:
    if len(images) == 0:
        return float("nan")
    predicted = predict_probabilities(model, images).argmax(axis=-1)
    return float(np.mean(predicted == labels))


def _verdict(cue, best, share, area, lift, relies, train_accuracy, test_accuracy) -> str:
    accuracy = (
        f"accuracy {_percent(train_accuracy)} with the cue (training split) vs "
        f"{_percent(test_accuracy)} without (test split)"
    )
    if relies:
        return (
            f"the model relies on {cue}: {best} puts {_percent(share)} of its attribution on "
            f"{_percent(area)} of the image ({lift:.0f}x chance); {accuracy}"
        )
    return (
        f"no sign in the explanations that the model relies on {cue}: the most cue-focused "
        f"method, {best}, puts {_percent(share)} of its attribution on {_percent(area)} of the "
        f"image ({lift:.1f}x chance); {accuracy}"
    )


def shortcut_report(
    model,
    dataset,
    *,
    methods: MethodsArgument = METHODS,
    count: int = 64,
    cue: str | None = None,
    lift_threshold: float = 3.0,
    keep: int = 4,
) -> ShortcutResult:
    """How much each method's attribution lies on the spurious cue, and whether the model uses it.

    Explains the model's predicted class for the first `count` training images (they carry the
    cue) and compares, per method, the mean share of positive attribution inside the cue region
    with the region's mean share of the area (lift = ratio of the two means).

    Args:
        model: a built Keras classifier trained on `dataset`; not modified.
        dataset: a `cnnviz.data.Dataset` whose extras hold "cue_masks_train" (the `shapes`
            source with `data.shapes.spurious` set).
        methods: registry names (see `cnnviz.explain.registry.METHODS`) or {name: function}.
        count: training images to explain.
        cue: the cue's kind ("corner_mark", "background") or any phrase for the verdict;
            None says "the spurious cue".
        lift_threshold: a lift at or above this means the explanation singles out the cue.
            For a cue too large for the lift to reach it (area share > 1 / lift_threshold, e.g.
            a background), a concentration >= 0.5 counts instead.
        keep: images whose maps are kept for figures.

    Returns:
        A `ShortcutResult` (`.to_dict()`, `.format_table()`, `.verdict`).

    Raises:
        CnnvizError: the data set has no spurious cue, or `count` < 1.
    """
    masks = (getattr(dataset, "extras", None) or {}).get("cue_masks_train")
    if masks is None or not np.asarray(masks).any():
        raise CnnvizError(
            "the data set has no spurious cue (no cue masks in its training split); use "
            "data.source: shapes with data.shapes.spurious: corner_mark or background"
        )
    if not isinstance(count, (int, np.integer)) or count < 1:
        raise CnnvizError(f"count must be a positive integer; received {count!r}")
    if lift_threshold <= 1.0:
        raise CnnvizError(f"lift_threshold must be > 1 (1 = chance); received {lift_threshold!r}")
    resolved = resolve_methods(methods)
    name = CUE_NAMES.get(cue, cue) if cue else "the spurious cue"

    images = np.asarray(dataset.x_train[:count], np.float32)
    masks = np.asarray(masks[:count], bool)
    probabilities = predict_probabilities(model, images)
    predicted = probabilities.argmax(axis=-1).astype(np.int32)
    maps = _run_methods(model, images, predicted, resolved)

    area = float(cue_area_share(masks).mean())
    if area == 0.0:
        raise CnnvizError(f"none of the first {count} training images carries the cue")
    shares = {method: float(cue_share(maps[method], masks).mean()) for method in resolved}
    lifts = {method: share / area for method, share in shares.items()}
    concentration = {method: (share - area) / (1.0 - area) for method, share in shares.items()}
    best = max(resolved, key=lambda method: lifts[method])
    relies = any(lifts[m] >= lift_threshold or concentration[m] >= 0.5 for m in resolved)
    train_accuracy = _accuracy(model, dataset.x_train, dataset.y_train)
    test_accuracy = _accuracy(model, dataset.x_test, dataset.y_test)
    keep = max(0, min(int(keep), len(images)))
    return ShortcutResult(
        cue=name,
        train_accuracy=train_accuracy,
        test_accuracy=test_accuracy,
        count=len(images),
        cue_area_share=area,
        cue_share=shares,
        lift=lifts,
        concentration=concentration,
        relies_on_cue=relies,
        verdict=_verdict(name, best, shares[best], area, lifts[best], relies, train_accuracy,
                         test_accuracy),
        lift_threshold=float(lift_threshold),
        images=images[:keep].copy(),
        cue_masks=masks[:keep].copy(),
        labels=np.asarray(dataset.y_train[:keep], np.int32),
        predicted=predicted[:keep],
        maps={method: values[:keep] for method, values in maps.items()},
        class_names=tuple(dataset.class_names),
    )
