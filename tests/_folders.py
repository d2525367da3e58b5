"""A small image folder for the tests that need one (imported as `_folders`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 12
CLASSES = ("bright", "dark")


def make_folder(root: Path, per_class: int = 24, *, seed: int = 0) -> Path:
    """Two easy classes (a bright or a dark square on noise), PNG and BMP mixed; each image's
    top-left pixel holds its number, so a test can tell which file an image came from."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = rng.integers(60, 120, (SIDE, SIDE, 3)).astype(np.uint8)
            pixels[3:9, 3:9] = 230 if label == 0 else 10
            pixels[0, 0] = index
            suffix = "png" if index % 3 else "bmp"
            Image.fromarray(pixels).save(root / name / f"{index:03d}.{suffix}")
    return root


def folder_config(root: Path, **data):
    from cnnviz.config.loading import validate

    return validate({
        "name": "folder",
        "seed": 5,
        "data": {"source": "directory", "path": str(root), "image_size": [SIDE, SIDE],
                 "validation_split": 0.25, "test_split": 0.25, **data},
        "model": {"layers": [{"type": "conv2d", "filters": 4, "kernel": 3, "name": "conv"},
                             {"type": "max_pool2d", "pool": 2}, {"type": "flatten"}]},
        "train": {"epochs": 2, "batch_size": 8, "verbose": 0,
                  "optimizer": {"learning_rate": 0.01}},
    })
