"""Figures: real PNGs with content, the right titles, honest colour scales, no NaN or warnings."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from cnnviz.errors import CnnvizError
from cnnviz.plot import (
    activation_max_grid,
    cam_row,
    feature_maps_grid,
    filters_grid,
    gradcam_figure,
    occlusion_figure,
    render_png,
    saliency_row,
    show_image,
    signed_row,
    training_curves,
)

RNG = np.random.default_rng(0)
GRAY = RNG.uniform(0, 1, (8, 8, 1))
RGB_0_255 = RNG.uniform(0, 255, (16, 16, 3))
NAMES = ["cat", "dog", "bird"]
HISTORY = {
    "loss": [1.2, 0.8, 0.5, 0.45],
    "val_loss": [1.1, 0.9, 0.6, 0.55],
    "accuracy": [0.5, 0.7, 0.8, 0.85],
    "val_accuracy": [0.55, 0.65, 0.79, 0.78],
}


def _decoded(fig: Figure) -> np.ndarray:
    """Render, decode the PNG bytes with PIL and check it is a real, non-flat picture."""
    assert isinstance(fig, Figure)
    png = render_png(fig)
    assert png.startswith(b"\x89PNG")
    picture = Image.open(io.BytesIO(png))
    picture.load()
    width, height = picture.size
    assert 200 <= width <= 4000 and 150 <= height <= 4000, picture.size
    pixels = np.asarray(picture.convert("L"), dtype=np.float64)
    assert pixels.std() > 10, "the figure is (nearly) one flat colour"
    return pixels


def _image_axes(fig: Figure) -> list:
    """Visible axes that show an image (colour-bar axes draw a mesh, not an image)."""
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_images()]


def _all_text(fig: Figure) -> str:
    texts = [text.get_text() for text in fig.findobj(lambda artist: hasattr(artist, "get_text"))]
    return "\n".join(texts)


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    """A RuntimeWarning (0/0 -> NaN) or a Matplotlib warning anywhere fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


# --------------------------------------------------------------------------- show_image
def test_show_image_grayscale_uses_gray_and_keeps_unit_range_values():
    fig = Figure()
    drawn = show_image(fig.add_subplot(), GRAY)
    assert drawn.get_cmap().name == "gray" and drawn.get_clim() == (0.0, 1.0)
    np.testing.assert_allclose(drawn.get_array(), GRAY[..., 0])  # [0, 1] drawn as it is


def test_show_image_8_bit_pixels_keep_their_brightness():
    """cnnviz models take 8-bit pixels (DECISIONS D1): a dim image stays dim, not stretched."""
    fig = Figure()
    dim = (RGB_0_255 * 0.5).astype(np.float32)  # 0..127
    original = dim.copy()
    drawn = show_image(fig.add_subplot(), dim)
    shown = np.asarray(drawn.get_array())
    assert shown.shape == (16, 16, 3)
    np.testing.assert_allclose(shown, original / 255.0, atol=1e-6)
    np.testing.assert_array_equal(dim, original)  # caller's array untouched


def test_show_image_rgb_of_any_other_range_is_scaled_for_display_only():
    fig = Figure()
    standardized = (RGB_0_255 - 100.0) / 50.0  # negative values: not pixels
    original = standardized.copy()
    drawn = show_image(fig.add_subplot(), standardized)
    shown = np.asarray(drawn.get_array())
    assert shown.shape == (16, 16, 3)
    np.testing.assert_allclose(shown.min(), 0.0, atol=1e-9)
    np.testing.assert_allclose(shown.max(), 1.0, atol=1e-9)
    np.testing.assert_allclose(shown, (original - original.min()) / np.ptp(original))
    np.testing.assert_array_equal(standardized, original)  # caller's array untouched


def test_show_image_constant_and_nan_images_are_finite_and_labelled():
    fig = Figure()
    for image in (np.zeros((8, 8, 1)), np.full((8, 8, 3), 7.0), np.full((8, 8, 1), np.nan)):
        ax = fig.add_subplot()
        drawn = show_image(ax, image)
        assert np.isfinite(np.asarray(drawn.get_array())).all()
        assert any("constant image" in text.get_text() for text in ax.texts)


