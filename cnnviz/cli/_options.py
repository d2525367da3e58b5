"""The model and image options of every command that reads a model and images, declared once:
`takes_model` gives a command `--images`, `--preprocess`, `--class-names`, `--weights`, ... as one
`ImageOptions`, so each option means the same on every command (tests/test_image_options.py)."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cnnviz.cli._common import OutOption, import_keras, report_written, writable_out

TargetOption = Annotated[
    int | None, typer.Option("--target", help="Class to explain (default: the predicted one).")
]
LayerOption = Annotated[
    str | None,
    typer.Option("--layer", help="Layer: a path through nested models (base/conv1) or a name "
                                 "unique in the model; `cnnviz layers` lists them."),
]
SaveArraysOption = Annotated[
    bool,
    typer.Option("--save-arrays", help="Also write each figure's numbers beside it, as "
                 "<figure>.npz: its maps by method name, `target` (the class explained) and "
                 "`probabilities` (README, \"Figure arrays\")."),
]
OutputOption = Annotated[
    str | None,
    typer.Option("--output", help="Which output of a multi-output model: its name or index "
                                  "(the error for a multi-output model lists them)."),
]


def choices(name: str, *values: str) -> type[Enum]:
    """A str Enum of option values for Typer (spelled out here so `--help` imports no library
    code; tests/test_cli.py checks each equals the library's list)."""
    return Enum(name, {value: value for value in values}, type=str)


Preprocess = choices("Preprocess", 'auto', 'scale', 'unit', 'caffe', 'torch', 'none')


Resize = choices("Resize", 'stretch', 'crop', 'pad')


PreprocessOption = Annotated[
    Preprocess,
    typer.Option("--preprocess", help=(
        "Bare model files: how image files become inputs. auto: keras:NAME's own mode; raw "
        "0..255 if the model begins with Rescaling/Normalization; else scale. scale: x/255; "
        "unit: [-1, 1]; caffe, torch: keras.applications' modes; none: raw 0..255. Run "
        "directories use their own.")),
]
ResizeOption = Annotated[
    Resize,
    typer.Option("--resize", help=(
        "Image files to the model's size: stretch (ignore the aspect ratio), crop (centre "
        "crop to it, Keras's smart_resize) or pad (black borders).")),
]
ModelSourceArgument = Annotated[
    Path,
    typer.Argument(help="A run directory, a .keras or .h5 file, keras:NAME, or a config (.yaml: "
                   "untrained model)."),
]


ClassNamesOption = Annotated[
    str | None,
    typer.Option("--class-names", help="Bare model files: the class names, in output order, as "
                 "`cat,dog,bird` or a text file with one per line. Run directories use their "
                 "own."),
]
WeightsOption = Annotated[
    Path | None,
    typer.Option("--weights", help="With keras:NAME: a local weights file (what "
                 "model.save_weights writes) instead of the ImageNet weights in Keras's cache."),
]
UnsafeOption = Annotated[
    bool,
    typer.Option("--unsafe", help="Load a model file that holds Python code (a Lambda layer): "
                 "only for files you trust, as loading runs that code."),
]
ShardOption = Annotated[
    str | None,
    typer.Option("--shard", help="K/N: do share K (0-based) of N of the inputs, for a job array "
                 "(Slurm, Kubernetes indexed jobs); the shares' outputs merge without clashes "
                 "(README, \"Batch work across machines\")."),
]
IMAGES_HELP = ("Test-split indices (`0,3,7`, `0:500`), or image files: comma-separated paths, a "
               "folder (every image in it) or a glob (`photos/*.jpg`; quote it).")


@dataclass(frozen=True)
class ImageOptions:
    """The options of every command that reads a model and images, as `takes_model` declares
    them: one definition, so `--preprocess` or `--class-names` mean the same everywhere."""

    images: str | None = None
    output: str | None = None
    preprocess: str = "auto"
    resize: str = "stretch"
    class_names: str | None = None
    weights: Path | None = None
    unsafe: bool = False
    save_arrays: bool = False
    out: Path | None = None
    shard: str | None = None
    forward_only: bool = False  # the command runs forward passes only: exported models too
    command: str = "this command"  # its name, for the refusal of an exported model

    @property
    def share(self) -> tuple[int, int] | None:
        """--shard as (K, N), or None."""
        from cnnviz.report.selection import parse_shard

        return None if self.shard is None else parse_shard(self.shard)

    def load(self, source: Path):
        """The run, .keras/.h5 file or keras:NAME model, with the --class-names given; an
        exported .tflite/.onnx/SavedModel only for a `forward_only` command."""
        import_keras()
        from cnnviz.report.selection import given_class_names
        from cnnviz.runs.load import load_run, require_keras

        run = load_run(source, unsafe=self.unsafe, weights=self.weights)
        if not self.forward_only:
            require_keras(run, self.command)
        if self.class_names is not None:
            run.class_names = given_class_names(run, self.class_names, output=self.output)
        return run

    def folder(self, run, source: Path, command_name: str) -> Path:
        """Where the command's files go: --out, else RUN/figures/<command>, else
        outputs/figures/<model name>/<command> for a bare model."""
        if self.out is not None:
            return writable_out(self.out, self.out)
        if run.directory is not None:
            return run.directory / "figures" / command_name
        stem = str(source).removeprefix("keras:") if str(source).startswith("keras:") else (
            Path(source).stem)
        return Path("outputs") / "figures" / stem / command_name

    def select(self, run, spec: str | None = None):
        """The images --images (or `spec`) names, read and prepared as the options say."""
        from cnnviz.report.selection import select_images

        return select_images(run, spec or self.images, output=self.output,
                             preprocess=self.preprocess, resize=self.resize, shard=self.share)

    def explained(self, source: Path, command_name: str):
        """(run, figure folder, Selection) of an explain command."""
        run = self.load(source)
        return run, self.folder(run, source, command_name), self.select(run)

    def draw(self, source: Path, command_name: str, figures, **options) -> None:
        """Write an explain command's figures: `figures(model, selection, folder, output=...,
        save_arrays=..., **options)` (a `cnnviz.report.figures` function), naming each file."""
        loaded, folder, selection = self.explained(source, command_name)
        report_written(figures(loaded.model, selection, folder, output=self.output,
                               save_arrays=self.save_arrays, **options))

    def preparation(self, run):
        """pixels -> model inputs for commands that stream image files (predict, evaluate)."""
        from cnnviz.report.selection import pixel_preparation, refuse_preprocess_for_a_run

        refuse_preprocess_for_a_run(run, self.preprocess)
        return pixel_preparation(run, self.preprocess)


REQUIRED = object()  # `takes_model(images=REQUIRED)`: --images has no default


def takes_model(*, images=False, inputs: bool = True, arrays: bool = False, out: bool = True,
                shard: bool = False, images_help: str = IMAGES_HELP, forward_only: bool = False):
    """Give a command the shared model and image options in place of its `options:
    ImageOptions` parameter.

    Args:
        images: --images' default ("0:8"; None: optional; REQUIRED; False: no --images).
        inputs: --output, --preprocess, --resize and --class-names (how images become inputs
            and classes become names); --weights and --unsafe come always.
        arrays: --save-arrays.
        out: --out.
        shard: --shard.
        forward_only: the command needs forward passes only, so it runs on exported models.
    """
    declared: list[tuple[str, object, object]] = []
    if images is not False:
        option = typer.Option("--images", help=images_help)
        declared.append(("images", Annotated[str | None, option],
                         inspect.Parameter.empty if images is REQUIRED else images))
    if inputs:
        declared += [("output", OutputOption, None),
                     ("preprocess", PreprocessOption, Preprocess.auto),
                     ("resize", ResizeOption, Resize.stretch),
                     ("class_names", ClassNamesOption, None)]
    declared += [("weights", WeightsOption, None), ("unsafe", UnsafeOption, False)]
    if arrays:
        declared.append(("save_arrays", SaveArraysOption, False))
    if out:
        declared.append(("out", OutOption, None))
    if shard:
        declared.append(("shard", ShardOption, None))

    def decorate(function):
        signature = inspect.signature(function, eval_str=True)
        parameters = []
        for parameter in signature.parameters.values():
            if parameter.annotation is ImageOptions:
                parameters += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                                 annotation=annotation, default=default)
                               for name, annotation, default in declared]
            else:
                parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))
        names = [name for name, _, _ in declared]
        (bundle,) = [parameter.name for parameter in signature.parameters.values()
                     if parameter.annotation is ImageOptions]
        command_name = function.__name__.removesuffix("_command").replace("_", "-")

        @functools.wraps(function)
        def wrapper(**kwargs):
            given = {name: kwargs.pop(name) for name in names}  # Enum choices as their strings
            kwargs[bundle] = ImageOptions(**{name: getattr(value, "value", value)
                                             for name, value in given.items()},
                                          forward_only=forward_only, command=command_name)
            return function(**kwargs)

        wrapper.__signature__ = signature.replace(parameters=parameters)
        wrapper.__annotations__ = {parameter.name: parameter.annotation
                                   for parameter in parameters}
        return wrapper

    return decorate
