"""Config: the YAML schema (one module per section), loading with bounds, `--set` overrides and
`--expect` gates as written. The lowest floor above errors and io: it imports no other cnnviz
package."""

from cnnviz.config.data import DataConfig
from cnnviz.config.expect import Expectation, parse_expectation, parse_expectations
from cnnviz.config.loading import (
    MAX_YAML_ALIASES,
    MAX_YAML_BYTES,
    apply_overrides,
    dump_config,
    load_config,
    parse_override,
    read_yaml,
    validate,
)
from cnnviz.config.model import ModelConfig, layer_names
from cnnviz.config.root import Config, run_slug
from cnnviz.config.shapes import check_layer_shapes, native_input_shape
from cnnviz.config.train import EarlyStoppingConfig, TrainConfig

__all__ = [
    "MAX_YAML_ALIASES",
    "MAX_YAML_BYTES",
    "Config",
    "DataConfig",
    "EarlyStoppingConfig",
    "Expectation",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "check_layer_shapes",
    "dump_config",
    "layer_names",
    "load_config",
    "native_input_shape",
    "parse_expectation",
    "parse_expectations",
    "parse_override",
    "read_yaml",
    "run_slug",
    "validate",
]
