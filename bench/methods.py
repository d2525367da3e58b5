"""Cost of the explanation methods of issue 12, in forward passes per image, measured in one run.

    python bench/methods.py            # full (about two minutes on 2 cores)
    python bench/methods.py --quick    # fewer images and repeats
    python bench/methods.py --out DIR  # where the JSON goes (default outputs/bench)

On the digits CNN (configs/digits.yaml, 28x28, built untrained: the cost does not depend on the
weights) it times every new method on a batch, alternately with a compiled forward pass
(tf.function, batches of 256, 1024 images), best of a few rounds each, and reports the method's
images/s as forward passes per image (forward rate / method rate). The forward-only methods are
set against their floor, the forward passes they cannot avoid:

  scorecam   one forward pass per channel of the layer (32 on pool2), + 1 for the activations
  rise       one forward pass per mask (2000), + 1 for the prediction
  integrated gradients (64 steps)   65 gradient passes: set against 65 x vanilla saliency

Ratios are what to read: both sides of each are measured in the same process, minutes apart,
on a machine other work may share. Nothing here asserts; tests never time.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(BENCH.parent))  # run from a checkout without installing

import numpy as np
from common import Row, begin, finish, quick_parser, untrained_digits  # bench/common.py

from bench import _forward_rate  # bench/bench.py


@dataclass
class Sizes:
    images: int  # single-pass methods (the CAM family but Score-CAM, gradient x input)
    scorecam_images: int
    ig_images: int
    rise_images: int
    repeats: int


FULL = Sizes(images=512, scorecam_images=64, ig_images=64, rise_images=8, repeats=3)
QUICK = Sizes(images=256, scorecam_images=16, ig_images=16, rise_images=2, repeats=2)


def method_table(sizes: Sizes):
    """(name, images to time it on, function(model, images), floor in forward passes or None)."""
    from cnnviz.explain import (
        CAM_METHODS,
        cam,
        gradient_x_input,
        integrated_gradients,
        rise,
        saliency,
    )

    rows = [("saliency vanilla (reference)", sizes.images,
             lambda m, x: saliency(m, x, method="vanilla"), None)]
    for method in CAM_METHODS:
        if method == "scorecam":
            continue
        rows.append((method, sizes.images, lambda m, x, k=method: cam(m, x, method=k), None))
    rows += [
        ("scorecam", sizes.scorecam_images, lambda m, x: cam(m, x, method="scorecam"), "channels"),
        ("gradient x input", sizes.images, lambda m, x: gradient_x_input(m, x), None),
        ("integrated gradients, 64 steps", sizes.ig_images,
         lambda m, x: integrated_gradients(m, x, steps=64), "ig"),
        ("rise, 2000 masks", sizes.rise_images, lambda m, x: rise(m, x, masks=2000), 2000),
    ]
    return rows


def paired_rates(model, function, images: np.ndarray, test_images: np.ndarray,
                 repeats: int) -> tuple[float, float]:
    """(forward images/s, method images/s), each the best of `repeats` rounds, the two timed
    alternately so that load from other work hits both sides alike."""
    forward_rates, method_rates = [], []
    function(model, images)  # tracing and caches, untimed
    for _ in range(repeats):
        forward_rates.append(_forward_rate(model, test_images, 1))
        started = time.perf_counter()
        function(model, images)
        method_rates.append(len(images) / (time.perf_counter() - started))
    return max(forward_rates), max(method_rates)


def bench_methods(model, test_images: np.ndarray, sizes: Sizes) -> tuple[list[Row], dict]:
    from cnnviz.explain import gradcam_layer

    layer = gradcam_layer(model)
    channels = int(model.get_layer(layer).output.shape[-1])
    rows = []
    raw: dict = {"layer": layer, "channels": channels}
    passes = {}
    for name, count, function, floor in method_table(sizes):
        images = np.resize(test_images, (count, *test_images.shape[1:])).astype(np.float32)
        forward, rate = paired_rates(model, function, images, test_images, sizes.repeats)
        cost = forward / rate
        passes[name] = cost
        raw[name] = {"images": count, "images_per_second": rate,
                     "forward_images_per_second": forward, "forward_passes": cost}
        measured = f"{cost:.3g} forward passes/image ({count} images; forward {forward:,.0f}/s)"
        if floor == "channels":
            rows.append(Row("methods", name, rate, "images/s",
                            f"floor: {channels} channels x 1 forward", cost / channels, "x floor",
                            note=measured))
        elif floor == "ig":
            reference = 65 * passes["saliency vanilla (reference)"]
            rows.append(Row("methods", name, rate, "images/s", "65 x vanilla saliency",
                            cost / reference, "x 65 gradients", note=measured))
        elif floor is not None:
            rows.append(Row("methods", name, rate, "images/s", f"floor: {floor} masks x 1 forward",
                            cost / floor, "x floor", note=measured))
        else:
            rows.append(Row("methods", name, rate, "images/s", "forward pass", cost,
                            "forward passes/image", note=measured))
    return rows, raw


def main(argv: list[str] | None = None) -> int:
    arguments = quick_parser(__doc__, "methods-").parse_args(argv)
    sizes = QUICK if arguments.quick else FULL

    values = begin("cnnviz methods bench", arguments.quick)
    started = time.perf_counter()
    model, dataset = untrained_digits()
    rows, raw = bench_methods(model, dataset.x_test, sizes)
    finish(arguments, "methods-", started, values, sizes, rows, raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
