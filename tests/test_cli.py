"""The CLI: exit codes, one-line errors without tracebacks, summary files, a lazy --help."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from cnnviz.cli import app

ROOT = Path(__file__).parent.parent
runner = CliRunner()


def _cnnviz(*args, env=None, cwd=None):
    """Run the real command in a fresh process (what a user's shell does)."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "cnnviz.cli", *map(str, args)], check=False,
                          capture_output=True, text=True, env=environment, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_help_does_not_import_tensorflow():
    code = ("import sys\nfrom cnnviz.cli import app\ntry:\n    app(['--help'])\n"
            "except SystemExit:\n    pass\nprint('TF-LOADED' if 'tensorflow' in sys.modules "
            "or 'keras' in sys.modules else 'TF-NOT-LOADED')")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "TF-NOT-LOADED" in result.stdout, result.stdout + result.stderr
    assert "train" in result.stdout and "summary" in result.stdout


def test_no_arguments_shows_help():
    result = runner.invoke(app, [])
    assert "Usage" in result.output


def test_config_show_prints_every_default():
    result = runner.invoke(app, ["config", "show", str(ROOT / "configs" / "toy4x4.yaml")])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["name"] == "toy4x4"
    assert shown["train"]["device"] == "auto"
    assert (shown["model"]["layers"][0]["stride"] == 1
            and shown["model"]["layers"][0]["padding"] == "valid")


def test_config_show_applies_overrides():
    result = runner.invoke(app, ["config", "show", str(ROOT / "configs" / "digits.yaml"),
                                 "--set", "train.epochs=3"])
    assert yaml.safe_load(result.output)["train"]["epochs"] == 3


BAD_CALLS = [
    (["train", "missing.yaml"], "config file not found: missing.yaml"),
    (["train", "configs/digits.yaml", "--set", "train.epocs=3"], "unknown key 'train.epocs'"),
    (["train", "configs/digits.yaml", "--set", "model.layers.0.filters=-1"],
     "model.layers.0.filters"),
    (["config", "show", "configs/digits.yaml", "--set", "nonsense"], "KEY=VALUE"),
    (["summary", "outputs/no-such-run"], "does not exist"),
]


@pytest.mark.parametrize("args,message", BAD_CALLS, ids=[" ".join(call[0]) for call in BAD_CALLS])
def test_bad_input_exits_2_with_one_line_and_no_traceback(args, message):
    result = runner.invoke(app, args, catch_exceptions=False)
    output = result.output  # stdout and stderr together
    assert result.exit_code == 2, output
    assert message in output
    assert "Traceback" not in output
    error_lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1


@pytest.mark.slow
def test_real_process_bad_config_prints_only_the_error(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  layers:\n    - {type: conv2d, filters: 0}\n"
                      "    - {type: flatten}\n")
    result = _cnnviz("train", config)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: {config}: model.layers.0.filters: Input should be greater than 0 (received 0)"]


@pytest.mark.slow
def test_summary_on_a_config_writes_text_and_diagram(tmp_path):
    result = _cnnviz("summary", ROOT / "configs" / "mnist.yaml", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "summary.txt").read_text()
    for count in ("320", "18,496", "1,179,776", "1,290", "1,199,882"):
        assert count in text and count in result.stdout
    assert "preds (Dense)" in text
    with Image.open(tmp_path / "architecture.png") as image:
        assert image.format == "PNG" and image.height > 600, "eight layers drawn top to bottom"
    assert result.stderr == "", "the terminal stays clean of TensorFlow's start-up lines"


@pytest.mark.slow
def test_summary_without_graphviz_says_how_to_install_it(tmp_path):
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    result = _cnnviz("summary", ROOT / "configs" / "toy4x4.yaml", "--out", tmp_path / "s",
                     env={"PATH": str(empty_path)})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "s" / "summary.txt").is_file()
    assert not (tmp_path / "s" / "architecture.png").exists()
    hint = [line for line in result.stderr.splitlines() if "Graphviz" in line]
    assert len(hint) == 1 and "apt-get install graphviz" in hint[0]


@pytest.mark.slow
def test_train_then_summary_on_the_run(tmp_path):
    # 30 of its 200 epochs (one step each) already separate the two examples (loss ~0.002).
    result = _cnnviz("train", ROOT / "configs" / "toy4x4.yaml", "--out", tmp_path,
                     "--set", "train.epochs=30")
    assert result.returncode == 0, result.stderr
    assert "test accuracy 1.0000" in result.stdout, "two examples are easy to separate"
    run_dir = next((tmp_path / "toy4x4").iterdir())
    summary = _cnnviz("summary", run_dir)
    assert summary.returncode == 0, summary.stderr
    assert "Total params: 12" in summary.stdout
    assert (run_dir / "summary.txt").is_file() and (run_dir / "architecture.png").is_file()


def test_the_cli_offers_exactly_the_library_choices():
    # The Typer enums are spelled out so `--help` imports no library code; they must not drift.
    from cnnviz.cli._options import Preprocess, Resize
    from cnnviz.cli.deploy import ExportFormatChoice, Quantize
    from cnnviz.cli.explain import CamMethod, Parameterization, SaliencyMethod
    from cnnviz.cli.trust import Baseline
    from cnnviz.data.images import RESIZE_MODES
    from cnnviz.deploy.export import FORMATS
    from cnnviz.explain import CAM_METHODS, SALIENCY_METHODS
    from cnnviz.explain.parameterization import PARAMETERIZATIONS
    from cnnviz.model.inputs import MODES
    from cnnviz.trust.faithfulness import BASELINES

    def values(enum):
        return tuple(member.value for member in enum)

    assert values(SaliencyMethod) == (*SALIENCY_METHODS, "all")
    assert values(CamMethod) == (*CAM_METHODS, "all")
    assert values(Parameterization) == ("auto", *PARAMETERIZATIONS)
    assert values(Preprocess) == MODES
    assert values(Resize) == RESIZE_MODES
    assert values(ExportFormatChoice) == tuple(name for name in FORMATS
                                               if not FORMATS[name].quantize)
    assert values(Quantize) == tuple(FORMATS[name].quantize for name in FORMATS
                                     if FORMATS[name].quantize)
    assert values(Baseline) == BASELINES
