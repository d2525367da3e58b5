"""Exemplar grids and their numbers: per layer (and for the classes) one PNG, rows the units,
columns the ranks, and a JSON beside it with every exemplar's image, position, activation and
input box."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cnnviz.io.atomic import atomic_write_json
from cnnviz.report.batching import FigureFile, save_captioned
from cnnviz.report.figures import file_stem, synthesized
from cnnviz.report.selection import Selection, parse_indices


def exemplar_figures(
    model,
    selection: Selection,
    folder: Path,
    *,
    layers: Sequence[str] = (),
    filters: str | None = None,
    classes: Sequence[int] | None = None,
    top: int = 9,
    with_synthetic: bool = False,
    steps: int = 256,
    seed: int = 0,
    output=None,
    preprocess: str | None = None,
) -> list[FigureFile]:
    """Write `<layer>.png` + `<layer>.json` per layer and `classes.png` + `classes.json`.

    Args:
        model: the model explained.
        selection: the data set ranked (streamed a chunk at a time).
        folder: where the files go.
        layers: layers whose channels are ranked.
        filters: `--filters` of each layer (`0:8`, `1,5`); None: the first 16 channels.
        classes: classes ranked by their score (None: no class grid).
        top: exemplars per unit.
        with_synthetic: head each row with the unit's activation-maximization image.
        steps, seed: of that activation maximization.
        output: which output of a multi-output model.
        preprocess: a bare model's input mode (how a synthetic image is drawn as pixels).

    Returns:
        The PNGs and JSONs written (a JSON's caption names its PNG).
    """
    from cnnviz.explain.exemplars import class_exemplars, unit_exemplars
    from cnnviz.model.graph import find_layer

    written = []
    for layer in layers:
        path = find_layer(model, layer).path
        count = _channels(model, path)
        units = (parse_indices(filters, count, option="--filters",
                               domain=f"{path}'s {count} filters")
                 if filters else list(range(min(count, 16))))
        found = unit_exemplars(model, selection.images, path, units, top=top)
        # A filter whose best image gives 0 fires on none of them (a dead ReLU): its tiles are
        # just the first images, and the row says so.
        labels = [f"filter {unit}" + ("\nnever active" if not np.any(values) else "")
                  for unit, values in zip(found.units, found.activations)]
        written += _write(found, selection, folder / f"{file_stem(path)}.png", labels,
                          f"Exemplars of {path}: the {top} images that activate each filter most",
                          _synthetic(model, path, found, with_synthetic, steps, seed, output,
                                     preprocess))
    if classes is not None:
        found = class_exemplars(model, selection.images, classes, top=top, output=output)
        names = selection.class_names
        labels = [names[unit] if unit < len(names) else str(unit) for unit in found.units]
        written += _write(found, selection, folder / "classes.png", labels,
                          f"Exemplars of the classes: the {top} images with the highest score",
                          _synthetic(model, None, found, with_synthetic, steps, seed, output,
                                     preprocess))
    return written


def _channels(model, path: str) -> int:
    from cnnviz.model.compiled import model_copy
    from cnnviz.model.graph import layer_tensor

    return int(layer_tensor(model_copy(model, "output", output=0).model, path).shape[-1])


def _synthetic(model, layer, found, wanted: bool, steps: int, seed: int, output,
               preprocess) -> np.ndarray | None:
    if not wanted:
        return None
    return synthesized(model, layer=layer, indices=found.units.tolist(), steps=steps, seed=seed,
                       output=output, preprocess=preprocess)[1]


def exemplar_records(found, selection: Selection) -> list[dict]:
    """One dict per exemplar: unit, rank, index (in the data ranked), name, file (or None),
    position (row, col in the layer's grid; None for classes), activation, box."""
    records = []
    for row, unit in enumerate(found.units):
        for rank, index in enumerate(found.images[row]):
            index = int(index)
            records.append({
                "unit": int(unit), "rank": rank, "index": index,
                "name": selection.names[index],
                "file": selection.files[index] if selection.files is not None else None,
                "position": (None if found.layer is None
                             else [int(value) for value in found.positions[row, rank]]),
                "activation": float(found.activations[row, rank]),
                "box": [int(value) for value in found.boxes[row, rank]],
            })
    return records


def _write(found, selection: Selection, path: Path, labels: list[str], title: str,
           synthetic) -> list[FigureFile]:
    from cnnviz.plot import exemplar_grid

    images = [[selection.shown(int(index)) for index in row] for row in found.images]
    captions = [[f"{_shown_name(selection, int(index))}\n{value:.4g}"
                 for index, value in zip(row, values)]
                for row, values in zip(found.images, found.activations)]
    figure = save_captioned(exemplar_grid(images, found.boxes, captions, labels,
                                          synthetic=synthetic, title=title), path)
    payload = {
        "layer": found.layer,
        "units": "classes" if found.layer is None else "filters",
        "images": len(selection.images),
        "box": "top, left, bottom, right in input pixels; bottom and right exclusive",
        "exemplars": exemplar_records(found, selection),
    }
    data = atomic_write_json(path.with_suffix(".json"), payload)
    return [figure, FigureFile(data, f"the numbers of {path.name}")]


def _shown_name(selection: Selection, index: int) -> str:
    if selection.files is not None:
        return Path(selection.files[index]).name
    return selection.names[index].replace("_", " ")
