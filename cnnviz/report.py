"""Batch figure writing: choose images, explain them in chunks, draw, save, show progress.

This is the glue between the CLI and the pure layers: `cnnviz.explain` computes arrays,
`cnnviz.plot` draws Figures, and this module feeds them chunk by chunk so memory stays flat
however many images are asked for, and writes each PNG atomically.
"""

from __future__ import annotations

import html
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cnnviz.errors import CnnvizError
from cnnviz.runs import Run, atomic_write_text, read_metrics, save_figure
from cnnviz.trust.attribution import predict_probabilities

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


class ImageFiles:
    """Image files as a lazy (N, H, W, C) float32 array of model inputs: indexing reads only the
    files asked for (a chunk at a time), so explaining a folder of any size stays flat.

    The last chunk read is kept, so the figure of image i reads nothing again.

    Args:
        paths: the files.
        input_shape: the model's (H, W, C).
        prepare: 8-bit pixels (N, H, W, C) -> model inputs (`--preprocess` for a bare model);
            None: the pixels themselves, what every cnnviz model of images takes (D1).
        resize: "stretch", "crop" or "pad" (`cnnviz.images.read_images`).
        max_pixels: refuse larger files before decoding them.
    """

    dtype = np.dtype(np.float32)
    ndim = 4

    def __init__(self, paths: Sequence[str | Path], input_shape: tuple[int, int, int], *,
                 prepare: Callable[[np.ndarray], np.ndarray] | None = None,
                 resize: str = "stretch", max_pixels: int | None = None):
        from cnnviz.images import MAX_IMAGE_PIXELS

        self.paths = [str(path) for path in paths]
        self.input_shape = tuple(int(side) for side in input_shape)
        self.prepare = prepare
        self.resize = resize
        self.max_pixels = max_pixels or MAX_IMAGE_PIXELS
        empty = np.zeros((0, *self.input_shape), np.float32)
        self._held: tuple[list[int], np.ndarray, np.ndarray] = ([], empty, empty)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), *self.input_shape)

    def _indices(self, key) -> list[int]:
        if isinstance(key, slice):
            return list(range(len(self))[key])
        return [range(len(self))[int(i)] for i in np.asarray(key).reshape(-1)]

    def _chunk(self, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(pixels, inputs) of `indices`, read unless they are the chunk held."""
        from cnnviz.images import read_images

        held, pixels, inputs = self._held
        if indices == held:
            return pixels, inputs
        if len(indices) == 1 and indices[0] in held:
            at = held.index(indices[0])
            return pixels[at:at + 1], inputs[at:at + 1]
        pixels = read_images([self.paths[i] for i in indices], self.input_shape,
                             max_pixels=self.max_pixels, resize=self.resize)
        inputs = pixels if self.prepare is None else self.prepare(pixels)
        self._held = (indices, pixels, inputs)
        return pixels, inputs

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self._chunk(self._indices([key]))[1][0]
        return self._chunk(self._indices(key))[1]

    def pixels(self, key):
        """The files' own 8-bit pixels at `key` (what figures show)."""
        if isinstance(key, (int, np.integer)):
            return self._chunk(self._indices([key]))[0][0]
        return self._chunk(self._indices(key))[0]

    @property
    def display(self) -> _Display | None:
        """What figures draw when the model input is not the pixels themselves, else None."""
        return None if self.prepare is None else _Display(self)

    def __array__(self, dtype=None, copy=None):
        inputs = self[:]
        return inputs if dtype is None else inputs.astype(dtype)


class _Display:
    """`ImageFiles` pixels scaled to [0, 1], indexed like the images (lazily)."""

    def __init__(self, files: ImageFiles):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key):
        return self.files.pixels(key) / np.float32(255.0)


@dataclass
class Selection:
    """Images to explain, as model inputs, with what is known about them."""

    # (N, H, W, C) float32 model inputs (8-bit pixel units for cnnviz models of images);
    # `ImageFiles` when they come from files, read a chunk at a time.
    images: np.ndarray | ImageFiles
    labels: np.ndarray  # (N,) int32 true class, -1 where unknown
    names: list[str]  # output file-name stems: test_0007, or the image file's stem
    class_names: list[str]
    # What the percentages in captions are: the model's own probabilities, or ours of its logits.
    probability_label: str = "probability"
    # What figures show: the image files' own pixels (scaled to [0, 1]) where the model input
    # is a preprocessed tensor (caffe's BGR, [-1, 1], ...); None: the images themselves.
    display: np.ndarray | _Display | None = None
    files: list[str] | None = None  # the image file each one is, named in the captions

    def shown(self, index: int) -> np.ndarray:
        """The image figures draw for image `index`: never a preprocessed tensor."""
        return (self.display if self.display is not None else self.images)[index]

    def head(self, count: int) -> Selection:
        """The first `count` images."""
        first = slice(0, count)
        return replace(self, images=self.images[first], labels=self.labels[first],
                       names=self.names[first],
                       display=None if self.display is None else self.display[first],
                       files=None if self.files is None else self.files[first])


