"""Benchmark: what watching costs. The fit of `cnnviz train configs/digits.yaml` (its 12
epochs, validation, per-epoch commit) with and without `train.explain: {}` at its defaults
(Grad-CAM and vanilla saliency of 8 stratified test images after every epoch, deletion /
insertion AUC with 10 steps, the epoch PNGs, maps and evolution.png), in one process, taking
turns, the fastest of --repeats each; target: at most 1.10x the plain fit.

    python3 bench/watch.py [--repeats 3] [--quick]     # --quick: 6 epochs, 2 repeats

The time is the run's own `seconds` in metrics.json (model.fit, the explain callback inside
it). Fits on this machine vary by +-15% from one to the next, more than the target, so a third
row measures inside each watched fit: fit / (fit - the time spent in the callback's hooks),
and another the median of each watched fit over the plain fit just before it.
Prints a table and writes it as JSON to OUT/watch-<timestamp>.json (and watch-latest.json).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DIGITS, ROOT, Row, begin, print_table, save_report  # the shared helpers

TARGET = 1.10


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="6 epochs, 2 repeats")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    arguments = parser.parse_args(argv)
    repeats = 2 if arguments.quick else arguments.repeats
    values = begin("cnnviz bench: watch it learn", arguments.quick)
    from cnnviz.config.loading import load_config
    from cnnviz.data import load_dataset
    from cnnviz.pipeline import train_run

    settings = ["train.verbose=0"] + (["train.epochs=6"] if arguments.quick else [])
    plain_config = load_config(DIGITS, settings)
    watched_config = load_config(DIGITS, [*settings, "train.explain={}"])
    dataset = load_dataset(plain_config)  # the same arrays for every fit

    inside = time_the_callback()

    def fit(config, folder: Path) -> float:
        result = train_run(config, folder, dataset=dataset, log=lambda line: None)
        return result.metrics["seconds"]

    plain, watched, shares = [], [], []
    with tempfile.TemporaryDirectory(prefix="cnnviz-bench-watch-") as folder:
        fit(plain_config, Path(folder) / "warm")  # thread pools, first tracing in this process
        for repeat in range(repeats):
            plain.append(fit(plain_config, Path(folder) / f"plain-{repeat}"))
            inside.clear()
            watched.append(fit(watched_config, Path(folder) / f"watched-{repeat}"))
            shares.append(watched[-1] / (watched[-1] - sum(inside)))
    ratio = min(watched) / min(plain)
    pairs = sorted(w / p for w, p in zip(watched, plain))
    paired = pairs[len(pairs) // 2]
    within = sorted(shares)[len(shares) // 2]
    epochs = plain_config.train.epochs
    rows = [
        Row("watch", "cnnviz train digits.yaml: fit", min(plain), "s",
            note=f"{epochs} epochs x {len(dataset.train)} images, batch "
                 f"{plain_config.train.batch_size}, validation and per-epoch commit"),
        Row("watch", "the same fit with train.explain: {}", min(watched), "s", "plain fit",
            ratio, "x plain", f"<= {TARGET}x", ratio <= TARGET,
            note="gradcam + saliency of 8 images every epoch, AUCs "
                 "(10 steps), epoch PNGs, maps, evolution.png; the first epoch compiles the "
                 "explain functions"),
    ]
    rows.append(Row("watch", "the same, median of the fit-to-fit pairs", paired, "x",
                    "the plain fit just before", paired, "x", f"<= {TARGET}x",
                    paired <= TARGET, note="each watched fit over the plain fit run just "
                    "before it"))
    rows.append(Row("watch", "the same, timed inside each watched fit", within, "x",
                    "its fit less the callback", within, "x", f"<= {TARGET}x",
                    within <= TARGET,
                    note="median over the watched fits of fit / (fit - time in the "
                         "callback's hooks): no run-to-run noise"))
    print_table(rows)
    save_report(arguments.out, "watch-", {
        "epochs": epochs, "repeats": repeats, "settings": values, "target": TARGET,
        "rows": [row.__dict__ for row in rows],
        "raw": {"plain_seconds": plain, "watched_seconds": watched,
                "inside_ratios": shares}})
    return 0


def time_the_callback() -> list[float]:
    """Wrap ExplainCallback's Keras hooks: each call's wall time is appended to the list."""
    import time

    from cnnviz.report.watch import ExplainCallback

    spent: list[float] = []
    def timed(original):
        def hook(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                spent.append(time.perf_counter() - started)

        return hook

    for name in ("on_train_begin", "on_epoch_begin", "on_epoch_end", "on_train_end"):
        setattr(ExplainCallback, name, timed(getattr(ExplainCallback, name)))
    return spent


if __name__ == "__main__":
    sys.exit(main())
