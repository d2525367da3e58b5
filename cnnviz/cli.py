"""The `cnnviz` command line: one thin function per subcommand.

Heavy imports (TensorFlow, Keras, matplotlib) happen inside the commands, so `cnnviz --help`
stays instant. Problems the user can fix are raised as `CnnvizError` by the library and printed
here as one line each, exit code 2, no traceback.
"""

from __future__ import annotations

import functools
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cnnviz.errors import CnnvizError

app = typer.Typer(
    name="cnnviz",
    help="Train Keras CNNs from one YAML file and see, in verified pictures, what they learned.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect config files.", no_args_is_help=True)
app.add_typer(config_app, name="config")

USER_ERROR = 2

# Shared option declarations (one definition, used by every command that takes them).
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: --set train.epochs=3 (repeatable)."),
]
OutOption = Annotated[
    Path | None, typer.Option("--out", help="Folder to write into (default: see each command).")
]
ConfigArgument = Annotated[Path, typer.Argument(help="A YAML config file, e.g. configs/digits.yaml.")]
RunArgument = Annotated[
    Path, typer.Argument(help="A run directory (outputs/<name>/<timestamp>) or a .keras file.")
]
ImagesOption = Annotated[
    str,
    typer.Option(
        "--images",
        help="Test-split indices (`0,3,7`, `0:500`) or image files (comma-separated paths).",
    ),
]


def _fail(message: str) -> None:
    for line in message.splitlines():
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(USER_ERROR)


def command(*args, typer_app: typer.Typer = app, **kwargs):
    """Register a command whose `CnnvizError`s become one-line messages and exit code 2."""

    def register(function):
        @functools.wraps(function)
        def wrapper(*call_args, **call_kwargs):
            try:
                return function(*call_args, **call_kwargs)
            except CnnvizError as error:
                _fail(str(error))
            except KeyboardInterrupt:
                typer.echo("interrupted", err=True)
                raise typer.Exit(130) from None

        return typer_app.command(*args, **kwargs)(wrapper)

    return register


def _tensorflow() -> None:
    from cnnviz._quiet import import_tensorflow_quietly

    import_tensorflow_quietly()


def _config(path: Path, overrides: list[str] | None):
    from cnnviz.config import load_config

    return load_config(path, overrides or [])


# ------------------------------------------------------------------------------- foundation
@command("train")
def train_command(config: ConfigArgument, out: OutOption = None, set_: SetOption = None) -> None:
    """Train the model a config describes into outputs/<name>/<timestamp>.

    Re-running the same command after an interrupted run resumes it from its last finished epoch.
    """
    resolved = _config(config, set_)
    _tensorflow()
    from cnnviz.train import train

    result = train(resolved, out or Path("outputs"))
    _print_training(result)


def _print_training(result) -> None:
    metrics = result.metrics
    typer.echo(
        f"test accuracy {metrics['test_accuracy']:.4f}, test loss {metrics['test_loss']:.4f}, "
        f"{metrics['epochs']} epochs in {metrics['seconds']:.1f} s on {metrics['device']}"
    )
    if not result.chief:  # a multi-worker run's other workers write only a temporary folder
        return
    for name in ("config.yaml", "model.keras", "history.csv", "metrics.json", "curves.png"):
        typer.echo(f"wrote {result.run_dir / name}")


@config_app.command("show")
def config_show(config: ConfigArgument, set_: SetOption = None) -> None:
    """Print the full config with every default filled in."""
    try:
        from cnnviz.config import dump_config

        typer.echo(dump_config(_config(config, set_)), nl=False)
    except CnnvizError as error:
        _fail(str(error))


@command("summary")
def summary_command(
    target: Annotated[Path, typer.Argument(help="A config (.yaml), a run directory or a .keras file.")],
    out: OutOption = None,
    set_: SetOption = None,
) -> None:
    """Print the Keras summary; write summary.txt and architecture.png (Graphviz).

    On a config it builds the untrained model and downloads nothing. Default folder: the run
    directory, or outputs/<name>/summary for a config.
    """
    from cnnviz.summary import write_summary

    if target.suffix in (".yaml", ".yml"):
        resolved = _config(target, set_)
        _tensorflow()
        from cnnviz.summary import model_from_config

        model = model_from_config(resolved)
        folder = out or Path("outputs") / (resolved.name or target.stem) / "summary"
    else:
        _tensorflow()
        from cnnviz.runs import load_run

        run = load_run(target)
        model = run.model
        folder = out or (run.directory or Path("outputs") / target.stem / "summary")
    result = write_summary(model, folder)
    typer.echo(result.text)
    typer.echo(f"wrote {result.summary_file}")
    if result.architecture_file is not None:
        typer.echo(f"wrote {result.architecture_file}")
    else:
        typer.echo(result.graphviz_problem, err=True)


