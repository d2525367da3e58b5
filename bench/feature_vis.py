"""Benchmark: which activation-maximization parameterization makes class images that transfer.

Two small CNNs (3 conv blocks of 16/32/64 filters, global average pooling, softmax) are trained
on the shapes source at 64x64 RGB (5 classes), model A with seed S and model B with seed S+1:
same data, same architecture, other initial weights and batch order. For each parameterization
(pixel, fft), without and with Lucid's transforms (pad, jitter, scale, rotate), class images of
every class are made on model A (same steps and settings, one ascent seed per image), then:
(a) model A's mean pre-softmax score of the target class (what the ascent climbs), (b) the share
of them model B's argmax assigns to the target class (transferability, Olah et al. 2017),
model B's mean softmax probability of it and its mean rank among B's logits. Issue 21's rule:
the default parameterization is the one that transfers best; the last row checks that
`default_parameterization((64, 64, 3))` picks the better of pixel and fft at the default
settings (no transforms), and says whether the gap is outside 2 standard errors of the paired
per-(pair, class) difference (one class's images on one model succeed or fail together, so
those cells are the independent draws, not the images); within noise it is information only
(the default rests on `--pairs 3` and `--pairs 5 --seed 6` pooled: README, Benchmarks).

    python3 bench/feature_vis.py [--quick] [--pairs 1] [--images-per-class 4] [--steps 256]

--quick: 8 epochs, 64 steps, 2 images per class. --pairs N trains N pairs
(A seed S+2i, B seed S+2i+1) and pools their images, for when one pair leaves a tie.
Prints a table and writes it as JSON to OUT/feature-vis-<timestamp>.json (and -latest.json).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Row, begin, finish, quick_parser

SIDE = 64
CLASSES = ("circle", "square", "triangle", "cross", "ring")
MIN_ACCURACY = 0.8
DATA_SEED = 7  # the data (and its split) stay the same for every model
FULL_TRANSFORMS = ("pad", "jitter", "scale", "rotate")
VARIANTS = (("pixel", ()), ("fft", ()), ("pixel", FULL_TRANSFORMS), ("fft", FULL_TRANSFORMS))


@dataclass
class Sizes:
    images: int  # shapes generated in all (train + validation + test)
    epochs: int
    steps: int  # gradient-ascent steps per class image
    images_per_class: int  # one ascent seed each
    pairs: int  # (A, B) model pairs, their images pooled


FULL = Sizes(images=3000, epochs=12, steps=256, images_per_class=4, pairs=1)
QUICK = Sizes(images=3000, epochs=8, steps=64, images_per_class=2, pairs=1)


def _config(sizes: Sizes):
    """The bench's config: shapes at 64x64 RGB, a 3-block CNN with global average pooling."""
    from cnnviz.config.loading import validate

    def block(filters: int, index: int) -> list[dict]:
        return [{"type": "conv2d", "filters": filters, "kernel": 3, "padding": "same",
                 "activation": "relu", "name": f"conv{index}"},
                {"type": "max_pool2d", "pool": 2, "name": f"pool{index}"}]

    raw = {
        "name": "feature-vis-bench", "seed": DATA_SEED,
        "data": {"source": "shapes", "image_size": [SIDE, SIDE],
                 "shapes": {"count": sizes.images, "classes": list(CLASSES)},
                 "preprocessing": "scale", "validation_split": 0.0, "test_split": 0.2},
        "model": {"layers": [*block(16, 1), *block(32, 2), *block(64, 3),
                             {"type": "global_avg_pool2d", "name": "gap"}],
                  "output": {"activation": "softmax", "name": "preds"}},
        "train": {"epochs": sizes.epochs, "batch_size": 32, "verbose": 0, "early_stopping": None,
                  "optimizer": {"name": "adam", "learning_rate": 0.003}},
    }
    return validate(raw, source="bench/feature_vis.py")


def _train(config, dataset, seed: int):
    """A model of `config` trained with `seed` (initial weights, batch order); its test
    accuracy (one batched forward pass)."""
    import keras

    from cnnviz.model.build import build_model
    from cnnviz.model.optimizers import compile_model

    keras.utils.set_random_seed(seed)
    model = build_model(config, dataset.input_shape, dataset.num_classes, dataset.preprocessing)
    compile_model(model, config)
    model.fit(dataset.x_train, dataset.y_train, batch_size=config.train.batch_size,
              epochs=config.train.epochs, verbose=0)
    predicted = np.argmax(model.predict(dataset.x_test, batch_size=256, verbose=0), axis=1)
    return model, float(np.mean(predicted == dataset.y_test))


