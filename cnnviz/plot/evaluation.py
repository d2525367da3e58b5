"""Evaluation figures: the confusion matrix (counts and row-normalised) and a grid of mistakes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from cnnviz.errors import CnnvizError
from cnnviz.plot.display import grid_shape, new_figure, show_image

# Above this many classes the cells are too small to print a number in.
ANNOTATE_UP_TO = 20


def confusion_matrix_figure(confusion, class_names: Sequence[str], *,
                            title: str = "Confusion matrix") -> Figure:
    """Two panels: counts, and each row divided by its total (recall on the diagonal).

    Args:
        confusion: (K, K) counts, rows = true class, columns = predicted class.
        class_names: K names.
        title: figure title.

    Returns:
        A Figure; cells carry their numbers when K <= 20.
    """
    counts = np.asarray(confusion, dtype=np.int64)
    count = len(class_names)
    if counts.shape != (count, count):
        raise CnnvizError(f"confusion must be ({count}, {count}) for {count} classes; "
                          f"received {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    side = min(14.0, max(3.2, 0.42 * count + 1.6))
    fig = new_figure(2 * side + 1.0, side + 0.6)
    panels = fig.subplots(1, 2)
    for ax, values, subtitle, limit in (
            (panels[0], counts, "counts", max(1, int(counts.max()))),
            (panels[1], normalised, "row-normalised (share of each true class)", 1.0)):
        drawn = ax.imshow(values, cmap="Blues", vmin=0, vmax=limit, interpolation="nearest")
        fig.colorbar(drawn, ax=ax, shrink=0.8)
        ax.set_title(subtitle, fontsize=10)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ticks = np.arange(count)
        ax.set_xticks(ticks, [str(name) for name in class_names], rotation=90 if count > 6 else 0,
                      fontsize=8)
        ax.set_yticks(ticks, [str(name) for name in class_names], fontsize=8)
        if count <= ANNOTATE_UP_TO:
            for (row, column), value in np.ndenumerate(values):
                text = f"{value:d}" if values.dtype.kind == "i" else f"{value:.2f}"
                if values.dtype.kind != "i" and value == 0:
                    text = "0"
                dark = value > 0.6 * limit
                ax.text(column, row, text, ha="center", va="center",
                        fontsize=8 if count <= 10 else 6, color="white" if dark else "black")
    fig.suptitle(title)
    return fig


def mistakes_grid(images, captions: Sequence[str], *, title: str = "Most confident mistakes",
                  max_columns: int = 8) -> Figure:
    """One tile per misclassified image, captioned (name, true and predicted class).

    Args:
        images: M images, each (H, W, C) in any range (drawn as `show_image` does).
        captions: M tile captions.
        title: figure title.
        max_columns: tiles per row at most.

    Returns:
        A Figure with the M tiles.
    """
    if len(images) != len(captions):
        raise CnnvizError(f"got {len(images)} images but {len(captions)} captions; give one each")
    if not len(images):
        raise CnnvizError("no mistakes to draw")
    rows, columns = grid_shape(len(images), max_columns=max_columns)
    tile = 1.6
    fig = new_figure(tile * columns + 0.2, (tile + 0.5) * rows + 0.6)
    axes = fig.subplots(rows, columns, squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= len(images):
            ax.set_visible(False)
            continue
        show_image(ax, images[index])
        ax.set_title(captions[index], fontsize=7, pad=2)
    fig.suptitle(title)
    return fig
