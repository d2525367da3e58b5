"""Watch it learn: the same images explained with the weights of every few epochs.

`ExplainCallback` works in any `model.fit`: at each chosen epoch it explains its fixed images
with the training model itself (the explain functions read the model's variables: no copy per
epoch), measures deletion / insertion AUC (`cnnviz.trust.faithfulness.deletion_insertion`),
for images with a known cue the share of positive attribution on it (`cue_share`, as
`cnnviz shortcut` does) and, when asked, `cnnviz sanity`'s model-randomization rank correlation
(`cnnviz.trust.sanity.model_randomization`, the model's weights put back exactly), and writes
under its `log_dir`:

    epochs/<method>/epoch-NNN.png    one row per image: the image and its map
    epochs/maps/epoch-NNN.npz        the maps, {method: (N, H, W) float32}
    explain_history.csv              epoch, <method>.<metric>... (one row per epoch)
    epochs/<method>/evolution.png    at train end: one row per image, one column per epoch

NNN is the count of epochs trained (001 after the first). The history holds only numbers that
the weights decide, so a run killed and resumed writes the uninterrupted run's file byte for
byte; the time each epoch's explanation took is in `seconds` (metrics.json `explain_seconds`).
Crash consistency: a fit that starts at epoch k (`initial_epoch`, a resumed run) first drops
every row and file of the epochs after k, so a rerun epoch is recorded once; in a cnnviz run
the callback writes just before the epoch's commit (`cnnviz.train.callbacks.training_callbacks`).
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np

from cnnviz.config.root import Config, explain_metrics, has_cue
from cnnviz.config.train import DEFAULT_EXPLAIN_METRICS, EXPLAIN_METRICS
from cnnviz.data.shapes import cue_share
from cnnviz.errors import CnnvizError
from cnnviz.explain.registry import resolve_methods, run_methods
from cnnviz.io.atomic import atomic_write_bytes, atomic_write_text, save_picture
from cnnviz.model.compiled import predict_probabilities
from cnnviz.model.inputs import as_image_batch
from cnnviz.plot.attribution import map_grid
from cnnviz.trust.faithfulness import deletion_insertion
from cnnviz.trust.sanity import model_randomization

HISTORY_FILE = "explain_history.csv"
EPOCHS_DIR = "epochs"
EVOLUTION_COLUMNS = 12  # at most this many epochs in evolution.png (evenly subsampled)
DEFAULT_IMAGES = 8


def first_batches(data, labels=None, *, batches: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
    """(images (N, H, W, C) float32, labels (N,) int32 or None) from arrays or a tf.data.Dataset.

    A dataset gives its first `batches` batches, once: elements `x`, `(x, y)` or `(x, y, w)`;
    one-hot labels become class indices.
    """
    import tensorflow as tf

    if isinstance(data, tf.data.Dataset):
        if labels is not None:
            raise CnnvizError("labels come from the dataset's (images, labels) elements; "
                              "received labels= as well")
        parts, found = [], []
        for element in data.take(batches):
            element = element if isinstance(element, tuple) else (element,)
            parts.append(np.asarray(element[0]))
            if len(element) > 1:
                found.append(np.asarray(element[1]))
        if not parts:
            raise CnnvizError("the dataset given to ExplainCallback is empty")
        images, labels = np.concatenate(parts), np.concatenate(found) if found else None
    else:
        images = np.asarray(data)
    images = as_image_batch(images)
    if labels is None:
        return images, None
    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = labels.argmax(axis=-1)
    if labels.shape != (len(images),):
        raise CnnvizError(f"labels must be {len(images)} class indices (one per image); "
                          f"received shape {labels.shape}")
    return images, labels.astype(np.int32)


def _layer_methods(methods: Sequence[str], layer: str | None, input_range) -> dict:
    """The registry's functions, with the CAM methods pointed at `layer` when one is given."""
    resolved = resolve_methods(tuple(methods), input_range=input_range)
    if layer is None:
        return resolved
    from cnnviz.explain.cam import CAM_METHODS, cam

    def on_layer(method):
        return lambda model, images, targets: cam(model, images, targets, method=method,
                                                  layer=layer, input_range=input_range)

    return {name: on_layer(name) if name in CAM_METHODS else function
            for name, function in resolved.items()}


