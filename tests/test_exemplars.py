"""Exemplars: the streamed top-k equals a brute-force ranking of every image and position; the
receptive field equals the input pixels whose perturbation changes the unit; the CLI's PNG and
JSON hold those numbers."""

import json

import numpy as np
import pytest
from _models import randomize
from PIL import Image
from typer.testing import CliRunner

from cnnviz.errors import CnnvizError


def _layered_net(seed: int = 3):
    """(9, 9, 2) -> Conv2D(4, 3, same, relu) -> MaxPool 2 -> Conv2D(3, 2) -> GAP -> Dense(3)."""
    import keras

    inputs = keras.Input((9, 9, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inputs)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Conv2D(3, 2, name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(x)
    return randomize(keras.Model(inputs, outputs), seed)


def _images(count: int = 50, seed: int = 0) -> np.ndarray:
    images = np.random.default_rng(seed).uniform(0, 1, (count, 9, 9, 2)).astype(np.float32)
    images[30] = images[3]  # a tie between images: the earlier one ranks first
    images[41] = 0.0  # relu: many equal positions in one image: the first one is taken
    return images


def _brute_top(values: np.ndarray, top: int) -> np.ndarray:
    """Image indices by decreasing value, ties to the earlier image."""
    return np.lexsort((np.arange(len(values)), -values))[:top]


@pytest.mark.parametrize("layer", ["c1", "c2"])
def test_exemplars_equal_a_brute_force_top_k_over_images_and_positions(layer):
    import keras

    from cnnviz.explain.exemplars import unit_exemplars
    from cnnviz.explain.receptive_field import receptive_field

    model, images = _layered_net(), _images()
    maps = keras.Model(model.inputs, model.get_layer(layer).output).predict(images, verbose=0)
    found = unit_exemplars(model, images, layer, top=7, batch_size=8)  # 7 chunks, one padded
    field = receptive_field(model, layer)
    width = maps.shape[2]
    flat = maps.reshape(len(maps), -1, maps.shape[-1])
    for row, unit in enumerate(found.units):
        best = flat[:, :, unit].max(axis=1)
        expected = _brute_top(best, 7)
        np.testing.assert_array_equal(found.images[row], expected)
        np.testing.assert_allclose(found.activations[row], best[expected], rtol=1e-5, atol=1e-6)
        first = flat[expected, :, unit].argmax(axis=1)  # numpy: the first maximum
        np.testing.assert_array_equal(found.positions[row], np.stack([first // width,
                                                                      first % width], -1))
        assert [tuple(box) for box in found.boxes[row]] == [
            field.box(int(r), int(c)) for r, c in found.positions[row]]


def test_chunk_size_changes_nothing():
    from cnnviz.explain.exemplars import unit_exemplars

    model, images = _layered_net(), _images()
    one = unit_exemplars(model, images, "c2", (2, 0), top=5, batch_size=50)
    other = unit_exemplars(model, images, "c2", (2, 0), top=5, batch_size=3)
    np.testing.assert_array_equal(one.images, other.images)
    np.testing.assert_array_equal(one.positions, other.positions)
    assert one.units.tolist() == [2, 0]


def test_class_exemplars_are_the_images_with_the_highest_logit():
    import keras

    from cnnviz.explain.exemplars import class_exemplars

    model, images = _layered_net(), _images()
    features = keras.Model(model.inputs, model.layers[-2].output).predict(images, verbose=0)
    kernel, bias = (np.asarray(w) for w in model.get_layer("head").weights)
    logits = features @ kernel + bias
    found = class_exemplars(model, images, [0, 2], top=6, batch_size=16)
    for row, unit in enumerate((0, 2)):
        expected = _brute_top(logits[:, unit], 6)
        np.testing.assert_array_equal(found.images[row], expected)
        np.testing.assert_allclose(found.activations[row], logits[expected, unit], rtol=1e-5)
    assert (found.boxes == [0, 0, 9, 9]).all()


# ---------------------------------------------------------------------- receptive fields
def _field_models():
    import keras

    def sequential(*layers, shape=(12, 11, 1)):
        return keras.Sequential([keras.Input(shape), *layers])

    L = keras.layers
    inner = keras.Sequential([keras.Input((12, 11, 1)), L.ZeroPadding2D(((1, 0), (2, 1))),
                              L.Conv2D(1, 3, name="inner_conv")], name="inner")
    inputs = keras.Input((12, 11, 1))
    branch = L.Conv2D(1, 1, strides=2, name="shortcut")(inputs)
    main = L.Conv2D(1, 3, strides=2, padding="same", name="main")(inner(inputs))
    nested = keras.Model(inputs, L.Add(name="add")([branch, main]))
    return {
        "conv valid": (sequential(L.Conv2D(1, 3, name="u")), "u", False),
        "conv same, even kernel": (sequential(L.Conv2D(1, 4, padding="same", name="u")), "u",
                                   False),
        "strided": (sequential(L.Conv2D(1, 3, strides=2, padding="same"),
                               L.Conv2D(1, 3, strides=2, name="u")), "u", False),
        "dilated": (sequential(L.Conv2D(1, 3, dilation_rate=2, padding="same", name="u")), "u",
                    True),
        "max pool": (sequential(L.Conv2D(1, 3, padding="same"),
                                L.MaxPooling2D(3, strides=2, padding="same", name="u")), "u",
                     False),
        "average pool": (sequential(L.AveragePooling2D(2), L.Conv2D(1, 3, name="u")), "u", False),
        "separable": (sequential(L.SeparableConv2D(1, 3, strides=2, padding="same", name="u")),
                      "u", False),
        "nested and merged": (nested, "add", False),
        "inside a nested model": (nested, "inner/inner_conv", False),
    }


MODELS = _field_models()


@pytest.mark.parametrize("name", list(MODELS))
def test_receptive_field_is_what_perturbing_a_pixel_changes(name):
    import keras

    from cnnviz.explain.receptive_field import receptive_field

    model, layer, dilated = MODELS[name]
    randomize(model, seed=5)
    field = receptive_field(model, layer)
    if "/" in layer:
        from cnnviz.model.compiled import model_copy
        from cnnviz.model.graph import layer_tensor

        copy = model_copy(model, "output").model
        sub = keras.Model(copy.inputs[0], layer_tensor(copy, layer))
    else:
        sub = keras.Model(model.inputs[0], model.get_layer(layer).output)
    height, width = 12, 11
    image = np.random.default_rng(1).uniform(0, 1, (1, height, width, 1)).astype(np.float32)
    pixels = np.eye(height * width, dtype=np.float32).reshape(-1, height, width, 1)
    perturbed = np.concatenate([image + 50 * pixels, image - 50 * pixels])
    base = np.asarray(sub(image))[0, ..., 0]
    out = np.asarray(sub(perturbed))[..., 0]
    changed = (np.abs(out - base) > 1e-3).reshape(2, height, width, *base.shape).any(axis=0)
    assert field.grid == base.shape
    for row in range(base.shape[0]):
        for col in range(base.shape[1]):
            top, left, bottom, right = field.box(row, col)
            expected = np.zeros((height, width), bool)
            expected[top:bottom, left:right] = True
            seen = changed[..., row, col]
            if not dilated:
                np.testing.assert_array_equal(seen, expected, err_msg=f"{name} at {row, col}")
                continue
            assert not (seen & ~expected).any()  # the box holds every pixel that matters ...
            rows, cols = np.flatnonzero(seen.any(1)), np.flatnonzero(seen.any(0))
            first_row = row * field.jump[0] + field.start[0]
            first_col = col * field.jump[1] + field.start[1]
            if (first_row >= 0 and first_col >= 0 and first_row + field.size[0] <= height
                    and first_col + field.size[1] <= width):  # ... and is their bounding box
                assert (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1) == (top, left, bottom,
                                                                           right)


def test_untraceable_layers_are_refused():
    import keras

    from cnnviz.explain.receptive_field import receptive_field

    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.UpSampling2D(),
                              keras.layers.Conv2D(1, 3, name="c")])
    with pytest.raises(CnnvizError, match="changes the grid"):
        receptive_field(model, "c")
    with pytest.raises(CnnvizError, match="4-D"):
        receptive_field(_layered_net(), "head")


