"""Training: Keras `fit` with real callbacks into a run directory, resumable after a kill."""

from __future__ import annotations

import csv
import io
import json
import platform
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnviz.config import Config, dump_config, read_yaml, validate
from cnnviz.errors import CnnvizError
from cnnviz.runs import (
    BACKUP_DIR,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    new_run_dir,
    save_figure,
    save_model,
)


@dataclass
class TrainResult:
    """What `train` did. On a non-chief multi-worker process `run_dir` was a temporary folder,
    already removed (`chief` is False): only the chief keeps a run directory."""

    run_dir: Path
    metrics: dict
    resumed_from_epoch: int
    chief: bool = True


def select_device(choice: str, cpu_replicas: int = 1) -> str:
    """Apply `train.device` (and `train.cpu_replicas`); return the device training will use.

    Must run before TensorFlow touches a device: hiding GPUs and splitting the CPU into logical
    devices are both only possible before that.

    Args:
        choice: "auto", "cpu" or "gpu".
        cpu_replicas: logical CPU devices to make when training runs on the CPU (for
            `distribute: mirrored`); 1 leaves the CPU as it is.

    Returns:
        A description such as 'GPU:0 (2 visible)' or 'CPU'.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if choice == "gpu" and not gpus:
        raise CnnvizError(
            "train.device is 'gpu' but TensorFlow sees no GPU; use device: auto or cpu"
        )
    if choice == "cpu" and gpus:
        tf.config.set_visible_devices([], "GPU")
        gpus = []
    if gpus:
        return f"GPU:0 ({len(gpus)} visible)"
    if cpu_replicas > 1:
        _split_cpu(cpu_replicas)
    return "CPU"


def _split_cpu(replicas: int) -> None:
    """Make `replicas` logical CPU devices (MirroredStrategy then has one replica per device)."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    existing = len(tf.config.get_logical_device_configuration(cpu) or [None])
    if existing >= replicas:  # this process already split the CPU (an earlier run)
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * replicas
        )
    except RuntimeError:  # TensorFlow already initialized its devices in this process
        raise CnnvizError(
            f"train.cpu_replicas={replicas} needs {replicas} logical CPU devices, but TensorFlow "
            f"already started in this process with {existing}; train in a fresh process "
            "(e.g. `cnnviz train`), or use cpu_replicas <= " + str(existing)
        ) from None


def distribution_strategy(config: Config):
    """The tf.distribute strategy for `train.distribute` (the default strategy for 'none').

    mirrored: every visible GPU, or without one the first `train.cpu_replicas` logical CPUs
    (made by `select_device`). multi_worker: the cluster that the TF_CONFIG environment
    variable describes. Keras 3's own `keras.distribution` is not used: with the TensorFlow
    backend it does nothing.
    """
    import tensorflow as tf

    if config.train.distribute == "mirrored":
        if tf.config.get_visible_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        replicas = config.train.cpu_replicas
        cpus = tf.config.list_logical_devices("CPU")
        if len(cpus) < replicas:
            raise CnnvizError(
                f"train.cpu_replicas={replicas} but TensorFlow has {len(cpus)} CPU device(s) in "
                "this process; train in a fresh process (e.g. `cnnviz train`)"
            )
        return tf.distribute.MirroredStrategy([device.name for device in cpus[:replicas]])
    if config.train.distribute == "multi_worker":
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except (ValueError, RuntimeError) as error:  # a malformed TF_CONFIG, or TF started
            raise CnnvizError(f"train.distribute 'multi_worker': {error}") from None
    return tf.distribute.get_strategy()


