"""Benchmark: occlusion on exported files vs on the .keras model, in forward-pass units, in one run.

    python bench/exported.py            # full (about a minute on 2 cores)
    python bench/exported.py --quick    # fewer images and repeats
    python bench/exported.py --out DIR  # where the JSON goes (default outputs/bench)

The digits CNN (configs/digits.yaml, 28x28, built untrained: the cost does not depend on the
weights) is exported in a temporary folder to TFLite (float, and full-integer int8 calibrated on
200 training images) and ONNX. For each model — the .keras one through cnnviz's compiled
forward pass, each file through its own runtime (LiteRT, onnxruntime) — it times on the same
test images, alternately, best of a few rounds:

  forward    one batched forward pass: `predict_probabilities(model, images)`
  occlusion  `occlusion(model, images)` at `cnnviz occlusion`'s defaults (4x4 patches: 49
             windows + the intact image, a floor of 50 forward passes per image)

and reports occlusion in forward-pass units (occlusion time / forward time, the same model on the
same images), each file's units against the .keras model's, and the wall-time ratio of
occlusion on the file vs on the .keras model. Nothing here asserts; tests never time.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(BENCH.parent))  # run from a checkout without installing

import numpy as np
from common import Row, begin, finish, quick_parser, untrained_digits  # bench/common.py

FILES = {"tflite": "model.tflite", "tflite-int8": "model.int8.tflite", "onnx": "model.onnx"}


@dataclass
class Sizes:
    images: int
    repeats: int


FULL = Sizes(images=256, repeats=5)
QUICK = Sizes(images=64, repeats=3)


def paired_seconds(first, second, repeats: int) -> tuple[float, float]:
    """(best seconds of `first()`, of `second()`) over `repeats` alternate rounds, after one
    untimed call of each (tracing, allocation): load from other work hits both sides alike."""
    first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for function, kept in ((first, times[0]), (second, times[1])):
            started = time.perf_counter()
            function()
            kept.append(time.perf_counter() - started)
    return min(times[0]), min(times[1])


def bench_exported(keras_model, models: dict, images: np.ndarray,
                   repeats: int) -> tuple[list[Row], dict]:
    from cnnviz.explain import occlusion
    from cnnviz.model.compiled import predict_probabilities

    height, width = images.shape[1:3]
    floor = 1 + (-(-height // 4)) * (-(-width // 4))
    measured = {}
    for name, model in {"keras": keras_model, **models}.items():
        forward, occluded = paired_seconds(lambda m=model: predict_probabilities(m, images),
                                           lambda m=model: occlusion(m, images), repeats)
        measured[name] = {"forward_s": forward, "occlusion_s": occluded,
                          "forward_passes": occluded / forward}
    keras = measured["keras"]
    rows = []
    for name, values in measured.items():
        rows.append(Row("exported", f"{name}: forward pass", len(images) / values["forward_s"],
                        "images/s"))
        rows.append(Row("exported", f"{name}: occlusion 4x4", len(images) / values["occlusion_s"],
                        "images/s", "its own forward pass", values["forward_passes"],
                        "forward passes/image", f">= {floor} (floor)"))
        if name != "keras":
            values["units_vs_keras"] = values["forward_passes"] / keras["forward_passes"]
            values["wall_vs_keras"] = values["occlusion_s"] / keras["occlusion_s"]
            rows.append(Row("exported", f"{name} vs keras: occlusion", values["units_vs_keras"],
                            "x keras's forward passes/image", "occlusion on model.keras",
                            values["wall_vs_keras"], "x its wall time"))
    return rows, {"images": len(images), "floor_forward_passes": floor, **measured}


def main(argv: list[str] | None = None) -> int:
    arguments = quick_parser(__doc__, "exported-").parse_args(argv)
    sizes = QUICK if arguments.quick else FULL

    values = begin("cnnviz exported-model bench", arguments.quick)
    from cnnviz.deploy.export import export_model
    from cnnviz.model.exported import ExportedModel

    started = time.perf_counter()
    model, dataset = untrained_digits()
    images = np.resize(dataset.x_test, (sizes.images, *dataset.x_test.shape[1:]))
    with tempfile.TemporaryDirectory() as folder:
        models = {}
        for name, file_name in FILES.items():
            path = export_model(model, Path(folder) / file_name, name,
                                representative=dataset.x_train[:200].astype(np.float32))
            models[name] = ExportedModel(path)
        rows, raw = bench_exported(model, models, images.astype(np.float32), sizes.repeats)
    finish(arguments, "exported-", started, values, sizes, rows, raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
