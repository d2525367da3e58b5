"""The package reads as the pipeline: every import (module level or inside a function) points down
the floors below, there is no circle, and Keras internals are used in cnnviz/_keras.py only."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cnnviz"

# Lowest first. A module may import its own floor or any floor below it, never one above.
# backend is the seam over Keras's backends (gradients, custom gradients, compilation); plot
# draws arrays and needs nothing of cnnviz; io writes files (figures too); runs is the
# run-directory contract that train writes; report writes the figures that deploy and the
# pipeline hand it; callbacks re-exports the Keras callbacks users add to their own fit, whose
# code (report/watch.py) needs explain, trust and report; pipeline is `cnnviz run` as one library
# call; cli is the thin Typer layer.
FLOORS = [
    ("cnnviz", "cnnviz.errors", "cnnviz._quiet", "cnnviz._keras"),
    ("cnnviz.backend",),
    ("cnnviz.plot",),
    ("cnnviz.io",),
    ("cnnviz.config",),
    ("cnnviz.data",),
    ("cnnviz.model",),
    ("cnnviz.runs",),
    ("cnnviz.train",),
    ("cnnviz.explain",),
    ("cnnviz.trust",),
    ("cnnviz.report",),
    ("cnnviz.callbacks",),
    ("cnnviz.deploy",),
    ("cnnviz.ci",),
    ("cnnviz.pipeline",),
    ("cnnviz.cli",),
]
KERAS_INTERNALS = ("_keras_history", "_run_through_graph", "_flatten_layers", "_nodes_by_depth",
                   "_maybe_symbolic_build", "_var_key", "keras.src")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            targets |= {resolved for name in names if (resolved := resolve(name))}
        graph[module] = targets - {module}
    return graph


def _floor(module: str) -> int:
    best = None
    for index, floor in enumerate(FLOORS):
        for prefix in floor:
            if module == prefix or (prefix != "cnnviz" and module.startswith(prefix + ".")):
                best = index
    if best is None:
        pytest.fail(f"{module} is on no floor: add its folder to FLOORS in tests/test_layout.py")
    return best


def test_every_import_points_down_the_floors():
    graph = _imports(_modules())
    upward = [f"{module} (floor {_floor(module)}) imports {target} (floor {_floor(target)})"
              for module, targets in graph.items() for target in sorted(targets)
              if _floor(target) > _floor(module)]
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


def test_the_import_graph_has_no_circle():
    graph = _imports(_modules())
    state: dict[str, int] = {}
    circles = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_graph_check_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    # The two checks above would pass on an empty graph: show that they see what they look for.
    fake = tmp_path / "cnnviz"
    for name, text in {"__init__.py": "", "errors.py": "import cnnviz.cli\n",
                       "cli/__init__.py": "from cnnviz.errors import x\n"}.items():
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match="cnnviz.errors .floor 0. imports cnnviz.cli"):
        test_every_import_points_down_the_floors()
    with pytest.raises(AssertionError, match="import circles"):
        test_the_import_graph_has_no_circle()


def test_every_package_says_what_it_is_for():
    missing = [str(path.relative_to(PACKAGE.parent)) for path in PACKAGE.rglob("__init__.py")
               if not ast.get_docstring(ast.parse(path.read_text()))]
    assert not missing, f"packages without a docstring: {missing}"


def test_files_stay_small_unless_they_say_why():
    # A file over 500 lines says in its docstring which one concern needs the length.
    long = []
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().count("\n")
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > 500 and "one concern" not in docstring:
            long.append(f"{path.relative_to(PACKAGE.parent)} ({lines} lines)")
    assert not long, f"files over 500 lines: {long}"


def test_keras_internals_are_used_in_one_module_only():
    users = [f"{path.relative_to(PACKAGE.parent)}: {name}" for path in PACKAGE.rglob("*.py")
             if path.name != "_keras.py" for name in KERAS_INTERNALS
             if name in path.read_text()]
    assert not users, f"Keras internals outside cnnviz/_keras.py: {users}"


@pytest.mark.slow  # starts a process (ruff)
def test_ruff_finds_nothing():
    import shutil
    import subprocess

    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    found = subprocess.run([ruff, "check", "cnnviz", "tests", "bench"], cwd=PACKAGE.parent,
                           capture_output=True, text=True, check=False)
    assert found.returncode == 0, found.stdout[-3000:]
