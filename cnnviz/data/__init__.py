"""Data: sources (digits, mnist, fashion_mnist, cifar10, npz, inline, shapes, image folders),
split three ways, and streamed to training through tf.data (`Split.pipeline`).

Images reach the model in the source's pixel units (8-bit units, 0..255, for every image
source); the model's own first layers preprocess them (docs/decisions.md D1).
"""

from cnnviz.data.dataset import (
    Dataset,
    Preprocessing,
    augmentation_samples,
    config_preprocessing,
    load_dataset,
    measure_statistics,
    split_indices,
    stratified_subset,
)
from cnnviz.data.pipeline import Split, augmentation_layers, disk_cache
from cnnviz.data.sources import CIFAR10_CLASSES, FASHION_MNIST_CLASSES

__all__ = [
    "CIFAR10_CLASSES",
    "FASHION_MNIST_CLASSES",
    "Dataset",
    "Preprocessing",
    "Split",
    "augmentation_layers",
    "augmentation_samples",
    "config_preprocessing",
    "disk_cache",
    "load_dataset",
    "measure_statistics",
    "split_indices",
    "stratified_subset",
]
