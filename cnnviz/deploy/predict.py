"""Predictions for image files, streamed: files -> tf.data (decode, resize, batch) -> model -> rows.

Files go through the data package's own tf.data input (`cnnviz.data.Split.pipeline`: read by
`cnnviz.images`, the one reader, in a parallel map, batched and prefetched; without
TensorFlow, `read_images` decodes each batch with Pillow); each batch goes
through one compiled forward pass and becomes CSV rows at once, so memory is bounded by the
batch, never by the number of files.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from cnnviz.errors import CnnvizError

BATCH = 64


def csv_header(top_k: int) -> list[str]:
    """file, predicted, probability, then top2, top2_probability, ... up to top_k."""
    header = ["file", "predicted", "probability"]
    for rank in range(2, top_k + 1):
        header += [f"top{rank}", f"top{rank}_probability"]
    return header


def predict_files(model, paths: Sequence[str | Path], class_names: Sequence[str], *,
                  top_k: int = 3, batch_size: int = BATCH,
                  prepare: Callable[[np.ndarray], np.ndarray] | None = None,
                  progress: Callable[[int], None] | None = None, output=None,
                  resize: str = "stretch") -> Iterator[list]:
    """One row per file: [file, predicted class, probability, top2, its probability, ...].

    Args:
        model: a built Keras classifier taking (N, H, W, C) images.
        paths: image files (checked from their headers before anything is decoded).
        class_names: names of the model's classes, in output order.
        top_k: classes per row (capped at the class count).
        batch_size: files decoded and predicted together.
        prepare: maps pixels (8-bit units, float32) to model inputs; None passes them as they
            are (a model that preprocesses inside, docs/decisions.md D1).
        progress: called with the number of files done after each batch.
        output: which output of a multi-output model (name or index; default the first).
        resize: how files are brought to the model's size (`cnnviz.data.images.resize_pixels`).

    Returns:
        An iterator of rows, in the order of `paths`. Every file's header is checked (and a
        bad file named in a CnnvizError) before this returns, so nothing is written for a
        request that cannot finish.
    """
    from cnnviz.data.images import image_problem

    paths = [str(path) for path in paths]
    if not paths:
        raise CnnvizError("--images names no image file")
    for path in paths:  # headers only: a bad file is named before a long run starts
        problem = image_problem(path)
        if problem is not None:
            raise CnnvizError(f"--images: image file {path} {problem}")
    height, width, channels = (int(size) for size in model.inputs[0].shape[1:])
    if channels not in (1, 3):
        raise CnnvizError(f"--images: image files can be read for models with 1 or 3 input "
                          f"channels; this model has {channels}")
    return _rows(model, paths, class_names, (height, width, channels), top_k=top_k,
                 batch_size=batch_size, prepare=prepare, progress=progress, output=output,
                 resize=resize)


def _pixel_batches(paths: list[str], shape: tuple[int, int, int], batch_size: int,
                   resize: str) -> Iterator[np.ndarray]:
    """The files' pixels, `batch_size` files at a time, in order."""
    from cnnviz._quiet import tensorflow_available
    from cnnviz.data.images import read_images

    if not tensorflow_available():  # a JAX or PyTorch machine: Pillow, one batch at a time
        for start in range(0, len(paths), batch_size):
            yield read_images(paths[start:start + batch_size], shape, resize=resize)
        return
    import tensorflow as tf

    from cnnviz.data import Split

    height, width, channels = shape
    # The files as an unlabelled split: the same tf.data input (decode, resize, batch,
    # prefetch) that training and evaluation stream through. Paths are used as given.
    files = Split(np.zeros(len(paths), np.int32), image_size=(height, width),
                  channels=channels, files=paths, root=Path(), resize=resize)
    batches = iter(files.pipeline(batch_size))
    done = 0
    while done < len(paths):
        try:
            batch = next(batches)[0].numpy()
        except tf.errors.OpError:
            raise _decoding_error(paths[done:]) from None
        done += len(batch)
        yield batch


def _rows(model, paths: list[str], class_names: Sequence[str], shape: tuple[int, int, int], *,
          top_k: int, batch_size: int, prepare, progress, output, resize) -> Iterator[list]:
    from cnnviz.model.compiled import predict_probabilities

    count = len(class_names)
    top_k = max(1, min(top_k, count))
    done = 0
    for batch in _pixel_batches(paths, shape, batch_size, resize):
        inputs = prepare(batch) if prepare is not None else batch
        probabilities = predict_probabilities(model, inputs, output=output)
        if probabilities.shape[1] != count:
            raise CnnvizError(f"the model has {probabilities.shape[1]} outputs but "
                              f"{count} class names")
        ranked = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
        for offset, order in enumerate(ranked):
            row = [paths[done + offset]]
            for index in order:
                row += [class_names[index], f"{probabilities[offset, index]:.6f}"]
            yield row
        done += len(batch)
        if progress is not None:
            progress(len(batch))


def _decoding_error(remaining: Sequence[str]) -> CnnvizError:
    """The first file among `remaining` TensorFlow cannot decode, named in one line."""
    from cnnviz.data.images import undecodable_files

    bad = undecodable_files(remaining)
    if not bad:
        return CnnvizError("--images: an image file could not be decoded")
    path, reason = bad[0]
    return CnnvizError(f"--images: image file {path} {reason}")


def csv_line(row: Sequence) -> str:
    """One CSV line (quoted as the csv module does; file names may hold commas)."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(row)
    return buffer.getvalue()