# ----------------------------------------------------------------------------- image choice
def parse_indices(spec: str, count: int, *, option: str = "--images",
                  domain: str = "the test split") -> list[int]:
    """`0,3,7` or `0:500` or `10:20:2` (Python slices, end exclusive) -> indices below `count`.

    `option` and `domain` name the flag and what it indexes in error messages.
    """
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
                        f"{option} {spec!r}: index {index} is outside {domain} "
                        f"(0..{count - 1})"
                    )
                indices.append(index % count)
        except ValueError:
            alternative = {"--images": "an image file", "--classes": "`all`"}.get(option)
            choices = (f"an index (7), a range (0:500) nor {alternative}" if alternative
                       else "an index (7) nor a range (0:500)")
            raise CnnvizError(f"{option} {spec!r}: {part!r} is neither {choices}") from None
    if not indices:
        nothing = "no image" if option == "--images" else "nothing"
        raise CnnvizError(f"{option} {spec!r} selects {nothing} ({domain} has {count})")
    return indices


def parse_class_spec(spec: str, count: int) -> list[int]:
    """`all`, `0:10` or `3,5` -> class indices below `count` (for --classes)."""
    if spec.strip().lower() == "all":
        return list(range(count))
    return parse_indices(spec, count, option="--classes", domain="the model's classes")


def class_names_of(run: Run, num_outputs: int) -> list[str]:
    """The run's class names (from metrics.json or the config), else "0", "1", ..."""
    names = read_metrics(run.directory).get("class_names")
    if names:
        return list(names)
    if run.config is not None and run.config.data.class_names:
        return list(run.config.data.class_names)
    return [str(index) for index in range(max(num_outputs, 2))]


def _file_names(paths: list[Path]) -> list[str]:
    """Output names for image files: their stems, with parent folders added where stems clash."""
    depth = 1
    while True:
        names = ["_".join(path.with_suffix("").parts[-depth:]) for path in paths]
        if len(set(names)) == len(names) or depth > max(len(path.parts) for path in paths):
            return names if len(set(names)) == len(names) else [
                f"{index:04d}_{name}" for index, name in enumerate(names)]
        depth += 1


def _prepare(run: Run, preprocess: str):
    """pixels -> model inputs for image files, or None when the model takes the pixels.

    A cnnviz run's model begins with its preprocessing layers and takes 8-bit pixels (D1);
    data in other units (npz, inline) gets the file's range mapped onto the model's input range.
    A bare .keras file takes what `--preprocess` says ("auto" resolved, with a note).
    """
    from cnnviz.errors import CnnvizNotice
    from cnnviz.explain._common import input_range
    from cnnviz.preprocess import prepare, resolve_mode

    if run.config is not None:
        low, high = input_range(run.model)
        if (low, high) == (0.0, 255.0):
            return None
        return lambda pixels: low + pixels * np.float32((high - low) / 255.0)
    mode, note = resolve_mode(run.model, preprocess)
    if note:
        warnings.warn(note, CnnvizNotice, stacklevel=3)
    return None if mode == "none" else (lambda pixels: prepare(pixels, mode))


def probability_label(model, output=None) -> str:
    """How captions name the percentages `predict_probabilities` gives for this output."""
    from cnnviz.explain._common import output_activation

    activation = output_activation(model, output)
    if activation == "linear":
        single = int(model.outputs[_output(model, output)].shape[-1]) == 1
        return "sigmoid of the logit" if single else "softmax of the logits"
    return f"{activation} probability"


def _output(model, output) -> int:
    from cnnviz.explain._common import output_index

    return output_index(model, output)


