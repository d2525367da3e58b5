"""Batch figure writing: choose images, explain them in chunks, draw, save, show progress.

This is the glue between the CLI and the pure layers: `cnnviz.explain` computes arrays,
`cnnviz.plot` draws Figures, and this module feeds them chunk by chunk so memory stays flat
however many images are asked for, and writes each PNG atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cnnviz.errors import CnnvizError
from cnnviz.model.compiled import predict_probabilities
from cnnviz.report.batching import (
    FigureFile,
    _explained_arrays,
    caption,
    drawing,
    progress_bar,
    save_captioned,
    write_per_image,
)
from cnnviz.report.batching import save_arrays as write_arrays
from cnnviz.report.selection import Selection
from cnnviz.runs.load import Run


# ------------------------------------------------------------------------- figure commands
# Each returns the PNG paths it wrote. They compute with cnnviz.explain, draw with cnnviz.plot.
def _explained(selection: Selection, index: int, target: int, probabilities: np.ndarray) -> str:
    names = selection.class_names
    target_name = names[target] if target < len(names) else str(target)
    return f"for class {target_name!r} — {caption(selection, index, probabilities)}"


def _chunk_targets(target: int | None, probabilities: np.ndarray) -> np.ndarray:
    if target is None:
        return np.argmax(probabilities, axis=1).astype(np.int32)
    if not 0 <= target < probabilities.shape[1]:
        raise CnnvizError(
            f"--target {target} is not a class of this model (0..{probabilities.shape[1] - 1})"
        )
    return np.full(len(probabilities), target, np.int32)


def saliency_figures(model, selection: Selection, folder: Path, *, methods: Sequence[str],
                     target: int | None = None, samples: int = 20, noise: float = 0.15,
                     seed: int = 0, output=None, save_arrays: bool = False) -> list[FigureFile]:
    """One figure per image: the input next to each saliency method's map."""
    from cnnviz.explain import saliency
    from cnnviz.plot import saliency_row

    suffix = "all" if len(methods) > 1 else methods[0]

    def explain_chunk(images, labels):
        probabilities = predict_probabilities(model, images, output=output)
        targets = _chunk_targets(target, probabilities)
        maps = {method: saliency(model, images, targets, method=method, samples=samples,
                                 noise=noise, seed=seed, output=output) for method in methods}
        return [(probabilities[i], targets[i], {m: maps[m][i] for m in methods})
                for i in range(len(images))]

    def draw(index, payload):
        probabilities, explained, maps = payload
        title = f"Saliency {_explained(selection, index, explained, probabilities)}"
        figure = drawing(saliency_row, selection.shown(index), maps, title=title)
        return [(f"{selection.names[index]}_{suffix}.png", figure)]

    return write_per_image(selection, folder, f"saliency ({suffix})", explain_chunk, draw,
                           (lambda p: _explained_arrays(p[0], p[1], p[2])) if save_arrays else None)


def gradcam_figures(model, selection: Selection, folder: Path, *, layer: str | None = None,
                    guided: bool = False, target: int | None = None,
                    output=None, save_arrays: bool = False) -> list[FigureFile]:
    """One figure per image: the Grad-CAM heatmap over the input (and Guided Grad-CAM)."""
    from cnnviz.explain import gradcam, gradcam_layer
    from cnnviz.plot import gradcam_figure

    layer_name = gradcam_layer(model, layer)

    def explain_chunk(images, labels):
        probabilities = predict_probabilities(model, images, output=output)
        targets = _chunk_targets(target, probabilities)
        heatmaps = gradcam(model, images, targets, layer=layer_name, output=output)
        guided_maps = (gradcam(model, images, targets, layer=layer_name, guided=True,
                               output=output) if guided else None)
        return [(probabilities[i], targets[i], heatmaps[i],
                 None if guided_maps is None else guided_maps[i]) for i in range(len(images))]

    def draw(index, payload):
        probabilities, explained, heatmap, guided_map = payload
        title = (f"Grad-CAM on {layer_name} "
                 f"{_explained(selection, index, explained, probabilities)}")
        figure = drawing(gradcam_figure, selection.shown(index), heatmap, title=title,
                                guided_map=guided_map)
        return [(f"{selection.names[index]}.png", figure)]

    def arrays(payload):
        probabilities, explained, heatmap, guided_map = payload
        maps = {"gradcam": heatmap,
                **({} if guided_map is None else {"guided_gradcam": guided_map})}
        return _explained_arrays(probabilities, explained, maps)

    return write_per_image(selection, folder, f"grad-cam ({layer_name})", explain_chunk, draw,
                           arrays if save_arrays else None)


