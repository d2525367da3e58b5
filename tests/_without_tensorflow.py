"""Run cnnviz commands in a process where TensorFlow cannot be imported (as on a machine with
only JAX or PyTorch): `python _without_tensorflow.py FOLDER RESULT.json`, with KERAS_BACKEND
set and this folder's `no_tensorflow/` first on PYTHONPATH (its sitecustomize hides the
package). FOLDER holds model.keras and image files; RESULT gets each command's exit code and
output, and whether TensorFlow was imported after all."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from typer.testing import CliRunner

from cnnviz.cli import app

COMMANDS = {
    "layers": ["layers", "model.keras"],
    "summary": ["summary", "model.keras", "--out", "out/summary"],
    "saliency": ["saliency", "model.keras", "--images", "a.png,b.jpg", "--out", "out/s"],
    "gradcam": ["gradcam", "model.keras", "--images", "a.png", "--out", "out/g"],
    "cam": ["cam", "model.keras", "--images", "a.png", "--out", "out/c"],
    "integrated-gradients": ["integrated-gradients", "model.keras", "--images", "a.png",
                             "--out", "out/ig"],
    "rise": ["rise", "model.keras", "--images", "a.png", "--out", "out/r"],
    "occlusion": ["occlusion", "model.keras", "--images", "a.png", "--out", "out/o"],
    "feature-maps": ["feature-maps", "model.keras", "--images", "a.png", "--out", "out/f"],
    "filters": ["filters", "model.keras", "--out", "out/k"],
    "activation-max": ["activation-max", "model.keras", "--steps", "4", "--param", "fft",
                       "--transforms", "pad,jitter,scale,rotate", "--out", "out/a"],
    "verify": ["verify", "model.keras", "--images", "a.png,b.jpg"],
    "predict": ["predict", "model.keras", "--images", "a.png,b.jpg", "--csv", "out/p.csv"],
    "train": ["train", "config.yaml"],
    "export": ["export", "model.keras", "--format", "onnx", "--out", "out/e"],
}


def main(folder: Path, result: Path) -> None:
    import os

    os.chdir(folder)
    outcomes = {}
    for name, arguments in COMMANDS.items():
        ran = CliRunner().invoke(app, arguments)
        outcomes[name] = {"exit_code": ran.exit_code, "output": ran.output[-2000:],
                          "traceback": ran.exc_info is not None and ran.exit_code not in (0, 2)}
    import keras

    result.write_text(json.dumps({"commands": outcomes, "backend": keras.backend.backend(),
                                  "tensorflow_imported": "tensorflow" in sys.modules}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