def select_images(run: Run, spec: str, *, output=None, preprocess: str = "auto",
                  resize: str = "stretch") -> Selection:
    """The images `--images` names: test-split indices of the run, or image files.

    Files: comma-separated files, folders and globs (`cnnviz.images.expand_image_spec`), read
    by `cnnviz.images` and resized as `resize` says; a file in a folder named like a class
    (`cat/001.jpg`) gets that class as its true label. A run's model takes the pixels (D1); a
    bare .keras file gets them as `preprocess` says (`cnnviz.preprocess.MODES`; a run refuses
    any but "auto"). Indices into a folder-trained run's test split read only those files,
    from the lists the run recorded. Files are read a chunk at a time, never all at once.
    """
    from cnnviz.explain._compiled import require_built
    from cnnviz.images import expand_image_spec

    require_built(run.model)
    index = _output(run.model, output)
    input_shape = tuple(int(size) for size in run.model.inputs[0].shape[1:])
    num_outputs = int(run.model.outputs[index].shape[-1])
    class_names = class_names_of(run, num_outputs)
    label = probability_label(run.model, index)
    if run.config is not None and preprocess != "auto":
        raise CnnvizError(
            f"--preprocess {preprocess} is for bare .keras files; {run.directory or 'this run'} "
            "prepares images as it recorded when it was trained"
        )
    max_pixels = run.config.data.max_image_pixels if run.config is not None else None
    paths = expand_image_spec(spec)
    if paths is not None:
        labels = np.asarray([class_names.index(path.parent.name)
                             if path.parent.name in class_names else -1 for path in paths],
                            np.int32)
        images = ImageFiles(paths, input_shape, prepare=_prepare(run, preprocess),
                            resize=resize, max_pixels=max_pixels)
        return Selection(images, labels, _file_names(paths), class_names, label,
                         display=images.display, files=[str(path) for path in paths])
    dataset = run.dataset()
    test = dataset.test
    indices = parse_indices(spec, len(test))
    width = len(str(len(test) - 1))
    names = [f"test_{index:0{width}d}" for index in indices]
    if test.files is None:
        return Selection(test.images(indices), test.labels[indices], names, dataset.class_names,
                         label)
    images = ImageFiles(test.paths(indices), input_shape, prepare=_prepare(run, preprocess),
                        max_pixels=max_pixels)
    return Selection(images, test.labels[indices], names, dataset.class_names, label,
                     display=images.display, files=[test.files[index] for index in indices])


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
) -> list[FigureFile]:
    """Explain `selection` chunk by chunk and save each image's figures.

    Args:
        selection: the images.
        folder: where the PNGs go.
        description: the progress bar's label.
        explain_chunk: (images, labels) -> one payload per image (arrays only).
        draw: (index into the selection, payload) -> [(file name, Figure), ...].

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
                for name, figure in draw(part.start + offset, payload):
                    written.append(save_captioned(figure, folder / name))
            progress.advance(task, len(payloads))
    return written


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


# ------------------------------------------------------------------------------ index page
def write_index(folder: Path, title: str, sections: list[tuple[str, list[FigureFile]]]) -> Path:
    """An index.html showing every figure with its caption, grouped in sections.

    Its title and sections are also kept in index.json, so a later command can add a section
    (`add_index_section`).
    """
    atomic_write_text(folder / "index.json", json.dumps({"title": title, "sections": [
        {"heading": heading, "figures": [{"path": str(Path(item.path).resolve()
                                                      .relative_to(folder.resolve())),
                                          "caption": item.caption} for item in figures]}
        for heading, figures in sections]}, indent=1) + "\n")
    parts = [
        "<!doctype html>", "<meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
        ("<style>body{font-family:system-ui,sans-serif;margin:2em;background:#fafafa}"
         "figure{display:inline-block;margin:.5em;vertical-align:top;background:#fff;"
         "padding:.5em;border:1px solid #ddd}img{max-width:520px;display:block}"
         "figcaption{font-size:.85em;color:#333;max-width:520px}</style>"),
        f"<h1>{html.escape(title)}</h1>",
    ]
    for heading, figures in sections:
        parts.extend(_section_html(folder, heading, figures))
    return atomic_write_text(folder / "index.html", "\n".join(parts) + "\n")


def _section_html(folder: Path, heading: str, figures: list[FigureFile]) -> list[str]:
    parts = [f"<h2>{html.escape(heading)}</h2>"]
    for figure_file in figures:
        text = figure_file.caption
        relative = Path(figure_file.path).resolve().relative_to(folder.resolve())
        parts.append(
            f"<figure><img src='{html.escape(relative.as_posix())}' alt='{html.escape(text)}'>"
            f"<figcaption>{html.escape(text)}</figcaption></figure>"
        )
    return parts


def add_index_section(folder: Path, heading: str, figures: list[FigureFile], *,
                      title: str | None = None) -> Path:
    """Add (or replace, by heading) one section of `folder`'s index.html; create the page if
    there is none. `title` is used for a new page only."""
    folder = Path(folder)
    saved = folder / "index.json"
    page_file = folder / "index.html"
    if page_file.is_file() and not saved.is_file():  # a page written before index.json existed
        return atomic_write_text(page_file, page_file.read_text() + "\n".join(
            _section_html(folder, heading, figures)) + "\n")
    sections: list[tuple[str, list[FigureFile]]] = []
    if saved.is_file():
        page = json.loads(saved.read_text())
        title = page["title"]
        sections = [(section["heading"], [FigureFile(folder / item["path"], item["caption"])
                                          for item in section["figures"]])
                    for section in page["sections"] if section["heading"] != heading]
    sections.append((heading, list(figures)))
    return write_index(folder, title or folder.name, sections)


# ------------------------------------------------------------------------- figure commands
# Each returns the PNG paths it wrote. They compute with cnnviz.explain, draw with cnnviz.plot.
def _explained(selection: Selection, index: int, target: int, probabilities: np.ndarray) -> str:
    names = selection.class_names
    target_name = names[target] if target < len(names) else str(target)
    return f"for class {target_name!r} — {caption(selection, index, probabilities)}"


def _chunk_targets(target: int | None, probabilities: np.ndarray) -> np.ndarray:
    if target is None:
        return np.argmax(probabilities, axis=1).astype(np.int32)
    if not 0 <= target < probabilities.shape[1]:
        raise CnnvizError(
            f"--target {target} is not a class of this model (0..{probabilities.shape[1] - 1})"
        )
    return np.full(len(probabilities), target, np.int32)


def saliency_figures(model, selection: Selection, folder: Path, *, methods: Sequence[str],
                     target: int | None = None, samples: int = 20, noise: float = 0.15,
                     seed: int = 0, output=None) -> list[FigureFile]:
    """One figure per image: the input next to each saliency method's map."""
    from cnnviz.explain import saliency
    from cnnviz.plot import saliency_row

    suffix = "all" if len(methods) > 1 else methods[0]

    def explain_chunk(images, labels):
        probabilities = predict_probabilities(model, images, output=output)
        targets = _chunk_targets(target, probabilities)
        maps = {method: saliency(model, images, targets, method=method, samples=samples,
                                 noise=noise, seed=seed, output=output) for method in methods}
        return [(probabilities[i], targets[i], {m: maps[m][i] for m in methods})
                for i in range(len(images))]

    def draw(index, payload):
        probabilities, explained, maps = payload
        title = f"Saliency {_explained(selection, index, explained, probabilities)}"
        figure = saliency_row(selection.shown(index), maps, title=title)
        return [(f"{selection.names[index]}_{suffix}.png", figure)]

    return write_per_image(selection, folder, f"saliency ({suffix})", explain_chunk, draw)


