"""The figure commands on a real trained run: files written, decodable, titled; bad input exits
2."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cnnviz.cli import app
from cnnviz.errors import CnnvizError
from cnnviz.report.selection import parse_indices

ROOT = Path(__file__).parent.parent
runner = CliRunner()


def _invoke(*args):
    result = runner.invoke(app, [str(arg) for arg in args], catch_exceptions=False)
    return result, [Path(line.removeprefix("wrote ")) for line in result.output.splitlines()
                    if line.startswith("wrote ")]


def _assert_pngs(paths, count):
    assert len(paths) == count
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG"
            pixels = np.asarray(image.convert("L"), dtype=np.float32)
        assert pixels.std() > 5, f"{path} is nearly blank"


@pytest.mark.parametrize("spec,count,expected", [
    ("0,3,7", 10, [0, 3, 7]),
    ("0:4", 10, [0, 1, 2, 3]),
    ("2:9:3", 10, [2, 5, 8]),
    ("-1", 10, [9]),
    ("0:500", 5, [0, 1, 2, 3, 4]),
    ("1, 2,", 5, [1, 2]),
])
def test_image_specs(spec, count, expected):
    assert parse_indices(spec, count) == expected


@pytest.mark.parametrize("spec,message", [
    ("12", "index 12 is outside the test split (0..9)"),
    ("abc", "'abc' is neither an index"),
    ("5:2", "selects no image"),
    ("1:2:3:4", "neither an index"),
])
def test_bad_image_specs(spec, message):
    with pytest.raises(CnnvizError, match=re.escape(message)):
        parse_indices(spec, 10)


@pytest.mark.slow
def test_saliency_all_methods_one_row_per_image(digits_run, tmp_path):
    result, paths = _invoke("saliency", digits_run, "--images", "0:3", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    _assert_pngs(paths, 3)
    assert [path.name for path in paths] == ["test_000_all.png", "test_001_all.png",
                                             "test_002_all.png"]


@pytest.mark.slow
def test_batch_mode_writes_one_figure_per_image_across_chunks(digits_run, tmp_path):
    result, paths = _invoke("saliency", digits_run, "--images", "0:100", "--method", "vanilla",
                            "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert len(paths) == 100 and len(set(paths)) == 100
    assert sorted(tmp_path.glob("*.png")) == sorted(paths)
    assert not list(tmp_path.glob(".*")), "no temporary files left behind"


@pytest.mark.slow
def test_gradcam_names_its_layer_and_draws_guided(digits_run, tmp_path):
    result, paths = _invoke("gradcam", digits_run, "--images", "0,1", "--guided", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "Grad-CAM on layer pool2" in result.output
    _assert_pngs(paths, 2)


@pytest.mark.slow
def test_cam_all_draws_every_variant_in_one_row(digits_run, tmp_path):
    result, paths = _invoke("cam", digits_run, "--images", "0,1", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "CAM on layer pool2" in result.output
    _assert_pngs(paths, 2)
    assert [path.name for path in paths] == ["test_000_all.png", "test_001_all.png"]
    with Image.open(paths[0]) as image:
        width, height = image.size
    assert 1.5 * height < width < 2.5 * height  # input + seven panels in two rows of four


def _saved(paths) -> list[dict]:
    """The --save-arrays file beside each figure, loaded."""
    saved = []
    for path in paths:
        with np.load(path.with_suffix(".npz")) as arrays:
            saved.append({name: arrays[name] for name in arrays.files})
    return saved


def _explain(digits_run, tmp_path, command, *args, images="0,1"):
    """Run a figure command with --save-arrays: (its arrays per image, the run, those images)."""
    from cnnviz.runs.load import load_run

    out = tmp_path / "_".join([command, *(arg.strip("-") for arg in args)])
    result, paths = _invoke(command, digits_run, "--images", images, *args, "--save-arrays",
                            "--out", out)
    assert result.exit_code == 0, result.output
    indices = parse_indices(images, 10_000)
    _assert_pngs(paths, len(indices))
    run = load_run(digits_run)
    return _saved(paths), run, run.dataset().x_test[indices]


def _stack(saved, name):
    return np.stack([arrays[name] for arrays in saved])


@pytest.mark.slow
def test_gradcam_layer_option_gives_that_layers_gradcam(digits_run, tmp_path):
    from cnnviz.explain import gradcam

    default, run, x = _explain(digits_run, tmp_path, "gradcam")
    conv1, _, _ = _explain(digits_run, tmp_path, "gradcam", "--layer", "conv1", "--guided")
    predicted = run.model.predict(x, verbose=0)
    np.testing.assert_array_equal(_stack(default, "target"), predicted.argmax(axis=1))
    np.testing.assert_allclose(_stack(default, "probabilities"), predicted, atol=1e-6)
    np.testing.assert_allclose(_stack(default, "gradcam"), gradcam(run.model, x, layer="pool2"),
                               atol=1e-6)
    np.testing.assert_allclose(_stack(conv1, "gradcam"), gradcam(run.model, x, layer="conv1"),
                               atol=1e-6)
    np.testing.assert_allclose(_stack(conv1, "guided_gradcam"),
                               gradcam(run.model, x, layer="conv1", guided=True), atol=1e-6)
    assert "guided_gradcam" not in default[0]
    assert np.abs(_stack(conv1, "gradcam") - _stack(default, "gradcam")).max() > 0.1


@pytest.mark.slow
def test_cam_method_layer_and_target_options_reach_the_maps(digits_run, tmp_path):
    from cnnviz.explain import cam

    saved, run, x = _explain(digits_run, tmp_path, "cam", "--method", "scorecam", "--layer",
                             "conv1", "--target", "3")
    assert set(saved[0]) == {"scorecam", "target", "probabilities"}
    np.testing.assert_array_equal(_stack(saved, "target"), [3, 3])
    np.testing.assert_allclose(_stack(saved, "scorecam"),
                               cam(run.model, x, 3, method="scorecam", layer="conv1"), atol=1e-5)
    everything, _, _ = _explain(digits_run, tmp_path, "cam", images="0")
    from cnnviz.explain import CAM_METHODS

    for method in CAM_METHODS:
        np.testing.assert_allclose(everything[0][method],
                                   cam(run.model, x[:1], method=method, layer="pool2")[0],
                                   atol=1e-5, err_msg=method)


@pytest.mark.slow
def test_integrated_gradients_steps_and_baseline_options(digits_run, tmp_path):
    from cnnviz.explain import integrated_gradients

    runs = {(steps, baseline): _explain(digits_run, tmp_path, "integrated-gradients", "--steps",
                                        str(steps), "--baseline", baseline)
            for steps, baseline in ((4, "0"), (64, "0"), (16, "blur"), (16, "40"))}
    model, x = runs[4, "0"][1].model, runs[4, "0"][2]
    maps = {key: _stack(saved, "integrated_gradients") for key, (saved, _, _) in runs.items()}
    for (steps, baseline), attributions in maps.items():
        start = baseline if baseline == "blur" else float(baseline)
        assert attributions.shape == x.shape
        np.testing.assert_allclose(
            attributions, integrated_gradients(model, x, baseline=start, steps=steps),
            rtol=1e-4, atol=1e-6, err_msg=f"{steps} steps from {baseline}")
    scale = np.abs(maps[64, "0"]).max()
    assert np.abs(maps[4, "0"] - maps[64, "0"]).max() > 1e-3 * scale, "--steps is used"
    assert np.abs(maps[16, "blur"] - maps[16, "40"]).max() > 1e-2 * scale, "--baseline is used"


@pytest.mark.slow
def test_gradient_x_input_saves_the_gradient_times_the_input(digits_run, tmp_path):
    from cnnviz.explain import gradient_x_input

    saved, run, x = _explain(digits_run, tmp_path, "gradient-x-input", "--target", "5")
    np.testing.assert_allclose(_stack(saved, "gradient_x_input"),
                               gradient_x_input(run.model, x, 5), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_saliency_options_reach_the_maps(digits_run, tmp_path):
    from cnnviz.explain import saliency

    saved, run, x = _explain(digits_run, tmp_path, "saliency", "--method", "smoothgrad",
                             "--samples", "5", "--noise", "0.4", "--seed", "3")
    np.testing.assert_allclose(
        _stack(saved, "smoothgrad"),
        saliency(run.model, x, method="smoothgrad", samples=5, noise=0.4, seed=3), atol=1e-6)
    other = saliency(run.model, x, method="smoothgrad", samples=5, noise=0.4, seed=4)
    assert np.abs(_stack(saved, "smoothgrad") - other).max() > 1e-4, "--seed is used"


@pytest.mark.slow
def test_rise_options_reach_the_map(digits_run, tmp_path):
    from cnnviz.explain import rise

    saved, run, x = _explain(digits_run, tmp_path, "rise", "--masks", "200", "--cell", "4",
                             "--keep", "0.3", "--seed", "2")
    np.testing.assert_allclose(_stack(saved, "rise"),
                               rise(run.model, x, masks=200, cell=4, keep=0.3, seed=2),
                               atol=1e-6)
    assert np.abs(_stack(saved, "rise") - rise(run.model, x, masks=200, cell=4, keep=0.3,
                                                seed=3)).max() > 1e-4, "--seed is used"


@pytest.mark.slow
def test_occlusion_patch_stride_and_fill_options(digits_run, tmp_path):
    from cnnviz.explain import occlusion

    saved, run, x = _explain(digits_run, tmp_path, "occlusion", "--patch", "3", "--stride", "2",
                             "--fill", "1")
    expected = occlusion(run.model, x, patch=3, stride=2, fill=1.0)
    np.testing.assert_allclose(_stack(saved, "probability"), expected.probability, atol=1e-6)
    np.testing.assert_array_equal(_stack(saved, "predicted_class"), expected.predicted_class)
    np.testing.assert_allclose(_stack(saved, "unoccluded_probability"),
                               expected.unoccluded_probability, atol=1e-6)
    black = occlusion(run.model, x, patch=3, stride=2, fill=0.0).probability
    assert np.abs(_stack(saved, "probability") - black).max() > 1e-3, "--fill is used"


@pytest.mark.slow
def test_without_save_arrays_no_arrays_are_written(digits_run, tmp_path):
    result, paths = _invoke("gradient-x-input", digits_run, "--images", "0", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    _assert_pngs(paths, 1)
    assert paths[0].name == "test_000_gradient_x_input.png"
    assert not list(tmp_path.glob("*.npz"))


@pytest.mark.slow
def test_signed_maps_use_a_diverging_map_centred_on_zero(digits_run, tmp_path):
    """The IG panel's colour bar runs from -m to +m: white is exactly 0."""
    from cnnviz.explain import integrated_gradients
    from cnnviz.plot import signed_row
    from cnnviz.runs.load import load_run

    run = load_run(digits_run)
    image = run.dataset().x_test[:1]
    attributions = integrated_gradients(run.model, image)[0]
    figure = signed_row(image[0], {"integrated gradients": attributions})
    drawn = figure.axes[1].get_images()[0]
    low, high = drawn.get_clim()
    assert drawn.get_cmap().name == "RdBu_r"
    assert low == -high and high == pytest.approx(np.abs(attributions.sum(axis=-1)).max())
    assert attributions.min() < 0 < attributions.max()


