"""The model summary table and the architecture diagram (keras.utils.plot_model via Graphviz)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cnnviz.config.root import Config
from cnnviz.io.atomic import atomic_write_text

GRAPHVIZ_HINT = (
    "Graphviz's `dot` program was not found, so architecture.png was not drawn; install it "
    "(Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz; conda: conda "
    "install graphviz) and run again. summary.txt was written."
)


@dataclass
class SummaryFiles:
    text: str
    summary_file: Path
    architecture_file: Path | None
    graphviz_problem: str | None = None


def model_from_config(config: Config):
    """The untrained model of a config, built without loading (or downloading) its data."""
    from cnnviz.config.shapes import native_input_shape
    from cnnviz.model.build import build_model

    input_shape = native_input_shape(config.data)
    if input_shape is None:  # npz: only the file knows the image size
        from cnnviz.data import load_dataset

        dataset = load_dataset(config)
        return build_model(config, dataset.input_shape, dataset.num_classes, dataset.preprocessing)
    num_classes = _num_classes(config)
    return build_model(config, input_shape, num_classes)


def _num_classes(config: Config) -> int:
    data = config.data
    if data.class_names:
        return len(data.class_names)
    if data.source == "inline":
        return max(data.labels) + 1
    if data.source == "shapes":
        return len(data.shapes.classes)
    if data.source == "directory":
        folder = Path(data.path)
        return (max(1, sum(1 for entry in folder.iterdir() if entry.is_dir()))
                if folder.is_dir() else 2)
    return 10  # digits, mnist, fashion_mnist, cifar10


def summary_text(model) -> str:
    """Keras's own summary table as plain text, nested models expanded (their layers listed)."""
    lines: list[str] = []
    # Keras renders through rich at the terminal's width and crops what does not fit (the
    # Param # column on an 80-column terminal); a fixed width keeps the file and output whole.
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "110"
    try:
        model.summary(print_fn=lambda text, line_break=True: lines.append(text), line_length=100,
                      expand_nested=True)
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved
    return "\n".join(lines)


# Diagram attempts, simplest last: Graphviz 2.43 aborts with an assertion in maze.c while
# routing orthogonal edges on big graphs (MobileNetV2); spline edges, then the nested models
# drawn as one box each, avoid that router.
_DIAGRAM_ATTEMPTS = (
    {"expand_nested": True, "splines": "ortho"},
    {"expand_nested": True, "splines": "spline"},
    {"expand_nested": False, "splines": "spline"},
)


def write_summary(model, folder: str | Path) -> SummaryFiles:
    """Write `summary.txt` and, where Graphviz is installed, `architecture.png` into `folder`.

    Nested models are expanded in both. When Graphviz fails to draw (a crash, a timeout), the
    diagram is retried with simpler layouts; if every attempt fails, only the text is written
    and `graphviz_problem` says why (the command still succeeds).
    """
    folder = Path(folder)
    text = summary_text(model)
    summary_file = atomic_write_text(folder / "summary.txt", text + "\n")
    if shutil.which("dot") is None:
        return SummaryFiles(text, summary_file, None, GRAPHVIZ_HINT)
    import keras

    architecture = folder / "architecture.png"
    temporary = folder / ".architecture.partial.png"
    failure = ""
    try:
        for options in _DIAGRAM_ATTEMPTS:
            try:
                keras.utils.plot_model(
                    model, to_file=str(temporary), show_shapes=True, show_layer_names=True,
                    show_layer_activations=True, show_trainable=True, dpi=96, **options,
                )
            except Exception as error:  # noqa: BLE001 - pydot re-raises dot's failures as many types
                failure = str(error).strip().splitlines()[-1][:200] if str(error).strip() else (
                    type(error).__name__)
                continue
            os.replace(temporary, architecture)
            return SummaryFiles(text, summary_file, architecture)
    finally:
        temporary.unlink(missing_ok=True)
    problem = (f"warning: Graphviz could not draw architecture.png ({failure}); summary.txt "
               "was written")
    return SummaryFiles(text, summary_file, None, problem)
