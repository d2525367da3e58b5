"""Training under tf.distribute: mirrored replicas, resuming under another replica count,
two multi-worker processes, mixed precision and XLA; `train.explain` on the chief only.

Splitting the CPU into logical devices must happen before TensorFlow starts, and this pytest
process has usually started it already, so the replica runs happen in fresh subprocesses that
print their results as one JSON line.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cnnviz.config.loading import load_config
from cnnviz.errors import CnnvizError, ConfigError

ROOT = Path(__file__).parent.parent
DIGITS = ROOT / "configs" / "digits.yaml"
# Small and quick: 400 training images, no dropout (so 1 and 2 replicas compute the same thing).
SMALL = ["train.verbose=0", "data.limit=400", "model.layers.5.rate=0.0"]
# Watch it learn on four test images, every epoch.
EXPLAIN = ("train.explain={images: '0:4', "
           "metrics: [deletion_auc, insertion_auc, model_randomization]}")


def _environment(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def _python_json(code: str, *args: str, timeout: int = 240) -> dict:
    """Run `code` in a fresh Python; return the JSON object it printed on its last line."""
    finished = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
        env=_environment(), timeout=timeout, check=False,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads(finished.stdout.strip().splitlines()[-1])


# The replica runs: one subprocess, one TensorFlow start-up, several trainings.
REPLICA_RUNS = """
import json, sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cnnviz.config import load_config
from cnnviz.data import load_dataset
from cnnviz.pipeline import train_run
from cnnviz.train import train

out = Path(sys.argv[1])
small = json.loads(sys.argv[2])
quiet = lambda line: None

def config(epochs, *options):
    return load_config(sys.argv[3], [f"train.epochs={epochs}", *small, *options])

def losses(run_dir):
    import csv
    return [float(row["loss"]) for row in csv.DictReader((run_dir / "history.csv").open())]

two = ["train.distribute=mirrored", "train.cpu_replicas=2"]
# Explained at every epoch as well (train.explain): the training is the same without.
mirrored = train_run(config(2, *two, sys.argv[4]), out / "mirrored", log=quiet)
single = train(config(2), out / "single", log=quiet)

class StopAfterTwoEpochs(keras.callbacks.Callback):
    # Runs after BackupAndRestore has saved epoch 2: keeps those weights, then stops.

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            self.weights = [np.array(weight) for weight in self.model.get_weights()]
            raise RuntimeError("stopped on purpose")

stopper = StopAfterTwoEpochs()
try:
    train(config(4, *two), out / "resume", extra_callbacks=[stopper], log=quiet)
except RuntimeError:
    pass
run_dir = next((out / "resume" / "digits").iterdir())
saved_epoch = json.loads((run_dir / "backup" / "training_metadata.json").read_text())["epoch"]
saved_weights = stopper.weights

