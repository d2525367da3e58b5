"""Evaluation of a trained classifier on a stream of labelled batches: accuracy, top-k,
per-class precision/recall/F1, the confusion matrix and the most confident mistakes.

Everything is accumulated batch by batch (a K x K count matrix, a few running sums and the
`mistakes` most confident wrong images), so memory stays flat however many images stream by.
`write_evaluation` then writes evaluation.json and the two figures.
"""

from __future__ import annotations

import heapq
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnviz.errors import CnnvizError

# Mistakes shown in the grid: enough to see a pattern, few enough to read the captions.
MISTAKES = 16


@dataclass(frozen=True)
class Mistake:
    """One wrongly classified image, with what the model said."""

    confidence: float  # probability of the (wrong) predicted class
    image: np.ndarray  # (H, W, C) pixels as read (before any `prepare`)
    true_label: int
    predicted_label: int
    name: str  # file name or test-split index (test_0042)


@dataclass
class Evaluation:
    """What `evaluate` accumulated.

    Attributes:
        class_names: (K,) names, in the model's output order.
        confusion: (K, K) int64 counts, rows = true class, columns = predicted class.
        top_k: the k of `top_k_correct`.
        top_k_correct: images whose true class is among the k most probable.
        log_losses: -log p(true class) per image (clipped at 1e-7), in order.
        mistakes: the most confident mistakes, most confident first.
        source: what was evaluated (for titles and the JSON).
        seconds: wall time of the pass.
    """

    class_names: list[str]
    confusion: np.ndarray
    top_k: int
    top_k_correct: int = 0
    log_losses: np.ndarray = field(default_factory=lambda: np.zeros(0))
    mistakes: list[Mistake] = field(default_factory=list)
    source: str = ""
    seconds: float = 0.0
    # The test-split position of each mistake (ties between equally confident mistakes go to
    # the earlier image), kept so that shares of one evaluation merge into the same result.
    mistake_positions: list[int] = field(default_factory=list)

    @property
    def log_loss_sum(self) -> float:
        """Exactly rounded (math.fsum): the same for any split of the images into shares."""
        return math.fsum(self.log_losses.tolist())

    @property
    def images(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return _ratio(np.trace(self.confusion), self.images)

    @property
    def top_k_accuracy(self) -> float:
        return _ratio(self.top_k_correct, self.images)

    @property
    def support(self) -> np.ndarray:
        return self.confusion.sum(axis=1)

    @property
    def precision(self) -> np.ndarray:
        """Per class; NaN for a class never predicted (precision is undefined there)."""
        return _ratios(np.diag(self.confusion), self.confusion.sum(axis=0))

    @property
    def recall(self) -> np.ndarray:
        """Per class; NaN for a class absent from the data."""
        return _ratios(np.diag(self.confusion), self.support)

    @property
    def f1(self) -> np.ndarray:
        precision, recall = np.nan_to_num(self.precision), np.nan_to_num(self.recall)
        total = precision + recall
        f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
        return np.where(self.support > 0, f1, np.nan)

    def macro(self) -> dict[str, float]:
        """macro_precision, macro_recall, macro_f1 as scikit-learn computes them
        (zero_division=0): over the classes that occur as a true or a predicted label, an
        undefined value counting as 0."""
        present = (self.support > 0) | (self.confusion.sum(axis=0) > 0)
        return {name: _mean(np.nan_to_num(values[present])) for name, values in
                (("macro_precision", self.precision), ("macro_recall", self.recall),
                 ("macro_f1", self.f1))}

    def to_dict(self) -> dict:
        """The numbers (no images), JSON-serializable; NaN becomes null."""
        macro = self.macro()
        return {
            "source": self.source,
            "images": self.images,
            "accuracy": _number(self.accuracy),
            "top_k": self.top_k,
            "top_k_accuracy": _number(self.top_k_accuracy),
            **{name: _number(value) for name, value in macro.items()},
            "log_loss": _number(self.log_loss_sum / self.images if self.images else math.nan),
            "per_class": {
                name: {"precision": _number(self.precision[index]),
                       "recall": _number(self.recall[index]),
                       "f1": _number(self.f1[index]), "support": int(self.support[index])}
                for index, name in enumerate(self.class_names)
            },
            "confusion_matrix": self.confusion.tolist(),
            "most_confident_mistakes": [
                {"name": mistake.name, "true": self.class_names[mistake.true_label],
                 "predicted": self.class_names[mistake.predicted_label],
                 "confidence": _number(mistake.confidence)} for mistake in self.mistakes],
            "seconds": round(self.seconds, 3),
        }

    def format_table(self) -> str:
        """Accuracy lines and one row per class."""
        width = max(len("class"), *(len(name) for name in self.class_names))
        lines = [
            f"Evaluation on {self.source}: {self.images} images",
            f"accuracy {self.accuracy:.4f}, top-{self.top_k} accuracy {self.top_k_accuracy:.4f}",
            f"{'class':<{width}}  precision  recall      f1  support",
        ]
        for index, name in enumerate(self.class_names):
            lines.append(f"{name:<{width}}  {_cell(self.precision[index]):>9}  "
                         f"{_cell(self.recall[index]):>6}  {_cell(self.f1[index]):>6}  "
                         f"{int(self.support[index]):>7}")
        return "\n".join(lines)


def _ratio(numerator, denominator) -> float:
    return float(numerator) / float(denominator) if denominator else math.nan


def _ratios(numerators: np.ndarray, denominators: np.ndarray) -> np.ndarray:
    numerators, denominators = numerators.astype(np.float64), denominators.astype(np.float64)
    return np.divide(numerators, denominators, out=np.full(len(numerators), np.nan),
                     where=denominators > 0)


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def _number(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def evaluate(model, batches: Iterable[tuple[np.ndarray, np.ndarray, Sequence[str]]],
             class_names: Sequence[str], *, top_k: int = 5, mistakes: int = MISTAKES,
             source: str = "", prepare: Callable[[np.ndarray], np.ndarray] | None = None,
             progress=None, output=None, first_position: int = 0) -> Evaluation:
    """Stream labelled batches through the model and accumulate every evaluation number.

    Args:
        model: a built Keras classifier (softmax over K classes, or one sigmoid unit = 2).
        batches: (images (B, H, W, C), labels (B,) int, names (B,) str) per batch.
        class_names: (K,) names in output order.
        top_k: k of the top-k accuracy (capped at K).
        mistakes: how many of the most confident mistakes to keep (with their images).
        source: what is evaluated, for titles.
        prepare: maps a batch of pixels to model inputs (a bare .keras file's `--preprocess`);
            None feeds them as they are (a cnnviz model preprocesses inside, docs/decisions.md D1).
            The mistakes keep the pixels, for display.
        progress: called with the batch size after each batch (a progress bar's advance).
        output: which output of a multi-output model (name or index; default the first).
        first_position: the position of the first image in the whole data (a share's start).

    Returns:
        An `Evaluation`.
    """
    from cnnviz.model.compiled import predict_probabilities

    count = len(class_names)
    if count < 2:
        raise CnnvizError(f"evaluation needs at least two classes; received {list(class_names)}")
    started = time.perf_counter()
    result = Evaluation(list(class_names), np.zeros((count, count), np.int64), min(top_k, count),
                        source=source)
    kept: list[tuple[float, int, Mistake]] = []  # a min-heap on confidence, at most `mistakes`
    losses = []
    seen = first_position
    for images, labels, names in batches:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        inputs = np.asarray(images, np.float32)
        probabilities = predict_probabilities(model, inputs if prepare is None else prepare(inputs),
                                              output=output)
        if probabilities.shape[1] != count:
            raise CnnvizError(f"the model has {probabilities.shape[1]} outputs but the data has "
                              f"{count} classes ({', '.join(class_names)})")
        bad = labels[(labels < 0) | (labels >= count)]
        if bad.size:
            raise CnnvizError(f"label {int(bad[0])} is not a class of the model (0..{count - 1})")
        predicted = probabilities.argmax(axis=1)
        np.add.at(result.confusion, (labels, predicted), 1)
        ranked = np.argsort(-probabilities, axis=1, kind="stable")[:, :result.top_k]
        result.top_k_correct += int((ranked == labels[:, None]).any(axis=1).sum())
        true_probability = probabilities[np.arange(len(labels)), labels]
        losses.append(-np.log(np.clip(true_probability, 1e-7, 1.0)))
        for index in np.flatnonzero(predicted != labels):
            confidence = float(probabilities[index, predicted[index]])
            if len(kept) < mistakes or confidence > kept[0][0]:
                mistake = Mistake(confidence, np.array(images[index]), int(labels[index]),
                                  int(predicted[index]), str(names[index]))
                entry = (confidence, -(seen + int(index)), mistake)  # earlier image wins ties
                (heapq.heappush if len(kept) < mistakes else heapq.heapreplace)(kept, entry)
        seen += len(labels)
        if progress is not None:
            progress(len(labels))
    if seen == first_position:
        raise CnnvizError(f"nothing to evaluate: {source or 'the data'} has no images")
    result.log_losses = np.concatenate(losses)
    ranked_mistakes = sorted(kept, key=lambda e: (-e[0], -e[1]))
    result.mistakes = [entry[2] for entry in ranked_mistakes]
    result.mistake_positions = [-entry[1] for entry in ranked_mistakes]
    result.seconds = time.perf_counter() - started
    return result


def array_batches(images: np.ndarray, labels: np.ndarray, names: Sequence[str],
                  batch_size: int = 256):
    """(images, labels, names) slices of in-memory arrays, for `evaluate`."""
    for start in range(0, len(images), batch_size):
        stop = start + batch_size
        yield images[start:stop], labels[start:stop], names[start:stop]


def split_batches(split, labels: np.ndarray, batch_size: int = 256, *,
                  share: range | None = None):
    """(images, labels, names) batches of a data split streamed through its tf.data pipeline
    (the one training uses); `labels` replaces the split's own (classes mapped to the model's).
    Names: the split's file names, else test_NNNN. `share`: only these positions."""
    width = len(str(max(len(split) - 1, 0)))
    names = split.files if split.files is not None else [
        f"test_{index:0{width}d}" for index in range(len(split))]
    if share is not None:
        cut = slice(share.start, share.stop)
        split, labels, names = split.part(share), labels[cut], names[cut]
    start = 0
    for images, _ in split.pipeline(batch_size):
        stop = start + int(images.shape[0])
        yield images.numpy(), labels[start:stop], names[start:stop]
        start = stop


def write_evaluation(evaluation: Evaluation, folder: Path) -> tuple[Path, list]:
    """evaluation.json, evaluation.txt, confusion_matrix.png and mistakes.png into `folder`.

    Returns:
        (the JSON file, the figures as `report.FigureFile`s).
    """
    from cnnviz.io.atomic import atomic_write_text
    from cnnviz.plot.evaluation import confusion_matrix_figure, mistakes_grid
    from cnnviz.report.batching import save_captioned

    folder = Path(folder)
    data_file = atomic_write_text(folder / "evaluation.json",
                                  json.dumps(evaluation.to_dict(), indent=2) + "\n")
    atomic_write_text(folder / "evaluation.txt", evaluation.format_table() + "\n")
    title = (f"{evaluation.source}, {evaluation.images} images: accuracy "
             f"{evaluation.accuracy:.2%}, top-{evaluation.top_k} {evaluation.top_k_accuracy:.2%}, "
             f"macro F1 {_cell(evaluation.macro()['macro_f1'])}")
    figures = [save_captioned(confusion_matrix_figure(evaluation.confusion, evaluation.class_names,
                                                      title=f"Confusion matrix — {title}"),
                              folder / "confusion_matrix.png")]
    if evaluation.mistakes:
        names = evaluation.class_names
        figures.append(save_captioned(mistakes_grid(
            [mistake.image for mistake in evaluation.mistakes],
            [f"{mistake.name}\ntrue {names[mistake.true_label]}\n"
             f"predicted {names[mistake.predicted_label]} ({mistake.confidence:.0%})"
             for mistake in evaluation.mistakes],
            title=f"The {len(evaluation.mistakes)} most confident mistakes — {title}"),
            folder / "mistakes.png"))
    return data_file, figures


def evaluation_folder(run, source: Path, data: Path | None) -> Path:
    """Default folder: RUN/evaluation (test split) or RUN/evaluation/<data name>; beside a bare
    .keras file: <stem>_evaluation/<data name>."""
    base = (run.directory / "evaluation" if run.directory is not None
            else source.parent / f"{source.stem}_evaluation")
    return base if data is None else base / Path(data).stem


def evaluate_data(run, folder: Path, *, data: Path | None = None, top_k: int = 5,
                  batch_size: int = 256, prepare: Callable[[np.ndarray], np.ndarray] | None = None,
                  output=None, resize: str = "stretch", shard: tuple[int, int] | None = None):
    """Evaluate a run on its own test split, on a config's test split, or on a folder of class
    sub-folders (`data`), streaming, and write the files into `folder`. `prepare` and `output`:
    as in `evaluate` (pixels -> inputs of a bare model); `resize`: how a folder's files are
    brought to the model's size (`cnnviz.data.images.resize_pixels`). `shard` (K, N): evaluate
    share K of N of the images and write only its counts (`write_share`), for `merge_shares`.

    Returns:
        (the `Evaluation`, evaluation.json's path, the figures as `report.FigureFile`s); for a
        share, (its `Evaluation`, its .npz, []).
    """
    from cnnviz.model.outputs import output_index
    from cnnviz.report.batching import progress_bar
    from cnnviz.report.selection import class_names_of, shard_range

    output = output_index(run.model, output)
    outputs = int(run.model.outputs[output].shape[-1])
    class_names = class_names_of(run, outputs)
    split, data_classes, source = _evaluation_split(run, data, resize)
    if (run.config is None and run.directory is None and run.class_names is None
            and len(data_classes) == max(outputs, 2)):
        # A bare .keras file knows no class names: the folder's, in Keras's sorted order, are
        # its classes (as image_dataset_from_directory labelled them for training).
        class_names = list(data_classes)
    labels = _labels_in(split.labels, data_classes, class_names, str(data or "the run"))
    share = shard_range(len(split), shard)
    with progress_bar(len(share), "evaluate") as bar:
        task = bar.add_task("evaluate", total=len(share))
        evaluation = evaluate(run.model, split_batches(split, labels, batch_size, share=share),
                              class_names, top_k=top_k, source=source, prepare=prepare,
                              output=output, first_position=share.start,
                              progress=lambda done: bar.advance(task, done))
    if shard is not None:
        return evaluation, write_share(evaluation, folder, shard), []
    data_file, figures = write_evaluation(evaluation, folder)
    return evaluation, data_file, figures


SHARE_FILE = "evaluation.shard-{index}-of-{total}.npz"


def write_share(evaluation: Evaluation, folder: Path, shard: tuple[int, int]) -> Path:
    """One share's counts, per-image losses and mistakes (with their images) as an .npz, named
    by `shard` so that the shares of a job array never write the same file."""
    import io

    from cnnviz.io.atomic import atomic_write_bytes

    index, total = shard
    mistakes = evaluation.mistakes
    buffer = io.BytesIO()
    np.savez(buffer, shard=np.asarray(shard), class_names=np.asarray(evaluation.class_names),
             confusion=evaluation.confusion, top_k=evaluation.top_k,
             top_k_correct=evaluation.top_k_correct, log_losses=evaluation.log_losses,
             source=evaluation.source, seconds=evaluation.seconds,
             mistake_images=np.asarray([mistake.image for mistake in mistakes], np.float32),
             mistake_confidences=np.asarray([mistake.confidence for mistake in mistakes]),
             mistake_true=np.asarray([mistake.true_label for mistake in mistakes], np.int64),
             mistake_predicted=np.asarray([m.predicted_label for m in mistakes], np.int64),
             mistake_names=np.asarray([mistake.name for mistake in mistakes], dtype=str),
             mistake_positions=np.asarray(evaluation.mistake_positions, np.int64))
    width = len(str(total - 1))
    return atomic_write_bytes(folder / SHARE_FILE.format(index=f"{index:0{width}d}",
                                                         total=total), buffer.getvalue())


def merge_shares(folder: Path, *, mistakes: int = MISTAKES) -> Evaluation:
    """The evaluation one process gives, from the share files `write_share` left in `folder`:
    counts summed, losses joined (exactly rounded sums), the most confident mistakes of all."""
    files = sorted(Path(folder).glob(SHARE_FILE.format(index="*", total="*")))
    if not files:
        raise CnnvizError(f"--merge: no {SHARE_FILE.format(index='K', total='N')} files in "
                          f"{folder}; run the shares with --shard K/N first")
    shares = []
    for path in files:
        try:
            with np.load(path) as loaded:
                shares.append({key: loaded[key] for key in loaded.files})
        except (OSError, ValueError, KeyError) as error:
            raise CnnvizError(f"--merge: {path} is damaged ({error}); run its share again"
                              ) from None
    totals = {int(share["shard"][1]) for share in shares}
    found = sorted(int(share["shard"][0]) for share in shares)
    if len(totals) != 1 or found != list(range(next(iter(totals)))):
        expected = max(totals)
        missing = sorted(set(range(expected)) - set(found))
        raise CnnvizError(f"--merge: {folder} holds shares {found} of {sorted(totals)}; "
                          f"missing {missing or 'none'} (every share K of one N is needed)")
    first = shares[0]
    names = [str(name) for name in first["class_names"]]
    if any([str(name) for name in share["class_names"]] != names for share in shares):
        raise CnnvizError(f"--merge: the shares in {folder} name different classes")
    result = Evaluation(names, sum(share["confusion"] for share in shares),
                        int(first["top_k"]), source=str(first["source"]))
    result.top_k_correct = int(sum(int(share["top_k_correct"]) for share in shares))
    result.log_losses = np.concatenate([share["log_losses"] for share in shares])
    result.seconds = float(sum(float(share["seconds"]) for share in shares))
    candidates = [(float(share["mistake_confidences"][i]), int(share["mistake_positions"][i]),
                   Mistake(float(share["mistake_confidences"][i]), share["mistake_images"][i],
                           int(share["mistake_true"][i]), int(share["mistake_predicted"][i]),
                           str(share["mistake_names"][i])))
                  for share in shares for i in range(len(share["mistake_positions"]))]
    candidates.sort(key=lambda entry: (-entry[0], entry[1]))
    result.mistakes = [entry[2] for entry in candidates[:mistakes]]
    result.mistake_positions = [entry[1] for entry in candidates[:mistakes]]
    return result


def _evaluation_split(run, data: Path | None, resize: str = "stretch"):
    """(split, its class names, how to name it) for `evaluate_data`."""
    if data is None:
        if run.config is None:
            raise CnnvizError("a bare model file (.keras, .h5 or exported) has no test split; give "
                              "--data CONFIG_OR_DIR")
        dataset = run.dataset()
        return dataset.test, dataset.class_names, "the test split"
    data = Path(data)
    if data.suffix in (".yaml", ".yml"):
        from cnnviz.config.loading import load_config
        from cnnviz.data import load_dataset

        dataset = load_dataset(load_config(data))
        return dataset.test, dataset.class_names, f"the test split of {data}"
    if not data.is_dir():
        raise CnnvizError(f"--data {data}: give a config file (.yaml) or a folder of class "
                          "sub-folders")
    from cnnviz.data import Split
    from cnnviz.data.folders import check_listing, list_class_folder
    from cnnviz.data.images import MAX_IMAGE_PIXELS

    max_pixels = run.config.data.max_image_pixels if run.config is not None else MAX_IMAGE_PIXELS
    # Every file's header is checked first: a bad file is one line, not an error mid-stream.
    listing = check_listing(list_class_folder(data), max_pixels=max_pixels, skip_bad_files=False)
    height, width, channels = (int(size) for size in run.model.inputs[0].shape[1:])
    split = Split(listing.labels, image_size=(height, width), channels=channels,
                  files=listing.files, root=data, max_pixels=max_pixels, resize=resize)
    return split, listing.class_names, str(data)


def _labels_in(labels: np.ndarray, data_classes: Sequence[str], model_classes: Sequence[str],
               where: str) -> np.ndarray:
    """The data's labels as indices of the model's classes, matched by class name."""
    if list(data_classes) == list(model_classes):
        return labels
    unknown = [name for name in data_classes if name not in model_classes]
    if unknown:
        raise CnnvizError(
            f"{where}: classes {', '.join(map(repr, unknown))} are not classes of the model "
            f"({', '.join(model_classes)})")
    mapping = np.array([list(model_classes).index(name) for name in data_classes], np.int64)
    return mapping[labels]
