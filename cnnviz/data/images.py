"""Image files: the one reader for training folders and for `--images`.

Every image becomes float32 (H, W, C) in 8-bit pixel units (0..255), the units every cnnviz
model takes (its own Rescaling/Normalization layers do the rest):

* 8-bit files keep their values exactly; a 16-bit PNG is scaled to the 8-bit range (v / 257),
  never clipped;
* palette images are expanded to their colours;
* an alpha channel is composited on white (a transparent pixel is white, as a browser shows it);
* grayscale <-> RGB follows the model's channels (gray is replicated; RGB -> gray with the ITU-R
  601 weights that Pillow's "L" mode also uses);
* resizing is Keras's own convention (`image_dataset_from_directory`): bilinear, stretched.

Before any pixel is decoded, a file is checked from its header (Pillow reads only the header):
it must be an image of a decodable format, with at most `max_pixels` pixels (89 megapixels by
default, Pillow's own decompression-bomb limit), and not cut short. Problems are one
`CnnvizError` line naming the file. Decoding itself is TensorFlow's (`tf.io.decode_image`), so
training (inside tf.data) and explaining (`read_images`) compute exactly the same tensors.

Where TensorFlow is not installed (a JAX or PyTorch machine), `read_images` decodes with Pillow
under the same rules and resizes with `keras.ops.image` (Keras's Resizing layer): the same
tensors for 8-bit PNG, GIF and BMP (tests/test_images.py runs both readers); JPEG within a few
units (TensorFlow's libjpeg uses the fast integer DCT, Pillow the accurate one); a 16-bit colour
PNG within 1 unit (Pillow keeps its high byte, TensorFlow divides by 257).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cnnviz.errors import CnnvizError

# The formats `keras.utils.image_dataset_from_directory` lists (and TensorFlow decodes).
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
# Pillow's Image.MAX_IMAGE_PIXELS: 1024 * 1024 * 1024 // 4 // 3.
MAX_IMAGE_PIXELS = 89_478_485
_DECODABLE = {"PNG", "JPEG", "GIF", "BMP", "MPO"}  # MPO: a JPEG with extra frames (cameras)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"
_JPEG_END = b"\xff\xd9"


# ------------------------------------------------------------------------------ checking
def image_problem(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> str | None:
    """Why `path` cannot be read as an image, in a few words, or None when it can.

    Reads the header and the last bytes only: cheap enough for every file of a training folder.
    Damage in the middle of a file is found when it is decoded (see `undecodable_files`).
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    if not path.is_file():
        return "is not a file"
    if size == 0:
        return "is empty (0 bytes)"
    limit = Image.MAX_IMAGE_PIXELS
    try:
        # cnnviz applies its own limit below: Pillow's own check must not warn or refuse first.
        Image.MAX_IMAGE_PIXELS = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                kind, (width, height) = image.format, image.size
    except UnidentifiedImageError:
        return "is not an image file (unrecognised content)"
    except OSError as error:
        return f"cannot be read as an image ({error})"
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if kind not in _DECODABLE:
        return f"is a {kind} image; only PNG, JPEG, GIF and BMP files can be decoded"
    if width * height > max_pixels:
        return (f"has {width}x{height} = {width * height:,} pixels, over the limit of "
                f"{max_pixels:,} (a decompression bomb?); raise data.max_image_pixels if it is "
                "genuine")
    if width == 0 or height == 0:
        return f"has no pixels ({width}x{height})"
    return _truncation(path, kind, size)


