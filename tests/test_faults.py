"""Faults with real processes: SIGKILL at many instants of a training (inside its writes too),
two trainings of one config at once, a full disk, a read-only folder.

Every process is `cnnviz train` on a tiny config (digits at 8x8, 4 epochs, augmented), forked
from a fork server that imported the CLI once (`_forked`: real processes, killed and stopped for
real, without a TensorFlow import each), except where a fresh `python -m cnnviz.cli train` is the
point: the end of one kill chain, --resume of a finished or foreign run, and the full disk and
read-only folders (in a mount namespace of their own). Kills
inside a write use CNNVIZ_TEST_KILL_AT (the process SIGKILLs itself at a named instant, e.g.
between a temporary file and its rename); the others come at spread-out delays after an epoch
starts. After every kill the run must be consistent, and after the last resume its history.csv
must be byte for byte the history of an uninterrupted run of the same seed.
"""

import csv
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import _forked
import pytest
import yaml
from _models import tiny_digits_config

from cnnviz.config.loading import validate
from cnnviz.train.fit import train

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow

EPOCHS = 4
# checkpoint_interval 0: the checkpoints are written at every epoch, inside the kill window;
# the dropout masks must repeat on resume.
CONFIG = tiny_digits_config("faults", seed=3, epochs=EPOCHS, dropout=0.3, checkpoint_interval=0)
# Augmentation's generators advance with every batch: a resume must restore them as well.
CONFIG["data"]["augment"] = [{"type": "random_contrast", "factor": 0.1},
                             {"type": "random_rotation", "factor": 0.02}]
TEMPORARY = re.compile(r"\.tmp(\.keras|\.weights\.h5)?$")


def _environment(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **extra}


def _train_args(config_file: Path, out: Path, *more) -> list[str]:
    return ["train", str(config_file), "--out", str(out), *map(str, more)]


def _train_command(config_file: Path, out: Path, *more) -> list[str]:
    return [sys.executable, "-m", "cnnviz.cli", *_train_args(config_file, out, *more)]


@pytest.fixture(scope="module")
def fork_server():
    """The fork server of the killed processes, started early: it imports while the
    reference trains."""
    _forked.warm_up()


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "faults.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of the same config (in this process: the same numbers)."""
    out = tmp_path_factory.mktemp("reference")
    return train(validate(CONFIG), out, log=lambda line: None).run_dir


def _rows(history: Path) -> list[list[str]]:
    return list(csv.reader(history.read_text().splitlines()))[1:] if history.is_file() else []


def _runs(out: Path) -> list[Path]:
    return sorted(path for path in (out / "faults").glob("*") if not path.name.startswith("."))


def _only_run(out: Path) -> Path | None:
    runs = _runs(out)
    assert len(runs) <= 1, runs
    return runs[0] if runs else None


def _assert_consistent(run_dir: Path, reference_rows: list[list[str]], when: str) -> int:
    """A killed run: every file whole, history a prefix of the uninterrupted one, the backup
    naming files that exist. Returns the number of committed epochs."""
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["name"] == "faults", when
    rows = _rows(run_dir / "history.csv")
    assert rows == reference_rows[: len(rows)], f"{when}: history differs from the reference"
    for keras_file in [run_dir / "model.keras", *run_dir.glob("checkpoints/*.keras")]:
        if keras_file.exists():
            with zipfile.ZipFile(keras_file) as archive:
                assert archive.testzip() is None, f"{when}: {keras_file.name} is damaged"
    if (run_dir / "metrics.json").exists():
        json.loads((run_dir / "metrics.json").read_text())
    metadata = run_dir / "backup" / "training_metadata.json"
    if not metadata.exists():
        return EPOCHS if not (run_dir / "backup").exists() else 0
    state = json.loads(metadata.read_text())
    assert (run_dir / "backup" / state["weights"]).is_file(), when
    # The row of an epoch is written just before its commit: at most one row more.
    assert state["epoch"] <= len(rows) <= state["epoch"] + 1, f"{when}: {state} vs {len(rows)} rows"
    return state["epoch"]


