"""Without TensorFlow installed (a machine with only JAX or PyTorch): every explain command,
layers, summary, verify and predict run on a .keras file and image files; training and export
say in one line that they need TensorFlow. Each installed backend runs the commands in a
process of its own whose sitecustomize hides TensorFlow (tests/no_tensorflow/), as if it were
not installed: `import tensorflow` fails and `importlib.util.find_spec` finds nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HERE = Path(__file__).resolve().parent
# Each explain command and the folder its --out names (tests/_without_tensorflow.py).
EXPLAINED = {"saliency": "s", "gradcam": "g", "cam": "c", "integrated-gradients": "ig",
             "rise": "r", "occlusion": "o", "feature-maps": "f", "filters": "k",
             "activation-max": "a"}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    import keras

    folder = tmp_path_factory.mktemp("without-tensorflow")
    keras.utils.set_random_seed(0)
    keras.Sequential([
        keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3, activation="relu", name="conv1"),
        keras.layers.MaxPooling2D(), keras.layers.Conv2D(4, 3, activation="relu", name="conv2"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax"),
    ]).save(folder / "model.keras")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "b.jpg")
    (folder / "config.yaml").write_text((HERE.parent / "configs" / "digits.yaml").read_text())
    return folder


@pytest.mark.slow  # one process per backend
@pytest.mark.parametrize("name", ["jax", "torch"])
def test_commands_run_without_tensorflow(model_folder, name, tmp_path):
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (install.sh installs its CPU wheel)")
    # A folder of this backend's own: what one backend wrote cannot pass for the other's.
    model_folder = Path(shutil.copytree(model_folder, tmp_path / "work"))
    environment = {**os.environ, "KERAS_BACKEND": name, "PYTHONPATH": os.pathsep.join(
        [str(HERE / "no_tensorflow"), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    finished = subprocess.run(
        [sys.executable, str(HERE / "_without_tensorflow.py"), str(model_folder),
         str(tmp_path / "result.json")], env=environment, capture_output=True, text=True,
        timeout=600, check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["backend"] == name and not result["tensorflow_imported"]
    commands = result["commands"]
    failed = {command: outcome["output"] for command, outcome in commands.items()
              if command not in ("train", "export") and outcome["exit_code"] != 0}
    assert not failed, failed
    for command, out in EXPLAINED.items():
        assert list((model_folder / "out" / out).rglob("*.png")), command
    for picture in (model_folder / "out").rglob("*.png"):
        with Image.open(picture) as image:
            image.verify()
    assert "OK: all" in commands["verify"]["output"]
    rows = (model_folder / "out" / "p.csv").read_text().splitlines()
    assert rows[0].startswith("file,predicted,probability") and len(rows) == 3
    assert "conv2" in commands["layers"]["output"]
    assert (model_folder / "out" / "summary" / "summary.txt").is_file()
    for command in ("train", "export"):
        outcome = commands[command]
        assert outcome["exit_code"] == 2 and not outcome["traceback"], outcome
        lines = [line for line in outcome["output"].splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "needs TensorFlow" in lines[0], outcome["output"]
