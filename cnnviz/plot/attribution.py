"""Figures for every cnnviz explanation: arrays in, a `matplotlib.figure.Figure` out.

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
from matplotlib.ticker import MaxNLocator

from cnnviz.errors import CnnvizError
from cnnviz.plot.display import (
    as_display_image,
    finite,
    grid_shape,
    image_extent,
    is_constant,
    labelled_mosaic,
    new_figure,
    normalize01,
    note,
    plain_axes,
    show_image,
    symmetric_limit,
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


# ------------------------------------------------------------------------------- filters
def filters_grid(kernels, *, title: str = "Conv filters", max_filters: int = 64) -> Figure:
    """One tile per conv filter, drawn as one labelled mosaic placed pixel for pixel.

    RGB kernels (in_channels == 3) are drawn as colour images with 0 at mid-grey; other kernels
    as the mean over input channels with a diverging colormap centered at 0 and one shared
    colour bar, so tiles are comparable.

    Args:
        kernels: (kh, kw, in_channels, filters) weights, e.g. from `cnnviz.explain.layers.filters`.
        title: figure title (name the layer).
        max_filters: draw at most this many (the first ones); the title says so.

    Returns:
        A Figure whose one image (`fig.images[0]`) is the mosaic, each tile labelled `#index`.
    """
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    weights = finite(kernels)
    if weights.ndim != 4:
        raise CnnvizError(
            f"kernels must have shape (kh, kw, in_channels, filters); received {weights.shape}"
        )
    kh, kw, in_channels, count = weights.shape
    shown = min(count, max_filters)
    _, columns = grid_shape(shown)
    rgb = in_channels == 3
    # What each tile shows: (kh, kw, 3) colour kernels, else (kh, kw) means over input channels.
    tiles = np.moveaxis(weights[..., :shown] if rgb else weights[..., :shown].mean(axis=2), -1, 0)
    limit = symmetric_limit(tiles)  # shared by all tiles, so they compare; 0 sits mid-scale
    if rgb:
        how = "RGB, 0 = grey"
        colored = np.clip(0.5 + tiles / (2 * limit), 0, 1)
    else:
        how = ("single input channel" if in_channels == 1
               else f"mean over {in_channels} input channels")
        norm = Normalize(-limit, limit)
        colored = colormaps["RdBu_r"](norm(tiles))[..., :3]
    canvas, _, _ = labelled_mosaic(np.round(colored * 255).astype(np.uint8),
                                   [f"#{index}" for index in range(shown)], columns)

    # Laid out by hand like `feature_maps_grid`: one axes per tile made a 128-filter layer take
    # seconds to draw.
    dpi = FIGURE_DPI
    map_width, map_height = canvas.shape[1] / dpi, canvas.shape[0] / dpi
    bar = 0.0 if rgb else 1.1
    top_band, bottom_band = 0.75, 0.25
    width, height = max(map_width + 0.4 + bar, 3.0), map_height + top_band + bottom_band
    fig = Figure(figsize=(width, height), facecolor="white", dpi=dpi)
    fig.figimage(canvas, xo=round(0.2 * dpi), yo=round(bottom_band * dpi), origin="upper")
    if not rgb:
        label = "weight" if in_channels == 1 else "mean weight"
        bar_height = min(map_height, 3.0)  # beside the top rows of tiles
        bar_ax = fig.add_axes(((map_width + 0.35) / width,
                               (bottom_band + map_height - bar_height) / height,
                               0.15 / width, bar_height / height))
        fig.colorbar(ScalarMappable(norm=norm, cmap="RdBu_r"), cax=bar_ax, label=label)
    if not np.abs(tiles).max(initial=0.0) > 0:
        fig.text(0.5, 0.02, "all weights shown are 0", ha="center", va="bottom", fontsize=9)
    subset = f"first {shown} of {count}" if shown < count else f"{count}"
    fig.suptitle(f"{title}\n{subset} filters, {kh}x{kw}, {how}", y=1 - 0.05 / height, va="top",
                 fontsize=10)
    return fig


# --------------------------------------------------------------------------- feature maps
def feature_maps_grid(
    image,
    maps,
    *,
    layer_name: str,
    max_maps: int = 64,
    title: str | None = None,
    channels=None,
    total_channels: int | None = None,
) -> Figure:
    """An input image beside the feature maps one layer computes for it.

    Each map is scaled to its own min..max (viridis) so weak channels stay visible; channels that
    are constant for this image (e.g. dead ReLUs) are labelled "flat". The maps are drawn as one
    mosaic image placed pixel for pixel, each tile labelled with its channel index.

    Args:
        image: the input, (H, W, C) (or (H, W)).
        maps: the layer's output for that image, (h, w, k) (a leading batch axis of 1 is
            dropped), e.g. `feature_maps(model, image[None], layer)[0]`.
        layer_name: the layer's name or path, for the titles.
        max_maps: draw at most this many maps (the first ones).
        title: figure title; defaults to "Feature maps of <layer_name>".
        channels: (k,) the channel index of each map (when `maps` holds a chosen subset, e.g.
            the most active); default 0..k-1.
        total_channels: how many channels the layer has (default k), for the subtitle.

    Returns:
        A Figure: the input on the left, the mosaic of maps on the right.
    """
    from matplotlib import colormaps

    values = finite(maps)
    if values.ndim == 4 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 3:
        raise CnnvizError(f"maps must have shape (h, w, channels); received {values.shape}")
    count = values.shape[-1]
    labels = np.arange(count) if channels is None else np.asarray(channels).reshape(-1)
    total = count if total_channels is None else int(total_channels)
    shown = min(count, max_maps)
    _, columns = grid_shape(shown)
    tiles = np.moveaxis(values[..., :shown], -1, 0)
    flat = [is_constant(tile) for tile in tiles]
    scaled = np.stack([normalize01(tile) for tile in tiles])
    colored = np.round(colormaps["viridis"](scaled)[..., :3] * 255).astype(np.uint8)
    names = [f"#{int(label)}" + (f" flat {float(tile.flat[0]):.2g}" if constant else "")
             for label, constant, tile in zip(labels, flat, tiles)]
    canvas, _, _ = labelled_mosaic(colored, names, columns)

    if shown < total:
        chosen = "most active" if channels is not None else "first"
        subset = f"{shown} {chosen} of {total}"
    else:
        subset = f"{total}"
    flat_count = f", {sum(flat)} flat" if any(flat) else ""
    subtitle = f"{subset} channels{flat_count}; each scaled to its own range"

    # Laid out by hand, the mosaic placed pixel for pixel (`figimage`: no axes, no resampling;
    # no constrained layout, no tight box): those passes were most of the drawing time.
    dpi = FIGURE_DPI
    map_width, map_height = canvas.shape[1] / dpi, canvas.shape[0] / dpi
    # The subtitle above the mosaic: ~0.075 in a character at 9 pt, so a narrow mosaic of few
    # columns does not cut it off at the figure's edge.
    area_width = max(map_width, 0.075 * len(subtitle))
    input_side = max(1.8, min(3.0, 0.35 * map_width))
    top_band, bottom_band = 1.0, 0.15
    width = input_side + area_width + 0.45
    height = max(input_side + 0.4, map_height) + top_band + bottom_band
    fig = Figure(figsize=(width, height), facecolor="white", dpi=dpi)
    input_ax = fig.add_axes((0.1 / width, (height - top_band - input_side) / height,
                             (input_side - 0.1) / width, input_side / height))
    show_image(input_ax, image, title="input")
    fig.figimage(canvas, xo=round((input_side + 0.3 + (area_width - map_width) / 2) * dpi),
                 yo=round((height - top_band - map_height) * dpi), origin="upper")
    fig.text((input_side + 0.3 + area_width / 2) / width, (height - top_band + 0.05) / height,
             subtitle, fontsize=9, ha="center", va="bottom")
    fig.suptitle(title or f"Feature maps of layer {layer_name!r}", y=1 - 0.08 / height,
                 va="top", wrap=True, fontsize=10)
    return fig


# ------------------------------------------------------------------- activation maximization
def activation_max_grid(
    images, labels: Sequence[str], *, title: str = "Activation maximization"
) -> Figure:
    """One tile per optimized image (a class or a filter), each stretched to its own range.

    Args:
        images: (K, H, W, C) images from `activation_maximization_batch`.
        labels: K tile titles (class names or "filter 3").
        title: figure title (say which layer).

    Returns:
        A Figure with a grid of K tiles titled by `labels`.
    """
    values = finite(images)
    if values.ndim == 3:
        values = values[..., None]
    if values.ndim != 4:
        raise CnnvizError(f"images must have shape (K, H, W, C); received {np.shape(images)}")
    if len(labels) != len(values):
        raise CnnvizError(f"got {len(values)} images but {len(labels)} labels; give one each")
    rows, columns = grid_shape(len(values), max_columns=10)
    tile = max(TILE_INCHES, 1.3)
    fig = new_figure(tile * columns + 0.2, tile * rows + 0.6)
    axes = fig.subplots(rows, columns, squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= len(values):
            ax.set_visible(False)
            continue
        show_image(ax, values[index], normalize=True)
        ax.set_title(str(labels[index]), fontsize=8, pad=2)
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