def _worker(strategy) -> tuple[bool, str]:
    """(is this process the chief, its name): only the chief writes the run directory."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task = (f"{resolver.task_type} {resolver.task_id}"
            if resolver is not None and resolver.task_type is not None else "chief")
    # should_checkpoint is TF's own chief test (task "chief", or worker 0 without one).
    return bool(strategy.extended.should_checkpoint), task


def _replicas_line(strategy, config: Config) -> str:
    replicas = int(strategy.num_replicas_in_sync)
    batch = config.train.batch_size
    if replicas == 1:
        return f"1 replica, batch {batch}"
    return (f"{config.train.distribute} over {replicas} replicas, global batch {batch} = "
            f"{batch / replicas:g} per replica")


# Settings that decide where and how fast training runs, not what it computes: a run
# interrupted under one of them may resume under another (e.g. 2 replicas, then 1).
_EXECUTION_SETTINGS = ("device", "distribute", "cpu_replicas", "jit_compile", "verbose")


def find_resumable_run(out_root: str | Path, config: Config) -> Path | None:
    """The newest interrupted run of this config, ignoring `_EXECUTION_SETTINGS`.

    Args:
        out_root: parent of all runs.
        config: the config about to be trained.

    Returns:
        The run directory to resume (it still has its backup/), or None.
    """
    parent = Path(out_root) / (config.name or "cnnviz")
    if not parent.is_dir():
        return None
    wanted = dump_config(config)
    execution = {key: getattr(config.train, key) for key in _EXECUTION_SETTINGS}
    for run_dir in sorted(parent.iterdir(), reverse=True):
        config_file = run_dir / "config.yaml"
        if not ((run_dir / BACKUP_DIR).is_dir() and config_file.is_file()):
            continue
        try:
            saved = validate(read_yaml(config_file), source=str(config_file))
        except CnnvizError:  # a config from an older cnnviz: not this config
            continue
        saved = saved.model_copy(update={"train": saved.train.model_copy(update=execution)})
        if dump_config(saved) == wanted:
            return run_dir
    return None


# Keras writes a .keras file in ~0.1 s, a tenth of an epoch on small data sets: the best and
# last checkpoints are written at most this often (and when training ends).
CHECKPOINT_INTERVAL_S = 30.0


def _saved_epoch(backup_dir: Path) -> int:
    """The epoch Keras's BackupAndRestore will resume at (0 when no epoch finished)."""
    metadata = backup_dir / "training_metadata.json"
    if not metadata.is_file():
        return 0
    return int(json.loads(metadata.read_text())["epoch"])


def _checkpoint_class():
    import keras

    class ThrottledModelCheckpoint(keras.callbacks.ModelCheckpoint):
        """Keras's ModelCheckpoint, writing atomically and at most every `interval` seconds.

        Which epoch to keep is ModelCheckpoint's own decision (`monitor`, `save_best_only`);
        the weights it chose wait in memory until `interval` has passed or training ends, then
        go to a temporary name and are renamed, so a kill never leaves a truncated file.
        """

        def __init__(self, filepath, *, interval: float, same_file_as=None, **kwargs):
            super().__init__(filepath, **kwargs)
            self.interval = interval
            # Another checkpoint written just before: when it saved these very weights (the
            # last epoch was the best), copy its file instead of saving the model twice.
            self.same_file_as = same_file_as
            self._pending = None
            self._written = None
            self._written_at = time.monotonic()

        def _save_model(self, epoch, batch, logs):
            filepath = self._get_file_path(epoch, batch, logs)
            if self._should_save_model(epoch, batch, logs, filepath):
                self._pending = self.model.get_weights()
            if self._pending is not None and time.monotonic() - self._written_at >= self.interval:
                self._write()

        def on_train_end(self, logs=None):
            if self._pending is not None:
                self._write()
            super().on_train_end(logs)

        def _write(self):
            other = self.same_file_as
            if other is not None and other._written is not None and all(
                    np.array_equal(a, b) for a, b in zip(other._written, self._pending)):
                atomic_write_bytes(self.filepath, Path(other.filepath).read_bytes())
            else:
                current = self.model.get_weights()
                self.model.set_weights(self._pending)
                try:
                    save_model(self.model, Path(self.filepath))
                finally:
                    self.model.set_weights(current)
            self._written, self._pending = self._pending, None
            self._written_at = time.monotonic()

    return ThrottledModelCheckpoint


