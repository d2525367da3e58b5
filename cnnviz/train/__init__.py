"""Training into a run directory: fit with Keras callbacks, a commit per epoch, resume after a kill,
run ownership, devices and tf.distribute."""

from cnnviz.train.fit import TrainResult, train
from cnnviz.train.history import read_history

__all__ = ["TrainResult", "read_history", "train"]
