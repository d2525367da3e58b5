"""`python -m cnnviz.cli ...`: the same as the `cnnviz` command."""

from cnnviz.cli import app

if __name__ == "__main__":  # not when a spawned worker process re-imports the main module
    app()