def _trim_history(history_file: Path, resume_epoch: int) -> None:
    """Keep only the history rows of epochs before `resume_epoch`.

    CSVLogger may have logged an epoch whose state the kill prevented from being saved; that
    epoch reruns, so its row must go or it would appear twice.
    """
    if history_file.is_file():
        rows = list(csv.reader(io.StringIO(history_file.read_text())))
        kept = rows[:1] + [row for row in rows[1:] if row and int(row[0]) < resume_epoch]
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(kept)
        atomic_write_text(history_file, buffer.getvalue())


def read_history(history_file: Path) -> dict[str, list[float]]:
    """history.csv as {metric: [value per epoch]}."""
    if not history_file.is_file():
        return {}
    rows = list(csv.DictReader(io.StringIO(history_file.read_text())))
    # CSVLogger writes "NA" for the validation columns of a run without validation data.
    columns = {key: [float("nan") if row[key] == "NA" else float(row[key]) for row in rows]
               for key in (rows[0] if rows else {})}
    return {key: values for key, values in columns.items()
            if not all(np.isnan(value) for value in values)}


def _versions() -> dict:
    import keras
    import tensorflow as tf

    import cnnviz

    return {"cnnviz": cnnviz.__version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _shard(strategy) -> tuple[int, int] | None:
    """(workers, this worker's index) under MultiWorkerMirroredStrategy, else None."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return None
    spec = resolver.cluster_spec()
    tasks = [(job, index) for job in ("chief", "worker") if job in spec.jobs
             for index in range(spec.num_tasks(job))]
    return len(tasks), tasks.index((resolver.task_type, int(resolver.task_id)))


@dataclass
class _Inputs:
    """The three tf.data pipelines of a training run and what they were built from."""

    train: object
    validation: object | None
    test: object
    steps_per_epoch: int


def _inputs(config: Config, dataset, run_dir: Path, strategy) -> _Inputs:
    """The pipelines, batched by the GLOBAL batch size (Keras splits each batch per replica).

    Training batches are shuffled and augmented; every worker of a multi-worker run decodes
    only its share of the files (`Split.pipeline(workers=...)`).
    """
    from cnnviz.data import augmentation_layers, disk_cache
    from cnnviz.model import one_hot_labels

    data, batch = config.data, config.train.batch_size
    workers = _shard(strategy) if config.train.distribute == "multi_worker" else None
    common = {"workers": workers,
              "one_hot": dataset.num_classes if one_hot_labels(config) else None}

    def cache(name):
        if data.cache == "none" or dataset.folder is None:
            return None
        if data.cache == "memory":
            return ""
        return disk_cache(Path(data.cache_dir) if data.cache_dir else run_dir / "cache", name,
                          dataset.splits[name])

    augment = augmentation_layers(data.augment, seed=config.seed,
                                  value_range=dataset.value_range)
    train_data = dataset.train.pipeline(batch, shuffle=True, seed=config.seed, augment=augment,
                                        cache=cache("train"), **common)
    has_validation = len(dataset.val) > 0 and data.validation_split > 0
    validation = (dataset.val.pipeline(batch, cache=cache("val"), **common)
                  if has_validation else None)
    steps = -(-len(dataset.train) // batch)
    return _Inputs(train_data, validation, dataset.test.pipeline(batch, **common), steps)


def class_weights(config: Config, dataset) -> dict[int, float] | None:
    """`train.class_weight` as {class index: weight} (Keras's `class_weight`), or None.

    balanced: n / (classes x count of the class) over the training split, as scikit-learn's
    `compute_class_weight("balanced")`; a mapping names classes by name or index.
    """
    wanted = config.train.class_weight
    if wanted is None:
        return None
    names = dataset.class_names
    if wanted == "balanced":
        counts = np.bincount(dataset.train.labels, minlength=len(names))
        present = counts > 0
        weights = np.where(present, len(dataset.train.labels) / (present.sum() * np.maximum(counts, 1)), 1.0)
        return {index: float(weight) for index, weight in enumerate(weights)}
    resolved = {}
    for key, weight in wanted.items():
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit() and key not in names):
            index = int(key)
            if not 0 <= index < len(names):
                raise CnnvizError(f"train.class_weight: class {index} is not a class of the data "
                                  f"(0..{len(names) - 1})")
        elif key in names:
            index = names.index(key)
        else:
            raise CnnvizError(f"train.class_weight: no class named {key!r}; classes: "
                              f"{', '.join(names)}")
        resolved[index] = float(weight)
    return {index: resolved.get(index, 1.0) for index in range(len(names))}


def _callbacks(config: Config, run_dir: Path, *, monitor: str, resuming: bool, backup: bool,
               extra_callbacks) -> list:
    import keras

    (run_dir / "checkpoints").mkdir(exist_ok=True)
    # Multi-worker: every epoch, so every worker saves at the same points (time differs).
    interval = 0.0 if config.train.distribute == "multi_worker" else CHECKPOINT_INTERVAL_S
    checkpoint = _checkpoint_class()
    last = checkpoint(str(run_dir / "checkpoints" / "last.keras"), interval=interval)
    callbacks = [
        # Keras's BackupAndRestore, before CSVLogger: an epoch in history.csv has its backup.
        *([keras.callbacks.BackupAndRestore(str(run_dir / BACKUP_DIR), delete_checkpoint=False,
                                            double_checkpoint=True)] if backup else []),
        # Adds the epoch's learning rate to the logs: before CSVLogger, which writes them.
        _learning_rate_logger(),
        last,
        checkpoint(str(run_dir / "checkpoints" / "best.keras"), monitor=monitor,
                   save_best_only=True, interval=interval, same_file_as=last),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=resuming),
        keras.callbacks.TerminateOnNaN(),
    ]
    schedule = config.train.optimizer.schedule
    if schedule is not None and schedule.type == "plateau":
        # After CSVLogger: the rate it lowers is the next epoch's, logged with that epoch.
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            monitor=schedule.monitor, factor=schedule.factor, patience=schedule.patience,
            min_lr=schedule.min_learning_rate, verbose=0))
    if config.train.early_stopping is not None:
        stopping = config.train.early_stopping
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=stopping.monitor, patience=stopping.patience,
            restore_best_weights=stopping.restore_best_weights))
    if config.train.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard")))
    callbacks.extend(extra_callbacks)
    return callbacks


def _learning_rate_logger():
    """A callback putting `learning_rate` (the rate at the epoch's start) into each epoch's logs,
    so history.csv and curves.png show what a schedule did."""
    import keras

    class LearningRateLogger(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                logs["learning_rate"] = self.rate

    return LearningRateLogger()


def _distributed_fixes(model, strategy, element_spec) -> None:
    """Make this model instance's `fit`/`evaluate` under a tf.distribute strategy behave as
    without one.

    Keras 3 (TF backend, still in 3.15) builds a distributed model before fitting from one batch
    that it pulls from the data, which (a) starts an extra pass of the shuffled pipeline, so
    every epoch would see the order meant for the next one and a mirrored run would not repeat
    the same run on one device, and (b) under MultiWorkerMirroredStrategy fails, because it
    first averages that batch with `strategy.reduce` (keras-team/keras#20585). The batch is only
    read for its shapes: this instance takes them from the data's `element_spec` instead.
    Keras also averages each step's scalar logs over workers with `strategy.reduce("MEAN",
    value, axis=0)`, which needs an axis: under MultiWorkerMirroredStrategy the logs are
    returned as 1-element vectors (their mean over axis 0 is the usual mean over replicas).
    """
    import keras
    import tensorflow as tf

    keras_build = model._maybe_symbolic_build

    def build(iterator=None, data_batch=None):
        keras_build(data_batch=element_spec if data_batch is None else data_batch)

    model._maybe_symbolic_build = build
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return

    def vector_logs(step):
        def run(data):
            return keras.tree.map_structure(
                lambda value: tf.reshape(value, [1]) if value.shape.rank == 0 else value,
                step(data))

        return run

    model.train_step = vector_logs(model.train_step)
    model.test_step = vector_logs(model.test_step)


@contextmanager
def _bad_files_named(dataset, splits: tuple[str, ...]):
    """Turn TensorFlow's decode failure in the middle of an epoch into one line naming the file.

    Every file's header was checked before training; a file damaged inside is found only when
    decoded. Then the splits' files are decoded once more, alone, to find which one it was.
    """
    import tensorflow as tf

    try:
        yield
    except tf.errors.InvalidArgumentError:
        if dataset.folder is None:
            raise
        from cnnviz.data.folders import bad_files_error

        paths = [path for name in splits for path in dataset.splits[name].paths()]
        error = bad_files_error(dataset.folder, paths)
        if error is None:
            raise
        raise error from None


def train(config: Config, out_root: str | Path = "outputs", *, extra_callbacks=(),
          dataset=None, log=print) -> TrainResult:
    """Train the config's model into a run directory under `out_root/<config.name>/`.

    Re-running the same config after an interrupted run resumes that run from its last finished
    epoch (Keras's BackupAndRestore state in backup/) instead of starting a new one, also under
    another device or replica count (`find_resumable_run`). Under `distribute: mirrored` or `multi_worker` the
    global `train.batch_size` is split across the replicas. In a multi-worker run only the chief
    writes under `out_root`; the other workers write into a temporary folder, removed at the
    end, and multi-worker runs never resume (every worker must start at the same epoch).

    Args:
        config: a validated config (its `name` names the run folder).
        out_root: parent of all runs, `outputs` by default.
        extra_callbacks: more Keras callbacks (tests use one to interrupt training).
        dataset: an already loaded `cnnviz.data.Dataset` (loaded from the config when None).
        log: where progress lines go.

    Returns:
        The run directory, the metrics written to metrics.json, the epoch it resumed from, and
        whether this process was the chief.
    """
    import keras

    from cnnviz.data import load_dataset

    device = select_device(config.train.device, config.train.cpu_replicas)
    # Before any TensorFlow op runs: MultiWorkerMirroredStrategy configures collective ops,
    # which TensorFlow allows only before its runtime starts.
    strategy = distribution_strategy(config)
    chief, task = _worker(strategy)
    multi_worker = config.train.distribute == "multi_worker"
    keras.utils.set_random_seed(config.seed)
    resumable = None if multi_worker else find_resumable_run(out_root, config)
    if dataset is None:
        # Resuming a folder run reads the file lists it recorded: the same splits, whatever
        # happened to the folder since.
        dataset = load_dataset(config, run_dir=resumable, log=log)

    if not chief:
        # Same work as the chief (saving and evaluating read all-reduced variables, so every
        # worker must run them), written where nobody looks: the standard multi-worker pattern.
        run_dir = Path(tempfile.mkdtemp(prefix=f"cnnviz-{task.replace(' ', '')}-"))
        log(f"{task} of a multi-worker run on {device}, {_replicas_line(strategy, config)}; "
            f"its files go to {run_dir} (removed at the end)")
        try:
            result = _fit(config, run_dir, dataset, strategy, device, resume_epoch=0,
                          resuming=False, backup=False, extra_callbacks=extra_callbacks)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        return TrainResult(run_dir, result.metrics, 0, chief=False)

    run_dir = resumable
    resuming = run_dir is not None
    if run_dir is None:
        run_dir = new_run_dir(out_root, config.name or "cnnviz")
        atomic_write_text(run_dir / "config.yaml", dump_config(config))
    dataset.record(run_dir)
    resume_epoch = _saved_epoch(run_dir / BACKUP_DIR) if resuming else 0
    _trim_history(run_dir / "history.csv", resume_epoch)
    if not multi_worker:
        # While backup/ exists the run counts as unfinished, even before its first epoch ends.
        (run_dir / BACKUP_DIR).mkdir(exist_ok=True)
    where = f"{device}, {task}" if multi_worker else device
    log(f"{'Resuming' if resuming else 'Run'} {run_dir} on {where}, "
        f"{_replicas_line(strategy, config)}"
        + (f", from epoch {resume_epoch + 1}" if resuming else ""))
    return _fit(config, run_dir, dataset, strategy, device, resume_epoch=resume_epoch,
                resuming=resuming, backup=not multi_worker, extra_callbacks=extra_callbacks)


def _fit(config: Config, run_dir: Path, dataset, strategy, device: str, *, resume_epoch: int,
         resuming: bool, backup: bool, extra_callbacks) -> TrainResult:
    """Build, fit, evaluate and save into `run_dir` (train's body, the same on every worker)."""
    import keras

    from cnnviz.data import measure_statistics
    from cnnviz.explain._common import input_range
    from cnnviz.model import build_model, compile_model

    measure_statistics(dataset)  # standardize/mean_subtract: one streaming pass, before building
    inputs = _inputs(config, dataset, run_dir, strategy)
    previous_policy = keras.mixed_precision.global_policy()
    with strategy.scope():
        try:
            model = build_model(config, dataset.input_shape, dataset.num_classes,
                                dataset.preprocessing)
            compile_model(model, config, steps_per_epoch=inputs.steps_per_epoch)
        finally:
            # build_model sets a process-wide mixed_float16 policy; the layers keep theirs,
            # and models built later in this process get the policy they had before.
            keras.mixed_precision.set_global_policy(previous_policy)

    history_file = run_dir / "history.csv"
    callbacks = _callbacks(config, run_dir,
                           monitor="val_loss" if inputs.validation is not None else "loss",
                           resuming=resuming, backup=backup, extra_callbacks=extra_callbacks)
    if config.train.distribute != "none":
        _distributed_fixes(model, strategy, inputs.train.element_spec)
    weights = class_weights(config, dataset)
    started = time.perf_counter()
    with _bad_files_named(dataset, ("train", "val")), warnings.catch_warnings():
        # A pipeline sharded by file has no length Keras can read (see Split.pipeline): Keras
        # learns it when the first epoch's data ends, and warns that it ran out of data.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        history = model.fit(inputs.train, validation_data=inputs.validation,
                            epochs=config.train.epochs, initial_epoch=resume_epoch,
                            callbacks=callbacks, verbose=config.train.verbose, class_weight=weights,
                            shuffle=False)  # the pipeline shuffles; Keras would warn it ignores True
    seconds = time.perf_counter() - started

    with _bad_files_named(dataset, ("test",)), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        evaluation = model.evaluate(inputs.test, verbose=0, return_dict=True)
    full_history = read_history(history_file)
    epochs_done = len(full_history.get("epoch", [])) or len(history.history.get("loss", []))
    metrics = {
        "test_accuracy": float(evaluation.get("accuracy", float("nan"))),
        "test_loss": float(evaluation["loss"]),
        **{f"test_{key}": float(value) for key, value in evaluation.items()
           if key not in ("accuracy", "loss")},
        "epochs": int(epochs_done),
        "resumed_from_epoch": int(resume_epoch),
        "seconds": round(seconds, 3),
        "train_images_per_second": round(
            len(dataset.train) * max(epochs_done - resume_epoch, 0) / max(seconds, 1e-9), 1),
        "device": device,
        "distribute": config.train.distribute,
        "replicas": int(strategy.num_replicas_in_sync),
        "batch_size": int(config.train.batch_size),
        "train_images": len(dataset.train),
        "validation_images": len(dataset.val) if inputs.validation is not None else 0,
        "test_images": len(dataset.test),
        "class_names": dataset.class_names,
        "preprocessing": dataset.preprocessing.to_dict(),
        "input_range": list(input_range(model)),
        **({"class_weight": {dataset.class_names[index]: weight
                             for index, weight in weights.items()}} if weights else {}),
        **({"skipped_files": len(dataset.skipped)} if dataset.skipped else {}),
        "versions": _versions(),
    }
    save_model(model, run_dir / "model.keras")
    atomic_write_json(run_dir / "metrics.json", metrics)
    from cnnviz.plot import training_curves

    if full_history:
        save_figure(training_curves(full_history), run_dir / "curves.png")
    # The backup goes last: while it exists the run counts as unfinished and is resumed.
    shutil.rmtree(run_dir / BACKUP_DIR, ignore_errors=True)
    return TrainResult(run_dir=run_dir, metrics=metrics, resumed_from_epoch=resume_epoch)
