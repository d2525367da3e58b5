"""What every `cnnviz` command shares: the Typer app, the option declarations, error handling.

Heavy imports (TensorFlow, Keras, matplotlib) happen inside the commands, so `cnnviz --help`
stays instant. Problems the user can fix are raised as `CnnvizError` by the library and printed
here as one line each, exit code 2, no traceback.
"""

from __future__ import annotations

import functools
import os
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cnnviz.errors import CnnvizError, CnnvizNotice, CnnvizWarning

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
        help="Test-split indices (`0,3,7`, `0:500`), or image files: comma-separated paths, a "
        "folder (every image in it) or a glob (`photos/*.jpg`; quote it).",
    ),
]


def fail(message: str) -> None:
    """Print each line of `message` as `error: ...` on stderr and exit 2."""
    for line in message.splitlines():
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(USER_ERROR)


_PYTHON_SHOWWARNING = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """cnnviz's own warnings as one line on stderr (`warning: ...` / `note: ...`)."""
    if issubclass(category, CnnvizWarning):
        prefix = "note" if issubclass(category, CnnvizNotice) else "warning"
        typer.echo(f"{prefix}: {message}", err=True)
    else:
        _PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


def command(*args, typer_app: typer.Typer = app, **kwargs):
    """Register a command whose `CnnvizError`s become one-line messages and exit code 2, and
    whose `CnnvizWarning`s are printed once each as one line."""

    def register(function):
        @functools.wraps(function)
        def wrapper(*call_args, **call_kwargs):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("once", CnnvizWarning)
                    warnings.showwarning = _show_warning
                    return function(*call_args, **call_kwargs)
            except CnnvizError as error:
                fail(str(error))
            except OSError as error:  # a file the library does not write itself (one line too)
                where = f"{error.filename}: " if error.filename else ""
                fail(f"{where}{error.strerror or error}")
            except KeyboardInterrupt:
                typer.echo("interrupted", err=True)
                raise typer.Exit(130) from None

        return typer_app.command(*args, **kwargs)(wrapper)

    return register


def writable_out(out: Path | None, default: Path) -> Path:
    """The folder to write into (`--out`, else `default`), refused at once (before any work)
    when it is a file or lies on a read-only or forbidden place."""
    folder = out if out is not None else default
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    option = f"--out {out}" if out is not None else f"output folder {folder}"
    if not existing.is_dir():
        fail(f"{option}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"{option}: cannot write in {existing} (read-only or permission denied); "
             "use --out with a writable folder")
    return folder


def import_tensorflow() -> None:
    from cnnviz._quiet import import_tensorflow_quietly

    import_tensorflow_quietly()


def load_config_file(path: Path, overrides: list[str] | None):
    from cnnviz.config import load_config

    return load_config(path, overrides or [])


TargetOption = Annotated[
    int | None, typer.Option("--target", help="Class to explain (default: the predicted one).")
]
LayerOption = Annotated[
    str | None,
    typer.Option("--layer", help="Layer: a path through nested models (base/conv1) or a name "
                                 "unique in the model; `cnnviz layers` lists them."),
]
OutputOption = Annotated[
    str | None,
    typer.Option("--output", help="Which output of a multi-output model: its name or index "
                                  "(the error for a multi-output model lists them)."),
]


class Preprocess(str, Enum):
    auto = "auto"
    scale = "scale"
    unit = "unit"
    caffe = "caffe"
    torch = "torch"
    none = "none"


class Resize(str, Enum):
    stretch = "stretch"
    crop = "crop"
    pad = "pad"


PreprocessOption = Annotated[
    Preprocess,
    typer.Option("--preprocess", help=(
        "Bare .keras files: how image files become inputs. auto: raw 0..255 if the model "
        "begins with Rescaling/Normalization, else scale; scale: x/255; unit: [-1, 1]; caffe, "
        "torch: keras.applications' modes; none: raw 0..255. Run directories use their own.")),
]
ResizeOption = Annotated[
    Resize,
    typer.Option("--resize", help=(
        "Image files to the model's size: stretch (ignore the aspect ratio), crop (centre "
        "crop to it, Keras's smart_resize) or pad (black borders).")),
]
ModelSourceArgument = Annotated[
    Path, typer.Argument(help="A run directory, a .keras file, or a config (.yaml: untrained model).")
]


def run_and_folder(source: Path, out: Path | None, command_name: str):
    import_tensorflow()
    from cnnviz.runs import load_run

    run = load_run(source)
    if out is not None:
        return run, writable_out(out, out)
    if run.directory is not None:
        return run, run.directory / "figures" / command_name
    return run, Path("outputs") / "figures" / source.stem / command_name


def report_written(figure_files) -> None:
    for figure_file in figure_files:
        typer.echo(f"wrote {figure_file.path}")


def print_report(report) -> None:
    typer.echo(report.text)
    for figure_file in report.figures:
        typer.echo(f"wrote {figure_file.path}")
    typer.echo(f"wrote {report.data_file}")