def _truncation(path: Path, kind: str, size: int) -> str | None:
    """A file whose end marker is missing was cut short (an interrupted copy or download)."""
    with open(path, "rb") as handle:
        if kind == "PNG":
            handle.seek(max(0, size - 12))
            if not handle.read().startswith(_PNG_END, 4):
                return "is truncated (no PNG end chunk)"
        elif kind in ("JPEG", "MPO"):
            # Some cameras append data after the end marker: look for it near the end.
            handle.seek(max(0, size - 4096))
            if _JPEG_END not in handle.read():
                return "is truncated (no JPEG end marker)"
        elif kind == "GIF":
            handle.seek(size - 1)
            if handle.read() != b";":
                return "is truncated (no GIF trailer)"
        elif kind == "BMP":
            handle.seek(2)
            declared = int.from_bytes(handle.read(4), "little")
            if declared and size < declared:
                return f"is truncated ({size:,} of {declared:,} bytes)"
    return None


def check_image_file(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS,
                     what: str = "image file") -> None:
    """Raise a one-line CnnvizError naming `path` when it cannot be read as an image."""
    problem = image_problem(path, max_pixels=max_pixels)
    if problem is not None:
        raise CnnvizError(f"{what} {path} {problem}")


# ------------------------------------------------------------------------------ decoding
def decode_image(contents, channels: int):
    """TensorFlow ops: encoded file bytes -> float32 (H, W, channels) in 8-bit units (0..255).

    Works inside tf.data (graph) and eagerly. See the module docstring for the mode rules.
    """
    import tensorflow as tf

    is_png = tf.equal(tf.strings.substr(contents, 0, 8), _PNG_SIGNATURE)
    sixteen_bit = tf.logical_and(is_png, tf.equal(tf.strings.substr(contents, 24, 1), b"\x10"))

    def deep():
        pixels = tf.io.decode_png(contents, dtype=tf.uint16)
        return tf.cast(pixels, tf.float32) / 257.0

    def shallow():
        pixels = tf.io.decode_image(contents, dtype=tf.uint8, expand_animations=False)
        return tf.cast(pixels, tf.float32)

    pixels = tf.cond(sixteen_bit, deep, shallow)
    count = tf.shape(pixels)[-1]

    def composited_on_white(colour, alpha):
        share = alpha / 255.0
        return colour * share + 255.0 * (1.0 - share)

    def gray(_=None):
        return tf.concat([pixels[..., :1]] * 3, axis=-1)

    # Channels in the file: 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA -> RGB on white.
    # (Explicit branches: a gather along the channel axis is ten times slower.)
    as_rgb = tf.switch_case(count - 1, [
        gray,
        lambda: composited_on_white(gray(), pixels[..., 1:2]),
        lambda: pixels,
        lambda: composited_on_white(pixels[..., :3], pixels[..., 3:4]),
    ])
    as_rgb = tf.ensure_shape(as_rgb, [None, None, 3])
    if channels == 1:
        weights = tf.constant([0.299, 0.587, 0.114], tf.float32)
        # A gray file stays exactly its own values; only colour is mixed (ITU-R 601).
        return tf.cond(count <= 2, lambda: as_rgb[..., :1],
                       lambda: tf.reduce_sum(as_rgb * weights, axis=-1, keepdims=True))
    return as_rgb


def resize(images, size: Sequence[int]):
    """Resize (H, W, C) or (N, H, W, C) to `size` = (height, width) as Keras does: bilinear."""
    import tensorflow as tf

    return tf.image.resize(images, tuple(int(side) for side in size), method="bilinear")


def load_image(path, size: Sequence[int], channels: int, how: str = "stretch"):
    """TensorFlow ops: an image file path -> float32 (height, width, channels), 8-bit units,
    resized as `resize_pixels` does (`how`)."""
    import tensorflow as tf

    image = decode_image(tf.io.read_file(path), channels)
    image = resize(image, size) if how == "stretch" else _aspect_resizing(size, how)(image)
    image.set_shape((int(size[0]), int(size[1]), channels))
    return image