# ---------------------------------------------------------------------------------- CLI
def test_cli_writes_the_grid_and_the_json_of_the_same_numbers(tmp_path):
    import keras

    from cnnviz.cli import app
    from cnnviz.explain.exemplars import unit_exemplars

    inputs = keras.Input((10, 10, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)  # the model takes raw 0..255 pixels
    x = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = randomize(keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x)), 4)
    model.save(tmp_path / "model.keras")
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (14, 10, 10, 3), dtype=np.uint8)
    for index, picture in enumerate(pixels):
        Image.fromarray(picture).save(folder / f"p{index:02d}.png")
    result = CliRunner().invoke(app, ["exemplars", str(tmp_path / "model.keras"), "--images",
                                      str(folder), "--layer", "c1", "--filters", "1:3", "--top",
                                      "4", "--classes", "all", "--out", str(tmp_path / "out")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["c1.json", "c1.png", "classes.json", "classes.png"]
    with Image.open(tmp_path / "out" / "c1.png") as png:
        assert png.format == "PNG" and np.asarray(png.convert("L")).std() > 5
    records = json.loads((tmp_path / "out" / "c1.json").read_text())["exemplars"]
    expected = unit_exemplars(model, pixels.astype(np.float32), "c1", [1, 2], top=4)
    assert [r["unit"] for r in records] == [1] * 4 + [2] * 4
    assert [r["index"] for r in records] == expected.images.reshape(-1).tolist()
    assert [r["file"] for r in records] == [str(folder / f"p{i:02d}.png")
                                            for i in expected.images.reshape(-1)]
    np.testing.assert_allclose([r["activation"] for r in records],
                               expected.activations.reshape(-1), rtol=1e-5)
    assert [r["position"] for r in records] == expected.positions.reshape(-1, 2).tolist()
    assert [r["box"] for r in records] == expected.boxes.reshape(-1, 4).tolist()
    classes = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert classes["units"] == "classes" and len(classes["exemplars"]) == 2 * 4


def test_a_filter_that_never_fires_says_so_on_its_row(tmp_path, monkeypatch):
    import keras

    import cnnviz.plot
    from cnnviz.cli import app

    inputs = keras.Input((10, 10, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inputs)
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    model = randomize(keras.Model(inputs, outputs), 5)
    kernel, bias = model.get_layer("c1").get_weights()
    kernel[..., 2], bias[2] = 0.0, -1.0  # filter 2: relu(-1) = 0 on every image
    kernel = np.abs(kernel)  # the others see positive pixels through positive weights
    kernel[..., 2] = 0.0
    model.get_layer("c1").set_weights([kernel, bias])
    model.save(tmp_path / "model.keras")
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, picture in enumerate(np.random.default_rng(1).integers(0, 256, (6, 10, 10, 3),
                                                                       dtype=np.uint8)):
        Image.fromarray(picture).save(folder / f"p{index}.png")
    drawn = []

    def spy(images, boxes, captions, row_labels, **options):
        drawn.append(list(row_labels))
        return real(images, boxes, captions, row_labels, **options)

    real = cnnviz.plot.exemplar_grid
    monkeypatch.setattr(cnnviz.plot, "exemplar_grid", spy)
    result = CliRunner().invoke(app, ["exemplars", str(tmp_path / "model.keras"), "--images",
                                      str(folder), "--layer", "c1", "--top", "3", "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert drawn == [["filter 0", "filter 1", "filter 2\nnever active", "filter 3"]]


def test_cli_refuses_filters_without_a_layer(tmp_path):
    from cnnviz.cli import app

    result = CliRunner().invoke(app, ["exemplars", "keras:nothing", "--filters", "0:2"])
    assert result.exit_code == 2 and "--filters chooses filters of a --layer" in result.output


@pytest.mark.slow  # the session's trained run
def test_cli_ranks_the_whole_test_split_of_a_run(digits_run, tmp_path):
    from cnnviz.cli import app
    from cnnviz.explain.exemplars import class_exemplars, unit_exemplars
    from cnnviz.runs.load import load_run

    result = CliRunner().invoke(app, ["exemplars", str(digits_run), "--layer", "conv1",
                                      "--filters", "0:2", "--top", "3", "--with-synthetic",
                                      "--steps", "8", "--out", str(tmp_path)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["exemplars", str(digits_run), "--top", "3", "--out",
                                      str(tmp_path / "classes")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = load_run(digits_run)
    test = run.dataset().test
    images = test.images(list(range(len(test))))
    layer = json.loads((tmp_path / "conv1.json").read_text())
    assert layer["images"] == len(test)
    expected = unit_exemplars(run.model, images, "conv1", [0, 1], top=3)
    assert [r["index"] for r in layer["exemplars"]] == expected.images.reshape(-1).tolist()
    assert layer["exemplars"][0]["name"] == f"test_{expected.images[0, 0]:03d}"
    classes = json.loads((tmp_path / "classes" / "classes.json").read_text())
    expected = class_exemplars(run.model, images, list(range(10)), top=3)
    assert [r["index"] for r in classes["exemplars"]] == expected.images.reshape(-1).tolist()
    with Image.open(tmp_path / "conv1.png") as png:
        assert png.format == "PNG"