def _assert_finished_like_reference(out: Path, reference: Path) -> None:
    """Every run under `out` is finished, with the uninterrupted run's history and metrics, and
    no temporary file of a killed process survives."""
    leftovers = [path for path in out.rglob("*") if TEMPORARY.search(path.name)
                 or ".damaged" in path.name]
    assert not leftovers, f"temporary files survived: {leftovers}"
    reference_metrics = json.loads((reference / "metrics.json").read_text())
    for run_dir in _runs(out):
        assert (run_dir / "history.csv").read_bytes() == (reference / "history.csv").read_bytes(), (
            "after every kill and resume, history.csv is the uninterrupted run's, byte for byte")
        assert not (run_dir / "backup").exists()
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["test_loss"] == reference_metrics["test_loss"]
        assert metrics["epochs"] == EPOCHS
        segments = metrics["segments"]
        assert segments[0]["from_epoch"] == 0 and segments[-1]["to_epoch"] == EPOCHS
        assert all(a["to_epoch"] == b["from_epoch"] for a, b in itertools.pairwise(segments))
        assert metrics["seconds"] == pytest.approx(sum(s["seconds"] for s in segments), abs=0.01)


# Where each process of a chain is killed: ("at", a named instant inside a write: the
# process's first time there) or ("after", seconds after its first "Epoch" line: mid-epoch,
# at an epoch's end or in the final writes; an epoch here takes ~0.1-0.5 s on 2 busy cores).
# The next process resumes the run. Two chains run at once, one per core.
EPOCH_WRITES = [
    ("at", "run:staged"),                      # run folder assembled, not yet renamed in place
    ("at", "epoch:end"),                       # history row written, epoch not committed
    ("at", "epoch-1.weights.h5:written"),      # the commit's weights: temporary written
    ("at", "epoch-1.weights.h5:renamed"),      # weights in place, metadata still the previous
    ("at", "training_metadata.json:written"),  # metadata temporary written, not renamed
    ("at", "last.keras:written"),              # checkpoint temporary written
    ("at", "best.keras:renamed"),
    ("at", "training_metadata.json:renamed"),  # committed; older epoch files not yet deleted
    ("at", "epoch:end"),                       # the next epoch's row, uncommitted
    ("at", "history.csv:written"),             # resume trims that row: temporary written
    ("after", 0.3),
]
SPREAD_AND_FINAL = [
    ("after", 0.0), ("after", 0.1), ("after", 0.2), ("after", 0.45), ("after", 0.7),
    ("at", "model.keras:written"),             # the final writes, after the last epoch
    ("at", "model.keras:renamed"),
    ("at", "metrics.json:written"),
    ("at", "curves.png:renamed"),
    ("at", "backup:removing"),                 # backup renamed to a temporary, not deleted
]


def _kill(args: list[str], how: str, when, folder: Path) -> int:
    """Start `cnnviz ARGS` (forked by `_forked`) and SIGKILL it `when` (see above)."""
    extra = {"CNNVIZ_TEST_KILL_AT": when} if how == "at" else {}
    process = _forked.Process(args, _environment(**extra), folder)
    try:
        if how == "at":
            code = process.wait()
            assert code == -signal.SIGKILL, (
                f"{when}: never reached (exit {code}) {process.stderr[-1500:]}")
            return code
        if process.wait_for_line("Epoch "):
            time.sleep(when)
            process.kill()
        return process.wait()
    finally:
        process.kill()


def _chain(schedule, args, out, reference_rows, errors, *, fresh_finish):
    """Kill a training at each point of `schedule`, checking the run after each kill; then run
    it to the end (a new run when the last kill came after the run had finished), in a fresh
    `python -m cnnviz.cli` when `fresh_finish`, else forked like the killed ones."""
    try:
        logs = out.parent / f"{out.name}-logs"
        logs.mkdir()
        for how, when in schedule:
            _kill(args, how, when, logs)
            runs = _runs(out)
            if runs:
                _assert_consistent(runs[0], reference_rows, f"after a kill {how} {when!r}")
        if fresh_finish:
            finished = subprocess.run([sys.executable, "-m", "cnnviz.cli", *args],
                                      capture_output=True, text=True, timeout=300,
                                      check=False, env=_environment())
            code, stderr = finished.returncode, finished.stderr
        else:
            process = _forked.Process(args, _environment(), logs)
            code, stderr = process.wait(), process.stderr
        assert code == 0, stderr[-2000:]
        assert stderr == "", "nothing but progress"
    except BaseException as error:  # noqa: BLE001 - reported by the test's thread
        errors.append(error)


