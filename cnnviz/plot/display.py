"""Drawing helpers shared by every figure: images of any range, heatmaps, constant-map notes, PNG
bytes.

Nothing here uses pyplot: figures are `matplotlib.figure.Figure` objects with no global state, so
they are safe under any backend and in threads. Normalization is for display only and never
divides by zero (a constant map is drawn flat and labelled instead of turning into NaN).
"""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.figure import Figure

from cnnviz.errors import CnnvizError

EPSILON = 1e-12
NOTE_STYLE = {"boxstyle": "round,pad=0.3", "facecolor": "white", "alpha": 0.85, "linewidth": 0}


def render_png(fig: Figure, *, dpi: int = 100) -> bytes:
    """The figure as PNG bytes, ready to be written atomically by the caller.

    Figures with a layout engine (`new_figure`'s constrained layout) get a tight bounding box.

    Args:
        fig: a figure from this package.
        dpi: dots per inch of the PNG.

    Returns:
        The PNG file contents.
    """
    buffer = io.BytesIO()
    # A figure laid out by hand (no layout engine) is saved as it is: a tight bounding box
    # costs a second drawing pass, which is most of the time of a big mosaic.
    tight = "tight" if fig.get_layout_engine() is not None else None
    # zlib level 1: half the encoding time of the default 6, files within a few percent.
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches=tight, facecolor="white",
                pil_kwargs={"compress_level": 1})
    return buffer.getvalue()


def release(fig: Figure) -> None:
    """Let go of a saved figure's Axes and artists (their images, their arrays) now.

    What `Figure.clear` frees, without its reset of every Axes to a blank one first (which
    costs as much as creating the Axes did: a tenth of a per-image figure's time). The figure
    is not meant to be drawn again.
    """
    for ax in tuple(fig.axes):
        for artist in (*ax.images, *ax.collections, *ax.lines, *ax.patches, *ax.texts):
            artist.remove()
        fig.delaxes(ax)
    fig.artists, fig.lines, fig.patches, fig.texts, fig.images, fig.legends = [], [], [], [], [], []


def new_figure(width: float, height: float) -> Figure:
    """A white figure with constrained layout (titles and colorbars never overlap), in inches."""
    return Figure(figsize=(width, height), layout="constrained", facecolor="white")


