"""Every explanation map of one tiny model, for the cross-backend tests (tests/test_backends.py).

The TensorFlow test process computes them in-process; a JAX and a PyTorch process run this file
on the same .keras weights and images (Keras reads KERAS_BACKEND once, at its first import):
`python tests/_backend_maps.py MODEL.keras INPUTS.npz OUT.npz`.
Imported by the tests as `_backend_maps` (pytest puts this folder on sys.path).
"""

from __future__ import annotations

import sys

import numpy as np

SHAPE = (10, 10, 2)
NESTED_LAYER = "base/conv_a"  # inside the nested backbone; its output also skips to an Add


def build_model(seed: int = 5):
    """(10, 10, 2) -> nested backbone [conv_a (ReLU6) -> conv_b (linear) -> BatchNormalization
    (folded into conv_b for input gradients) + conv_a -> ReLU -> conv_c -> LeakyReLU(0.1)] ->
    GlobalAveragePooling2D -> two heads: `classes` (3, softmax) and `binary` (1, sigmoid).
    Random seeded weights.

    Two patterns are avoided on purpose. A LeakyReLU right after Conv2D + Add: TensorFlow
    2.21's graph optimizer (grappler remapper, CPU) fuses Conv2D + BiasAdd + Add + LeakyRelu
    and drops the slope (it computes 0.2 whatever was asked), so TensorFlow's compiled maps,
    and model.predict, are wrong there while eager TensorFlow, JAX and PyTorch agree. A
    ReLU-family kink fed exact zeros (relu(.) + relu6(.) is often exactly 0): there the
    backends take different subgradients of a LeakyReLU (TensorFlow and PyTorch the slope, JAX
    1), a difference of conventions, not of methods.
    """
    import keras
    from _models import randomize

    inner = keras.Input(SHAPE)
    a = keras.layers.Conv2D(4, 3, padding="same", activation="relu6", name="conv_a")(inner)
    b = keras.layers.Conv2D(4, 3, padding="same", name="conv_b")(a)
    b = keras.layers.BatchNormalization(name="norm_b")(b)  # folded into conv_b for gradients
    joined = keras.layers.ReLU(name="relu")(keras.layers.Add()([a, b]))
    c = keras.layers.Conv2D(5, 3, name="conv_c")(joined)
    base = keras.Model(inner, keras.layers.LeakyReLU(negative_slope=0.1, name="leaky")(c),
                       name="base")
    inputs = keras.Input(SHAPE)
    pooled = keras.layers.GlobalAveragePooling2D()(base(inputs))
    classes = keras.layers.Dense(3, activation="softmax", name="classes")(pooled)
    binary = keras.layers.Dense(1, activation="sigmoid", name="binary")(pooled)
    model = randomize(keras.Model(inputs, [classes, binary]), seed, scale=0.3)
    # conv_a's kernel 10x larger: ReLU6's cap is reached, so guided backprop's capped zone is
    # exercised; the head stays small, so no probability is saturated at 0 or 1.
    conv_a = base.get_layer("conv_a")
    conv_a.kernel.assign(conv_a.kernel * 10.0)
    # A variance must be positive (randomize drew it from a normal).
    norm = base.get_layer("norm_b")
    norm.moving_variance.assign(np.linspace(0.5, 2.0, 4).astype("float32"))
    return model


