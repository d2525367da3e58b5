"""Writing figures in chunks: a progress bar, captions beside each PNG, arrays beside each figure
on request."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnviz.io.atomic import save_figure
from cnnviz.report.selection import Selection

CHUNK = 64  # images explained per batch: big enough to amortize, small enough to stay flat


@dataclass(frozen=True)
class FigureFile:
    """A PNG that was written, with the caption the index page shows under it."""

    path: Path
    caption: str


def save_captioned(figure, path: Path) -> FigureFile:
    """Save a figure; its title (suptitle, else the first panel's) becomes its caption."""
    from cnnviz.plot.display import release

    title = figure.get_suptitle() or (figure.axes[0].get_title() if figure.axes else "")
    lines = title.splitlines()
    # A title's lines as one caption: "Filters of conv1; 16 filters, 3x3, ...".
    title = " ".join([line if line.endswith((";", ":", ",", ".")) else f"{line};"
                      for line in lines[:-1]] + lines[-1:])
    written = FigureFile(save_figure(figure, path), title)
    release(figure)  # drop the artists now; memory must not grow with the count
    return written


# ---------------------------------------------------------------------- drawing elsewhere
@dataclass(frozen=True)
class Drawing:
    """A figure still to draw: a cnnviz.plot function and its arguments (arrays, strings), so
    that another process can draw it."""

    function: Callable
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def figure(self):
        return self.function(*self.args, **self.kwargs)


def drawing(function: Callable, *args, **kwargs) -> Drawing:
    return Drawing(function, args, kwargs)


def _draw_and_save(figure: Drawing, path: Path) -> FigureFile:
    return save_captioned(figure.figure(), path)


def _import_plotting() -> None:
    import cnnviz.plot  # noqa: F401


class _PendingFigure:
    """A FigureFile whose PNG another process is drawing; its caption waits for it."""

    def __init__(self, path: Path, future) -> None:
        self.path, self._future = path, future

    @property
    def caption(self) -> str:
        return self._future.result().caption


class _DrawingProcess:
    """Processes that only draw (matplotlib, no TensorFlow): while they render figures, the
    caller computes the next maps and the trust checks. Two: TensorFlow leaves part of two
    cores idle on small models, and one drawing process alone fell behind."""

    def __init__(self, workers: int = 2, most_pending: int = 64) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a fresh interpreter, never a fork of a process running TensorFlow
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        # Start them now (they import matplotlib and the plot functions while the caller works).
        self.pending: deque = deque(self.pool.submit(_import_plotting) for _ in range(workers))
        self.most_pending = most_pending

    def submit(self, figure: Drawing, path: Path) -> _PendingFigure:
        while len(self.pending) >= self.most_pending:  # memory stays bounded
            self.pending.popleft().result()
        future = self.pool.submit(_draw_and_save, figure, path)
        self.pending.append(future)
        return _PendingFigure(path, future)

    def finish(self) -> None:
        """Wait for every figure; the first error a drawing raised is raised here."""
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(cancel_futures=True)


_DRAWER: _DrawingProcess | None = None


@contextmanager
def drawing_in_background():
    """Inside this block, `write_per_image` hands its figures to a drawing process; every
    figure is on disk when the block ends (errors raised there)."""
    global _DRAWER
    if _DRAWER is not None:  # already drawing in the background
        yield
        return
    _DRAWER = _DrawingProcess()
    try:
        yield
        _DRAWER.finish()
    finally:
        if _DRAWER.pending:
            _DRAWER.pool.shutdown(cancel_futures=True)
        _DRAWER = None


def save_drawing(figure, path: Path):
    """Save a Figure, or a Drawing (in the drawing process when one is running)."""
    if isinstance(figure, Drawing):
        if _DRAWER is not None:
            return _DRAWER.submit(figure, path)
        figure = figure.figure()
    return save_captioned(figure, path)


# -------------------------------------------------------------------------------- batching
def chunks(count: int, size: int | None = None) -> Iterator[slice]:
    size = size or CHUNK
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
    arrays: Callable[[object], dict[str, np.ndarray]] | None = None,
) -> list[FigureFile]:
    """Explain `selection` chunk by chunk and save each image's figures.

    Args:
        selection: the images.
        folder: where the PNGs go.
        description: the progress bar's label.
        explain_chunk: (images, labels) -> one payload per image (arrays only).
        draw: (index into the selection, payload) -> [(file name, Figure or Drawing), ...].
        arrays: payload -> {name: array}, saved beside the image's first figure as
            `<figure stem>.npz` (`--save-arrays`); None saves none.

    Returns:
        The files written, in order.
    """
    written: list[FigureFile] = []
    total = len(selection.images)
    with progress_bar(total, description) as progress:
        task = progress.add_task(description, total=total)
        for part in chunks(total):
            payloads = explain_chunk(selection.images[part], selection.labels[part])
            for offset, payload in enumerate(payloads):
                figures = draw(part.start + offset, payload)
                for name, figure in figures:
                    written.append(save_drawing(figure, folder / name))
                if arrays is not None and figures:
                    save_arrays(folder / Path(figures[0][0]).with_suffix(".npz"),
                                arrays(payload))
            progress.advance(task, len(payloads))
    return written


def save_arrays(path: Path, values: dict[str, np.ndarray]) -> Path:
    """The numbers behind a figure as one .npz file (written atomically)."""
    import io

    from cnnviz.io.atomic import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in values.items()})
    return atomic_write_bytes(path, buffer.getvalue())


def _explained_arrays(probabilities, target, maps: dict) -> dict[str, np.ndarray]:
    """What every figure's .npz holds: its maps, the class explained, the probabilities."""
    return {**maps, "target": np.int32(target), "probabilities": probabilities}


def caption(selection: Selection, index: int, probabilities: np.ndarray) -> str:
    """`true 3 · predicted 3 (97% softmax probability)`, after the image's file when it has one
    (`cat/01.jpg · ...`), without the true class when it is unknown."""
    names = selection.class_names
    predicted = int(np.argmax(probabilities))
    predicted_name = names[predicted] if predicted < len(names) else str(predicted)
    text = (f"predicted {predicted_name} ({probabilities[predicted]:.0%} "
            f"{selection.probability_label})")
    label = int(selection.labels[index])
    if label >= 0:
        true_name = names[label] if label < len(names) else str(label)
        text = f"true {true_name} · {text}"
    if selection.files is not None:
        text = f"{selection.files[index]} · {text}"
    return text
