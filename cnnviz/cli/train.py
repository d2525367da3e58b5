"""Commands that train: train, run, augment, config show, summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from cnnviz.cli._common import (
    SMOKE_FIGURE_IMAGES,
    SMOKE_TRUST_IMAGES,
    ConfigArgument,
    ExpectOption,
    JsonOption,
    JunitOption,
    OutOption,
    SetOption,
    SmokeOption,
    command,
    config_app,
    expectations_for,
    fail,
    import_keras,
    judge,
    load_config_file,
    require_tensorflow,
    smoke_figure_options,
    smoke_trust_methods,
    writable_out,
)
from cnnviz.errors import CnnvizError

ResumeOption = Annotated[
    Path | None,
    typer.Option("--resume", help="Resume this interrupted run directory; exit 2 if a live "
                 "process is training it."),
]


@command("train")
def train_command(
    config: ConfigArgument,
    out: OutOption = None,
    set_: SetOption = None,
    resume: ResumeOption = None,
    expect: ExpectOption = None,
    junit: JunitOption = None,
    json_output: JsonOption = False,
    smoke: SmokeOption = False,
) -> dict:
    """Train the model a config describes into outputs/<name>/<timestamp>.

    Re-running the same command after an interrupted run resumes it from its last finished
    epoch (unless another process is training it: then a new run starts).
    Exit codes: 0 done, 1 an expectation failed, 2 bad input (nothing trained).
    """
    started = time.perf_counter()
    resolved = load_config_file(config, set_, smoke=smoke)
    expectations = expectations_for(resolved, expect, "train")
    out_root = writable_out(out, Path("outputs"))
    from cnnviz.train.resume import check_resume

    if resume is not None:
        check_resume(resume, resolved)  # before TensorFlow's import: a live run fails at once
    require_tensorflow("training (its tf.data input)")
    from cnnviz.ci.gates import needs_evaluation, training_values
    from cnnviz.pipeline import train_run, training_files  # Keras: after the quiet import

    result = train_run(resolved, out_root, resume=resume)

    files = training_files(result, log=typer.echo)
    payload = {"run_dir": str(result.run_dir), "smoke": smoke, "metrics": result.metrics}
    values = training_values(result.metrics) | epoch_values(result.run_dir)
    timings = {"train_s": round(time.perf_counter() - started, 3)}
    if needs_evaluation(expectations) and result.chief:
        evaluation, _, evaluation_files = evaluate_run_directory(result.run_dir)
        payload["evaluation"] = evaluation
        files += evaluation_files
        values |= evaluation_values(evaluation)
        timings["evaluate_s"] = evaluation["seconds"]
    verdicts = judge(expectations, values, junit=junit,
                     properties={"command": "train", "config": str(config),
                                 "run_dir": str(result.run_dir)})
    timings["total_s"] = round(time.perf_counter() - started, 3)
    return {**payload, **verdicts, "files": [str(path) for path in files], "timings": timings}


def evaluate_run_directory(run_dir: Path) -> tuple[dict, list, list[Path]]:
    from cnnviz.pipeline import evaluate_run

    return evaluate_run(run_dir, log=typer.echo)


def epoch_values(run_dir: Path) -> dict:
    """The gate values of explain_history.csv (`train.explain`), {} without one."""
    from cnnviz.ci.gates import explain_values
    from cnnviz.report.watch import HISTORY_FILE
    from cnnviz.train.history import read_history

    return explain_values(read_history(run_dir / HISTORY_FILE))


def evaluation_values(evaluation: dict) -> dict:
    from cnnviz.ci.gates import evaluation_values as values

    return values(evaluation)


@command("augment")
def augment_command(
    config: ConfigArgument,
    images: Annotated[
        int, typer.Option("--images", min=1, help="Training images shown (rows).")
    ] = 6,
    draws: Annotated[
        int, typer.Option("--draws", min=1, help="Augmented versions of each (columns).")
    ] = 4,
    out: OutOption = None,
    set_: SetOption = None,
) -> None:
    """Write augment.png: a few training images beside what data.augment makes of them.

    Decodes only those images (a folder's files are checked from their headers); default folder:
    outputs/<name>/.
    """
    resolved = load_config_file(config, set_)
    require_tensorflow("cnnviz augment (the tf.data input)")
    from cnnviz.data import augmentation_samples, load_dataset
    from cnnviz.io.atomic import save_figure
    from cnnviz.plot import augmentation_grid

    dataset = load_dataset(resolved, log=lambda line: typer.echo(line, err=True))
    originals, augmented, names = augmentation_samples(resolved, dataset, images, draws)
    kinds = ", ".join(spec.type for spec in resolved.data.augment)
    figure = augmentation_grid(originals, augmented, names=names,
                               title=f"{resolved.name}: data.augment = {kinds}")
    path = save_figure(figure, (out or Path("outputs") / (resolved.name or config.stem))
                       / "augment.png")
    typer.echo(f"wrote {path}")


@config_app.command("show")
def config_show(config: ConfigArgument, set_: SetOption = None) -> None:
    """Print the full config with every default filled in."""
    try:
        from cnnviz.config.loading import dump_config

        typer.echo(dump_config(load_config_file(config, set_)), nl=False)
    except CnnvizError as error:
        fail(str(error))


@command("summary")
def summary_command(
    target: Annotated[
        Path, typer.Argument(help="A config (.yaml), a run directory or a .keras file.")
    ],
    out: OutOption = None,
    set_: SetOption = None,
) -> None:
    """Print the Keras summary; write summary.txt and architecture.png (Graphviz).

    On a config it builds the untrained model and downloads nothing. Default folder: the run
    directory, or outputs/<name>/summary for a config.
    """
    from cnnviz.model.summary import write_summary

    if target.suffix in (".yaml", ".yml"):
        resolved = load_config_file(target, set_)
        import_keras()
        from cnnviz.model.summary import model_from_config

        model = model_from_config(resolved)
        from cnnviz.config.root import run_slug

        folder = out or Path("outputs") / run_slug(resolved.name or target.stem) / "summary"
    else:
        import_keras()
        from cnnviz.runs.load import load_run, require_keras

        run = load_run(target)
        require_keras(run, "summary")
        model = run.model
        folder = out or (run.directory or Path("outputs") / target.stem / "summary")
    result = write_summary(model, folder)
    typer.echo(result.text)
    typer.echo(f"wrote {result.summary_file}")
    if result.architecture_file is not None:
        typer.echo(f"wrote {result.architecture_file}")
    else:
        typer.echo(result.graphviz_problem, err=True)


@command("run")
def run_command(
    config: ConfigArgument,
    out: OutOption = None,
    set_: SetOption = None,
    images: Annotated[
        str | None,
        typer.Option("--images", help="Test images to explain (default: the first of each class)."),
    ] = None,
    expect: ExpectOption = None,
    junit: JunitOption = None,
    json_output: JsonOption = False,
    smoke: SmokeOption = False,
) -> dict:
    """Train, then write every figure, the trust checks and the evaluation for a sample of test
    images, and an index.html of them all.

    Exit codes: 0 done, 1 an expectation failed, 2 bad input (nothing trained).
    """
    started = time.perf_counter()
    resolved = load_config_file(config, set_, smoke=smoke)
    expectations = expectations_for(resolved, expect, "run")
    out_root = writable_out(out, Path("outputs"))
    require_tensorflow("cnnviz run (training on tf.data)")
    from cnnviz.ci.gates import training_values, trust_checks, trust_values
    from cnnviz.pipeline import TRUST_IMAGES, run_pipeline

    outcome = run_pipeline(
        resolved, out_root, images=images,
        figure_images=SMOKE_FIGURE_IMAGES if smoke else 10,
        trust_images=f"0:{SMOKE_TRUST_IMAGES}" if smoke else TRUST_IMAGES,
        trust_methods=smoke_trust_methods(expectations) if smoke else None,
        figure_options=smoke_figure_options if smoke else None,
        log=typer.echo, warn=lambda line: typer.echo(line, err=True))
    trust_numbers = trust_values(**outcome.trust)
    values = (training_values(outcome.metrics) | epoch_values(outcome.run_dir)
              | evaluation_values(outcome.evaluation) | trust_numbers)
    verdicts = judge(expectations, values,
                     checks=trust_checks(**outcome.trust, seconds=outcome.trust_seconds),
                     junit=junit, properties={"command": "run", "config": str(config),
                                              "run_dir": str(outcome.run_dir)})
    outcome.timings["total_s"] = round(time.perf_counter() - started, 3)
    return {"run_dir": str(outcome.run_dir), "smoke": smoke, "metrics": outcome.metrics,
            "evaluation": outcome.evaluation, "trust": trust_numbers, **verdicts,
            "files": [str(path) for path in outcome.files], "timings": outcome.timings}