def file_stem(layer_path: str) -> str:
    """A layer path as part of a file name: `base/conv1` -> `base__conv1`."""
    return layer_path.replace("/", "__")


def cam_figures(model, selection: Selection, folder: Path, *, methods: Sequence[str],
                layer: str | None = None, target: int | None = None,
                output=None, save_arrays: bool = False) -> list[FigureFile]:
    """One figure per image: the input next to each CAM method's heatmap over it."""
    from cnnviz.explain import cam, gradcam_layer
    from cnnviz.plot import cam_row

    layer_name = gradcam_layer(model, layer)
    suffix = "all" if len(methods) > 1 else methods[0]

    def explain_chunk(images, labels):
        probabilities = predict_probabilities(model, images, output=output)
        targets = _chunk_targets(target, probabilities)
        maps = {method: cam(model, images, targets, method=method, layer=layer_name,
                            output=output, input_range=selection.input_range)
                for method in methods}
        return [(probabilities[i], targets[i], {m: maps[m][i] for m in methods})
                for i in range(len(images))]

    def draw(index, payload):
        probabilities, explained, maps = payload
        title = (f"CAM on {layer_name} {_explained(selection, index, explained, probabilities)}"
                 + (" (eigencam: class-agnostic)" if "eigencam" in maps else ""))
        return [(f"{selection.names[index]}_{suffix}.png",
                 drawing(cam_row, selection.shown(index), maps, title=title))]

    return write_per_image(selection, folder, f"cam ({suffix}, {layer_name})", explain_chunk,
                           draw, (lambda p: _explained_arrays(*p)) if save_arrays else None)


CAM_FAMILY = "Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM, Score-CAM, Eigen-CAM"
SIGNED_HEADING = ("Signed attributions: integrated gradients (64 steps from a black image) and "
                  "gradient x input; red for the class, blue against")
SIGNED_METHODS = ("integrated_gradients", "gradient_x_input")
_SIGNED_TITLES = {"integrated_gradients": "integrated gradients",
                  "gradient_x_input": "gradient x input"}


def signed_figures(model, selection: Selection, folder: Path, *, methods: Sequence[str],
                   steps: int = 64, baseline: float | str = 0.0,
                   target: int | None = None, output=None,
                   save_arrays: bool = False) -> list[FigureFile]:
    """One figure per image: signed attribution maps (red for the class, blue against).

    Under integrated gradients, the completeness check: the attributions' sum beside
    score(image) - score(baseline), which it must equal up to the integration error. `baseline`:
    a pixel value (0 black, 255 white; in input units as the images were prepared) or "blur".
    """
    from cnnviz.explain import gradient_x_input, integrated_gradients
    from cnnviz.explain.integrated_gradients import score_difference
    from cnnviz.model.inputs import channel_range, pixel_value
    from cnnviz.plot import signed_row

    pixel = baseline
    if not isinstance(baseline, str):
        lows, highs = selection.input_range or channel_range(model)
        baseline = pixel_value(float(baseline), lows, highs)
    suffix = "all" if len(methods) > 1 else methods[0]

    def explain_chunk(images, labels):
        probabilities = predict_probabilities(model, images, output=output)
        targets = _chunk_targets(target, probabilities)
        maps, notes = {}, [{} for _ in images]
        if "integrated_gradients" in methods:
            maps["integrated_gradients"] = integrated_gradients(
                model, images, targets, baseline=baseline, steps=steps, output=output)
            totals = maps["integrated_gradients"].sum(axis=(1, 2, 3))
            expected = score_difference(model, images, targets, baseline=baseline,
                                        output=output)
            for i, (total, difference) in enumerate(zip(totals, expected)):
                gap = abs(total - difference) / max(abs(difference), 1e-12)
                notes[i]["integrated gradients"] = (
                    f"sum {total:.3g} vs score(x) - score(x') {difference:.3g} ({gap:.1%} off)")
        if "gradient_x_input" in methods:
            maps["gradient_x_input"] = gradient_x_input(model, images, targets, output=output)
        return [(probabilities[i], targets[i],
                 {_SIGNED_TITLES[m]: maps[m][i] for m in methods}, notes[i])
                for i in range(len(images))]

    start = "a blurred copy" if isinstance(pixel, str) else f"pixel value {pixel:g}"
    described = f"{steps} steps from {start}" if "integrated_gradients" in methods else ""

    def draw(index, payload):
        probabilities, explained, maps, notes = payload
        title = (f"Signed attribution {_explained(selection, index, explained, probabilities)}"
                 f"\n{described + '; ' if described else ''}red: for the class, blue: against")
        return [(f"{selection.names[index]}_{suffix}.png",
                 drawing(signed_row, selection.shown(index), maps, title=title, notes=notes))]

    def arrays(payload):  # the maps under their method names, (H, W, C) as computed
        probabilities, explained, maps, _ = payload
        return _explained_arrays(probabilities, explained,
                                 {m: maps[_SIGNED_TITLES[m]] for m in methods})

    return write_per_image(selection, folder, f"signed ({suffix})", explain_chunk, draw,
                           arrays if save_arrays else None)


