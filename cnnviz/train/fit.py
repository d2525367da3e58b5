"""Training: Keras `fit` with real callbacks into a run directory, resumable after a kill."""

from __future__ import annotations

import csv
import io
import json
import platform
import re
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnviz.config.loading import Config, dump_config, read_yaml, run_slug, validate
from cnnviz.errors import CnnvizError
from cnnviz.runs.layout import (
    BACKUP_DIR,
    RunLock,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    create_run_dir,
    kill_point,
    lock_holder,
    remove_stale_temporaries,
    remove_tree,
    run_ids,
    save_figure,
    save_model,
    save_weights,
    set_aside,
    try_lock_run,
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
_EXECUTION_SETTINGS = ("device", "distribute", "cpu_replicas", "jit_compile", "verbose",
                       "checkpoint_interval")


def _trains_like(run_dir: Path, config: Config) -> str | None:
    """None when the run's saved config trains exactly as `config` (ignoring
    `_EXECUTION_SETTINGS`), else the first line that differs."""
    config_file = run_dir / "config.yaml"
    try:
        saved = validate(read_yaml(config_file), source=str(config_file))
    except CnnvizError as error:  # a config from an older cnnviz, or damaged
        return str(error).splitlines()[0]
    execution = {key: getattr(config.train, key) for key in _EXECUTION_SETTINGS}
    saved = saved.model_copy(update={"train": saved.train.model_copy(update=execution)})
    wanted, found = dump_config(config).splitlines(), dump_config(saved).splitlines()
    if wanted == found:
        return None
    return next((f"{mine.strip()!r} here, {theirs.strip()!r} in the run"
                 for mine, theirs in zip(wanted, found) if mine != theirs), "different keys")


def _interrupted(run_dir: Path) -> bool:
    return (run_dir / BACKUP_DIR).is_dir() and (run_dir / "config.yaml").is_file()


def find_resumable_run(out_root: str | Path, config: Config, *, log=print
                       ) -> tuple[Path, RunLock] | None:
    """The newest interrupted run of this config that no live process trains, locked.

    A run is interrupted while it has its backup/; it trains as this config if its config.yaml
    does, ignoring `_EXECUTION_SETTINGS`. A run locked by a live process is left alone, and
    one line says so when no other run can be resumed.

    Returns:
        (run directory, its lock) or None.
    """
    busy = []
    for run_dir in run_ids(Path(out_root) / run_slug(config.name)):
        if not _interrupted(run_dir) or _trains_like(run_dir, config) is not None:
            continue
        lock = try_lock_run(run_dir)
        if lock is None:
            busy.append(run_dir)
            continue
        if _interrupted(run_dir):  # still: it may have finished while we looked
            return run_dir, lock
        lock.release()
    if busy:
        holder = lock_holder(busy[0])
        log(f"{busy[0]} is being trained by process {holder or '(unknown)'}; starting a new run")
    return None


def _resume_given_run(run_dir: Path, config: Config) -> tuple[Path, RunLock]:
    """`--resume RUN`: lock RUN to continue it, or say in one line why it cannot be."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CnnvizError(f"--resume {run_dir}: not a run directory (no config.yaml in it)")
    if not (run_dir / BACKUP_DIR).is_dir():
        raise CnnvizError(f"--resume {run_dir}: the run has finished (no backup/ to resume from)")
    difference = _trains_like(run_dir, config)
    if difference is not None:
        raise CnnvizError(
            f"--resume {run_dir}: the run was trained from another config ({difference}); "
            f"give its own config, {run_dir / 'config.yaml'}"
        )
    lock = try_lock_run(run_dir)
    if lock is None:
        holder = lock_holder(run_dir)
        raise CnnvizError(
            f"--resume {run_dir}: process {holder or '(unknown)'} is training this run; wait "
            f"for it to finish or stop it (kill {holder or 'PID'}) first"
        )
    return run_dir, lock


def check_resume(run_dir: str | Path, config: Config) -> None:
    """Raise the CnnvizError `--resume RUN` would give, without keeping the lock (a quick
    check before TensorFlow loads; `train` checks again for real)."""
    _resume_given_run(Path(run_dir), config)[1].release()


def _remove_stale_files(parent: Path) -> None:
    """Remove what killed processes left under `parent`: half-made run folders, and temporary
    files in every run that no live process trains."""
    remove_stale_temporaries(parent)
    for run_dir in run_ids(parent):
        try:
            lock = try_lock_run(run_dir)
        except CnnvizError:  # a run we cannot write to: nothing of ours to clean there
            continue
        if lock is None:
            continue
        try:
            _remove_stale_temporaries_of(run_dir)
        finally:
            lock.release()


def _remove_stale_temporaries_of(run_dir: Path) -> None:
    for folder in (run_dir, run_dir / "checkpoints", run_dir / BACKUP_DIR):
        remove_stale_temporaries(folder)


@dataclass
class _Claim:
    """The run directory this process trains, and its lock."""

    run_dir: Path
    lock: RunLock
    created: bool  # made by this process: removed again if it fails before any epoch is done


def _claim_run(out_root: str | Path, config: Config, *, resume: Path | None, multi_worker: bool,
               log) -> _Claim:
    _remove_stale_files(Path(out_root) / run_slug(config.name))
    if resume is not None:
        run_dir, lock = _resume_given_run(resume, config)
        _remove_stale_temporaries_of(run_dir)
        return _Claim(run_dir, lock, created=False)
    found = None if multi_worker else find_resumable_run(out_root, config, log=log)
    if found is not None:
        return _Claim(*found, created=False)
    run_dir, lock = create_run_dir(out_root, run_slug(config.name), dump_config(config))
    return _Claim(run_dir, lock, created=True)


# ------------------------------------------------------------------------------ training state
# backup/ holds, for the last finished epoch N: epoch-N.weights.h5 (model and optimizer),
# possibly epoch-N.early-stopping.npz, and training_metadata.json naming them (Keras's
# BackupAndRestore file name; "epoch" is the number of finished epochs). The metadata is
# renamed into place last: it is the commit. The previous epoch's files stay until the next
# commit, as a fallback.
METADATA_FILE = "training_metadata.json"
_EPOCH_FILE = re.compile(r"^epoch-(\d+)\.")


class _Damaged(Exception):
    """backup/ cannot be resumed from; the message says why."""


@dataclass
class TrainingState:
    """What backup/ holds: the state after `epoch` finished epochs."""

    epoch: int
    weights: Path
    seed_generators: list = field(default_factory=list)
    callbacks: dict = field(default_factory=dict)
    early_stopping_weights: Path | None = None
    segments: list = field(default_factory=list)
    stopped: bool = False  # early stopping (or a NaN) ended training at this epoch


def read_training_state(backup_dir: Path) -> TrainingState | None:
    """The state in `backup_dir`, None when no epoch finished, `_Damaged` when unreadable."""
    metadata_file = backup_dir / METADATA_FILE
    if not metadata_file.exists():
        return None
    try:
        metadata = json.loads(metadata_file.read_text())
        epoch = int(metadata["epoch"])
        # Without "weights" it is Keras's own BackupAndRestore layout (older cnnviz runs).
        weights = backup_dir / metadata.get("weights", "latest.weights.h5")
        extra = metadata.get("early_stopping_weights")
        state = TrainingState(
            epoch=epoch, weights=weights, seed_generators=list(metadata.get("seed_generators", [])),
            callbacks=dict(metadata.get("callbacks", {})),
            early_stopping_weights=backup_dir / extra if extra else None,
            segments=list(metadata.get("segments", [])), stopped=bool(metadata.get("stopped")))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        reason = "empty" if metadata_file.is_file() and metadata_file.stat().st_size == 0 else error
        raise _Damaged(f"{METADATA_FILE}: {reason}") from None
    if epoch < 0:
        raise _Damaged(f"{METADATA_FILE}: epoch {epoch}")
    for needed in (state.weights, state.early_stopping_weights):
        if needed is not None and not needed.is_file():
            raise _Damaged(f"{needed.name} is missing")
    return state


def _load_weights(model, strategy, weights: Path) -> None:
    """Load model and optimizer weights (building the optimizer first, as BackupAndRestore does)."""
    with strategy.scope():
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        try:
            model.load_weights(weights)
        except Exception as error:  # noqa: BLE001 - h5py and Keras raise many types
            raise _Damaged(f"{weights.name}: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}") from None


def _seed_generator_states(model) -> list:
    # Dropout (and any random layer) draws from a SeedGenerator whose state save_weights leaves
    # out; saving it makes a resumed epoch draw the same masks as an uninterrupted one.
    return [variable for variable in model.variables
            if variable.path.endswith("seed_generator_state")]


def _restore(model, strategy, run_dir: Path, log) -> TrainingState | None:
    """Load the run's backup into `model`; a damaged backup is set aside and replaced by its
    newest loadable epoch file, or by nothing (the caller then starts again from scratch).

    Returns:
        The state resumed from, or None to train from the first epoch.
    """
    backup = run_dir / BACKUP_DIR
    try:
        state = read_training_state(backup)
        if state is None:
            return None
        _load_weights(model, strategy, state.weights)
    except _Damaged as damage:
        aside = set_aside(backup, "damaged")
        backup.mkdir()
        candidates = sorted(((int(match.group(1)), path) for path in aside.glob("epoch-*.weights.h5")
                             if (match := _EPOCH_FILE.match(path.name))), reverse=True)
        for epoch, weights in candidates:
            try:
                _load_weights(model, strategy, weights)
            except _Damaged:
                continue
            log(f"{backup} was damaged ({damage}); set aside as {aside.name}; resuming from its "
                f"last good checkpoint, {weights.name} (epoch {epoch})")
            return TrainingState(epoch=epoch, weights=weights)
        log(f"{backup} was damaged ({damage}); set aside as {aside.name}; no usable checkpoint "
            "in it, so training starts again from epoch 1")
        raise _StartAgain from None
    variables = _seed_generator_states(model)
    if len(variables) == len(state.seed_generators):
        for variable, value in zip(variables, state.seed_generators):
            variable.assign(np.asarray(value, dtype=variable.dtype))
    return state


class _StartAgain(Exception):
    """The backup was unusable and the model may hold part of it: rebuild, start at epoch 0."""


def _checkpoint_class():
    import keras

    class ThrottledModelCheckpoint(keras.callbacks.ModelCheckpoint):
        """Keras's ModelCheckpoint, writing atomically and at most every `interval` seconds.

        Which epoch to keep is ModelCheckpoint's own decision (`monitor`, `save_best_only`);
        the weights it chose wait in memory until `interval` has passed or the last epoch ends
        (also an early stop), then go to a temporary name and are renamed, so a kill never
        leaves a truncated file.
        """

        def __init__(self, filepath, *, interval: float, same_file_as=None, **kwargs):
            super().__init__(filepath, **kwargs)
            self.interval = interval
            # Another checkpoint written just before: when it saved these very weights (the
            # last epoch was the best), copy its file instead of saving the model twice.
            self.same_file_as = same_file_as
            self._pending = None
            self._pending_best = None
            self._written = None
            self._written_at = time.monotonic()
            self.written_best = None  # the monitored value of the weights in the file

        def _save_model(self, epoch, batch, logs):
            filepath = self._get_file_path(epoch, batch, logs)
            if self._should_save_model(epoch, batch, logs, filepath):
                self._pending, self._pending_best = self.model.get_weights(), self.best
            epochs = (self.params or {}).get("epochs")  # None outside fit
            last_epoch = (epochs is not None and epoch + 1 >= epochs) or bool(
                getattr(self.model, "stop_training", False))
            if self._pending is not None and (
                    last_epoch or time.monotonic() - self._written_at >= self.interval):
                self._write()

        def on_train_end(self, logs=None):
            if self._pending is not None:
                self._write()
            super().on_train_end(logs)

        def resume_state(self) -> dict:
            # The file's value, not the in-memory best: weights that waited unwritten are lost
            # in a kill, and a resumed run must still replace the file by a better epoch.
            return {"best": None if self.written_best is None else float(self.written_best)}

        def restore_state(self, state: dict) -> None:
            self.best = state.get("best")
            self.written_best = self.best

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
            self.written_best = self._pending_best
            self._written_at = time.monotonic()

    return ThrottledModelCheckpoint


# Attributes through which Keras's own callbacks (EarlyStopping, ReduceLROnPlateau) remember
# past epochs; the commit saves them so a resumed run decides as an uninterrupted one would.
_CALLBACK_STATE = ("wait", "best", "best_epoch", "stopped_epoch", "cooldown_counter")


def _number(value):
    return None if value is None else float(value) if isinstance(value, (float, np.floating)) \
        else int(value)


def _commit_class():
    import keras

    class EpochCommit(keras.callbacks.Callback):
        """Makes a finished epoch count: the epoch's weights, then training_metadata.json.

        Keras's BackupAndRestore writes its weights and metadata in place, so a kill inside
        either leaves a truncated file, and a kill between them pairs new weights with the
        previous epoch number. Here each epoch gets new files, each written under a temporary
        name and renamed; the metadata goes last and is the commit. It also records what
        save_weights leaves out (seed-generator states, the callbacks' memory, the training
        time of each segment between resumes), so a resumed run repeats an uninterrupted one.
        """

        def __init__(self, backup_dir: Path, *, stateful: list, resumed: TrainingState | None):
            super().__init__()
            self.backup_dir = backup_dir
            self.stateful = stateful
            self.resumed = resumed
            self.from_epoch = resumed.epoch if resumed else 0
            self.segments = list(resumed.segments) if resumed else []
            self._kept = self._files_of(resumed)
            self._early_stopping_file = resumed.early_stopping_weights if resumed else None
            self._early_stopping_weights = None
            self._started = time.perf_counter()
            self.committed_epoch = self.from_epoch

        @staticmethod
        def _files_of(state: TrainingState | None) -> set[str]:
            if state is None:
                return set()
            return {path.name for path in (state.weights, state.early_stopping_weights) if path}

        def on_train_begin(self, logs=None):
            # After the other callbacks' own on_train_begin, which resets their state.
            self._started = time.perf_counter()
            if self.resumed is None:
                return
            for key, callback in self._keyed():
                saved = self.resumed.callbacks.get(key)
                if saved is None:
                    continue
                if hasattr(callback, "restore_state"):
                    callback.restore_state(saved)
                    continue
                for name, value in saved.items():
                    setattr(callback, name, value)
                if self.resumed.early_stopping_weights is not None and hasattr(callback, "best_weights"):
                    with np.load(self.resumed.early_stopping_weights) as arrays:
                        callback.best_weights = [arrays[f"w{index}"] for index in range(len(arrays.files))]
                    self._early_stopping_weights = callback.best_weights

        def _keyed(self):
            return [(f"{index}:{type(callback).__name__}", callback)
                    for index, callback in enumerate(self.stateful)]

        def segment_seconds(self) -> float:
            return time.perf_counter() - self._started

        def all_segments(self, to_epoch: int, seconds: float) -> list[dict]:
            return [*self.segments, {"from_epoch": self.from_epoch, "to_epoch": to_epoch,
                                     "seconds": round(seconds, 3)}]

        def on_epoch_end(self, epoch, logs=None):
            kill_point("epoch:end")  # the history row and checkpoints are written, nothing committed
            done = epoch + 1
            weights = save_weights(self.model, self.backup_dir / f"epoch-{done}.weights.h5")
            states, early_stopping_file = {}, self._early_stopping_file
            for key, callback in self._keyed():
                if hasattr(callback, "resume_state"):
                    states[key] = callback.resume_state()
                    continue
                states[key] = {name: _number(getattr(callback, name)) for name in _CALLBACK_STATE
                               if hasattr(callback, name)}
                best_weights = getattr(callback, "best_weights", None)
                if best_weights is not None and best_weights is not self._early_stopping_weights:
                    buffer = io.BytesIO()
                    np.savez(buffer, **{f"w{index}": array for index, array in enumerate(best_weights)})
                    early_stopping_file = atomic_write_bytes(
                        self.backup_dir / f"epoch-{done}.early-stopping.npz", buffer.getvalue())
                    self._early_stopping_weights = best_weights
            metadata = {
                "epoch": done, "batch": 0, "weights": weights.name,
                "early_stopping_weights": early_stopping_file.name if early_stopping_file else None,
                "stopped": bool(self.model.stop_training),
                "seed_generators": [np.asarray(variable.numpy()).tolist()
                                    for variable in _seed_generator_states(self.model)],
                "callbacks": states,
                "segments": self.all_segments(done, self.segment_seconds()),
            }
            atomic_write_json(self.backup_dir / METADATA_FILE, metadata)
            self.committed_epoch = done
            kept = {weights.name} | ({early_stopping_file.name} if early_stopping_file else set())
            for path in self.backup_dir.glob("epoch-*"):  # older than the previous commit
                if path.name not in kept | self._kept:
                    path.unlink(missing_ok=True)
            self._kept, self._early_stopping_file = kept, early_stopping_file

    return EpochCommit


def _trim_history(history_file: Path, resume_epoch: int) -> None:
    """Keep only the history rows of the epochs before `resume_epoch`, byte for byte.

    The history row is written before the epoch is committed: an epoch whose commit a kill
    prevented has a row but reruns, so the row must go or it would appear twice. Rows are kept
    only while they are complete lines numbering the epochs 0, 1, 2, ... in order.
    """
    if not history_file.is_file():
        return
    text = history_file.read_bytes().decode("utf-8", errors="replace")  # keep CSVLogger's \r\n
    lines = text.splitlines(keepends=True)
    header = next(csv.reader(lines[:1]), [])
    if resume_epoch == 0 or not header or header[0] != "epoch" or not lines[0].endswith("\n"):
        history_file.unlink()  # CSVLogger writes a new header
        return
    kept = lines[:1]
    for line in lines[1:resume_epoch + 1]:
        row = next(csv.reader([line]), [])
        if not line.endswith("\n") or len(row) != len(header) or row[0] != str(len(kept) - 1):
            break
        kept.append(line)
    if "".join(kept) != text:
        atomic_write_text(history_file, "".join(kept))


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


def _inputs(config: Config, dataset, run_dir: Path, strategy) -> _Inputs:
    """The pipelines, batched by the GLOBAL batch size (Keras splits each batch per replica).

    Training batches are shuffled and augmented; every worker of a multi-worker run decodes
    only its share of the files (`Split.pipeline(workers=...)`).
    """
    from cnnviz.data import augmentation_layers, disk_cache
    from cnnviz.model.build import one_hot_labels

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
    return _Inputs(train_data, validation, dataset.test.pipeline(batch, **common))


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
               extra_callbacks, resumed: TrainingState | None = None) -> list:
    """Training's Keras callbacks, in the order Keras calls them at each epoch's end.

    The order makes a kill at any instant harmless: 1. CSVLogger writes the epoch's history
    row (the learning-rate logger before it adds the epoch's rate to it); 2. callbacks that
    remember past epochs (ReduceLROnPlateau, EarlyStopping)
    update their state and may stop training; 3. the checkpoints write (at most every
    `train.checkpoint_interval` seconds, always at the last epoch); 4. EpochCommit writes the
    epoch's backup and then training_metadata.json, the commit. An epoch is done once it is
    committed; a kill before that reruns it from the previous commit, identically (same weights,
    optimizer, dropout seeds, data order and callback state): its history row is trimmed on
    resume and the checkpoints are written again with the same weights. 5. Extra callbacks
    (tests') come last and see a committed epoch.
    """
    import keras

    (run_dir / "checkpoints").mkdir(exist_ok=True)
    # Multi-worker: every epoch, so every worker saves at the same points (time differs).
    interval = 0.0 if config.train.distribute == "multi_worker" else config.train.checkpoint_interval
    checkpoint = _checkpoint_class()
    last = checkpoint(str(run_dir / "checkpoints" / "last.keras"), interval=interval)
    best = checkpoint(str(run_dir / "checkpoints" / "best.keras"), monitor=monitor,
                      save_best_only=True, interval=interval, same_file_as=last)
    stateful = []
    schedule = config.train.optimizer.schedule
    if schedule is not None and schedule.type == "plateau":
        # After CSVLogger: the rate it lowers is the next epoch's, logged with that epoch.
        stateful.append(keras.callbacks.ReduceLROnPlateau(
            monitor=schedule.monitor, factor=schedule.factor, patience=schedule.patience,
            min_lr=schedule.min_learning_rate, verbose=0))
    if config.train.early_stopping is not None:
        stopping = config.train.early_stopping
        stateful.append(keras.callbacks.EarlyStopping(
            monitor=stopping.monitor, patience=stopping.patience,
            restore_best_weights=stopping.restore_best_weights))
    stateful += [last, best]
    callbacks = [
        keras.callbacks.TerminateOnNaN(),
        # Puts the epoch's learning rate into the logs: before CSVLogger, which writes them.
        _learning_rate_logger(),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=resuming),
        *stateful,
    ]
    if config.train.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard")))
    if backup:
        callbacks.append(_commit_class()(run_dir / BACKUP_DIR, stateful=stateful, resumed=resumed))
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


def train(config: Config, out_root: str | Path = "outputs", *, extra_callbacks=(),
          dataset=None, log=None, resume: str | Path | None = None) -> TrainResult:
    """Train the config's model into a run directory under `out_root/<slug of config.name>/`.

    The data is loaded and the model built before anything is written, so a config Keras cannot
    build leaves no trace. Re-running the same config after an interrupted run resumes that run
    from its last finished epoch, also under another device or replica count
    (`find_resumable_run`), unless another process is training it (its lock is held): then a
    new run starts. The process holds the run's lock until it returns. Under `distribute:
    mirrored` or `multi_worker` the global `train.batch_size` is split across the replicas. In
    a multi-worker run only the chief writes under `out_root`; the other workers write into a
    temporary folder, removed at the end, and multi-worker runs never resume (every worker must
    start at the same epoch).

    Args:
        config: a validated config (its `name` names the run folder, through `run_slug`).
        out_root: parent of all runs, `outputs` by default.
        extra_callbacks: more Keras callbacks, called after the epoch is committed (tests use
            one to interrupt training).
        dataset: an already loaded `cnnviz.data.Dataset` (loaded from the config when None).
        log: where progress lines go (default: print, flushed).
        resume: a run directory to resume (`--resume RUN`); a CnnvizError when it is finished,
            trained from another config, or locked by a live process.

    Returns:
        The run directory, the metrics written to metrics.json, the epoch it resumed from, and
        whether this process was the chief.
    """
    import keras

    from cnnviz.data import load_dataset

    log = log or _print_flushed
    device = select_device(config.train.device, config.train.cpu_replicas)
    # Before any TensorFlow op runs: MultiWorkerMirroredStrategy configures collective ops,
    # which TensorFlow allows only before its runtime starts.
    strategy = distribution_strategy(config)
    chief, task = _worker(strategy)
    multi_worker = config.train.distribute == "multi_worker"
    keras.utils.set_random_seed(config.seed)
    if dataset is None:
        dataset = load_dataset(config, log=log)
    model = _build(config, dataset, strategy)

    if not chief:
        # Same work as the chief (saving and evaluating read all-reduced variables, so every
        # worker must run them), written where nobody looks: the standard multi-worker pattern.
        run_dir = Path(tempfile.mkdtemp(prefix=f"cnnviz-{task.replace(' ', '')}-"))
        log(f"{task} of a multi-worker run on {device}, {_replicas_line(strategy, config)}; "
            f"its files go to {run_dir} (removed at the end)")
        try:
            result = _fit(config, run_dir, model, dataset, strategy, device, resumed=None,
                          backup=False, extra_callbacks=extra_callbacks)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        return TrainResult(run_dir, result.metrics, 0, chief=False)

    claim = _claim_run(out_root, config, resume=Path(resume) if resume else None,
                       multi_worker=multi_worker, log=log)
    run_dir = claim.run_dir
    try:
        recorded = _recorded_dataset(config, dataset, run_dir, log)
        if recorded is not dataset:  # the folder changed since the run started: keep its splits
            dataset = recorded
            model = _build(config, dataset, strategy)
        dataset.record(run_dir)
        try:
            resumed = _restore(model, strategy, run_dir, log) if not claim.created else None
        except _StartAgain:
            keras.utils.set_random_seed(config.seed)
            model, resumed = _build(config, dataset, strategy), None
        resume_epoch = resumed.epoch if resumed else 0
        _trim_history(run_dir / "history.csv", resume_epoch)
        where = f"{device}, {task}" if multi_worker else device
        log(f"{'Resuming' if not claim.created else 'Run'} {run_dir} on {where}, "
            f"{_replicas_line(strategy, config)}"
            + (f", from epoch {resume_epoch + 1}" if not claim.created else ""))
        return _fit(config, run_dir, model, dataset, strategy, device, resumed=resumed,
                    backup=not multi_worker, extra_callbacks=extra_callbacks)
    except BaseException:
        if claim.created and not (run_dir / BACKUP_DIR / METADATA_FILE).exists():
            # Not one epoch finished: nothing worth resuming, and a leftover would be resumed
            # (and fail the same way) by the next run of this config.
            remove_tree(run_dir)
        raise
    finally:
        claim.lock.release()


def _recorded_dataset(config: Config, dataset, run_dir: Path, log):
    """A resumed folder run trains on the files it recorded, whatever happened to the folder
    since: the recorded splits when they differ from `dataset`'s, else `dataset` itself."""
    from cnnviz.data import load_dataset
    from cnnviz.data.folders import has_split_files

    if dataset.folder is None or not has_split_files(run_dir):
        return dataset
    recorded = load_dataset(config, run_dir=run_dir, log=log)
    same = all(recorded.splits[name].files == split.files
               for name, split in dataset.splits.items())
    return dataset if same else recorded


def _steps_per_epoch(config: Config, dataset) -> int:
    return -(-len(dataset.train) // config.train.batch_size)


def _print_flushed(line: str) -> None:
    print(line, flush=True)  # CI logs and tests read progress as it happens


def _keras_verbose(setting) -> int:
    """`train.verbose`; auto: the progress bar on a terminal, one line per epoch elsewhere
    (the bar's backspaces and carriage returns garble CI logs)."""
    if setting != "auto":
        return int(setting)
    return 1 if sys.stdout.isatty() else 2


def _build(config: Config, dataset, strategy):
    """The compiled model, or a CnnvizError (before anything is written)."""
    import keras
    import tensorflow as tf

    from cnnviz.data import measure_statistics
    from cnnviz.model.build import build_model, compile_model

    measure_statistics(dataset)  # standardize/mean_subtract: one streaming pass, before building
    previous_policy = keras.mixed_precision.global_policy()
    with strategy.scope():
        try:
            model = build_model(config, dataset.input_shape, dataset.num_classes,
                                dataset.preprocessing)
            compile_model(model, config, steps_per_epoch=_steps_per_epoch(config, dataset))
        except (MemoryError, tf.errors.ResourceExhaustedError) as error:
            raise CnnvizError(_out_of_memory(error)) from None
        finally:
            # build_model sets a process-wide mixed_float16 policy; the layers keep theirs,
            # and models built later in this process get the policy they had before.
            keras.mixed_precision.set_global_policy(previous_policy)
    return model


def _out_of_memory(error: BaseException) -> str:
    detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return (f"the model does not fit in memory ({detail}); use fewer filters or units, a "
            "smaller data.image_size or a smaller train.batch_size")


def _replay_data_order(train_data, strategy, epochs: int) -> None:
    """Advance the shuffled pipeline by `epochs` epochs without reading a batch.

    Each iterator made from the pipeline draws the next reshuffle seed. Keras's epoch iterator
    makes its iterators in a pattern of its own (in Keras 3.15 two per epoch: one at the start,
    one at the end), so the replay runs Keras's own class over the epochs without pulling data:
    a resumed run then sees each epoch's batches in the order the uninterrupted run saw them.
    """
    if epochs == 0:
        return
    try:
        from keras.src.backend.tensorflow.trainer import TFEpochIterator
    except ImportError:  # another Keras layout: resume still works, in another data order
        return
    epoch_iterator = TFEpochIterator(x=train_data, distribute_strategy=strategy)
    for _ in range(epochs):
        for _step in epoch_iterator:  # yields (step, step, tf iterator): no batch is read
            pass


def _fit(config: Config, run_dir: Path, model, dataset, strategy, device: str, *,
         resumed: TrainingState | None, backup: bool, extra_callbacks) -> TrainResult:
    """Fit, evaluate and save into `run_dir` (train's body, the same on every worker)."""
    import tensorflow as tf

    from cnnviz.model.outputs import input_range

    resume_epoch = resumed.epoch if resumed else 0
    inputs = _inputs(config, dataset, run_dir, strategy)
    history_file = run_dir / "history.csv"
    callbacks = _callbacks(config, run_dir,
                           monitor="val_loss" if inputs.validation is not None else "loss",
                           resuming=resume_epoch > 0, backup=backup,
                           extra_callbacks=extra_callbacks, resumed=resumed)
    commit = next((callback for callback in callbacks if type(callback).__name__ == "EpochCommit"),
                  None)
    if config.train.distribute != "none":
        _distributed_fixes(model, strategy, inputs.train.element_spec)
    _replay_data_order(inputs.train, strategy, resume_epoch)
    weights = class_weights(config, dataset)
    # An early-stopped run that was killed before its end does not train on.
    epochs = resume_epoch if resumed is not None and resumed.stopped else config.train.epochs
    started = time.perf_counter()
    try:
        with _bad_files_named(dataset, ("train", "val")), warnings.catch_warnings():
            # A pipeline sharded by file has no length Keras can read (see Split.pipeline):
            # Keras learns it when the first epoch's data ends, and warns that it ran out.
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            history = model.fit(inputs.train, validation_data=inputs.validation, epochs=epochs,
                                initial_epoch=resume_epoch, callbacks=callbacks,
                                verbose=_keras_verbose(config.train.verbose), class_weight=weights,
                                shuffle=False)  # the pipeline shuffles; Keras would warn otherwise
    except tf.errors.ResourceExhaustedError as error:
        raise CnnvizError(_out_of_memory(error)) from None
    except OSError as error:  # Keras's own writers (CSVLogger, TensorBoard)
        raise CnnvizError(f"cannot write into {run_dir}: {error.strerror or error}") from None
    seconds = time.perf_counter() - started

    with _bad_files_named(dataset, ("test",)), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        evaluation = model.evaluate(inputs.test, verbose=0, return_dict=True)
    full_history = read_history(history_file)
    epochs_done = len(full_history.get("epoch", [])) or len(history.history.get("loss", []))
    segments = (commit.all_segments(epochs_done, seconds) if commit is not None else
                [{"from_epoch": 0, "to_epoch": epochs_done, "seconds": round(seconds, 3)}])
    total_seconds = sum(segment["seconds"] for segment in segments)
    metrics = {
        "test_accuracy": float(evaluation.get("accuracy", float("nan"))),
        "test_loss": float(evaluation["loss"]),
        **{f"test_{key}": float(value) for key, value in evaluation.items()
           if key not in ("accuracy", "loss")},
        "epochs": int(epochs_done),
        "resumed_from_epoch": int(resume_epoch),
        # Training time over every segment (a kill's lost partial epoch excluded); `segments`
        # says which epochs each process trained and how long it took.
        "seconds": round(total_seconds, 3),
        "segments": segments,
        "train_images_per_second": round(
            len(dataset.train) * epochs_done / max(total_seconds, 1e-9), 1),
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
    remove_tree(run_dir / BACKUP_DIR)
    return TrainResult(run_dir=run_dir, metrics=metrics, resumed_from_epoch=resume_epoch)