def gradcam_figures(model, selection: Selection, folder: Path, *, layer: str | None = None,
                    guided: bool = False, target: int | None = None,
                    output=None) -> list[FigureFile]:
    """One figure per image: the Grad-CAM heatmap over the input (and Guided Grad-CAM)."""
    from cnnviz.explain import gradcam, gradcam_layer
    from cnnviz.plot import gradcam_figure

    layer_name = gradcam_layer(model, layer)

    def explain_chunk(images, labels):
        probabilities = predict_probabilities(model, images, output=output)
        targets = _chunk_targets(target, probabilities)
        heatmaps = gradcam(model, images, targets, layer=layer_name, output=output)
        guided_maps = (gradcam(model, images, targets, layer=layer_name, guided=True,
                               output=output) if guided else None)
        return [(probabilities[i], targets[i], heatmaps[i],
                 None if guided_maps is None else guided_maps[i]) for i in range(len(images))]

    def draw(index, payload):
        probabilities, explained, heatmap, guided_map = payload
        title = (f"Grad-CAM on {layer_name} "
                 f"{_explained(selection, index, explained, probabilities)}")
        figure = gradcam_figure(selection.shown(index), heatmap, title=title,
                                guided_map=guided_map)
        return [(f"{selection.names[index]}.png", figure)]

    return write_per_image(selection, folder, f"grad-cam ({layer_name})", explain_chunk, draw)