def rise_figures(model, selection: Selection, folder: Path, *, masks: int = 2000, cell: int = 7,
                 keep: float = 0.5, seed: int = 0, target: int | None = None, output=None,
                 save_arrays: bool = False) -> list[FigureFile]:
    """One figure per image: the RISE map over the input, scaled per image."""
    from cnnviz.explain import rise
    from cnnviz.plot import cam_row
    from cnnviz.plot.display import normalize01

    def explain_chunk(images, labels):
        probabilities = predict_probabilities(model, images, output=output)
        targets = _chunk_targets(target, probabilities)
        maps = rise(model, images, targets, masks=masks, cell=cell, keep=keep, seed=seed,
                    output=output, input_range=selection.input_range)
        return [(probabilities[i], targets[i], maps[i]) for i in range(len(images))]

    def draw(index, payload):
        probabilities, explained, saliency = payload
        title = (f"RISE, {masks} masks {_explained(selection, index, explained, probabilities)}"
                 f"\nE[P(class) | pixel kept] from {saliency.min():.2f} (blue) to "
                 f"{saliency.max():.2f} (red)")
        figure = drawing(cam_row, selection.shown(index), {"RISE": normalize01(saliency)},
                         title=title, label="scaled to its own range")
        return [(f"{selection.names[index]}.png", figure)]

    return write_per_image(selection, folder, f"rise ({masks} masks)", explain_chunk, draw,
                           (lambda p: _explained_arrays(p[0], p[1], {"rise": p[2]}))
                           if save_arrays else None)


def occlusion_figures(model, selection: Selection, folder: Path, *, patch: int = 4,
                      stride: int | None = None, fill: float = 0.5,
                      target: int | None = None, output=None,
                      save_arrays: bool = False) -> list[FigureFile]:
    """One figure per image: input, P(target) under occlusion, and the predicted-class map."""
    from cnnviz.explain import occlusion
    from cnnviz.plot import occlusion_figure

    def explain_chunk(images, labels):
        probabilities = predict_probabilities(model, images, output=output)
        targets = _chunk_targets(target, probabilities)
        result = occlusion(model, images, targets, patch=patch, stride=stride, fill=fill,
                           output=output, input_range=selection.input_range)
        return [(probabilities[i], targets[i], result.probability[i], result.predicted_class[i],
                 result.unoccluded_probability[i]) for i in range(len(images))]

    def draw(index, payload):
        probabilities, explained, probability_map, class_map, intact = payload
        label = int(selection.labels[index])
        figure = drawing(occlusion_figure,
            selection.shown(index), probability_map, class_map,
            class_names=selection.class_names, target_label=int(explained),
            true_label=label if label >= 0 else None,
            predicted_label=int(np.argmax(probabilities)), unoccluded_probability=float(intact),
            title=f"Occlusion, {patch}x{patch} patches at {fill:g} of the input range — "
                  f"{caption(selection, index, probabilities)}")
        return [(f"{selection.names[index]}.png", figure)]

    def arrays(payload):
        probabilities, explained, probability_map, class_map, intact = payload
        return _explained_arrays(probabilities, explained, {
            "probability": probability_map, "predicted_class": class_map,
            "unoccluded_probability": intact})

    return write_per_image(selection, folder, "occlusion", explain_chunk, draw,
                           arrays if save_arrays else None)


