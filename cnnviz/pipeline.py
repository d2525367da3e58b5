"""`cnnviz run` as one library call: train, then every figure, the trust checks, the evaluation
and index.html of a run (`run_pipeline`). The CLI parses options, judges gates and prints JSON."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

EVOLUTION_HEADING = "How the explanations changed during training"
EVALUATION_HEADING = "Evaluation on the test split"
SANITY_HEADING = "Sanity checks: model randomization (Adebayo et al. 2018)"
FAITHFULNESS_HEADING = "Faithfulness: deletion and insertion"
SHORTCUT_HEADING = "Shortcut detector"
# The main job's trust checks look at 16 test images: on digits every verdict (sanity per layer,
# class sensitivity, faithfulness) is the one 32 images give, in half the time. `cnnviz sanity`
# and `cnnviz faithfulness` alone default to 32.
TRUST_IMAGES = "0:16"


@dataclass
class RunOutcome:
    """What `run_pipeline` made: the run, its numbers, and every file it wrote."""

    run_dir: Path
    metrics: dict
    evaluation: dict
    trust: dict  # {"sanity" | "faithfulness" | "shortcut": that report's JSON}
    trust_seconds: dict
    files: list[Path] = field(default_factory=list)
    timings: dict = field(default_factory=dict)


def train_run(config, out_root: str | Path = "outputs", **options):
    """`cnnviz.train.fit.train` with the callbacks the config asks for (`train.explain`)."""
    from cnnviz.report.watch import run_callbacks
    from cnnviz.train.fit import train

    return train(config, out_root, epoch_callbacks=run_callbacks(config), **options)


def training_files(result, log=print) -> list[Path]:
    """Print the training line and the files training wrote; return those files."""
    metrics = result.metrics
    log(f"test accuracy {metrics['test_accuracy']:.4f}, test loss {metrics['test_loss']:.4f}, "
        f"{metrics['epochs']} epochs in {metrics['seconds']:.1f} s on {metrics['device']}")
    if not result.chief:  # a multi-worker run's other workers write only a temporary folder
        return []
    files = [result.run_dir / name for name in
             ("config.yaml", "model.keras", "history.csv", "metrics.json", "curves.png",
              "explain_history.csv")
             if (result.run_dir / name).is_file()]
    for path in files:
        log(f"wrote {path}")
    return files


def evaluate_run(run_dir: Path, log=print) -> tuple[dict, list, list[Path]]:
    """Evaluate a run on its test split into run_dir/evaluation.

    Returns:
        (evaluation.json's dict, the figures as FigureFiles, every file written).
    """
    from cnnviz.deploy.evaluate import evaluate_data
    from cnnviz.runs.load import load_run

    evaluation, data_file, figures = evaluate_data(load_run(run_dir), run_dir / "evaluation")
    log("\n" + evaluation.format_table())
    files = [data_file, *(figure.path for figure in figures)]
    for path in files:
        log(f"wrote {path}")
    return evaluation.to_dict(), figures, files


def trust_reports(run, folder: Path, *, images: str = "0:32", methods=None, log=print):
    """Sanity, faithfulness and (for data with a spurious cue) the shortcut report, the first
    two on the test `images` for `methods` (default: every registered method).

    Returns:
        ({"sanity" | "faithfulness" | "shortcut": (heading, Report)}, {same keys: seconds}).
    """
    from cnnviz.report.selection import select_images
    from cnnviz.report.trust import faithfulness_report, sanity_report, shortcut_files

    checks = select_images(run, images)
    jobs = {"sanity": (SANITY_HEADING, lambda: sanity_report(
                run.model, checks, folder / "sanity", methods=methods)),
            "faithfulness": (FAITHFULNESS_HEADING, lambda: faithfulness_report(
                run.model, checks, folder / "faithfulness", methods=methods))}
    data = run.config.data if run.config is not None else None
    if data is not None and data.source == "shapes" and data.shapes.spurious:
        jobs["shortcut"] = (SHORTCUT_HEADING, lambda: shortcut_files(
            run, folder / "shortcut", methods=methods, **({"count": 16} if methods else {})))
    reports, seconds = {}, {}
    for name, (heading, make) in jobs.items():
        started = time.perf_counter()
        report = make()
        seconds[name] = time.perf_counter() - started
        reports[name] = (heading, report)
        log(f"\n{heading}\n{report.text}")
    return reports, seconds


EXEMPLARS_HEADING = "What each unit responds to: exemplars"


def exemplar_section(run, folder: Path) -> list:
    """The index page's exemplars: the first 8 filters of the last conv layer, their 6 test
    images that activate them most (`cnnviz exemplars`); none for a model without conv layers."""
    from cnnviz.report.exemplars import exemplar_figures
    from cnnviz.report.figures import conv_layer_names
    from cnnviz.report.selection import select_images

    layers = conv_layer_names(run.model)[-1:]
    if not layers:
        return []
    written = exemplar_figures(run.model, select_images(run, ":"), folder / "exemplars",
                               layers=layers, filters="0:8", top=6)
    return [(EXEMPLARS_HEADING, [figure for figure in written if figure.path.suffix == ".png"])]


def run_pipeline(config, out_root: str | Path = "outputs", *, images: str | None = None,
                 figure_images: int = 10, figure_options=None,
                 trust_images: str = TRUST_IMAGES, trust_methods=None, log=print,
                 warn=print) -> RunOutcome:
    """Train `config` into `out_root`, then write every figure for `images` (default: the first
    `figure_images` test images of distinct classes), the trust checks on `trust_images` for
    `trust_methods` (default: every method), the evaluation and index.html.

    Args:
        config: a validated Config.
        figure_options: model -> keyword arguments for `all_figures` (the smoke preset's
            shorter runs).
        log, warn: where progress lines and warnings go (the CLI sends warnings to stderr).
    """
    from cnnviz.model.summary import write_summary
    from cnnviz.report.batching import FigureFile, drawing_in_background
    from cnnviz.report.figures import all_figures, one_per_class
    from cnnviz.report.index_page import write_index
    from cnnviz.report.selection import select_images
    from cnnviz.runs.load import load_run
    started = time.perf_counter()
    result = train_run(config, out_root, log=log)
    files = training_files(result, log)
    timings = {"train_s": round(time.perf_counter() - started, 3)}
    # The figures are drawn in a process of their own (started now, while the run is read
    # back) as this one computes the next maps and the trust checks: drawing is
    # single-threaded matplotlib, the rest mostly TensorFlow.
    with drawing_in_background():
        step = time.perf_counter()
        run = load_run(result.run_dir)
        folder = result.run_dir / "figures"
        summary = write_summary(run.model, result.run_dir)
        timings["summary_s"] = round(time.perf_counter() - step, 3)
        if summary.graphviz_problem:
            warn(summary.graphviz_problem)
        selection = select_images(run, images or one_per_class(run.dataset().y_test,
                                                               limit=figure_images))
        sections = [("Training", [FigureFile(result.run_dir / "curves.png",
                                             "Loss and accuracy per epoch, train vs validation")]
                     + ([FigureFile(summary.architecture_file, "Architecture")]
                        if summary.architecture_file else []))]
        evolution = [FigureFile(path, f"{path.parent.name}, epoch after epoch (train.explain)")
                     for path in sorted(folder.glob("epochs/*/evolution.png"))]
        if evolution:
            sections.append((EVOLUTION_HEADING, evolution))
        step = time.perf_counter()
        sections += all_figures(run, selection, folder,
                               **(figure_options(run.model) if figure_options else {}))
        sections += exemplar_section(run, folder)
        timings["figures_s"] = round(time.perf_counter() - step, 3)
        step = time.perf_counter()
        reports, seconds = trust_reports(run, folder, images=trust_images,
                                         methods=trust_methods, log=log)
        timings["trust_s"] = round(time.perf_counter() - step, 3)
        evaluation, evaluation_figures, evaluation_files = evaluate_run(result.run_dir, log)
        timings["evaluate_s"] = evaluation["seconds"]
        step = time.perf_counter()
    timings["drawing_wait_s"] = round(time.perf_counter() - step, 3)  # the last PNGs
    sections += [(heading, report.figures) for heading, report in reports.values()]
    sections.append((EVALUATION_HEADING, evaluation_figures))
    metrics = result.metrics
    title = (f"cnnviz run {result.run_dir.parent.name}/{result.run_dir.name}: test accuracy "
             f"{metrics['test_accuracy']:.4f} after {metrics['epochs']} epochs")
    index = write_index(result.run_dir, title, sections)
    figure_files = [figure.path for _, figures in sections for figure in figures]
    log(f"wrote {len(figure_files)} figures under {folder}")
    log(f"wrote {index}")
    trust = {name: json.loads(report.data_file.read_text())
             for name, (_, report) in reports.items()}
    written = dict.fromkeys([
        *files, summary.summary_file,
        *([summary.architecture_file] if summary.architecture_file else []),
        *figure_files, *evaluation_files, *(report.data_file for _, report in reports.values()),
        index])
    timings["total_s"] = round(time.perf_counter() - started, 3)
    return RunOutcome(result.run_dir, metrics, evaluation, trust, seconds, list(written),
                      timings)
