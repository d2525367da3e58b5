"""Benchmark: training configs/digits.yaml on each Keras backend, side by side in one run:
`cnnviz --backend NAME train configs/digits.yaml` in a process of its own per backend, one
after another (nothing else running), its test accuracy and its own fit time (metrics.json
`seconds`) against TensorFlow's. Target: each backend's test accuracy within 1 point of
TensorFlow's. A backend that is not installed is left out.

    python3 bench/backends.py [--repeats 1]

Prints a table and writes it as JSON to OUT/backends-<timestamp>.json (and backends-latest.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DIGITS, QUIET_ENV, ROOT, Row, begin, print_table, save_report

BACKENDS = ("tensorflow", "jax", "torch")


def train_on(backend: str, folder: Path) -> dict:
    environment = {**os.environ, **QUIET_ENV, "PYTHONPATH": str(ROOT)}
    environment.pop("KERAS_BACKEND", None)
    finished = subprocess.run(
        [sys.executable, "-m", "cnnviz.cli", "--backend", backend, "train", str(DIGITS),
         "--out", str(folder), "--set", "train.verbose=0"],
        capture_output=True, text=True, env=environment, check=False)
    if finished.returncode != 0:
        raise SystemExit(f"{backend}: exit {finished.returncode}\n{finished.stderr[-2000:]}")
    (metrics_file,) = folder.glob("digits/*/metrics.json")
    return json.loads(metrics_file.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="fits per backend (fastest kept)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    arguments = parser.parse_args(argv)
    values = begin("cnnviz bench: training on every backend", False)
    installed = [name for name in BACKENDS
                 if name == "tensorflow" or importlib.util.find_spec(name) is not None]
    results: dict[str, list[dict]] = {name: [] for name in installed}
    with tempfile.TemporaryDirectory(prefix="cnnviz-bench-backends-") as folder:
        for repeat in range(arguments.repeats):
            for name in installed:  # taking turns
                results[name].append(train_on(name, Path(folder) / f"{name}-{repeat}"))
    reference = results["tensorflow"][0]
    rows = []
    for name in installed:
        metrics = min(results[name], key=lambda m: m["seconds"])
        gap = metrics["test_accuracy"] - reference["test_accuracy"]
        rows.append(Row("backends", f"{name}: test accuracy", metrics["test_accuracy"], "",
                        "tensorflow", gap * 100, "points", "within 1 point",
                        None if name == "tensorflow" else abs(gap) <= 0.01,
                        note=f"{metrics['epochs']} epochs, backend {metrics['backend']}"))
        rows.append(Row("backends", f"{name}: fit", metrics["seconds"], "s", "tensorflow",
                        metrics["seconds"] / min(m["seconds"] for m in results["tensorflow"]),
                        "x tensorflow"))
    print_table(rows)
    save_report(arguments.out, "backends-", {
        "settings": values, "rows": [row.__dict__ for row in rows],
        "raw": {name: [{key: m[key] for key in ("test_accuracy", "test_loss", "seconds")}
                       for m in found] for name, found in results.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