class FirstWeights(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.weights = [np.array(weight) for weight in self.model.get_weights()]

first = FirstWeights()
resumed = train(config(4), out / "resume", extra_callbacks=[first], log=quiet)
restored_difference = max(float(np.max(np.abs(a - b)))
                          for a, b in zip(first.weights, saved_weights))

# The finished model, loaded under 2 replicas and under none, predicts the same.
images = load_dataset(config(1)).x_test
strategy = tf.distribute.MirroredStrategy(["/device:CPU:0", "/device:CPU:1"])
with strategy.scope():
    distributed = keras.models.load_model(resumed.run_dir / "model.keras", compile=False)
    distributed_predictions = distributed.predict(images, verbose=0, batch_size=64)
plain = keras.models.load_model(resumed.run_dir / "model.keras", compile=False)
plain_predictions = plain.predict(images, verbose=0, batch_size=64)

print(json.dumps({
    "mirrored": mirrored.metrics, "single": single.metrics,
    "mirrored_run": str(mirrored.run_dir),
    "mirrored_losses": losses(mirrored.run_dir), "single_losses": losses(single.run_dir),
    "resumed": resumed.metrics, "resumed_losses": losses(resumed.run_dir),
    "resumed_same_dir": resumed.run_dir == run_dir,
    "resumed_config": (run_dir / "config.yaml").read_text(),
    "saved_epoch": saved_epoch,
    "restored_difference": restored_difference,
    "prediction_difference": float(np.max(np.abs(distributed_predictions - plain_predictions))),
    "prediction_replicas": int(strategy.num_replicas_in_sync),
}))
"""


@pytest.fixture(scope="module")
def replica_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("replicas")
    return _python_json(REPLICA_RUNS, str(out), json.dumps(SMALL), str(DIGITS), EXPLAIN)


@pytest.mark.slow
def test_mirrored_over_two_logical_cpus_trains(replica_runs):
    metrics = replica_runs["mirrored"]
    assert metrics["replicas"] == 2 and metrics["distribute"] == "mirrored"
    assert metrics["batch_size"] == 32, "the configured batch is the global batch"
    assert metrics["epochs"] == 2
    assert 0.5 < metrics["test_accuracy"] <= 1.0, "two epochs on digits learn something"


@pytest.mark.slow
def test_two_replicas_compute_what_one_computes(replica_runs):
    # Same global batch, split in two and averaged back: the same loss per epoch. A batch that
    # was not split (twice the data per step) or gradients summed instead of averaged would
    # give other losses.
    assert replica_runs["single"]["replicas"] == 1
    assert replica_runs["mirrored_losses"] == pytest.approx(replica_runs["single_losses"],
                                                            rel=2e-3)
    assert replica_runs["mirrored"]["test_loss"] == pytest.approx(
        replica_runs["single"]["test_loss"], rel=5e-3)


def _assert_explained_once_as_on_one_device(run_dir: Path, epochs: int) -> None:
    """The run's explain history and figures: one row and one file per method and epoch, and
    the last epoch's numbers those of the saved model explained here, on one device."""
    import csv

    import keras

    from cnnviz.data import load_dataset
    from cnnviz.explain.registry import attribute
    from cnnviz.trust.faithfulness import deletion_insertion
    from cnnviz.trust.sanity import model_randomization

    rows = list(csv.DictReader((run_dir / "explain_history.csv").open()))
    assert [row["epoch"] for row in rows] == [str(epoch) for epoch in range(1, epochs + 1)]
    methods = ("gradcam", "saliency")
    folder = run_dir / "figures" / "epochs"
    for kind, suffix in (*((method, "png") for method in methods), ("maps", "npz")):
        assert sorted(path.name for path in (folder / kind).glob("epoch-*")) == [
            f"epoch-{epoch:03d}.{suffix}" for epoch in range(1, epochs + 1)], kind
    config = load_config(run_dir / "config.yaml")
    test = load_dataset(config).test
    images, labels = test.images(np.arange(4)), test.labels[:4]
    model = keras.models.load_model(run_dir / "model.keras", compile=False)
    curves = deletion_insertion(model, images, labels, methods=methods, steps=10, seed=config.seed)
    sanity = model_randomization(model, images, methods=methods, seed=config.seed, keep=0)
    last = rows[-1]
    with np.load(folder / "maps" / f"epoch-{epochs:03d}.npz") as maps:
        for method in methods:
            # Equal here; the tolerances allow for another summation order.
            np.testing.assert_allclose(maps[method], attribute(model, images, labels,
                                                                method=method),
                                       rtol=1e-5, atol=1e-9)
            for metric in ("deletion_auc", "insertion_auc"):
                assert float(last[f"{method}.{metric}"]) == pytest.approx(
                    getattr(curves, metric)[method], abs=1e-6), (method, metric)
            assert float(last[f"{method}.model_randomization"]) == pytest.approx(
                sanity.rank_correlation[method][-1], abs=1e-6), method


@pytest.mark.slow
def test_under_two_replicas_the_explanations_are_written_once_as_on_one_device(replica_runs):
    _assert_explained_once_as_on_one_device(Path(replica_runs["mirrored_run"]), epochs=2)
    metrics = replica_runs["mirrored"]
    assert metrics["replicas"] == 2
    assert np.isfinite(metrics["explain.gradcam.model_randomization"])


@pytest.mark.slow
def test_a_run_stopped_under_two_replicas_resumes_under_one(replica_runs):
    metrics = replica_runs["resumed"]
    assert replica_runs["resumed_same_dir"], "resumed in the same run directory"
    assert metrics["resumed_from_epoch"] == 2 and metrics["epochs"] == 4
    assert metrics["replicas"] == 1 and metrics["distribute"] == "none"
    assert "cpu_replicas: 2" in replica_runs["resumed_config"], "the run keeps its config"
    assert replica_runs["saved_epoch"] == 2
    assert replica_runs["restored_difference"] == 0.0, (
        "the one-replica model starts from exactly the weights saved under two replicas")
    losses = replica_runs["resumed_losses"]
    assert len(losses) == 4
    assert losses[2] < 0.6 * losses[0], "epoch 3 continues training; it does not start afresh"
    assert 0.5 < metrics["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_a_saved_model_predicts_the_same_under_two_replicas_and_none(replica_runs):
    assert replica_runs["prediction_replicas"] == 2
    assert replica_runs["prediction_difference"] < 1e-5


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_workers(arguments, environment=lambda index: {}) -> list[subprocess.Popen]:
    """Two `cnnviz train` processes on one local cluster: worker `index` runs
    `cnnviz train *arguments(index)` with the extra variables `environment(index)`."""
    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
    processes = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "cnnviz.cli", "train", *arguments(index)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=_environment(TF_CONFIG=tf_config, **environment(index))))
    return processes


