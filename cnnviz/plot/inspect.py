"""Figures of what a network holds: filter mosaics, feature-map mosaics, activation-maximization
grids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure

from cnnviz.errors import CnnvizError
from cnnviz.plot.attribution import FIGURE_DPI, TILE_INCHES
from cnnviz.plot.display import (
    finite,
    grid_shape,
    is_constant,
    labelled_mosaic,
    new_figure,
    normalize01,
    show_image,
    symmetric_limit,
)


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