def _precomputed(maps: np.ndarray):
    return lambda model, images, targets: maps


class ExplainCallback(keras.callbacks.Callback):
    """Explain the same images at every `every`-th epoch (and the last) with the current weights.

    Args:
        images: (N, H, W, C) arrays as the model takes them, or a `tf.data.Dataset` of
            (images, labels) batches (its first `batches` batches are taken once).
        labels: (N,) class indices (or one-hot) for arrays: the class each map explains; None:
            the class the model predicts at that epoch.
        methods: registry names (`cnnviz.explain.registry.METHODS`).
        every: explain after every this many epochs (the last epoch always).
        log_dir: where the figures and the history go (module docstring); None: nothing is
            written, the numbers stay in `history` and the maps in `maps`.
        history_file: the CSV's path; default `log_dir/explain_history.csv`.
        metrics: some of "deletion_auc", "insertion_auc", "cue_share", "model_randomization";
            None: the two AUCs, and cue_share when `cue_masks` are given. model_randomization
            is `cnnviz sanity`'s rank correlation (`sanity.<method>.rank_correlation`: the map
            of the predicted class vs the map with every layer re-initialized, seeded by
            `seed`); it explains the images once more per layer with weights.
        cue_masks: (N, H, W) bool, where each image's known cue is (the shapes set's).
        layer: the CAM methods' layer (default: the last conv layer).
        steps: points on each deletion / insertion curve.
        batches: batches taken from a dataset.
        seed: seeds the faithfulness test's random order and model_randomization's
            re-initialized weights.
        input_range: (lows, highs) per channel of the images, for methods that fill or start
            from black; None: the model's.
        class_names: names of the class indices, for the figures' row labels.

    Attributes:
        history: one dict per explained epoch (the CSV's rows, floats).
        seconds: {epoch: seconds to explain and measure it}, for the epochs explained in
            this process (a wall time: not in the history, which a resumed run reproduces).
        maps: {epoch: {method: (N, H, W) float32}} in memory: every epoch explained in this
            process without a `log_dir`, the last one with it (`maps_of` reads the others).
    """

    def __init__(self, images, labels=None, *, methods: Sequence[str] = ("gradcam", "saliency"),
                 every: int = 1, log_dir: str | Path | None = None,
                 history_file: str | Path | None = None, metrics: Sequence[str] | None = None,
                 cue_masks=None, layer: str | None = None, steps: int = 10, batches: int = 1,
                 seed: int = 0, input_range=None, class_names: Sequence[str] | None = None,
                 tensorboard_dir: str | Path | None = None):
        super().__init__()
        self.images, self.labels = first_batches(images, labels, batches=batches)
        for name, value in (("every", every), ("steps", steps), ("batches", batches)):
            if not isinstance(value, int) or value < 1:
                raise CnnvizError(f"{name} must be a positive integer; received {value!r}")
        self.methods = _layer_methods(methods, layer, input_range)
        self.cue_masks = None if cue_masks is None else np.asarray(cue_masks, bool)
        if self.cue_masks is not None and self.cue_masks.shape != self.images.shape[:3]:
            raise CnnvizError(f"cue_masks must have shape (N, H, W) = {self.images.shape[:3]}; "
                              f"received {self.cue_masks.shape}")
        default = tuple(name for name in DEFAULT_EXPLAIN_METRICS
                        if name != "cue_share" or self.cue_masks is not None)
        self.metrics = tuple(default if metrics is None else metrics)
        unknown = [name for name in self.metrics if name not in EXPLAIN_METRICS]
        if unknown:
            raise CnnvizError(f"unknown metric {unknown[0]!r}; choose from "
                              f"{', '.join(EXPLAIN_METRICS)}")
        if "cue_share" in self.metrics and self.cue_masks is None:
            raise CnnvizError("metric cue_share needs cue_masks (where each image's cue is)")
        self.every, self.steps, self.seed, self.input_range = every, steps, seed, input_range
        self.class_names = class_names
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.history_file = (Path(history_file) if history_file is not None
                             else None if self.log_dir is None else self.log_dir / HISTORY_FILE)
        self.tensorboard_dir = None if tensorboard_dir is None else Path(tensorboard_dir)
        self._writer = None
        self._drawing = None  # the thread that draws an epoch's figures
        self.history: list[dict] = []
        self.seconds: dict[int, float] = {}
        self.maps: dict[int, dict[str, np.ndarray]] = {}
        self._started = False
        self._chief = True

    @property
    def columns(self) -> list[str]:
        return ["epoch", *(f"{method}.{metric}" for method in self.methods
                           for metric in self.metrics)]

    # ------------------------------------------------------------------------- Keras hooks
    def on_train_begin(self, logs=None):
        # What earlier fits wrote (a run resumed after its last epoch trains none, and still
        # reports them); the first epoch of this fit drops the rows after its start.
        self._started = False
        self.history = self._read_history()
        self._chief = _is_chief(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        if not self._started:  # the fit's first epoch: `initial_epoch` epochs are behind it
            self._started = True
            self._forget_after(epoch)

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        if not self._chief:  # another multi-worker process: the chief explains and writes
            return
        last = done >= (self.params or {}).get("epochs", np.inf) or self.model.stop_training
        if done % self.every and not last:
            return
        started = time.perf_counter()
        maps = self._maps()
        # The figures and maps are drawn and written on a thread while the faithfulness
        # passes run (PIL, zlib and TensorFlow release the GIL); the row goes last.
        if self._drawing is None and self.log_dir is not None:
            self._drawing = ThreadPoolExecutor(1, thread_name_prefix="cnnviz-watch")
        drawn = None if self.log_dir is None else self._drawing.submit(
            self._write_files, done, maps)
        row = self._measure(done, maps)
        self.seconds[done] = round(time.perf_counter() - started, 3)
        if drawn is not None:
            drawn.result()
        self._record(row, maps)
        self._summarize(done, maps)

    def _summarize(self, epoch: int, maps: dict[str, np.ndarray]) -> None:
        """Each map as a TensorBoard image, one tag per method and image (`tensorboard_dir`),
        each scaled to [0, 1] on its own, at step `epoch`."""
        if self.tensorboard_dir is None:
            return
        import tensorflow as tf

        from cnnviz.plot.display import normalize01

        if self._writer is None:  # one events file for the fit
            self._writer = tf.summary.create_file_writer(str(self.tensorboard_dir / "explain"))
        with self._writer.as_default():
            for method, values in maps.items():
                for index, values_of_image in enumerate(values):
                    image = normalize01(np.asarray(values_of_image, np.float32))
                    tf.summary.image(f"{method}/image_{index:02d}", image[None, ..., None],
                                     step=epoch)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._drawing is not None:
            self._drawing.shutdown()
            self._drawing = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.log_dir is None or not self.history:
            return
        epochs = [int(row["epoch"]) for row in self.history]
        picked = [epochs[index] for index in sorted(set(
            np.linspace(0, len(epochs) - 1, min(EVOLUTION_COLUMNS, len(epochs))).round()
            .astype(int).tolist()))]
        maps = {epoch: self.maps_of(epoch) for epoch in picked}
        for method in self.methods:
            columns = {f"epoch {epoch}": maps[epoch][method] for epoch in picked}
            save_picture(map_grid(self.images, columns, title=f"{method}, epoch after epoch",
                                  row_labels=self._row_labels()),
                         self.log_dir / EPOCHS_DIR / method / "evolution.png")

    # ----------------------------------------------------------------------------- numbers
    def explain(self, epoch: int) -> tuple[dict, dict[str, np.ndarray]]:
        """This epoch's row ({column: float}) and maps, with the model's current weights (the
        time it took goes to `seconds`, not into the row)."""
        started = time.perf_counter()
        maps = self._maps()
        row = self._measure(epoch, maps)
        self.seconds[epoch] = round(time.perf_counter() - started, 3)
        return row, maps

    def _targets(self) -> np.ndarray:
        if self.labels is not None:
            return self.labels
        return predict_probabilities(self.model, self.images).argmax(axis=-1)

    def _maps(self) -> dict[str, np.ndarray]:
        # Not remembered: the weights change every epoch (and a digest of them costs).
        return run_methods(self.model, self.images, self._targets(), self.methods,
                           remember=False)

    def _measure(self, epoch: int, maps: dict[str, np.ndarray]) -> dict:
        targets = self._targets()
        row = {"epoch": float(epoch)}
        if {"deletion_auc", "insertion_auc"} & set(self.metrics):
            curves = deletion_insertion(
                self.model, self.images, targets, steps=self.steps, seed=self.seed,
                methods={name: _precomputed(values) for name, values in maps.items()},
                input_range=self.input_range, random_order=False)
        if "model_randomization" in self.metrics:
            # `cnnviz sanity`'s own function and number: its class is the predicted one, and it
            # gives every variable of the model its value back, so training goes on unchanged.
            sanity = model_randomization(self.model, self.images, methods=self.methods,
                                         seed=self.seed, keep=0, input_range=self.input_range)
        for method, values in maps.items():
            for metric in self.metrics:
                if metric == "cue_share":
                    value = cue_share(values, self.cue_masks).mean()
                elif metric == "model_randomization":
                    value = sanity.rank_correlation[method][-1]  # every layer re-initialized
                else:
                    value = getattr(curves, metric)[method]
                row[f"{method}.{metric}"] = float(value)
        return row

    def run_metrics(self) -> dict[str, float]:
        """The last explained epoch's numbers as `explain.<method>.<metric>`, and
        `explain_seconds`: the time this process spent explaining (metrics.json)."""
        if not self.history:
            return {}
        last = self.history[-1]
        numbers = {f"explain.{key}": value for key, value in last.items() if "." in key}
        return {**numbers, "explain_seconds": round(sum(self.seconds.values()), 3)}

    # ------------------------------------------------------------------------------- files
    def _row_labels(self):
        if self.labels is None:
            return None
        names = self.class_names
        return [names[label] if names is not None else str(label) for label in self.labels]

    def _maps_file(self, epoch: int) -> Path:
        return self.log_dir / EPOCHS_DIR / "maps" / f"epoch-{epoch:03d}.npz"

    def maps_of(self, epoch: int) -> dict[str, np.ndarray]:
        """{method: (N, H, W) float32} after `epoch` (1 = the first), from memory or log_dir."""
        if epoch in self.maps:
            return self.maps[epoch]
        with np.load(self._maps_file(epoch)) as saved:
            return {method: saved[method] for method in self.methods}

    def _write_files(self, epoch: int, maps: dict[str, np.ndarray]) -> None:
        """The epoch's maps (npz) and one picture per method, each written atomically."""
        buffer = io.BytesIO()
        np.savez(buffer, **maps)
        atomic_write_bytes(self._maps_file(epoch), buffer.getvalue())
        for method, values in maps.items():
            save_picture(map_grid(self.images, {method: values},
                                  title=f"{method} after epoch {epoch}",
                                  row_labels=self._row_labels()),
                         self.log_dir / EPOCHS_DIR / method / f"epoch-{epoch:03d}.png")

    def _record(self, row: dict, maps: dict[str, np.ndarray]) -> None:
        """The row, after the epoch's files: a row in the history says they are there."""
        epoch = int(row["epoch"])
        self.history.append(row)
        if self.log_dir is not None:  # the maps are on disk: memory holds the last epoch's
            self.maps.clear()
        self.maps[epoch] = maps
        if self.history_file is not None:
            self._write_history()

    def _write_history(self) -> None:
        text = io.StringIO()
        # extrasaction: rows read back from an earlier cnnviz's file have a `seconds` cell.
        writer = csv.DictWriter(text, fieldnames=self.columns, lineterminator="\n",
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows({key: _cell(key, value) for key, value in line.items()}
                         for line in self.history)
        atomic_write_text(self.history_file, text.getvalue())

    def _forget_after(self, epoch: int) -> None:
        """Keep what the first `epoch` epochs wrote (rows, maps, figures); drop the rest.

        The rows go first (a row says that its epoch's files are there), then the files: from
        here on, no file of an epoch after `epoch` is on disk until this fit writes it again.
        """
        written = self._read_history()
        self.history = [row for row in written if row["epoch"] <= epoch]
        self.maps = {done: maps for done, maps in self.maps.items() if done <= epoch}
        self.seconds = {done: took for done, took in self.seconds.items() if done <= epoch}
        if (self.history_file is not None and self.history_file.is_file()
                and len(self.history) < len(written)):
            if self.history:
                self._write_history()
            else:
                self.history_file.unlink()
        if self.log_dir is None:
            return
        for path in (self.log_dir / EPOCHS_DIR).glob("*/epoch-*"):
            number = path.name.removeprefix("epoch-").split(".")[0]
            if number.isdigit() and int(number) > epoch:
                path.unlink(missing_ok=True)

    def _read_history(self) -> list[dict]:
        if self.history_file is None or not self.history_file.is_file():
            return list(self.history)
        with self.history_file.open(newline="") as handle:
            return [{key: float(value) for key, value in row.items()}
                    for row in csv.DictReader(handle)]


def _is_chief(model) -> bool:
    """Whether this process writes: always, except on a multi-worker run's other workers."""
    import tensorflow as tf

    from cnnviz.train.devices import worker_role

    strategy = getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
    return worker_role(strategy)[0]


def _cell(key: str, value: float):
    return int(value) if key == "epoch" else value


# -------------------------------------------------------------------------------- in a run
def run_callbacks(config: Config) -> tuple:
    """`train.epoch_callbacks` for a config: the `train.explain` callback's factory, or none.

    The methods are checked now, before any training.
    """
    explain = config.train.explain
    if explain is None:
        return ()
    resolve_methods(tuple(explain.methods))

    def factory(run_dir: Path, dataset) -> ExplainCallback:
        from cnnviz.data.dataset import stratified_subset
        from cnnviz.report.selection import parse_indices

        split = dataset.splits[explain.split]
        if len(split) == 0:
            raise CnnvizError(f"train.explain: the {explain.split} split has no images")
        if explain.images is None:
            indices = stratified_subset(split.labels, DEFAULT_IMAGES, config.seed)
        else:
            indices = np.asarray(parse_indices(explain.images, len(split),
                                               option="train.explain.images",
                                               domain=f"the {explain.split} split"))
        masks = dataset.extras.get(f"cue_masks_{explain.split}") if has_cue(config) else None
        return ExplainCallback(
            split.images(indices), split.labels[indices], methods=explain.methods,
            every=explain.every, log_dir=run_dir / "figures",
            history_file=run_dir / HISTORY_FILE, metrics=explain_metrics(config),
            cue_masks=None if masks is None else masks[indices], layer=explain.layer,
            steps=explain.steps, seed=config.seed, class_names=dataset.class_names,
            tensorboard_dir=run_dir / "tensorboard" if config.train.tensorboard else None)

    return (factory,)
