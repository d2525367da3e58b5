"""Deployment commands: evaluate, predict, export."""

from __future__ import annotations

import contextlib
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
    command,
    expectations_for,
    import_keras,
    judge,
    require_tensorflow,
)
from cnnviz.cli._options import (
    REQUIRED,
    ImageOptions,
    choices,
    takes_model,
)
from cnnviz.errors import CnnvizError
from cnnviz.pipeline import EVALUATION_HEADING


@command("evaluate")
@takes_model(shard=True, forward_only=True)
def evaluate_command(
    run: RunArgument,
    options: ImageOptions,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Evaluate on this config's test split, or on a folder of "
                     "class sub-folders, instead of the run's own test split."),
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="k of the top-k accuracy.")] = 5,
    merge: Annotated[
        bool,
        typer.Option("--merge", help="Sum the shares that `--shard K/N` runs left in the "
                     "evaluation folder into the report one process writes."),
    ] = False,
    expect: ExpectOption = None,
    junit: JunitOption = None,
    json_output: JsonOption = False,
) -> dict:
    """Accuracy, top-k, per-class precision/recall/F1, the confusion matrix and the most confident
    mistakes; writes evaluation.json and adds a section to the run's index.html.

    Streams the data through the same tf.data input as training. With --shard K/N, evaluates
    share K and writes its counts only; --merge then writes the report. Exit codes: 0 done, 1 an
    --expect failed, 2 bad input.
    """
    started = time.perf_counter()
    expectations = expectations_for(None, expect, "evaluate")
    share = options.share
    if share is not None and (merge or expectations or junit):
        raise CnnvizError("--shard evaluates one share: --merge, --expect and --junit belong "
                          "to the `cnnviz evaluate --merge` run that joins the shares")
    import_keras()
    from cnnviz.deploy.evaluate import (
        evaluate_data,
        evaluation_folder,
        merge_shares,
        write_evaluation,
    )
    from cnnviz.report.index_page import add_index_section

    loaded = options.load(run)
    folder = options.out or evaluation_folder(loaded, run, data)
    if merge:
        evaluation = merge_shares(folder)
        data_file, figures = write_evaluation(evaluation, folder)
    else:
        evaluation, data_file, figures = evaluate_data(
            loaded, folder, data=data, top_k=top_k, prepare=options.preparation(loaded),
            output=options.output, resize=options.resize, shard=share)
    typer.echo(evaluation.format_table())
    if share is not None:
        typer.echo(f"wrote {data_file} (share {share[0]} of {share[1]}; join the shares with "
                   "`cnnviz evaluate ... --merge`)")
        return {"run": str(run), "shard": list(share), "files": [str(data_file)],
                "evaluation": evaluation.to_dict()}
    for path in [data_file, *(figure.path for figure in figures)]:
        typer.echo(f"wrote {path}")
    results = evaluation.to_dict()
    files = [str(data_file), *(str(figure.path) for figure in figures)]
    if loaded.directory is not None and options.out is None:
        heading = EVALUATION_HEADING if data is None else f"Evaluation on {data}"
        index = add_index_section(loaded.directory, heading, figures)
        typer.echo(f"wrote {index}")
        files.append(str(index))
    from cnnviz.ci.gates import evaluation_values

    verdicts = judge(expectations, evaluation_values(results), junit=junit,
                     properties={"command": "evaluate", "run": str(run),
                                 "data": str(data or "test split")})
    return {"run": str(run), "evaluation": results, **verdicts, "files": files,
            "timings": {"evaluate_s": results["seconds"],
                        "total_s": round(time.perf_counter() - started, 3)}}


PREDICT_IMAGES = ("Image files: a folder (every image inside, recursively), a glob "
                  "('photos/*.jpg') or comma-separated files.")


@command("predict")
@takes_model(images=REQUIRED, out=False, shard=True, images_help=PREDICT_IMAGES,
             forward_only=True)
