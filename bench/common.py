"""What every benchmark script shares: timing (best of N, a child process's wall/CPU/peak RSS),
the machine's settings, the table and the JSON report."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

DIGITS = ROOT / "configs" / "digits.yaml"
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}


@dataclass
class Row:
    """One line of the table: a measurement, what it is compared with, and the verdict."""

    section: str
    name: str
    value: float | None
    unit: str
    baseline: str = ""
    ratio: float | None = None
    ratio_label: str = ""
    target: str = ""
    passed: bool | None = None  # None: no target (information only)
    note: str = ""


@dataclass
class Sizes:
    epochs: int
    train_repeats: int
    images: int  # batched explanation calls
    single_images: int  # one-image-at-a-time calls
    naive_occlusion_images: int
    timing_repeats: int
    cli_counts: tuple[int, int]


FULL = Sizes(epochs=6, train_repeats=5, images=512, single_images=32, naive_occlusion_images=3,
             timing_repeats=3, cli_counts=(100, 1000))
QUICK = Sizes(epochs=3, train_repeats=3, images=256, single_images=8, naive_occlusion_images=1,
              timing_repeats=3, cli_counts=(50, 500))


def best_time(function, repeats: int, *, warm: bool = True) -> float:
    """Seconds of the fastest of `repeats` calls, after one untimed call (tracing, caches)."""
    if warm:
        function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def timed_process(command: list[str], env: dict) -> dict:
    """Run `command` under /usr/bin/time -v: wall seconds, CPU seconds (user + system), peak RSS
    (MiB), and the fields of the last JSON line it printed."""
    import re

    started = time.perf_counter()
    finished = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True,
                              env=env, check=False)
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{finished.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", finished.stderr).group(1))
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", finished.stderr).group(1))
              for kind in ("User", "System"))
    last = [line for line in finished.stdout.splitlines() if line.startswith("{")]
    return {"wall_s": wall, "cpu_s": cpu, "rss_mib": rss / 1024,
            **(json.loads(last[-1]) if last else {})}


# ------------------------------------------------------------------------------- settings
def settings() -> dict:
    import keras
    import tensorflow as tf

    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    return {
        "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "onednn": "on (default)" if onednn is None else ("off" if onednn == "0" else "on"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "gpus": [device.name for device in tf.config.list_physical_devices("GPU")],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def print_settings(values: dict) -> None:
    threads = (f"inter-op {values['tf_inter_op_threads']}, intra-op "
               f"{values['tf_intra_op_threads']} (0 = TensorFlow's default: one per core)")
    print(f"threads    {threads}")
    print(f"oneDNN     {values['onednn']} (TF_ENABLE_ONEDNN_OPTS)")
    print(f"CPUs       {values['cpu_count']} ({values['cpus_usable']} usable), load average "
          f"{values['load_average_at_start']}, GPUs: {values['gpus'] or 'none'}")
    print(f"versions   TensorFlow {values['tensorflow']}, Keras {values['keras']}, "
          f"numpy {values['numpy']}, Python {values['python']}")


def begin(title: str, quick: bool) -> dict:
    """Quiet TensorFlow's start-up lines, import it, print the settings in force; return them."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    from cnnviz._quiet import import_keras_quietly

    import_keras_quietly()
    values = settings()
    print(f"{title} ({'quick' if quick else 'full'})")
    print_settings(values)
    return values


def quick_parser(doc: str, prefix: str):
    """An argparse parser with --quick and --out (where PREFIX<timestamp>.json goes)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench",
                        help=f"folder for {prefix}<timestamp>.json and {prefix}latest.json")
    return parser


def untrained_digits():
    """(the digits CNN of configs/digits.yaml built untrained with the config's seed, its data):
    what the forward-pass benchmarks time (the cost does not depend on the weights)."""
    import keras

    from cnnviz.config.loading import load_config
    from cnnviz.data import load_dataset
    from cnnviz.model.summary import model_from_config

    config = load_config(DIGITS, [])
    keras.utils.set_random_seed(config.seed)
    return model_from_config(config), load_dataset(config)


def finish(arguments, prefix: str, started: float, values: dict, sizes, rows: list[Row],
           raw: dict, *, summary: str = "") -> Path:
    """Print the table and the time taken (after `summary`), then save it all as JSON with
    `save_report` (`arguments`: --quick and --out; `sizes`: a dataclass of the run's sizes)."""
    from dataclasses import asdict

    values["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    print()
    print_table(rows)
    seconds = time.perf_counter() - started
    print(f"\n{summary}{seconds:.0f} s; load average at end {values['load_average_at_end']}")
    return save_report(arguments.out, prefix, {
        "mode": "quick" if arguments.quick else "full", "sizes": asdict(sizes),
        "settings": values, "rows": [asdict(row) for row in rows], "raw": raw,
        "seconds": round(seconds, 1)})


def save_report(folder: Path, prefix: str, report: dict) -> Path:
    """Write `report` as JSON to FOLDER/<prefix><timestamp>.json and FOLDER/<prefix>latest.json."""
    from cnnviz.io.atomic import atomic_write_json

    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = json.loads(json.dumps({"timestamp": stamp, **report}, default=str))
    folder.mkdir(parents=True, exist_ok=True)
    path = atomic_write_json(folder / f"{prefix}{stamp}.json", payload)
    atomic_write_json(folder / f"{prefix}latest.json", payload)
    print(f"wrote {path} and {prefix}latest.json")
    return path


# ---------------------------------------------------------------------------------- output
def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def print_table(rows: list[Row]) -> None:
    header = ("section", "measurement", "value", "unit", "compared with", "ratio", "target",
              "result")
    lines = []
    for row in rows:
        verdict = "-" if row.passed is None else ("PASS" if row.passed else "FAIL")
        ratio = "" if row.ratio is None else f"{_number(row.ratio)} {row.ratio_label}"
        lines.append((row.section, row.name, _number(row.value), row.unit, row.baseline, ratio,
                      row.target, verdict))
    widths = [max(len(str(line[index])) for line in [header, *lines])
              for index in range(len(header))]
    for index, line in enumerate([header, *lines]):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))
    for row in rows:
        if row.note:
            print(f"  {row.name}: {row.note}")