def _class_images(model, param: str, transforms: tuple[str, ...], sizes: Sizes,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (K * classes, H, W, C), targets (K * classes,)): every class, K ascent seeds."""
    from cnnviz.explain import activation_maximization_batch

    classes = range(int(model.outputs[0].shape[-1]))
    # All images of one call start from the same noise, so each image of a class needs its seed.
    images = [activation_maximization_batch(model, None, classes, steps=sizes.steps,
                                            seed=seed + k, param=param, transforms=transforms)
              for k in range(sizes.images_per_class)]
    return np.concatenate(images), np.tile(np.asarray(classes), sizes.images_per_class)


def _measure(model_a, model_b, images: np.ndarray, targets: np.ndarray) -> dict:
    """Per image: A's target logit and argmax; B's argmax, target probability and target rank
    (0: B's top class). One batched forward pass per model."""
    from cnnviz.model.compiled import model_copy

    logits_a = np.asarray(model_copy(model_a, "logits").model(images, training=False))
    logits_b = np.asarray(model_copy(model_b, "logits").model(images, training=False), np.float64)
    probabilities_b = np.exp(logits_b - logits_b.max(axis=1, keepdims=True))
    probabilities_b /= probabilities_b.sum(axis=1, keepdims=True)
    rows = np.arange(len(targets))
    return {"target": targets.tolist(),
            "a_logit": logits_a[rows, targets].tolist(),
            "a_argmax": logits_a.argmax(axis=1).tolist(),
            "b_argmax": logits_b.argmax(axis=1).tolist(),
            "b_probability": probabilities_b[rows, targets].tolist(),
            "b_rank": (logits_b > logits_b[rows, targets][:, None]).sum(axis=1).tolist()}


def _cell_shares(records: list[dict]) -> np.ndarray:
    """B's share on target per (pair, class) cell, (pairs * classes,): the images of one class
    made on one model mostly succeed or fail together, so these cells, not the images, are
    the independent draws."""
    shares = []
    for record in records:
        target, b_argmax = np.asarray(record["target"]), np.asarray(record["b_argmax"])
        shares += [np.mean(b_argmax[target == index] == index) for index in np.unique(target)]
    return np.asarray(shares)


def _standard_error(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else np.nan


def _summary(records: list[dict]) -> dict:
    target = np.concatenate([record["target"] for record in records])
    pooled = {key: np.concatenate([record[key] for record in records])
              for key in ("a_logit", "a_argmax", "b_argmax", "b_probability", "b_rank")}
    share = float(np.mean(pooled["b_argmax"] == target))
    count = len(target)
    return {"images": count, "a_logit": float(pooled["a_logit"].mean()),
            "a_share": float(np.mean(pooled["a_argmax"] == target)), "b_share": share,
            "b_share_se": _standard_error(_cell_shares(records)),
            "b_share_binomial_se": float(np.sqrt(share * (1 - share) / count)),
            "b_probability": float(pooled["b_probability"].mean()),
            "b_rank": float(pooled["b_rank"].mean())}


def _label(param: str, transforms: tuple[str, ...]) -> str:
    return f"{param}, {'transforms' if transforms else 'no transforms'}"


def main(argv: list[str] | None = None) -> int:
    parser = quick_parser(__doc__, "feature-vis-")
    parser.add_argument("--pairs", type=int, help="model pairs (A, B), images pooled")
    parser.add_argument("--images-per-class", type=int, help="class images per class and pair")
    parser.add_argument("--steps", type=int, help="gradient-ascent steps per image")
    parser.add_argument("--epochs", type=int, help="training epochs per model")
    parser.add_argument("--seed", type=int, default=0, help="model A's seed (B: seed + 1)")
    arguments = parser.parse_args(argv)
    sizes = QUICK if arguments.quick else FULL
    sizes = replace(sizes, **{name: value for name, value in (
        ("pairs", arguments.pairs), ("images_per_class", arguments.images_per_class),
        ("steps", arguments.steps), ("epochs", arguments.epochs)) if value is not None})
    values = begin("cnnviz bench: feature visualization transfers", arguments.quick)

    from cnnviz.data import load_dataset
    from cnnviz.explain.parameterization import default_parameterization

    started = time.perf_counter()
    config = _config(sizes)
    dataset = load_dataset(config, log=lambda *_: None)
    records = {_label(*variant): [] for variant in VARIANTS}
    seconds = dict.fromkeys(records, 0.0)
    accuracies = []
    for pair in range(sizes.pairs):
        seed_a = arguments.seed + 2 * pair
        print(f"pair {pair + 1}/{sizes.pairs}: training A (seed {seed_a}) and B "
              f"(seed {seed_a + 1}), {sizes.epochs} epochs ...", flush=True)
        model_a, accuracy_a = _train(config, dataset, seed_a)
        model_b, accuracy_b = _train(config, dataset, seed_a + 1)
        accuracies.append((accuracy_a, accuracy_b))
        print(f"  test accuracy A {accuracy_a:.3f}, B {accuracy_b:.3f}", flush=True)
        for param, transforms in VARIANTS:
            label = _label(param, transforms)
            began = time.perf_counter()
            images, targets = _class_images(model_a, param, transforms, sizes, seed=100 * pair)
            seconds[label] += time.perf_counter() - began
            records[label].append(_measure(model_a, model_b, images, targets))
            print(f"  {label}: {len(images)} images, {time.perf_counter() - began:.0f} s",
                  flush=True)

    summaries = {label: _summary(found) for label, found in records.items()}
    chance = 1 / len(CLASSES)
    # Below this the models have not learnt the shapes and the transfer rows mean little.
    rows = [Row("models", f"test accuracy, model {name}", float(np.mean(column)), "",
                target=f">= {MIN_ACCURACY}", passed=min(column) >= MIN_ACCURACY,
                note=f"{sizes.epochs} epochs on {len(dataset.y_train)} images, per pair "
                     f"{', '.join(f'{value:.3f}' for value in column)}")
            for name, column in zip("AB", zip(*accuracies))]
    for label, summary in summaries.items():
        rows += [
            Row(label, "A's target logit (mean)", summary["a_logit"], "logit",
                note=f"[{label}] {summary['images']} images ({sizes.images_per_class} a class x "
                     f"{len(CLASSES)} classes x {sizes.pairs} pair(s)), {sizes.steps} steps, "
                     f"{seconds[label]:.0f} s; A's argmax on target {summary['a_share']:.2f}"),
            Row(label, "B's argmax on target (transfer)", summary["b_share"], "share",
                f"chance {chance:.2f}", summary["b_share"] / chance, "x chance",
                note=f"[{label}] standard error {summary['b_share_se']:.3f} over the "
                     f"{sizes.pairs * len(CLASSES)} (pair, class) cells (binomial over "
                     f"images: {summary['b_share_binomial_se']:.3f})"),
            Row(label, "B's target probability (mean)", summary["b_probability"], "prob"),
            Row(label, "B's rank of the target (mean, 0 = top)", summary["b_rank"], "rank",
                f"chance {(len(CLASSES) - 1) / 2:.1f}"),
        ]
    pixel, fft = summaries[_label("pixel", ())], summaries[_label("fft", ())]
    gap = fft["b_share"] - pixel["b_share"]
    # Paired by cell: the same model A and class for both parameterizations.
    cell_gaps = (_cell_shares(records[_label("fft", ())])
                 - _cell_shares(records[_label("pixel", ())]))
    noise = 2 * _standard_error(cell_gaps)
    best = "fft" if gap > 0 else "pixel" if gap < 0 else "neither (equal shares)"
    chosen = default_parameterization((SIDE, SIDE, 3))
    tied = not abs(gap) > noise  # NaN noise (one cell) counts as a tie
    # Within noise one run cannot contradict the default (README: what it rests on).
    rows.append(Row("default", f"default_parameterization(({SIDE}, {SIDE}, 3))", None, chosen,
                    "best transfer (no transforms)", gap, "fft - pixel share",
                    f"== {best}", None if tied else chosen == best,
                    note=("within noise" if tied else "outside noise")
                    + f" (2 standard errors of the paired per-cell difference: {noise:.3f}); more "
                      "--pairs separate a tie"))
    raw = {"summaries": summaries, "records": records, "seconds": seconds,
           "accuracies": accuracies, "best": best, "default": chosen, "tied": tied,
           "classes": list(CLASSES), "side": SIDE, "model_seed": arguments.seed}
    finish(arguments, "feature-vis-", started, values, sizes, rows, raw,
           summary=f"transfers best: {best} ({'a tie within noise' if tied else 'clear'}); "
                   f"default {chosen}; ")
    return 0 if tied or chosen == best else 1


if __name__ == "__main__":
    sys.exit(main())