def predict_command(
    model_source: RunArgument,
    options: ImageOptions,
    csv_file: Annotated[
        Path | None,
        typer.Option("--csv", dir_okay=False, help="Write the CSV here (default: stdout); with "
                     "--shard K/N, to <name>.shard-K-of-N.csv, the header in share 0 only."),
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes per row.")] = 3,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Images decoded and predicted together.")
    ] = 64,
    json_output: JsonOption = False,
) -> dict:
    """Predict the class of image files: a CSV of file, predicted class, probability and the
    top-k, streamed in batches (memory does not grow with the number of files).

    With --shard K/N, share K of the files (in order) and the header only in share 0, so the
    shares' CSVs concatenated in order are the CSV of one process.
    """
    started = time.perf_counter()
    import_keras()
    from cnnviz.data.images import expand_image_spec
    from cnnviz.deploy.predict import csv_header, csv_line, predict_files
    from cnnviz.model.outputs import output_index
    from cnnviz.report.batching import progress_bar
    from cnnviz.report.selection import class_names_of, shard_file, shard_range

    paths = expand_image_spec(options.images)
    if paths is None:
        raise CnnvizError(f"--images {options.images!r} names no image file; give a folder, a "
                          "glob or image files")
    share = options.share
    paths = [paths[index] for index in shard_range(len(paths), share)]
    if csv_file is not None and share is not None:
        csv_file = shard_file(csv_file, share)
    loaded = options.load(model_source)
    output = output_index(loaded.model, options.output)
    class_names = class_names_of(loaded, int(loaded.model.outputs[output].shape[-1]))
    header = csv_header(min(top_k, len(class_names)))
    rows = []  # kept only for --json without --csv (the rows go into the JSON object)
    with progress_bar(len(paths), "predict") as bar:
        task = bar.add_task("predict", total=len(paths))
        predictions = predict_files(loaded.model, paths, class_names, top_k=top_k,
                                    batch_size=batch_size,
                                    prepare=options.preparation(loaded), output=output,
                                    resize=options.resize,
                                    progress=lambda done: bar.advance(task, done))
        with _csv_destination(csv_file, json_output) as write:
            if share is None or share[0] == 0:
                write(csv_line(header))
            for row in predictions:
                write(csv_line(row))
                if json_output and csv_file is None:
                    rows.append(dict(zip(header, row)))
    if csv_file is not None:
        typer.echo(f"wrote {csv_file} ({len(paths)} images)", err=True)
    return {"model": str(model_source), "images": len(paths), "columns": header,
            **({"csv": str(csv_file), "files": [str(csv_file)]} if csv_file is not None
               else {"predictions": rows, "files": []}),
            "timings": {"total_s": round(time.perf_counter() - started, 3)}}


@contextlib.contextmanager
def _csv_destination(csv_file: Path | None, json_output: bool):
    """A write(text) function: into a temporary file renamed to `csv_file` at the end (never a
    half-written CSV), else to stdout (nowhere with --json: the rows go into the JSON)."""
    if csv_file is None:
        yield (lambda text: None) if json_output else (lambda text: typer.echo(text, nl=False))
        return
    import os
    import tempfile

    csv_file.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=csv_file.parent, prefix=f".{csv_file.name}.",
                                         suffix=".tmp")
    try:
        with os.fdopen(handle, "w", newline="") as stream:
            yield stream.write
        os.replace(temporary, csv_file)
    finally:
        Path(temporary).unlink(missing_ok=True)


ExportFormatChoice = choices("ExportFormatChoice", 'savedmodel', 'tflite', 'onnx')
Quantize = choices("Quantize", 'int8')