def test_sigkill_at_21_instants_then_resume_gives_the_uninterrupted_history(
        tmp_path, config_file, fork_server, reference):
    reference_rows = _rows(reference / "history.csv")
    assert len(reference_rows) == EPOCHS
    assert len(EPOCH_WRITES) + len(SPREAD_AND_FINAL) >= 20
    errors: list[BaseException] = []
    chains = [threading.Thread(target=_chain, args=(
        schedule, _train_args(config_file, tmp_path / name), tmp_path / name,
        reference_rows, errors), kwargs={"fresh_finish": name == "spread"})
        for name, schedule in (("writes", EPOCH_WRITES), ("spread", SPREAD_AND_FINAL))]
    for chain in chains:
        chain.start()
    for chain in chains:
        chain.join()
    if errors:
        raise errors[0]
    for name in ("writes", "spread"):
        _assert_finished_like_reference(tmp_path / name, reference)
    resumed = json.loads((_runs(tmp_path / "writes")[0] / "metrics.json").read_text())
    assert len(resumed["segments"]) > 1, "seconds and segments cover every resumed process"


# ------------------------------------------------------------------------------ concurrency
def _interrupted_run(config_file: Path, out: Path, logs: Path) -> Path:
    """A run killed right after its first epoch was committed."""
    _kill(_train_args(config_file, out), "at", "training_metadata.json:renamed", logs)
    return _only_run(out)


def test_two_trainings_started_together_get_two_runs(tmp_path, config_file, fork_server):
    out = tmp_path / "out"
    processes = [_forked.Process(_train_args(config_file, out), _environment(), tmp_path)
                 for _ in range(2)]
    codes = [process.wait() for process in processes]
    for process, code in zip(processes, codes):
        assert code == 0, process.stderr
        stdout = process.stdout
        assert "\r" not in stdout and "\b" not in stdout, "no progress bar in a file"
        assert len(re.findall(r"^\d+/\d+ - ", stdout, re.MULTILINE)) == EPOCHS, (
            "one line per epoch (Keras verbose=2) when stdout is not a terminal")
    runs = sorted((out / "faults").iterdir())
    assert len(runs) == 2, runs
    for run_dir in runs:
        assert [row[0] for row in _rows(run_dir / "history.csv")] == ["0", "1", "2", "3"]
        assert not (run_dir / "backup").exists()


def test_a_live_run_is_never_taken_over(tmp_path, config_file, fork_server, reference):
    out, environment = tmp_path / "out", _environment()
    args = _train_args(config_file, out)
    interrupted = _interrupted_run(config_file, out, tmp_path)
    owner = _forked.Process(args, environment, tmp_path)
    try:
        assert owner.wait_for_line("Resuming "), owner.stderr
        first_line = owner.stdout.splitlines()[0]
        assert first_line.startswith(f"Resuming {interrupted} "), first_line
        os.kill(owner.pid, signal.SIGSTOP)  # holds the run's lock, frozen mid-training

        second = _forked.Process(args, environment, tmp_path)
        explicit = _forked.Process([*args, "--resume", interrupted], environment, tmp_path)
        explicit_code, second_code = explicit.wait(), second.wait()
    finally:
        os.kill(owner.pid, signal.SIGCONT)
    owner_code = owner.wait()

    # --resume RUN of a live run: exit 2, one line naming the live process.
    assert explicit_code == 2
    assert explicit.stderr.splitlines() == [(
        f"error: --resume {interrupted}: process {owner.pid} is training this run; wait for it "
        f"to finish or stop it (kill {owner.pid}) first")]
    # A plain second train starts its own run and says so in one line.
    assert second_code == 0, second.stderr
    assert second.stdout.splitlines()[0] == (
        f"{interrupted} is being trained by process {owner.pid}; starting a new run")
    assert owner_code == 0, owner.stderr
    runs = sorted((out / "faults").iterdir())
    assert len(runs) == 2 and interrupted in runs
    reference_history = (reference / "history.csv").read_bytes()
    for run_dir in runs:
        assert (run_dir / "history.csv").read_bytes() == reference_history, (
            "each run has every epoch once, the same as an uninterrupted run")


def test_resume_names_a_finished_or_foreign_run(tmp_path, config_file, reference):
    finished = subprocess.run(_train_command(config_file, tmp_path, "--resume", reference),
                              capture_output=True, text=True, timeout=300, check=False,
                              env=_environment())
    assert finished.returncode == 2
    assert finished.stderr.splitlines() == [
        f"error: --resume {reference}: the run has finished (no backup/ to resume from)"]
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**CONFIG, "seed": 4}))
    interrupted = tmp_path / "interrupted"
    shutil.copytree(reference, interrupted)
    (interrupted / "backup").mkdir()
    foreign = subprocess.run(_train_command(other, tmp_path, "--resume", interrupted),
                             capture_output=True, text=True, timeout=300, check=False,
                              env=_environment())
    assert foreign.returncode == 2
    assert len(foreign.stderr.splitlines()) == 1
    assert "trained from another config ('seed: 4' here, 'seed: 3' in the run)" in foreign.stderr


