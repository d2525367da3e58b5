"""Commands that train: train, run, augment, config show, summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cnnviz.cli._common import (
    ConfigArgument,
    OutOption,
    SetOption,
    command,
    config_app,
    fail,
    import_tensorflow,
    load_config_file,
    writable_out,
)
from cnnviz.errors import CnnvizError

ResumeOption = Annotated[
    Path | None,
    typer.Option("--resume", help="Resume this interrupted run directory; exit 2 if a live "
                 "process is training it."),
]


@command("train")
def train_command(config: ConfigArgument, out: OutOption = None, set_: SetOption = None,
                  resume: ResumeOption = None) -> None:
    """Train the model a config describes into outputs/<name>/<timestamp>.

    Re-running the same command after an interrupted run resumes it from its last finished
    epoch (unless another process is training it: then a new run starts).
    """
    resolved = load_config_file(config, set_)
    out_root = writable_out(out, Path("outputs"))
    from cnnviz.train import check_resume, train

    if resume is not None:
        check_resume(resume, resolved)  # before TensorFlow's import: a live run fails at once
    import_tensorflow()
    result = train(resolved, out_root, resume=resume)
    print_training(result)


def print_training(result) -> None:
    metrics = result.metrics
    typer.echo(
        f"test accuracy {metrics['test_accuracy']:.4f}, test loss {metrics['test_loss']:.4f}, "
        f"{metrics['epochs']} epochs in {metrics['seconds']:.1f} s on {metrics['device']}"
    )
    if not result.chief:  # a multi-worker run's other workers write only a temporary folder
        return
    for name in ("config.yaml", "model.keras", "history.csv", "metrics.json", "curves.png"):
        typer.echo(f"wrote {result.run_dir / name}")


@command("augment")
def augment_command(
    config: ConfigArgument,
    images: Annotated[int, typer.Option("--images", min=1, help="Training images shown (rows).")] = 6,
    draws: Annotated[int, typer.Option("--draws", min=1, help="Augmented versions of each (columns).")] = 4,
    out: OutOption = None,
    set_: SetOption = None,
) -> None:
    """Write augment.png: a few training images beside what data.augment makes of them.

    Decodes only those images (a folder's files are checked from their headers); default folder:
    outputs/<name>/.
    """
    resolved = load_config_file(config, set_)
    import_tensorflow()
    from cnnviz.data import augmentation_samples, load_dataset
    from cnnviz.plot import augmentation_grid
    from cnnviz.runs import save_figure

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
        from cnnviz.config import dump_config

        typer.echo(dump_config(load_config_file(config, set_)), nl=False)
    except CnnvizError as error:
        fail(str(error))


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
        resolved = load_config_file(target, set_)
        import_tensorflow()
        from cnnviz.summary import model_from_config

        model = model_from_config(resolved)
        from cnnviz.config import run_slug

        folder = out or Path("outputs") / run_slug(resolved.name or target.stem) / "summary"
    else:
        import_tensorflow()
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
    from cnnviz.report import FigureFile, all_figures, one_per_class, select_images, write_index
    from cnnviz.runs import load_run
    from cnnviz.summary import write_summary

    resolved = load_config_file(config, set_)
    out_root = writable_out(out, Path("outputs"))
    import_tensorflow()
    from cnnviz.train import train

    result = train(resolved, out_root)
    print_training(result)
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
    from cnnviz.cli.trust import trust_sections

    sections += trust_sections(run, folder)
    metrics = result.metrics
    title = (f"cnnviz run {result.run_dir.parent.name}/{result.run_dir.name}: test accuracy "
             f"{metrics['test_accuracy']:.4f} after {metrics['epochs']} epochs")
    index = write_index(result.run_dir, title, sections)
    count = sum(len(figures) for _, figures in sections)
    typer.echo(f"wrote {count} figures under {folder}")
    typer.echo(f"wrote {index}")
