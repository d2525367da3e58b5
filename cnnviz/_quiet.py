"""Import TensorFlow without its C++ start-up chatter on the user's terminal.

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


def import_tensorflow_quietly() -> None:
    """Import TensorFlow and Keras (and let TensorFlow find its devices) with stderr muted."""
    if "tensorflow" in sys.modules and "keras" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_stderr():
        import keras  # noqa: F401
        import tensorflow as tf

        tf.config.list_physical_devices()
        # Sanity checks trace one function per randomized model copy on purpose; TF's
        # "retracing" advice would only be noise here.
        tf.get_logger().setLevel("ERROR")