# ------------------------------------------------------------------------------ visualization
class SaliencyMethod(str, Enum):
    vanilla = "vanilla"
    guided = "guided"
    rectified = "rectified"
    smoothgrad = "smoothgrad"
    all = "all"


TargetOption = Annotated[
    int | None, typer.Option("--target", help="Class to explain (default: the predicted one).")
]
LayerOption = Annotated[
    str | None, typer.Option("--layer", help="Layer name (see `cnnviz summary`).")
]


def _run_and_folder(source: Path, out: Path | None, command_name: str):
    _tensorflow()
    from cnnviz.runs import load_run

    run = load_run(source)
    if out is not None:
        return run, out
    if run.directory is not None:
        return run, run.directory / "figures" / command_name
    return run, Path("outputs") / "figures" / source.stem / command_name


def _report(figure_files) -> None:
    for figure_file in figure_files:
        typer.echo(f"wrote {figure_file.path}")


@command("saliency")
def saliency_command(
    run: RunArgument,
    images: ImagesOption = "0:8",
    method: Annotated[SaliencyMethod, typer.Option(help="Gradient rule; `all` draws every one in a row.")] = SaliencyMethod.all,
    samples: Annotated[int, typer.Option(min=1, help="SmoothGrad: noisy copies per image.")] = 20,
    noise: Annotated[float, typer.Option(min=0.0, help="SmoothGrad: noise std as a share of the image's range.")] = 0.15,
    target: TargetOption = None,
    seed: Annotated[int, typer.Option(help="SmoothGrad noise seed.")] = 0,
    out: OutOption = None,
) -> None:
    """Saliency maps: |d score / d pixel|, vanilla, guided, rectified (deconvnet) or SmoothGrad."""
    from cnnviz.explain import SALIENCY_METHODS
    from cnnviz.figures import saliency_figures, select_images

    loaded, folder = _run_and_folder(run, out, "saliency")
    methods = SALIENCY_METHODS if method is SaliencyMethod.all else (method.value,)
    selection = select_images(loaded, images)
    _report(saliency_figures(loaded.model, selection, folder, methods=methods, target=target,
                             samples=samples, noise=noise, seed=seed))


@command("gradcam")
def gradcam_command(
    run: RunArgument,
    images: ImagesOption = "0:8",
    layer: LayerOption = None,
    guided: Annotated[bool, typer.Option("--guided", help="Also draw Guided Grad-CAM.")] = False,
    target: TargetOption = None,
    out: OutOption = None,
) -> None:
    """Grad-CAM heatmaps over the input (default layer: the last conv/pool layer)."""
    from cnnviz.explain import gradcam_layer
    from cnnviz.figures import gradcam_figures, select_images

    loaded, folder = _run_and_folder(run, out, "gradcam")
    chosen = gradcam_layer(loaded.model, layer)
    if layer is None:
        typer.echo(f"Grad-CAM on layer {chosen} (the last layer with a spatial output)")
    selection = select_images(loaded, images)
    _report(gradcam_figures(loaded.model, selection, folder, layer=chosen, guided=guided,
                            target=target))


@command("occlusion")
def occlusion_command(
    run: RunArgument,
    images: ImagesOption = "0:8",
    patch: Annotated[int, typer.Option(min=1, help="Side of the square patch, in pixels.")] = 4,
    stride: Annotated[int | None, typer.Option(min=1, help="Step between patches (default: patch).")] = None,
    fill: Annotated[float, typer.Option(help="Value the patch is filled with.")] = 0.5,
    target: TargetOption = None,
    out: OutOption = None,
) -> None:
    """Occlusion sensitivity: the class probability as a patch covers each place."""
    from cnnviz.figures import occlusion_figures, select_images

    loaded, folder = _run_and_folder(run, out, "occlusion")
    selection = select_images(loaded, images)
    _report(occlusion_figures(loaded.model, selection, folder, patch=patch, stride=stride,
                              fill=fill, target=target))


@command("feature-maps")
def feature_maps_command(
    run: RunArgument,
    images: ImagesOption = "0:2",
    layer: Annotated[list[str] | None, typer.Option("--layer", help="Layer(s) to show (default: every Conv2D layer).")] = None,
    out: OutOption = None,
) -> None:
    """The feature maps (activations) of conv layers for chosen images."""
    from cnnviz.figures import conv_layer_names, feature_map_figures, select_images

    loaded, folder = _run_and_folder(run, out, "feature-maps")
    layers = layer or conv_layer_names(loaded.model)
    selection = select_images(loaded, images)
    _report(feature_map_figures(loaded.model, selection, folder, layers=layers))


