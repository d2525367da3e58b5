"""The main job's cost: `cnnviz run configs/digits.yaml` against `cnnviz train configs/digits.yaml`,
each a fresh process, one after the other on the same machine (target: run <= 3x train, wall).

    python bench/main_job.py              # one pair
    python bench/main_job.py --pairs 3    # three pairs: the median ratio and the range
    python bench/main_job.py --out DIR    # where the JSON goes (default outputs/bench)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import DIGITS, QUIET_ENV, ROOT, Row, print_table, save_report, timed_process

TARGET = 3.0


def _cnnviz() -> list[str]:
    found = shutil.which("cnnviz")
    return [found] if found else [sys.executable, "-m", "cnnviz.cli"]


def one_pair(workdir: Path, env: dict) -> dict:
    """Train, then run, on the digits config: each process's wall, CPU and peak RSS."""
    train = timed_process([*_cnnviz(), "train", str(DIGITS), "--out", str(workdir / "train"),
                           "--json"], env)
    run = timed_process([*_cnnviz(), "run", str(DIGITS), "--out", str(workdir / "run"),
                         "--json"], env)
    return {"train": {key: train[key] for key in ("wall_s", "cpu_s", "rss_mib")},
            "run": {key: run[key] for key in ("wall_s", "cpu_s", "rss_mib")},
            "run_timings": run.get("timings", {}),
            "wall_ratio": run["wall_s"] / train["wall_s"],
            "cpu_ratio": run["cpu_s"] / train["cpu_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1,
                        help="train/run pairs (one after the other)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    options = parser.parse_args(argv)
    env = {**os.environ, **QUIET_ENV, "PYTHONPATH": str(ROOT)}
    pairs = []
    with tempfile.TemporaryDirectory() as workdir:
        for index in range(options.pairs):
            pair = one_pair(Path(workdir) / str(index), env)
            print(f"pair {index + 1}: train {pair['train']['wall_s']:.1f} s, run "
                  f"{pair['run']['wall_s']:.1f} s wall ({pair['wall_ratio']:.2f}x); CPU "
                  f"{pair['train']['cpu_s']:.1f} s vs {pair['run']['cpu_s']:.1f} s; "
                  f"{pair['run_timings']}")
            pairs.append(pair)
    ratios = [pair["wall_ratio"] for pair in pairs]
    median = statistics.median(ratios)
    rows = [Row("main job", "cnnviz run / cnnviz train (wall)", median, "x",
                baseline="cnnviz train, same machine, just before", ratio=median,
                ratio_label=f"range {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)}",
                target=f"<= {TARGET:g}", passed=median <= TARGET),
            Row("main job", "cnnviz run / cnnviz train (CPU)",
                statistics.median(pair["cpu_ratio"] for pair in pairs), "x",
                note="information: CPU time of the two processes")]
    print_table(rows)
    save_report(options.out, "main_job-", {"pairs": pairs, "median_wall_ratio": median})
    return 0


if __name__ == "__main__":
    sys.exit(main())
