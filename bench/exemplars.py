"""Benchmark: `cnnviz exemplars` streams its data. Peak RSS and wall time of the command on a
folder of 500 and of 5,000 image files (the digits CNN, untrained: the cost does not depend on
the weights), each a fresh process; target: peak RSS at 5,000 within 1.25x of 500 (flat in N).

    python3 bench/exemplars.py [--quick]     # --quick: 200 and 2,000 files

Prints a table and writes it as JSON to OUT/exemplars-<timestamp>.json (and -latest.json).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUIET_ENV, Row, begin, print_table, quick_parser, save_report, timed_process

TARGET = 1.25


def _write_pngs(folder: Path, count: int, shape: tuple[int, int]) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
            folder / f"{index:05d}.png")
    return folder


def main(argv: list[str] | None = None) -> int:
    arguments = quick_parser(__doc__, "exemplars-").parse_args(argv)
    counts = (200, 2000) if arguments.quick else (500, 5000)
    values = begin("cnnviz exemplars memory bench", arguments.quick)
    import os

    from common import untrained_digits

    started = time.perf_counter()
    model, _ = untrained_digits()
    height, width = (int(side) for side in model.inputs[0].shape[1:3])
    measured = {}
    with tempfile.TemporaryDirectory() as folder:
        model_file = Path(folder) / "digits.keras"
        model.save(model_file)
        for count in counts:
            images = _write_pngs(Path(folder) / f"images_{count}", count, (height, width))
            command = [sys.executable, "-m", "cnnviz.cli", "exemplars", str(model_file),
                       "--images", str(images), "--layer", "conv2", "--filters", "0:8",
                       "--out", str(Path(folder) / f"out_{count}")]
            measured[count] = timed_process(command, {**os.environ, **QUIET_ENV})
    small, large = (measured[count] for count in counts)
    ratio = large["rss_mib"] / small["rss_mib"]
    rows = [Row("exemplars", f"peak RSS, {counts[0]:,} files", small["rss_mib"], "MiB"),
            Row("exemplars", f"peak RSS, {counts[1]:,} files", large["rss_mib"], "MiB",
                f"{counts[0]:,} files", ratio, "x", f"<= {TARGET}", ratio <= TARGET),
            Row("exemplars", f"wall, {counts[1]:,} files", large["wall_s"], "s",
                f"{counts[0]:,} files", large["wall_s"] / small["wall_s"], "x")]
    print_table(rows)
    print(f"took {time.perf_counter() - started:.0f} s")
    save_report(arguments.out, "exemplars-", {"settings": values, "counts": list(counts),
                                              "measured": measured,
                                              "rows": [row.__dict__ for row in rows]})
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
