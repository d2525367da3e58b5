"""cnnviz: train Keras 3 CNNs from one YAML file and see what they learned."""

__version__ = "0.1.0"
