"""Benchmark: what watching costs. `model.fit` of configs/digits.yaml (28x28) with and without
`cnnviz.callbacks.ExplainCallback` at its defaults (Grad-CAM and vanilla saliency of 8 test
images after every epoch, deletion / insertion AUC with 10 steps, the epoch figures and
evolution.png written), in one process, taking turns, the fastest of --repeats fits each.

    python3 bench/watch.py [--epochs 6] [--repeats 3] [--quick]

Prints a table and writes it as JSON to OUT/watch-<timestamp>.json (and watch-latest.json).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DIGITS, ROOT, Row, begin, print_table, save_report  # the shared helpers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="3 epochs, 2 repeats")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    arguments = parser.parse_args(argv)
    epochs, repeats = (3, 2) if arguments.quick else (arguments.epochs, arguments.repeats)
    values = begin("cnnviz bench: watch it learn", arguments.quick)
    import keras

    from cnnviz.callbacks import ExplainCallback
    from cnnviz.config.loading import load_config
    from cnnviz.data import load_dataset
    from cnnviz.data.dataset import stratified_subset
    from cnnviz.model.build import build_model
    from cnnviz.model.optimizers import compile_model

    config = load_config(DIGITS, ["train.verbose=0"])
    dataset = load_dataset(config)
    x_train, y_train = dataset.x_train, dataset.y_train
    watched = stratified_subset(dataset.y_test, 8, config.seed)

    def fit(watch: bool, folder: Path) -> float:
        keras.utils.set_random_seed(config.seed)
        model = build_model(config, dataset.input_shape, dataset.num_classes,
                            dataset.preprocessing)
        compile_model(model, config)
        callbacks = [ExplainCallback(dataset.x_test[watched], dataset.y_test[watched],
                                     log_dir=folder)] if watch else []
        started = time.perf_counter()
        model.fit(x_train, y_train, batch_size=config.train.batch_size, epochs=epochs,
                  verbose=0, callbacks=callbacks)
        return time.perf_counter() - started

    plain, watched_seconds = [], []
    with tempfile.TemporaryDirectory(prefix="cnnviz-bench-watch-") as folder:
        fit(False, Path(folder))  # warm-up: thread pools, first tracing in this process
        for repeat in range(repeats):
            plain.append(fit(False, Path(folder)))
            watched_seconds.append(fit(True, Path(folder) / str(repeat)))
    ratio = min(watched_seconds) / min(plain)
    rows = [
        Row("watch", "plain model.fit", min(plain), "s",
            note=f"{epochs} epochs x {len(x_train)} images, batch {config.train.batch_size}"),
        Row("watch", "model.fit + ExplainCallback", min(watched_seconds), "s", "plain fit",
            ratio, "x plain",
            note="defaults: gradcam + saliency, 8 images, every epoch, AUCs (10 steps), the "
                 "epoch PNGs and evolution.png; the first epoch compiles the explain functions"),
    ]
    print_table(rows)
    save_report(arguments.out, "watch-", {
        "epochs": epochs, "repeats": repeats, "settings": values,
        "rows": [row.__dict__ for row in rows],
        "raw": {"plain_seconds": plain, "watched_seconds": watched_seconds}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