# ----------------------------------------------------------------------- damaged backups
class _StopAfter:
    """Interrupts training after `epochs` committed epochs (extra callbacks run after the
    commit), like a kill there."""

    def __new__(cls, epochs):
        import keras

        class Stop(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if epoch + 1 == epochs:
                    raise KeyboardInterrupt

        return Stop()


@pytest.mark.parametrize("damage,expected", [
    ("empty", "resuming from its last good checkpoint, epoch-2.weights.h5 (epoch 2)"),
    ("truncated", "resuming from its last good checkpoint, epoch-2.weights.h5 (epoch 2)"),
    ("no weights", "no usable checkpoint in it, so training starts again from epoch 1"),
])
def test_a_damaged_backup_is_set_aside_and_training_goes_on(tmp_path, damage, expected):
    config = validate(CONFIG)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path, extra_callbacks=[_StopAfter(2)], log=lambda line: None)
    run_dir = _only_run(tmp_path)
    metadata = run_dir / "backup" / "training_metadata.json"
    text = metadata.read_text()
    metadata.write_text({"empty": "", "truncated": text[: len(text) // 2],
                         "no weights": "{"}[damage])
    if damage == "no weights":
        for weights in (run_dir / "backup").glob("*.weights.h5"):
            weights.write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    lines = []
    result = train(config, tmp_path, log=lines.append)
    assert result.run_dir == run_dir
    notes = [line for line in lines if "was damaged" in line]
    assert len(notes) == 1 and expected in notes[0], lines
    aside = list(run_dir.glob("backup.damaged-*"))
    assert len(aside) == 1 and (aside[0] / "training_metadata.json").exists(), "kept, renamed"
    assert [row[0] for row in _rows(run_dir / "history.csv")] == ["0", "1", "2", "3"]
    assert result.metrics["resumed_from_epoch"] == (0 if damage == "no weights" else 2)


# ------------------------------------------------------------------ full disk, read-only
def _user_namespaces() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                           capture_output=True, check=False)
    return probe.returncode == 0


def _with_small_filesystem(folder: Path, options: str, script: str) -> None:
    """Run `script` (sh) with a fresh tmpfs mounted on `folder`, in a private mount namespace
    (no root needed); the mount vanishes with it."""
    mount = f"mount -t tmpfs -o {options} tmpfs '{folder}'"
    subprocess.run(["unshare", "-rm", "sh", "-c", f"{mount} && {script}"], check=True,
                   timeout=300)


@pytest.mark.skipif(not _user_namespaces(), reason="needs unshare -rm (user namespaces)")
def test_a_full_disk_is_one_line_and_the_run_resumes_after(tmp_path, config_file, reference):
    disk, saved = tmp_path / "disk", tmp_path / "saved"
    disk.mkdir()
    command = " ".join(f"'{part}'" for part in _train_command(config_file, disk / "out"))
    # 136 KB: room for the first epoch's backup and checkpoints (~132 KB in 4 KB pages, the
    # model's preprocessing layer included), not for the second's weights (36 KB more).
    _with_small_filesystem(disk, "size=136k", (
        f"PYTHONPATH='{ROOT}' {command} > '{tmp_path}/stdout' 2> '{tmp_path}/stderr'; "
        f"echo $? > '{tmp_path}/rc'; cp -a '{disk}/out' '{saved}'"))
    stderr = (tmp_path / "stderr").read_text()
    assert (tmp_path / "rc").read_text().strip() == "2", stderr
    assert "Traceback" not in stderr
    [line] = stderr.splitlines()
    assert re.match(rf"error: cannot write {re.escape(str(disk / 'out'))}/\S+: no space left", line)
    run_dir = _only_run(saved)
    committed = _assert_consistent(run_dir, _rows(reference / "history.csv"), "disk full")
    assert committed >= 1, "the epochs done before the disk filled up are kept"
    assert not [path for path in saved.rglob("*") if TEMPORARY.search(path.name)]
    # With space again, the same command resumes the run and finishes it as if never stopped.
    result = train(validate(CONFIG), saved, log=lambda line: None)
    assert result.run_dir == run_dir and result.metrics["resumed_from_epoch"] == committed
    assert (run_dir / "history.csv").read_bytes() == (reference / "history.csv").read_bytes()