@command("export")
def export_command(
    run: RunArgument,
    format_: Annotated[
        list[ExportFormatChoice],
        typer.Option("--format", help="savedmodel (TensorFlow SavedModel folder), tflite "
                     "(LiteRT) or onnx; repeat for several."),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="The file (or SavedModel folder) to write for one format, or "
                     "a folder for several (default: RUN/export/)."),
    ] = None,
    quantize: Annotated[
        Quantize | None,
        typer.Option("--quantize", help="int8: the tflite file full-integer (int8 weights, "
                     "activations, input and output; model.int8.tflite), calibrated on the "
                     "run's first 200 training images."),
    ] = None,
    check_images: Annotated[
        int, typer.Option(min=0, help="Test images the exported model is checked on (0: skip); "
                          "its occlusion maps on the first 16 of them.")
    ] = 256,
    tolerance: Annotated[
        float, typer.Option(min=0.0, help="Largest allowed |exported - keras| output difference.")
    ] = 1e-4,
    json_output: JsonOption = False,
) -> dict:
    """Export with Keras's own model.export, then load the file with its runtime
    (tf.saved_model, LiteRT, onnxruntime) and compare its outputs and occlusion maps with the
    .keras model's.

    Exit codes: 0 exported and matching, 1 an export differs by more than --tolerance, 2 bad
    input or a missing optional package (pip install 'cnnviz[export]').
    """
    from cnnviz.deploy.export import export_formats, require_packages

    started = time.perf_counter()
    formats = export_formats([choice.value for choice in format_],
                             None if quantize is None else quantize.value)
    for name in formats:  # before loading anything: a missing package is a one-line exit 2
        require_packages(name)
    require_tensorflow("cnnviz export (Keras's model.export)")
    from cnnviz.deploy.export import (
        FORMATS,
        check_export,
        check_images_for,
        describe_input,
        describe_outputs,
        export_model,
        export_paths,
        input_range_of,
        representative_images,
    )
    from cnnviz.runs.load import load_run, require_keras

    loaded = load_run(run)
    require_keras(loaded, "export")
    paths = export_paths(run, loaded.directory, formats, out)
    images, described = check_images_for(loaded, check_images) if check_images else (None, "")
    representative = representative_images(loaded) if quantize is not None else None
    results = {}
    for name, path in paths.items():
        step = time.perf_counter()
        export_model(loaded.model, path, name, representative=representative)
        entry = {"path": str(path), "keras_format": FORMATS[name].keras_format,
                 "export_s": round(time.perf_counter() - step, 3)}
        if images is not None:
            checked, line = check_export(loaded.model, path, name, images, described, tolerance)
            entry |= checked
            typer.echo(f"wrote {path} ({name}); {line}")
        else:
            typer.echo(f"wrote {path} ({name}); not checked (--check-images 0)")
        results[name] = entry
    record = {"model": str(run),
              "input": describe_input(loaded.model, input_range_of(loaded.model)),
              "outputs": describe_outputs(loaded.model),
              "preprocessing": _recorded_preprocessing(loaded.directory), "tolerance": tolerance,
              "formats": results}
    record_file = _write_record(record, {Path(entry["path"]).parent for entry in results.values()})
    if record_file is not None:
        typer.echo(f"wrote {record_file}")
    failed = any(entry.get("matches") is False for entry in results.values())
    return {**record, "files": [entry["path"] for entry in results.values()]
            + ([str(record_file)] if record_file else []),
            "exit_code": GATE_FAILED if failed else 0,
            "timings": {"total_s": round(time.perf_counter() - started, 3)}}


def _write_record(record: dict, folders: set[Path]) -> Path | None:
    """export.json beside the exported files (formats exported earlier stay listed)."""
    from cnnviz.io.atomic import atomic_write_json

    if len(folders) != 1:
        return None
    path = next(iter(folders)) / "export.json"
    if path.is_file():
        try:
            earlier = json.loads(path.read_text()).get("formats", {})
        except (ValueError, AttributeError):  # not ours, or damaged: start again
            earlier = {}
        record = {**record, "formats": {**earlier, **record["formats"]}}
    return atomic_write_json(path, record)


def _recorded_preprocessing(directory: Path | None) -> dict | None:
    """The preprocessing metrics.json recorded for the run (None for a bare .keras file)."""
    from cnnviz.runs.load import read_metrics

    return read_metrics(directory).get("preprocessing")