@command("filters")
def filters_command(
    run: RunArgument,
    layer: Annotated[list[str] | None, typer.Option("--layer", help="Conv layer(s) (default: all).")] = None,
    out: OutOption = None,
) -> None:
    """The learned convolution kernels of each Conv2D layer."""
    from cnnviz.figures import conv_layer_names, filter_figures

    loaded, folder = _run_and_folder(run, out, "filters")
    _report(filter_figures(loaded.model, folder, layers=layer or conv_layer_names(loaded.model)))


@command("activation-max")
def activation_max_command(
    run: RunArgument,
    layer: Annotated[str | None, typer.Option("--layer", help="A conv layer: maximize its filters instead of the classes.")] = None,
    filters: Annotated[str | None, typer.Option("--filters", help="Filter (or class) indices: 0,1,2 or 0:8.")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Gradient-ascent steps.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the starting noise.")] = 0,
    out: OutOption = None,
) -> None:
    """Activation maximization: synthesize the input each class (or filter) responds to most."""
    from cnnviz.figures import activation_max_figure, class_names_of, parse_indices

    loaded, folder = _run_and_folder(run, out, "activation-max")
    class_names = class_names_of(loaded, int(loaded.model.outputs[0].shape[-1]))
    if layer is None:
        count = len(class_names)
    else:
        from cnnviz.explain._common import get_layer

        count = int(get_layer(loaded.model, layer).output.shape[-1])
    indices = parse_indices(filters, count) if filters else None
    _report([activation_max_figure(loaded.model, folder, class_names=class_names, layer=layer,
                                   indices=indices, steps=steps, seed=seed)])


def _trust_sections(run, folder: Path):
    """Sanity, faithfulness and (for data with a spurious cue) the shortcut report."""
    from cnnviz.figures import faithfulness_report, sanity_report, select_images, shortcut_files

    checks = select_images(run, "0:32")
    reports = [("Sanity checks: model randomization (Adebayo et al. 2018)",
                sanity_report(run.model, checks, folder / "sanity")),
               ("Faithfulness: deletion and insertion", 
                faithfulness_report(run.model, checks, folder / "faithfulness"))]
    if run.config is not None and run.config.data.source == "shapes" and run.config.data.shapes.spurious:
        reports.append(("Shortcut detector", shortcut_files(run, folder / "shortcut")))
    for heading, report in reports:
        typer.echo(f"\n{heading}\n{report.text}")
    return [(heading, report.figures) for heading, report in reports]


@command("run")
def run_command(
    config: ConfigArgument,
    out: OutOption = None,
    set_: SetOption = None,
    images: Annotated[
        str | None,
        typer.Option("--images", help="Test images to explain (default: the first of each class)."),
    ] = None,
) -> None:
    """Train, then write every figure for a sample of test images and an index.html of them all."""
    from cnnviz.figures import FigureFile, all_figures, one_per_class, select_images, write_index
    from cnnviz.runs import load_run
    from cnnviz.summary import write_summary

    resolved = _config(config, set_)
    _tensorflow()
    from cnnviz.train import train

    result = train(resolved, out or Path("outputs"))
    _print_training(result)
    run = load_run(result.run_dir)
    folder = result.run_dir / "figures"
    summary = write_summary(run.model, result.run_dir)
    if summary.graphviz_problem:
        typer.echo(summary.graphviz_problem, err=True)
    spec = images or one_per_class(run.dataset().y_test)
    selection = select_images(run, spec)
    sections = [("Training", [FigureFile(result.run_dir / "curves.png",
                                         "Loss and accuracy per epoch, train vs validation")]
                 + ([FigureFile(summary.architecture_file, "Architecture")]
                    if summary.architecture_file else []))]
    sections += all_figures(run, selection, folder)
    sections += _trust_sections(run, folder)
    metrics = result.metrics
    title = (f"cnnviz run {result.run_dir.parent.name}/{result.run_dir.name}: test accuracy "
             f"{metrics['test_accuracy']:.4f} after {metrics['epochs']} epochs")
    index = write_index(result.run_dir, title, sections)
    count = sum(len(figures) for _, figures in sections)
    typer.echo(f"wrote {count} figures under {folder}")
    typer.echo(f"wrote {index}")


# -------------------------------------------------------------------------------------- trust
ModelSourceArgument = Annotated[
    Path, typer.Argument(help="A run directory, a .keras file, or a config (.yaml: untrained model).")
]


def _model_and_images(source: Path, images: str, overrides: list[str] | None):
    """(model, images, what the images are) for a run, a .keras file or a config.

    A config builds its untrained model; its images are the test split where the data is at
    hand offline, else seeded uniform noise (the check is about arithmetic, not accuracy).
    """
    import numpy as np

    from cnnviz.figures import select_images
    from cnnviz.runs import Run, load_run

    if source.suffix in (".yaml", ".yml"):
        resolved = _config(source, overrides)
        _tensorflow()
        import keras

        from cnnviz.summary import model_from_config

        keras.utils.set_random_seed(resolved.seed)
        model = model_from_config(resolved)
        try:
            selection = select_images(Run(model, resolved, None), images)
            return model, selection.images, f"{len(selection.images)} test images"
        except CnnvizError as error:
            if "download" not in str(error):
                raise
            shape = tuple(int(size) for size in model.inputs[0].shape[1:])
            noise = np.random.default_rng(resolved.seed).uniform(size=(32, *shape))
            return model, noise.astype(np.float32), "32 uniform-noise images (data not available offline)"
    _tensorflow()
    run = load_run(source)
    selection = select_images(run, images)
    return run.model, selection.images, f"{len(selection.images)} images"


@command("verify")
def verify_command(
    source: ModelSourceArgument,
    images: ImagesOption = "0:32",
    tolerance: Annotated[float, typer.Option(help="Largest allowed |numpy - keras| per layer.")] = 1e-4,
    explain: Annotated[
        bool, typer.Option("--explain", help="Write one image's forward pass out step by step.")
    ] = False,
    set_: SetOption = None,
) -> None:
    """Recompute the forward pass in plain numpy and compare it with Keras, layer by layer.

    Exits 1 when a layer differs by more than --tolerance or cannot be recomputed.
    """
    from cnnviz.reference import explain_steps, format_table, verify

    model, batch, described = _model_and_images(source, images, set_)
    if explain:
        typer.echo(explain_steps(model, batch[0]))
        return
    report = verify(model, batch, tolerance=tolerance)
    typer.echo(f"{model.name}: numpy reference vs Keras on {described}")
    typer.echo(format_table(report))
    if not report.ok:
        raise typer.Exit(1)


class Baseline(str, Enum):
    blur = "blur"
    zero = "zero"
    mean = "mean"


def _print_report(report) -> None:
    typer.echo(report.text)
    for figure_file in report.figures:
        typer.echo(f"wrote {figure_file.path}")
    typer.echo(f"wrote {report.data_file}")


@command("sanity")
def sanity_command(
    run: RunArgument,
    images: ImagesOption = "0:32",
    seed: Annotated[int, typer.Option(help="Seed of the re-initialized weights.")] = 0,
    out: OutOption = None,
) -> None:
    """Sanity checks for saliency maps (Adebayo et al. 2018): model randomization, class change.

    Flags a method whose maps barely change when the weights are destroyed, or when a different
    class is explained.
    """
    from cnnviz.figures import sanity_report, select_images

    loaded, folder = _run_and_folder(run, out, "sanity")
    _print_report(sanity_report(loaded.model, select_images(loaded, images), folder, seed=seed))


@command("faithfulness")
def faithfulness_command(
    run: RunArgument,
    images: ImagesOption = "0:32",
    steps: Annotated[int, typer.Option(min=2, help="Points on each deletion/insertion curve.")] = 20,
    baseline: Annotated[Baseline, typer.Option(help="What deleted pixels become.")] = Baseline.blur,
    seed: Annotated[int, typer.Option(help="Seed of the random-order baseline.")] = 0,
    out: OutOption = None,
) -> None:
    """Deletion and insertion scores per method against a random pixel order."""
    from cnnviz.figures import faithfulness_report, select_images

    loaded, folder = _run_and_folder(run, out, "faithfulness")
    selection = select_images(loaded, images)
    _print_report(faithfulness_report(loaded.model, selection, folder, steps=steps,
                                      baseline=baseline.value, seed=seed))


@command("shortcut")
def shortcut_command(
    run: RunArgument,
    count: Annotated[int, typer.Option(min=1, help="Training images to explain.")] = 64,
    out: OutOption = None,
) -> None:
    """Does the model use the spurious cue? Attribution on the cue vs its area (shapes data)."""
    from cnnviz.figures import shortcut_files

    loaded, folder = _run_and_folder(run, out, "shortcut")
    _print_report(shortcut_files(loaded, folder, count=count))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
