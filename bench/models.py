"""cnnviz on real models: cost of each explanation in forward passes, beside plain Keras.

    python bench/models.py                   # digits CNN, ResNet50, MobileNetV2 feature maps
    python bench/models.py --quick           # digits CNN rows only (a minute)
    python bench/models.py --sections feature-maps --baseline-commit e8687f2
                                             # feature-maps beside that commit's code, same run

For each model and request size B, measured in one process: every contender is called once
per round, for --repeats rounds (taking turns, so all see the same machine load), and the
fastest call counts; one untimed call first (tracing and model copies are excluded; the
one-time cost is reported apart):

  forward     a compiled `tf.function` forward pass on the B images: the unit of every row.
  plain tape  a compiled `tf.function` with a GradientTape: the gradient of each image's top
              score with respect to its pixels, written as a user would. Target: cnnviz
              saliency (vanilla) <= 1.1 x this.
  saliency    `cnnviz.explain.saliency(model, images, method="vanilla")`.
  grad-cam    `cnnviz.explain.gradcam(model, images)`. Target: <= 1.5 forward passes.
  occlusion   `cnnviz.explain.occlusion(model, images, patch, stride)`, against its forward
              floor: the same occluded images, made beforehand, through the compiled forward
              pass in chunks. Target: <= 1.3 x the floor, and >= 20 x a naive loop (one
              `model.predict` per window, timed on one image).

Models: keras.applications ResNet50 (224 x 224, weights=None, BatchNorm statistics set from
one batch, batch of 8; occlusion patch 16, stride 16 on 2 of them; a quarter of the rounds) and
the digits CNN of configs/digits.yaml (28 x 28,
untrained; B = 4 and 256, patch 4). Plus `cnnviz feature-maps` on a flat MobileNetV2
(224 x 224, weights=None) for 3 images at its defaults, as a subprocess (start-up included);
the issue's reference is 249 s on this machine; --baseline-commit runs that commit's code on
the same model and images in the same run, for a ratio.

Timings on a shared machine are noisy: the ratios, measured in one run, are the point. The
load average at the start and end is printed. Nothing here asserts: tests never time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # bench/common.py: the shared timing and table helpers
sys.path.insert(1, str(ROOT))  # run from a checkout without installing

import numpy as np
from common import QUIET_ENV, Row, begin, print_table, save_report


def _calibrated(model, shape, seed: int = 0):
    """Set every BatchNormalization's moving statistics from one batch of noise (momentum 0),
    so the network is not the identity-BN network of a fresh build."""
    import keras

    layers = [layer for layer in model._flatten_layers()
              if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    noise = np.random.default_rng(seed).uniform(0, 1, (8, *shape)).astype(np.float32)
    model(noise, training=True)
    for layer, momentum in zip(layers, saved):
        layer.momentum = momentum
    return model


def interleaved_best(functions: dict, repeats: int) -> dict:
    """{name: fastest seconds}, each function called once per round, round after round.

    On a shared machine the load changes by the second; taking turns gives every contender
    the same conditions, so the ratios between them hold even when the absolute times do not.
    """
    for function in functions.values():  # untimed: tracing, caches
        function()
    best = dict.fromkeys(functions, float("inf"))
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def _compiled_forward(model, count: int, shape):
    import tensorflow as tf

    return tf.function(lambda x: model(x, training=False),
                       input_signature=[tf.TensorSpec((count, *shape), tf.float32)])


def _plain_tape(model, count: int, shape):
    """What a user writes: the gradient of each image's top score, one compiled function."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((count, *shape), tf.float32)])
    def gradients(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            scores = tf.reduce_max(model(x, training=False), axis=-1)
        return tape.gradient(scores, x)

    return gradients


def _occluded(images: np.ndarray, patch: int, stride: int, fill: float) -> np.ndarray:
    copies = []
    height, width = images.shape[1:3]
    for image in images:
        for top in range(0, height - patch + 1, stride):
            for left in range(0, width - patch + 1, stride):
                hidden = image.copy()
                hidden[top:top + patch, left:left + patch] = fill
                copies.append(hidden)
    return np.stack(copies)


def _naive_occlusion_seconds(model, image: np.ndarray, patch: int, stride: int,
                             fill: float) -> float:
    """One `model.predict` per window of one image (plus the intact image)."""
    started = time.perf_counter()
    model.predict(image[None], verbose=0)
    for hidden in _occluded(image[None], patch, stride, fill):
        model.predict(hidden[None], verbose=0)
    return time.perf_counter() - started


def bench_model(label: str, model, images: np.ndarray, *, patch: int, stride: int,
                repeats: int, naive: bool = True,
                occlusion_images: int | None = None) -> tuple[list[Row], dict]:
    """The rows for one model and one request (all of `images`; occlusion on the first
    `occlusion_images` of them, to keep a big model's run short)."""
    import tensorflow as tf

    from cnnviz.explain import gradcam, occlusion, saliency
    from cnnviz.model.compiled import batch_size_for, chunk_size, model_copy

    count, shape = len(images), images.shape[1:]
    batch = tf.constant(images)
    forward = _compiled_forward(model, count, shape)
    tape = _plain_tape(model, count, shape)

    started = time.perf_counter()
    saliency(model, images, method="vanilla")
    first_call = time.perf_counter() - started

    fill = 0.5
    hidden = images[:occlusion_images]
    occluded = _occluded(hidden, patch, stride, fill)
    size = chunk_size(len(occluded) + len(hidden),
                      batch_size_for(model_copy(model, "probabilities"), None))
    floor_forward = _compiled_forward(model, size, shape)
    padded = np.concatenate([occluded, np.zeros((-len(occluded) % size, *shape), np.float32)])
    pieces = [tf.constant(padded[start:start + size]) for start in range(0, len(padded), size)]
    timed = interleaved_best({
        "forward": lambda: forward(batch).numpy(),
        "tape": lambda: tape(batch).numpy(),
        "saliency": lambda: saliency(model, images, method="vanilla"),
        "gradcam": lambda: gradcam(model, images),
        "floor": lambda: [floor_forward(piece).numpy() for piece in pieces],
        "occlusion": lambda: occlusion(model, hidden, patch=patch, stride=stride, fill=fill),
    }, repeats)
    forward_s, tape_s, saliency_s = timed["forward"], timed["tape"], timed["saliency"]
    gradcam_s, floor_s, occlusion_s = timed["gradcam"], timed["floor"], timed["occlusion"]
    windows = len(occluded) // len(hidden)

    def unit(seconds):
        return seconds / forward_s

    name = f"{label}, {count} image(s)"
    rows = [
        Row(name, "forward pass (compiled)", forward_s * 1000, "ms", note=f"input {shape}"),
        Row(name, "plain compiled GradientTape", unit(tape_s), "forward passes"),
        Row(name, "saliency (vanilla)", unit(saliency_s), "forward passes", "plain tape",
            saliency_s / tape_s, "x plain tape", "<= 1.1", saliency_s / tape_s <= 1.1,
            note=f"first call (copy + tracing) {first_call:.1f} s"),
        Row(name, "grad-cam (default layer)", unit(gradcam_s), "forward passes", "forward",
            unit(gradcam_s), "x forward", "<= 1.5", unit(gradcam_s) <= 1.5),
        Row(name, f"occlusion {patch}x{patch} stride {stride}", unit(occlusion_s),
            "forward passes", "forward floor", occlusion_s / floor_s, "x floor", "<= 1.3",
            occlusion_s / floor_s <= 1.3,
            note=f"on {len(hidden)} image(s), {windows} windows each; floor: the "
                 f"{len(occluded)} occluded images through the compiled forward in chunks "
                 f"of {size}"),
    ]
    raw = {"forward_s": forward_s, "tape_s": tape_s, "saliency_s": saliency_s,
           "gradcam_s": gradcam_s, "occlusion_s": occlusion_s, "floor_s": floor_s,
           "saliency_first_call_s": first_call, "windows": windows, "chunk": size}
    if naive:
        naive_s = _naive_occlusion_seconds(model, images[0], patch, stride, fill)
        per_image = occlusion_s / len(hidden)
        rows.append(Row(name, "occlusion vs naive predict per window", naive_s / per_image,
                        "x faster", "naive loop", naive_s / per_image, "x faster", ">= 20",
                        naive_s / per_image >= 20,
                        note=f"naive: {windows + 1} model.predict calls on one image, "
                             f"{naive_s:.1f} s"))
        raw["naive_s_per_image"] = naive_s
    return rows, raw


def resnet50_rows(repeats: int) -> tuple[list[Row], dict]:
    import keras

    keras.utils.set_random_seed(0)
    model = _calibrated(keras.applications.ResNet50(weights=None), (224, 224, 3))
    images = np.random.default_rng(1).uniform(0, 1, (8, 224, 224, 3)).astype(np.float32)
    return bench_model("ResNet50 224x224", model, images, patch=16, stride=16,
                       repeats=repeats, occlusion_images=2)


def digits_rows(repeats: int) -> tuple[list[Row], dict]:
    import keras

    from cnnviz.config.loading import load_config
    from cnnviz.model.summary import model_from_config

    keras.utils.set_random_seed(0)
    model = model_from_config(load_config(ROOT / "configs" / "digits.yaml", []))
    rows, raw = [], {}
    for count in (4, 256):
        images = np.random.default_rng(count).uniform(0, 1, (count, 28, 28, 1)).astype(np.float32)
        part, raw[count] = bench_model("digits CNN 28x28", model, images, patch=4, stride=4,
                                       repeats=repeats, naive=count == 4)
        rows += part
    return rows, raw


def _mobilenet_files(folder: Path) -> tuple[Path, str]:
    import keras
    from PIL import Image

    keras.utils.set_random_seed(0)
    model = _calibrated(keras.applications.MobileNetV2(weights=None), (224, 224, 3))
    path = folder / "mobilenetv2.keras"
    model.save(path)
    rng = np.random.default_rng(2)
    pictures = []
    for index in range(3):
        picture = folder / f"photo{index}.png"
        Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(picture)
        pictures.append(str(picture))
    return path, ",".join(pictures)


def _timed_command(command: list[str], code: Path) -> tuple[int, float, int]:
    """Run `command` with the cnnviz package of the checkout `code` (its folder is the working
    directory, which `python -m` puts first on sys.path)."""
    environment = {**os.environ, **QUIET_ENV, "PYTHONPATH": str(code)}
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=environment, cwd=code)
    _, status, usage = os.wait4(process.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - started, int(usage.ru_maxrss)


def feature_map_rows(folder: Path, baseline_commit: str | None) -> tuple[list[Row], dict]:
    model, pictures = _mobilenet_files(folder)

    def run(code: Path, out: Path):
        command = [sys.executable, "-m", "cnnviz.cli", "feature-maps", str(model), "--images",
                   pictures, "--out", str(out)]
        code_, seconds, rss = _timed_command(command, code)
        figures = len(list(out.glob("*.png"))) if out.exists() else 0
        return code_, seconds, rss, figures

    status, seconds, rss, figures = run(ROOT, folder / "ours")
    reference = 249.0
    rows = [Row("MobileNetV2 224x224, 3 images", "cnnviz feature-maps (defaults)",
                seconds, "s", "issue's 249 s", seconds / reference, "x 249 s", "< 0.1",
                status == 0 and seconds / reference < 0.1,
                note=f"exit {status}, {figures} figures, peak RSS {rss / 1024:.0f} MiB, "
                     "start-up included")]
    raw = {"seconds": seconds, "figures": figures, "peak_rss_kib": rss, "exit": status}
    if baseline_commit:
        code = folder / "baseline"
        code.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", baseline_commit],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
        status_b, seconds_b, rss_b, figures_b = run(code, folder / "baseline-out")
        rows.append(Row("MobileNetV2 224x224, 3 images", f"feature-maps at {baseline_commit}",
                        seconds_b, "s", note=f"exit {status_b}, {figures_b} figures, peak RSS "
                                             f"{rss_b / 1024:.0f} MiB"))
        rows.append(Row("MobileNetV2 224x224, 3 images", "ours vs that commit, same run",
                        seconds / seconds_b, "x", f"{baseline_commit}", seconds / seconds_b,
                        "x baseline", "< 0.1", seconds / seconds_b < 0.1))
        raw["baseline"] = {"commit": baseline_commit, "seconds": seconds_b,
                           "figures": figures_b, "exit": status_b}
    return rows, raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits CNN rows only")
    parser.add_argument("--sections", default="digits,resnet50,feature-maps",
                        help="comma-separated: digits, resnet50, feature-maps")
    parser.add_argument("--repeats", type=int, default=10, help="rounds of timed calls")
    parser.add_argument("--baseline-commit", default=None,
                        help="also time `feature-maps` with this commit's code, same run")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    arguments = parser.parse_args(argv)
    values = begin("cnnviz bench: real models", arguments.quick)
    started = time.perf_counter()
    rows: list[Row] = []
    raw: dict = {}
    sections = {"digits"} if arguments.quick else set(arguments.sections.split(","))
    if "digits" in sections:
        print("digits CNN ...", flush=True)
        part, raw["digits"] = digits_rows(arguments.repeats)
        rows += part
    if "resnet50" in sections:
        print("ResNet50 ...", flush=True)
        part, raw["resnet50"] = resnet50_rows(max(2, arguments.repeats // 4))
        rows += part
    if "feature-maps" in sections:
        print("MobileNetV2 feature maps ...", flush=True)
        folder = Path(tempfile.mkdtemp(prefix="cnnviz-bench-models-"))
        try:
            part, raw["feature_maps"] = feature_map_rows(folder, arguments.baseline_commit)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        rows += part
    values["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    print()
    print_table(rows)
    targets = [row for row in rows if row.passed is not None]
    print(f"\n{sum(row.passed for row in targets)}/{len(targets)} targets met; "
          f"{time.perf_counter() - started:.0f} s; load average at start "
          f"{values['load_average_at_start']}, at end {values['load_average_at_end']}")
    save_report(arguments.out, "models-",
                {"settings": values, "rows": [asdict(row) for row in rows], "raw": raw})
    return 0


if __name__ == "__main__":
    sys.exit(main())
