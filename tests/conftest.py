"""Fixtures shared by several test files."""

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
