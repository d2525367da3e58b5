"""Arrays -> matplotlib Figures (no pyplot, no files); `render_png` turns one into PNG bytes,
`png_bytes` a picture drawn without matplotlib (`map_grid`'s)."""

from cnnviz.plot.attribution import (
    cam_row,
    gradcam_figure,
    map_grid,
    occlusion_figure,
    saliency_row,
    signed_row,
)
from cnnviz.plot.display import png_bytes, render_png, show_image
from cnnviz.plot.exemplars import exemplar_grid
from cnnviz.plot.inspect import activation_max_grid, feature_maps_grid, filters_grid
from cnnviz.plot.training import augmentation_grid, training_curves

__all__ = [
    "activation_max_grid",
    "augmentation_grid",
    "cam_row",
    "exemplar_grid",
    "feature_maps_grid",
    "filters_grid",
    "gradcam_figure",
    "map_grid",
    "occlusion_figure",
    "png_bytes",
    "render_png",
    "saliency_row",
    "show_image",
    "signed_row",
    "training_curves",
]
