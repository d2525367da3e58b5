"""Learning-rate schedules, class weights, label smoothing and augmentation, through real
training runs on a small slice of the digits; each checked against a hand computation."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cnnviz.cli import app
from cnnviz.config.loading import load_config
from cnnviz.data import augmentation_layers, load_dataset
from cnnviz.errors import CnnvizError

ROOT = Path(__file__).parent.parent
runner = CliRunner()
# 128 training images at 8x8, 16 per batch: 8 steps per epoch, a second or two per run.
SMALL = ["data.image_size=null", "data.limit=128", "data.validation_split=0.25",
         "train.batch_size=16", "train.verbose=0"]


def _config(*options):
    return load_config(ROOT / "configs" / "digits.yaml", [*SMALL, *options])


def _rates(run_dir: Path) -> list[float]:
    return [float(row["learning_rate"]) for row in csv.DictReader((run_dir / "history.csv").open())]


# ----------------------------------------------------------------------------- schedules
@pytest.mark.slow
@pytest.mark.parametrize("schedule,expected", [
    # (epoch, steps per epoch) -> the rate at the epoch's first step, by hand.
    ("{type: cosine, warmup_epochs: 1, min_learning_rate: 0.0001}",
     lambda epoch, steps: 0.0 if epoch == 0 else  # warm-up from 0 over the first epoch
     0.01 * (0.99 * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / 3)) + 0.01)),
    ("{type: exponential, decay_rate: 0.5, decay_epochs: 2}",
     lambda epoch, steps: 0.01 * 0.5 ** (epoch / 2)),
    ("{type: step, factor: 0.1, every_epochs: 2}",
     lambda epoch, steps: 0.01 * 0.1 ** (epoch // 2)),
])
def test_schedules_set_the_rate_of_each_epoch_and_history_records_it(tmp_path, schedule,
                                                                      expected):
    from cnnviz.train.fit import train

    config = _config("train.epochs=4", "train.optimizer.learning_rate=0.01",
                     f"train.optimizer.schedule={schedule}")
    result = train(config, tmp_path, log=lambda line: None)
    steps = math.ceil(result.metrics["train_images"] / 16)
    assert _rates(result.run_dir) == pytest.approx(
        [expected(epoch, steps) for epoch in range(4)], rel=1e-4, abs=1e-9)


@pytest.mark.slow
def test_plateau_lowers_the_rate_when_the_monitor_stops_improving(tmp_path):
    from cnnviz.train.fit import train

    # A rate too small to move the weights: the validation loss stays flat (no improvement
    # beyond ReduceLROnPlateau's min_delta), so after the first epoch every epoch lowers it.
    config = _config("train.epochs=5", "train.optimizer.learning_rate=1.0e-9",
                     "train.optimizer.schedule={type: plateau, factor: 0.5, patience: 1}")
    result = train(config, tmp_path, log=lambda line: None)
    assert _rates(result.run_dir) == pytest.approx([1e-9, 1e-9, 5e-10, 2.5e-10, 1.25e-10],
                                                   rel=1e-5)


def test_schedule_settings_that_cannot_work_are_refused():
    with pytest.raises(CnnvizError, match=r"warmup_epochs=12 leaves no epoch of the 12"):
        _config("train.optimizer.schedule={type: cosine, warmup_epochs: 12}")
    with pytest.raises(CnnvizError, match=r"monitor 'val_loss' needs validation data"):
        _config("data.validation_split=0", "train.optimizer.schedule={type: plateau}")
    with pytest.raises(CnnvizError, match=r"train.optimizer.schedule"):
        _config("train.optimizer.schedule={type: linear}")


def test_curves_show_a_changing_learning_rate_on_its_own_panel():
    from cnnviz.plot import training_curves

    history = {"loss": [1.0, 0.6, 0.5], "val_loss": [1.1, 0.7, 0.6],
               "learning_rate": [0.01, 0.005, 0.0025]}
    titles = [ax.get_title() for ax in training_curves(history).axes]
    assert titles == ["loss", "learning rate"]
    constant = {**history, "learning_rate": [0.01] * 3}
    assert [ax.get_title() for ax in training_curves(constant).axes] == ["loss"]


# -------------------------------------------------------------------------- class weights
def test_balanced_class_weights_are_scikit_learns():
    from sklearn.utils.class_weight import compute_class_weight

    from cnnviz.train.fit import class_weights

    config = _config("train.class_weight=balanced")
    dataset = load_dataset(config)
    keep = np.flatnonzero((dataset.train.labels != 3) | (np.arange(len(dataset.train)) % 4 == 0))
    dataset.train.labels, dataset.train.rows = dataset.train.labels[keep], dataset.train.rows[keep]
    weights = class_weights(config, dataset)
    expected = compute_class_weight("balanced", classes=np.arange(10), y=dataset.train.labels)
    np.testing.assert_allclose([weights[index] for index in range(10)], expected)
    assert weights[3] > 2 * weights[0], "the thinned class weighs more"


def test_class_weights_by_name_or_index():
    from cnnviz.train.fit import class_weights

    dataset = load_dataset(_config())
    config = _config("train.class_weight={'3': 2.5, 7: 0.5}")
    weights = class_weights(config, dataset)
    assert weights[3] == 2.5 and weights[7] == 0.5 and weights[0] == 1.0
    with pytest.raises(CnnvizError, match="no class named 'cat'; classes: 0, 1, 2"):
        class_weights(_config("train.class_weight={cat: 2}"), dataset)
    with pytest.raises(CnnvizError, match=r"class 12 is not a class of the data \(0..9\)"):
        class_weights(_config("train.class_weight={12: 2}"), dataset)


@pytest.mark.slow
def test_class_weights_reach_the_loss(tmp_path):
    from cnnviz.train.fit import train

    # A rate too small to move the weights: the only difference is the loss's weighting.
    still = ["train.epochs=1", "train.optimizer.learning_rate=1.0e-12", "model.layers.5.rate=0"]
    plain = train(_config(*still), tmp_path / "a", log=lambda line: None)
    doubled = train(_config(*still, "train.class_weight={" + ", ".join(
        f"{index}: 2.0" for index in range(10)) + "}"), tmp_path / "b", log=lambda line: None)

    def loss(result):
        return float(next(csv.DictReader((result.run_dir / "history.csv").open()))["loss"])

    assert loss(doubled) == pytest.approx(2 * loss(plain), rel=1e-4)
    assert doubled.metrics["class_weight"]["0"] == 2.0


# ------------------------------------------------------------------------ label smoothing
@pytest.mark.slow
def test_label_smoothing_is_the_smoothed_cross_entropy(tmp_path):
    import keras

    from cnnviz.train.fit import train

    result = train(_config("train.epochs=1", "train.label_smoothing=0.2"), tmp_path,
                   log=lambda line: None)
    dataset = load_dataset(_config())
    model = keras.models.load_model(result.run_dir / "model.keras", compile=False)
    probabilities = np.asarray(model.predict(dataset.x_test, verbose=0), np.float64)
    targets = np.full(probabilities.shape, 0.2 / 10)
    targets[np.arange(len(targets)), dataset.y_test] += 0.8
    expected_loss = -np.mean(np.sum(targets * np.log(np.clip(probabilities, 1e-7, 1)), axis=1))
    assert result.metrics["test_loss"] == pytest.approx(expected_loss, rel=1e-3)
    accuracy = np.mean(probabilities.argmax(axis=1) == dataset.y_test)
    assert result.metrics["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)


# --------------------------------------------------------------------------- augmentation
def test_augmentation_changes_training_batches_only_and_is_seeded():
    config = _config("data.augment=[{type: random_flip, mode: horizontal}]")
    dataset = load_dataset(config)

    def train_batch():
        layers = augmentation_layers(config.data.augment, seed=config.seed,
                                     value_range=dataset.value_range)
        pipeline = dataset.train.pipeline(16, augment=layers)
        return next(pipeline.as_numpy_iterator())[0]

    original = dataset.train.images(range(16))
    augmented = train_batch()
    mirrored = original[:, :, ::-1]
    same = np.all(augmented == original, axis=(1, 2, 3))
    flipped = np.all(np.abs(augmented - mirrored) < 1e-4, axis=(1, 2, 3))
    assert np.all(same | flipped), "a horizontal flip, or nothing"
    assert flipped.any() and same.any()
    np.testing.assert_array_equal(train_batch(), augmented), "same seed, same augmentation"
    from cnnviz.train.fit import _inputs

    inputs = _inputs(config, dataset, Path("unused"), strategy=None)
    validation = next(inputs.validation.as_numpy_iterator())[0]
    np.testing.assert_array_equal(validation, dataset.val.images(range(len(validation))))


@pytest.mark.slow
def test_augment_command_writes_a_grid_of_originals_and_versions(tmp_path):
    from PIL import Image

    options = ["--set", ("data.augment=[{type: random_rotation, factor: 0.2}, "
                         "{type: random_contrast, factor: 0.5}]")]
    result = runner.invoke(app, ["augment", str(ROOT / "configs" / "digits.yaml"), "--images",
                                 "3", "--draws", "2", "--out", str(tmp_path), *options],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote {tmp_path / 'augment.png'}"
    with Image.open(tmp_path / "augment.png") as image:
        assert image.format == "PNG" and image.height > image.width * 0.6  # 3 rows x 3 columns
    empty = runner.invoke(app, ["augment", str(ROOT / "configs" / "digits.yaml"), "--out",
                                str(tmp_path / "none")], catch_exceptions=False)
    assert empty.exit_code == 2
    assert "data.augment is empty" in empty.output and "Traceback" not in empty.output