def file_stem(layer_path: str) -> str:
    """A layer path as part of a file name: `base/conv1` -> `base__conv1`."""
    return layer_path.replace("/", "__")


def cam_figures(model, selection: Selection, folder: Path, *, methods: Sequence[str],
                layer: str | None = None, target: int | None = None,
                output=None) -> list[FigureFile]:
    """One figure per image: the input next to each CAM method's heatmap over it."""
    from cnnviz.explain import cam, gradcam_layer
    from cnnviz.plot import cam_row

    layer_name = gradcam_layer(model, layer)
    suffix = "all" if len(methods) > 1 else methods[0]

    def explain_chunk(images, labels):
        probabilities = predict_probabilities(model, images, output=output)
        targets = _chunk_targets(target, probabilities)
        maps = {method: cam(model, images, targets, method=method, layer=layer_name,
                            output=output)
                for method in methods}
        return [(probabilities[i], targets[i], {m: maps[m][i] for m in methods})
                for i in range(len(images))]

    def draw(index, payload):
        probabilities, explained, maps = payload
        title = (f"CAM on {layer_name} {_explained(selection, index, explained, probabilities)}"
                 + (" (eigencam: class-agnostic)" if "eigencam" in maps else ""))
        return [(f"{selection.names[index]}_{suffix}.png",
                 cam_row(selection.shown(index), maps, title=title))]

    return write_per_image(selection, folder, f"cam ({suffix}, {layer_name})", explain_chunk,
                           draw)


CAM_FAMILY = "Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM, Score-CAM, Eigen-CAM"
SIGNED_HEADING = ("Signed attributions: integrated gradients (64 steps from a black image) and "
                  "gradient x input; red for the class, blue against")
SIGNED_METHODS = ("integrated_gradients", "gradient_x_input")
_SIGNED_TITLES = {"integrated_gradients": "integrated gradients",
                  "gradient_x_input": "gradient x input"}


def signed_figures(model, selection: Selection, folder: Path, *, methods: Sequence[str],
                   steps: int = 64, baseline: float | str = 0.0,
                   target: int | None = None, output=None) -> list[FigureFile]:
    """One figure per image: signed attribution maps (red for the class, blue against).

    Under integrated gradients, the completeness check: the attributions' sum beside
    score(image) - score(baseline), which it must equal up to the integration error.
    """
    from cnnviz.explain import gradient_x_input, integrated_gradients
    from cnnviz.explain.integrated_gradients import score_difference
    from cnnviz.plot import signed_row

    suffix = "all" if len(methods) > 1 else methods[0]

    def explain_chunk(images, labels):
        probabilities = predict_probabilities(model, images, output=output)
        targets = _chunk_targets(target, probabilities)
        maps, notes = {}, [{} for _ in images]
        if "integrated_gradients" in methods:
            maps["integrated_gradients"] = integrated_gradients(
                model, images, targets, baseline=baseline, steps=steps, output=output)
            totals = maps["integrated_gradients"].sum(axis=(1, 2, 3))
            expected = score_difference(model, images, targets, baseline=baseline,
                                        output=output)
            for i, (total, difference) in enumerate(zip(totals, expected)):
                gap = abs(total - difference) / max(abs(difference), 1e-12)
                notes[i]["integrated gradients"] = (
                    f"sum {total:.3g} vs score(x) - score(x') {difference:.3g} ({gap:.1%} off)")
        if "gradient_x_input" in methods:
            maps["gradient_x_input"] = gradient_x_input(model, images, targets, output=output)
        return [(probabilities[i], targets[i],
                 {_SIGNED_TITLES[m]: maps[m][i] for m in methods}, notes[i])
                for i in range(len(images))]

    described = f"{steps} steps from {baseline!r}" if "integrated_gradients" in methods else ""

    def draw(index, payload):
        probabilities, explained, maps, notes = payload
        title = (f"Signed attribution {_explained(selection, index, explained, probabilities)}"
                 f"\n{described + '; ' if described else ''}red: for the class, blue: against")
        return [(f"{selection.names[index]}_{suffix}.png",
                 signed_row(selection.shown(index), maps, title=title, notes=notes))]

    return write_per_image(selection, folder, f"signed ({suffix})", explain_chunk, draw)