def _outputs_of_successful(processes: list[subprocess.Popen]) -> list[str]:
    """Each worker's output, once every worker has exited 0."""
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=240)[0])
    finally:
        for process in processes:  # a worker waiting for a dead peer would wait forever
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    return outputs


@pytest.mark.slow
def test_two_worker_processes_train_one_model_and_only_the_chief_writes(tmp_path):
    settings = ["train.distribute=multi_worker", "train.epochs=2", *SMALL, EXPLAIN]
    scratch = [tmp_path / f"tmp{index}" for index in range(2)]
    for folder in scratch:
        folder.mkdir()
    processes = _start_workers(
        lambda index: [str(DIGITS), "--out", str(tmp_path / f"out{index}"),
                       *[part for setting in settings for part in ("--set", setting)]],
        lambda index: {"TMPDIR": str(scratch[index])})
    outputs = _outputs_of_successful(processes)

    runs = list((tmp_path / "out0" / "digits").iterdir())
    assert len(runs) == 1
    for name in ("config.yaml", "model.keras", "history.csv", "metrics.json", "curves.png",
                 "checkpoints/best.keras", "checkpoints/last.keras"):
        assert (runs[0] / name).is_file(), name
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["replicas"] == 2 and metrics["distribute"] == "multi_worker"
    assert metrics["epochs"] == 2 and 0.5 < metrics["test_accuracy"] <= 1.0
    assert "worker 1 of a multi-worker run" in outputs[1]
    assert not (tmp_path / "out1").exists(), "the non-chief writes nothing under its --out"
    assert not list(scratch[1].iterdir()), "the non-chief removes its temporary folder"
    # train.explain: the chief alone explains, once per epoch, what one device would.
    _assert_explained_once_as_on_one_device(runs[0], epochs=2)


