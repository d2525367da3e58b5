"""Batch figure writing: choose images, explain them in chunks, draw, save, show progress.

This is the glue between the CLI and the pure layers: `cnnviz.explain` computes arrays,
`cnnviz.plot` draws Figures, and this module feeds them chunk by chunk so memory stays flat
however many images are asked for, and writes each PNG atomically.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from cnnviz.errors import CnnvizError
from cnnviz.runs import Run, atomic_write_text, save_figure

CHUNK = 64  # images explained per batch: big enough to amortize, small enough to stay flat
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class Selection:
    """Images to explain, as model inputs, with what is known about them."""

    images: np.ndarray  # (N, H, W, C) float32, preprocessed like the training data
    labels: np.ndarray  # (N,) int32 true class, -1 where unknown (image files)
    names: list[str]  # file-name stems: test_0007, or the image file's stem
    class_names: list[str]


# ----------------------------------------------------------------------------- image choice
def parse_indices(spec: str, count: int) -> list[int]:
    """`0,3,7` or `0:500` or `10:20:2` (Python slices, end exclusive) -> indices below `count`."""
    indices: list[int] = []
    for part in (part.strip() for part in spec.split(",")):
        if not part:
            continue
        try:
            if ":" in part:
                bounds = [int(bound) if bound else None for bound in part.split(":")]
                if len(bounds) > 3:
                    raise ValueError
                indices.extend(range(count)[slice(*bounds)])
            else:
                index = int(part)
                if not -count <= index < count:
                    raise CnnvizError(
                        f"--images {spec!r}: index {index} is outside the test split "
                        f"(0..{count - 1})"
                    )
                indices.append(index % count)
        except ValueError:
            raise CnnvizError(
                f"--images {spec!r}: {part!r} is neither an index (7), a range (0:500) nor an "
                "image file"
            ) from None
    if not indices:
        raise CnnvizError(f"--images {spec!r} selects no image (the test split has {count})")
    return indices


def _looks_like_files(spec: str) -> bool:
    return any(part.strip().lower().endswith(IMAGE_SUFFIXES) for part in spec.split(","))


def _class_names(run: Run, num_outputs: int) -> list[str]:
    if run.directory is not None and (run.directory / "metrics.json").is_file():
        names = json.loads((run.directory / "metrics.json").read_text()).get("class_names")
        if names:
            return list(names)
    if run.config is not None and run.config.data.class_names:
        return list(run.config.data.class_names)
    return [str(index) for index in range(max(num_outputs, 2))]


def _preprocessing(run: Run):
    from cnnviz.data import Preprocessing

    if run.directory is not None and (run.directory / "metrics.json").is_file():
        saved = json.loads((run.directory / "metrics.json").read_text()).get("preprocessing")
        if saved:
            return Preprocessing(
                kind=saved["kind"], divisor=saved["divisor"],
                mean=None if saved["mean"] is None else np.asarray(saved["mean"], np.float32),
                std=None if saved["std"] is None else np.asarray(saved["std"], np.float32),
            )
    return Preprocessing(kind="scale", divisor=255.0)


def load_image_files(paths: Sequence[Path], input_shape: tuple[int, int, int], preprocessing):
    """Read image files, convert to the model's channels and size, preprocess like training."""
    from PIL import Image, UnidentifiedImageError

    height, width, channels = input_shape
    images = []
    for path in paths:
        if not path.is_file():
            raise CnnvizError(f"--images: image file {path} does not exist")
        try:
            with Image.open(path) as image:
                converted = image.convert("L" if channels == 1 else "RGB").resize(
                    (width, height), Image.BILINEAR)
                pixels = np.asarray(converted, dtype=np.float32)
        except UnidentifiedImageError:
            raise CnnvizError(f"--images: {path} is not an image file PIL can read") from None
        images.append(pixels.reshape(height, width, channels))
    return preprocessing.apply(np.stack(images))