def rise_figures(model, selection: Selection, folder: Path, *, masks: int = 2000, cell: int = 7,
                 keep: float = 0.5, seed: int = 0,
                 target: int | None = None, output=None) -> list[FigureFile]:
    """One figure per image: the RISE map over the input, scaled per image."""
    from cnnviz.explain import rise
    from cnnviz.plot import cam_row
    from cnnviz.plot.display import normalize01

    def explain_chunk(images, labels):
        probabilities = predict_probabilities(model, images, output=output)
        targets = _chunk_targets(target, probabilities)
        maps = rise(model, images, targets, masks=masks, cell=cell, keep=keep, seed=seed,
                    output=output)
        return [(probabilities[i], targets[i], maps[i]) for i in range(len(images))]

    def draw(index, payload):
        probabilities, explained, saliency = payload
        title = (f"RISE, {masks} masks {_explained(selection, index, explained, probabilities)}"
                 f"\nE[P(class) | pixel kept] from {saliency.min():.2f} (blue) to "
                 f"{saliency.max():.2f} (red)")
        figure = cam_row(selection.shown(index), {"RISE": normalize01(saliency)}, title=title,
                         label="scaled to its own range")
        return [(f"{selection.names[index]}.png", figure)]

    return write_per_image(selection, folder, f"rise ({masks} masks)", explain_chunk, draw)


def occlusion_figures(model, selection: Selection, folder: Path, *, patch: int = 4,
                      stride: int | None = None, fill: float = 0.5,
                      target: int | None = None, output=None) -> list[FigureFile]:
    """One figure per image: input, P(target) under occlusion, and the predicted-class map."""
    from cnnviz.explain import occlusion
    from cnnviz.plot import occlusion_figure

    def explain_chunk(images, labels):
        probabilities = predict_probabilities(model, images, output=output)
        targets = _chunk_targets(target, probabilities)
        result = occlusion(model, images, targets, patch=patch, stride=stride, fill=fill,
                           output=output)
        return [(probabilities[i], targets[i], result.probability[i], result.predicted_class[i],
                 result.unoccluded_probability[i]) for i in range(len(images))]

    def draw(index, payload):
        probabilities, explained, probability_map, class_map, intact = payload
        label = int(selection.labels[index])
        figure = occlusion_figure(
            selection.shown(index), probability_map, class_map,
            class_names=selection.class_names, target_label=int(explained),
            true_label=label if label >= 0 else None,
            predicted_label=int(np.argmax(probabilities)), unoccluded_probability=float(intact),
            title=f"Occlusion, {patch}x{patch} patches at {fill:g} of the input range — "
                  f"{caption(selection, index, probabilities)}")
        return [(f"{selection.names[index]}.png", figure)]

    return write_per_image(selection, folder, "occlusion", explain_chunk, draw)


def feature_map_figures(model, selection: Selection, folder: Path, *, layers: Sequence[str],
                        max_channels: int | None = 64, output=None) -> list[FigureFile]:
    """One figure per image and layer: the input and the layer's (most active) feature maps.

    All layers come from one forward pass per chunk of images (`layer_activations`).
    """
    from cnnviz.explain.layers import layer_activations
    from cnnviz.plot import feature_maps_grid

    def explain_chunk(images, labels):
        probabilities = predict_probabilities(model, images, output=output)
        activations = layer_activations(model, images, layers, max_channels=max_channels,
                                        output=output)
        return [(probabilities[i], {path: (found.maps[i], found.channels[i], found.total_channels)
                                    for path, found in activations.items()})
                for i in range(len(images))]

    def draw(index, payload):
        probabilities, maps = payload
        return [(f"{selection.names[index]}_{file_stem(path)}.png",
                 feature_maps_grid(selection.shown(index), layer_maps, layer_name=path,
                                   channels=channels, total_channels=total,
                                   max_maps=len(channels),
                                   title=f"Feature maps of {path} — "
                                         f"{caption(selection, index, probabilities)}"))
                for path, (layer_maps, channels, total) in maps.items()]

    return write_per_image(selection, folder, "feature maps", explain_chunk, draw)


def conv_layer_names(model) -> list[str]:
    """Paths of the Conv2D and SeparableConv2D layers, nested models opened: the layers
    `feature-maps` shows without `--layer` (depthwise layers, one per expansion in MobileNets,
    would add half as many figures again; name them with --layer)."""
    from cnnviz.explain.layers import kernel_paths

    return kernel_paths(model, ("Conv2D", "SeparableConv2D"))


def kernel_layer_names(model) -> list[str]:
    """Paths of every layer with spatial kernels (Conv2D, DepthwiseConv2D, SeparableConv2D),
    nested models opened: what `filters` draws without `--layer`."""
    from cnnviz.explain.layers import kernel_paths

    return kernel_paths(model)


