"""Benchmark: `cnnviz evaluate --data DIR` and `cnnviz predict --images DIR` on image folders.

Generates folders of JPEGs (4 class sub-folders; 2,000 and 10,000 images by default) in a
temporary directory, a small CNN that begins with a Rescaling layer (as cnnviz models do, D1),
and measures in one run, each command in its own process under /usr/bin/time -v:

* peak RSS at the large folder vs the small one (flat memory: the ratio stays near 1);
* peak RSS, wall and CPU time against the plain Keras loop a user would write
  (`image_dataset_from_directory` + `model.evaluate` / `model.predict`, same batch), and the
  accuracy both compute.

    python3 bench/deploy.py [--small 2000] [--large 10000] [--size 64]

Prints a table and writes it as JSON to OUT/deploy-<timestamp>.json (and deploy-latest.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUIET_ENV, save_report, timed_process  # bench/common.py: the shared helpers

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("circle", "square", "stripes", "noise")

PLAIN = """
import json, sys, keras
model = keras.models.load_model(sys.argv[1], compile=False)
data = keras.utils.image_dataset_from_directory(sys.argv[2], image_size=(int(sys.argv[3]),) * 2,
                                                batch_size=64, shuffle=False, verbose=False)
if sys.argv[4] == "evaluate":
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    print(json.dumps(model.evaluate(data, verbose=0, return_dict=True)))
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
    from cnnviz._quiet import import_keras_quietly

    import_keras_quietly()  # this process builds the model: no start-up lines
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=10000)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    args = parser.parse_args()
    env = {**os.environ, **QUIET_ENV, "PYTHONPATH": str(ROOT)}
    cnnviz = [sys.executable, "-m", "cnnviz.cli"]
    rows = {}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = make_model(scratch / "model.keras", args.size)
        for count in (args.small, args.large):
            folder = make_folder(scratch / f"images{count}", count, args.size)
            evaluation = scratch / f"evaluation{count}"
            rows[f"evaluate {count}"] = timed_process(
                [*cnnviz, "evaluate", str(model), "--data", str(folder), "--out", str(evaluation)],
                env)
            written = json.loads((evaluation / "evaluation.json").read_text())
            rows[f"evaluate {count}"] |= {"accuracy": written["accuracy"],
                                          "loss": written["log_loss"]}
            rows[f"plain evaluate {count}"] = timed_process(
                [sys.executable, "-c", PLAIN, str(model), str(folder), str(args.size), "evaluate"],
                env)
            rows[f"predict {count}"] = timed_process(
                [*cnnviz, "predict", str(model), "--images", str(folder), "--csv",
                 str(scratch / f"predictions{count}.csv")], env)
            rows[f"plain predict {count}"] = timed_process(
                [sys.executable, "-c", PLAIN, str(model), str(folder), str(args.size), "predict"],
                env)
            load.append(os.getloadavg()[0])
    small, large = args.small, args.large
    ratios = {}
    for name in ("evaluate", "predict"):
        ours, plain = rows[f"{name} {large}"], rows[f"plain {name} {large}"]
        ratios[f"{name}: RSS at {large} / at {small} (flat: <= 1.25)"] = round(
            ours["rss_mib"] / rows[f"{name} {small}"]["rss_mib"], 3)
        ratios[f"{name}: RSS / plain Keras at {large}"] = round(
            ours["rss_mib"] / plain["rss_mib"], 3)
        ratios[f"{name}: wall time / plain Keras at {large}"] = round(
            ours["wall_s"] / plain["wall_s"], 3)
        ratios[f"{name}: CPU time / plain Keras at {large}"] = round(
            ours["cpu_s"] / plain["cpu_s"], 3)
    print(f"{'':<24} {'wall':>8}   {'CPU':>8}   {'peak RSS':>12}")
    for name, row in rows.items():
        print(f"{name:<24} {row['wall_s']:>8.2f} s {row['cpu_s']:>8.2f} s "
              f"{row['rss_mib']:>8.1f} MiB")
    for name, value in ratios.items():
        print(f"{name:<52} {value:>7.3f}")
    ours, plain = rows[f"evaluate {large}"], rows[f"plain evaluate {large}"]
    print(f"accuracy, loss: cnnviz evaluate {ours['accuracy']:.4f}, {ours['loss']:.6f}; plain "
          f"Keras {plain['accuracy']:.4f}, {plain['loss']:.6f}")
    print(f"load average {' -> '.join(f'{value:.1f}' for value in load)}")
    save_report(args.out, "deploy-", {"args": {**vars(args), "out": str(args.out)},
                                      "rows": rows, "ratios": ratios, "load_average": load})


if __name__ == "__main__":
    main()
