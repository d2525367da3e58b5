"""Data at scale: `cnnviz train` on a folder of JPEGs against the plain Keras streaming loop.

    python bench/data.py                 # 8,000 JPEGs (160x160, 4 classes), ~5-10 minutes
    python bench/data.py --images 2000   # a quicker run (the flatness row then uses 500)
    python bench/data.py --keep DIR      # generate (or reuse) the folders in DIR

It writes a folder of N JPEGs (160x160 RGB, 4 class sub-folders; textured noise with a class
shape, so the model learns something) and a second folder holding a quarter of them (hard
links), then runs, each in its own process under `/usr/bin/time -v`:

  plain Keras   `keras.utils.image_dataset_from_directory(folder, image_size=(160, 160),
                batch_size=64)` + a model beginning with Rescaling(1/255) + `fit`, one epoch;
  cnnviz        `python -m cnnviz.cli train CONFIG` on the same folder, the same model and batch,
                one epoch, every default (10% validation, 20% test held out by file; the run
                directory, checkpoints, history, curves, the file lists);

on the full folder and on the quarter folder (flatness; plain Keras there as a reference).
Reported: peak
RSS (Maximum resident set size), wall time and CPU time (user + system: less moved by other
work on a shared machine than wall time) of each process, the fit's own images/s, and
the ratios with their targets from issue 9: peak RSS <= 1.5x plain Keras, RSS at N <= 1.25x
RSS at N/4 (memory flat in the number of images), wall time <= 1.25x plain Keras. Each pair
is measured in the same run, alternating sides (`--repeats`, best of), because the machine
may be shared: the ratios are the point. Writes OUT/data-<timestamp>.json and
OUT/data-latest.json. Nothing here asserts: tests never time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timed_process  # bench/common.py: the shared helpers

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("circle", "square", "triangle", "cross")
SIZE = 160
BATCH = 64
# The one model both sides train (after a Rescaling(1/255) input layer).
LAYERS = [
    {"type": "conv2d", "filters": 16, "kernel": 3, "padding": "same", "name": "conv1"},
    {"type": "max_pool2d", "pool": 2, "name": "pool1"},
    {"type": "conv2d", "filters": 32, "kernel": 3, "padding": "same", "name": "conv2"},
    {"type": "max_pool2d", "pool": 2, "name": "pool2"},
    {"type": "conv2d", "filters": 64, "kernel": 3, "padding": "same", "name": "conv3"},
    {"type": "max_pool2d", "pool": 2, "name": "pool3"},
    {"type": "global_avg_pool2d", "name": "gap"},
    {"type": "dense", "units": 32, "name": "dense"},
]

PLAIN = """
import json, sys, time
import keras

folder = sys.argv[1]
started = time.perf_counter()
data = keras.utils.image_dataset_from_directory(folder, image_size=(%(size)d, %(size)d),
                                                batch_size=%(batch)d, seed=42, verbose=False)
model = keras.Sequential([
    keras.Input((%(size)d, %(size)d, 3)),
    keras.layers.Rescaling(1 / 255),
    keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
    keras.layers.MaxPooling2D(2),
    keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
    keras.layers.MaxPooling2D(2),
    keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
    keras.layers.MaxPooling2D(2),
    keras.layers.GlobalAveragePooling2D(),
    keras.layers.Dense(32, activation="relu"),
    keras.layers.Dense(%(classes)d, activation="softmax"),
])
model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
fit_started = time.perf_counter()
history = model.fit(data, epochs=1, verbose=2)
fit = time.perf_counter() - fit_started
print(json.dumps({"fit_seconds": fit, "fit_images": len(data.file_paths),
                  "accuracy": history.history["accuracy"][-1]}))
