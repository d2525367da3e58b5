"""history.csv: reading it, trimming it to the committed epochs on resume."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from cnnviz.io.atomic import (
    atomic_write_text,
)


def trim_history(history_file: Path, resume_epoch: int) -> None:
    """Keep only the history rows of the epochs before `resume_epoch`, byte for byte.

    The history row is written before the epoch is committed: an epoch whose commit a kill
    prevented has a row but reruns, so the row must go or it would appear twice. Rows are kept
    only while they are complete lines numbering the epochs 0, 1, 2, ... in order.
    """
    if not history_file.is_file():
        return
    text = history_file.read_bytes().decode("utf-8", errors="replace")  # keep CSVLogger's \r\n
    lines = text.splitlines(keepends=True)
    header = next(csv.reader(lines[:1]), [])
    if resume_epoch == 0 or not header or header[0] != "epoch" or not lines[0].endswith("\n"):
        history_file.unlink()  # CSVLogger writes a new header
        return
    kept = lines[:1]
    for line in lines[1:resume_epoch + 1]:
        row = next(csv.reader([line]), [])
        if not line.endswith("\n") or len(row) != len(header) or row[0] != str(len(kept) - 1):
            break
        kept.append(line)
    if "".join(kept) != text:
        atomic_write_text(history_file, "".join(kept))


def read_history(history_file: Path) -> dict[str, list[float]]:
    """history.csv as {metric: [value per epoch]}."""
    if not history_file.is_file():
        return {}
    rows = list(csv.DictReader(io.StringIO(history_file.read_text())))
    # CSVLogger writes "NA" for the validation columns of a run without validation data.
    columns = {key: [float("nan") if row[key] == "NA" else float(row[key]) for row in rows]
               for key in (rows[0] if rows else {})}
    return {key: values for key, values in columns.items()
            if not all(np.isnan(value) for value in values)}
