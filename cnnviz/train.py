"""Training: Keras `fit` with real callbacks into a run directory, resumable after a kill."""

from __future__ import annotations

import csv
import io
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnviz.config import Config, dump_config
from cnnviz.errors import CnnvizError
from cnnviz.runs import (
    BACKUP_DIR,
    atomic_write_json,
    atomic_write_text,
    find_unfinished_run,
    new_run_dir,
    save_figure,
    save_model,
)


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict
    resumed_from_epoch: int


def select_device(choice: str) -> str:
    """Apply `train.device` and return the device training will use, e.g. 'GPU:0' or 'CPU'.

    Must run before TensorFlow touches a device: hiding GPUs is only possible before that.
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
    return f"GPU:0 ({len(gpus)} visible)" if gpus else "CPU"


def distribution_strategy(config: Config):
    """The tf.distribute strategy for `train.distribute` (the default strategy for 'none')."""
    import tensorflow as tf

    if config.train.distribute == "mirrored":
        return tf.distribute.MirroredStrategy()
    if config.train.distribute == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def _atomic_checkpoint_class():
    import keras

    class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
        """ModelCheckpoint that saves under a temporary name and renames: a kill never leaves
        a truncated `.keras` file."""

        def _save_model(self, epoch, batch, logs):
            final_path = Path(self.filepath)
            temporary = final_path.with_name(f".{final_path.stem}.partial.keras")
            self.filepath = str(temporary)
            try:
                super()._save_model(epoch, batch, logs)
                if temporary.exists():
                    temporary.replace(final_path)
            finally:
                self.filepath = str(final_path)
                temporary.unlink(missing_ok=True)

    return AtomicModelCheckpoint


def _trim_history(history_file: Path, backup_dir: Path) -> int:
    """Keep only the history rows of epochs the backup restores; return the epoch to resume at.

    CSVLogger may have logged an epoch whose backup the kill prevented; that epoch reruns, so
    its row must go or it would appear twice.
    """
    import json

    metadata = backup_dir / "training_metadata.json"
    if not metadata.is_file():
        return 0
    resume_epoch = int(json.loads(metadata.read_text())["epoch"])
    if history_file.is_file():
        rows = list(csv.reader(io.StringIO(history_file.read_text())))
        kept = rows[:1] + [row for row in rows[1:] if row and int(row[0]) < resume_epoch]
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(kept)
        atomic_write_text(history_file, buffer.getvalue())
    return resume_epoch


def read_history(history_file: Path) -> dict[str, list[float]]:
    """history.csv as {metric: [value per epoch]}."""
    if not history_file.is_file():
        return {}
    rows = list(csv.DictReader(io.StringIO(history_file.read_text())))
    return {key: [float(row[key]) for row in rows] for key in (rows[0] if rows else {})}


def _versions() -> dict:
    import keras
    import tensorflow as tf

    import cnnviz

    return {"cnnviz": cnnviz.__version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def train(config: Config, out_root: str | Path = "outputs", *, extra_callbacks=(),
          dataset=None, log=print) -> TrainResult:
    """Train the config's model into a run directory under `out_root/<config.name>/`.

    Re-running the same config after an interrupted run resumes that run from its last finished
    epoch (Keras BackupAndRestore) instead of starting a new one.

    Args:
        config: a validated config (its `name` names the run folder).
        out_root: parent of all runs, `outputs` by default.
        extra_callbacks: more Keras callbacks (tests use one to interrupt training).
        dataset: an already loaded `cnnviz.data.Dataset` (loaded from the config when None).
        log: where progress lines go.

    Returns:
        The run directory, the metrics written to metrics.json, and the epoch it resumed from.
    """
    import keras

    from cnnviz.data import load_dataset, training_pipeline
    from cnnviz.model import build_model, compile_model

    device = select_device(config.train.device)
    keras.utils.set_random_seed(config.seed)
    if dataset is None:
        dataset = load_dataset(config)

    run_dir = find_unfinished_run(out_root, config)
    resuming = run_dir is not None
    if run_dir is None:
        run_dir = new_run_dir(out_root, config.name or "cnnviz")
        atomic_write_text(run_dir / "config.yaml", dump_config(config))
    history_file = run_dir / "history.csv"
    backup_dir = run_dir / BACKUP_DIR
    resume_epoch = _trim_history(history_file, backup_dir) if resuming else 0
    log(f"{'Resuming' if resuming else 'Run'} {run_dir} on {device}"
        + (f" from epoch {resume_epoch + 1}" if resuming else ""))

    strategy = distribution_strategy(config)
    with strategy.scope():
        model = build_model(config, dataset.input_shape, dataset.num_classes)
        compile_model(model, config)

    has_validation = len(dataset.x_val) > 0 and config.data.validation_split > 0
    monitor = "val_loss" if has_validation else "loss"
    checkpoint = _atomic_checkpoint_class()
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    callbacks = [
        keras.callbacks.BackupAndRestore(str(backup_dir), delete_checkpoint=False,
                                         double_checkpoint=True),
        checkpoint(str(run_dir / "checkpoints" / "best.keras"), monitor=monitor, save_best_only=True),
        checkpoint(str(run_dir / "checkpoints" / "last.keras")),
        keras.callbacks.CSVLogger(str(history_file), append=resuming),
        keras.callbacks.TerminateOnNaN(),
    ]
    if config.train.early_stopping is not None:
        stopping = config.train.early_stopping
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=stopping.monitor, patience=stopping.patience,
            restore_best_weights=stopping.restore_best_weights))
    if config.train.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard")))
    callbacks.extend(extra_callbacks)

    global_batch = config.train.batch_size
    train_data = training_pipeline(dataset.x_train, dataset.y_train, global_batch,
                                   shuffle=True, seed=config.seed)
    val_data = (training_pipeline(dataset.x_val, dataset.y_val, global_batch, shuffle=False,
                                  seed=config.seed) if has_validation else None)
    started = time.perf_counter()
    history = model.fit(train_data, validation_data=val_data, epochs=config.train.epochs,
                        callbacks=callbacks, verbose=config.train.verbose)
    seconds = time.perf_counter() - started

    test_data = training_pipeline(dataset.x_test, dataset.y_test, global_batch, shuffle=False,
                                  seed=config.seed)
    evaluation = model.evaluate(test_data, verbose=0, return_dict=True)
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
            len(dataset.x_train) * max(epochs_done - resume_epoch, 0) / max(seconds, 1e-9), 1),
        "device": device,
        "distribute": config.train.distribute,
        "replicas": int(strategy.num_replicas_in_sync),
        "train_images": int(len(dataset.x_train)),
        "test_images": int(len(dataset.x_test)),
        "class_names": dataset.class_names,
        "preprocessing": dataset.preprocessing.to_dict(),
        "versions": _versions(),
    }
    save_model(model, run_dir / "model.keras")
    atomic_write_json(run_dir / "metrics.json", metrics)
    from cnnviz.plot import training_curves

    if full_history:
        save_figure(training_curves(full_history), run_dir / "curves.png")
    # The backup goes last: while it exists the run counts as unfinished and is resumed.
    shutil.rmtree(backup_dir, ignore_errors=True)
    return TrainResult(run_dir=run_dir, metrics=metrics, resumed_from_epoch=resume_epoch)
