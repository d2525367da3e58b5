"""Claiming a run directory and resuming it: which run to continue, the committed training state,
restoring weights and seeds."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnviz.config.loading import dump_config, read_yaml, validate
from cnnviz.config.root import Config, run_slug
from cnnviz.errors import CnnvizError, first_line
from cnnviz.io.atomic import (
    remove_stale_temporaries,
    set_aside,
)
from cnnviz.io.locks import RunLock, lock_holder, try_lock_run
from cnnviz.runs.layout import BACKUP_DIR, create_run_dir, run_ids

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
        return first_line(error, limit=1000)
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


def claim_run(out_root: str | Path, config: Config, *, resume: Path | None, multi_worker: bool,
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
    global_random: str | None = None  # `global_random_state`
    data_seed_generators: list = field(default_factory=list)  # the augmentation layers'
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
            global_random=metadata.get("global_random"),
            data_seed_generators=list(metadata.get("data_seed_generators", [])),
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
            raise _Damaged(f"{weights.name}: {first_line(error)}") from None


def seed_generator_states(model) -> list:
    # Dropout (and any random layer) draws from a SeedGenerator whose state save_weights leaves
    # out; saving it makes a resumed epoch draw the same masks as an uninterrupted one.
    return [variable for variable in model.variables
            if variable.path.endswith("seed_generator_state")]


def global_random_state() -> str | None:
    """The state of the backend's global generator, where layers draw from it, as text.

    PyTorch: Keras's Dropout without a seed draws its masks from torch's global generator
    (its fast path), which no variable holds; without this, a resumed PyTorch run drops other
    units than the uninterrupted one. None on TensorFlow and JAX (every draw is a
    SeedGenerator variable's).
    """
    import keras

    if keras.backend.backend() != "torch":
        return None
    import torch

    states = [torch.get_rng_state()]
    if torch.cuda.is_available():
        states += torch.cuda.get_rng_state_all()
    return ",".join(base64.b64encode(state.numpy().tobytes()).decode() for state in states)


def restore_global_random_state(text: str | None) -> None:
    import keras

    if text is None or keras.backend.backend() != "torch":
        return
    import torch

    states = [torch.frombuffer(bytearray(base64.b64decode(part)), dtype=torch.uint8)
              for part in text.split(",")]
    torch.set_rng_state(states[0])
    if torch.cuda.is_available() and len(states) - 1 == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states[1:])


def restore_training(model, strategy, run_dir: Path, log) -> TrainingState | None:
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
        candidates = sorted(((int(match.group(1)), path)
                             for path in aside.glob("epoch-*.weights.h5")
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
        raise StartAgain from None
    variables = seed_generator_states(model)
    if len(variables) == len(state.seed_generators):
        for variable, value in zip(variables, state.seed_generators):
            variable.assign(np.asarray(value, dtype=variable.dtype))
    return state


class StartAgain(Exception):
    """The backup was unusable and the model may hold part of it: rebuild, start at epoch 0."""