def decode_with_pillow(path: str | Path, channels: int, *, what: str = "") -> np.ndarray:
    """`decode_image` without TensorFlow: Pillow decodes, the same rules follow (16-bit gray
    PNG / 257, palette expanded, alpha on white, ITU-R 601 gray). float32 (H, W, channels)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.seek(0)  # an animation's first frame, as expand_animations=False
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                pixels = np.asarray(image, dtype=np.float32)[..., None] / 257.0
            else:
                kind = {"1": "L", "L": "L", "LA": "LA", "RGB": "RGB", "RGBA": "RGBA",
                        "P": "RGBA" if "transparency" in image.info else "RGB",
                        "PA": "RGBA"}.get(image.mode, "RGB")
                pixels = np.asarray(image.convert(kind), dtype=np.float32)
                pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    except OSError as error:
        raise CnnvizError(f"{what} image file {path} cannot be decoded ({error})".strip()) \
            from None
    count = pixels.shape[-1]
    if count in (1, 2):
        colour = np.repeat(pixels[..., :1], 3, axis=-1)
    else:
        colour = pixels[..., :3]
    if count in (2, 4):
        share = pixels[..., -1:] / np.float32(255.0)
        colour = colour * share + np.float32(255.0) * (np.float32(1.0) - share)
    if channels == 1:
        if count <= 2:
            return colour[..., :1]
        weights = np.array([0.299, 0.587, 0.114], np.float32)
        return np.sum(colour * weights, axis=-1, keepdims=True, dtype=np.float32)
    return colour.astype(np.float32)


def undecodable_files(paths: Sequence[str]) -> list[tuple[str, str]]:
    """The files TensorFlow fails to decode, with its reason: [(path, reason), ...].

    One parallel tf.data pass that skips failing elements (`ignore_errors`); the indices that
    do not come out are the bad files, then decoded alone to get TensorFlow's message.
    """
    import tensorflow as tf

    if not paths:
        return []
    indices = tf.data.Dataset.from_tensor_slices(
        (tf.range(len(paths), dtype=tf.int64), tf.constant([str(path) for path in paths])))
    decoded = indices.map(lambda index, path: (index, tf.shape(
        decode_image(tf.io.read_file(path), 3))), num_parallel_calls=tf.data.AUTOTUNE)
    good = {int(index) for index, _ in decoded.ignore_errors().as_numpy_iterator()}
    bad = []
    for index in sorted(set(range(len(paths))) - good):
        try:
            decode_image(tf.io.read_file(str(paths[index])), 3)
            reason = "cannot be decoded"
        except tf.errors.OpError as error:
            reason = f"cannot be decoded ({tensorflow_reason(error)})"
        bad.append((str(paths[index]), reason))
    return bad


def tensorflow_reason(error) -> str:
    """TensorFlow's own words from an OpError, without its op and device decorations."""
    import re

    text = error.message.splitlines()[0] if error.message else type(error).__name__
    text = re.sub(r"\{\{[^}]*\}\}", "", text)
    text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text)
    return text.strip() or type(error).__name__


def read_images(paths: Sequence[str | Path], input_shape: Sequence[int], *,
                max_pixels: int = MAX_IMAGE_PIXELS, what: str = "--images:",
                resize: str = "stretch") -> np.ndarray:
    """Check, decode and resize image files: float32 (N, H, W, C) in 8-bit units.

    Args:
        paths: image files.
        input_shape: the model's (H, W, C); C is 1 or 3.
        max_pixels: refuse files with more pixels than this, before decoding them.
        what: how the one-line error names the source of the files.
        resize: "stretch" (as training does: `load_image`), "crop" or "pad" (the aspect ratio
            kept, `cnnviz.preprocess.resize_pixels`).
    """
    from cnnviz._quiet import tensorflow_available

    if resize not in RESIZE_MODES:
        raise CnnvizError(f"--resize {resize!r} is not a mode; choose one of "
                          f"{', '.join(RESIZE_MODES)}")
    height, width, channels = (int(side) for side in input_shape)
    if channels not in (1, 3):
        raise CnnvizError(
            f"{what} image files can be read for models with 1 or 3 input channels; this model "
            f"has {channels}")
    images = np.zeros((len(paths), height, width, channels), np.float32)
    for row, path in enumerate(paths):
        if not Path(path).exists():
            raise CnnvizError(f"{what} image file {path} does not exist")
        check_image_file(path, max_pixels=max_pixels, what=f"{what} image file".strip())
        if not tensorflow_available():
            images[row] = resize_pixels(decode_with_pillow(path, channels, what=what),
                                        (height, width), resize)
            continue
        import tensorflow as tf

        try:
            if resize == "stretch":
                images[row] = load_image(tf.constant(str(path)), (height, width), channels)
            else:
                native = decode_image(tf.io.read_file(str(path)), channels).numpy()
                images[row] = resize_pixels(native, (height, width), resize)
        except tf.errors.OpError as error:
            raise CnnvizError(f"{what} image file {path} cannot be decoded "
                              f"({tensorflow_reason(error)})") from None
    return images