def filter_figures(model, folder: Path, *, layers: Sequence[str]) -> list[FigureFile]:
    """One figure per conv layer: its kernels."""
    from cnnviz.explain import filters
    from cnnviz.plot import filters_grid

    written = []
    with progress_bar(len(layers), "filters") as progress:
        task = progress.add_task("filters", total=len(layers))
        for layer in layers:
            kernels = filters(model, layer)
            written.append(save_captioned(filters_grid(kernels, title=f"Filters of {layer}"),
                                          folder / f"{file_stem(layer)}.png"))
            progress.advance(task)
    return written


def activation_max_figure(model, folder: Path, *, class_names: Sequence[str],
                          layer: str | None = None, indices: Sequence[int] | None = None,
                          steps: int = 256, seed: int = 0, output=None,
                          preprocess: str | None = None) -> FigureFile:
    """One grid: the input that maximizes each class score (or each chosen filter of `layer`).

    Classes default to the first 10 (filters to the first 16), with a progress bar per chunk
    of images. The images are optimized in the model's input range: `_common.input_range`, or
    the range of the `cnnviz.preprocess` mode `preprocess` (a bare .keras file), and drawn as
    pixels (that mode undone: caffe's BGR becomes RGB).
    """
    from cnnviz.explain import activation_maximization_batch
    from cnnviz.plot import activation_max_grid
    from cnnviz.preprocess import to_pixels, value_range

    if layer is None:
        indices = list(indices if indices is not None else range(min(len(class_names), 10)))
        labels = [class_names[index] if index < len(class_names) else str(index)
                  for index in indices]
        title, name = "Activation maximization: the input each class wants most", "classes.png"
    else:
        from cnnviz.explain._common import get_layer

        channels = int(get_layer(model, layer).output.shape[-1])
        indices = list(indices if indices is not None else range(min(channels, 16)))
        labels = [f"filter {index}" for index in indices]
        title = f"Activation maximization of {layer}'s filters"
        name = f"{file_stem(layer)}.png"
    height = int(model.inputs[0].shape[1])
    # The library's defaults suit 8x8 inputs; from ~20 px up, stronger smoothing (chosen by eye
    # on 28x28 digits, every class still the top prediction) keeps the images readable.
    smoothing = ({"learning_rate": 0.02, "l2": 0.2, "tv": 0.5, "blur_sigma": 1.0}
                 if height >= 20 else {})
    input_range = None if preprocess is None else value_range(preprocess)
    with progress_bar(len(indices), "activation maximization") as progress:
        task = progress.add_task("activation maximization", total=len(indices))
        images = activation_maximization_batch(
            model, layer, indices, steps=steps, seed=seed, output=output,
            input_range=input_range, progress=lambda done: progress.advance(task, done),
            **smoothing)
    if preprocess is not None:
        images = to_pixels(images, preprocess) / np.float32(255.0)
    return save_captioned(activation_max_grid(images, labels, title=title), folder / name)


def predicted_classes(model, images: np.ndarray, *, output=None, limit: int = 64) -> list[int]:
    """The distinct classes the model predicts for `images`, in order of first appearance."""
    predicted = predict_probabilities(model, images, output=output).argmax(axis=-1)
    return [int(label) for label in dict.fromkeys(predicted.tolist())][:limit]


def one_per_class(labels: np.ndarray, limit: int = 10) -> str:
    """An `--images` spec naming the first test image of each class (at most `limit`)."""
    firsts = sorted(int(np.flatnonzero(labels == label)[0]) for label in np.unique(labels))
    return ",".join(str(index) for index in firsts[:limit])


