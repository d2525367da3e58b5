"""Figure commands: saliency, gradcam, cam, integrated-gradients, gradient-x-input, rise,
occlusion, feature-maps, filters, activation-max, exemplars; layers (what --layer can name)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cnnviz.cli._common import (
    RunArgument,
    SetOption,
    command,
    import_keras,
    load_config_file,
    report_written,
)
from cnnviz.cli._options import (
    ImageOptions,
    LayerOption,
    ModelSourceArgument,
    TargetOption,
    choices,
    takes_model,
)
from cnnviz.errors import CnnvizError

ACTIVATION_MAX_IMAGES = ("Images whose predicted classes are synthesized (indices or image "
                         "files, as in the other commands).")
FiltersOption = Annotated[
    str | None,
    typer.Option("--filters",
                 help="With --layer: filter indices, 0,1,2 or 0:8 (default: the first 16)."),
]
Parameterization = choices("Parameterization", 'auto', 'pixel', 'fft')
SaliencyMethod = choices("SaliencyMethod", 'vanilla', 'guided', 'rectified', 'smoothgrad', 'all')


@command("saliency")
@takes_model(images="0:8", arrays=True, shard=True)
def saliency_command(
    run: RunArgument,
    options: ImageOptions,
    method: Annotated[
        SaliencyMethod, typer.Option(help="Gradient rule; `all` draws every one in a row.")
    ] = SaliencyMethod.all,
    samples: Annotated[int, typer.Option(min=1, help="SmoothGrad: noisy copies per image.")] = 20,
    noise: Annotated[
        float,
        typer.Option(min=0.0, help="SmoothGrad: noise std as a share of the image's range."),
    ] = 0.15,
    target: TargetOption = None,
    seed: Annotated[int, typer.Option(help="SmoothGrad noise seed.")] = 0,
) -> None:
    """Saliency maps: |d score / d pixel|, vanilla, guided, rectified (deconvnet) or SmoothGrad."""
    from cnnviz.explain import SALIENCY_METHODS
    from cnnviz.report.figures import saliency_figures

    methods = SALIENCY_METHODS if method is SaliencyMethod.all else (method.value,)
    options.draw(run, "saliency", saliency_figures, methods=methods, target=target,
                 samples=samples, noise=noise, seed=seed)


@command("gradcam")
@takes_model(images="0:8", arrays=True, shard=True)
def gradcam_command(
    run: RunArgument,
    options: ImageOptions,
    layer: LayerOption = None,
    guided: Annotated[bool, typer.Option("--guided", help="Also draw Guided Grad-CAM.")] = False,
    target: TargetOption = None,
) -> None:
    """Grad-CAM heatmaps over the input (default layer: the last one with a spatial output,
    inside a nested backbone too)."""
    from cnnviz.explain import gradcam_layer
    from cnnviz.report.figures import gradcam_figures

    loaded, folder, selection = options.explained(run, "gradcam")
    chosen = gradcam_layer(loaded.model, layer)
    if layer is None:
        typer.echo(f"Grad-CAM on layer {chosen} (the last layer with a spatial output)")
    report_written(gradcam_figures(loaded.model, selection, folder, layer=chosen, guided=guided,
                                   target=target, output=options.output,
                                   save_arrays=options.save_arrays))


CamMethod = choices("CamMethod", 'gradcam', 'gradcam++', 'xgradcam', 'layercam', 'hirescam',
                    'scorecam', 'eigencam', 'all')


@command("cam")
@takes_model(images="0:8", arrays=True, shard=True)
def cam_command(
    run: RunArgument,
    options: ImageOptions,
    method: Annotated[
        CamMethod, typer.Option(help="CAM variant; `all` draws every one in a row.")
    ] = CamMethod.all,
    layer: LayerOption = None,
    target: TargetOption = None,
) -> None:
    """The CAM family over the input (default: every variant in one row per image).

    gradcam, gradcam++, xgradcam, layercam, hirescam; scorecam (gradient-free, one forward pass
    per channel of the layer); eigencam (first principal component, class-agnostic).
    """
    from cnnviz.explain import CAM_METHODS, gradcam_layer
    from cnnviz.report.figures import cam_figures

    loaded, folder, selection = options.explained(run, "cam")
    chosen = gradcam_layer(loaded.model, layer)
    if layer is None:
        typer.echo(f"CAM on layer {chosen} (the last layer with a spatial output)")
    methods = CAM_METHODS if method is CamMethod.all else (method.value,)
    report_written(cam_figures(loaded.model, selection, folder, methods=methods, layer=chosen,
                               target=target, output=options.output,
                               save_arrays=options.save_arrays))


def _baseline(value: str) -> float | str:
    if value == "blur":
        return value
    try:
        return float(value)
    except ValueError:
        raise CnnvizError(
            f"--baseline {value!r} is neither a number (a pixel value, e.g. 0) nor 'blur'"
        ) from None


@command("integrated-gradients")
@takes_model(images="0:8", arrays=True, shard=True)
def integrated_gradients_command(
    run: RunArgument,
    options: ImageOptions,
    steps: Annotated[int, typer.Option(min=1, help="Trapezoid-rule intervals on the path.")] = 64,
    baseline: Annotated[
        str, typer.Option(help="Where the path starts: a pixel value (0: black) or `blur`.")
    ] = "0",
    target: TargetOption = None,
) -> None:
    """Integrated gradients: signed, red for the class, blue against.

    Each figure states the completeness check: the attributions' sum beside
    score(image) - score(baseline), which it must equal up to the integration error.
    """
    from cnnviz.report.figures import signed_figures

    start = _baseline(baseline)
    options.draw(run, "integrated-gradients", signed_figures,
                 methods=("integrated_gradients",), steps=steps, baseline=start, target=target)


@command("gradient-x-input")
@takes_model(images="0:8", arrays=True, shard=True)
def gradient_x_input_command(
    run: RunArgument,
    options: ImageOptions,
    target: TargetOption = None,
) -> None:
    """Gradient x input (signed; red for the class, blue against)."""
    from cnnviz.report.figures import signed_figures

    options.draw(run, "gradient-x-input", signed_figures, methods=("gradient_x_input",),
                 target=target)


@command("rise")
@takes_model(images="0:8", arrays=True, shard=True, forward_only=True)
def rise_command(
    run: RunArgument,
    options: ImageOptions,
    masks: Annotated[
        int, typer.Option(min=1, help="Random masks (one forward pass each, per image).")
    ] = 2000,
    cell: Annotated[int, typer.Option(min=1, help="Grid cells per side before upsampling.")] = 7,
    keep: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Probability a grid cell is kept.")
    ] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the masks.")] = 0,
    target: TargetOption = None,
) -> None:
    """RISE (Petsiuk et al. 2018): the class probability over random masks, a black-box map."""
    from cnnviz.report.figures import rise_figures

    options.draw(run, "rise", rise_figures, masks=masks, cell=cell, keep=keep, seed=seed,
                 target=target)


@command("occlusion")
@takes_model(images="0:8", arrays=True, shard=True, forward_only=True)
def occlusion_command(
    run: RunArgument,
    options: ImageOptions,
    patch: Annotated[int, typer.Option(min=1, help="Side of the square patch, in pixels.")] = 4,
    stride: Annotated[
        int | None, typer.Option(min=1, help="Step between patches (default: patch).")
    ] = None,
    fill: Annotated[
        float,
        typer.Option(help="Patch value as a share of the model's input range: 0 black, "
                     "0.5 mid-grey, 1 white."),
    ] = 0.5,
    target: TargetOption = None,
) -> None:
    """Occlusion sensitivity: the class probability as a patch covers each place."""
    from cnnviz.report.figures import occlusion_figures

    options.draw(run, "occlusion", occlusion_figures, patch=patch, stride=stride, fill=fill,
                 target=target)


@command("feature-maps")
@takes_model(images="0:2", arrays=True, shard=True)
def feature_maps_command(
    run: RunArgument,
    options: ImageOptions,
    layer: Annotated[
        list[str] | None,
        typer.Option("--layer", help="Layer(s) to show, by path or unique name (default: every "
                     "Conv2D and SeparableConv2D layer, inside nested models too)."),
    ] = None,
    max_channels: Annotated[
        int,
        typer.Option("--max-channels", min=1,
                     help="Channels per layer and image: the most active first."),
    ] = 64,
) -> None:
    """The feature maps (activations) of conv layers for chosen images."""
    from cnnviz.report.figures import conv_layer_names, feature_map_figures

    loaded, folder, selection = options.explained(run, "feature-maps")
    layers = layer or conv_layer_names(loaded.model)
    report_written(feature_map_figures(loaded.model, selection, folder, layers=layers,
                                       max_channels=max_channels, output=options.output,
                                       save_arrays=options.save_arrays))


@command("filters")
@takes_model(inputs=False, arrays=True)
def filters_command(
    run: RunArgument,
    options: ImageOptions,
    layer: Annotated[
        list[str] | None,
        typer.Option("--layer", help="Conv layer(s), by path or unique name (default: every "
                     "Conv2D, DepthwiseConv2D and SeparableConv2D layer, inside nested models "
                     "too)."),
    ] = None,
) -> None:
    """The learned convolution kernels of each conv layer (depthwise ones too)."""
    from cnnviz.report.figures import filter_figures, kernel_layer_names

    loaded = options.load(run)
    folder = options.folder(loaded, run, "filters")
    report_written(filter_figures(loaded.model, folder,
                                  layers=layer or kernel_layer_names(loaded.model),
                                  save_arrays=options.save_arrays))


@command("activation-max")
@takes_model(images=None, arrays=True, images_help=ACTIVATION_MAX_IMAGES)
def activation_max_command(
    run: RunArgument,
    options: ImageOptions,
    layer: Annotated[
        str | None,
        typer.Option("--layer", help="A conv layer: maximize its filters instead of the classes."),
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option("--classes", help="Classes to synthesize: `all`, `0:10`, `3,5` (default: "
                     "those predicted for --images, else the first 10)."),
    ] = None,
    filters: FiltersOption = None,
    steps: Annotated[int, typer.Option(min=1, help="Gradient-ascent steps.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the starting noise.")] = 0,
    param: Annotated[
        Parameterization,
        typer.Option("--param", help="What the ascent changes: pixel, or fft (a 1/f-scaled "
                     "Fourier spectrum, colours decorrelated; Olah et al. 2017). auto: pixel, "
                     "whose class images transfer to another model at least as well "
                     "(bench/feature_vis.py)."),
    ] = Parameterization.auto,
    transforms: Annotated[
        str | None,
        typer.Option("--transforms", help="Random transforms before each step, in order: "
                     "pad,jitter,scale,rotate (any of them)."),
    ] = None,
) -> None:
    """Activation maximization: synthesize the input each class (or filter) responds to most."""
    from cnnviz.model.outputs import get_layer, output_index
    from cnnviz.report.figures import activation_max_figure, predicted_classes
    from cnnviz.report.selection import class_names_of, input_mode, parse_class_spec, parse_indices

    loaded = options.load(run)
    folder = options.folder(loaded, run, "activation-max")
    index = output_index(loaded.model, options.output)
    class_names = class_names_of(loaded, int(loaded.model.outputs[index].shape[-1]))
    if layer is not None:
        count = int(get_layer(loaded.model, layer).output.shape[-1])
        indices = (parse_indices(filters, count, option="--filters",
                                 domain=f"{layer}'s {count} filters") if filters else None)
    elif filters is not None:  # without --layer, --filters indexes the classes (as --classes)
        indices = parse_indices(filters, len(class_names), option="--filters",
                                domain=f"the model's {len(class_names)} classes")
    elif classes is not None:
        indices = parse_class_spec(classes, len(class_names))
    elif options.images is not None:
        selection = options.select(loaded)
        indices = predicted_classes(loaded.model, selection.images, output=index)
        typer.echo(f"activation maximization of the predicted classes {indices}")
    else:
        indices = None
    # A bare model file: optimize in the range its inputs have (--preprocess, keras:NAME's own).
    mode = input_mode(loaded, options.preprocess)[0] if loaded.config is None else None
    report_written([activation_max_figure(loaded.model, folder, class_names=class_names,
                                          layer=layer, indices=indices, steps=steps, seed=seed,
                                          output=index, preprocess=mode,
                                          save_arrays=options.save_arrays,
                                          param=None if param.value == "auto" else param.value,
                                          transforms=_transform_names(transforms))])


def _transform_names(spec: str | None) -> tuple[str, ...]:
    return () if spec is None else tuple(part.strip() for part in spec.split(",") if part.strip())


EXEMPLAR_IMAGES = ("The data set ranked: test-split indices (default: the whole test split) or "
                   "image files (a folder, a glob, comma-separated paths), streamed in chunks.")


@command("exemplars")
@takes_model(images=None, images_help=EXEMPLAR_IMAGES)
def exemplars_command(
    run: RunArgument,
    options: ImageOptions,
    layer: Annotated[
        list[str] | None,
        typer.Option("--layer", help="Conv layer(s) whose filters are ranked, one grid each "
                     "(by path or unique name)."),
    ] = None,
    filters: FiltersOption = None,
    classes: Annotated[
        str | None,
        typer.Option("--classes", help="Classes ranked by score: `all`, `0:10`, `3,5` "
                     "(default without --layer: the first 10)."),
    ] = None,
    top: Annotated[int, typer.Option(min=1, help="Images per unit (the grid's columns).")] = 9,
    with_synthetic: Annotated[
        bool, typer.Option("--with-synthetic", help="Head each row with the unit's "
                           "activation-maximization image.")
    ] = False,
    steps: Annotated[int, typer.Option(min=1, help="--with-synthetic: ascent steps.")] = 256,
    seed: Annotated[int, typer.Option(help="--with-synthetic: seed of the noise.")] = 0,
) -> None:
    """The images that activate each filter (or class) most: for a filter, the crop under the
    receptive field of its most active position; one grid per layer, a JSON beside it."""
    from cnnviz.model.outputs import output_index
    from cnnviz.report.exemplars import exemplar_figures
    from cnnviz.report.selection import class_names_of, input_mode, parse_class_spec

    if filters is not None and not layer:
        raise CnnvizError("--filters chooses filters of a --layer; give --layer (or --classes)")
    loaded = options.load(run)
    if options.images is None and loaded.config is None:
        raise CnnvizError(f"{run} has no test split: give --images (a folder, a glob or files)")
    folder = options.folder(loaded, run, "exemplars")
    selection = options.select(loaded, options.images or ":")
    count = len(class_names_of(loaded, int(loaded.model.outputs[
        output_index(loaded.model, options.output)].shape[-1])))
    chosen = (parse_class_spec(classes, count) if classes is not None
              else None if layer else list(range(min(count, 10))))
    mode = input_mode(loaded, options.preprocess)[0] if loaded.config is None else None
    report_written(exemplar_figures(loaded.model, selection, folder, layers=layer or (),
                                    filters=filters, classes=chosen, top=top,
                                    with_synthetic=with_synthetic, steps=steps, seed=seed,
                                    output=options.output, preprocess=mode))


@command("layers")
def layers_command(
    source: ModelSourceArgument,
    set_: SetOption = None,
) -> None:
    """List every layer path (nested models opened) with its type, output shape and parameters,
    and which commands can show it (gradcam, feature-maps, filters)."""
    from cnnviz.explain.layers import format_layer_table, layer_table

    model = _model_of(source, set_)
    typer.echo(f"{model.name}: {len(model.inputs)} input(s), {len(model.outputs)} output(s)")
    typer.echo(format_layer_table(layer_table(model)))


def _model_of(source: Path, overrides: list[str] | None):
    """The model of a run directory, a .keras file, or a config (untrained, built offline)."""
    if source.suffix in (".yaml", ".yml"):
        resolved = load_config_file(source, overrides)
        import_keras()
        from cnnviz.model.summary import model_from_config

        return model_from_config(resolved)
    import_keras()
    from cnnviz.runs.load import load_run, require_keras

    run = load_run(source)
    require_keras(run, "layers")
    return run.model