def feature_map_figures(model, selection: Selection, folder: Path, *, layers: Sequence[str],
                        max_channels: int | None = 64, output=None,
                        save_arrays: bool = False) -> list[FigureFile]:
    """One figure per image and layer: the input and the layer's (most active) feature maps.

    All layers come from one forward pass per chunk of images (`layer_activations`). With
    `save_arrays`, the .npz beside an image's first figure holds each layer's maps as drawn
    (key: the layer path), the channel indices shown (`<path>.channels`) and `probabilities`.
    """
    from cnnviz.explain.layers import layer_activations
    from cnnviz.plot import feature_maps_grid

    def explain_chunk(images, labels):
        probabilities = predict_probabilities(model, images, output=output)
        activations = layer_activations(model, images, layers, max_channels=max_channels,
                                        output=output)
        return [(probabilities[i], {path: (found.maps[i], found.channels[i], found.total_channels)
                                    for path, found in activations.items()})
                for i in range(len(images))]

    def draw(index, payload):
        probabilities, maps = payload
        return [(f"{selection.names[index]}_{file_stem(path)}.png",
                 drawing(feature_maps_grid, selection.shown(index), layer_maps, layer_name=path,
                                   channels=channels, total_channels=total,
                                   max_maps=len(channels),
                                   title=f"Feature maps of {path} — "
                                         f"{caption(selection, index, probabilities)}"))
                for path, (layer_maps, channels, total) in maps.items()]

    def arrays(payload):
        probabilities, maps = payload
        return {"probabilities": probabilities,
                **{path: layer_maps for path, (layer_maps, _, _) in maps.items()},
                **{f"{path}.channels": channels for path, (_, channels, _) in maps.items()}}

    return write_per_image(selection, folder, "feature maps", explain_chunk, draw,
                           arrays if save_arrays else None)


def conv_layer_names(model) -> list[str]:
    """Paths of the Conv2D and SeparableConv2D layers, nested models opened: the layers
    `feature-maps` shows without `--layer` (depthwise layers, one per expansion in MobileNets,
    would add half as many figures again; name them with --layer)."""
    from cnnviz.explain.layers import kernel_paths

    return kernel_paths(model, ("Conv2D", "SeparableConv2D"))


def kernel_layer_names(model) -> list[str]:
    """Paths of every layer with spatial kernels (Conv2D, DepthwiseConv2D, SeparableConv2D),
    nested models opened: what `filters` draws without `--layer`."""
    from cnnviz.explain.layers import kernel_paths

    return kernel_paths(model)


def filter_figures(model, folder: Path, *, layers: Sequence[str],
                   save_arrays: bool = False) -> list[FigureFile]:
    """One figure per conv layer: its kernels (with `save_arrays`, also `<layer>.npz` holding
    `kernels`, as `cnnviz.explain.filters` gives them)."""
    from cnnviz.explain import filters
    from cnnviz.plot import filters_grid

    written = []
    with progress_bar(len(layers), "filters") as progress:
        task = progress.add_task("filters", total=len(layers))
        for layer in layers:
            kernels = filters(model, layer)
            written.append(save_captioned(filters_grid(kernels, title=f"Filters of {layer}"),
                                          folder / f"{file_stem(layer)}.png"))
            if save_arrays:
                write_arrays(folder / f"{file_stem(layer)}.npz", {"kernels": kernels})
            progress.advance(task)
    return written


def activation_max_figure(model, folder: Path, *, class_names: Sequence[str],
                          layer: str | None = None, indices: Sequence[int] | None = None,
                          steps: int = 256, seed: int = 0, output=None,
                          preprocess: str | None = None, save_arrays: bool = False,
                          param: str | None = None,
                          transforms: Sequence[str] = ()) -> FigureFile:
    """One grid: the input that maximizes each class score (or each chosen filter of `layer`).

    With `save_arrays`, the .npz beside it holds `images` (the optimized model inputs, one per
    unit) and `indices` (the classes or filters, in the grid's order).

    Classes default to the first 10 (filters to the first 16), with a progress bar per chunk
    of images. The images are optimized in the model's input range: `_common.input_range`, or
    the range of the `cnnviz.preprocess` mode `preprocess` (a bare .keras file), and drawn as
    pixels (that mode undone: caffe's BGR becomes RGB).
    """
    from cnnviz.plot import activation_max_grid

    if layer is None:
        indices = list(indices if indices is not None else range(min(len(class_names), 10)))
        labels = [class_names[index] if index < len(class_names) else str(index)
                  for index in indices]
        title, name = "Activation maximization: the input each class wants most", "classes.png"
    else:
        from cnnviz.model.outputs import get_layer

        channels = int(get_layer(model, layer).output.shape[-1])
        indices = list(indices if indices is not None else range(min(channels, 16)))
        labels = [f"filter {index}" for index in indices]
        title = f"Activation maximization of {layer}'s filters"
        name = f"{file_stem(layer)}.png"
    images, shown = synthesized(model, layer=layer, indices=indices, steps=steps, seed=seed,
                                output=output, preprocess=preprocess, param=param,
                                transforms=transforms)
    if save_arrays:
        write_arrays((folder / name).with_suffix(".npz"),
                     {"images": images, "indices": np.asarray(indices, np.int32)})
    return save_captioned(activation_max_grid(shown, labels, title=title), folder / name)