def all_figures(run: Run, selection: Selection, folder: Path, *, feature_map_images: int = 2,
                activation_max_steps: int = 256,
                conv_layers: Sequence[str] | None = None) -> list[tuple[str, list[FigureFile]]]:
    """Every figure type for `selection`, grouped as the index page shows them (filters and
    feature maps of `conv_layers`, default every conv layer)."""
    from cnnviz.explain import CAM_METHODS, SALIENCY_METHODS, gradcam_layer

    model = run.model
    conv_layers = list(conv_layers or conv_layer_names(model))
    first_images = selection.head(feature_map_images)
    layer = gradcam_layer(model)
    return [
        ("Saliency: vanilla, guided backpropagation, rectified (deconvnet), SmoothGrad",
         saliency_figures(model, selection, folder / "saliency", methods=SALIENCY_METHODS)),
        (f"Grad-CAM and Guided Grad-CAM (layer {layer})",
         gradcam_figures(model, selection, folder / "gradcam", layer=layer, guided=True)),
        (f"The CAM family on layer {layer}: {CAM_FAMILY}",
         cam_figures(model, selection, folder / "cam", methods=CAM_METHODS, layer=layer)),
        (SIGNED_HEADING,
         signed_figures(model, selection, folder / "signed", methods=SIGNED_METHODS)),
        ("RISE: randomized input sampling (2000 masks)",
         rise_figures(model, selection, folder / "rise",
                      cell=min(7, *selection.images.shape[1:3]))),
        ("Occlusion sensitivity", occlusion_figures(model, selection, folder / "occlusion")),
        ("Activation maximization",
         [activation_max_figure(model, folder / "activation-max",
                                class_names=selection.class_names, steps=activation_max_steps)]),
        ("Convolution filters",
         filter_figures(model, folder / "filters", layers=kernel_layer_names(model))),
        ("Feature maps",
         feature_map_figures(model, first_images, folder / "feature-maps", layers=conv_layers)),
    ]


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

    `methods`: registry names (default: every method of `cnnviz.trust.attribution.METHODS`).
    """
    from cnnviz.plot.trust import sanity_curves_figure, sanity_maps_figure
    from cnnviz.runs import atomic_write_json
    from cnnviz.trust.attribution import METHODS
    from cnnviz.trust.sanity import class_sensitivity, format_class_sensitivity, model_randomization

    methods = tuple(methods or METHODS)
    result = model_randomization(model, selection.images, seed=seed, methods=methods)
    classes = class_sensitivity(model, selection.images, methods=methods)
    text = result.format_table() + "\n\n" + format_class_sensitivity(classes)
    atomic_write_text(folder / "sanity.txt", text + "\n")
    data_file = atomic_write_json(folder / "sanity.json", {
        "images": selection.names, "model_randomization": result.to_dict(),
        "class_sensitivity": classes})
    figures = [save_captioned(sanity_maps_figure(result), folder / "sanity_maps.png"),
               save_captioned(sanity_curves_figure(result), folder / "sanity_curves.png")]
    flagged = any(result.insensitive_to.values()) or any(
        entry.get("class_insensitive") for entry in classes.values() if isinstance(entry, dict))
    return Report(text, figures, data_file, flagged)


def faithfulness_report(model, selection: Selection, folder: Path, *, steps: int = 20,
                        baseline: str = "blur", seed: int = 0,
                        methods: Sequence[str] | None = None) -> Report:
    """Deletion and insertion curves per method vs a random order: table, JSON and a figure.

    `methods`: registry names (default: every method of `cnnviz.trust.attribution.METHODS`).
    """
    from cnnviz.plot.trust import faithfulness_figure
    from cnnviz.runs import atomic_write_json
    from cnnviz.trust.attribution import METHODS
    from cnnviz.trust.faithfulness import deletion_insertion

    result = deletion_insertion(model, selection.images, steps=steps, baseline=baseline,
                                seed=seed, methods=tuple(methods or METHODS))
    text = result.format_table()
    atomic_write_text(folder / "faithfulness.txt", text + "\n")
    data_file = atomic_write_json(folder / "faithfulness.json",
                                  {"images": selection.names, **result.to_dict()})
    figures = [save_captioned(faithfulness_figure(result), folder / "faithfulness.png")]
    return Report(text, figures, data_file, bool(result.called_out))


def shortcut_files(run: Run, folder: Path, *, count: int = 64,
                   methods: Sequence[str] | None = None) -> Report:
    """The shortcut report of a run trained on data with a spurious cue (`methods`: registry
    names, default every method)."""
    from cnnviz.plot.trust import shortcut_figure
    from cnnviz.runs import atomic_write_json
    from cnnviz.trust.shortcut import shortcut_report

    cue = run.config.data.shapes.spurious if run.config is not None else None
    from cnnviz.trust.attribution import METHODS

    result = shortcut_report(run.model, run.dataset(), count=count, cue=cue,
                             methods=tuple(methods or METHODS))
    text = result.format_table()
    atomic_write_text(folder / "shortcut.txt", text + "\n")
    data_file = atomic_write_json(folder / "shortcut.json", result.to_dict())
    figures = [save_captioned(shortcut_figure(result), folder / "shortcut.png")]
    return Report(text, figures, data_file, bool(result.relies_on_cue))
