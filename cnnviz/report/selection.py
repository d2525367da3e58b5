"""Which images a command explains: test-split indices or image files, read and prepared for the
model, with names, labels and display pixels."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cnnviz.errors import CnnvizError
from cnnviz.runs.load import Run, read_metrics


class ImageFiles:
    """Image files as a lazy (N, H, W, C) float32 array of model inputs: indexing reads only the
    files asked for (a chunk at a time), so explaining a folder of any size stays flat.

    The last chunk read is kept, so the figure of image i reads nothing again.

    Args:
        paths: the files.
        input_shape: the model's (H, W, C).
        prepare: 8-bit pixels (N, H, W, C) -> model inputs (`--preprocess` for a bare model);
            None: the pixels themselves, what every cnnviz model of images takes
            (docs/decisions.md D1).
        resize: "stretch", "crop" or "pad" (`cnnviz.images.read_images`).
        max_pixels: refuse larger files before decoding them.
    """

    dtype = np.dtype(np.float32)
    ndim = 4

    def __init__(self, paths: Sequence[str | Path], input_shape: tuple[int, int, int], *,
                 prepare: Callable[[np.ndarray], np.ndarray] | None = None,
                 resize: str = "stretch", max_pixels: int | None = None):
        from cnnviz.data.images import MAX_IMAGE_PIXELS

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
        from cnnviz.data.images import read_images

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

    def part(self, where: slice) -> ImageFiles:
        """The files at `where`, as lazy as these."""
        return ImageFiles(self.paths[where], self.input_shape, prepare=self.prepare,
                          resize=self.resize, max_pixels=self.max_pixels)

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
    # (lows, highs) per channel of the inputs as prepared (`cnnviz.model.inputs.channel_range`):
    # black, white and mid-grey for every fill, mask and baseline; None: the model's own.
    input_range: tuple[np.ndarray, np.ndarray] | None = None

    def shown(self, index: int) -> np.ndarray:
        """The image figures draw for image `index`: never a preprocessed tensor."""
        return (self.display if self.display is not None else self.images)[index]

    def head(self, count: int) -> Selection:
        """The first `count` images."""
        return self.part(slice(0, count))

    def part(self, where: slice) -> Selection:
        """The images at `where`; image files stay files, read when asked for."""
        if isinstance(self.images, ImageFiles):
            images = self.images.part(where)
            display = images.display
        else:
            images = self.images[where]
            display = None if self.display is None else self.display[where]
        return replace(self, images=images, labels=self.labels[where], names=self.names[where],
                       display=display, files=None if self.files is None else self.files[where])


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


def parse_shard(spec: str) -> tuple[int, int]:
    """`--shard K/N` -> (K, N): share K (0-based, as Slurm's array index from 0 and Kubernetes'
    JOB_COMPLETION_INDEX) of N."""
    try:
        index, total = (int(part) for part in spec.split("/"))
    except ValueError:
        raise CnnvizError(f"--shard {spec!r} is not K/N (e.g. 0/4: the first of 4 shares)"
                          ) from None
    if total < 1 or not 0 <= index < total:
        raise CnnvizError(f"--shard {spec!r}: K must be 0..N-1 (0-based) and N at least 1")
    return index, total


def shard_range(count: int, shard: tuple[int, int] | None) -> range:
    """The contiguous block of `count` items share `shard` takes (all of them for None): the
    shares in order are the items in order, so their outputs concatenate. An empty share is
    one line (fewer inputs than shares)."""
    if shard is None:
        return range(count)
    index, total = shard
    share = range(index * count // total, (index + 1) * count // total)
    if not share:
        raise CnnvizError(f"--shard {index}/{total}: {count} inputs leave this share empty; use "
                          "fewer shares")
    return share


def shard_file(path: Path, shard: tuple[int, int]) -> Path:
    """`preds.csv` -> `preds.shard-01-of-12.csv`: K zero-padded, so the shares sort in order."""
    index, total = shard
    width = len(str(total - 1))
    return path.with_name(f"{path.stem}.shard-{index:0{width}d}-of-{total}{path.suffix}")


def parse_class_spec(spec: str, count: int) -> list[int]:
    """`all`, `0:10` or `3,5` -> class indices below `count` (for --classes)."""
    if spec.strip().lower() == "all":
        return list(range(count))
    return parse_indices(spec, count, option="--classes", domain="the model's classes")


def class_names_of(run: Run, num_outputs: int) -> list[str]:
    """The names given for a bare model, the run's class names (from metrics.json or the
    config), else "0", "1", ..."""
    if run.class_names is not None:
        return list(run.class_names)
    names = read_metrics(run.directory).get("class_names")
    if names:
        return list(names)
    if run.config is not None and run.config.data.class_names:
        return list(run.config.data.class_names)
    return [str(index) for index in range(max(num_outputs, 2))]


def given_class_names(run: Run, spec: str, *, output=None) -> list[str]:
    """`--class-names`: `a,b,c` or a text file with one name per line, one per output class.

    A run directory has its recorded names; a count that does not match the model's outputs
    is refused (naming both numbers), so no caption ever names the wrong class.
    """
    if run.directory is not None:
        raise CnnvizError(f"--class-names is for bare model files; {run.directory} uses the "
                          "class names it recorded when it was trained")
    if Path(spec).is_file():
        try:
            lines = Path(spec).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise CnnvizError(f"--class-names {spec}: cannot read it ({error})") from None
        names, where = [line.strip() for line in lines if line.strip()], f"file {spec}"
    else:
        names, where = [name.strip() for name in spec.split(",")], f"{spec!r}"
    if any(not name for name in names) or not names:
        raise CnnvizError(f"--class-names {where}: an empty name; give `cat,dog,bird` or a "
                          "text file with one name per line")
    count = int(run.model.outputs[_output(run.model, output)].shape[-1])
    if len(names) != max(count, 2):
        raise CnnvizError(f"--class-names {where} gives {len(names)} names but the model has "
                          f"{max(count, 2)} classes")
    return names


def _file_names(paths: list[Path]) -> list[str]:
    """Output names for image files: their stems, with parent folders added where stems clash."""
    depth = 1
    while True:
        names = ["_".join(path.with_suffix("").parts[-depth:]) for path in paths]
        if len(set(names)) == len(names) or depth > max(len(path.parts) for path in paths):
            return names if len(set(names)) == len(names) else [
                f"{index:04d}_{name}" for index, name in enumerate(names)]
        depth += 1


def refuse_preprocess_for_a_run(run: Run, preprocess: str) -> None:
    """`--preprocess` other than auto is for bare model files: a run prepares its own."""
    if run.config is not None and preprocess != "auto":
        raise CnnvizError(
            f"--preprocess {preprocess} is for bare .keras files; {run.directory or 'this run'} "
            "prepares images as it recorded when it was trained"
        )


def pixel_preparation(run: Run, preprocess: str):
    """pixels -> model inputs for image files, or None when the model takes the pixels.

    A cnnviz run's model begins with its preprocessing layers and takes 8-bit pixels
    (docs/decisions.md D1);
    data in other units (npz, inline) gets the file's range mapped onto the model's input range.
    A bare .keras file takes what `--preprocess` says ("auto" resolved, with a note).
    """
    from cnnviz.errors import CnnvizNotice
    from cnnviz.model.inputs import prepare

    if run.config is not None:
        lows, highs = inputs_range(run, preprocess)
        low, high = float(lows.min()), float(highs.max())
        if (low, high) == (0.0, 255.0):
            return None
        return lambda pixels: low + pixels * np.float32((high - low) / 255.0)
    mode, note = input_mode(run, preprocess)
    if note:
        warnings.warn(note, CnnvizNotice, stacklevel=3)
    return None if mode == "none" else (lambda pixels: prepare(pixels, mode))


def inputs_range(run: Run, preprocess: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(lows, highs) per channel of the inputs cnnviz makes for `run`: a bare model's as its
    mode says; a run's as its model's first layers say, or, for `data.preprocessing: none`
    (no such layer), the data's own full scale, as it was trained."""
    from cnnviz.model.inputs import channel_range

    if run.config is None:
        return channel_range(run.model, preprocess=input_mode(run, preprocess)[0])
    if run.config.data.preprocessing == "none":
        from cnnviz.data.dataset import config_preprocessing

        channels = int(run.model.inputs[0].shape[-1])
        return (np.zeros(channels, np.float32),
                np.full(channels, config_preprocessing(run.config).divisor, np.float32))
    return channel_range(run.model)


