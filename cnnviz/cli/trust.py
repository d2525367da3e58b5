"""Trust commands: verify, sanity, faithfulness, shortcut."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from cnnviz.cli._common import (
    GATE_FAILED,
    ExpectOption,
    JsonOption,
    JunitOption,
    RunArgument,
    SetOption,
    command,
    expectations_for,
    import_keras,
    judge,
    load_config_file,
    print_report,
)
from cnnviz.cli._options import (
    ImageOptions,
    ModelSourceArgument,
    choices,
    takes_model,
)
from cnnviz.errors import CnnvizError


def model_and_images(source: Path, options: ImageOptions, overrides: list[str] | None):
    """(model, images, what the images are) for a run, a .keras file or a config.

    A config builds its untrained model; its images are the test split where the data is at
    hand offline, else seeded uniform noise (the check is about arithmetic, not accuracy).
    """
    import numpy as np

    from cnnviz.runs.load import Run

    if source.suffix in (".yaml", ".yml"):
        resolved = load_config_file(source, overrides)
        import_keras()
        import keras

        from cnnviz.model.summary import model_from_config

        keras.utils.set_random_seed(resolved.seed)
        model = model_from_config(resolved)
        try:
            selection = options.select(Run(model, resolved, None))
            return model, selection.images, f"{len(selection.images)} test images"
        except CnnvizError as error:
            if "download" not in str(error):
                raise
            shape = tuple(int(size) for size in model.inputs[0].shape[1:])
            noise = np.random.default_rng(resolved.seed).uniform(size=(32, *shape))
            return (model, noise.astype(np.float32),
                    "32 uniform-noise images (data not available offline)")
    run = options.load(source)
    selection = options.select(run)
    return run.model, selection.images, f"{len(selection.images)} images"


@command("verify")
@takes_model(images="0:32", out=False)
def verify_command(
    source: ModelSourceArgument,
    options: ImageOptions,
    tolerance: Annotated[
        float, typer.Option(help="Largest allowed |numpy - keras| per layer.")
    ] = 1e-4,
    explain: Annotated[
        bool, typer.Option("--explain", help="Write one image's forward pass out step by step.")
    ] = False,
    set_: SetOption = None,
    junit: JunitOption = None,
    json_output: JsonOption = False,
) -> dict | None:
    """Recompute the forward pass in plain numpy and compare it with Keras, layer by layer.

    Exits 1 when a layer differs by more than --tolerance or cannot be recomputed.
    """
    from cnnviz.ci.gates import verify_checks
    from cnnviz.trust.reference.forward import verify
    from cnnviz.trust.reference.steps import explain_steps, format_table

    started = time.perf_counter()
    model, batch, described = model_and_images(source, options, set_)
    if explain:
        typer.echo(explain_steps(model, batch[0]))
        return None
    report = verify(model, batch, tolerance=tolerance)
    typer.echo(f"{model.name}: numpy reference vs Keras on {described}")
    typer.echo(format_table(report))
    checks = verify_checks(report)
    verdicts = judge([], {}, checks=checks, junit=junit,
                     properties={"command": "verify", "model": str(source)})
    layers = [{"name": row.name, "type": row.class_name, "output_shape": list(row.output_shape),
               "max_difference": row.max_difference, "ok": row.ok, "reason": row.reason}
              for row in report.rows]
    return {**verdicts, "exit_code": 0 if report.ok else GATE_FAILED, "images": described,
            "tolerance": tolerance, "max_difference": report.max_difference, "layers": layers,
            "timings": {"total_s": round(time.perf_counter() - started, 3)}}


Baseline = choices("Baseline", 'blur', 'zero', 'mean')


@command("sanity")
@takes_model(images="0:32")
def sanity_command(
    run: RunArgument,
    options: ImageOptions,
    seed: Annotated[int, typer.Option(help="Seed of the re-initialized weights.")] = 0,
    expect: ExpectOption = None,
    junit: JunitOption = None,
    json_output: JsonOption = False,
) -> dict:
    """Sanity checks for saliency maps (Adebayo et al. 2018): model randomization, class change.

    Flags a method whose maps barely change when the weights are destroyed, or when a different
    class is explained. Exit codes: 0 done (flagged methods too), 1 an --expect
    (sanity.<method>.<metric>) failed, 2 bad input.
    """
    from cnnviz.report.trust import sanity_report

    started = time.perf_counter()
    expectations = expectations_for(None, expect, "sanity")
    loaded, folder, selection = options.explained(run, "sanity")
    report = sanity_report(loaded.model, selection, folder, seed=seed)
    print_report(report)
    return trust_result("sanity", report, junit, run, time.perf_counter() - started,
                        expectations)


@command("faithfulness")
@takes_model(images="0:32")
def faithfulness_command(
    run: RunArgument,
    options: ImageOptions,
    steps: Annotated[
        int, typer.Option(min=2, help="Points on each deletion/insertion curve.")
    ] = 20,
    baseline: Annotated[Baseline, typer.Option(help="What deleted pixels become.")] = Baseline.blur,
    seed: Annotated[int, typer.Option(help="Seed of the random-order baseline.")] = 0,
    expect: ExpectOption = None,
    junit: JunitOption = None,
    json_output: JsonOption = False,
) -> dict:
    """Deletion and insertion scores per method against a random pixel order.

    Exit codes: 0 done (flagged methods too), 1 an --expect (faithfulness.<method>.<metric>)
    failed, 2 bad input.
    """
    from cnnviz.report.trust import faithfulness_report

    started = time.perf_counter()
    expectations = expectations_for(None, expect, "faithfulness")
    loaded, folder, selection = options.explained(run, "faithfulness")
    report = faithfulness_report(loaded.model, selection, folder, steps=steps,
                                 baseline=baseline.value, seed=seed)
    print_report(report)
    return trust_result("faithfulness", report, junit, run, time.perf_counter() - started,
                        expectations)


def trust_result(name: str, report, junit: Path | None, source: Path, seconds: float,
                 expectations=()) -> dict:
    """The JSON result of a trust command: its numbers, its checks and expectations (and JUnit
    file), its files."""
    from cnnviz.ci.gates import trust_checks, trust_values

    numbers = json.loads(report.data_file.read_text())
    values = trust_values(**{name: numbers})
    verdicts = judge(expectations, values,
                     checks=trust_checks(**{name: numbers}, seconds={name: seconds}),
                     junit=junit, properties={"command": name, "run": str(source)})
    return {**verdicts, "results": numbers, "values": values,
            "flagged": report.flagged,
            "files": [str(report.data_file), *(str(figure.path) for figure in report.figures)],
            "timings": {"total_s": round(seconds, 3)}}


@command("shortcut")
@takes_model(inputs=False)
def shortcut_command(
    run: RunArgument,
    options: ImageOptions,
    count: Annotated[int, typer.Option(min=1, help="Training images to explain.")] = 64,
) -> None:
    """Does the model use the spurious cue? Attribution on the cue vs its area (shapes data)."""
    from cnnviz.report.trust import shortcut_files

    loaded = options.load(run)
    folder = options.folder(loaded, run, "shortcut")
    print_report(shortcut_files(loaded, folder, count=count))
