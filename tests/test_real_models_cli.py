"""The commands on .keras files as users bring them: nested backbones, several outputs or
inputs, logits; `cnnviz layers`; `summary` when Graphviz fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from _models import randomize
from PIL import Image
from typer.testing import CliRunner

from cnnviz.cli import app

ROOT = Path(__file__).parent.parent
runner = CliRunner()
pytestmark = pytest.mark.slow


def _nested(last=None):
    """A fine-tuned-style model on 16x16 RGB: x = base(inputs); pool; Dense(3) logits."""
    base_in = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(base_in)
    x = keras.layers.ReLU(6.0, name="relu6")(x)
    x = keras.layers.Conv2D(5, 3, activation="relu", name="conv2")(x)
    base = keras.Model(base_in, x, name="base")
    inputs = keras.Input((16, 16, 3))
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(base(inputs))
    return randomize(keras.Model(inputs, keras.layers.Dense(3, activation=last, name="head")(
        pooled), name="finetuned"), 0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    _nested().save(folder / "nested.keras")
    inputs = keras.Input((16, 16, 3))
    features = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, name="c")(inputs))
    heads = keras.Model(inputs, [
        keras.layers.Dense(3, activation="softmax", name="digits")(features),
        keras.layers.Dense(2, activation="softmax", name="parity")(features)])
    randomize(heads, 1).save(folder / "heads.keras")
    meta = keras.Input((2,), name="meta")
    two = keras.Model([inputs, meta], keras.layers.Dense(2)(keras.layers.Concatenate()(
        [features, meta])))
    two.save(folder / "two_inputs.keras")
    rng = np.random.default_rng(2)
    pictures = []
    for index, size in enumerate([(20, 30), (16, 16)]):
        path = folder / f"photo{index}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        pictures.append(str(path))
    return folder, ",".join(pictures)


def _invoke(*args):
    result = runner.invoke(app, [str(arg) for arg in args], catch_exceptions=False)
    written = [Path(line.removeprefix("wrote ")) for line in result.output.splitlines()
               if line.startswith("wrote ")]
    return result, written


def test_layers_lists_paths_inside_the_backbone(files):
    folder, _ = files
    result, _ = _invoke("layers", folder / "nested.keras")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[3:]}
    assert "base/conv2" in lines and "gradcam, feature-maps, filters" in lines["base/conv2"]
    assert "(None, 12, 12, 5)" in lines["base/conv2"]


def test_explain_commands_reach_into_the_nested_backbone(files, tmp_path):
    folder, pictures = files
    model = folder / "nested.keras"
    result, written = _invoke("gradcam", model, "--images", pictures, "--resize", "crop",
                              "--out", tmp_path / "g")
    assert result.exit_code == 0, result.output
    assert "Grad-CAM on layer base/conv2" in result.output and len(written) == 2
    assert "note: --preprocess auto" in result.output  # one line: it divided by 255
    result, written = _invoke("gradcam", model, "--images", pictures, "--layer", "relu6",
                              "--preprocess", "unit", "--out", tmp_path / "g2")
    assert result.exit_code == 0 and "note:" not in result.output, result.output
    result, written = _invoke("feature-maps", model, "--images", pictures, "--max-channels", "2",
                              "--out", tmp_path / "f")
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in written) == [
        "photo0_base__conv.png", "photo0_base__conv2.png", "photo1_base__conv.png",
        "photo1_base__conv2.png"]
    result, written = _invoke("filters", model, "--out", tmp_path / "k")
    assert [path.name for path in written] == ["base__conv.png", "base__conv2.png"]
    result, written = _invoke("activation-max", model, "--images", pictures, "--steps", "4",
                              "--out", tmp_path / "a")
    assert result.exit_code == 0 and "activation maximization of the predicted classes [" in (
        result.output), result.output
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG"


def test_multi_output_needs_output_and_multi_input_is_refused(files, tmp_path):
    folder, pictures = files
    for command in ("saliency", "gradcam", "occlusion", "feature-maps", "activation-max"):
        result, _ = _invoke(command, folder / "heads.keras", "--images", pictures)
        assert result.exit_code == 2, (command, result.output)
        assert result.output.count("\n") == 1 and "2 outputs: 0 'digits'" in result.output
    result, written = _invoke("occlusion", folder / "heads.keras", "--images", pictures,
                              "--output", "parity", "--patch", "8", "--out", tmp_path)
    assert result.exit_code == 0 and len(written) == 2, result.output
    result, _ = _invoke("gradcam", folder / "two_inputs.keras", "--images", pictures)
    assert result.exit_code == 2 and "2 inputs" in result.output and "'meta'" in result.output


def test_captions_say_what_the_percentages_are(files, tmp_path):
    from cnnviz.report.figures import saliency_figures
    from cnnviz.report.selection import select_images
    from cnnviz.runs.load import load_run

    folder, pictures = files
    run = load_run(folder / "nested.keras")
    selection = select_images(run, pictures)
    figures = saliency_figures(run.model, selection, tmp_path, methods=("vanilla",))
    assert all("softmax of the logits" in figure.caption for figure in figures)
    heads = load_run(folder / "heads.keras")
    selection = select_images(heads, pictures, output="parity")
    figures = saliency_figures(heads.model, selection, tmp_path, methods=("vanilla",),
                               output="parity")
    assert all("softmax probability" in figure.caption for figure in figures)


def test_preprocess_is_refused_for_a_run_directory(digits_run):
    result, _ = _invoke("saliency", digits_run, "--images", "0", "--preprocess", "unit")
    assert result.exit_code == 2 and "is for bare .keras files" in result.output


# ------------------------------------------------------------------------------- summary
def _cnnviz(*args, path_prefix):
    environment = {**os.environ, "PYTHONPATH": str(ROOT),
                   "PATH": f"{path_prefix}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "cnnviz.cli", *map(str, args)], check=False,
                          capture_output=True, text=True, env=environment, timeout=300)


FAKE_DOT = """#!/bin/sh
# Graphviz 2.43 aborts in maze.c while routing orthogonal edges; this one does it every time
# (or, with ALWAYS, whatever the layout).
for last; do :; done
if [ -n "{always}" ] || grep -q ortho "$last"; then
  echo "dot: maze.c:311: chkSgraph: Assertion failed." >&2
  kill -ABRT $$
fi
exec {dot} "$@"
"""


@pytest.mark.parametrize("always", [False, True], ids=["ortho-crash", "always-crash"])
def test_summary_survives_graphviz_crashes(files, tmp_path, always):
    import shutil

    folder, _ = files
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    dot = bin_dir / "dot"
    dot.write_text(FAKE_DOT.format(always="yes" if always else "", dot=shutil.which("dot")))
    dot.chmod(0o755)
    result = _cnnviz("summary", folder / "nested.keras", "--out", tmp_path / "s",
                     path_prefix=bin_dir)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "s" / "summary.txt").read_text()
    assert "relu6" in text and "conv2" in text  # the backbone's own layers are listed
    diagram = tmp_path / "s" / "architecture.png"
    if always:
        assert not diagram.exists()
        warning = [line for line in result.stderr.splitlines() if "Graphviz" in line]
        assert len(warning) == 1 and warning[0].startswith("warning:")
    else:
        with Image.open(diagram) as image:
            assert image.format == "PNG"