def finite(array) -> np.ndarray:
    """`array` as float64 with NaN and infinities replaced by 0 (plots must never fail on them)."""
    return np.nan_to_num(np.asarray(array, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def is_constant(array) -> bool:
    """True when every value is the same (up to float noise): nothing to normalize."""
    values = finite(array)
    return values.size == 0 or float(values.max() - values.min()) <= EPSILON * max(
        1.0, float(np.abs(values).max())
    )


def normalize01(array) -> np.ndarray:
    """Min-max scale to [0, 1]; a constant array becomes all zeros instead of NaN."""
    values = finite(array)
    if is_constant(values):
        return np.zeros_like(values)
    low, high = values.min(), values.max()
    return (values - low) / (high - low)


def symmetric_limit(array) -> float:
    """max |value|, so a diverging colormap is centered at 0; 1.0 for an all-zero array."""
    values = finite(array)
    limit = float(np.abs(values).max()) if values.size else 0.0
    return limit if limit > EPSILON else 1.0


def note(ax, text: str) -> None:
    """Write a short note in the middle of an axes (e.g. why a panel looks flat)."""
    ax.text(
        0.5,
        0.5,
        text,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=8,
        bbox=NOTE_STYLE,
    )


def plain_axes(ax) -> None:
    """No ticks or frame: images speak for themselves."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def as_display_image(image) -> tuple[np.ndarray, bool]:
    """Return (H, W) or (H, W, 3) float array and whether it is grayscale.

    Accepts (H, W), (H, W, 1) and (H, W, 3); any other channel count is shown as the mean over
    channels (grayscale).
    """
    values = finite(image)
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    elif values.ndim == 3 and values.shape[-1] != 3:
        values = values.mean(axis=-1)
    if values.ndim not in (2, 3):
        raise CnnvizError(
            f"an image must have shape (H, W), (H, W, 1) or (H, W, 3); received {np.shape(image)}"
        )
    return values, values.ndim == 2


def unit_scaled(values: np.ndarray, *, normalize: bool = False) -> np.ndarray:
    """An image's values in [0, 1] as `show_image` draws them: [0, 1] as they are, 8-bit
    divided by 255, any other range (or `normalize`) min-max scaled."""
    inside_unit_range = values.size > 0 and values.min() >= 0.0 and values.max() <= 1.0
    eight_bit = values.size > 0 and values.min() >= 0.0 and 1.0 < values.max() <= 255.0
    if not normalize and eight_bit:
        return values / 255.0
    if normalize or not inside_unit_range:
        return normalize01(values)
    return values


def unit_display_image(image, *, normalize: bool = False) -> tuple[np.ndarray, bool]:
    """`as_display_image` scaled to [0, 1] for display (`unit_scaled`); and whether it is
    grayscale."""
    values, grayscale = as_display_image(image)
    return unit_scaled(values, normalize=normalize), grayscale


def show_image(ax, image, *, normalize: bool = False, title: str | None = None):
    """Draw an input image: gray colormap for one channel, RGB for three, any value range.

    Values in [0, 1] are drawn as they are (black is black), and so are 8-bit pixels (0..255,
    what cnnviz models take: divided by 255 for display); other ranges (standardized, ...) are
    min-max scaled for display only. `normalize=True` always scales.

    Args:
        ax: the matplotlib axes to draw into.
        image: (H, W), (H, W, 1) or (H, W, 3) array; other channel counts are averaged.
        normalize: stretch every image to its own min..max.
        title: optional axes title.

    Returns:
        The `AxesImage` drawn.
    """
    values, grayscale = unit_display_image(image, normalize=normalize)
    if grayscale:
        drawn = ax.imshow(values, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        drawn = ax.imshow(np.clip(values, 0.0, 1.0), interpolation="nearest")
    if values.size > 1 and is_constant(image):
        note(ax, f"constant image ({float(finite(image).flat[0]):.3g})")
    plain_axes(ax)
    if title is not None:
        ax.set_title(title, fontsize=9)
    return drawn


def image_extent(image) -> tuple[float, float, float, float]:
    """imshow extent of an (H, W, ...) image, so maps of another resolution are laid over it."""
    height, width = np.shape(image)[:2]
    return (-0.5, width - 0.5, height - 0.5, -0.5)


def grid_shape(count: int, max_columns: int = 8) -> tuple[int, int]:
    """(rows, columns) for `count` tiles: close to square, at most `max_columns` wide."""
    columns = max(1, min(max_columns, math.ceil(math.sqrt(count))))
    return max(1, math.ceil(count / columns)), columns


def titled(canvas: np.ndarray, title: str, *, margin: int = 8) -> np.ndarray:
    """An RGB uint8 picture with `title` burnt in above it, on white, `margin` pixels around."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    left, _, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox(
        (0, 0), title, font=font)
    band = bottom + 2 * margin
    width = max(canvas.shape[1], right - left) + 2 * margin
    picture = Image.new("RGB", (width, band + canvas.shape[0] + margin), "white")
    picture.paste(Image.fromarray(canvas), (margin, band))
    ImageDraw.Draw(picture).text(((width - (right - left)) // 2, margin), title,
                                 fill=(0, 0, 0), font=font)
    return np.asarray(picture)


def png_bytes(picture: np.ndarray) -> bytes:
    """An RGB (or gray) uint8 picture as PNG bytes, without matplotlib (`render_png` draws a
    Figure)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    # Level 1: a third of the default's time, for files a few percent larger.
    Image.fromarray(np.asarray(picture, np.uint8)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def labelled_mosaic(tiles: np.ndarray, labels, columns: int, *,
                    tile_pixels: int = 72) -> tuple[np.ndarray, list[tuple[int, int]], int]:
    """RGB tiles (K, h, w, 3) uint8 laid out row by row in one uint8 image, each enlarged
    (nearest neighbour, a whole factor) to about `tile_pixels` and labelled above in black.

    One image drawn with one `imshow`, labels burnt in, draws in a fraction of the time of one
    axes (or one text artist) per tile: a MobileNetV2 feature-map set went from minutes to
    seconds.

    Returns:
        (the mosaic (H', W', 3) uint8, (top, left) of each tile in it, the enlargement factor).
    """
    from PIL import Image, ImageDraw, ImageFont

    count, height, width = tiles.shape[:3]
    factor = max(1, tile_pixels // max(height, width))
    big = tiles.repeat(factor, axis=1).repeat(factor, axis=2)
    tile_h, tile_w = height * factor, width * factor
    gap, band = 6, 13
    rows = max(1, math.ceil(count / columns))
    canvas = np.full((rows * (band + tile_h + gap), columns * (tile_w + gap) - gap, 3), 255,
                     dtype=np.uint8)
    origins = []
    for index in range(count):
        top = (index // columns) * (band + tile_h + gap) + band
        left = (index % columns) * (tile_w + gap)
        canvas[top:top + tile_h, left:left + tile_w] = big[index]
        origins.append((top, left))
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=10)
    for (top, left), label in zip(origins, labels):
        draw.text((left, top - band), str(label), fill=(0, 0, 0), font=font)
    return np.asarray(picture), origins, factor
