"""`cnnviz` processes forked from a warm fork server, for tests that start many of them.

A fresh `python -m cnnviz.cli` spends seconds importing TensorFlow before it does anything; a
test that SIGKILLs twenty trainings paid that twenty times. `start` forks each process from a
multiprocessing fork server that imported the CLI once (and ran nothing: no op, no thread pool
in use), so every process is still a real, separate process running the CLI's own `app` on its
own arguments and environment, with its stdout and stderr in files, and is killed for real.

Imported by the tests as `_forked` (pytest puts this folder on sys.path); the fork server
imports it too (set_forkserver_preload), which is what imports the CLI there.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path

from cnnviz._quiet import import_keras_quietly

# In the fork server this is its preload: everything a training needs, imported once.
import_keras_quietly()
import cnnviz.cli
import cnnviz.train  # noqa: F401

_IMPORTED_BY = os.getpid()  # the fork server's pid in every process forked from it
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload([__name__])
_STARTING = threading.Lock()  # chains start processes from threads


def warm_up() -> None:
    """Start the fork server now (its imports take seconds), so it is ready when needed."""
    from multiprocessing import forkserver

    # The server is a fresh `python -c`: it finds this module through PYTHONPATH (Python 3.11
    # ignores the sys.path it is given, and a preload that fails to import fails silently).
    with _STARTING:
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).parent), *([saved] if saved else [])])
        try:
            forkserver.ensure_running()
        finally:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved


def _cli(argv: list[str], environment: dict, stdout: str, stderr: str) -> None:
    """The child: the environment and output files of `python -m cnnviz.cli ARGV`, then the
    CLI's app. Its exit status is the CLI's (multiprocessing exits with SystemExit's code)."""
    os.environ.clear()
    os.environ.update(environment)
    for fd, path in ((1, stdout), (2, stderr)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    if _IMPORTED_BY == os.getpid():  # into the stderr file, where the test's message shows it
        raise SystemExit("_forked: the fork server did not preload the CLI (see warm_up)")
    sys.stdout.reconfigure(line_buffering=True)  # PYTHONUNBUFFERED's effect on progress lines
    sys.argv = ["cnnviz", *argv]
    from cnnviz.cli import app

    app(argv, prog_name="cnnviz")


class Process:
    """One forked `cnnviz ARGV` process; its output goes to files in `folder`."""

    _numbers = itertools.count(1)  # next() is atomic: chains start processes from threads

    def __init__(self, argv: list[str], environment: dict, folder: Path):
        number = next(Process._numbers)
        self.stdout_file = folder / f"process-{number}.stdout"
        self.stderr_file = folder / f"process-{number}.stderr"
        self._process = _CONTEXT.Process(target=_cli, args=(
            [str(arg) for arg in argv], dict(environment), str(self.stdout_file),
            str(self.stderr_file)))
        warm_up()
        self._process.start()
        self.pid = self._process.pid

    def wait(self, timeout: float = 300) -> int:
        """The exit status, negative for a signal (like subprocess)."""
        self._process.join(timeout)
        if self._process.exitcode is None:
            self._process.kill()
            self._process.join()
            raise TimeoutError(f"cnnviz process {self.pid} ran past {timeout} s")
        return self._process.exitcode

    def wait_for_line(self, prefix: str, timeout: float = 300) -> bool:
        """Wait until a line of its stdout starts with `prefix` (True) or it exits (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line.startswith(prefix) for line in self.stdout.splitlines()):
                return True
            if self._process.exitcode is not None:
                return False
            time.sleep(0.005)
        raise TimeoutError(f"no {prefix!r} line from cnnviz process {self.pid}")

    def poll(self) -> int | None:
        """The exit status, or None while it runs."""
        return self._process.exitcode

    def kill(self) -> None:
        self._process.kill()

    @property
    def stdout(self) -> str:
        return self.stdout_file.read_text() if self.stdout_file.exists() else ""

    @property
    def stderr(self) -> str:
        return self.stderr_file.read_text() if self.stderr_file.exists() else ""
