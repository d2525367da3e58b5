"""The trust checks written out: sanity, faithfulness and shortcut tables, JSON and figures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cnnviz.io.atomic import atomic_write_text
from cnnviz.report.batching import FigureFile, drawing, save_drawing
from cnnviz.report.selection import Selection
from cnnviz.runs.load import Run


# ---------------------------------------------------------------------------------- trust
@dataclass
class Report:
    """A trust check's outcome: its table (printed), files (written) and whether it flagged."""

    text: str
    figures: list[FigureFile]
    data_file: Path
    flagged: bool


def sanity_report(model, selection: Selection, folder: Path, *, seed: int = 0,
                  methods: Sequence[str] | None = None) -> Report:
    """Model randomization + class sensitivity: sanity.txt, sanity.json and two figures.

    `methods`: registry names (default: every method of `cnnviz.explain.registry.METHODS`).
    """
    from cnnviz.explain.registry import METHODS
    from cnnviz.io.atomic import atomic_write_json
    from cnnviz.plot.trust import sanity_curves_figure, sanity_maps_figure
    from cnnviz.trust.sanity import class_sensitivity, format_class_sensitivity, model_randomization

    methods = tuple(methods or METHODS)
    result = model_randomization(model, selection.images, seed=seed, methods=methods,
                                 input_range=selection.input_range)
    classes = class_sensitivity(model, selection.images, methods=methods,
                                input_range=selection.input_range)
    text = result.format_table() + "\n\n" + format_class_sensitivity(classes)
    atomic_write_text(folder / "sanity.txt", text + "\n")
    data_file = atomic_write_json(folder / "sanity.json", {
        "images": selection.names, "model_randomization": result.to_dict(),
        "class_sensitivity": classes})
    figures = [save_drawing(drawing(sanity_maps_figure, result), folder / "sanity_maps.png"),
               save_drawing(drawing(sanity_curves_figure, result), folder / "sanity_curves.png")]
    flagged = any(result.insensitive_to.values()) or any(
        entry.get("class_insensitive") for entry in classes.values() if isinstance(entry, dict))
    return Report(text, figures, data_file, flagged)


def faithfulness_report(model, selection: Selection, folder: Path, *, steps: int = 20,
                        baseline: str = "blur", seed: int = 0,
                        methods: Sequence[str] | None = None) -> Report:
    """Deletion and insertion curves per method vs a random order: table, JSON and a figure.

    `methods`: registry names (default: every method of `cnnviz.explain.registry.METHODS`).
    """
    from cnnviz.explain.registry import METHODS
    from cnnviz.io.atomic import atomic_write_json
    from cnnviz.plot.trust import faithfulness_figure
    from cnnviz.trust.faithfulness import deletion_insertion

    result = deletion_insertion(model, selection.images, steps=steps, baseline=baseline,
                                input_range=selection.input_range,
                                seed=seed, methods=tuple(methods or METHODS))
    text = result.format_table()
    atomic_write_text(folder / "faithfulness.txt", text + "\n")
    data_file = atomic_write_json(folder / "faithfulness.json",
                                  {"images": selection.names, **result.to_dict()})
    figures = [save_drawing(drawing(faithfulness_figure, result), folder / "faithfulness.png")]
    return Report(text, figures, data_file, bool(result.called_out))


def shortcut_files(run: Run, folder: Path, *, count: int = 64,
                   methods: Sequence[str] | None = None) -> Report:
    """The shortcut report of a run trained on data with a spurious cue (`methods`: registry
    names, default every method)."""
    from cnnviz.io.atomic import atomic_write_json
    from cnnviz.plot.trust import shortcut_figure
    from cnnviz.trust.shortcut import shortcut_report

    cue = run.config.data.shapes.spurious if run.config is not None else None
    from cnnviz.explain.registry import METHODS

    result = shortcut_report(run.model, run.dataset(), count=count, cue=cue,
                             methods=tuple(methods or METHODS))
    text = result.format_table()
    atomic_write_text(folder / "shortcut.txt", text + "\n")
    data_file = atomic_write_json(folder / "shortcut.json", result.to_dict())
    figures = [save_drawing(drawing(shortcut_figure, result), folder / "shortcut.png")]
    return Report(text, figures, data_file, bool(result.relies_on_cue))
