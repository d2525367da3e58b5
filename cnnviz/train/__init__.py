"""Training into a run directory: fit with Keras callbacks, a commit per epoch, resume after a kill,
run ownership, devices and tf.distribute.

`train` and `TrainResult` are loaded on first use (PEP 562): importing a light part of this package
(`cnnviz.train.resume`, `cnnviz.train.history`) does not import Keras.
"""

from cnnviz.train.history import read_history

__all__ = ["TrainResult", "read_history", "train"]


def __getattr__(name: str):
    if name in ("train", "TrainResult"):
        from cnnviz.train import fit

        return getattr(fit, name)
    raise AttributeError(f"module 'cnnviz.train' has no attribute {name!r}")
