"""Figures for every cnnviz explanation: arrays in, a `matplotlib.figure.Figure` out (or, for
`map_grid`, drawn once an epoch during training, an RGB picture: `png_bytes` encodes it).

Pure drawing: no gradients, no files, no pyplot. Colormaps are chosen by what the numbers mean:
gray for grayscale inputs, viridis/magma for non-negative heatmaps, RdBu_r centered at 0 for
signed values (weights, signed attributions), turbo for the Grad-CAM overlay, a qualitative
palette for class labels. Every panel survives constant, all-zero and non-finite arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure

from cnnviz.errors import CnnvizError
from cnnviz.plot.display import (
    as_display_image,
    finite,
    image_extent,
    is_constant,
    labelled_mosaic,
    new_figure,
    note,
    plain_axes,
    show_image,
    symmetric_limit,
    titled,
    unit_display_image,
)

TILE_INCHES = 1.15
FIGURE_DPI = 100  # what `render_png` writes by default; figimage mosaics are placed in it
PANEL_INCHES = 3.0


def _label_name(label, class_names: Sequence[str] | None) -> str:
    """A class given as an index or a name, as the name to print."""
    if label is None:
        return "?"
    is_index = isinstance(label, (int, np.integer)) and not isinstance(label, bool)
    if is_index and class_names is not None and 0 <= int(label) < len(class_names):
        return str(class_names[int(label)])
    return str(label)


# ------------------------------------------------------------------------------ occlusion
def occlusion_figure(
    image,
    probability_map,
    class_map,
    *,
    class_names: Sequence[str],
    target_label,
    true_label=None,
    predicted_label=None,
    unoccluded_probability: float | None = None,
    title: str | None = None,
) -> Figure:
    """Occlusion sensitivity (Zeiler & Fergus 2014): input | P(target) | predicted class, per patch.

    Args:
        image: the input, (H, W, C).
        probability_map: (h, w) probability of the target class with the patch at each position
            occluded, on a fixed 0..1 scale (dark = occluding there hurts the target most). A
            coarser map than the image is stretched over it.
        class_map: (h, w) int class predicted with the patch at each position occluded.
        class_names: names of all classes, indexed by class.
        target_label: the explained class (index or name).
        true_label: the image's label (index or name), or None when unknown.
        predicted_label: the model's prediction on the intact image (index or name), or None.
        unoccluded_probability: P(target) of the intact image, shown for reference, or None.
        title: figure title; defaults to "Occlusion sensitivity for <target>".

    Returns:
        A Figure with three panels side by side.
    """
    probabilities = finite(probability_map)
    classes = np.asarray(class_map)
    for name, array in (("probability_map", probabilities), ("class_map", classes)):
        if array.ndim != 2:
            raise CnnvizError(f"{name} must have shape (H, W); received {array.shape}")
    classes = finite(classes).astype(np.int64)
    target = _label_name(target_label, class_names)
    truth = _label_name(true_label, class_names)
    predicted = _label_name(predicted_label, class_names)

    fig = new_figure(3 * PANEL_INCHES + 1.6, PANEL_INCHES + 0.8)
    axes = fig.subplots(1, 3)
    show_image(axes[0], image, title=f"true: {truth} | predicted: {predicted}")

    extent = image_extent(image)
    low, high = float(probabilities.min()), float(probabilities.max())
    # A confident model may move by less than a percent; on a fixed 0..1 scale that draws as one
    # flat colour. Stretch the scale then, and say so in the title.
    stretched = not is_constant(probabilities) and high - low < 0.05
    heat = axes[1].imshow(
        np.clip(probabilities, 0, 1),
        cmap="viridis",
        vmin=low if stretched else 0,
        vmax=high if stretched else 1,
        extent=extent,
        interpolation="nearest",
    )
    plain_axes(axes[1])
    intact = (
        "" if unoccluded_probability is None else f"\n(intact image: {unoccluded_probability:.2f})"
    )
    scale = f", scale stretched to {low:.3f}..{high:.3f}" if stretched else ""
    axes[1].set_title(f"P({target}) with patch occluded{scale}{intact}", fontsize=9)
    fig.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.04, label=f"P({target})")
    if is_constant(probabilities):
        note(axes[1], f"constant ({float(probabilities.flat[0]):.3g})")

    present = np.unique(classes)
    palette = _class_palette(len(class_names))
    colours = ListedColormap([palette[c % len(palette)] for c in present])
    positions = np.searchsorted(present, classes)  # class -> position among the present ones
    drawn = axes[2].imshow(
        positions,
        cmap=colours,
        norm=BoundaryNorm(np.arange(len(present) + 1) - 0.5, len(present)),
        extent=extent,
        interpolation="nearest",
    )
    plain_axes(axes[2])
    axes[2].set_title("predicted class with patch occluded", fontsize=9)
    bar = fig.colorbar(drawn, ax=axes[2], fraction=0.046, pad=0.04, ticks=np.arange(len(present)))
    bar.ax.set_yticklabels([_label_name(int(c), class_names) for c in present], fontsize=8)
    fig.suptitle(title or f"Occlusion sensitivity for {target}")
    return fig


def _class_palette(count: int) -> list:
    """Distinct colours per class: tab10 up to 10 classes, else tab20 (repeating after 20)."""
    from matplotlib import colormaps

    name = "tab10" if count <= 10 else "tab20"
    return list(colormaps[name].colors)


# ------------------------------------------------------------------------------- saliency
def saliency_row(image, maps: Mapping[str, object], *, title: str = "Saliency") -> Figure:
    """The input next to one attribution map per method (the classic side-by-side figure).

    Each map is scaled per panel: non-negative maps (e.g. |gradient|) with magma from 0 to their
    maximum; signed maps (e.g. gradient x input) with RdBu_r centered at 0. A (H, W, C) map is
    reduced to its maximum |value| over channels (Simonyan et al. 2014).

    Args:
        image: the input, (H, W, C).
        maps: method name -> (H, W) or (H, W, C) map, drawn in this order.
        title: figure title (say which class is explained and what was predicted).

    Returns:
        A Figure with 1 + len(maps) panels in a row.
    """
    fig, axes = _input_and_panels(image, len(maps), panel=2.4, margin=0.3, height=2.9)
    for ax, (method, attribution) in zip(axes[1:], maps.items(), strict=True):
        values = _reduce_channels(attribution)
        plain_axes(ax)
        limit = symmetric_limit(values)  # 1.0 for an all-zero map: no division by zero
        if values.min(initial=0.0) < 0:
            ax.imshow(values / limit, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        else:
            ax.imshow(values / limit, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        if is_constant(values):
            note(ax, f"constant map ({float(values.flat[0]) if values.size else 0:.3g})")
        ax.set_title(method, fontsize=9)
    fig.suptitle(title)
    return fig


def _input_and_panels(image, count: int, *, panel: float, margin: float, height: float):
    """A row figure: the input on the left, then `count` empty panels; sizes in inches."""
    fig = new_figure(panel * (1 + count) + margin, height)
    axes = fig.subplots(1, 1 + count, squeeze=False)[0]
    show_image(axes[0], image, title="input")
    return fig, axes


def _reduce_channels(attribution) -> np.ndarray:
    values = finite(attribution)
    if values.ndim == 3:
        values = values[..., 0] if values.shape[-1] == 1 else np.abs(values).max(axis=-1)
    if values.ndim != 2:
        raise CnnvizError(
            f"a saliency map must have shape (H, W) or (H, W, C); received {values.shape}"
        )
    return values


# ------------------------------------------------------------------------------- Grad-CAM
def gradcam_figure(
    image,
    heatmap,
    *,
    title: str = "Grad-CAM",
    guided_map=None,
    alpha: float = 0.5,
) -> Figure:
    """Grad-CAM (Selvaraju et al. 2017): the input, the heatmap laid over it, and optionally the
    Guided Grad-CAM map.

    Args:
        image: the input, (H, W, C).
        heatmap: (h, w) Grad-CAM map in [0, 1] (a coarser map is stretched over the image).
        title: figure title (say which class, what was predicted, which layer).
        guided_map: optional (H, W) or (H, W, C) Guided Grad-CAM map, shown with 0 at mid-grey.
        alpha: opacity of the heatmap over the image.

    Returns:
        A Figure with 2 panels (3 with `guided_map`).
    """
    heat = finite(heatmap)
    if heat.ndim == 3 and heat.shape[-1] == 1:
        heat = heat[..., 0]
    if heat.ndim != 2:
        raise CnnvizError(f"heatmap must have shape (H, W); received {np.shape(heatmap)}")
    panels = 2 if guided_map is None else 3
    fig = new_figure(PANEL_INCHES * panels + 0.8, PANEL_INCHES + 0.7)
    axes = fig.subplots(1, panels)
    show_image(axes[0], image, title="input")

    drawn = _heat_overlay(axes[1], image, heat, alpha)
    axes[1].set_title("Grad-CAM overlay", fontsize=9)
    _opaque_colorbar(fig, drawn, axes[1], fraction=0.046, pad=0.04, label="Grad-CAM (0..1)")
    if not heat.max(initial=0.0) > 0:
        note(axes[1], "heatmap is all 0")

    if guided_map is not None:
        guided, grayscale = as_display_image(guided_map)
        centered = np.clip(0.5 + guided / (2 * symmetric_limit(guided)), 0, 1)  # 0 -> mid-grey
        axes[2].imshow(
            centered, cmap="gray" if grayscale else None, vmin=0, vmax=1, interpolation="nearest"
        )
        plain_axes(axes[2])
        axes[2].set_title("Guided Grad-CAM", fontsize=9)
        if is_constant(guided):
            note(axes[2], f"constant map ({float(guided.flat[0]):.3g})")
    fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- CAM family
def cam_row(
    image,
    heatmaps: Mapping[str, object],
    *,
    title: str = "Class activation maps",
    label: str = "map (0..1)",
    alpha: float = 0.5,
) -> Figure:
    """The input next to one heatmap per method, each laid over the input (the CAM family, RISE).

    Args:
        image: the input, (H, W, C).
        heatmaps: method name -> (h, w) map in [0, 1] (a coarser map is stretched over the
            image), drawn in this order with turbo on one shared 0..1 scale.
        title: figure title (say which class, what was predicted, which layer).
        label: the colour bar's label.
        alpha: opacity of each heatmap over the image.

    Returns:
        A Figure with 1 + len(heatmaps) panels and one colour bar: one row, or rows of 4 when
        there are more than 5 panels (the seven CAM methods stay legible on a 520 px page).
    """
    panels = 1 + len(heatmaps)
    columns = panels if panels <= 5 else 4
    rows = -(-panels // columns)
    fig = new_figure(2.4 * columns + 0.9, 2.6 * rows + 0.3)
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for ax in axes[panels:]:
        ax.set_visible(False)
    show_image(axes[0], image, title="input")
    drawn = None
    for ax, (method, heatmap) in zip(axes[1:panels], heatmaps.items(), strict=True):
        heat = finite(heatmap)
        if heat.ndim == 3 and heat.shape[-1] == 1:
            heat = heat[..., 0]
        if heat.ndim != 2:
            raise CnnvizError(f"heatmap {method!r} must have shape (H, W); received {heat.shape}")
        drawn = _heat_overlay(ax, image, heat, alpha)
        ax.set_title(method, fontsize=9)
        if not heat.max(initial=0.0) > 0:
            note(ax, "all 0")
    if drawn is not None:
        _opaque_colorbar(fig, drawn, list(axes[:panels]), pad=0.02, label=label,
                         fraction=0.046 / max(1, columns - 1) ** 0.5)
    fig.suptitle(title)
    return fig


def _heat_overlay(ax, image, heat: np.ndarray, alpha: float):
    """The image with a 0..1 heatmap over it in turbo (a coarser map stretched bilinearly)."""
    show_image(ax, image)
    coarse = heat.shape != np.shape(image)[:2]
    return ax.imshow(np.clip(heat, 0, 1), cmap="turbo", vmin=0, vmax=1, alpha=alpha,
                     extent=image_extent(image),
                     interpolation="bilinear" if coarse else "nearest")


def _opaque_colorbar(fig, drawn, ax, **kwargs) -> None:
    # Its own opaque mappable: inheriting the overlay's alpha washes the bar out.
    fig.colorbar(ScalarMappable(norm=drawn.norm, cmap=drawn.get_cmap()), ax=ax, **kwargs)


# ------------------------------------------------------------------- signed attributions
def signed_row(
    image,
    maps: Mapping[str, object],
    *,
    title: str = "Signed attributions",
    notes: Mapping[str, str] | None = None,
) -> Figure:
    """The input next to one signed attribution map per method: red for, blue against the class.

    Each map is drawn with RdBu_r centred on 0 (white), from -max|value| to +max|value| of that
    panel, with its own colour bar in the attribution's units. A (H, W, C) map is summed over
    channels, keeping the sign (Captum's convention).

    Args:
        image: the input, (H, W, C).
        maps: method name -> (H, W) or (H, W, C) signed map, drawn in this order.
        title: figure title.
        notes: optional method name -> a line written under its panel (e.g. a completeness check).

    Returns:
        A Figure with 1 + len(maps) panels in a row.
    """
    fig, axes = _input_and_panels(image, len(maps), panel=2.9, margin=0.3, height=3.1)
    for ax, (method, attribution) in zip(axes[1:], maps.items(), strict=True):
        values = finite(attribution)
        if values.ndim == 3:
            values = values.sum(axis=-1)
        if values.ndim != 2:
            raise CnnvizError(
                f"map {method!r} must have shape (H, W) or (H, W, C); received {values.shape}"
            )
        limit = symmetric_limit(values)
        drawn = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        plain_axes(ax)
        ax.set_title(method, fontsize=9)
        fig.colorbar(drawn, ax=ax, fraction=0.046, pad=0.04)
        if is_constant(values):
            note(ax, f"constant map ({float(values.flat[0]) if values.size else 0:.3g})")
        if notes and method in notes:
            ax.set_xlabel(notes[method], fontsize=7)
    fig.suptitle(title)
    return fig


def map_grid(images, columns: Mapping[str, object], *, title: str, row_labels=None,
             alpha: float = 0.5) -> np.ndarray:
    """One row per image: the image, then one map per column laid over it (an epoch's maps, or
    one image's maps epoch after epoch), as one RGB picture.

    An image, not a Figure (`labelled_mosaic` with the title burnt in; `png_bytes` encodes
    it): a figure per epoch during training must cost little next to the epoch, and a
    matplotlib figure costs ~25 ms to lay out and encode where this takes ~3 ms.

    Args:
        images: (N, H, W, C) inputs.
        columns: column title -> (N, H, W) maps; each map is shown as its positive part over
            its own maximum (0..1, turbo), so a column shows where, not how much.
        title: the picture's title, burnt in above the tiles.
        row_labels: N strings (the class explained), or None.
        alpha: opacity of each map over its image.

    Returns:
        (H', W', 3) uint8: N rows and 1 + len(columns) columns of tiles under the title.
    """
    from matplotlib import colormaps

    images = np.asarray(images)
    shown = np.stack([_unit_rgb(image) for image in images])  # (N, H, W, 3) in [0, 1]
    turbo = colormaps["turbo"]
    tiles, labels = [], []
    for row, image in enumerate(shown):
        tiles.append(image)
        labels.append("" if row_labels is None else str(row_labels[row]))
        for name, maps in columns.items():
            heat = np.maximum(finite(np.asarray(maps)[row]), 0.0)
            if heat.shape != image.shape[:2]:
                raise CnnvizError(f"maps {name!r} must have shape (N, H, W) = "
                                  f"{images.shape[:3]}; received {np.shape(maps)}")
            top = heat.max(initial=0.0)
            colored = turbo(heat / top if top > 0 else heat)[..., :3]
            tiles.append((1 - alpha) * image + alpha * colored)
            labels.append(name if row == 0 else "")
    canvas, _, _ = labelled_mosaic(np.round(np.stack(tiles) * 255).astype(np.uint8), labels,
                                   1 + len(columns))
    return titled(canvas, title)


def _unit_rgb(image) -> np.ndarray:
    """(H, W, 3) float in [0, 1], scaled as `show_image` draws it."""
    values, grayscale = unit_display_image(image)
    return np.repeat(values[..., None], 3, axis=-1) if grayscale else np.clip(values, 0, 1)
