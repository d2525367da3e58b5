"""Image folders: Keras's folder conventions, the split by file, bad files, the recorded file
lists, and explaining a folder-trained run from those lists (reading only the files asked for)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _folders import CLASSES, folder_config, make_folder
from PIL import Image
from typer.testing import CliRunner

from cnnviz.cli import app
from cnnviz.data import load_dataset, measure_statistics
from cnnviz.errors import CnnvizError

runner = CliRunner()
SIDE = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("images") / "data")


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A run trained on its own copy of a folder (tests may take files away from it)."""
    from cnnviz.train.fit import train

    root = make_folder(tmp_path_factory.mktemp("own") / "data")
    result = train(folder_config(root), tmp_path_factory.mktemp("runs"), log=lambda line: None)
    return result.run_dir, root


# ------------------------------------------------------------------------------- listing
def test_listing_follows_keras_image_dataset_from_directory(folder):
    import keras

    (folder / "bright" / "readme.txt").write_text("not an image: left out, as Keras does")
    dataset = load_dataset(folder_config(folder, validation_split=0.0, test_split=0.5))
    keras_view = keras.utils.image_dataset_from_directory(folder, shuffle=False, verbose=False)
    assert dataset.class_names == keras_view.class_names == list(CLASSES)
    ours = sorted(path for split in (dataset.train, dataset.test) for path in split.paths())
    assert ours == sorted(keras_view.file_paths)


def test_split_is_by_file_stratified_seeded_and_disjoint(folder):
    first = load_dataset(folder_config(folder))
    again = load_dataset(folder_config(folder))
    splits = [set(first.train.files), set(first.val.files), set(first.test.files)]
    assert sum(len(split) for split in splits) == 48 and len(set().union(*splits)) == 48
    for name in ("train", "val", "test"):
        split = first.splits[name]
        assert split.files == again.splits[name].files, "same seed, same split"
        assert np.array_equal(np.bincount(split.labels), [len(split) // 2] * 2), "stratified"
        for file, label in zip(split.files, split.labels):
            assert file.startswith(CLASSES[label] + "/")
    other = load_dataset(folder_config(folder).model_copy(update={"seed": 6}))
    assert other.test.files != first.test.files


@pytest.mark.parametrize("layout,message", [
    ("empty_class", "class folder(s) 'empty' hold no image"),
    ("one_class", "needs one sub-folder per class, at least two; found only 'bright'"),
    ("loose", "found none (3 images lie directly in it; move them into class folders)"),
])
def test_folders_that_cannot_be_classified_are_refused(tmp_path, layout, message):
    if layout == "empty_class":
        make_folder(tmp_path, 3)
        (tmp_path / "empty").mkdir()
    elif layout == "one_class":
        (tmp_path / "bright").mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "bright" / "a.png")
    else:
        for index in range(3):
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / f"{index}.png")
    with pytest.raises(CnnvizError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_dataset(folder_config(tmp_path))


def test_mixed_sizes_and_modes_become_one_shape(tmp_path):
    rng = np.random.default_rng(1)
    for name in CLASSES:
        (tmp_path / name).mkdir()
    Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8)).save(
        tmp_path / "bright" / "g.png")
    Image.fromarray(rng.integers(0, 256, (9, 40, 4), dtype=np.uint8), "RGBA").save(
        tmp_path / "bright" / "a.png")
    Image.fromarray(rng.integers(0, 65536, (16, 16)).astype(np.uint16)).save(
        tmp_path / "dark" / "deep.png")
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).quantize(8).save(
        tmp_path / "dark" / "p.png")
    for mode, channels in (("rgb", 3), ("grayscale", 1)):
        dataset = load_dataset(folder_config(tmp_path, color_mode=mode, validation_split=0.0,
                                             test_split=0.5))
        images, _ = next(dataset.train.pipeline(4).as_numpy_iterator())
        assert images.shape[1:] == (SIDE, SIDE, channels)
        assert 0.0 <= images.min() and images.max() <= 255.0


