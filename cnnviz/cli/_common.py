"""What every `cnnviz` command shares: the Typer app, the option declarations, error handling.

Heavy imports (TensorFlow, Keras, matplotlib) happen inside the commands, so `cnnviz --help`
stays instant. Problems the user can fix are raised as `CnnvizError` by the library and printed
here as one line each, exit code 2, no traceback.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
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

# Exit codes: 0 all good; 1 a quality gate failed (an --expect, verify over its tolerance,
# an export that does not match its model); 2 bad input (nothing was judged); 130 interrupted.
GATE_FAILED = 1
USER_ERROR = 2

# Shared option declarations (one definition, used by every command that takes them).
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: --set train.epochs=3 (repeatable)."),
]
OutOption = Annotated[
    Path | None, typer.Option("--out", help="Folder to write into (default: see each command).")
]
ConfigArgument = Annotated[
    Path, typer.Argument(help="A YAML config file, e.g. configs/digits.yaml.")
]
RunArgument = Annotated[
    Path,
    typer.Argument(help="A run directory (outputs/<name>/<timestamp>), a .keras or .h5 model "
                   "file, or keras:NAME (a keras.applications model with ImageNet weights)."),
]
JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Print one JSON object on stdout (metrics, expectations, files, "
                 "timings); all human-readable text goes to stderr."),
]
JunitOption = Annotated[
    Path | None,
    typer.Option("--junit", dir_okay=False, help="Write a JUnit XML report (one test case per "
                 "expectation and per check) to this file, for CI test views."),
]
ExpectOption = Annotated[
    list[str] | None,
    typer.Option("--expect", help="A quality gate, METRIC OP NUMBER: --expect "
                 "'test_accuracy>=0.95' (repeatable; adds to the config's `expect:`). A failed "
                 "one exits 1; metric names: README, \"Use in CI\"."),
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
    whose `CnnvizWarning`s are printed once each as one line.

    A command may return a dict: its JSON result. Its "exit_code" (default 0) becomes the
    process's. With `--json` (a `json_output` parameter) everything the command prints, Keras's
    progress included, goes to stderr, and stdout gets that dict as one JSON object (or, for a
    user error, {"ok": false, "exit_code": 2, "error": ...}).
    """
    name = args[0] if args else None

    def register(function):
        @functools.wraps(function)
        def wrapper(*call_args, **call_kwargs):
            as_json = bool(call_kwargs.get("json_output"))
            stdout = sys.stdout
            try:
                with warnings.catch_warnings(), (contextlib.redirect_stdout(sys.stderr)
                                                  if as_json else contextlib.nullcontext()):
                    warnings.simplefilter("once", CnnvizWarning)
                    warnings.showwarning = _show_warning
                    result = function(*call_args, **call_kwargs)
            except CnnvizError as error:
                if as_json:
                    _print_json(stdout, {"command": name or function.__name__, "ok": False,
                                         "exit_code": USER_ERROR, "error": str(error)})
                fail(str(error))
            except OSError as error:  # a file the library does not write itself (one line too)
                where = f"{error.filename}: " if error.filename else ""
                fail(f"{where}{error.strerror or error}")
            except KeyboardInterrupt:
                typer.echo("interrupted", err=True)
                raise typer.Exit(130) from None
            code = int(result.get("exit_code", 0)) if isinstance(result, dict) else 0
            if as_json and isinstance(result, dict):
                _print_json(stdout, {"command": name or function.__name__, "ok": code == 0,
                                     "exit_code": code, **result})
            if code:
                raise typer.Exit(code)

        return typer_app.command(*args, **kwargs)(wrapper)

    return register


def _print_json(stream, payload: dict) -> None:
    stream.write(json.dumps(_finite(payload), default=_json_default) + "\n")
    stream.flush()


def _finite(value):
    """NaN and infinities as null: strict JSON readers reject NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _json_default(value):
    """Paths as strings, numpy scalars and arrays as numbers and lists."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


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


def load_config_file(path: Path, overrides: list[str] | None, *, smoke: bool = False):
    """Load and validate a config with its --set overrides (after the --smoke preset's)."""
    from cnnviz.config.loading import load_config

    config = load_config(path, overrides or [])
    if not smoke:
        return config
    return load_config(path, smoke_overrides(config) + list(overrides or []))


# The --smoke preset (README, "Use in CI"): sizes a CI step can afford on 2 CPU cores.
SMOKE_TRAIN_IMAGES = 512
SMOKE_TEST_IMAGES = 256
SMOKE_FIGURE_IMAGES = 2
SMOKE_TRUST_IMAGES = 8
SMOKE_ACTIVATION_MAX_STEPS = 64
SmokeOption = Annotated[
    bool,
    typer.Option("--smoke", help=f"CI preset: a stratified subset ({SMOKE_TRAIN_IMAGES} training, "
                 f"{SMOKE_TEST_IMAGES} test images; change with --set data.limit=N --set "
                 "data.test_limit=N), one epoch, two images per figure."),
]


# Trust checks under --smoke: fast methods (and any an --expect names), not all of them.
SMOKE_TRUST_METHODS = ("saliency", "guided", "gradcam")


def smoke_trust_methods(expectations) -> tuple[str, ...]:
    """SMOKE_TRUST_METHODS plus every method a sanity/faithfulness/shortcut gate names."""
    named = [expectation.metric.split(".")[1] for expectation in expectations
             if expectation.metric.count(".") == 2
             and expectation.metric.split(".")[0] in ("sanity", "faithfulness", "shortcut")]
    return tuple(dict.fromkeys([*SMOKE_TRUST_METHODS,
                                *(name for name in named if name != "random")]))


