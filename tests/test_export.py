"""cnnviz export: each exported file, loaded by its own runtime, computes what the .keras model
does."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cnnviz.cli import app

runner = CliRunner()
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(digits_run):
    result = runner.invoke(app, ["export", str(digits_run), "--format", "savedmodel", "--format",
                                 "tflite", "--format", "onnx", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return digits_run, json.loads(result.stdout)


def _assert_matches_keras(run_dir, payload, format_name, run_exported):
    """`run_exported(images)` (the runtime's own call) against model.keras on the test split."""
    from cnnviz.runs.load import load_run

    run = load_run(run_dir)
    images = run.dataset().x_test.astype(np.float32)
    expected = run.model.predict(images, verbose=0)
    received = np.asarray(run_exported(images))
    assert received.shape == expected.shape
    assert np.max(np.abs(received - expected)) <= 1e-4
    assert payload["formats"][format_name]["max_abs_difference"] <= 1e-4


def test_savedmodel_loaded_by_tensorflow_matches(exported):
    import tensorflow as tf

    run_dir, payload = exported
    loaded = tf.saved_model.load(str(run_dir / "export" / "savedmodel"))
    _assert_matches_keras(run_dir, payload, "savedmodel",
                          lambda images: loaded.serve(tf.constant(images)).numpy())


def test_tflite_loaded_by_the_litert_interpreter_matches(exported):
    from ai_edge_litert.interpreter import Interpreter

    run_dir, payload = exported
    interpreter = Interpreter(model_path=str(run_dir / "export" / "model.tflite"))
    (tensor,) = interpreter.get_input_details()

    def run_tflite(images):
        interpreter.resize_tensor_input(tensor["index"], images.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(tensor["index"], images)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    _assert_matches_keras(run_dir, payload, "tflite", run_tflite)


def test_onnx_loaded_by_onnxruntime_matches(exported):
    import onnxruntime

    run_dir, payload = exported
    session = onnxruntime.InferenceSession(str(run_dir / "export" / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    _assert_matches_keras(run_dir, payload, "onnx",
                          lambda images: session.run(None, {name: images})[0])


def test_export_json_records_the_input_and_every_format(exported):
    run_dir, payload = exported
    record = json.loads((run_dir / "export" / "export.json").read_text())
    assert set(record["formats"]) == {"savedmodel", "tflite", "onnx"}
    assert record["input"]["shape"] == [None, 8, 8, 1] and record["input"]["dtype"] == "float32"
    assert record["preprocessing"]["kind"] == "scale"
    assert all(entry["checked_on"].endswith("test images") for entry in record["formats"].values())
    assert sorted(payload["files"]) == sorted([
        str(run_dir / "export" / name) for name in ("savedmodel", "model.tflite", "model.onnx",
                                                    "export.json")])


def test_export_to_a_chosen_file_replaces_it_whole(digits_run, tmp_path):
    target = tmp_path / "digits.onnx"
    target.write_bytes(b"an older export")
    result = runner.invoke(app, ["export", str(digits_run), "--format", "onnx", "--out",
                                 str(target), "--check-images", "16"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    import onnx

    onnx.checker.check_model(onnx.load(str(target)))
    assert "on the first 16 test images: matches" in result.output
    assert [path.name for path in tmp_path.iterdir()] == ["digits.onnx", "export.json"], \
        "no temporary files left behind"


def test_a_bare_keras_file_is_checked_on_noise(digits_run, tmp_path):
    result = runner.invoke(app, ["export", str(digits_run / "model.keras"), "--format",
                                 "savedmodel", "--out", str(tmp_path / "sm")],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "uniform-noise images" in result.output and "matches" in result.output


def test_a_missing_extra_is_named_in_one_line(digits_run, monkeypatch, tmp_path):
    from cnnviz.deploy import export

    monkeypatch.setitem(export.FORMATS, "onnx", export.ExportFormat(
        "onnx", "model.onnx", (("onnx", "onnx"), ("no_such_module_cnnviz", "tf2onnx"))))
    result = runner.invoke(app, ["export", str(digits_run), "--format", "onnx", "--out",
                                 str(tmp_path / "m.onnx")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [("error: --format onnx needs the packages onnx, tf2onnx (missing: tf2onnx); "
                      "install them with: pip install 'cnnviz[export]'")]
    assert not Path(tmp_path / "m.onnx").exists()


def test_a_normalization_layer_exports_to_onnx_with_one_input(tmp_path):
    """Normalization(mean=, variance=) keeps plain tensors that tf2onnx would make inputs."""
    import keras
    import onnxruntime

    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Normalization(mean=[120.0, 110.0, 100.0], variance=[900.0, 800.0, 700.0])(
        inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(
        keras.layers.Flatten()(x)))
    model.save(tmp_path / "normalized.keras")
    result = runner.invoke(app, ["export", str(tmp_path / "normalized.keras"), "--format", "onnx",
                                 "--out", str(tmp_path / "n.onnx")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    session = onnxruntime.InferenceSession(str(tmp_path / "n.onnx"),
                                           providers=["CPUExecutionProvider"])
    assert len(session.get_inputs()) == 1
    images = np.random.default_rng(0).uniform(0, 255, (5, 6, 6, 3)).astype(np.float32)
    (received,) = session.run(None, {session.get_inputs()[0].name: images})
    assert np.max(np.abs(received - model.predict(images, verbose=0))) <= 1e-4