# ----------------------------------------------------------------------- training curves
def test_training_curves_plot_train_and_validation_per_metric():
    fig = training_curves(HISTORY)
    _decoded(fig)
    loss_ax, accuracy_ax = fig.axes[:2]
    assert loss_ax.get_title() == "loss" and accuracy_ax.get_title() == "accuracy"
    np.testing.assert_allclose(loss_ax.lines[0].get_ydata(), HISTORY["loss"])
    np.testing.assert_allclose(loss_ax.lines[1].get_ydata(), HISTORY["val_loss"])
    np.testing.assert_array_equal(loss_ax.lines[0].get_xdata(), [1, 2, 3, 4])  # epochs from 1
    # Best validation epoch: lowest loss (epoch 4), highest accuracy (epoch 3).
    assert "0.55 @ 4" in loss_ax.get_legend_handles_labels()[1][-1]
    assert "0.79 @ 3" in accuracy_ax.get_legend_handles_labels()[1][-1]


def test_training_curves_without_validation_keys_or_history():
    fig = training_curves({"accuracy": [0.1, 0.5], "loss": [2.0, 1.0]})
    _decoded(fig)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy"]  # loss first
    assert all(len(ax.lines) == 1 for ax in fig.axes)
    empty = training_curves({})
    _decoded(empty)
    assert "no training history" in _all_text(empty)


