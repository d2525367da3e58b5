"""Run directories: their layout (`outputs/<slug>/<timestamp>/`, created complete and locked) and
reading a run back (`load_run`). Training writes them; everything after reads them."""

from cnnviz.runs.load import Run, load_run, read_metrics

__all__ = ["Run", "load_run", "read_metrics"]
