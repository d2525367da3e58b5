"""Training on JAX and PyTorch, per backend in processes of their own: a small digits model at
8x8 (epochs of a fraction of a second) with a learning-rate schedule, class weights, dropout and
augmentation, trained uninterrupted, and again SIGKILLed at an epoch's end and resumed, which
ends with the uninterrupted run's history.csv byte for byte; tf.distribute on another backend
is one line and exit 2. Test accuracy against TensorFlow's on configs/digits.yaml is
bench/backends.py's (three full trainings: too slow for the suite)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from _models import tiny_digits_config

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # trains in processes of their own
BACKENDS = ("jax", "torch")
EPOCHS = 5
CONFIG = tiny_digits_config(
    "backend-training", seed=3, epochs=EPOCHS, dropout=0.3, checkpoint_interval=0, verbose=0,
    class_weight="balanced",
    optimizer={"name": "adam", "learning_rate": 0.01, "schedule": {"type": "cosine"}})
# Augmentation draws from generators of its own, which a resumed run must restore too.
CONFIG["data"]["augment"] = [{"type": "random_contrast", "factor": 0.1},
                             {"type": "random_rotation", "factor": 0.02}]


def _cnnviz(backend: str, *args, kill_at: str | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    environment.pop("KERAS_BACKEND", None)  # --backend chooses
    if kill_at:
        environment["CNNVIZ_TEST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "cnnviz.cli", "--backend", backend, *args],
                          capture_output=True, text=True, timeout=400, env=environment,
                          check=False)


def _chain(backend: str, config_file: Path, folder: Path) -> dict:
    """tf.distribute refused; the uninterrupted run; the killed-and-resumed one."""
    refused = _cnnviz(backend, "train", str(config_file), "--out", str(folder / "refused"),
                      "--set", "train.distribute=mirrored")
    whole = _cnnviz(backend, "train", str(config_file), "--out", str(folder / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = _cnnviz(backend, "train", str(config_file), "--out", str(folder / "resumed"),
                     kill_at="epoch:end#3")
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _cnnviz(backend, "train", str(config_file), "--out", str(folder / "resumed"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming" in resumed.stdout
    (whole_run,) = (folder / "whole" / "backend-training").iterdir()
    (resumed_run,) = (folder / "resumed" / "backend-training").iterdir()
    return {"refused": refused, "refused_out": folder / "refused", "whole": whole_run,
            "resumed": resumed_run}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    installed = [name for name in BACKENDS if importlib.util.find_spec(name) is not None]
    folder = tmp_path_factory.mktemp("backend-training")
    config_file = folder / "config.yaml"
    config_file.write_text(yaml.safe_dump(CONFIG))
    with ThreadPoolExecutor(len(installed) or 1) as pool:  # the backends side by side
        chains = {name: pool.submit(_chain, name, config_file, folder / name)
                  for name in installed}
        return {name: chain.result() for name, chain in chains.items()}


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_runs_and_records_its_backend(runs, backend):
    if backend not in runs:
        pytest.skip(f"{backend} is not installed (install.sh installs its CPU wheel)")
    metrics = _metrics(runs[backend]["whole"])
    assert metrics["backend"] == backend and metrics["epochs"] == EPOCHS
    assert metrics["test_accuracy"] > 0.5  # 10 classes: chance is 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_killed_run_resumes_to_the_uninterrupted_history(runs, backend):
    if backend not in runs:
        pytest.skip(f"{backend} is not installed (install.sh installs its CPU wheel)")
    whole, resumed = runs[backend]["whole"], runs[backend]["resumed"]
    assert _metrics(resumed)["resumed_from_epoch"] >= 2
    assert (resumed / "history.csv").read_bytes() == (whole / "history.csv").read_bytes()
    assert _metrics(resumed)["test_loss"] == _metrics(whole)["test_loss"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_tf_distribute_on_another_backend_is_one_line(runs, backend):
    if backend not in runs:
        pytest.skip(f"{backend} is not installed")
    result = runs[backend]["refused"]
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.distribute" in lines[0] and backend in lines[0], lines
    assert "Traceback" not in result.stderr
    assert not list(runs[backend]["refused_out"].rglob("metrics.json"))