def test_a_read_only_out_is_one_line(tmp_path, config_file):
    folder = tmp_path / "read-only"
    folder.mkdir()
    command = _train_command(config_file, folder / "out")
    if _user_namespaces():
        quoted = " ".join(f"'{part}'" for part in command)
        _with_small_filesystem(folder, "ro", (
            f"PYTHONPATH='{ROOT}' {quoted} > '{tmp_path}/stdout' 2> '{tmp_path}/stderr'; "
            f"echo $? > '{tmp_path}/rc'"))
        code, stderr = int((tmp_path / "rc").read_text()), (tmp_path / "stderr").read_text()
    elif os.geteuid() != 0:
        folder.chmod(0o555)
        done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                              check=False, env=_environment())
        folder.chmod(0o755)
        code, stderr = done.returncode, done.stderr
    else:
        pytest.skip("root without user namespaces: nothing here is read-only")
    assert code == 2 and "Traceback" not in stderr
    assert stderr.splitlines() == [(
        f"error: --out {folder / 'out'}: cannot write in {folder} (read-only or permission "
        "denied); use --out with a writable folder")]


@pytest.mark.skipif(not _user_namespaces(), reason="needs unshare -rm (user namespaces)")
def test_a_read_only_keras_cache_is_used_and_the_advice_names_where_keras_looks(tmp_path):
    """Keras skips a KERAS_HOME it cannot write (it uses /tmp/.keras instead), so a file placed
    there by hand was never found, and the advice told users to place it there."""
    home = tmp_path / "keras-home"
    home.mkdir()
    probe = ("from cnnviz.data.sources import fetch as _fetch\n"
             "from cnnviz.errors import CnnvizError\n"
             "print(_fetch('mnist.npz', 'http://127.0.0.1:9/mnist.npz'))\n"
             "try:\n"
             "    _fetch('cifar.tar.gz', 'http://127.0.0.1:9/cifar.tar.gz', extract=True)\n"
             "except CnnvizError as error:\n"
             "    print(error)\n")
    (tmp_path / "probe.py").write_text(probe)
    _with_small_filesystem(home, "size=64k", (
        f"mkdir '{home}/datasets' && echo placed > '{home}/datasets/mnist.npz' && "
        f"mount -o remount,ro '{home}' && KERAS_HOME='{home}' PYTHONPATH='{ROOT}' "
        f"'{sys.executable}' '{tmp_path}/probe.py' > '{tmp_path}/stdout' 2> /dev/null"))
    lines = (tmp_path / "stdout").read_text().splitlines()
    assert lines[0] == str(home / "datasets" / "mnist.npz"), lines
    assert "put the file in /tmp/.keras/datasets or set data.path" in lines[-1], lines


def test_a_resumed_run_stops_early_as_an_uninterrupted_one(tmp_path):
    """EarlyStopping's memory (wait, best, best weights) is part of the commit."""
    raw = {**CONFIG, "train": {**CONFIG["train"], "epochs": 12,
                               "optimizer": {"name": "sgd", "learning_rate": 2.0},
                               "early_stopping": {"monitor": "val_loss", "patience": 2}}}
    config = validate(raw)
    whole = train(config, tmp_path / "whole", log=lambda line: None)
    assert 3 < whole.metrics["epochs"] < 12, "the test needs a run that stops early"
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "cut", extra_callbacks=[_StopAfter(whole.metrics["epochs"] - 1)],
              log=lambda line: None)
    resumed = train(config, tmp_path / "cut", log=lambda line: None)
    assert resumed.metrics["resumed_from_epoch"] == whole.metrics["epochs"] - 1
    assert (resumed.run_dir / "history.csv").read_bytes() == (
        whole.run_dir / "history.csv").read_bytes()
    assert resumed.metrics["test_loss"] == whole.metrics["test_loss"], "best weights restored"


def test_a_new_run_that_fails_before_its_first_epoch_leaves_nothing(tmp_path):
    """Nothing in it to resume, and a leftover would be resumed (and fail again) next time."""
    import keras

    class FailAtStart(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            raise RuntimeError("out of memory, say")

    with pytest.raises(RuntimeError):
        train(validate(CONFIG), tmp_path, extra_callbacks=[FailAtStart()], log=lambda line: None)
    assert list((tmp_path / "faults").iterdir()) == []
