"""Watch it learn: ExplainCallback's maps and numbers are the explain API's on each epoch's weights,
its files survive a resume once per epoch, and the explain.* gates judge them."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
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
    (tmp_path / "explain_history.csv").write_text(
        "epoch,gradcam.deletion_auc,seconds\n1,0.5,0.1\n2,0.4,0.1\n3,0.3,0.1\n")
    for name in ("gradcam/epoch-002.png", "gradcam/epoch-003.png", "maps/epoch-003.npz",
                 "gradcam/evolution.png"):
        (tmp_path / "epochs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "epochs" / name).write_bytes(b"")
    callback.on_train_begin()
    callback.on_epoch_begin(2)  # initial_epoch=2: epochs 1 and 2 are behind this fit
    assert [row["epoch"] for row in callback.history] == [1.0, 2.0]
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
    shape's share computed here from the saved maps), and the last epoch's equals what
    `cnnviz shortcut` reports on the finished model's same images."""
    from cnnviz.data import load_dataset
    from cnnviz.data.shapes import cue_share
    from cnnviz.pipeline import train_run
    from cnnviz.runs.load import load_run
    from cnnviz.trust.shortcut import shortcut_report

    config = load_config(ROOT / "configs" / "shortcut.yaml", [
        "data.shapes.count=600", "train.epochs=5", "train.verbose=0",
        "train.explain={split: train, images: '0:8', methods: [saliency], metrics: [cue_share]}"])
    dataset = load_dataset(config)
    result = train_run(config, tmp_path, dataset=dataset, log=lambda line: None)
    rows = _rows(result.run_dir / "explain_history.csv")
    shares = [float(row["saliency.cue_share"]) for row in rows]
    on_shape = []
    for epoch in range(1, 6):
        maps_file = result.run_dir / "figures" / "epochs" / "maps" / f"epoch-{epoch:03d}.npz"
        with np.load(maps_file) as maps:
            on_shape.append(float(cue_share(maps["saliency"],
                                            dataset.extras["shape_masks_train"][:8]).mean()))
    assert len(shares) == 5 and shares[-1] > 1.5 * shares[0], shares
    assert shares[0] < on_shape[0] and shares[-1] > on_shape[-1], (shares, on_shape)
    assert result.metrics["explain.saliency.cue_share"] == pytest.approx(shares[-1])

    model = load_run(result.run_dir).model
    assert (model.predict(dataset.x_train[:8], verbose=0).argmax(-1) == dataset.y_train[:8]).all()
    report = shortcut_report(model, dataset, methods=("saliency",), count=8)
    assert report.cue_share["saliency"] == pytest.approx(shares[-1], abs=1e-5)
