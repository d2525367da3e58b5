"""The `cnnviz` command line: one thin function per subcommand, grouped by what it does.

`_common` holds the Typer app, shared options and error handling; `train` (train, run, config,
summary), `explain` (figure commands), `trust` (verify, sanity, faithfulness, shortcut) and
`deploy` (evaluate, predict, export) register their commands on import, in the order `--help`
lists them.
"""

# isort: off
from cnnviz.cli import train  # noqa: F401 - registers the commands
from cnnviz.cli import explain  # noqa: F401
from cnnviz.cli import trust  # noqa: F401
from cnnviz.cli import deploy  # noqa: F401
from cnnviz.cli._common import app

# isort: on


def main() -> None:  # pragma: no cover - console entry point
    app()


__all__ = ["app", "main"]
