"""The callbacks of a cnnviz fit: per-epoch commit, atomic checkpoints, learning-rate logging.

Imports Keras at module level: only cnnviz.train.fit imports this module, and only commands that
train import that (lazily), so `cnnviz --help` stays free of TensorFlow."""

from __future__ import annotations

import io
import time
from pathlib import Path

import keras
import numpy as np

from cnnviz.config.root import Config
from cnnviz.io.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    kill_point,
    save_model,
    save_weights,
)
from cnnviz.runs.layout import BACKUP_DIR
from cnnviz.train.resume import (
    METADATA_FILE,
    TrainingState,
    global_random_state,
    restore_global_random_state,
    seed_generator_states,
)


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


# Attributes through which Keras's own callbacks (EarlyStopping, ReduceLROnPlateau) remember
# past epochs; the commit saves them so a resumed run decides as an uninterrupted one would.
_CALLBACK_STATE = ("wait", "best", "best_epoch", "stopped_epoch", "cooldown_counter")


def _number(value):
    return None if value is None else float(value) if isinstance(value, (float, np.floating)) \
        else int(value)


class EpochCommit(keras.callbacks.Callback):
    """Makes a finished epoch count: the epoch's weights, then training_metadata.json.

    Keras's BackupAndRestore writes its weights and metadata in place, so a kill inside
    either leaves a truncated file, and a kill between them pairs new weights with the
    previous epoch number. Here each epoch gets new files, each written under a temporary
    name and renamed; the metadata goes last and is the commit. It also records what
    save_weights leaves out (seed-generator states, the callbacks' memory, the training
    time of each segment between resumes), so a resumed run repeats an uninterrupted one.
    """

    def __init__(self, backup_dir: Path, *, stateful: list, resumed: TrainingState | None,
                 data_seed_generators: list = ()):
        super().__init__()
        self.backup_dir = backup_dir
        self.stateful = stateful
        self.data_seed_generators = list(data_seed_generators)
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
        # Here, not before fit: whatever Keras's fit draws at its start (PyTorch's global
        # generator, for its DataLoader), the uninterrupted run drew once too.
        restore_global_random_state(self.resumed.global_random)
        # The augmentation layers' generators advance with every batch they draw; restarting
        # them would augment the remaining epochs unlike the uninterrupted run.
        saved_states = self.resumed.data_seed_generators
        if len(saved_states) == len(self.data_seed_generators):
            for generator, value in zip(self.data_seed_generators, saved_states):
                generator.state.assign(np.asarray(value, dtype=generator.state.dtype))
        for key, callback in self._keyed():
            saved = self.resumed.callbacks.get(key)
            if saved is None:
                continue
            if hasattr(callback, "restore_state"):
                callback.restore_state(saved)
                continue
            for name, value in saved.items():
                setattr(callback, name, value)
            if (self.resumed.early_stopping_weights is not None
                    and hasattr(callback, "best_weights")):
                with np.load(self.resumed.early_stopping_weights) as arrays:
                    callback.best_weights = [arrays[f"w{index}"]
                                             for index in range(len(arrays.files))]
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
                                for variable in seed_generator_states(self.model)],
            "global_random": global_random_state(),
            "data_seed_generators": [np.asarray(generator.state.numpy()).tolist()
                                     for generator in self.data_seed_generators],
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


def training_callbacks(config: Config, run_dir: Path, *, monitor: str, resuming: bool, backup: bool,
               extra_callbacks, epoch_callbacks=(),
               resumed: TrainingState | None = None, data_seed_generators=()) -> list:
    """Training's Keras callbacks, in the order Keras calls them at each epoch's end.

    The order makes a kill at any instant harmless: 1. CSVLogger writes the epoch's history
    row (the learning-rate logger before it adds the epoch's rate to it); 2. callbacks that
    remember past epochs (ReduceLROnPlateau, EarlyStopping)
    update their state and may stop training; 3. the checkpoints write (at most every
    `train.checkpoint_interval` seconds, always at the last epoch); 3b. epoch callbacks (the
    explanations of `train.explain`) write their part of the epoch; 4. EpochCommit writes the
    epoch's backup and then training_metadata.json, the commit. An epoch is done once it is
    committed; a kill before that reruns it from the previous commit, identically (same weights,
    optimizer, dropout seeds, data order and callback state): its history row is trimmed on
    resume and the checkpoints are written again with the same weights. 5. Extra callbacks
    (tests') come last and see a committed epoch.
    """
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    # Multi-worker: every epoch, so every worker saves at the same points (time differs).
    interval = (0.0 if config.train.distribute == "multi_worker"
                else config.train.checkpoint_interval)
    checkpoint = ThrottledModelCheckpoint
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
        LearningRateLogger(),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=resuming),
        *stateful,
    ]
    if config.train.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard")))
    callbacks.extend(epoch_callbacks)
    if backup:
        callbacks.append(EpochCommit(run_dir / BACKUP_DIR, stateful=stateful, resumed=resumed,
                                     data_seed_generators=data_seed_generators))
    callbacks.extend(extra_callbacks)
    return callbacks


class LearningRateLogger(keras.callbacks.Callback):
    """A callback putting `learning_rate` (the rate at the epoch's start) into each epoch's logs,
    so history.csv and curves.png show what a schedule did."""

    def on_epoch_begin(self, epoch, logs=None):
        self.rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = self.rate