# --------------------------------------------------------------------------- bad files
def _damaged_copy(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(folder, copy)
    (copy / "dark" / "notes.png").write_text("this is text, not a picture")
    return copy


def test_a_bad_file_is_one_line_exit_2_and_nothing_is_written(folder, tmp_path):
    from cnnviz.config.loading import dump_config

    copy = _damaged_copy(folder, tmp_path)
    config = tmp_path / "folder.yaml"
    config.write_text(dump_config(folder_config(copy)))
    result = runner.invoke(app, ["train", str(config), "--out", str(tmp_path / "out")],
                           catch_exceptions=False)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [(f"error: data.path {copy}: dark/notes.png is not an image file "
                      "(unrecognised content); remove it, or set data.skip_bad_files: true to "
                      "skip unreadable files")]
    assert not (tmp_path / "out").exists(), "refused before any run directory exists"


@pytest.mark.slow
def test_skip_bad_files_trains_without_them_and_says_which(folder, tmp_path):
    from cnnviz.train.fit import train

    copy = _damaged_copy(folder, tmp_path)
    good = copy / "bright" / "001.png"
    payload = bytearray(good.read_bytes())
    payload[60:100] = bytes(40)  # damage inside the image data: only decoding finds it
    (copy / "bright" / "inside.png").write_bytes(bytes(payload))
    lines = []
    result = train(folder_config(copy, skip_bad_files=True), tmp_path / "out", log=lines.append)
    assert lines[0] == ("skipped 2 unreadable file(s) of 50 (data.skip_bad_files): "
                        "bright/inside.png, dark/notes.png")
    assert result.metrics["skipped_files"] == 2
    assert result.metrics["train_images"] + result.metrics["validation_images"] \
        + result.metrics["test_images"] == 48
    skipped = list(csv.DictReader((result.run_dir / "files" / "skipped.csv").open()))
    assert [row["file"] for row in skipped] == ["bright/inside.png", "dark/notes.png"]
    assert "cannot be decoded" in skipped[0]["problem"]


@pytest.mark.slow
def test_damage_found_mid_epoch_is_one_line_naming_the_file(folder, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(folder, copy)
    target = copy / "dark" / "004.png"
    payload = bytearray(target.read_bytes())
    payload[60:100] = bytes(40)  # header and end chunk intact: passes the cheap check
    target.write_bytes(bytes(payload))
    from cnnviz.config.loading import dump_config

    config = tmp_path / "folder.yaml"
    config.write_text(dump_config(folder_config(copy)))
    result = runner.invoke(app, ["train", str(config), "--out", str(tmp_path / "out")],
                           catch_exceptions=False)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert errors[0].startswith(f"error: data.path {copy}: dark/004.png cannot be decoded (")


# ---------------------------------------------------------------------- pipeline options
def test_statistics_are_one_streaming_pass_equal_to_numpy(folder):
    dataset = load_dataset(folder_config(folder, preprocessing="standardize"))
    measure_statistics(dataset, batch_size=5)  # several batches, a partial last one
    every = dataset.train.images() / 255.0
    np.testing.assert_allclose(dataset.preprocessing.mean, every.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(dataset.preprocessing.std, every.std(axis=(0, 1, 2)), rtol=1e-4)


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_cached_images_are_the_decoded_ones_and_are_reused(folder, tmp_path, kind):
    from cnnviz.data import disk_cache

    copy = tmp_path / "data"
    shutil.copytree(folder, copy)
    dataset = load_dataset(folder_config(copy))
    split = dataset.train
    cache = "" if kind == "memory" else disk_cache(tmp_path / "cache", "train", split)
    pipeline = split.pipeline(8, cache=cache)
    first = np.concatenate([images for images, _ in pipeline.as_numpy_iterator()])
    np.testing.assert_array_equal(first, split.images())
    shutil.rmtree(copy)  # every file gone: a second epoch can only come from the cache
    second = np.concatenate([images for images, _ in pipeline.as_numpy_iterator()])
    np.testing.assert_array_equal(second, first)
    if kind == "disk":
        assert list((tmp_path / "cache").glob("train-*.index"))


def test_workers_decode_disjoint_shares_of_the_files(folder):
    dataset = load_dataset(folder_config(folder, validation_split=0.0, test_split=0.25))
    split = dataset.train  # 36 files

    def seen(index):
        pipeline = split.pipeline(6, shuffle=True, seed=3, workers=(2, index))
        return {(int(label), int(image[0, 0, 0])) for images, labels in
                pipeline.as_numpy_iterator() for image, label in zip(images, labels)}

    first, second = seen(0), seen(1)
    everything = {(int(label), int(name.split("/")[1][:3])) for label, name
                  in zip(split.labels, split.files)}
    assert len(first) == len(second) == 18
    assert not first & second and first | second == everything


# ------------------------------------------------------------------- the recorded lists
@pytest.mark.slow
def test_a_folder_run_records_its_split_files(folder_run):
    run_dir, root = folder_run
    rows = {name: list(csv.DictReader((run_dir / "files" / f"{name}.csv").open()))
            for name in ("train", "val", "test")}
    assert sum(len(split) for split in rows.values()) == 48
    assert (run_dir / "files" / "classes.txt").read_text() == "bright\ndark\n"
    assert all((root / row["file"]).is_file() and row["class"] == CLASSES[int(row["label"])]
               for split in rows.values() for row in split)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["input_range"] == [0.0, 255.0]
    assert metrics["test_accuracy"] == 1.0, "two easy classes"


@pytest.mark.slow
def test_explaining_test_images_reads_only_those_files(folder_run, tmp_path):
    run_dir, root = folder_run
    tests = [row["file"] for row in csv.DictReader((run_dir / "files" / "test.csv").open())]
    backup = shutil.copytree(root, tmp_path / "backup")
    for path in root.rglob("*.*"):
        if path.relative_to(root).as_posix() not in tests[:2]:
            path.unlink()  # the folder now holds only the two test images asked for
    result = runner.invoke(app, ["gradcam", str(run_dir), "--images", "0:2", "--out",
                                 str(tmp_path / "figures")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in (tmp_path / "figures").iterdir()) == [
        "test_00.png", "test_01.png"]
    result = runner.invoke(app, ["gradcam", str(run_dir), "--images", "2", "--out",
                                 str(tmp_path / "figures")], catch_exceptions=False)
    assert result.exit_code == 2 and f"{tests[2].split('/')[1]} does not exist" in result.output
    shutil.rmtree(root)
    shutil.copytree(backup, root)  # as it was, for the other tests


@pytest.mark.slow
def test_a_bare_model_explains_a_file_as_its_run_directory_does(folder_run, folder):
    from cnnviz.explain import gradcam
    from cnnviz.report.selection import select_images
    from cnnviz.runs.load import load_run

    run_dir, _ = folder_run
    spec = f"{folder}/bright/001.png,{folder}/dark/002.png"
    maps = []
    for source in (run_dir, run_dir / "model.keras"):
        run = load_run(source)
        selection = select_images(run, spec)
        maps.append(gradcam(run.model, np.asarray(selection.images)))
    np.testing.assert_allclose(maps[0], maps[1], atol=1e-6)
    assert maps[0].max() > 0


@pytest.mark.slow
def test_images_from_a_folder_or_a_glob_are_named_and_labelled_in_chunks(folder_run, folder,
                                                                          tmp_path, monkeypatch):
    import cnnviz.data.images
    from cnnviz.report.selection import select_images
    from cnnviz.runs.load import load_run

    run = load_run(folder_run[0])
    selection = select_images(run, str(folder))
    assert len(selection.images) == 48
    assert selection.files[0] == str(folder / "bright" / "000.bmp")
    assert selection.names[:2] == ["bright_000", "bright_001"]  # stems clash across classes
    assert list(selection.labels[:24]) == [0] * 24 and list(selection.labels[24:]) == [1] * 24
    globbed = select_images(run, f"{folder}/dark/00[0-2].*")
    assert globbed.names == ["000", "001", "002"] and list(globbed.labels) == [1, 1, 1]

    read_sizes = []
    real = cnnviz.data.images.read_images
    monkeypatch.setattr(cnnviz.data.images, "read_images",
                        lambda paths, *args, **kwargs: read_sizes.append(len(paths))
                        or real(paths, *args, **kwargs))
    monkeypatch.setattr("cnnviz.report.batching.CHUNK", 16)
    result = runner.invoke(app, ["saliency", str(folder_run[0]), "--images", str(folder),
                                 "--method", "vanilla", "--out", str(tmp_path)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.glob("*.png"))) == 48
    assert read_sizes == [16, 16, 16], "read a chunk at a time, each file once"


@pytest.mark.slow
def test_a_resumed_folder_run_keeps_the_files_it_recorded(tmp_path):
    import keras

    from cnnviz.train.fit import train

    root = make_folder(tmp_path / "data")

    class StopAfterOneEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise RuntimeError("stopped on purpose")

    config = folder_config(root)
    with pytest.raises(RuntimeError, match="stopped on purpose"):
        train(config, tmp_path / "out", extra_callbacks=[StopAfterOneEpoch()],
              log=lambda line: None)
    run_dir = next((tmp_path / "out" / "folder").iterdir())
    recorded = (run_dir / "files" / "test.csv").read_text()
    make_folder(root, per_class=40, seed=9)  # the folder grows (and changes) meanwhile
    result = train(config, tmp_path / "out", log=lambda line: None)
    assert result.run_dir == run_dir and result.resumed_from_epoch == 1
    assert (run_dir / "files" / "test.csv").read_text() == recorded
    assert result.metrics["train_images"] + result.metrics["validation_images"] \
        + result.metrics["test_images"] == 48, "the recorded 48 files, not the 80 now there"