def all_maps(model, images: np.ndarray) -> dict[str, np.ndarray]:
    """{method name: map} for every ported method on the softmax output (the CAM family on the
    nested layer, whose output also feeds a skip connection), and the main ones on the sigmoid
    output. Each compiled function costs a trace (a jit compile on JAX): about twenty here."""
    from cnnviz import explain
    from cnnviz.explain.exemplars import class_exemplars, unit_exemplars
    from cnnviz.explain.layers import layer_activations

    maps = {}
    for method in ("vanilla", "guided", "rectified", "smoothgrad"):
        maps[f"saliency/{method}"] = explain.saliency(model, images, method=method, samples=4,
                                                      seed=3, output="classes")
    maps["gradient_x_input"] = explain.gradient_x_input(model, images, output="classes")
    maps["integrated_gradients"] = explain.integrated_gradients(model, images, steps=8,
                                                                output="classes")
    for method in explain.CAM_METHODS:
        maps[f"{method}/{NESTED_LAYER}"] = explain.cam(model, images, method=method,
                                                       layer=NESTED_LAYER, output="classes")
    maps["gradcam/default"] = explain.cam(model, images, output="classes")
    maps["together/gradcam"], maps["together/saliency"] = explain.gradcam_and_saliency(
        model, images, layer=NESTED_LAYER, output="classes")
    maps["guided_gradcam"] = explain.gradcam(model, images, guided=True, layer=NESTED_LAYER,
                                             output="classes")
    maps["occlusion"] = explain.occlusion(model, images, patch=3, output="classes").probability
    maps["rise"] = explain.rise(model, images, masks=48, cell=3, seed=1, output="classes")
    maps["feature_maps"] = layer_activations(model, images, [NESTED_LAYER], max_channels=2,
                                             output="classes")[NESTED_LAYER].maps
    units = unit_exemplars(model, images, NESTED_LAYER, top=2)
    maps["exemplars/activations"] = units.activations
    maps["exemplars/positions"] = units.positions.astype(np.float32)
    maps["class_exemplars"] = class_exemplars(model, images, top=2,
                                              output="binary").activations
    # Same seed, same start, jitter and blur: the same ascent on every backend.
    maps["activation_max/classes"] = explain.activation_maximization_batch(
        model, None, (0, 1, 2), steps=32, seed=4, output="classes", param="pixel")
    maps["activation_max/filters"] = explain.activation_maximization_batch(
        model, NESTED_LAYER, (0, 3), steps=32, seed=4, output="classes", param="pixel")
    # The Fourier parameterization and every random transform (keras.ops on each backend).
    maps["activation_max/fft_transforms"] = explain.activation_maximization_batch(
        model, None, (0, 2), steps=16, seed=5, output="classes", param="fft",
        transforms=("pad", "jitter", "scale", "rotate"))
    # The single sigmoid unit: class 1 scores its logit z, class 0 scores -z.
    for method in ("vanilla", "guided"):
        maps[f"binary/saliency/{method}"] = explain.saliency(model, images, [0, 1, 0],
                                                             method=method, output="binary")
    maps["binary/integrated_gradients"] = explain.integrated_gradients(
        model, images, steps=8, output="binary")
    maps["binary/gradcam"] = explain.cam(model, images, layer=NESTED_LAYER, output="binary")
    maps["binary/rise"] = explain.rise(model, images, masks=48, cell=3, seed=1,
                                       output="binary")
    return maps


def agreement(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(Pearson correlation, max |difference| / range of `reference`); correlation 1.0 for two
    equal constant maps."""
    reference, other = reference.astype(np.float64).ravel(), other.astype(np.float64).ravel()
    spread = float(reference.max() - reference.min())
    difference = float(np.abs(reference - other).max())
    if reference.std() == 0 or other.std() == 0:
        correlation = 1.0 if difference == 0 else 0.0
    else:
        correlation = float(np.corrcoef(reference, other)[0, 1])
    return correlation, difference / spread if spread > 0 else (0.0 if difference == 0
                                                                 else float("inf"))


def main(model_path: str, inputs_path: str, out_path: str) -> None:
    import warnings

    import keras

    from cnnviz import backend

    warnings.simplefilter("ignore")  # the guided copy's note on the sigmoid-free tanh-free net
    model = keras.saving.load_model(model_path)
    maps = all_maps(model, np.load(inputs_path)["images"])
    np.savez(out_path, backend=np.array(backend.current()), **maps)


if __name__ == "__main__":
    main(*sys.argv[1:4])
