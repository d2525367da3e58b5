"""Fixtures shared by several test files, and the guard of the `slow` mark."""

import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A real trained run: digits at its native 8x8, three epochs (a few seconds)."""
    from cnnviz.config.loading import load_config
    from cnnviz.train.fit import train

    config = load_config(ROOT / "configs" / "digits.yaml",
                         ["data.image_size=null", "train.epochs=3", "train.verbose=0"])
    return train(config, tmp_path_factory.mktemp("runs"), log=lambda line: None).run_dir


# ------------------------------------------------------------------ the guard of `slow`
# A test that trains a model or starts a process must be marked slow, so that `-m "not slow"`
# stays quick. While a test without the mark is set up (its fixtures included), run and torn
# down, Model.fit, subprocess.Popen and multiprocessing's start are watched; they still run,
# and the test then fails at teardown naming what it did.
_WATCH = {"active": False, "seen": []}


def _watched(what: str, original):
    @functools.wraps(original)
    def watched(*args, **kwargs):
        if _WATCH["active"]:
            _WATCH["seen"].append(what)
        return original(*args, **kwargs)

    return watched


def pytest_configure(config):
    import multiprocessing.process
    import subprocess

    import keras

    keras.Model.fit = _watched("trains a model (Model.fit)", keras.Model.fit)
    subprocess.Popen.__init__ = _watched("starts a process (subprocess)",
                                         subprocess.Popen.__init__)
    multiprocessing.process.BaseProcess.start = _watched(
        "starts a process (multiprocessing)", multiprocessing.process.BaseProcess.start)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _WATCH["active"] = item.get_closest_marker("slow") is None
    _WATCH["seen"] = []


@pytest.hookimpl(trylast=True)  # after the fixtures' teardown
def pytest_runtest_teardown(item):
    seen, _WATCH["active"] = list(dict.fromkeys(_WATCH["seen"])), False
    if seen:
        pytest.fail(f"{item.nodeid} {' and '.join(seen)}: mark it @pytest.mark.slow",
                    pytrace=False)
