"""The exemplar grid: per unit (a row), the image crops that activate it most (columns by rank),
optionally headed by the unit's activation-maximization image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from cnnviz.errors import CnnvizError
from cnnviz.plot.display import as_display_image, new_figure, plain_axes, show_image, unit_scaled

_TILE_INCHES = 1.05


def exemplar_grid(
    images: Sequence[Sequence[np.ndarray]],
    boxes: np.ndarray,
    captions: Sequence[Sequence[str]],
    row_labels: Sequence[str],
    *,
    synthetic: Sequence[np.ndarray] | None = None,
    title: str = "Exemplars",
) -> Figure:
    """One row per unit: the crop of each exemplar image under its box, best first.

    Args:
        images: per unit, its k exemplar images (H, W, C), whole (each scaled to [0, 1] as
            `show_image` would, before cropping, so a crop keeps its image's brightness).
        boxes: (U, k, 4) int (top, left, bottom, right) of each crop, bottom/right exclusive.
        captions: per unit, k tile captions (the file and the activation).
        row_labels: U row names ("filter 3", a class name).
        synthetic: U activation-maximization images put at the head of each row, or None.
        title: the figure's title.

    Returns:
        A Figure with U rows and k (+ 1 with `synthetic`) columns.
    """
    boxes = np.asarray(boxes)
    units = len(images)
    if not (len(row_labels) == len(captions) == units == len(boxes)) or (
            synthetic is not None and len(synthetic) != units):
        raise CnnvizError(f"exemplar_grid: {units} units but {len(row_labels)} row labels, "
                          f"{len(captions)} caption rows, {len(boxes)} box rows")
    ranks = max((len(row) for row in images), default=0)
    head = 1 if synthetic is not None else 0
    columns = max(1, ranks + head)
    fig = new_figure(_TILE_INCHES * columns + 0.9, (_TILE_INCHES + 0.3) * max(units, 1) + 0.5)
    axes = fig.subplots(max(units, 1), columns, squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for unit in range(units):
        if synthetic is not None:
            ax = axes[unit, 0]
            ax.set_visible(True)
            show_image(ax, synthetic[unit], normalize=True)
            ax.set_title("synthetic", fontsize=6, pad=2)
        for rank, image in enumerate(images[unit]):
            top, left, bottom, right = (int(side) for side in boxes[unit][rank])
            values, _ = as_display_image(image)
            ax = axes[unit, rank + head]
            ax.set_visible(True)
            show_image(ax, unit_scaled(values)[top:bottom, left:right])
            ax.set_title(str(captions[unit][rank]), fontsize=5.5, pad=2)
        first = axes[unit, 0]
        first.set_visible(True)
        plain_axes(first)
        first.set_ylabel(str(row_labels[unit]), fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig
