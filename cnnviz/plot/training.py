"""Figures about training: loss/accuracy curves and augmentation samples."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cnnviz.errors import CnnvizError
from cnnviz.plot.attribution import TILE_INCHES
from cnnviz.plot.display import (
    finite,
    is_constant,
    new_figure,
    note,
    plain_axes,
    show_image,
)


# ------------------------------------------------------------------------- training curves
def training_curves(
    history: Mapping[str, Sequence[float]], *, title: str = "Training curves"
) -> Figure:
    """Loss and metrics per epoch, training (solid) vs validation (dashed), one panel per metric.

    The best validation epoch is marked (lowest for loss-like metrics, highest otherwise).
    A learning rate that changed during training (a schedule) gets a last panel (log scale
    unless it starts from 0).

    Args:
        history: Keras `History.history`-style dict, e.g. {"loss": [...], "val_loss": [...],
            "accuracy": [...], "val_accuracy": [...]}; validation keys are optional, and
            "learning_rate" (or "lr") is the rate of each epoch.
        title: figure title.

    Returns:
        A Figure with one panel per metric, loss first (then the learning rate).
    """
    bases: list[str] = []
    for key in history:
        if key in ("epoch", "lr", "learning_rate"):  # CSVLogger's index and schedule columns
            continue
        base = key.removeprefix("val_")
        if base not in bases and len(history[key]) > 0:
            bases.append(base)
    order = {base: position for position, base in enumerate(bases)}
    bases.sort(key=lambda base: (base != "loss", "loss" not in base, order[base]))
    rates = np.asarray(history.get("learning_rate", history.get("lr", [])), dtype=np.float64)
    scheduled = rates.size > 1 and bool(bases) and not is_constant(rates)

    fig = new_figure(max(4.2, 3.9 * max(1, len(bases) + scheduled)), 3.3)
    if not bases:
        ax = fig.add_subplot()
        plain_axes(ax)
        note(ax, "no training history recorded")
        ax.set_title(title)
        return fig
    axes = fig.subplots(1, len(bases) + scheduled, squeeze=False)[0]
    if scheduled:
        ax = axes[-1]
        ax.plot(np.arange(1, rates.size + 1), rates, "-", marker="o" if rates.size <= 30 else None,
                markersize=3, color="tab:green")
        if rates.min() > 0:  # a warm-up from 0 cannot be drawn on a log scale
            ax.set_yscale("log")
        ax.set_title("learning rate")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax, base in zip(axes, bases):
        lower_is_better = "loss" in base or "error" in base
        for key, style, split in ((base, "-", "train"), (f"val_{base}", "--", "validation")):
            values = history.get(key)
            if values is None or len(values) == 0:
                continue
            values = np.asarray(values, dtype=np.float64)
            epochs = np.arange(1, len(values) + 1)
            marker = "o" if len(values) <= 30 else None
            ax.plot(epochs, values, style, marker=marker, markersize=3, label=split)
            if split == "validation" and np.isfinite(values).any():
                best = int(np.nanargmin(values) if lower_is_better else np.nanargmax(values))
                ax.plot(
                    epochs[best],
                    values[best],
                    "*",
                    color="black",
                    markersize=10,
                    label=f"best val {values[best]:.3g} @ {epochs[best]}",
                )
        ax.set_title(base.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------- augmentation
def augmentation_grid(originals, augmented, *, names: Sequence[str] | None = None,
                      title: str = "Augmentation") -> Figure:
    """Each training image (first column) beside augmented versions of it, one row per image.

    Args:
        originals: (N, H, W, C) images, as the pipeline gives them (8-bit pixels).
        augmented: (K, N, H, W, C): K augmented draws of the N images.
        names: N row labels (file names or classes).
        title: figure title (say which transformations).

    Returns:
        A Figure of N rows x (1 + K) tiles, all drawn on the same pixel scale as the originals.
    """
    originals = finite(originals)
    augmented = finite(augmented)
    if originals.ndim != 4 or augmented.ndim != 5 or augmented.shape[1:] != originals.shape:
        raise CnnvizError(
            f"originals must be (N, H, W, C) and augmented (K, N, H, W, C) of the same images; "
            f"received {np.shape(originals)} and {np.shape(augmented)}")
    rows, draws = len(originals), len(augmented)
    tile = max(TILE_INCHES, 1.4)
    fig = new_figure(tile * (1 + draws) + 0.4, tile * rows + 0.6)
    axes = fig.subplots(rows, 1 + draws, squeeze=False)
    for row in range(rows):
        panels = [originals[row]] + [augmented[draw, row] for draw in range(draws)]
        for column, image in enumerate(panels):
            show_image(axes[row, column], image)
        axes[row, 0].set_title("original" if names is None else str(names[row]), fontsize=7)
        for column in range(1, 1 + draws):
            axes[row, column].set_title(f"augmented {column}", fontsize=7)
    fig.suptitle(title)
    return fig
