"""What every `cnnviz` command shares: the Typer app, the option declarations, error handling.

Heavy imports (TensorFlow, Keras, matplotlib) happen inside the commands, so `cnnviz --help`
stays instant. Problems the user can fix are raised as `CnnvizError` by the library and printed
here as one line each, exit code 2, no traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cnnviz import backend
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

Backend = Enum("Backend", {name: name for name in backend.BACKENDS}, type=str)


@app.callback()
def _global_options(
    keras_backend: Annotated[
        Backend | None,
        typer.Option("--backend", help="The Keras backend to run on (default: KERAS_BACKEND, "
                     "else ~/.keras/keras.json, else tensorflow). Set before Keras is imported."),
    ] = None,
) -> None:
    # No docstring: Typer would show it in place of the app's help.
    if keras_backend is not None:
        try:
            backend.select(keras_backend.value)
        except CnnvizError as error:
            fail(str(error))

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
                   "file, or keras:NAME (a keras.applications model with ImageNet weights); "
                   "predict, evaluate, occlusion and rise also take an exported .tflite, .onnx "
                   "or SavedModel folder."),
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
            except ModuleNotFoundError as error:
                if error.name != "tensorflow":
                    raise
                # A path not refused up front that still reached for TensorFlow: one line too.
                fail(f"{name or function.__name__} needs TensorFlow here, which is not "
                     "installed: pip install 'cnnviz[tensorflow]'")
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


def import_keras() -> None:
    """Import Keras (and TensorFlow where it is installed) without their start-up lines."""
    from cnnviz._quiet import import_keras_quietly

    import_keras_quietly()


def require_tensorflow(what: str) -> None:
    """`import_keras`, then a one-line error when TensorFlow is missing and `what` needs it."""
    import_keras()
    from cnnviz.backend import require_tensorflow as refuse_without

    refuse_without(what)


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