@pytest.mark.slow
@pytest.mark.parametrize("command,args,count", [
    ("feature-maps", ["--images", "0"], 2),  # conv1 and conv2
    ("filters", [], 2),
    ("activation-max", ["--steps", "32"], 1),
    ("activation-max", ["--layer", "conv2", "--filters", "0:4", "--steps", "16"], 1),
])
def test_each_figure_command_writes_pngs(digits_run, tmp_path, command, args, count):
    result, paths = _invoke(command, digits_run, *args, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    _assert_pngs(paths, count)


@pytest.mark.slow
def test_default_folder_is_inside_the_run(digits_run):
    result, paths = _invoke("filters", digits_run, "--layer", "conv1")
    assert result.exit_code == 0, result.output
    assert paths == [digits_run / "figures" / "filters" / "conv1.png"]


@pytest.mark.slow
def test_image_files_are_preprocessed_like_the_training_data(digits_run, tmp_path):
    """A test image saved as an 8-bit PNG and read back is the same model input (8-bit units,
    DECISIONS D1): the model's own Rescaling layer does the rest."""
    from cnnviz.report.selection import select_images
    from cnnviz.runs.load import load_run

    run = load_run(digits_run)
    test_images = run.dataset().x_test[:4]
    for index, image in enumerate(test_images):
        Image.fromarray(np.round(image[..., 0]).astype(np.uint8)).save(tmp_path / f"d{index}.png")
    spec = ",".join(str(tmp_path / f"d{index}.png") for index in range(4))
    from_files = select_images(run, spec)
    assert from_files.names == ["d0", "d1", "d2", "d3"]
    np.testing.assert_allclose(np.asarray(from_files.images), test_images, atol=0.5)
    result, paths = _invoke("saliency", digits_run, "--images", spec, "--method", "guided",
                            "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    _assert_pngs(paths, 4)


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["saliency", "{run}", "--images", "9999"], "outside the test split"),
    (["gradcam", "{run}", "--layer", "conv9"], "no layer named 'conv9'"),
    (["gradcam", "{run}", "--layer", "flatten"], "flatten"),
    (["saliency", "{run}", "--target", "12"], "--target 12 is not a class"),
    (["filters", "{run}", "--layer", "dense"], "Layers with kernels: conv1, conv2"),
    (["cam", "{run}", "--method", "gradcam+"], "'gradcam+' is not one of"),
    (["cam", "{run}", "--layer", "dense"], "4-D layers: conv1, pool1, conv2, pool2"),
    (["integrated-gradients", "{run}", "--baseline", "grey"], "--baseline 'grey' is neither"),
    (["rise", "{run}", "--cell", "9"], "cell=9 grid cells do not fit in 8 x 8 images"),
    (["saliency", "{run}", "--images", "missing.png"], "missing.png does not exist"),
])
def test_bad_figure_requests_exit_2_with_one_line(digits_run, args, message):
    result = runner.invoke(app, [arg.format(run=digits_run) for arg in args],
                           catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_run_trains_and_writes_every_figure_and_an_index(tmp_path):
    """The toy model: a sigmoid output, 4x4 images, two examples — every figure still works."""
    # 30 of its 200 epochs (one step each) already separate the two examples (loss ~0.002).
    result = runner.invoke(app, ["run", str(ROOT / "configs" / "toy4x4.yaml"), "--out",
                                 str(tmp_path), "--set", "train.epochs=30", "--set",
                                 "train.explain.every=10", "--set", "train.tensorboard=true"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_dir = next((tmp_path / "toy4x4").iterdir())
    index = (run_dir / "index.html").read_text()
    # train.explain: the evolution figures get their own section; TensorBoard gets each map
    # (one tag per method and image) at each explained epoch.
    assert "How the explanations changed during training" in index
    assert "figures/epochs/gradcam/evolution.png" in index
    import tensorflow as tf

    steps = {}
    for events in (run_dir / "tensorboard" / "explain").glob("events.out.tfevents.*"):
        for record in tf.data.TFRecordDataset(str(events)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    assert steps == {f"{method}/image_{index:02d}": [10, 20, 30]
                     for method in ("gradcam", "saliency") for index in range(2)}
    sources = re.findall(r"<img src='([^']+)'", index)
    assert len(sources) >= 10
    for source in sources:
        assert (run_dir / source).is_file(), source
    for folder in ("saliency", "gradcam", "cam", "signed", "rise", "occlusion", "activation-max",
                   "filters", "feature-maps", "exemplars"):
        assert any(source.startswith(f"figures/{folder}/") for source in sources), folder
    assert "true positive" in index and "predicted" in index


@pytest.mark.slow  # trains (the session run) and starts the drawing processes
def test_figures_drawn_in_the_drawing_processes_equal_those_drawn_here(digits_run, tmp_path):
    from cnnviz.report.batching import drawing_in_background
    from cnnviz.report.figures import cam_figures, saliency_figures
    from cnnviz.report.selection import select_images
    from cnnviz.runs.load import load_run

    run = load_run(digits_run)
    selection = select_images(run, "0:3")

    def write(folder):
        return (saliency_figures(run.model, selection, folder / "s", methods=("vanilla",))
                + cam_figures(run.model, selection, folder / "c", methods=("gradcam",)))

    here = write(tmp_path / "here")
    with drawing_in_background():
        elsewhere = write(tmp_path / "elsewhere")
    assert [f.caption for f in elsewhere] == [f.caption for f in here]
    assert len(here) == 6
    for mine, theirs in zip(here, elsewhere, strict=True):
        assert theirs.path.read_bytes() == mine.path.read_bytes(), theirs.path.name
        with Image.open(theirs.path) as image:
            assert image.format == "PNG"
