"""Training: Keras `fit` with real callbacks into a run directory, resumable after a kill."""

from __future__ import annotations

import platform
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnviz import backend
from cnnviz._keras import pipeline_seed_generators
from cnnviz.config.root import Config
from cnnviz.errors import CnnvizError, first_line
from cnnviz.io.atomic import (
    atomic_write_json,
    remove_tree,
    save_figure,
    save_model,
)
from cnnviz.runs.layout import BACKUP_DIR
from cnnviz.train.callbacks import EpochCommit, training_callbacks
from cnnviz.train.devices import (
    build_from_element_spec,
    distributed_fixes,
    distribution_strategy,
    replay_data_order,
    replicas_line,
    select_device,
    worker_role,
    worker_shard,
)
from cnnviz.train.history import read_history, trim_history
from cnnviz.train.resume import (
    METADATA_FILE,
    StartAgain,
    TrainingState,
    claim_run,
    restore_training,
)


@dataclass
class TrainResult:
    """What `train` did. On a non-chief multi-worker process `run_dir` was a temporary folder,
    already removed (`chief` is False): only the chief keeps a run directory."""

    run_dir: Path
    metrics: dict
    resumed_from_epoch: int
    chief: bool = True


def _versions() -> dict:
    import keras
    import tensorflow as tf

    import cnnviz

    return {"cnnviz": cnnviz.__version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


@dataclass
class _Inputs:
    """The three tf.data pipelines of a training run and what they were built from."""

    train: object
    validation: object | None
    test: object
    augment: list  # the training pipeline's augmentation layers


def _inputs(config: Config, dataset, run_dir: Path, strategy) -> _Inputs:
    """The pipelines, batched by the GLOBAL batch size (Keras splits each batch per replica).

    Training batches are shuffled and augmented; every worker of a multi-worker run decodes
    only its share of the files (`Split.pipeline(workers=...)`).
    """
    from cnnviz.data import augmentation_layers, disk_cache
    from cnnviz.model.optimizers import one_hot_labels

    data, batch = config.data, config.train.batch_size
    workers = worker_shard(strategy) if config.train.distribute == "multi_worker" else None
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
    return _Inputs(train_data, validation, dataset.test.pipeline(batch, **common), augment)


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
        weights = np.where(
            present, len(dataset.train.labels) / (present.sum() * np.maximum(counts, 1)), 1.0)
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
          epoch_callbacks=(), dataset=None, log=None,
          resume: str | Path | None = None) -> TrainResult:
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
        epoch_callbacks: factories `(run_dir, dataset) -> Keras callback` for callbacks whose
            files are part of each epoch's commit: called on the chief only, once the run
            directory exists; the callbacks run just before the commit (a kill between them
            reruns the epoch, and a callback must then drop what it wrote of it: see
            `cnnviz.report.watch`). A callback's `run_metrics()` (if any) joins metrics.json.
            `cnnviz.pipeline.train_run` passes the one `train.explain` asks for.
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
    chief, task = worker_role(strategy)
    multi_worker = config.train.distribute == "multi_worker"
    keras.utils.set_random_seed(config.seed)
    if dataset is None:
        dataset = load_dataset(config, log=log)
    model = _build(config, dataset, strategy)

    if not chief:
        # Same work as the chief (saving and evaluating read all-reduced variables, so every
        # worker must run them), written where nobody looks: the standard multi-worker pattern.
        run_dir = Path(tempfile.mkdtemp(prefix=f"cnnviz-{task.replace(' ', '')}-"))
        log(f"{task} of a multi-worker run on {device}, {replicas_line(strategy, config)}; "
            f"its files go to {run_dir} (removed at the end)")
        try:
            result = _fit(config, run_dir, model, dataset, strategy, device, resumed=None,
                          backup=False, extra_callbacks=extra_callbacks)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        return TrainResult(run_dir, result.metrics, 0, chief=False)

    claim = claim_run(out_root, config, resume=Path(resume) if resume else None,
                       multi_worker=multi_worker, log=log)
    run_dir = claim.run_dir
    try:
        recorded = _recorded_dataset(config, dataset, run_dir, log)
        if recorded is not dataset:  # the folder changed since the run started: keep its splits
            dataset = recorded
            model = _build(config, dataset, strategy)
        dataset.record(run_dir)
        try:
            resumed = restore_training(model, strategy, run_dir, log) if not claim.created else None
        except StartAgain:
            keras.utils.set_random_seed(config.seed)
            model, resumed = _build(config, dataset, strategy), None
        resume_epoch = resumed.epoch if resumed else 0
        trim_history(run_dir / "history.csv", resume_epoch)
        where = f"{device}, {task}" if multi_worker else device
        log(f"{'Resuming' if not claim.created else 'Run'} {run_dir} on {where}, "
            f"{replicas_line(strategy, config)}"
            + (f", from epoch {resume_epoch + 1}" if not claim.created else ""))
        epoch = [factory(run_dir, dataset) for factory in epoch_callbacks]
        return _fit(config, run_dir, model, dataset, strategy, device, resumed=resumed,
                    backup=not multi_worker, extra_callbacks=extra_callbacks,
                    epoch_callbacks=epoch)
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
    from cnnviz.model.build import build_model
    from cnnviz.model.optimizers import compile_model

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
    detail = first_line(error)
    return (f"the model does not fit in memory ({detail}); use fewer filters or units, a "
            "smaller data.image_size or a smaller train.batch_size")


def _fit(config: Config, run_dir: Path, model, dataset, strategy, device: str, *,
         resumed: TrainingState | None, backup: bool, extra_callbacks,
         epoch_callbacks=()) -> TrainResult:
    """Fit, evaluate and save into `run_dir` (train's body, the same on every worker)."""
    import keras
    import tensorflow as tf

    from cnnviz.model.inputs import input_range

    resume_epoch = resumed.epoch if resumed else 0
    inputs = _inputs(config, dataset, run_dir, strategy)
    history_file = run_dir / "history.csv"
    callbacks = training_callbacks(config, run_dir,
                           monitor="val_loss" if inputs.validation is not None else "loss",
                           resuming=resume_epoch > 0, backup=backup,
                           extra_callbacks=extra_callbacks, epoch_callbacks=epoch_callbacks,
                           resumed=resumed,
                           data_seed_generators=pipeline_seed_generators(inputs.augment))
    commit = next((callback for callback in callbacks if isinstance(callback, EpochCommit)),
                  None)
    if config.train.distribute != "none":
        distributed_fixes(model, strategy, inputs.train.element_spec)
    elif keras.backend.backend() != "tensorflow":
        build_from_element_spec(model, inputs.train.element_spec)
    replay_data_order(inputs.train, strategy, resume_epoch)
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
        "backend": backend.current(),  # the Keras backend it trained on
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
    for callback in epoch_callbacks:
        metrics |= getattr(callback, "run_metrics", dict)()
    save_model(model, run_dir / "model.keras")
    atomic_write_json(run_dir / "metrics.json", metrics)
    from cnnviz.plot import training_curves

    if full_history:
        save_figure(training_curves(full_history), run_dir / "curves.png")
    # The backup goes last: while it exists the run counts as unfinished and is resumed.
    remove_tree(run_dir / BACKUP_DIR)
    return TrainResult(run_dir=run_dir, metrics=metrics, resumed_from_epoch=resume_epoch)
