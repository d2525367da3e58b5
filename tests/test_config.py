"""Config validation: every shipped config loads; every bad input fails early with its key path."""

from pathlib import Path

import pytest
import yaml

from cnnviz.config.loading import apply_overrides, dump_config, load_config, validate
from cnnviz.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
MINIMAL_MODEL = {"layers": [{"type": "conv2d", "filters": 4}, {"type": "flatten"}]}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert config.name == path.stem
    assert config.model.layers


def test_shipped_configs_include_the_required_ones():
    assert {"digits", "mnist", "toy4x4", "lenet5", "cifar10"} <= {path.stem for path in CONFIGS}


def test_defaults_are_filled_in():
    config = validate({"model": MINIMAL_MODEL})
    assert config.data.source == "digits"
    assert config.train.epochs == 10 and config.train.optimizer.name == "adam"
    shown = yaml.safe_load(dump_config(config))
    assert shown["train"]["optimizer"]["learning_rate"] == 0.001
    assert shown["model"]["layers"][0]["kernel"] == 3


def _error_for(raw: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        validate(raw, source="bad.yaml")
    return str(caught.value)


BAD_CONFIGS = [
    # (what is wrong, raw config, words the one-line message must contain)
    ("unknown top key", {"model": MINIMAL_MODEL, "epocs": 3}, ["unknown key", "epocs"]),
    ("unknown nested key", {"model": MINIMAL_MODEL, "train": {"epocs": 3}}, ["train.epocs"]),
    ("wrong type", {"model": MINIMAL_MODEL, "train": {"epochs": "many"}},
     ["train.epochs", "'many'", "integer"]),
    ("negative filters", {"model": {"layers": [{"type": "conv2d", "filters": -4},
                                               {"type": "flatten"}]}},
     ["model.layers.0.filters", "-4", "greater than 0"]),
    ("unknown layer type", {"model": {"layers": [{"type": "conv3d", "filters": 4}]}},
     ["model.layers.0", "conv3d", "conv2d"]),
    ("unknown activation", {"model": {"layers": [{"type": "conv2d", "filters": 4,
                                                  "activation": "rleu"}, {"type": "flatten"}]}},
     ["model.layers.0.activation", "rleu", "relu"]),
    ("pool larger than its input", {"data": {"source": "digits"}, "model": {"layers": [
        {"type": "conv2d", "filters": 4, "kernel": 3}, {"type": "max_pool2d", "pool": 7},
        {"type": "flatten"}]}}, ["model.layers.1.pool", "[7, 7]", "6x6"]),
    ("kernel larger than the feature map", {"data": {"source": "mnist"}, "model": {"layers": [
        {"type": "conv2d", "filters": 4, "kernel": 29}, {"type": "flatten"}]}},
     ["model.layers.0.kernel", "28x28"]),
    ("kernel larger after pooling", {"data": {"source": "digits", "image_size": [28, 28]},
                                     "model": {"layers": [
        {"type": "max_pool2d", "pool": 4}, {"type": "conv2d", "filters": 4, "kernel": 9},
        {"type": "flatten"}]}}, ["model.layers.1.kernel", "7x7"]),
    ("dense before flatten", {"model": {"layers": [{"type": "dense", "units": 3}]}},
     ["model.layers.0", "flatten"]),
    ("no flatten at all", {"model": {"layers": [{"type": "conv2d", "filters": 3}]}},
     ["flatten"]),
    ("dropout rate of 1", {"model": {"layers": [{"type": "flatten"}, {"type": "dropout",
                                                                      "rate": 1.0}]}},
     ["model.layers.1.rate", "1.0"]),
    ("shapes too small", {"data": {"source": "shapes", "image_size": [16, 16]},
                          "model": MINIMAL_MODEL}, ["data.image_size=[16, 16]", "24"]),
    ("shapes not square", {"data": {"source": "shapes", "image_size": [32, 40]},
                           "model": MINIMAL_MODEL}, ["data.image_size=[32, 40]", "square"]),
    ("npz without a path", {"data": {"source": "npz"}, "model": MINIMAL_MODEL},
     ["data.path", "npz"]),
    ("negative learning rate", {"model": MINIMAL_MODEL,
                                "train": {"optimizer": {"learning_rate": -0.1}}},
     ["train.optimizer.learning_rate", "-0.1"]),
    ("momentum with adam", {"model": MINIMAL_MODEL,
                            "train": {"optimizer": {"name": "adam", "momentum": 0.9}}},
     ["momentum", "adam"]),
    ("binary loss with softmax", {"model": MINIMAL_MODEL,
                                  "train": {"loss": "binary_crossentropy"}},
     ["train.loss", "model.output.activation"]),
    ("unknown device", {"model": MINIMAL_MODEL, "train": {"device": "tpu"}},
     ["train.device", "'tpu'", "auto"]),
    ("duplicate layer names", {"model": {"layers": [
        {"type": "conv2d", "filters": 2, "name": "a"}, {"type": "flatten", "name": "a"}]}},
     ["unique", "a"]),
    ("no model", {"data": {"source": "digits"}}, ["model", "Field required"]),
]


@pytest.mark.parametrize("what,raw,words", BAD_CONFIGS, ids=[case[0] for case in BAD_CONFIGS])
def test_bad_config_is_rejected_with_a_clear_line(what, raw, words):
    message = _error_for(raw)
    assert message.startswith("bad.yaml: ")
    assert "Traceback" not in message
    for word in words:
        assert word in message, f"{what}: {word!r} not in {message!r}"


def test_each_problem_gets_its_own_line():
    message = _error_for({"model": MINIMAL_MODEL, "epocs": 1, "train": {"epochs": 0}})
    lines = message.splitlines()
    assert len(lines) == 2
    assert any("epocs" in line for line in lines) and any("train.epochs" in line for line in lines)


def test_overrides_set_nested_values_and_list_items():
    raw = {"model": {"layers": [{"type": "conv2d", "filters": 4}, {"type": "flatten"}]}}
    result = apply_overrides(raw, ["train.epochs=3", "model.layers.0.filters=16",
                                   "data.image_size=[20, 20]", "train.optimizer.name=sgd"])
    config = validate(result)
    assert config.train.epochs == 3
    assert config.model.layers[0].filters == 16
    assert config.data.image_size == [20, 20]
    assert config.train.optimizer.name == "sgd"
    assert raw["model"]["layers"][0]["filters"] == 4, "the original dict must stay unchanged"


@pytest.mark.parametrize("override,words", [
    ("train.epochs", ["KEY=VALUE"]),
    ("model.layers.9.filters=3", ["model.layers.9", "list of 2"]),
    ("train.epochs.deep=3", ["train.epochs", "not a section"]),
])
def test_bad_overrides_are_rejected(override, words):
    raw = {"model": MINIMAL_MODEL, "train": {"epochs": 2}}
    with pytest.raises(ConfigError) as caught:
        apply_overrides(raw, [override])
    for word in words:
        assert word in str(caught.value)


def test_override_is_validated_like_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": MINIMAL_MODEL}))
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(path, ["train.epochs=-1"])


@pytest.mark.parametrize("text,words", [
    ("model: [unclosed", ["invalid YAML", "line 1"]),
    ("- just\n- a list\n", ["mapping"]),
])
def test_unreadable_yaml(tmp_path, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    for word in words:
        assert word in str(caught.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def _field_paths(model, prefix=""):
    import typing

    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        yield f"{prefix}{name}"
        for candidate in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                yield from _field_paths(candidate, f"{prefix}{name}.")


def test_readme_documents_every_config_key():
    from cnnviz.config.root import Config

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [path for path in _field_paths(Config) if f"`{path}`" not in readme]
    assert not missing, f"README's config reference lacks {missing}"
