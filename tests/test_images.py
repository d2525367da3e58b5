"""The one image reader: modes, the pixel limit before decoding, damaged files, and --images
specs. Checked against Pillow's own decoding and Keras's own folder loader."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cnnviz.data.images import (
    check_image_file,
    expand_image_spec,
    image_problem,
    read_images,
    undecodable_files,
)
from cnnviz.errors import CnnvizError

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 7, 3), dtype=np.uint8)


@pytest.fixture(params=["tensorflow", "pillow"])
def decoder(request, monkeypatch):
    """Each decoding test twice: TensorFlow's decoder, and Pillow's (what `read_images` uses
    where TensorFlow is not installed, a JAX or PyTorch machine)."""
    if request.param == "pillow":
        monkeypatch.setattr("cnnviz._quiet.tensorflow_available", lambda: False)
    return request.param


def _read(path, channels=3, size=(6, 7)):
    return read_images([path], (*size, channels))[0]


def test_8_bit_files_keep_their_values_exactly(tmp_path, decoder):
    for suffix in ("png", "bmp"):
        Image.fromarray(RGB).save(tmp_path / f"a.{suffix}")
        np.testing.assert_array_equal(_read(tmp_path / f"a.{suffix}"), RGB)
    Image.fromarray(RGB[..., 0]).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(_read(tmp_path / "gray.png", channels=1), RGB[..., :1])


def test_jpeg_and_gif_decode_like_pillow(tmp_path, decoder):
    rows, columns = np.mgrid[0:24, 0:32]
    smooth = np.dstack([rows * 10, columns * 7, 255 - rows * 5]).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "a.jpg", quality=95)
    with Image.open(tmp_path / "a.jpg") as image:
        expected = np.asarray(image.convert("RGB"), np.float32)
    # TensorFlow's JPEG decoder (Keras's too) uses a faster, less exact inverse DCT than
    # Pillow's: a few levels apart at most, about one on average.
    difference = np.abs(_read(tmp_path / "a.jpg", size=(24, 32)) - expected)
    assert difference.max() <= 5 and difference.mean() <= 1.5
    Image.fromarray(RGB).convert("P").save(tmp_path / "a.gif")
    with Image.open(tmp_path / "a.gif") as image:
        np.testing.assert_array_equal(_read(tmp_path / "a.gif"), np.asarray(image.convert("RGB")))


def test_16_bit_png_is_scaled_to_the_8_bit_range_not_clipped(tmp_path, decoder):
    deep = np.array([[0, 257, 32_896], [65_535, 1_000, 60_000]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode.startswith("I;16")
    read = _read(tmp_path / "deep.png", channels=1, size=(2, 3))[..., 0]
    np.testing.assert_allclose(read, deep / 257.0, rtol=1e-6)
    assert read.max() == pytest.approx(255.0) and read[1, 1] == pytest.approx(1000 / 257)


def test_palette_image_gets_its_colours(tmp_path, decoder):
    image = Image.fromarray(RGB).quantize(colors=16)
    image.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(_read(tmp_path / "palette.png"),
                                  np.asarray(image.convert("RGB")))


def test_alpha_is_composited_on_white(tmp_path, decoder):
    alpha = np.array([[0, 255, 128]] * 2, np.uint8)
    colour = np.zeros((2, 3, 3), np.uint8)
    colour[..., 0] = 200
    Image.fromarray(np.dstack([colour, alpha]), "RGBA").save(tmp_path / "rgba.png")
    read = _read(tmp_path / "rgba.png", size=(2, 3))
    np.testing.assert_allclose(read[0, 0], [255, 255, 255])  # transparent -> white
    np.testing.assert_allclose(read[0, 1], [200, 0, 0])  # opaque -> its colour
    share = 128 / 255
    np.testing.assert_allclose(read[0, 2], [200 * share + 255 * (1 - share),
                                            255 * (1 - share), 255 * (1 - share)], rtol=1e-5)
    gray = np.dstack([np.full((2, 3), 100, np.uint8), alpha])
    Image.fromarray(gray, "LA").save(tmp_path / "la.png")
    read = _read(tmp_path / "la.png", channels=1, size=(2, 3))[..., 0]
    np.testing.assert_allclose(read[0], [255, 100, 100 * share + 255 * (1 - share)], rtol=1e-5)


def test_grayscale_and_rgb_follow_the_model_channels(tmp_path, decoder):
    Image.fromarray(RGB[..., 1]).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(_read(tmp_path / "gray.png"),
                                  np.repeat(RGB[..., 1:2], 3, axis=-1))  # gray -> RGB
    Image.fromarray(RGB).save(tmp_path / "rgb.png")
    expected = RGB.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601, as "L"
    np.testing.assert_allclose(_read(tmp_path / "rgb.png", channels=1)[..., 0], expected,
                               atol=1e-3)
    with Image.open(tmp_path / "rgb.png") as image:  # Pillow rounds the same mix
        assert np.abs(np.asarray(image.convert("L")) - expected).max() <= 0.5 + 1e-6


def test_resizing_matches_keras_image_dataset_from_directory(tmp_path, decoder):
    import keras

    for index, name in enumerate(("a", "b")):
        (tmp_path / name).mkdir()
        pixels = RNG.integers(0, 256, (30 + index * 7, 22, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / name / "x.png")
    keras_images = keras.utils.image_dataset_from_directory(
        tmp_path, image_size=(16, 12), batch_size=None, shuffle=False, verbose=False)
    ours = read_images([tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"], (16, 12, 3))
    for mine, (theirs, _) in zip(ours, keras_images.as_numpy_iterator()):
        np.testing.assert_allclose(mine, theirs, atol=1e-4)


def test_pillow_reads_what_tensorflow_reads(tmp_path, monkeypatch):
    # Every mode and resize rule: Pillow's read (no TensorFlow) against TensorFlow's, one file
    # at a time, at the native size, shrunk, enlarged, cropped and padded.
    import cnnviz._quiet

    files = {"rgb.png": Image.fromarray(RGB), "gray.png": Image.fromarray(RGB[..., 0]),
             "rgba.png": Image.fromarray(np.dstack([RGB, RGB[..., 0]]), "RGBA"),
             "la.png": Image.fromarray(np.dstack([RGB[..., 1], RGB[..., 2]]), "LA"),
             "palette.png": Image.fromarray(RGB).quantize(colors=16),
             "bits.png": Image.fromarray(RGB[..., 0] > 128),
             "a.gif": Image.fromarray(RGB).convert("P"), "a.bmp": Image.fromarray(RGB)}
    transparent = Image.fromarray(RGB).quantize(colors=8)
    transparent.info["transparency"] = 3
    files["tpalette.png"] = transparent
    for name, image in files.items():
        image.save(tmp_path / name, **({"transparency": 3} if name == "tpalette.png" else {}))
    for name in files:
        for shape, how in (((6, 7, 3), "stretch"), ((4, 5, 1), "stretch"), ((11, 9, 3), "stretch"),
                           ((5, 5, 3), "crop"), ((5, 5, 1), "pad")):
            path = [tmp_path / name]
            expected = read_images(path, shape, resize=how)
            with monkeypatch.context() as patched:
                patched.setattr(cnnviz._quiet, "tensorflow_available", lambda: False)
                found = read_images(path, shape, resize=how)
            np.testing.assert_allclose(found, expected, atol=2e-4, err_msg=f"{name} {how}")


def test_the_pixel_limit_is_checked_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 9_000)).save(bomb)  # 90 megapixels in a few kilobytes
    assert bomb.stat().st_size < 100_000
    problem = image_problem(bomb)
    assert "10000x9000 = 90,000,000 pixels, over the limit of 89,478,485" in problem
    with pytest.raises(CnnvizError, match=r"^--images: image file .*bomb.png has 10000x9000"):
        read_images([bomb], (8, 8, 3))
    small = tmp_path / "small.png"
    Image.fromarray(RGB).save(small)
    assert image_problem(small) is None
    assert "over the limit of 40" in image_problem(small, max_pixels=40)  # 42 pixels


@pytest.mark.parametrize("damage,message", [
    ("truncate_png", "is truncated (no PNG end chunk)"),
    ("truncate_jpeg", "is truncated (no JPEG end marker)"),
    ("text", "is not an image file (unrecognised content)"),
    ("empty", "is empty (0 bytes)"),
    ("tiff", "is a TIFF image; only PNG, JPEG, GIF and BMP files can be decoded"),
])
def test_damaged_or_foreign_files_are_named_with_their_problem(tmp_path, damage, message):
    path = tmp_path / ("photo.jpg" if "jpeg" in damage else "photo.png")
    if damage == "truncate_png":
        Image.fromarray(RGB).save(path)
        path.write_bytes(path.read_bytes()[:-20])
    elif damage == "truncate_jpeg":
        Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "text":
        path.write_text("not a picture\n")
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        Image.fromarray(RGB).save(path, format="TIFF")
    assert image_problem(path) == message
    with pytest.raises(CnnvizError) as raised:
        check_image_file(path)
    assert str(raised.value) == f"image file {path} {message}"
    assert "\n" not in str(raised.value)


def test_damage_inside_a_file_is_found_by_decoding(tmp_path):
    good, damaged = tmp_path / "good.png", tmp_path / "damaged.png"
    Image.fromarray(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(good)
    payload = bytearray(good.read_bytes())
    payload[60:140] = bytes(80)  # inside the image data: the header and end chunk stay intact
    damaged.write_bytes(bytes(payload))
    assert image_problem(damaged) is None, "the cheap check cannot see it"
    bad = undecodable_files([str(good), str(damaged)])
    assert [path for path, _ in bad] == [str(damaged)]
    assert bad[0][1].startswith("cannot be decoded (") and "{{" not in bad[0][1]
    with pytest.raises(CnnvizError, match="damaged.png cannot be decoded"):
        read_images([damaged], (8, 8, 3))


def test_image_specs_name_files_folders_and_globs(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for index in range(2):
            Image.fromarray(RGB).save(tmp_path / name / f"{index}.png")
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    assert expand_image_spec("0:8") is None and expand_image_spec("1,2") is None
    folder = expand_image_spec(str(tmp_path))
    assert [path.relative_to(tmp_path).as_posix() for path in folder] == [
        "cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
    globbed = expand_image_spec(f"{tmp_path}/*/1.png")
    assert [path.relative_to(tmp_path).as_posix() for path in globbed] == ["cat/1.png", "dog/1.png"]
    listed = expand_image_spec(f"{tmp_path}/dog/0.png, {tmp_path}/cat")
    assert len(listed) == 3
    with pytest.raises(CnnvizError, match=r"matches no image file"):
        expand_image_spec(f"{tmp_path}/*.jpg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CnnvizError, match=r"is a folder with no image file"):
        expand_image_spec(str(tmp_path / "empty"))


@pytest.mark.slow
def test_bad_image_files_given_to_a_command_exit_2_with_one_line(digits_run, tmp_path):
    from typer.testing import CliRunner

    from cnnviz.cli import app

    truncated, bomb, text = tmp_path / "cut.png", tmp_path / "bomb.png", tmp_path / "text.jpg"
    Image.fromarray(RGB).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-30])
    Image.new("1", (10_000, 9_000)).save(bomb)
    text.write_text("hello")
    for path, problem in ((truncated, "is truncated"), (bomb, "over the limit of 89,478,485"),
                          (text, "is not an image file")):
        result = CliRunner().invoke(app, ["gradcam", str(digits_run), "--images", str(path),
                                          "--out", str(tmp_path / "figures")],
                                    catch_exceptions=False)
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and str(path) in errors[0] and problem in errors[0]
        assert "Traceback" not in result.output
    assert not (tmp_path / "figures").exists()