def input_mode(run: Run, preprocess: str) -> tuple[str, str | None]:
    """The mode image files get for a bare model (`cnnviz.model.inputs.MODES`), and a note when
    "auto" had to guess: keras:NAME's or an exported model's own mode, else what the model's
    first layer says."""
    from cnnviz.model.inputs import resolve_mode

    if preprocess == "auto" and run.preprocess is not None:
        return run.preprocess, run.preprocess_note
    return resolve_mode(run.model, preprocess)


def probability_label(model, output=None) -> str:
    """How captions name the percentages `predict_probabilities` gives for this output."""
    from cnnviz.model.outputs import output_activation

    activation = output_activation(model, output)
    if activation == "linear":
        single = int(model.outputs[_output(model, output)].shape[-1]) == 1
        return "sigmoid of the logit" if single else "softmax of the logits"
    return f"{activation} probability"


def _output(model, output) -> int:
    from cnnviz.model.outputs import output_index

    return output_index(model, output)


def select_images(run: Run, spec: str, *, output=None, preprocess: str = "auto",
                  resize: str = "stretch", shard: tuple[int, int] | None = None) -> Selection:
    """The images `--images` names: test-split indices of the run, or image files.

    Files: comma-separated files, folders and globs (`cnnviz.images.expand_image_spec`), read
    by `cnnviz.images` and resized as `resize` says; a file in a folder named like a class
    (`cat/001.jpg`) gets that class as its true label. A run's model takes the pixels
    (docs/decisions.md D1); a
    bare .keras file gets them as `preprocess` says (`cnnviz.preprocess.MODES`; a run refuses
    any but "auto"). Indices into a folder-trained run's test split read only those files,
    from the lists the run recorded. Files are read a chunk at a time, never all at once.
    """
    selection = replace(_chosen_images(run, spec, output=output, preprocess=preprocess,
                                       resize=resize),
                        input_range=inputs_range(run, preprocess))
    if shard is None:
        return selection
    share = shard_range(len(selection.images), shard)
    return selection.part(slice(share.start, share.stop))


def _chosen_images(run: Run, spec: str, *, output, preprocess: str, resize: str) -> Selection:
    from cnnviz.data.images import expand_image_spec
    from cnnviz.model.compiled import require_built

    require_built(run.model)
    index = _output(run.model, output)
    input_shape = tuple(int(size) for size in run.model.inputs[0].shape[1:])
    num_outputs = int(run.model.outputs[index].shape[-1])
    class_names = class_names_of(run, num_outputs)
    label = probability_label(run.model, index)
    refuse_preprocess_for_a_run(run, preprocess)
    max_pixels = run.config.data.max_image_pixels if run.config is not None else None
    paths = expand_image_spec(spec)
    if paths is not None:
        labels = np.asarray([class_names.index(path.parent.name)
                             if path.parent.name in class_names else -1 for path in paths],
                            np.int32)
        images = ImageFiles(paths, input_shape, prepare=pixel_preparation(run, preprocess),
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
    images = ImageFiles(test.paths(indices), input_shape,
                        prepare=pixel_preparation(run, preprocess), max_pixels=max_pixels)
    return Selection(images, test.labels[indices], names, dataset.class_names, label,
                     display=images.display, files=[test.files[index] for index in indices])
