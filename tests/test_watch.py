"""Watch it learn: ExplainCallback's maps and numbers are the explain API's on each epoch's weights
(model_randomization `cnnviz sanity`'s), its files survive a SIGKILL and resume once per epoch
and byte for byte, a non-chief worker writes nothing, and the explain.* gates judge them."""

import csv
import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
from _models import tiny_digits_config
from typer.testing import CliRunner

from cnnviz.ci.gates import check_names, explain_values
from cnnviz.config.expect import parse_expectation
from cnnviz.config.loading import load_config
from cnnviz.errors import CnnvizError

ROOT = Path(__file__).parent.parent
# digits at its native 8x8 on 200 images: a training run takes a few seconds.
TINY = ["data.image_size=null", "data.limit=200", "train.verbose=0"]


def _digits(*overrides):
    return load_config(ROOT / "configs" / "digits.yaml", [*TINY, *overrides])


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


@pytest.mark.slow
def test_each_epochs_maps_and_aucs_are_the_api_on_that_epochs_weights(tmp_path):
    import keras
    import tensorflow as tf

    from cnnviz.callbacks import ExplainCallback
    from cnnviz.explain.registry import attribute
    from cnnviz.trust.faithfulness import deletion_insertion

    rng = np.random.default_rng(0)
    images = rng.random((64, 8, 8, 1), dtype=np.float32)
    labels = (images[:, :4].mean(axis=(1, 2, 3)) > images[:, 4:].mean(axis=(1, 2, 3))).astype(int)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
        keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    watched, shown = images[:6], labels[:6]
    from_arrays = ExplainCallback(watched, shown, log_dir=tmp_path, steps=5)
    batches = tf.data.Dataset.from_tensor_slices((watched, np.eye(2)[shown])).batch(3)
    from_dataset = ExplainCallback(batches, batches=2, steps=5)

    kept = {}

    class KeepWeights(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            kept[epoch + 1] = self.model.get_weights()

    model.fit(images, labels, epochs=2, batch_size=16, verbose=0,
              callbacks=[from_arrays, from_dataset, KeepWeights()])

    rows = _rows(tmp_path / "explain_history.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"]
    for epoch, weights in kept.items():
        that_epoch = keras.models.clone_model(model)
        that_epoch.set_weights(weights)
        for method in ("gradcam", "saliency"):
            expected = attribute(that_epoch, watched, shown, method=method)
            np.testing.assert_allclose(from_arrays.maps_of(epoch)[method], expected, atol=1e-5)
            np.testing.assert_allclose(from_dataset.maps[epoch][method], expected, atol=1e-5)
            assert (tmp_path / "epochs" / method / f"epoch-{epoch:03d}.png").is_file()
        curves = deletion_insertion(that_epoch, watched, shown, methods=("gradcam", "saliency"),
                                    steps=5)
        for method in ("gradcam", "saliency"):
            for metric in ("deletion_auc", "insertion_auc"):
                measured = float(rows[epoch - 1][f"{method}.{metric}"])
                assert measured == pytest.approx(getattr(curves, metric)[method], abs=1e-6)
    assert not np.allclose(from_dataset.maps[1]["saliency"], from_dataset.maps[2]["saliency"])
    assert (tmp_path / "epochs" / "gradcam" / "evolution.png").is_file()
    assert from_arrays.run_metrics()["explain.gradcam.insertion_auc"] == pytest.approx(
        float(rows[-1]["gradcam.insertion_auc"]))


def test_a_fit_from_epoch_k_drops_what_later_epochs_wrote(tmp_path):
    from cnnviz.callbacks import ExplainCallback

    callback = ExplainCallback(np.zeros((2, 4, 4, 1), np.float32), log_dir=tmp_path)
    # An earlier cnnviz's file: it had a `seconds` column, left out when rewritten.
    (tmp_path / "explain_history.csv").write_text(
        "epoch,gradcam.deletion_auc,gradcam.insertion_auc,saliency.deletion_auc,"
        "saliency.insertion_auc,seconds\n"
        + "".join(f"{epoch},0.5,0.4,0.3,0.2,0.1\n" for epoch in (1, 2, 3)))
    for name in ("gradcam/epoch-002.png", "gradcam/epoch-003.png", "maps/epoch-003.npz",
                 "gradcam/evolution.png"):
        (tmp_path / "epochs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "epochs" / name).write_bytes(b"")
    callback.on_train_begin()
    callback.on_epoch_begin(2)  # initial_epoch=2: epochs 1 and 2 are behind this fit
    assert [row["epoch"] for row in callback.history] == [1.0, 2.0]
    assert (tmp_path / "explain_history.csv").read_text() == (
        "epoch,gradcam.deletion_auc,gradcam.insertion_auc,saliency.deletion_auc,"
        "saliency.insertion_auc\n1,0.5,0.4,0.3,0.2\n2,0.5,0.4,0.3,0.2\n"), "rows first, then files"
    left = sorted(str(path.relative_to(tmp_path / "epochs"))
                  for path in (tmp_path / "epochs").rglob("*.*"))
    assert left == ["gradcam/epoch-002.png", "gradcam/evolution.png"]


@pytest.mark.slow
def test_a_run_stopped_before_its_commit_records_each_epoch_once(tmp_path):
    from cnnviz.pipeline import train_run

    config = _digits("train.epochs=3", "train.explain={every: 1, images: '0:4'}")

    class Stopped(Exception):
        pass

    def stop_after_explaining(run_dir, dataset):
        import keras

        class Stop(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if epoch == 1:  # epoch 2's row and figures are written, its commit is not
                    raise Stopped

        return Stop()

    from cnnviz.report.watch import run_callbacks
    from cnnviz.train.fit import train

    with pytest.raises(Stopped):
        train(config, tmp_path, epoch_callbacks=(*run_callbacks(config), stop_after_explaining),
              log=lambda line: None)
    (run_dir,) = (tmp_path / "digits").iterdir()
    assert [row["epoch"] for row in _rows(run_dir / "explain_history.csv")] == ["1", "2"]
    result = train_run(config, tmp_path, log=lambda line: None)
    assert result.run_dir == run_dir and result.resumed_from_epoch == 1
    rows = _rows(run_dir / "explain_history.csv")
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["explain.gradcam.insertion_auc"] == pytest.approx(
        float(rows[-1]["gradcam.insertion_auc"]))
    assert len(list((run_dir / "figures" / "epochs" / "saliency").glob("epoch-*.png"))) == 3


# -------------------------------------------------------------------- SIGKILL and resume
WATCHED_EPOCHS = 4
# A real `cnnviz train` that explains every epoch, measures every metric but cue_share and has
# dropout (random masks a resumed run must repeat).
WATCHED = tiny_digits_config("watched", seed=3, epochs=WATCHED_EPOCHS, dropout=0.3,
                             checkpoint_interval=0)
WATCHED["train"]["explain"] = {"images": "0:4", "metrics": [
    "deletion_auc", "insertion_auc", "model_randomization"]}
# Each process of the chain SIGKILLs itself at its first time at the instant (CNNVIZ_TEST_KILL_AT)
# and the next one resumes the run: (instant, epochs committed then, rows in the history then).
KILLS = [
    # Epoch 2's maps, figures and row are written, its commit is not: the worst moment.
    ("explain_history.csv:renamed#2", 1, 2),
    # Resumed at epoch 2: its stale row is dropped, then its files; the new maps are not yet
    # renamed into place.
    ("epoch-002.npz:written", 1, 1),
    # Resumed at epoch 2 again, which is committed; epoch 3's maps are in place, its figures
    # and row are not.
    ("epoch-003.npz:renamed", 2, 2),
]
_EPOCH_FILE = re.compile(r"^epoch-(\d{3})\.(png|npz)$")


def _epoch_files(run_dir: Path) -> dict[str, bytes]:
    """{path under figures/epochs: bytes} of every per-epoch file and figure (not the hidden
    temporaries of a write the kill cut short)."""
    folder = run_dir / "figures" / "epochs"
    return {str(path.relative_to(folder)): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()
            and not path.name.startswith(".")}


@pytest.mark.slow
def test_sigkill_and_resume_give_the_uninterrupted_explain_history_byte_for_byte(tmp_path):
    import _forked
    import yaml

    config_file = tmp_path / "watched.yaml"
    config_file.write_text(yaml.safe_dump(WATCHED))
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}

    def start(out: Path, **extra) -> _forked.Process:
        return _forked.Process(["train", config_file, "--out", out], {**environment, **extra},
                               tmp_path)

    uninterrupted = start(tmp_path / "whole")  # trains meanwhile, on the other core
    out = tmp_path / "killed"
    after_kills = []
    try:
        for instant, committed, rows in KILLS:
            killed = start(out, CNNVIZ_TEST_KILL_AT=instant)
            assert killed.wait() == -signal.SIGKILL, f"{instant}: never reached {killed.stderr}"
            (run_dir,) = (out / "watched").iterdir()
            metadata = json.loads((run_dir / "backup" / "training_metadata.json").read_text())
            history = run_dir / "explain_history.csv"
            after_kills.append((instant, committed, rows, metadata["epoch"],
                                history.read_bytes() if history.is_file() else b"",
                                _epoch_files(run_dir)))
        finished = start(out)
        assert finished.wait() == 0, finished.stderr
        assert uninterrupted.wait() == 0, uninterrupted.stderr
    finally:
        uninterrupted.kill()
    (reference,) = (tmp_path / "whole" / "watched").iterdir()
    reference_history = (reference / "explain_history.csv").read_bytes()
    reference_files = _epoch_files(reference)
    assert reference_history.count(b"\n") == WATCHED_EPOCHS + 1

    for instant, committed, rows, epoch, text, files in after_kills:
        assert epoch == committed, f"{instant}: epoch {epoch} committed, not {committed}"
        lines = text.splitlines(keepends=True)
        assert len(lines) == rows + 1 and lines == reference_history.splitlines(
            keepends=True)[:rows + 1], (
            f"{instant}: the rows are the uninterrupted run's first {rows}, byte for byte")
        for name, payload in files.items():
            match = _EPOCH_FILE.match(Path(name).name)
            assert match, f"{instant}: {name} (evolution.png comes with the last epoch)"
            number = int(match.group(1))
            # Only the epoch being written when the kill came may have files beyond the commit.
            assert number <= committed + 1, f"{instant}: {name} of an uncommitted epoch"
            if number <= committed:
                assert payload == reference_files[name], f"{instant}: {name} differs"
        if rows == committed:  # the kill came before the uncommitted epoch's row was written
            assert not [name for name in files if f"-{committed + 1:03d}.png" in name], (
                f"{instant}: a figure of epoch {committed + 1} without its row")
    stale = after_kills[1][5]
    assert not [name for name in stale if "-002." in name], (
        "a resumed fit drops the uncommitted epoch's row and then its figures and maps")

    (run_dir,) = (out / "watched").iterdir()
    assert (run_dir / "explain_history.csv").read_bytes() == reference_history, (
        "killed three times and resumed: the uninterrupted run's explain_history.csv")
    assert [row["epoch"] for row in _rows(run_dir / "explain_history.csv")] == ["1", "2", "3", "4"]
    assert _epoch_files(run_dir) == reference_files, "every figure and maps file the same too"
    assert (run_dir / "history.csv").read_bytes() == (reference / "history.csv").read_bytes()
    metrics, whole = (json.loads((folder / "metrics.json").read_text())
                      for folder in (run_dir, reference))
    assert {key: value for key, value in metrics.items() if key.startswith("explain.")} == {
        key: value for key, value in whole.items() if key.startswith("explain.")}
    assert metrics["explain_seconds"] > 0, "the time is in metrics.json, not in the history"
    assert not [path for path in run_dir.rglob("*") if ".tmp" in path.name]


@pytest.mark.slow
def test_model_randomization_is_cnnviz_sanitys_number_and_leaves_training_as_it_was(
        tmp_path, monkeypatch):
    import keras

    from cnnviz.cli import app
    from cnnviz.pipeline import train_run

    explained = _digits("train.epochs=2",
                        "train.explain={images: '0:4', metrics: [model_randomization]}")
    watched = train_run(explained, tmp_path / "watched", log=lambda line: None)
    plain = train_run(_digits("train.epochs=2"), tmp_path / "plain", log=lambda line: None)
    # The layers were re-initialized at every epoch's end and given their weights back: the
    # training (dropout masks included) is the one without any explanation.
    assert (watched.run_dir / "history.csv").read_bytes() == (
        plain.run_dir / "history.csv").read_bytes()
    for trained, untouched in zip(*(
            keras.models.load_model(result.run_dir / "model.keras", compile=False).get_weights()
            for result in (watched, plain))):
        np.testing.assert_array_equal(trained, untouched)
    columns = list(_rows(watched.run_dir / "explain_history.csv")[0])
    assert columns == ["epoch", "gradcam.model_randomization", "saliency.model_randomization"]

    # `cnnviz sanity` on the run's model, the same images and the run's seed (on these two
    # methods only: all of them take a minute).
    monkeypatch.setattr("cnnviz.explain.registry.METHODS", ("gradcam", "saliency"))
    result = CliRunner().invoke(app, ["sanity", str(watched.run_dir), "--images", "0:4",
                                      "--seed", str(explained.seed), "--json"])
    assert result.exit_code == 0, result.output
    values = json.loads(result.stdout[result.stdout.index("{"):])["values"]
    for method in ("gradcam", "saliency"):
        assert watched.metrics[f"explain.{method}.model_randomization"] == pytest.approx(
            values[f"sanity.{method}.rank_correlation"], abs=1e-9)


def test_a_non_chief_worker_explains_and_writes_nothing(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import tensorflow as tf
    from tensorflow.python.distribute import multi_worker_util

    from cnnviz.callbacks import ExplainCallback
    from cnnviz.report.watch import _is_chief
    from cnnviz.train.devices import worker_role

    def multi_worker_strategy(index: int):
        """What worker_role reads of a MultiWorkerMirroredStrategy on worker `index` of a
        two-worker TF_CONFIG: its cluster resolver, and TF's own chief test (a real one cannot
        start in a process where TensorFlow runs)."""
        monkeypatch.setenv("TF_CONFIG", json.dumps({
            "cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
            "task": {"type": "worker", "index": index}}))
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        chief = multi_worker_util.is_chief(resolver.cluster_spec(), resolver.task_type,
                                           resolver.task_id)
        return SimpleNamespace(cluster_resolver=resolver,
                               extended=SimpleNamespace(should_checkpoint=chief))

    assert worker_role(multi_worker_strategy(0)) == (True, "worker 0"), "no chief job: worker 0"
    assert worker_role(multi_worker_strategy(1)) == (False, "worker 1")
    # Not a model: explaining anything on it would fail.
    on_worker_1 = SimpleNamespace(distribute_strategy=multi_worker_strategy(1))
    assert not _is_chief(on_worker_1)
    callback = ExplainCallback(np.zeros((2, 8, 8, 1), np.float32), log_dir=tmp_path / "figures",
                               tensorboard_dir=tmp_path / "tensorboard")
    callback.set_model(on_worker_1)
    callback.set_params({"epochs": 2})
    callback.on_train_begin()
    for epoch in range(2):
        callback.on_epoch_begin(epoch)
        callback.on_epoch_end(epoch)
    callback.on_train_end()
    assert callback.history == [] and callback.maps == {} and callback.run_metrics() == {}
    assert list(tmp_path.iterdir()) == [], "nothing written"


@pytest.mark.slow
def test_a_gate_over_the_epochs_fails_with_exit_1(tmp_path):
    from cnnviz.cli import app

    arguments = ["train", str(ROOT / "configs" / "digits.yaml"), "--out", str(tmp_path), "--json"]
    for override in (*TINY, "train.epochs=2", "train.explain={images: '0:4'}"):
        arguments += ["--set", override]
    result = CliRunner().invoke(app, [*arguments, "--expect",
                                      "max(explain.gradcam.insertion_auc)<=0.001", "--expect",
                                      "explain.saliency.deletion_auc<=1"])
    assert result.exit_code == 1, result.output
    payload = json.loads(result.stdout[result.stdout.index("{"):])
    first, second = payload["expectations"]
    (run_dir,) = (tmp_path / "digits").iterdir()
    rows = _rows(run_dir / "explain_history.csv")
    assert not first["passed"] and second["passed"]
    assert first["value"] == pytest.approx(max(float(r["gradcam.insertion_auc"]) for r in rows))


def test_explain_gate_names_are_checked_before_training():
    config = _digits("train.explain={methods: [gradcam]}")
    good = [parse_expectation("min( explain.gradcam.deletion_auc )>=0")]
    assert good[0].metric == "min(explain.gradcam.deletion_auc)"
    check_names(good, command="train", config=config)
    for text, message in [("explain.saliency.deletion_auc>0", "with <method> one of gradcam"),
                          ("explain.gradcam.cue_share>0", "deletion_auc,insertion_auc}"),
                          ("max(test_accuracy)>0", "takes a per-epoch metric")]:
        with pytest.raises(CnnvizError, match=message):
            check_names([parse_expectation(text)], command="train", config=config)
    listed = _digits("train.explain={methods: [gradcam], metrics: [model_randomization]}")
    check_names([parse_expectation("explain.gradcam.model_randomization<=0.5"),
                 parse_expectation("max(explain.gradcam.model_randomization)<=0.5")],
                command="train", config=listed)
    with pytest.raises(CnnvizError, match="deletion_auc,insertion_auc}"):  # only when listed
        check_names([parse_expectation("explain.gradcam.model_randomization<=0.5")],
                    command="train", config=config)
    with pytest.raises(CnnvizError, match="need the train.explain section"):
        check_names([parse_expectation("explain.gradcam.deletion_auc>0")], command="run",
                    config=_digits())
    assert explain_values({"epoch": [1, 2], "gradcam.cue_share": [0.2, 0.1]}) == {
        "explain.gradcam.cue_share": 0.1, "max(explain.gradcam.cue_share)": 0.2,
        "min(explain.gradcam.cue_share)": 0.1}


def test_cue_share_needs_a_cue_in_the_watched_split():
    with pytest.raises(CnnvizError, match="cue_share needs a spurious cue"):
        _digits("train.explain={metrics: [cue_share]}")


@pytest.mark.slow
def test_the_share_on_a_learned_shortcut_rises_over_training(tmp_path):
    """The cue's share of saliency rises epoch after epoch until it is above the shape's (the
    shape's share computed here from the saved maps), a gate on it fails `cnnviz train` with
    exit 1, and the last epoch's share equals what `cnnviz shortcut` reports on the finished
    model's same images."""
    from cnnviz.cli import app
    from cnnviz.data import load_dataset
    from cnnviz.data.shapes import cue_share
    from cnnviz.runs.load import load_run
    from cnnviz.trust.shortcut import shortcut_report

    overrides = ["data.shapes.count=600", "train.epochs=5", "train.verbose=0",
                 ("train.explain={split: train, images: '0:8', methods: [saliency], "
                  "metrics: [cue_share]}")]
    arguments = ["train", str(ROOT / "configs" / "shortcut.yaml"), "--out", str(tmp_path)]
    for override in overrides:
        arguments += ["--set", override]
    gated = CliRunner().invoke(app, [*arguments, "--expect",
                                     "max(explain.saliency.cue_share)<=0.05"])
    assert gated.exit_code == 1, gated.output
    dataset = load_dataset(load_config(ROOT / "configs" / "shortcut.yaml", overrides))
    (run_dir,) = (tmp_path / "shortcut").iterdir()
    rows = _rows(run_dir / "explain_history.csv")
    shares = [float(row["saliency.cue_share"]) for row in rows]
    on_shape = []
    for epoch in range(1, 6):
        maps_file = run_dir / "figures" / "epochs" / "maps" / f"epoch-{epoch:03d}.npz"
        with np.load(maps_file) as maps:
            on_shape.append(float(cue_share(maps["saliency"],
                                            dataset.extras["shape_masks_train"][:8]).mean()))
    assert len(shares) == 5 and shares[-1] > 1.5 * shares[0], shares
    assert shares[0] < on_shape[0] and shares[-1] > on_shape[-1], (shares, on_shape)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["explain.saliency.cue_share"] == pytest.approx(shares[-1])

    model = load_run(run_dir).model
    assert (model.predict(dataset.x_train[:8], verbose=0).argmax(-1) == dataset.y_train[:8]).all()
    report = shortcut_report(model, dataset, methods=("saliency",), count=8)
    assert report.cue_share["saliency"] == pytest.approx(shares[-1], abs=1e-5)
