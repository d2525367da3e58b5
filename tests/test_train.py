"""Real training runs: the run directory's files, reproducibility, and resuming after a kill."""

import csv
import json
import os
import signal
import time
from pathlib import Path

import _forked
import numpy as np
import pytest
import yaml
from PIL import Image

from cnnviz.config.loading import load_config, validate
from cnnviz.train.fit import train

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow


def _digits(epochs=2, **train_options):
    """digits.yaml at the data's native 8x8 (not 28x28): the same layers, a fraction of the work."""
    config = load_config(ROOT / "configs" / "digits.yaml",
                         ["data.image_size=null", f"train.epochs={epochs}", "train.verbose=0"])
    if train_options:
        config = config.model_copy(update={"train": config.train.model_copy(update=train_options)})
    return config


def _history_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_a_run_directory_holds_every_file(tmp_path):
    result = train(_digits(), tmp_path, log=lambda line: None)
    run = result.run_dir
    assert run.parent == tmp_path / "digits"
    for name in ("config.yaml", "model.keras", "history.csv", "metrics.json", "curves.png",
                 "checkpoints/best.keras", "checkpoints/last.keras"):
        assert (run / name).is_file(), name
    assert not (run / "backup").exists(), "a finished run keeps no backup"
    assert not list(run.rglob("*.partial*")) and not list(run.rglob(".*.tmp"))

    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("test_accuracy", "test_loss", "epochs", "seconds", "device", "backend",
                "versions"):
        assert key in metrics
    assert metrics["epochs"] == 2 and metrics["device"] == "CPU"
    assert metrics["backend"] == "tensorflow"
    assert metrics["versions"]["keras"].startswith("3.")
    assert 0.5 < metrics["test_accuracy"] <= 1.0, "two epochs on digits learn something"

    assert [row["epoch"] for row in _history_rows(run / "history.csv")] == ["0", "1"]
    with Image.open(run / "curves.png") as image:
        assert image.format == "PNG" and image.width > 300

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert validate(saved).train.epochs == 2, "the resolved config is saved"

    # The saved model is the trained one: it reproduces the reported test accuracy.
    import keras

    from cnnviz.data import load_dataset

    data = load_dataset(validate(saved))
    model = keras.models.load_model(run / "model.keras", compile=False)
    predicted = np.argmax(model.predict(data.x_test, verbose=0), axis=1)
    assert np.mean(predicted == data.y_test) == pytest.approx(metrics["test_accuracy"], abs=1e-6)


def test_runs_never_overwrite_each_other(tmp_path):
    first = train(_digits(epochs=1), tmp_path, log=lambda line: None).run_dir
    second = train(_digits(epochs=1), tmp_path, log=lambda line: None).run_dir
    assert first != second and first.is_dir() and second.is_dir()


def test_same_config_gives_the_same_metrics(tmp_path):
    first = train(_digits(epochs=2), tmp_path / "a", log=lambda line: None)
    second = train(_digits(epochs=2), tmp_path / "b", log=lambda line: None)
    assert first.metrics["test_loss"] == pytest.approx(second.metrics["test_loss"], rel=1e-6)

    def losses(result):
        return [float(row["val_loss"]) for row in _history_rows(result.run_dir / "history.csv")]

    assert losses(first) == pytest.approx(losses(second), rel=1e-6)


def test_optional_callbacks_early_stopping_and_tensorboard(tmp_path):
    from cnnviz.config.train import EarlyStoppingConfig

    config = _digits(epochs=30, tensorboard=True,
                     early_stopping=EarlyStoppingConfig(monitor="loss", patience=1))
    config = config.model_copy(update={"train": config.train.model_copy(
        update={"optimizer": config.train.optimizer.model_copy(update={"learning_rate": 5.0})})})
    result = train(config, tmp_path, log=lambda line: None)
    assert result.metrics["epochs"] < 30, "a diverging loss stops early"
    assert list((result.run_dir / "tensorboard").rglob("events.out.tfevents.*"))


def test_killed_training_resumes_from_its_last_finished_epoch(tmp_path):
    config_file = tmp_path / "slow.yaml"
    raw = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    raw["data"]["image_size"] = None  # 8x8: epochs of a fraction of a second
    raw["train"].update({"epochs": 8, "verbose": 2})
    config_file.write_text(yaml.safe_dump(raw))
    # Forked from the fork server that imported the CLI once (_forked): a real process.
    args = ["train", str(config_file), "--out", str(tmp_path / "out")]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = _forked.Process(args, environment, tmp_path)
    history = None
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        found = list((tmp_path / "out" / "slow").glob("*/history.csv"))
        if found and len(_history_rows(found[0])) >= 2:
            history = found[0]
            break
        time.sleep(0.05)
    assert history is not None, "training never logged two epochs"
    process.kill()
    assert process.wait() == -signal.SIGKILL
    rows_before = _history_rows(history)
    assert 2 <= len(rows_before) < 8, "killed mid-training"
    assert not (history.parent / "model.keras").exists()

    finished = _forked.Process(args, environment, tmp_path)
    assert finished.wait() == 0, finished.stderr[-2000:]
    assert "Resuming" in finished.stdout
    run_dirs = list((tmp_path / "out" / "slow").iterdir())
    assert run_dirs == [history.parent], "resumed in the same run directory"
    rows_after = _history_rows(history)
    assert [int(row["epoch"]) for row in rows_after] == list(range(8)), "every epoch once"
    assert rows_after[: len(rows_before) - 1] == rows_before[: len(rows_before) - 1], (
        "epochs finished before the kill are kept, not retrained")
    metrics = json.loads((history.parent / "metrics.json").read_text())
    # The row of an epoch is written just before its commit: at most that last epoch reran.
    assert metrics["resumed_from_epoch"] >= len(rows_before) - 1 and metrics["epochs"] == 8
    assert not (history.parent / "backup").exists()
