"""Bad input gets one line and exit code 2, before anything is written; names become safe folder
names; files are written atomically with the umask's mode; no temporary file outlives its process.

The fault tests that kill and race real training processes are in test_faults.py.
"""

import copy
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _models import tiny_digits_config
from typer.testing import CliRunner

from cnnviz.cli import app
from cnnviz.config.loading import MAX_YAML_ALIASES, load_config, validate
from cnnviz.config.root import run_slug
from cnnviz.errors import ConfigError
from cnnviz.io.atomic import atomic_write_bytes, remove_stale_temporaries
from cnnviz.io.locks import RunLock, lock_holder, try_lock_run
from cnnviz.runs.layout import create_run_dir

ROOT = Path(__file__).parent.parent
runner = CliRunner()

TINY = tiny_digits_config("tiny", seed=1, epochs=1, dropout=0.2)


def _config(**changes) -> dict:
    """TINY with dotted-path changes: _config(**{"model.layers.0.filters": 9})."""
    raw = copy.deepcopy(TINY)
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return raw


def assert_one_line_error(result, *words) -> str:
    """Exit code 2, exactly one line on stderr (`error: ...`) holding `words`, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


# ------------------------------------------------------------------------------ bad configs
BAD_CONFIGS = [
    # (case, raw config, words the line must hold)
    ("seed of 2**32 or more", _config(seed=99999999999), ["seed", "99999999999", "4294967296"]),
    ("filters too many to allocate", _config(**{"model.layers.0.filters": 1000000000}),
     ["model.layers.0.filters", "1000000000", "65536"]),
    ("units too many to allocate", _config(**{"model.layers.3": {"type": "dense",
                                                                  "units": 1000000000}}),
     ["model.layers.3.units", "1048576"]),
    ("parameters too many to allocate", _config(**{
        "data.image_size": [256, 256], "model.layers.0.filters": 512,
        "model.layers.3": {"type": "dense", "units": 65536}}),
     ["parameters", "1,000,000,000", "model.layers.3 (dense"]),
    ("filters: true", _config(**{"model.layers.0.filters": True}),
     ["model.layers.0.filters", "True", "integer"]),
    ("epochs: true", _config(**{"train.epochs": True}), ["train.epochs", "True"]),
    ("epochs: 2.0", _config(**{"train.epochs": 2.0}), ["train.epochs", "2.0"]),
    ("verbose: true", _config(**{"train.verbose": True}), ["train.verbose", "auto, 0, 1 or 2"]),
    ("kernel: 2.5", _config(**{"model.layers.0.kernel": 2.5}),
     ["model.layers.0.kernel", "2.5", "whole number", "[height, width]"]),
    ("kernel: [3, 2.5]", _config(**{"model.layers.0.kernel": [3, 2.5]}),
     ["model.layers.0.kernel", "[height, width]"]),
    ("kernel: true", _config(**{"model.layers.0.kernel": True}), ["model.layers.0.kernel"]),
    ("layer name with a slash", _config(**{"model.layers.0.name": "a/b"}),
     ["model.layers.0.name='a/b'", "A-Z a-z 0-9 _ . -"]),
    ("layer name with a space", _config(**{"model.layers.0.name": "my conv"}),
     ["model.layers.0.name='my conv'"]),
    ("layer name of 300 characters", _config(**{"model.layers.0.name": "c" * 300}),
     ["model.layers.0.name", "64"]),
    ("layer named input_layer", _config(**{"model.layers.0.name": "input_layer"}),
     ["model.layers.0.name='input_layer'", "Keras"]),
    ("layer name clashing with an automatic name", _config(**{
        "model.layers.0.name": None, "model.layers.1.name": "conv2d_1"}),
     ["model.layers.1.name='conv2d_1'", "automatic name of model.layers.0"]),
    ("output name clashing with an automatic name", _config(**{
        "model.layers.2.name": None, "model.output.name": "flatten_1"}),
     ["model.output.name='flatten_1'", "model.layers.2"]),
    ("two layers with one name", _config(**{"model.layers.1.name": "conv"}),
     ["unique", "model.layers.0", "model.layers.1", "'conv'"]),
    ("a blank run name", _config(name="  "), ["name", "visible"]),
]


@pytest.mark.parametrize("case,raw,words", BAD_CONFIGS, ids=[case[0] for case in BAD_CONFIGS])
def test_bad_config_is_one_line_exit_2_and_writes_nothing(tmp_path, case, raw, words):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(yaml.safe_dump(raw, allow_unicode=True))
    result = runner.invoke(app, ["train", str(config_file), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, str(config_file), *words)
    assert not (tmp_path / "out").exists(), "nothing is written before validation passes"


def test_the_bounds_leave_real_configs_alone():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)
    validate(_config(seed=2**32 - 1, **{"model.layers.0.kernel": [3, 1]}))


# --------------------------------------------------------------------------- hostile YAML
def _billion_laughs() -> str:
    """3.7 KB of nested aliases: 10 levels of 10 references each, 10**10 values expanded."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 10):
        lines.append(f"l{level}: &l{level} [" + ",".join([f"*l{level - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n" + yaml.safe_dump(TINY)


HOSTILE_YAML = [
    ("billion laughs", _billion_laughs, ["expands to more than 1,000,000 values"]),
    ("more than 100 aliases", lambda: "x: &x 1\ny: [" + ", ".join(["*x"] * 101) + "]\n",
     ["101 YAML aliases", f"more than {MAX_YAML_ALIASES}"]),
    ("an alias loop", lambda: "a: &a [*a]\n", ["loop"]),
    ("nested 5000 levels deep", lambda: "[" * 5000, ["nested too deeply"]),
    ("larger than 1 MB", lambda: "# padding\n" * 120_000 + yaml.safe_dump(TINY),
     ["larger than 1,000,000 bytes"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("case,text,words", HOSTILE_YAML, ids=[case[0] for case in HOSTILE_YAML])
def test_hostile_yaml_is_refused_before_it_expands(tmp_path, case, text, words):
    """In a real process with a timeout: before the bounds, the billion laughs ran 113 s and
    died of a 7.8 GB MemoryError."""
    config_file = tmp_path / "hostile.yaml"
    config_file.write_text(text())
    result = subprocess.run(
        [sys.executable, "-m", "cnnviz.cli", "config", "show", str(config_file)],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and str(config_file) in lines[0], lines
    for word in words:
        assert word in lines[0]


def test_a_few_aliases_still_work(tmp_path):
    config_file = tmp_path / "anchors.yaml"
    config_file.write_text("model:\n  layers:\n"
                           "    - &conv {type: conv2d, filters: 4, padding: same}\n"
                           "    - *conv\n    - {type: flatten}\n")
    config = load_config(config_file)
    assert [layer.filters for layer in config.model.layers[:2]] == [4, 4]


def test_set_values_are_bounded_too():
    from cnnviz.config.loading import parse_override

    with pytest.raises(ConfigError, match="101 YAML aliases"):
        parse_override("data.labels=[&x 1, " + ", ".join(["*x"] * 101) + "]")


# ------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("name,slug", [
    ("my run", "my-run"),
    ("Été (v2)", "Ete-v2"),
    ("run(1)", "run-1"),
    ("_private", "private"),
    ("a/b\\c", "a-b-c"),
    ("digits", "digits"),
])
def test_run_names_become_safe_folder_names(name, slug):
    assert run_slug(name) == slug


def test_names_with_nothing_usable_or_too_long_get_a_hash():
    assert re.fullmatch(r"run-[0-9a-f]{8}", run_slug("数字"))
    assert run_slug("数字") != run_slug("图像"), "different names keep different folders"
    long_a, long_b = "n" * 299 + "a", "n" * 299 + "b"
    assert len(run_slug(long_a)) <= 64 and run_slug(long_a) != run_slug(long_b)


@pytest.mark.parametrize("name", ["my run", "Été (v2)", "数字", "_x", "(1)", "x" * 300, "-a.b-"])
def test_every_slug_is_a_name_tensorflow_accepts(name):
    """TensorFlow's pattern for a root name scope (a model's name); a space used to crash
    training with a traceback."""
    assert re.fullmatch(r"[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*", run_slug(name))


@pytest.mark.slow
def test_a_run_named_with_any_text_trains_into_its_slug(tmp_path):
    from cnnviz.train.fit import train

    previous = os.umask(0o027)
    try:
        for name, slug in [("Mon réseau (essai 1) 数字", "Mon-reseau-essai-1"),
                           ("r" * 300, run_slug("r" * 300))]:
            config = validate(_config(name=name, **{"model.layers.0.name": "_conv.1-a"}))
            result = train(config, tmp_path, log=lambda line: None)
            assert result.run_dir.parent == tmp_path / slug and len(slug) <= 64
            assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["name"] == name
    finally:
        os.umask(previous)
    # Every file, whoever wrote it (cnnviz, Keras's CSVLogger, h5py, zipfile), has the umask's mode.
    modes = {path.relative_to(tmp_path): stat.S_IMODE(path.stat().st_mode)
             for path in tmp_path.rglob("*")}
    assert all(mode == (0o750 if (tmp_path / path).is_dir() else 0o640)
               for path, mode in modes.items()), modes


@pytest.mark.slow
def test_a_model_keras_cannot_build_leaves_nothing(tmp_path):
    """A head layer named like a layer of the backbone (only Keras knows those names)."""
    config_file = tmp_path / "clash.yaml"
    config_file.write_text(yaml.safe_dump({
        "data": {"source": "digits", "image_size": [32, 32]},
        "model": {"backbone": {"name": "VGG16", "weights": None},
                  "layers": [{"type": "dense", "units": 4, "name": "block1_conv1"}]},
        "train": {"epochs": 1}}))
    result = runner.invoke(app, ["train", str(config_file), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "block1_conv1", "VGG16")
    assert not (tmp_path / "out").exists()


def test_progress_is_one_line_per_epoch_unless_on_a_terminal(monkeypatch):
    from cnnviz.train.fit import _keras_verbose

    leader, follower = os.openpty()
    with open(follower, "w") as terminal, open(os.devnull, "w") as log_file:
        monkeypatch.setattr(sys, "stdout", terminal)
        assert _keras_verbose("auto") == 1, "Keras's bar on a terminal"
        monkeypatch.setattr(sys, "stdout", log_file)
        assert _keras_verbose("auto") == 2, "one line per epoch in a log"
        assert _keras_verbose(1) == 1, "unless the config says otherwise"
    os.close(leader)


# ------------------------------------------------------------------------- writes and files
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        path = atomic_write_bytes(tmp_path / "sub" / "file.json", b"{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert sorted(child.name for child in path.parent.iterdir()) == ["file.json"]


def _dead_pid() -> int:
    """A process id no process has (searched down from the top; no process spawned for it)."""
    for pid in range(int(Path("/proc/sys/kernel/pid_max").read_text()) - 1, 300, -1):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    raise AssertionError("every process id is in use")


def test_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = tmp_path / f".model.keras.{_dead_pid()}-0123abcd.tmp.keras"
    dead_folder = tmp_path / f".run.{_dead_pid()}-0123abcd.tmp"
    live = tmp_path / f".metrics.json.{os.getpid()}-0123abcd.tmp"
    keep = tmp_path / "history.csv"
    for path in (dead, live, keep):
        path.write_text("x")
    dead_folder.mkdir()
    (dead_folder / "config.yaml").write_text("x")
    assert set(remove_stale_temporaries(tmp_path)) == {dead, dead_folder}
    assert live.exists() and keep.exists()


@pytest.mark.slow  # starts a process
def test_temporaries_of_a_killed_process_not_yet_reaped_are_removed(tmp_path):
    # A SIGKILLed child stays a zombie until its parent waits for it; it still answers
    # signal 0 but writes nothing more.
    import signal
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(child.pid, signal.SIGKILL)
        stat = Path(f"/proc/{child.pid}/stat")
        for _ in range(200):  # until the kernel has made it a zombie
            if stat.read_text().rpartition(")")[2].split()[0] == "Z":
                break
            time.sleep(0.01)
        stale = tmp_path / f".last.keras.{child.pid}-0123abcd.tmp.keras"
        stale.write_text("half a zip")
        assert remove_stale_temporaries(tmp_path) == [stale]
    finally:
        child.wait()


def test_the_first_write_into_a_folder_cleans_it(tmp_path):
    folder = tmp_path / "figures"
    folder.mkdir()
    stale = folder / f".saliency_0.png.{_dead_pid()}-89abcdef.tmp"
    stale.write_bytes(b"half a PNG")
    atomic_write_bytes(folder / "other.png", b"png")
    assert not stale.exists()


def test_a_new_run_directory_appears_whole_and_locked(tmp_path):
    first, first_lock = create_run_dir(tmp_path, "tiny", "name: tiny\n")
    second, second_lock = create_run_dir(tmp_path, "tiny", "name: tiny\n")
    try:
        assert first != second, "two runs started in the same second get two directories"
        for run_dir in (first, second):
            assert (run_dir / "config.yaml").read_text() == "name: tiny\n"
            assert (run_dir / "backup").is_dir()
            assert try_lock_run(run_dir) is None, "locked by its creator"
            assert lock_holder(run_dir) == os.getpid()
        assert sorted(path.name for path in (tmp_path / "tiny").iterdir()) == sorted(
            [first.name, second.name]), "no staging folder left"
    finally:
        first_lock.release()
        second_lock.release()
    relocked = try_lock_run(first)
    assert isinstance(relocked, RunLock), "released locks can be taken again"
    relocked.release()


# ---------------------------------------------------------------------------- --out problems
def test_out_that_is_a_file_is_one_line(tmp_path):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(TINY))
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "deeper"):
        result = runner.invoke(app, ["train", str(config_file), "--out", str(out)])
        assert_one_line_error(result, f"--out {out}", f"{blocker} is a file, not a folder")
    assert blocker.read_text() == "not a folder"


@pytest.mark.slow
def test_figures_into_a_file_are_one_line(digits_run, tmp_path):
    blocker = tmp_path / "figures"
    blocker.write_text("x")
    result = runner.invoke(app, ["filters", str(digits_run), "--out", str(blocker)])
    assert_one_line_error(result, str(blocker), "is a file, not a folder")


# ------------------------------------------------------------------------- damaged run files
def _copy_run(run_dir: Path, target: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run_dir, target))


@pytest.mark.slow
def test_a_broken_metrics_json_is_one_line(digits_run, tmp_path):
    run_dir = _copy_run(digits_run, tmp_path / "run")
    (run_dir / "metrics.json").write_text('{"test_accuracy": 0.9, "class_na')
    before = sorted(run_dir.rglob("*"))
    result = runner.invoke(app, ["saliency", str(run_dir), "--images", "0",
                                 "--method", "vanilla"])
    assert_one_line_error(result, str(run_dir / "metrics.json"), "damaged")
    assert sorted(run_dir.rglob("*")) == before, "nothing written"


@pytest.mark.slow
def test_a_truncated_keras_file_is_called_truncated_not_missing(digits_run, tmp_path):
    truncated = tmp_path / "model.keras"
    truncated.write_bytes((digits_run / "model.keras").read_bytes()[:5000])
    result = runner.invoke(app, ["filters", str(truncated)])
    line = assert_one_line_error(result, str(truncated), "truncated or damaged")
    assert "not found" not in line.lower()


@pytest.mark.slow
@pytest.mark.parametrize("args,words", [
    (["--filters", "99"], ["--filters '99'", "outside the model's 10 classes"]),
    (["--filters", "x"], ["--filters 'x'", "neither an index"]),
    (["--layer", "conv1", "--filters", "0:0"], ["--filters '0:0'", "conv1's 16 filters"]),
])
def test_activation_max_filter_errors_name_filters_not_images(digits_run, args, words):
    result = runner.invoke(app, ["activation-max", str(digits_run), *args])
    line = assert_one_line_error(result, *words)
    assert "--images" not in line and "test split" not in line and "image file" not in line
