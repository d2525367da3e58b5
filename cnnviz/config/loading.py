"""The YAML config: typed, strict, validated once before anything is built.

A config has four sections, `data`, `model`, `train` and `seed` (plus an optional `name`). Unknown
keys, wrong types and impossible values fail here with the key path, the value and what is
allowed (`model.layers.2.kernel: ...`), never half-way through a run.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from cnnviz.config.root import Config
from cnnviz.errors import ConfigError


# -------------------------------------------------------------------------------------- loading
def _format_location(location: tuple) -> str:
    # Drop pydantic's discriminator tags ("conv2d") so the path reads like the YAML keys.
    parts = [str(part) for part in location]
    return ".".join(parts)


def _format_errors(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors(include_url=False):
        location = [
            part
            for part in item["loc"]
            if part not in ("conv2d", "max_pool2d", "avg_pool2d", "dropout", "batch_norm",
                            "flatten", "global_avg_pool2d", "dense")
            and not (isinstance(part, str) and part.startswith("function-"))
        ]
        message = item["msg"].removeprefix("Value error, ")
        value = item.get("input")
        where = _format_location(tuple(location))
        shown = "" if isinstance(value, (dict, list)) or value is None else f" (received {value!r})"
        if item["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key {where!r}; check the spelling "
                         "(see `cnnviz config show`)")
        elif item["type"] == "union_tag_invalid":
            lines.append(f"{source}: {where}: {message}")
        elif where and not message.startswith(where):
            lines.append(f"{source}: {where}: {message}{shown}")
        else:
            lines.append(f"{source}: {message}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `train.epochs=3` into (["train", "epochs"], 3); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.epochs=3")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"--set {text!r}: the key {key!r} has an empty part")
    try:
        value = load_yaml_text(raw, f"--set {text!r}") if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of the raw config dict with each `a.b.c=value` override set."""
    result = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = result
        for depth, part in enumerate(path[:-1]):
            where = ".".join(path[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"--set {text!r}: {where} is not an index of a list of {len(node)}"
                    )
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                raise ConfigError(f"--set {text!r}: {where} is a value, not a section")
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(
                    f"--set {text!r}: {last!r} is not an index of a list of {len(node)}")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {text!r}: {'.'.join(path[:-1])} is a value, not a section")
    return result


# A config is a few kilobytes; these bounds refuse a hostile or mistaken file (a "billion laughs"
# of nested aliases, a huge file) before it is expanded, where it would exhaust memory.
MAX_YAML_BYTES = 1_000_000
MAX_YAML_ALIASES = 100
MAX_YAML_VALUES = 1_000_000  # values after aliases are expanded


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Count the YAML graph's aliases and the values it expands to, without expanding it."""
    seen, edges, stack = {id(root)}, 0, [root]
    while stack:
        for child in _children(stack.pop()):
            edges += 1
            if id(child) not in seen:
                seen.add(id(child))
                stack.append(child)
    aliases = edges - (len(seen) - 1)  # every reference beyond a value's first is an alias
    if aliases > MAX_YAML_ALIASES:
        raise ConfigError(
            f"{source}: {aliases} YAML aliases (*name), more than {MAX_YAML_ALIASES}; a config "
            "needs few, and nested aliases can expand a small file into billions of values"
        )
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    pending: list[tuple[yaml.Node, bool]] = [(root, False)]
    while pending:
        node, children_done = pending.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > MAX_YAML_VALUES:
                raise ConfigError(
                    f"{source}: expands to more than {MAX_YAML_VALUES:,} values through its "
                    "aliases (*name); write the values out or use fewer aliases"
                )
        elif key in on_path:
            raise ConfigError(f"{source}: an alias refers to a value that contains it (a loop)")
        elif key not in sizes:
            on_path.add(key)
            pending.append((node, True))
            pending.extend((child, False) for child in _children(node))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def load_yaml_text(text: str, source: str) -> Any:
    """`yaml.safe_load` with bounds: aliases and expanded size are checked on the parsed graph
    before any Python value is built from it (YAMLError for invalid YAML, ConfigError otherwise)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply (hundreds of levels)") from None
    finally:
        loader.dispose()


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping, or raise ConfigError naming the file and the problem."""
    try:
        with open(path, "rb") as stream:
            payload = stream.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (IsADirectoryError, PermissionError) as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    if len(payload) > MAX_YAML_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_YAML_BYTES:,} bytes (1 MB); a config is a few kilobytes "
            "(put image data in an .npz file or a folder, see data.source)"
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"cannot read config file {path}: not UTF-8 text ({error.reason} at "
                          f"byte {error.start})") from None
    try:
        raw = load_yaml_text(text, str(path))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, ...)")
    return raw


def validate(raw: dict, source: str = "config") -> Config:
    """Validate a raw dict into a `Config`, or raise ConfigError with one line per problem."""
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None
    except ValueError as error:  # raised outside pydantic's wrapping (rare)
        raise ConfigError(f"{source}: {error}") from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load, override and validate a YAML config file; the name defaults to the file's stem."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path), list(overrides))
    config = validate(raw, source=str(path))
    if config.name is None:
        config = config.model_copy(update={"name": path.stem})
    return config


def dump_config(config: Config) -> str:
    """The full config, defaults filled in, as YAML (what `config show` prints and runs save)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
