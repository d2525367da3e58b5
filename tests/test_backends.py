"""The same maps on every Keras backend: each method's map from JAX and from PyTorch equals the
TensorFlow map of the same .keras weights; and the backend choice (`--backend`, select)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _backend_maps import SHAPE, agreement, all_maps, build_model
from _models import images

from cnnviz import backend
from cnnviz.errors import CnnvizError

HERE = Path(__file__).resolve().parent
OTHER_BACKENDS = ("jax", "torch")


@pytest.fixture(scope="module")
def maps_by_backend(tmp_path_factory):
    """{backend: {method: map}}: TensorFlow's in this process, the others' from one process
    each, run side by side on the same model file and images."""
    import importlib.util

    if backend.current() != "tensorflow":
        pytest.skip("the reference maps are TensorFlow's; this suite runs on "
                    f"{backend.current()}")
    folder = tmp_path_factory.mktemp("backends")
    model, batch = build_model(), images(3, SHAPE, seed=7)
    model.save(folder / "model.keras")
    np.savez(folder / "inputs.npz", images=batch)
    installed = [name for name in OTHER_BACKENDS if importlib.util.find_spec(name) is not None]
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
                   "PYTHONPATH": os.pathsep.join([str(HERE.parent),
                                                  os.environ.get("PYTHONPATH", "")])}
    processes = {
        name: subprocess.Popen(
            [sys.executable, str(HERE / "_backend_maps.py"), str(folder / "model.keras"),
             str(folder / "inputs.npz"), str(folder / f"{name}.npz")],
            env={**environment, "KERAS_BACKEND": name}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        for name in installed
    }
    result = {"tensorflow": all_maps(model, batch)}
    for name, process in processes.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}:\n{output[-3000:]}"
        with np.load(folder / f"{name}.npz") as saved:
            assert str(saved["backend"]) == name
            result[name] = {key: saved[key] for key in saved.files if key != "backend"}
    return result


@pytest.mark.slow  # starts one process per backend
@pytest.mark.parametrize("other", OTHER_BACKENDS)
def test_every_map_equals_tensorflows(maps_by_backend, other):
    if other not in maps_by_backend:
        pytest.skip(f"{other} is not installed (install.sh installs its CPU wheel)")
    reference, maps = maps_by_backend["tensorflow"], maps_by_backend[other]
    assert sorted(maps) == sorted(reference)
    differing = []
    for method, expected in reference.items():
        assert maps[method].shape == expected.shape, method
        correlation, relative = agreement(expected, maps[method])
        if not (correlation >= 0.9999 or relative <= 1e-4):
            differing.append(f"{method}: corr {correlation:.6f}, max|diff|/range {relative:.2e}")
    assert not differing, f"{other} differs from tensorflow:\n" + "\n".join(differing)


@pytest.mark.slow  # uses the processes' maps
def test_the_model_exercises_what_differs(maps_by_backend):
    # Guided backprop must meet ReLU6's cap and a ReLU's off zone, or it equals vanilla here.
    reference = maps_by_backend["tensorflow"]
    assert not np.allclose(reference["saliency/guided"], reference["saliency/vanilla"])
    assert reference["gradcam/base/conv_a"].max() > 0


def test_select_refuses_another_backend_once_keras_is_imported():
    import keras  # noqa: F401 - imported, as in every command that has computed something

    other = next(name for name in backend.BACKENDS if name != backend.current())
    with pytest.raises(CnnvizError, match=f"already imported on the {backend.current()}"):
        backend.select(other)
    backend.select(backend.current())  # the one it runs on is fine


def test_select_names_the_choices_and_the_missing_package(monkeypatch):
    import importlib.util

    with pytest.raises(CnnvizError, match="choose one of tensorflow, jax, torch"):
        backend.select("theano")
    monkeypatch.delitem(sys.modules, "keras")  # as before Keras is imported
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CnnvizError, match=r"needs the jax package.*pip install 'jax\[cpu\]'"):
        backend.select("jax")
    assert "KERAS_BACKEND" not in os.environ


def test_select_sets_keras_backend_before_keras_is_imported(monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "keras")
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert backend.configured() == "tensorflow"
    (tmp_path / "keras.json").write_text('{"backend": "torch"}')
    assert backend.configured() == "torch"
    backend.select("tensorflow")
    assert os.environ["KERAS_BACKEND"] == "tensorflow" == backend.configured()


def test_backend_option_error_is_one_line_exit_2():
    from typer.testing import CliRunner

    from cnnviz.cli import app

    other = next(name for name in backend.BACKENDS if name != backend.current())
    result = CliRunner().invoke(app, ["--backend", other, "layers", "nothing.keras"])
    assert result.exit_code == 2
    expected = (f"error: Keras was already imported on the {backend.current()} backend; the "
                f"backend ({other}) must be chosen before Keras is imported (KERAS_BACKEND or "
                "--backend)")
    assert result.output.strip().splitlines() == [expected]
