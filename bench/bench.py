"""cnnviz benchmark: what cnnviz costs next to plain Keras, measured in one process.

    python bench/bench.py            # the full run (a few minutes)
    python bench/bench.py --quick    # fewer epochs, images and repeats (about a minute or two)
    python bench/bench.py --out DIR  # where the JSON goes (default outputs/bench)

On one model (configs/digits.yaml, 28x28 digits, trained here in a temporary folder) and the
same images, it measures:

  training      images/s of `cnnviz.train.train` (its fit, with its per-epoch commit (backup),
                ModelCheckpoint, CSVLogger and TerminateOnNaN) vs a hand-written `model.fit` of
                the same model on the same images, fed
                as arrays and as a tf.data pipeline (no callbacks). Target: cnnviz >= 95% of
                the faster plain one.
  explanations  images/s of saliency (vanilla, guided, SmoothGrad-20), Grad-CAM and occlusion
                (4x4 patches) on a batch, vs one image per call, vs a compiled forward pass
                (tf.function, batches of 256). Targets: vanilla and Grad-CAM cost <= 4 forward
                passes per image; SmoothGrad-20 <= 25x vanilla; occlusion >= 20x faster than
                one `model.predict` per window (timed on a few images, per image).
  batch CLI     figures/s of `cnnviz saliency RUN --images 0:N --method vanilla` at N=100 and
                N=1000 (--quick: 50 and 500) and the peak RSS of that process (os.wait4):
                flat means RSS(1000) <= 1.2 x RSS(100). A row says "not available" when the
                command fails.
  start-up      `cnnviz --help` vs `python -c "import tensorflow"` (subprocesses, best of 3).
                Target: under a quarter.

Timings are the best of a few repeats (the machine may be shared); the ratios are the point,
since both sides of each are measured in the same run. On a busy machine whole-fit timings
vary by more than 5%, so the training section also reports the time spent inside
the per-epoch commit (backup) and the checkpoints as a share of the fit, which the load hardly
moves. It prints the settings in force
(threads, oneDNN, CPUs, versions) and a table with PASS/FAIL per target, and writes the same as
JSON to OUT/<timestamp>.json and OUT/latest.json. Nothing here asserts: tests never time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (  # bench/common.py: the shared timing and table helpers
    DIGITS,
    FULL,
    QUICK,
    QUIET_ENV,
    ROOT,
    Row,
    Sizes,
    begin,
    best_time,
    finish,
)

sys.path.insert(0, str(ROOT))  # run from a checkout without installing


# ------------------------------------------------------------------------------- training
def _timed(method, totals: list):
    """`method`, adding the seconds each call takes to `totals[-1]`."""

    def timed(*args, **kwargs):
        started = time.perf_counter()
        method(*args, **kwargs)
        totals[-1] += time.perf_counter() - started

    return timed


def bench_training(config, dataset, sizes: Sizes, workdir: Path) -> tuple[list[Row], dict, Path]:
    """cnnviz train() vs plain model.fit (on arrays, and on a hand-written tf.data pipeline),
    alternated, best of `train_repeats` each. The target compares with the faster plain one."""
    import keras
    import tensorflow as tf

    from cnnviz.model.build import build_model
    from cnnviz.model.optimizers import compile_model
    from cnnviz.train.fit import train

    batch = config.train.batch_size

    def plain_fit(epochs: int, pipeline: bool) -> float:
        keras.utils.set_random_seed(config.seed)
        model = build_model(config, dataset.input_shape, dataset.num_classes)
        compile_model(model, config)
        if pipeline:
            train_data = (tf.data.Dataset.from_tensor_slices((dataset.x_train, dataset.y_train))
                          .shuffle(len(dataset.x_train), seed=config.seed).batch(batch)
                          .prefetch(tf.data.AUTOTUNE))
            val_data = tf.data.Dataset.from_tensor_slices((dataset.x_val, dataset.y_val)).batch(
                batch).prefetch(tf.data.AUTOTUNE)
            arguments = {"x": train_data, "validation_data": val_data, "shuffle": False}
        else:
            arguments = {"x": dataset.x_train, "y": dataset.y_train, "batch_size": batch,
                         "validation_data": (dataset.x_val, dataset.y_val)}
        started = time.perf_counter()
        model.fit(epochs=epochs, verbose=0, **arguments)
        return time.perf_counter() - started

    # Time cnnviz's own checkpoint callback inside its fit (a load-independent share of the
    # overhead, where whole-fit timings on a busy machine vary by more than the 5% target).
    import cnnviz.train.fit

    checkpoint_seconds = []
    original_callbacks = cnnviz.train.fit.training_callbacks
    timed_kinds = ("EpochCommit", "ThrottledModelCheckpoint")

    def timed_callbacks(*args, **kwargs):
        callbacks = original_callbacks(*args, **kwargs)
        for callback in callbacks:
            if type(callback).__name__ not in timed_kinds:
                continue
            for hook in ("on_train_begin", "on_epoch_end", "on_train_end"):
                setattr(callback, hook, _timed(getattr(callback, hook), checkpoint_seconds))
        return callbacks

    plain_fit(1, False)  # warm-up: thread pools, oneDNN primitives, first tracing in this process
    plain_fit(1, True)
    arrays_seconds, pipeline_seconds, fit_seconds, total_seconds = [], [], [], []
    run_dir = None
    for repeat in range(sizes.train_repeats):
        arrays_seconds.append(plain_fit(sizes.epochs, False))
        pipeline_seconds.append(plain_fit(sizes.epochs, True))
        checkpoint_seconds.append(0.0)
        cnnviz.train.fit.training_callbacks = timed_callbacks
        try:
            started = time.perf_counter()
            result = train(config, workdir / f"train{repeat}", dataset=dataset,
                           log=lambda line: None)
            total_seconds.append(time.perf_counter() - started)
        finally:
            cnnviz.train.fit.training_callbacks = original_callbacks
        fit_seconds.append(result.metrics["seconds"])
        run_dir = result.run_dir

    images = len(dataset.x_train) * sizes.epochs
    arrays_rate = images / min(arrays_seconds)
    pipeline_rate = images / min(pipeline_seconds)
    plain_rate = max(arrays_rate, pipeline_rate)
    fit_rate = images / min(fit_seconds)
    total_rate = images / min(total_seconds)
    share = float(np.median([own / fit for own, fit in zip(checkpoint_seconds, fit_seconds)]))
    rows = [
        Row("training", "plain model.fit on arrays", arrays_rate, "images/s",
            note=f"{sizes.epochs} epochs x {len(dataset.x_train)} images, batch {batch}, "
                 "with validation; no callbacks"),
        Row("training", "plain model.fit on tf.data", pipeline_rate, "images/s",
            note="from_tensor_slices.shuffle.batch.prefetch, no callbacks"),
        Row("training", "cnnviz train(): its fit", fit_rate, "images/s", "faster plain fit",
            fit_rate / plain_rate, "x plain", ">= 0.95", fit_rate / plain_rate >= 0.95,
            note="with its callbacks: EpochCommit (backup), ModelCheckpoint x2, CSVLogger, "
                 "TerminateOnNaN"),
        Row("training", "backup + ModelCheckpoint: own time", share * 100,
            "% of its fit", note="time inside the per-epoch commit (weights and metadata, "
                                 "written atomically) and the checkpoints (.keras at most every "
                                 "30 s and at the end), median"),
        Row("training", "cnnviz train(): whole call", total_rate, "images/s", "faster plain fit",
            total_rate / plain_rate, "x plain",
            note="+ model build, test evaluation, model.keras, metrics.json, curves.png"),
    ]
    raw = {"plain_arrays_seconds": arrays_seconds, "plain_tf_data_seconds": pipeline_seconds,
           "cnnviz_fit_seconds": fit_seconds, "cnnviz_train_seconds": total_seconds,
           "cnnviz_checkpoint_callback_seconds": checkpoint_seconds,
           "train_images": len(dataset.x_train), "epochs": sizes.epochs, "batch_size": batch}
    return rows, raw, run_dir


# --------------------------------------------------------------------------- explanations
def _forward_rate(model, images: np.ndarray, repeats: int) -> float:
    """Images/s of a compiled forward pass over fixed batches of 256.

    Measured on 1024 images (the given ones, repeated), so no batch is padding.
    """
    import tensorflow as tf

    batch = 256
    images = np.resize(images, (4 * batch, *images.shape[1:])).astype(np.float32)
    forward = tf.function(lambda x: model(x, training=False),
                          input_signature=[tf.TensorSpec((batch, *images.shape[1:]), tf.float32)])
    chunks = [tf.constant(images[start:start + batch]) for start in range(0, len(images), batch)]

    def run():
        for chunk in chunks:
            forward(chunk).numpy()

    return len(images) / best_time(run, repeats)


def _naive_occlusion_seconds(model, images: np.ndarray, patch: int, fill: float) -> float:
    """Seconds per image of the naive baseline: one model.predict per occluded window."""
    height, width = images.shape[1:3]
    started = time.perf_counter()
    for image in images:
        for top in range(0, height - patch + 1, patch):
            for left in range(0, width - patch + 1, patch):
                occluded = image.copy()
                occluded[top:top + patch, left:left + patch] = fill
                model.predict(occluded[None], verbose=0)
    return (time.perf_counter() - started) / len(images)


def _methods():
    """name -> function(model, images) for each explanation; an import error is kept instead."""
    methods = {}
    try:
        from cnnviz.explain.saliency import saliency

        methods["saliency vanilla"] = lambda m, x: saliency(m, x, method="vanilla")
        methods["saliency guided"] = lambda m, x: saliency(m, x, method="guided")
        methods["smoothgrad-20"] = lambda m, x: saliency(m, x, method="smoothgrad", samples=20)
    except ImportError as error:
        methods["saliency"] = error
    try:
        from cnnviz.explain.gradcam import gradcam

        methods["grad-cam"] = lambda m, x: gradcam(m, x)
    except ImportError as error:
        methods["grad-cam"] = error
    try:
        from cnnviz.explain.occlusion import occlusion

        methods["occlusion 4x4"] = lambda m, x: occlusion(m, x, patch=4, fill=0.5)
    except ImportError as error:
        methods["occlusion 4x4"] = error
    return methods


def bench_explanations(model, test_images: np.ndarray, sizes: Sizes) -> tuple[list[Row], dict]:
    repeats = sizes.timing_repeats
    images = np.resize(test_images, (sizes.images, *test_images.shape[1:])).astype(np.float32)
    single = images[: sizes.single_images]
    forward_rate = _forward_rate(model, images, repeats)
    rows = [Row("explain", "forward pass (tf.function, batch 256)", forward_rate, "images/s",
                note=f"on 1024 images; the methods on {len(images)} batched and "
                     f"{len(single)} one per call")]
    raw: dict = {"images": len(images), "single_images": len(single),
                 "forward_images_per_second": forward_rate}
    rates = {}
    for name, method in _methods().items():
        if isinstance(method, Exception):
            rows.append(Row("explain", name, None, "", note=f"not available: {method}"))
            continue
        try:
            batched = len(images) / best_time(lambda call=method: call(model, images), repeats)
            method(model, single[:1])  # compile the one-image shapes before timing
            one_by_one = len(single) / best_time(
                lambda call=method: [call(model, single[index:index + 1])
                                     for index in range(len(single))],
                1, warm=False)
        except Exception as error:  # noqa: BLE001 - a method still being written must not stop the bench
            rows.append(Row("explain", name, None, "", note=f"failed: {type(error).__name__}: "
                                                              f"{str(error).splitlines()[0][:80]}"))
            continue
        rates[name] = batched
        raw[name] = {"batched_images_per_second": batched,
                     "one_at_a_time_images_per_second": one_by_one}
        forward_passes = forward_rate / batched
        target = name in ("saliency vanilla", "grad-cam")
        rows.append(Row("explain", f"{name}: batched", batched, "images/s", "forward pass",
                        forward_passes, "forward passes/image", "<= 4" if target else "",
                        forward_passes <= 4 if target else None))
        rows.append(Row("explain", f"{name}: one image per call", one_by_one, "images/s",
                        "batched", batched / one_by_one, "x slower than batched"))

    if "smoothgrad-20" in rates and "saliency vanilla" in rates:
        cost = rates["saliency vanilla"] / rates["smoothgrad-20"]
        rows.append(Row("explain", "smoothgrad-20 vs vanilla", cost, "x time/image",
                        "saliency vanilla", cost, "x vanilla", "<= 25", cost <= 25))
    if "occlusion 4x4" in rates:
        naive_images = images[: sizes.naive_occlusion_images]
        naive = _naive_occlusion_seconds(model, naive_images, patch=4, fill=0.5)
        speedup = naive * rates["occlusion 4x4"]
        raw["naive_occlusion_seconds_per_image"] = naive
        rows.append(Row("explain", "occlusion 4x4: naive predict per window", 1 / naive,
                        "images/s", note=f"timed on {len(naive_images)} image(s), 49 "
                                         "model.predict calls each"))
        rows.append(Row("explain", "occlusion 4x4 vs naive", speedup, "x faster",
                        "naive predict per window", speedup, "x faster", ">= 20", speedup >= 20))
    return rows, raw


# ------------------------------------------------------------------------------ batch CLI
def _cnnviz_command() -> list[str]:
    found = shutil.which("cnnviz")
    return [found] if found else [sys.executable, "-m", "cnnviz.cli"]


def _measured_run(command: list[str], log_file: Path) -> tuple[int, float, int]:
    """Run `command`; return (exit code, wall seconds, peak RSS in KiB) of that process tree's
    main process (os.wait4 reports the child's own rusage)."""
    environment = {**os.environ, **QUIET_ENV, "PYTHONPATH": str(ROOT)}
    with open(log_file, "w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, seconds, int(usage.ru_maxrss)


def bench_cli(sizes: Sizes, workdir: Path) -> tuple[list[Row], dict]:
    command = _cnnviz_command()
    probe = subprocess.run([*command, "saliency", "--help"], capture_output=True, text=True,
                           check=False, env={**os.environ, **QUIET_ENV, "PYTHONPATH": str(ROOT)})
    if probe.returncode != 0:
        reason = (probe.stderr or probe.stdout).strip().splitlines()
        note = f"not available: `cnnviz saliency` failed ({reason[-1][:70] if reason else '?'})"
        return [Row("batch CLI", f"cnnviz saliency --images 0:{count}", None, "", note=note)
                for count in sizes.cli_counts], {"available": False, "reason": note}

    from cnnviz.config.loading import load_config
    from cnnviz.train.fit import train

    # The digits test split has 359 images; this run holds out 60% (1078) to have 1000.
    config = load_config(DIGITS, ["train.epochs=1", "train.verbose=0", "data.test_split=0.6"])
    run_dir = train(config, workdir / "cli", log=lambda line: None).run_dir
    results = {}
    rows = []
    for count in sizes.cli_counts:
        out = workdir / f"cli-figures-{count}"
        code, seconds, rss = _measured_run(
            [*command, "saliency", str(run_dir), "--images", f"0:{count}", "--method", "vanilla",
             "--out", str(out)], workdir / f"cli-{count}.log")
        figures = len(list(out.rglob("*.png"))) if out.exists() else 0
        if code != 0:
            tail = (workdir / f"cli-{count}.log").read_text().strip().splitlines()
            rows.append(Row("batch CLI", f"cnnviz saliency --images 0:{count}", None, "",
                            note=f"failed (exit {code}): {tail[-1][:70] if tail else ''}"))
            continue
        results[count] = {"seconds": seconds, "peak_rss_kib": rss, "figures": figures}
        rows.append(Row("batch CLI", f"cnnviz saliency --images 0:{count}", figures / seconds,
                        "figures/s", note=f"{figures} PNGs in {seconds:.1f} s (with start-up), "
                                          f"peak RSS {rss / 1024:.0f} MiB"))
    small, large = sizes.cli_counts
    if small in results and large in results:
        extra = (results[large]["seconds"] - results[small]["seconds"])
        added = results[large]["figures"] - results[small]["figures"]
        if extra > 0 and added > 0:
            rows.append(Row("batch CLI", f"figures {small}->{large}, start-up excluded",
                            added / extra, "figures/s"))
        growth = results[large]["peak_rss_kib"] / results[small]["peak_rss_kib"]
        rows.append(Row("batch CLI", f"peak RSS at {large} vs {small} images", growth, "x",
                        f"RSS at {small}", growth, "x", "<= 1.2 (flat)", growth <= 1.2))
    return rows, {"available": True, "runs": results}


# ------------------------------------------------------------------------------- start-up
def bench_startup(repeats: int = 3) -> tuple[list[Row], dict]:
    environment = {**os.environ, **QUIET_ENV, "PYTHONPATH": str(ROOT)}

    def wall(command: list[str]) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run(command, capture_output=True, env=environment, check=True)
            times.append(time.perf_counter() - started)
        return min(times)

    help_seconds = wall([*_cnnviz_command(), "--help"])
    import_seconds = wall([sys.executable, "-c", "import tensorflow"])
    ratio = help_seconds / import_seconds
    rows = [
        Row("start-up", 'python -c "import tensorflow"', import_seconds, "s"),
        Row("start-up", "cnnviz --help", help_seconds, "s", "import tensorflow", ratio,
            "x import", "< 0.25", ratio < 0.25),
    ]
    return rows, {"help_seconds": help_seconds, "import_tensorflow_seconds": import_seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs, images and repeats")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench",
                        help="folder for <timestamp>.json and latest.json")
    parser.add_argument("--skip-cli", action="store_true", help="skip the batch-CLI section")
    arguments = parser.parse_args(argv)
    sizes = QUICK if arguments.quick else FULL

    values = begin("cnnviz bench", arguments.quick)
    import keras

    from cnnviz.config.loading import load_config
    from cnnviz.data import load_dataset

    started = time.perf_counter()
    rows: list[Row] = []
    raw: dict = {}
    with tempfile.TemporaryDirectory(prefix="cnnviz-bench-") as folder:
        workdir = Path(folder)
        config = load_config(DIGITS, [f"train.epochs={sizes.epochs}", "train.verbose=0"])
        dataset = load_dataset(config)
        print(f"\ntraining ({sizes.train_repeats} x {sizes.epochs} epochs each way) ...",
              flush=True)
        section, raw["training"], run_dir = bench_training(config, dataset, sizes, workdir)
        rows += section
        print("explanations ...", flush=True)
        model = keras.models.load_model(run_dir / "model.keras", compile=False)
        section, raw["explain"] = bench_explanations(model, dataset.x_test, sizes)
        rows += section
        if arguments.skip_cli:
            rows.append(Row("batch CLI", "cnnviz saliency", None, "", note="skipped (--skip-cli)"))
        else:
            print("batch CLI ...", flush=True)
            section, raw["cli"] = bench_cli(sizes, workdir)
            rows += section
        print("start-up ...", flush=True)
        section, raw["startup"] = bench_startup()
        rows += section

    targets = [row for row in rows if row.passed is not None]
    finish(arguments, "", started, values, sizes, rows, raw,
           summary=f"{sum(row.passed for row in targets)}/{len(targets)} targets met; ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