# ------------------------------------------------------------------------------- filters
def _mosaic_tile(fig: Figure, index: int, columns: int, side: int) -> np.ndarray:
    """Tile `index` of a `labelled_mosaic` image of square `side`-pixel tiles."""
    mosaic = np.asarray(fig.images[0].get_array())
    top = (index // columns) * (13 + side + 6) + 13
    left = (index % columns) * (side + 6)
    return mosaic[top:top + side, left:left + side]


def test_filters_grid_tiles_are_channel_means_on_a_symmetric_diverging_scale():
    from matplotlib import colormaps

    kernels = RNG.normal(size=(3, 3, 4, 10)).astype(np.float32)
    fig = filters_grid(kernels, title="conv2")
    _decoded(fig)
    means = kernels.mean(axis=2)
    limit = np.abs(means).max()
    for index in range(10):  # 10 tiles: 4 columns; each 3 x 3 enlarged 24 times
        expected = np.round(colormaps["RdBu_r"]((means[..., index] + limit) / (2 * limit))[..., :3]
                            * 255)
        tile = _mosaic_tile(fig, index, 4, 72)
        np.testing.assert_allclose(tile[::24, ::24], expected, atol=1)
    mosaic = np.asarray(fig.images[0].get_array())
    assert mosaic.shape[:2] == (3 * (13 + 72 + 6), 4 * 78 - 6)
    assert (mosaic[2 * 91:, 2 * 78:] == 255).all()  # no tiles past the 10th
    for index in range(10):  # a label above every tile
        row, column = divmod(index, 4)
        assert mosaic[row * 91:row * 91 + 13, column * 78:column * 78 + 72].min() < 128
    bars = [ax for ax in fig.axes if ax.get_ylabel() == "mean weight"]
    assert len(bars) == 1  # one shared bar, on the tiles' scale
    np.testing.assert_allclose(bars[0].get_ylim(), (-limit, limit), rtol=1e-6)
    assert "conv2" in fig.get_suptitle() and "mean over 4 input channels" in fig.get_suptitle()


def test_filters_grid_rgb_kernels_are_colour_tiles_with_zero_at_grey():
    kernels = RNG.normal(size=(5, 5, 3, 6))
    fig = filters_grid(kernels, title="conv1")
    _decoded(fig)
    limit = np.abs(kernels).max()
    for index in range(6):  # 6 tiles: 3 columns; each 5 x 5 enlarged 14 times
        expected = np.round(np.clip(0.5 + kernels[..., index] / (2 * limit), 0, 1) * 255)
        np.testing.assert_allclose(_mosaic_tile(fig, index, 3, 70)[::14, ::14], expected, atol=1)
    assert not [ax for ax in fig.axes if ax.get_ylabel()]  # colour tiles need no bar


def test_filters_grid_caps_tiles_and_says_so():
    fig = filters_grid(RNG.normal(size=(3, 3, 1, 100)), max_filters=16)
    assert np.asarray(fig.images[0].get_array()).shape[:2] == (4 * 91, 4 * 78 - 6)  # 16 tiles
    assert "first 16 of 100" in fig.get_suptitle()


def test_filters_grid_all_zero_kernels_draw_without_nan():
    fig = filters_grid(np.zeros((3, 3, 1, 4)), title="dead layer")
    _decoded(fig)
    bar = next(ax for ax in fig.axes if ax.get_ylabel() == "weight")
    assert tuple(bar.get_ylim()) == (-1.0, 1.0)
    grey = np.asarray(fig.images[0].get_array())[13:13 + 72, :72]  # 0 is the middle colour
    assert np.ptp(grey.reshape(-1, 3), axis=0).max() == 0
    assert "all weights shown are 0" in _all_text(fig)


def test_filters_grid_rejects_wrong_shape():
    with pytest.raises(CnnvizError, match=r"\(kh, kw, in_channels, filters\); received \(3, 3\)"):
        filters_grid(np.zeros((3, 3)))


# --------------------------------------------------------------------------- feature maps
def test_feature_maps_grid_draws_input_and_each_map_scaled_to_its_range():
    from matplotlib import colormaps

    maps = np.maximum(RNG.normal(size=(6, 6, 5)), 0)
    maps[..., 2] = 0.0  # a dead channel
    fig = feature_maps_grid(GRAY, maps, layer_name="conv1")
    _decoded(fig)
    assert _image_axes(fig)[0].get_title() == "input"
    mosaic = np.asarray(fig.images[0].get_array())  # uint8 RGB, placed pixel for pixel
    # 2 rows x 3 tiles, each 6 x 6 enlarged 12 times, under a 13-pixel label band, 6 apart
    first = (maps[..., 0] - maps[..., 0].min()) / np.ptp(maps[..., 0])
    expected = np.round(colormaps["viridis"](first)[..., :3] * 255)
    np.testing.assert_array_equal(mosaic[13:13 + 72:12, 0:72:12], expected)
    dead = mosaic[13:13 + 72, 2 * 78:2 * 78 + 72]  # tile 2: row 0, column 2
    np.testing.assert_array_equal(dead, np.broadcast_to(
        np.round(np.asarray(colormaps["viridis"](0.0)[:3]) * 255), dead.shape))
    for column in range(3):  # a label above every tile of the first row
        band = mosaic[:13, column * 78:column * 78 + 72]
        assert band.min() < 128, f"no label above tile {column}"
    assert "5 channels, 1 flat" in _all_text(fig)
    assert "conv1" in fig.get_suptitle()


def test_feature_maps_grid_caps_maps_and_accepts_a_batch_of_one():
    fig = feature_maps_grid(RGB_0_255, RNG.uniform(size=(1, 4, 4, 80)), layer_name="c", max_maps=9)
    mosaic = np.asarray(fig.images[0].get_array())
    assert mosaic.shape[:2] == (3 * (13 + 72 + 6), 3 * 78 - 6)  # 3 x 3 tiles of 4 x 4, x18
    assert "9 first of 80" in _all_text(fig)


def test_feature_maps_grid_says_the_channels_are_the_most_active():
    fig = feature_maps_grid(GRAY, RNG.uniform(size=(4, 4, 3)), layer_name="c", channels=[7, 2, 40],
                            total_channels=64)
    assert "3 most active of 64" in _all_text(fig)


# ------------------------------------------------------------------- activation maximization
def test_activation_max_grid_titles_are_the_labels():
    images = RNG.uniform(0, 1, (3, 8, 8, 1))
    images[1] = 0.0  # a constant tile still draws
    fig = activation_max_grid(images, NAMES, title="Activation maximization: head")
    _decoded(fig)
    tiles = _image_axes(fig)
    assert [ax.get_title() for ax in tiles] == NAMES
    np.testing.assert_allclose(
        tiles[0].get_images()[0].get_array(),
        (images[0, ..., 0] - images[0].min()) / np.ptp(images[0]),  # each tile stretched
    )


def test_activation_max_grid_needs_one_label_per_image():
    with pytest.raises(CnnvizError, match="3 images but 2 labels"):
        activation_max_grid(np.zeros((3, 4, 4, 3)), ["a", "b"])


# ------------------------------------------------------------------------------ occlusion
def test_occlusion_figure_names_classes_and_uses_fixed_scales():
    probabilities = RNG.uniform(0, 1, (8, 8))
    classes = np.where(probabilities > 0.5, 0, 2)
    fig = occlusion_figure(
        GRAY,
        probabilities,
        classes,
        class_names=NAMES,
        target_label=0,
        true_label="cat",
        predicted_label=1,
        unoccluded_probability=0.875,
    )
    _decoded(fig)
    image_ax, heat_ax, class_ax = _image_axes(fig)
    assert "true: cat" in image_ax.get_title() and "predicted: dog" in image_ax.get_title()
    assert "P(cat)" in heat_ax.get_title() and "cat" in fig.get_suptitle()
    assert "intact image: 0.88" in heat_ax.get_title()
    heat = heat_ax.get_images()[0]
    assert heat.get_clim() == (0.0, 1.0)  # fixed, comparable between images
    assert heat.get_cmap().name == "viridis"
    assert class_ax.get_title() == "predicted class with patch occluded"
    shown_classes = np.asarray(class_ax.get_images()[0].get_array())
    np.testing.assert_array_equal(shown_classes, np.where(classes == 0, 0, 1))  # cat 0, bird 1
    class_bar = fig.axes[-1]
    assert [t.get_text() for t in class_bar.get_yticklabels()] == ["cat", "bird"]  # present ones


def test_occlusion_figure_constant_maps_draw_without_nan():
    fig = occlusion_figure(
        np.zeros((8, 8, 3)),
        np.zeros((4, 4)),
        np.ones((4, 4), int),
        class_names=NAMES,
        target_label="dog",
    )
    _decoded(fig)
    assert "true: ? | predicted: ?" in fig.axes[0].get_title()
    assert "constant (0)" in _all_text(fig)


# ------------------------------------------------------------------------------- saliency
def test_saliency_row_one_panel_per_method_each_scaled_per_panel():
    magnitude = np.abs(RNG.normal(size=(8, 8))) * 1e-4  # tiny gradients still fill the scale
    signed = RNG.normal(size=(8, 8, 1))
    maps = {"gradient": magnitude, "gradient x input": signed, "smoothgrad": np.zeros((8, 8))}
    fig = saliency_row(GRAY, maps, title="Saliency for 'cat' (true cat, predicted dog)")
    _decoded(fig)
    panels = _image_axes(fig)
    assert [ax.get_title() for ax in panels] == ["input", *maps]
    assert "cat" in fig.get_suptitle() and "dog" in fig.get_suptitle()
    gradient = panels[1].get_images()[0]
    assert gradient.get_cmap().name == "magma"
    np.testing.assert_allclose(np.asarray(gradient.get_array()).max(), 1.0)
    signed_image = panels[2].get_images()[0]
    assert signed_image.get_cmap().name == "RdBu_r" and signed_image.get_clim() == (-1.0, 1.0)
    np.testing.assert_allclose(np.abs(np.asarray(signed_image.get_array())).max(), 1.0)
    zero = np.asarray(panels[3].get_images()[0].get_array())
    assert np.isfinite(zero).all() and any("constant map" in t.get_text() for t in panels[3].texts)


def test_saliency_row_reduces_colour_maps_by_max_abs_over_channels():
    colour_map = RNG.normal(size=(16, 16, 3))
    fig = saliency_row(RGB_0_255, {"gradient": colour_map})
    shown = np.asarray(_image_axes(fig)[1].get_images()[0].get_array())
    expected = np.abs(colour_map).max(axis=-1)
    np.testing.assert_allclose(shown, expected / expected.max())


# ------------------------------------------------------------------------------- Grad-CAM
def test_gradcam_figure_overlays_a_0_to_1_heatmap_with_colour_bar():
    heatmap = RNG.uniform(0, 1, (8, 8))
    fig = gradcam_figure(GRAY, heatmap, title="Grad-CAM for 'bird' at conv2")
    _decoded(fig)
    input_ax, overlay_ax = _image_axes(fig)
    assert input_ax.get_title() == "input" and "bird" in fig.get_suptitle()
    overlay = overlay_ax.get_images()[-1]
    assert overlay.get_clim() == (0.0, 1.0) and overlay.get_cmap().name == "turbo"
    assert 0 < overlay.get_alpha() < 1
    np.testing.assert_allclose(overlay.get_array(), heatmap)
    assert any(ax.get_ylabel() == "Grad-CAM (0..1)" for ax in fig.axes)


def test_gradcam_figure_guided_panel_and_coarse_all_zero_heatmap():
    fig = gradcam_figure(
        RGB_0_255, np.zeros((4, 4)), title="Grad-CAM", guided_map=RNG.normal(size=(16, 16, 3))
    )
    _decoded(fig)
    panels = _image_axes(fig)
    assert [ax.get_title() for ax in panels] == ["input", "Grad-CAM overlay", "Guided Grad-CAM"]
    assert panels[1].get_images()[-1].get_extent() == [-0.5, 15.5, 15.5, -0.5]  # stretched
    assert "heatmap is all 0" in _all_text(fig)
    guided = np.asarray(panels[2].get_images()[0].get_array())
    assert np.isfinite(guided).all() and 0 <= guided.min() and guided.max() <= 1


def test_gradcam_figure_rejects_a_heatmap_with_channels():
    with pytest.raises(CnnvizError, match=r"heatmap must have shape \(H, W\)"):
        gradcam_figure(GRAY, np.zeros((8, 8, 3)))


# ------------------------------------------------------------------------------ no pyplot
def test_cam_row_overlays_each_method_on_one_shared_0_to_1_scale():
    maps = {"gradcam": RNG.uniform(0, 1, (8, 8)), "eigencam": np.zeros((8, 8)),
            "scorecam": RNG.uniform(0, 1, (2, 2))}  # a coarse map is stretched
    figure = cam_row(GRAY, maps, title="CAM on conv2")
    panels = figure.axes[1:4]
    assert [ax.get_title() for ax in panels] == list(maps)
    for ax in panels:
        overlay = ax.get_images()[-1]
        assert overlay.get_cmap().name == "turbo" and overlay.get_clim() == (0.0, 1.0)
    assert "all 0" in [text.get_text() for text in panels[1].texts]
    assert len(figure.axes) == 5  # input, three panels, one colour bar
    _decoded(figure)


def test_signed_row_is_centred_on_zero_and_sums_channels_keeping_the_sign():
    attribution = RNG.normal(size=(8, 8, 3))
    figure = signed_row(RGB_0_255[:8, :8], {"integrated gradients": attribution,
                                            "zero": np.zeros((8, 8))},
                        notes={"integrated gradients": "sum 1.0 vs 1.0"})
    drawn = figure.axes[1].get_images()[0]
    summed = attribution.sum(axis=-1)
    np.testing.assert_allclose(drawn.get_array(), summed)
    assert drawn.get_cmap().name == "RdBu_r"
    assert drawn.get_clim() == pytest.approx((-np.abs(summed).max(), np.abs(summed).max()))
    assert figure.axes[1].get_xlabel() == "sum 1.0 vs 1.0"
    assert "constant map (0)" in _all_text(figure)
    _decoded(figure)


@pytest.mark.slow
def test_plotting_never_imports_pyplot():
    code = (
        "import sys, numpy as np\n"
        "from cnnviz.plot import gradcam_figure, render_png\n"
        "render_png(gradcam_figure(np.zeros((4, 4, 1)), np.ones((4, 4))))\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root), "MPLBACKEND": "Agg"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_training_curves_skip_the_csv_logger_epoch_column():
    from cnnviz.plot import training_curves

    history = {"epoch": [0.0, 1.0, 2.0], "loss": [1.0, 0.5, 0.2], "accuracy": [0.5, 0.7, 0.9]}
    figure = training_curves(history)
    titles = [ax.get_title() for ax in figure.axes]
    assert "epoch" not in titles and "loss" in titles and "accuracy" in titles


def test_occlusion_scale_is_stretched_and_labelled_when_the_map_barely_moves():
    from cnnviz.plot import occlusion_figure

    image = np.zeros((8, 8, 1), np.float32)
    nearly_flat = np.full((8, 8), 0.999, np.float32)
    nearly_flat[:4] = 0.991
    figure = occlusion_figure(image, nearly_flat, np.zeros((8, 8), int), class_names=["a", "b"],
                              target_label=0)
    heat = figure.axes[1].images[0]
    assert heat.get_clim() == pytest.approx((0.991, 0.999), abs=1e-6)
    assert "stretched" in figure.axes[1].get_title()
    varied = np.linspace(0.2, 1.0, 64, dtype=np.float32).reshape(8, 8)
    figure = occlusion_figure(image, varied, np.zeros((8, 8), int), class_names=["a", "b"],
                              target_label=0)
    assert figure.axes[1].images[0].get_clim() == (0, 1)


def test_feature_maps_grid_subtitle_fits_a_narrow_mosaic():
    maps = np.maximum(RNG.normal(size=(28, 28, 16)), 0)  # tiles of 56 pixels, 4 columns
    maps[..., [3, 5, 9]] = 0.0  # 3 flat channels: a longer subtitle
    fig = feature_maps_grid(GRAY, maps, layer_name="conv1")
    _decoded(fig)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    subtitle = next(text for text in fig.texts if "each scaled" in text.get_text())
    box = subtitle.get_window_extent(renderer)
    assert "3 flat" in subtitle.get_text()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1, "the subtitle runs off the figure"


def test_map_grid_is_a_titled_picture_of_each_image_and_its_maps_and_its_png_decodes():
    import io

    from matplotlib import colormaps
    from PIL import Image

    from cnnviz.plot import map_grid, png_bytes

    images = RNG.random((3, 6, 6, 1)).astype(np.float32)
    heat = np.zeros((3, 6, 6), np.float32)
    heat[:, 2, 3] = 5.0  # one hot pixel a row: 1.0 after scaling by the row's maximum
    picture = map_grid(images, {"epoch 1": heat, "epoch 2": -heat}, title="saliency",
                       row_labels=["a", "b", "c"])
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    decoded = np.asarray(Image.open(io.BytesIO(png_bytes(picture))).convert("RGB"))
    np.testing.assert_array_equal(decoded, picture)
    # Find the mosaic under the title: its first tile is image 0, 12 times enlarged (72 px).
    from cnnviz.plot.display import unit_display_image

    gray = np.round(unit_display_image(images[0])[0] * 255)  # as the figures show an input
    found = [(top, left) for top in range(picture.shape[0] - 72)
             for left in range(picture.shape[1] - 72)
             if np.abs(picture[top:top + 72:12, left:left + 72:12, 0] - gray).max() <= 1]
    assert found, "image 0 is not in the picture"
    top, left = found[0]
    assert top > 13  # below the title band and the label band
    hot = picture[top + 2 * 12 + 6, left + 78 + 3 * 12 + 6]  # epoch 1's tile, the hot pixel
    turbo_top = np.asarray(colormaps["turbo"](1.0)[:3]) * 255
    expected = 0.5 * picture[top + 2 * 12 + 6, left + 3 * 12 + 6] + 0.5 * turbo_top
    np.testing.assert_allclose(hot, expected, atol=2)
    # A map with no positive part: its tile is the image under turbo's bottom colour.
    negative_tile = picture[top:top + 72, left + 2 * 78:left + 2 * 78 + 72].astype(float)
    turbo_bottom = np.asarray(colormaps["turbo"](0.0)[:3]) * 255
    expected_tile = 0.5 * picture[top:top + 72, left:left + 72] + 0.5 * turbo_bottom
    np.testing.assert_allclose(negative_tile, expected_tile, atol=2)
    assert (picture[:top - 13] < 128).any()  # a title drawn above