"""


def make_folder(folder: Path, count: int, seed: int = 0) -> None:
    """`count` JPEGs, 160x160, an equal share per class: a bright class shape on textured
    noise (about 16 KB each, like photos of that size)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for index in range(count):
        label = index % len(CLASSES)
        target = folder / CLASSES[label] / f"{index:05d}.jpg"
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 120, (SIZE // 8, SIZE // 8, 3), dtype=np.uint8)
        noise = np.kron(base, np.ones((8, 8, 1), np.uint8))
        noise = np.clip(noise + rng.integers(0, 60, noise.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(noise)
        draw = ImageDraw.Draw(image)
        centre, radius = rng.integers(50, 110, 2), int(rng.integers(20, 40))
        box = [centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius]
        colour = tuple(int(value) for value in rng.integers(150, 256, 3))
        if label == 0:
            draw.ellipse(box, fill=colour)
        elif label == 1:
            draw.rectangle(box, fill=colour)
        elif label == 2:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), (centre[0], box[1])], fill=colour)
        else:
            draw.line([(box[0], box[1]), (box[2], box[3])], fill=colour, width=10)
            draw.line([(box[0], box[3]), (box[2], box[1])], fill=colour, width=10)
        image.save(target, quality=90)


def quarter_folder(full: Path, small: Path, count: int) -> None:
    """The first `count` images of `full` (equal per class), as hard links."""
    for name in CLASSES:
        files = sorted((full / name).iterdir())[: count // len(CLASSES)]
        (small / name).mkdir(parents=True, exist_ok=True)
        for path in files:
            link = small / name / path.name
            if not link.exists():
                os.link(path, link)


def config_file(folder: Path, path: Path) -> Path:
    import yaml

    config = {
        "name": f"bench-{folder.name}",
        "seed": 42,
        "data": {"source": "directory", "path": str(folder), "image_size": [SIZE, SIZE]},
        "model": {"layers": LAYERS},
        "train": {"epochs": 1, "batch_size": BATCH, "verbose": 2, "early_stopping": None},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def plain_keras(folder: Path, env: dict) -> dict:
    code = textwrap.dedent(PLAIN % {"size": SIZE, "batch": BATCH, "classes": len(CLASSES)})
    return timed_process([sys.executable, "-c", code, str(folder)], env)


def cnnviz_train(config: Path, out: Path, env: dict) -> dict:
    result = timed_process([sys.executable, "-m", "cnnviz.cli", "train", str(config),
                            "--out", str(out)], env)
    metrics_file = max(out.glob("*/*/metrics.json"))
    metrics = json.loads(metrics_file.read_text())
    result.update(fit_seconds=metrics["seconds"], fit_images=metrics["train_images"]
                  + metrics.get("validation_images", 0), accuracy=metrics["test_accuracy"])
    return result


def best(runs: list[dict]) -> dict:
    """The fastest run, with the lowest RSS and CPU time seen (each a best-of the repeats)."""
    fastest = min(runs, key=lambda run: run["wall_s"])
    return {**fastest, "rss_mib": min(run["rss_mib"] for run in runs),
            "cpu_s": min(run["cpu_s"] for run in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="Folder for the images (reused).")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    args = parser.parse_args()

    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    with tempfile.TemporaryDirectory(prefix="cnnviz-bench-data-") as scratch:
        base = args.keep or Path(scratch)
        full, small = base / f"jpegs-{args.images}", base / f"jpegs-{args.images // 4}"
        started = time.perf_counter()
        make_folder(full, args.images)
        quarter_folder(full, small, args.images // 4)
        megabytes = sum(path.stat().st_size for path in full.rglob("*.jpg")) / 2**20
        print(f"{args.images} JPEGs, {megabytes:.0f} MB, in {full} "
              f"({time.perf_counter() - started:.0f} s to make)", flush=True)
        configs = {folder: config_file(folder, Path(scratch) / f"{folder.name}.yaml")
                   for folder in (full, small)}
        runs: dict[str, list[dict]] = {"plain": [], "cnnviz": [], "cnnviz_small": [],
                                       "plain_small": []}
        load = os.getloadavg()
        for repeat in range(args.repeats):
            out = Path(scratch) / f"runs-{repeat}"
            runs["plain"].append(plain_keras(full, env))
            print(f"plain Keras:  {runs['plain'][-1]}", flush=True)
            runs["cnnviz"].append(cnnviz_train(configs[full], out / "full", env))
            print(f"cnnviz train: {runs['cnnviz'][-1]}", flush=True)
            runs["cnnviz_small"].append(cnnviz_train(configs[small], out / "small", env))
            print(f"cnnviz train, {args.images // 4} images: {runs['cnnviz_small'][-1]}",
                  flush=True)
            runs["plain_small"].append(plain_keras(small, env))
            print(f"plain Keras, {args.images // 4} images: {runs['plain_small'][-1]}", flush=True)
        load = (load, os.getloadavg())

    plain, ours, small_run = best(runs["plain"]), best(runs["cnnviz"]), best(runs["cnnviz_small"])
    plain_small = best(runs["plain_small"])
    fit_ratio = ((ours["fit_images"] / ours["fit_seconds"])
                 / (plain["fit_images"] / plain["fit_seconds"]))
    rows = [
        ("peak RSS, plain Keras", f"{plain['rss_mib']:,.0f} MiB", "", ""),
        ("peak RSS, cnnviz train", f"{ours['rss_mib']:,.0f} MiB",
         f"{ours['rss_mib'] / plain['rss_mib']:.2f} x plain", "<= 1.5"),
        (f"peak RSS, cnnviz train at {args.images:,} vs {args.images // 4:,} images",
         f"{small_run['rss_mib']:,.0f} MiB at {args.images // 4:,}",
         f"{ours['rss_mib'] / small_run['rss_mib']:.2f} x", "<= 1.25"),
        (f"peak RSS, plain Keras at {args.images:,} vs {args.images // 4:,} images (reference)",
         f"{plain_small['rss_mib']:,.0f} MiB at {args.images // 4:,}",
         f"{plain['rss_mib'] / plain_small['rss_mib']:.2f} x", ""),
        ("wall time, plain Keras (1 epoch, whole process)", f"{plain['wall_s']:.1f} s", "", ""),
        ("wall time, cnnviz train (1 epoch, whole process)", f"{ours['wall_s']:.1f} s",
         f"{ours['wall_s'] / plain['wall_s']:.2f} x plain", "<= 1.25"),
        ("CPU time (user + system), plain Keras", f"{plain['cpu_s']:.1f} s", "", ""),
        ("CPU time (user + system), cnnviz train", f"{ours['cpu_s']:.1f} s",
         f"{ours['cpu_s'] / plain['cpu_s']:.2f} x plain", ""),
        ("fit throughput, plain Keras",
         f"{plain['fit_images'] / plain['fit_seconds']:,.0f} images/s",
         "", ""),
        ("fit throughput, cnnviz (train + validation images)",
         f"{ours['fit_images'] / ours['fit_seconds']:,.0f} images/s",
         f"{fit_ratio:.2f} x plain",
         ""),
    ]
    verdicts = []
    for name, value, ratio, target in rows:
        verdict = ""
        if target:
            number = float(ratio.split()[0])
            verdict = "PASS" if number <= float(target.split()[-1]) else "FAIL"
        verdicts.append(verdict)
    print(f"\nload average {load[0][0]:.1f} before, {load[1][0]:.1f} after; "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    print("| measurement | value | ratio | target | result |\n|---|---|---|---|---|")
    for (name, value, ratio, target), verdict in zip(rows, verdicts):
        print(f"| {name} | {value} | {ratio} | {target} | {verdict} |")
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"images": args.images, "megabytes": megabytes, "runs": runs,
               "load_average": load, "rows": [list(row) + [verdict] for row, verdict in
                                              zip(rows, verdicts)]}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (f"data-{stamp}.json", "data-latest.json"):
        (args.out / name).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out / f'data-{stamp}.json'}")


if __name__ == "__main__":
    main()