def synthesized(model, *, layer: str | None, indices: Sequence[int], steps: int = 256,
                seed: int = 0, output=None, preprocess: str | None = None,
                param: str | None = None,
                transforms: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(model inputs, what to draw) of the activation maximization of each class (`layer`
    None) or filter of `layer`, with a progress bar; drawn as pixels when `preprocess` (a
    bare .keras file's `cnnviz.preprocess` mode) is given, that mode undone. `param` and
    `transforms` as `activation_maximization_batch` takes them."""
    from cnnviz.explain import activation_maximization_batch
    from cnnviz.model.inputs import to_pixels, value_range

    height = int(model.inputs[0].shape[1])
    # The library's defaults suit 8x8 inputs; from ~20 px up, stronger smoothing (chosen by eye
    # on 28x28 digits, every class still the top prediction) keeps the images readable.
    smoothing = ({"learning_rate": 0.02, "l2": 0.2, "tv": 0.5, "blur_sigma": 1.0}
                 if height >= 20 else {})
    smoothing.update(param=param, transforms=tuple(transforms))
    input_range = None if preprocess is None else value_range(preprocess)
    with progress_bar(len(indices), "activation maximization") as progress:
        task = progress.add_task("activation maximization", total=len(indices))
        images = activation_maximization_batch(
            model, layer, indices, steps=steps, seed=seed, output=output,
            input_range=input_range, progress=lambda done: progress.advance(task, done),
            **smoothing)
    if preprocess is None:
        return images, images
    return images, to_pixels(images, preprocess) / np.float32(255.0)


def predicted_classes(model, images: np.ndarray, *, output=None, limit: int = 64) -> list[int]:
    """The distinct classes the model predicts for `images`, in order of first appearance."""
    predicted = predict_probabilities(model, images, output=output).argmax(axis=-1)
    return [int(label) for label in dict.fromkeys(predicted.tolist())][:limit]


def one_per_class(labels: np.ndarray, limit: int = 10) -> str:
    """An `--images` spec naming the first test image of each class (at most `limit`)."""
    firsts = sorted(int(np.flatnonzero(labels == label)[0]) for label in np.unique(labels))
    return ",".join(str(index) for index in firsts[:limit])


def all_figures(run: Run, selection: Selection, folder: Path, *, feature_map_images: int = 2,
                activation_max_steps: int = 256,
                conv_layers: Sequence[str] | None = None) -> list[tuple[str, list[FigureFile]]]:
    """Every figure type for `selection`, grouped as the index page shows them (filters and
    feature maps of `conv_layers`, default every conv layer)."""
    from cnnviz.explain import CAM_METHODS, SALIENCY_METHODS, gradcam_layer

    model = run.model
    conv_layers = list(conv_layers or conv_layer_names(model))
    first_images = selection.head(feature_map_images)
    layer = gradcam_layer(model)
    return [
        ("Saliency: vanilla, guided backpropagation, rectified (deconvnet), SmoothGrad",
         saliency_figures(model, selection, folder / "saliency", methods=SALIENCY_METHODS)),
        (f"Grad-CAM and Guided Grad-CAM (layer {layer})",
         gradcam_figures(model, selection, folder / "gradcam", layer=layer, guided=True)),
        (f"The CAM family on layer {layer}: {CAM_FAMILY}",
         cam_figures(model, selection, folder / "cam", methods=CAM_METHODS, layer=layer)),
        (SIGNED_HEADING,
         signed_figures(model, selection, folder / "signed", methods=SIGNED_METHODS)),
        ("RISE: randomized input sampling (2000 masks)",
         rise_figures(model, selection, folder / "rise",
                      cell=min(7, *selection.images.shape[1:3]))),
        ("Occlusion sensitivity", occlusion_figures(model, selection, folder / "occlusion")),
        ("Activation maximization",
         [activation_max_figure(model, folder / "activation-max",
                                class_names=selection.class_names, steps=activation_max_steps)]),
        ("Convolution filters",
         filter_figures(model, folder / "filters", layers=kernel_layer_names(model))),
        ("Feature maps",
         feature_map_figures(model, first_images, folder / "feature-maps", layers=conv_layers)),
    ]