def smoke_figure_options(model) -> dict:
    """`all_figures` options under --smoke: fewer activation-maximization steps, and filters and
    feature maps of the first and last conv layers only (drawing a grid per layer of a deep
    net costs more than the rest of a smoke run)."""
    from cnnviz.report.figures import conv_layer_names

    layers = conv_layer_names(model)
    return {"activation_max_steps": SMOKE_ACTIVATION_MAX_STEPS,
            "conv_layers": list(dict.fromkeys(layers[:1] + layers[-1:]))}


def smoke_overrides(config) -> list[str]:
    """--set overrides of the --smoke preset (never raising a smaller limit the config has)."""
    limit = min(config.data.limit or SMOKE_TRAIN_IMAGES, SMOKE_TRAIN_IMAGES)
    test_limit = min(config.data.test_limit or SMOKE_TEST_IMAGES, SMOKE_TEST_IMAGES)
    return [f"data.limit={limit}", f"data.test_limit={test_limit}", "train.epochs=1"]


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

    @property
    def share(self) -> tuple[int, int] | None:
        """--shard as (K, N), or None."""
        from cnnviz.report.selection import parse_shard

        return None if self.shard is None else parse_shard(self.shard)

    def load(self, source: Path):
        """The run, .keras/.h5 file or keras:NAME model, with the --class-names given."""
        import_tensorflow()
        from cnnviz.report.selection import given_class_names
        from cnnviz.runs.load import load_run

        run = load_run(source, unsafe=self.unsafe, weights=self.weights)
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

    def preparation(self, run):
        """pixels -> model inputs for commands that stream image files (predict, evaluate)."""
        from cnnviz.report.selection import pixel_preparation

        if run.config is not None and self.preprocess != "auto":
            raise CnnvizError(f"--preprocess {self.preprocess} is for bare model files; a run "
                              "directory's model takes the pixels as it recorded")
        return pixel_preparation(run, self.preprocess)


REQUIRED = object()  # `takes_model(images=REQUIRED)`: --images has no default


def takes_model(*, images=False, inputs: bool = True, arrays: bool = False, out: bool = True,
                shard: bool = False, images_help: str = IMAGES_HELP):
    """Give a command the shared model and image options in place of its `options:
    ImageOptions` parameter.

    Args:
        images: --images' default ("0:8"; None: optional; REQUIRED; False: no --images).
        inputs: --output, --preprocess, --resize and --class-names (how images become inputs
            and classes become names); --weights and --unsafe come always.
        arrays: --save-arrays.
        out: --out.
        shard: --shard.
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

        @functools.wraps(function)
        def wrapper(**kwargs):
            given = {name: kwargs.pop(name) for name in names}  # Enum choices as their strings
            kwargs[bundle] = ImageOptions(**{name: getattr(value, "value", value)
                                             for name, value in given.items()})
            return function(**kwargs)

        wrapper.__signature__ = signature.replace(parameters=parameters)
        wrapper.__annotations__ = {parameter.name: parameter.annotation
                                   for parameter in parameters}
        return wrapper

    return decorate


def report_written(figure_files) -> None:
    for figure_file in figure_files:
        typer.echo(f"wrote {figure_file.path}")


def print_report(report) -> None:
    typer.echo(report.text)
    for figure_file in report.figures:
        typer.echo(f"wrote {figure_file.path}")
    typer.echo(f"wrote {report.data_file}")


def expectations_for(config, expect: list[str] | None, command_name: str):
    """The config's `expect:` plus `--expect`, every metric name checked before any work."""
    from cnnviz.ci.gates import check_names
    from cnnviz.config.expect import parse_expectations

    expectations = parse_expectations(expect, config.expect if config is not None else ())
    check_names(expectations, command=command_name, config=config)
    return expectations


def judge(expectations, values: dict, *, checks=(), junit: Path | None = None,
          properties: dict | None = None) -> dict:
    """Check the expectations, print their table, write the JUnit report.

    Returns:
        The JSON fields: "expectations" (one entry each), "checks" (every check with its
        verdict, as the JUnit report has it: `cnnviz.ci.gates.report_checks`), "exit_code" (1
        when an expectation failed) and "junit" (the file, if any).
    """
    from cnnviz.ci.gates import check_expectations, format_outcomes, report_checks

    outcomes = check_expectations(expectations, values)
    if outcomes:
        typer.echo("\n" + format_outcomes(outcomes))
    every_check = report_checks(outcomes, checks)
    result = {
        "expectations": [outcome.to_dict() for outcome in outcomes],
        "checks": [{"suite": check.suite, "name": check.name, "passed": check.passed,
                    "flagged": check.flagged, "message": check.message}
                   for check in every_check],
        "exit_code": GATE_FAILED if any(not outcome.passed for outcome in outcomes) else 0,
    }
    if junit is not None:
        from cnnviz.ci.junit import write_junit

        write_junit(junit, every_check, properties=properties)
        failed = sum(not check.passed for check in every_check)
        flagged = sum(check.flagged for check in every_check)
        typer.echo(f"wrote {junit} ({len(every_check)} test cases, {failed} failed, "
                   f"{flagged} flagged)")
        result["junit"] = str(junit)
    return result
