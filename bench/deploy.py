"""Benchmark: `cnnviz evaluate --data DIR` and `cnnviz predict --images DIR` on image folders.

Generates folders of JPEGs (4 class sub-folders; 2,000 and 10,000 images by default) in a
temporary directory, a small CNN that begins with a Rescaling layer (as cnnviz models do, D1),
and measures in one run, each command in its own process under /usr/bin/time -v:

* peak RSS at the large folder vs the small one (flat memory: the ratio stays near 1);
* peak RSS and wall time against the plain Keras loop a user would write
  (`image_dataset_from_directory` + `model.evaluate` / `model.predict`, same batch).

    python3 bench/deploy.py [--small 2000] [--large 10000] [--size 64]

Prints a table and writes it as JSON to outputs/bench/deploy-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("circle", "square", "stripes", "noise")

PLAIN = """
import sys, keras, numpy as np
model = keras.models.load_model(sys.argv[1], compile=False)
data = keras.utils.image_dataset_from_directory(sys.argv[2], image_size=(int(sys.argv[3]),) * 2,
                                                batch_size=64, shuffle=False, verbose=False)
if sys.argv[4] == "evaluate":
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    print(model.evaluate(data, verbose=0, return_dict=True))
else:
    print(model.predict(data.map(lambda x, y: x), verbose=0).shape)
"""


def make_folder(root: Path, count: int, size: int) -> Path:
    """`count` JPEGs, a quarter per class, each drawn so the classes differ."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(count)
    for index in range(count):
        name = CLASSES[index % len(CLASSES)]
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 80, (size, size, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        low, high = sorted(rng.integers(4, size - 4, 2))
        if name == "circle":
            draw.ellipse((low, low, high + 2, high + 2), fill=(230, 230, 230))
        elif name == "square":
            draw.rectangle((low, low, high + 2, high + 2), fill=(230, 230, 230))
        elif name == "stripes":
            for x in range(0, size, 6):
                draw.line((x, 0, x, size), fill=(200, 200, 200), width=2)
        image.save(folder / f"{index:05d}.jpg", quality=90)
    return root


def make_model(path: Path, size: int) -> Path:
    import keras

    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(16, 3, activation="relu")(x)
    x = keras.layers.MaxPooling2D(4)(x)
    x = keras.layers.Conv2D(32, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(CLASSES), activation="softmax")(x)
    keras.Model(inputs, outputs).save(path)
    return path


def measure(command: list[str]) -> dict:
    """Wall seconds and peak RSS (MiB) of one process."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True,
                            env=environment, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)[1])
    return {"seconds": round(seconds, 2), "rss_mib": round(peak / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=10000)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    args = parser.parse_args()
    cnnviz = [sys.executable, "-m", "cnnviz.cli"]
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = make_model(scratch / "model.keras", args.size)
        for count in (args.small, args.large):
            folder = make_folder(scratch / f"images{count}", count, args.size)
            rows[f"evaluate {count}"] = measure(
                [*cnnviz, "evaluate", str(model), "--data", str(folder), "--out",
                 str(scratch / f"evaluation{count}")])
            rows[f"plain evaluate {count}"] = measure(
                [sys.executable, "-c", PLAIN, str(model), str(folder), str(args.size), "evaluate"])
            rows[f"predict {count}"] = measure(
                [*cnnviz, "predict", str(model), "--images", str(folder), "--csv",
                 str(scratch / f"predictions{count}.csv")])
            rows[f"plain predict {count}"] = measure(
                [sys.executable, "-c", PLAIN, str(model), str(folder), str(args.size), "predict"])
    small, large = args.small, args.large
    ratios = {}
    for name in ("evaluate", "predict"):
        ratios[f"{name}: RSS at {large} / at {small} (flat: <= 1.25)"] = round(
            rows[f"{name} {large}"]["rss_mib"] / rows[f"{name} {small}"]["rss_mib"], 3)
        ratios[f"{name}: RSS / plain Keras at {large}"] = round(
            rows[f"{name} {large}"]["rss_mib"] / rows[f"plain {name} {large}"]["rss_mib"], 3)
        ratios[f"{name}: time / plain Keras at {large}"] = round(
            rows[f"{name} {large}"]["seconds"] / rows[f"plain {name} {large}"]["seconds"], 3)
    for name, row in rows.items():
        print(f"{name:<24} {row['seconds']:>8.2f} s {row['rss_mib']:>9.1f} MiB")
    for name, value in ratios.items():
        print(f"{name:<52} {value:>7.3f}")
    out = ROOT / "outputs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"deploy-{stamp}.json").write_text(json.dumps(
        {"args": vars(args), "rows": rows, "ratios": ratios,
         "load_average": os.getloadavg()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
