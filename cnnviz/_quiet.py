"""Import Keras and TensorFlow without TensorFlow's C++ start-up chatter on the user's terminal.

TensorFlow's oneDNN/absl/CUDA lines are written by C++ straight to file descriptor 2 while it
loads and first lists devices; TF_CPP_MIN_LOG_LEVEL does not silence all of them, so file
descriptor 2 points at /dev/null for exactly that window. oneDNN itself stays on.
"""

from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def quiet_stderr():
    """File descriptor 2 to /dev/null for the duration (C++ logging bypasses sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def tensorflow_available() -> bool:
    """Whether TensorFlow can be imported here (imports it, quietly, the first time): a machine
    with only JAX or PyTorch runs every command but training and export without it."""
    global _TENSORFLOW_AVAILABLE
    if _TENSORFLOW_AVAILABLE is None:
        # Also when Keras has imported TensorFlow already (its own backend): the device listing
        # below is what prints the CUDA lines, so it runs here, muted, once.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        try:
            with quiet_stderr():
                import tensorflow as tf

                tf.config.list_physical_devices()
                # Sanity checks trace one function per randomized model copy on purpose; TF's
                # "retracing" advice would only be noise here.
                tf.get_logger().setLevel("ERROR")
            _TENSORFLOW_AVAILABLE = True
        except ImportError:
            _TENSORFLOW_AVAILABLE = False
    return _TENSORFLOW_AVAILABLE


_TENSORFLOW_AVAILABLE: bool | None = None


def import_keras_quietly() -> None:
    """Import Keras on its backend, and TensorFlow beside it where it is installed (the tf.data
    input and the image decoder use it on every backend), with stderr muted."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "keras" not in sys.modules:
        try:
            with quiet_stderr():
                import keras  # noqa: F401
        except ImportError as error:
            if error.name != "tensorflow" and "tensorflow" not in str(error):
                raise
            from cnnviz.errors import CnnvizError

            raise CnnvizError(
                "Keras is set to the tensorflow backend, but TensorFlow is not installed here: "
                "pip install 'cnnviz[tensorflow]', or run on JAX or PyTorch (--backend "
                "jax|torch, or KERAS_BACKEND)") from None
    tensorflow_available()