@pytest.mark.slow
def test_two_workers_sharding_an_image_folder_by_file_compute_what_one_process_does(tmp_path):
    """Each worker decodes half the files (Split.pipeline shards the shuffled file list); the
    two halves of every global batch are the batch one process would take, so the losses match.
    """
    from _folders import folder_config, make_folder

    from cnnviz.config.loading import dump_config
    from cnnviz.train.fit import train

    root = make_folder(tmp_path / "data")
    config = folder_config(root, validation_split=0.0)  # 36 training files: an even share each
    config_file = tmp_path / "folder.yaml"
    config_file.write_text(dump_config(config))
    processes = _start_workers(
        lambda index: [str(config_file), "--out", str(tmp_path / f"out{index}"),
                       "--set", "train.distribute=multi_worker"])
    single = train(config, tmp_path / "single", log=lambda line: None)  # meanwhile, here
    outputs = _outputs_of_successful(processes)
    run_dir = next((tmp_path / "out0" / "folder").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["replicas"] == 2 and metrics["distribute"] == "multi_worker"

    def losses(directory):
        import csv

        return [float(row["loss"]) for row in csv.DictReader((directory / "history.csv").open())]

    # The first epoch sees the same batches from the same weights; rounding then drifts a little.
    assert losses(run_dir)[0] == pytest.approx(losses(single.run_dir)[0], rel=1e-4)
    assert losses(run_dir) == pytest.approx(losses(single.run_dir), rel=2e-2)
    assert metrics["test_accuracy"] == single.metrics["test_accuracy"] == 1.0
    assert metrics["test_loss"] == pytest.approx(single.metrics["test_loss"], abs=5e-3)
    assert "Your input ran out of data" not in outputs[0] + outputs[1]


# ----------------------------------------------------------------- in this pytest process
def _config(*options):
    return load_config(DIGITS, ["train.epochs=1", *SMALL, "data.limit=200", *options])


@pytest.mark.slow
def test_mixed_precision_trains_on_the_cpu_with_a_float32_output(tmp_path):
    import keras

    from cnnviz.data import load_dataset
    from cnnviz.train.fit import train

    result = train(_config("train.mixed_precision=true"), tmp_path, log=lambda line: None)
    assert keras.mixed_precision.global_policy().name == "float32", (
        "models built later in the process are not mixed precision")
    model = keras.models.load_model(result.run_dir / "model.keras", compile=False)
    assert model.get_layer("conv1").compute_dtype == "float16"
    assert model.get_layer("preds").compute_dtype == "float32"
    probabilities = model.predict(load_dataset(_config()).x_test[:16], verbose=0)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert np.isfinite(result.metrics["test_loss"])
    assert result.metrics["test_accuracy"] > 0.2, "better than chance (0.1) after one epoch"


@pytest.mark.slow
def test_jit_compile_trains_with_xla(tmp_path):
    import keras

    from cnnviz.train.fit import train

    class RecordJit(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.jit_compile = self.model.jit_compile

    record = RecordJit()
    result = train(_config("train.jit_compile=true"), tmp_path, extra_callbacks=[record],
                   log=lambda line: None)
    assert record.jit_compile is True
    assert np.isfinite(result.metrics["test_loss"])
    assert result.metrics["test_accuracy"] > 0.2


def test_cpu_replicas_need_the_mirrored_strategy():
    with pytest.raises(ConfigError, match="cpu_replicas=2 needs train.distribute 'mirrored'"):
        load_config(DIGITS, ["train.cpu_replicas=2"])
    with pytest.raises(ConfigError, match="cpu_replicas"):
        load_config(DIGITS, ["train.cpu_replicas=0", "train.distribute=mirrored"])


def test_cpu_replicas_after_tensorflow_started_fail_with_advice(tmp_path):
    import tensorflow as tf

    from cnnviz.train.fit import train

    available = len(tf.config.list_logical_devices("CPU"))  # starts TensorFlow, if not yet
    config = _config("train.distribute=mirrored", f"train.cpu_replicas={available + 1}")
    with pytest.raises(CnnvizError, match="fresh process"):
        train(config, tmp_path, log=lambda line: None)
    assert not (tmp_path / "digits").exists(), "nothing is written before the check"


# ------------------------------------------------------------- the checkpoint callback
def test_throttled_checkpoints_keep_keras_choice_of_epoch(tmp_path):
    """ModelCheckpoint decides which epoch is best; the subclass only defers the write."""
    import keras

    from cnnviz.train.callbacks import ThrottledModelCheckpoint

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    checkpoint = ThrottledModelCheckpoint
    best = checkpoint(str(tmp_path / "best.keras"), monitor="val_loss", save_best_only=True,
                      interval=3600.0)
    last = checkpoint(str(tmp_path / "last.keras"), interval=3600.0)
    for callback in (best, last):
        callback.set_model(model)
    for epoch, val_loss in enumerate([1.0, 0.5, 0.8]):
        model.set_weights([np.full((2, 1), epoch, np.float32), np.zeros(1, np.float32)])
        for callback in (best, last):
            callback.on_epoch_end(epoch, {"val_loss": val_loss})
    assert not (tmp_path / "best.keras").exists(), "throttled until the end"
    for callback in (best, last):
        callback.on_train_end()

    def first_kernel(name):
        loaded = keras.models.load_model(tmp_path / name, compile=False)
        return loaded.get_weights()[0]

    assert np.all(first_kernel("best.keras") == 1), "best.keras is epoch 2 (val_loss 0.5)"
    assert np.all(first_kernel("last.keras") == 2)
    assert np.all(model.get_weights()[0] == 2), "the model keeps its last weights"
    assert not list(tmp_path.glob(".*")), "no temporary files left"

    # With no throttle every improvement is written at once.
    eager = checkpoint(str(tmp_path / "eager.keras"), monitor="val_loss", save_best_only=True,
                       interval=0.0)
    eager.set_model(model)
    eager.on_epoch_end(0, {"val_loss": 0.3})
    assert np.all(first_kernel("eager.keras") == 2)


def test_best_is_copied_from_last_when_the_last_epoch_is_the_best(tmp_path):
    import keras

    from cnnviz.train.callbacks import ThrottledModelCheckpoint

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    checkpoint = ThrottledModelCheckpoint
    last = checkpoint(str(tmp_path / "last.keras"), interval=3600.0)
    best = checkpoint(str(tmp_path / "best.keras"), monitor="loss", save_best_only=True,
                      interval=3600.0, same_file_as=last)
    for callback in (last, best):
        callback.set_model(model)
    for epoch, loss in enumerate([1.0, 0.5]):
        model.set_weights([np.full((2, 1), epoch, np.float32), np.zeros(1, np.float32)])
        for callback in (last, best):
            callback.on_epoch_end(epoch, {"loss": loss})
    for callback in (last, best):
        callback.on_train_end()
    assert (tmp_path / "best.keras").read_bytes() == (tmp_path / "last.keras").read_bytes()
    loaded = keras.models.load_model(tmp_path / "best.keras", compile=False)
    assert np.all(loaded.get_weights()[0] == 1)