def select_images(run: Run, spec: str) -> Selection:
    """The images `--images` names: test-split indices of the run, or image files."""
    input_shape = tuple(int(size) for size in run.model.inputs[0].shape[1:])
    num_outputs = int(run.model.outputs[0].shape[-1])
    class_names = _class_names(run, num_outputs)
    if _looks_like_files(spec):
        paths = [Path(part.strip()) for part in spec.split(",") if part.strip()]
        images = load_image_files(paths, input_shape, _preprocessing(run))
        return Selection(images, np.full(len(paths), -1, np.int32),
                         [path.stem for path in paths], class_names)
    dataset = run.dataset()
    indices = parse_indices(spec, len(dataset.x_test))
    width = len(str(len(dataset.x_test) - 1))
    return Selection(dataset.x_test[indices], dataset.y_test[indices],
                     [f"test_{index:0{width}d}" for index in indices], dataset.class_names)


# -------------------------------------------------------------------------------- batching
def predict_probabilities(model, images: np.ndarray) -> np.ndarray:
    """Class probabilities (N, K) in one batched call; one sigmoid unit becomes two columns."""
    from cnnviz.explain._common import class_probabilities

    return class_probabilities(model.predict_on_batch(images))


def chunks(count: int, size: int = CHUNK) -> Iterator[slice]:
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


def progress_bar(total: int, description: str):
    """A rich progress bar on stderr (quiet when stderr is not a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(
        f"[bold]{description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=True, disable=not console.is_terminal,
    )


def write_per_image(
    selection: Selection,
    folder: Path,
    description: str,
    explain_chunk: Callable[[np.ndarray, np.ndarray], list],
    draw: Callable[[int, object], list[tuple[str, object]]],
) -> list[Path]:
    """Explain `selection` chunk by chunk and save each image's figures.

    Args:
        selection: the images.
        folder: where the PNGs go.
        description: the progress bar's label.
        explain_chunk: (images, labels) -> one payload per image (arrays only).
        draw: (index into the selection, payload) -> [(file name, Figure), ...].

    Returns:
        The paths written, in order.
    """
    written: list[Path] = []
    total = len(selection.images)
    with progress_bar(total, description) as progress:
        task = progress.add_task(description, total=total)
        for part in chunks(total):
            payloads = explain_chunk(selection.images[part], selection.labels[part])
            for offset, payload in enumerate(payloads):
                for name, figure in draw(part.start + offset, payload):
                    written.append(save_figure(figure, folder / name))
                    figure.clear()  # drop the artists now; memory must not grow with the count
            progress.advance(task, len(payloads))
    return written


def caption(selection: Selection, index: int, probabilities: np.ndarray) -> str:
    """`true 3 · predicted 3 (97%)` (or without the true class for an image file)."""
    names = selection.class_names
    predicted = int(np.argmax(probabilities))
    predicted_name = names[predicted] if predicted < len(names) else str(predicted)
    text = f"predicted {predicted_name} ({probabilities[predicted]:.0%})"
    label = int(selection.labels[index])
    if label >= 0:
        true_name = names[label] if label < len(names) else str(label)
        text = f"true {true_name} · {text}"
    return text


# ------------------------------------------------------------------------------ index page
def write_index(folder: Path, title: str, sections: list[tuple[str, list[tuple[Path, str]]]]) -> Path:
    """An index.html showing every figure with its caption, grouped in sections."""
    parts = [
        "<!doctype html>", "<meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;background:#fafafa}"
        "figure{display:inline-block;margin:.5em;vertical-align:top;background:#fff;"
        "padding:.5em;border:1px solid #ddd}img{max-width:520px;display:block}"
        "figcaption{font-size:.85em;color:#333;max-width:520px}</style>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for heading, figures in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for path, text in figures:
            relative = Path(path).resolve().relative_to(folder.resolve())
            parts.append(
                f"<figure><img src='{html.escape(relative.as_posix())}' alt='{html.escape(text)}'>"
                f"<figcaption>{html.escape(text)}</figcaption></figure>"
            )
    return atomic_write_text(folder / "index.html", "\n".join(parts) + "\n")
