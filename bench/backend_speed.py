"""Benchmark: every explanation method on each Keras backend, in forward passes of that backend.

    python3 bench/backend_speed.py            # digits CNN and ResNet50 at 224x224 (~25 min)
    python3 bench/backend_speed.py --quick    # fewer images, one round
    python3 bench/backend_speed.py --models digits
    python3 bench/backend_speed.py --methods saliency,gradcam   # names containing these

One process per backend and model (Keras reads its backend once), one after another, nothing
else running. In each, the unit is that backend's own compiled forward pass
(`cnnviz.backend.compile`: tf.function, jax.jit, eager PyTorch under no_grad) over fixed
batches of the chunk size the methods use (256 on digits, 7 on ResNet50 at 224: the activation
budget's, `cnnviz.model.compiled.batch_size_for`; the single-pass methods get whole chunks,
2 on ResNet50); each method is timed on a batch, alternately
with the forward pass, best of a few rounds, and reported as forward passes per image
(forward images/s / method images/s). Beside it, each method's time per image against
TensorFlow's (>1 = slower than TensorFlow).

Targets (issue 20): on the fastest backend, vanilla saliency on ResNet50 <= 2.2 forward passes
per image; on the backend the README recommends, no method more than 1.3x TensorFlow's time.
Models are built untrained (the cost does not depend on the weights). A backend that is not
installed is left out. Nothing here asserts; tests never time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(BENCH.parent))  # run from a checkout without installing

BACKENDS = ("tensorflow", "jax", "torch")
MODELS = ("digits", "resnet50")

# (images, rounds) per size class and model, full and quick. ResNet50 on 2 CPU cores runs
# ~20 images/s, so its many-pass methods get one or two images and one timed round (Score-CAM
# on its 2048 channels is ~2 minutes an image).
SIZES = {
    "digits": {"masks": 2000,
               "single": ((256, 3), (128, 1)), "many": ((32, 3), (8, 1)),
               "rise": ((4, 3), (2, 1)), "scorecam": ((32, 3), (8, 1))},
    "resnet50": {"masks": 256,
                 "single": ((16, 3), (8, 1)), "many": ((2, 1), (1, 1)),
                 "rise": ((1, 1), (1, 1)), "scorecam": ((1, 1), (1, 1))},
}


@dataclass
class Sizes:
    """What the report records of the sizes (full and quick) per model."""

    per_model: dict = field(default_factory=lambda: SIZES)


def methods(masks: int):
    """(name, size class, function(model, images), floor in forward passes or None)."""
    from cnnviz.explain import (
        CAM_METHODS,
        cam,
        gradcam,
        gradient_x_input,
        integrated_gradients,
        occlusion,
        rise,
        saliency,
    )

    table = [(f"saliency {kind}", "single", lambda m, x, k=kind: saliency(m, x, method=k), None)
             for kind in ("vanilla", "guided", "rectified")]
    table.append(("saliency smoothgrad (20 samples)", "many",
                  lambda m, x: saliency(m, x, method="smoothgrad"), None))
    table.append(("guided gradcam", "single", lambda m, x: gradcam(m, x, guided=True), None))
    for kind in CAM_METHODS:
        table.append((kind, "scorecam" if kind == "scorecam" else "single",
                      lambda m, x, k=kind: cam(m, x, method=k), None))
    table += [
        ("gradient x input", "single", lambda m, x: gradient_x_input(m, x), None),
        ("integrated gradients (64 steps)", "many",
         lambda m, x: integrated_gradients(m, x, steps=64), None),
        ("occlusion (patch 1/7 of the side)", "many",
         lambda m, x: occlusion(m, x, patch=max(1, x.shape[1] // 7)), None),
        (f"rise ({masks} masks)", "rise", lambda m, x: rise(m, x, masks=masks), masks),
    ]
    return table


def build(model_name: str):
    import keras

    keras.utils.set_random_seed(0)
    if model_name == "digits":
        from common import untrained_digits

        model, dataset = untrained_digits()
        return model, dataset.x_test.astype("float32")
    model = keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3))
    images = keras.random.uniform((64, 224, 224, 3), seed=0)
    return model, keras.ops.convert_to_numpy(images).astype("float32")


def worker(model_name: str, quick: bool, out: Path, wanted: str) -> None:
    from cnnviz._quiet import import_keras_quietly

    import_keras_quietly()  # no TensorFlow start-up lines in the table
    import numpy as np

    from cnnviz import backend
    from cnnviz.model.compiled import batch_size_for, model_copy

    sizes = SIZES[model_name]
    pick = 1 if quick else 0
    model, pool = build(model_name)
    # The chunk the methods cut a batch into (7 on ResNet50 at 224); the single-pass methods
    # get a whole number of chunks, so no padded image is timed as if it were work.
    batch = batch_size_for(model_copy(model, "logits"), None)
    forward = backend.compile(lambda x: (model(x, training=False),), model.variables)
    chunk = np.resize(pool, (batch, *pool.shape[1:]))

    def forward_rate() -> float:
        started = time.perf_counter()
        for _ in range(4):
            np.asarray(forward(chunk)[0])
        return 4 * batch / (time.perf_counter() - started)

    forward_rate()  # tracing, untimed
    results = {"backend": backend.current(), "model": model_name, "methods": {}}
    for name, size, function, floor in methods(sizes["masks"]):
        if wanted and not any(part in name for part in wanted.split(",")):
            continue
        count, rounds = sizes[size][pick]
        if size == "single":
            count = max(batch, count // batch * batch)
        images = np.resize(pool, (count, *pool.shape[1:]))
        function(model, images)  # tracing and caches, untimed
        forwards, rates = [], []
        for _ in range(rounds):
            forwards.append(forward_rate())
            started = time.perf_counter()
            function(model, images)
            rates.append(len(images) / (time.perf_counter() - started))
        results["methods"][name] = {
            "images": len(images), "forward_images_per_second": max(forwards),
            "images_per_second": max(rates), "forward_passes": max(forwards) / max(rates),
            "floor": floor}
        print(f"  {backend.current():10s} {model_name:8s} {name:34s} "
              f"{max(forwards) / max(rates):9.3g} forward passes/image", flush=True)
    out.write_text(json.dumps(results))


def run_worker(backend_name: str, model_name: str, quick: bool, folder: Path,
               wanted: str) -> dict:
    from common import QUIET_ENV, ROOT

    out = folder / f"{backend_name}-{model_name}.json"
    environment = {**os.environ, **QUIET_ENV, "KERAS_BACKEND": backend_name,
                   "PYTHONPATH": str(ROOT)}
    command = [sys.executable, __file__, "--worker", model_name, "--worker-out", str(out),
               "--methods", wanted]
    if quick:
        command.append("--quick")
    finished = subprocess.run(command, env=environment, check=False)
    if finished.returncode != 0:
        raise SystemExit(f"{backend_name} {model_name}: exit {finished.returncode}")
    return json.loads(out.read_text())


def table(results: dict) -> list:
    from common import Row

    rows = []
    for model_name, by_backend in results.items():
        reference = by_backend.get("tensorflow")
        for backend_name, result in by_backend.items():
            for name, cost in result["methods"].items():
                ratio, label = None, ""
                if reference and backend_name != "tensorflow":
                    # time per image against TensorFlow's, each backend at its own pace
                    ratio = (reference["methods"][name]["images_per_second"]
                             / cost["images_per_second"])
                    label = "x TensorFlow's time"
                target, passed = "", None
                if model_name == "resnet50" and name == "saliency vanilla":
                    target, passed = "<= 2.2 on the fastest backend", cost["forward_passes"] <= 2.2
                rows.append(Row(f"{model_name}/{backend_name}", name, cost["forward_passes"],
                                "forward passes/image", "", ratio, label, target, passed,
                                note=f"{cost['images_per_second']:.3g} images/s on "
                                     f"{cost['images']}; forward "
                                     f"{cost['forward_images_per_second']:,.0f}/s"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default="", help="only methods whose names contain one "
                        "of these comma-separated parts")
    parser.add_argument("--out", type=Path, default=BENCH.parent / "outputs" / "bench")
    parser.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.worker:
        worker(arguments.worker, arguments.quick, arguments.worker_out, arguments.methods)
        return 0
    from common import begin, finish

    started = time.perf_counter()
    values = begin("cnnviz bench: every method on every backend", arguments.quick)
    installed = [name for name in BACKENDS
                 if name == "tensorflow" or importlib.util.find_spec(name) is not None]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cnnviz-bench-backend-speed-") as folder:
        for model_name in arguments.models.split(","):
            results[model_name] = {name: run_worker(name, model_name, arguments.quick,
                                                    Path(folder), arguments.methods)
                                   for name in installed}
    finish(arguments, "backend-speed-", started, values, Sizes(), table(results), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