# ---------------------------------------------------------------------------- finding files
def is_image_file(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def image_files_in(folder: str | Path) -> list[Path]:
    """Every image file under `folder` (recursively), in sorted order, as Keras walks folders."""
    found = []
    for root, _, names in sorted(os.walk(folder), key=lambda entry: entry[0]):
        found.extend(Path(root) / name for name in sorted(names) if is_image_file(name))
    return found


def expand_image_spec(spec: str) -> list[Path] | None:
    """The image files an `--images` value names, or None when it names test-split indices.

    Accepts comma-separated image files, folders (every image inside, recursively) and globs
    (`photos/*.jpg`, `data/**/*.png`).
    """
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    if not parts or not any(_names_files(part) for part in parts):
        return None
    paths: list[Path] = []
    for part in parts:
        if any(char in part for char in "*?["):
            matches = sorted(Path(match) for match in glob.glob(part, recursive=True)
                             if is_image_file(match) and Path(match).is_file())
            if not matches:
                raise CnnvizError(f"--images {part!r} matches no image file "
                                  f"({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(matches)
        elif Path(part).is_dir():
            inside = image_files_in(part)
            if not inside:
                raise CnnvizError(f"--images {part!r} is a folder with no image file "
                                  f"({', '.join(IMAGE_SUFFIXES)}) in it")
            paths.extend(inside)
        else:
            paths.append(Path(part))
    return paths


def _names_files(part: str) -> bool:
    return (is_image_file(part) or any(char in part for char in "*?[") or "/" in part
            or Path(part).is_dir())


RESIZE_MODES = ("stretch", "crop", "pad")


def resize_pixels(pixels, size: tuple[int, int], how: str = "stretch") -> np.ndarray:
    """One image (H, W, C) resized to `size` = (height, width), bilinear, as float32.

    stretch: to the size whatever the aspect ratio (image_dataset_from_directory's default);
    crop: the largest centred window of the target aspect ratio, then resized (Keras's
    `smart_resize`, `crop_to_aspect_ratio=True`); pad: black borders to the target aspect ratio,
    centred, then resized (Keras's `pad_to_aspect_ratio=True`).
    """
    if how not in RESIZE_MODES:
        raise CnnvizError(
            f"--resize {how!r} is not a mode; choose one of {', '.join(RESIZE_MODES)}")
    image = np.asarray(pixels, dtype=np.float32)
    height, width = (int(side) for side in size)
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(_aspect_resizing((height, width), how)(image), dtype=np.float32)


def _aspect_resizing(size: Sequence[int], how: str):
    """Keras's Resizing layer for `how` (stretch, crop or pad), bilinear, black padding."""
    import keras

    return keras.layers.Resizing(int(size[0]), int(size[1]), interpolation="bilinear",
                                 crop_to_aspect_ratio=how == "crop",
                                 pad_to_aspect_ratio=how == "pad", fill_value=0.0)
