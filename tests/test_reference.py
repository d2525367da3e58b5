"""The numpy reference pass: hand-computed answers, TF's padding rules, every layer vs Keras."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from cnnviz.errors import CnnvizError
from cnnviz.trust.reference.forward import reference_forward, verify
from cnnviz.trust.reference.layers import conv2d_linear, pool_windows
from cnnviz.trust.reference.steps import explain_steps, format_table

L = keras.layers

# The two toy inputs, in ninths so every step below is plain fractions.
IMAGE_A = np.array([[1, 2, 3, 3], [2, 3, 4, 5], [4, 5, 6, 7], [1, 3, 4, 6]]) / 9
IMAGE_B = np.array([[-1, 2, 3, -5], [2, -2, 4, 5], [-3, 5, -4, 9], [-1, -3, -2, -5]]) / 9
# Asymmetric under flips and transposition, so a flipped (true convolution) or transposed kernel
# would give other numbers.
KERNEL = np.array([[1, 2, 0], [0, 1, 0], [0, 0, -1]])
CONV_BIAS = -4 / 9
DENSE_WEIGHT, DENSE_BIAS = 1.5, -1.0


def toy4x4():
    """One 3x3 Conv2D filter + relu -> 2x2 max pool -> flatten -> Dense(1, sigmoid)."""
    model = keras.Sequential([
        keras.Input((4, 4, 1)),
        L.Conv2D(1, 3, activation="relu", name="conv"),
        L.MaxPooling2D(2, name="pool"),
        L.Flatten(name="flatten"),
        L.Dense(1, activation="sigmoid", name="dense"),
    ])
    model.get_layer("conv").set_weights(
        [KERNEL.reshape(3, 3, 1, 1).astype("float32"), np.float32([CONV_BIAS])]
    )
    model.get_layer("dense").set_weights([np.float32([[DENSE_WEIGHT]]), np.float32([DENSE_BIAS])])
    return model


def toy_images():
    return np.stack([IMAGE_A, IMAGE_B])[..., None].astype("float32")


def randomized(model, seed):
    """Set every weight at random (biases and BN statistics included), variances positive."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        values = [
            rng.uniform(0.2, 2.0, v.shape) if "variance" in v.name else rng.normal(0, 0.5, v.shape)
            for v in layer.weights
        ]
        if values:
            layer.set_weights([value.astype("float32") for value in values])
    return model


def images_for(model, count=4, seed=0):
    shape = tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).uniform(-1, 1, (count, *shape)).astype("float32")


# ------------------------------------------------------------------------------ known answer
def test_toy_model_matches_hand_computed_values():
    # Window sums (in ninths) of IMAGE_A with KERNEL; only the cells where the kernel is not 0:
    #   (0,0): 1*1 + 2*2 + 1*3 - 1*6 = 2     (0,1): 1*2 + 2*3 + 1*4 - 1*7 = 5
    #   (1,0): 1*2 + 2*3 + 1*5 - 1*4 = 9     (1,1): 1*3 + 2*4 + 1*6 - 1*6 = 11
    # and of IMAGE_B:
    #   (0,0): 1*(-1) + 2*2 + 1*(-2) - 1*(-4) = 5     (0,1): 1*2 + 2*3 + 1*4 - 1*9 = 3
    #   (1,0): 1*2 + 2*(-2) + 1*5 - 1*(-2) = 5        (1,1): 1*(-2) + 2*4 + 1*(-4) - 1*(-5) = 7
    # plus the bias -4/9:
    conv = np.array([[[-2, 1], [5, 7]], [[1, -1], [1, 3]]]) / 9
    relu = np.array([[[0, 1], [5, 7]], [[1, 0], [1, 3]]]) / 9
    pooled = np.array([7, 3]) / 9
    z = 1.5 * pooled - 1.0  # A: 10.5/9 - 1 = 1/6; B: 4.5/9 - 1 = -1/2
    assert np.allclose(z, [1 / 6, -1 / 2])
    probability = 1 / (1 + np.exp(-z))  # 0.541571, 0.377541

    traces = reference_forward(toy4x4(), toy_images())

    assert [t.name for t in traces] == ["conv", "pool", "flatten", "dense"]
    assert all(t.supported for t in traces)
    np.testing.assert_allclose(traces[0].output[..., 0], relu, atol=1e-6)
    assert traces[0].output.dtype == np.float64
    np.testing.assert_allclose(traces[1].output.reshape(2), pooled, atol=1e-6)
    np.testing.assert_allclose(traces[2].output, pooled[:, None], atol=1e-6)
    np.testing.assert_allclose(traces[3].output[:, 0], probability, atol=1e-6)
    np.testing.assert_allclose(probability, [0.541571, 0.377541], atol=1e-6)
    assert conv.min() < 0  # relu had something to do
    np.testing.assert_allclose(toy4x4()(toy_images())[:, 0], probability, atol=1e-6)


def test_explain_steps_writes_the_toy_numbers():
    text = explain_steps(toy4x4(), toy_images()[0])

    expected = [
        "0.1111  0.2222  0.3333  0.3333",  # the input's first row
        "output (0, 0), filter 0: window rows 0..2, cols 0..2",
        "output (1, 1), filter 0: window rows 1..3, cols 1..3",
        "0.1111*1.0000 + 0.2222*2.0000",  # the products of the first window
        "0.6667*(-1.0000)",
        "bias (-0.4444) = -0.2222",  # 2/9 - 4/9
        "bias (-0.4444) = 0.7778",  # 11/9 - 4/9
        "relu(-0.2222) = 0.0000",
        "max(0.0000, 0.1111, 0.5556, 0.7778) = 0.7778",
        "unit 0: z = 0.7778*1.5000 + bias (-1.0000) = 0.1667",
        "sigmoid(0.1667) = 0.5416",
        "Output by hand: [0.5416]",
        "Keras output:   [0.5416]",
    ]
    for piece in expected:
        assert piece in text, piece

    text_b = explain_steps(toy4x4(), toy_images()[1:])
    for piece in ["relu(-0.1111) = 0.0000", "z = 0.3333*1.5000 + bias (-1.0000) = -0.5000",
                  "sigmoid(-0.5000) = 0.3775"]:
        assert piece in text_b, piece


def test_explain_steps_of_a_padded_multichannel_model_ends_at_the_keras_output():
    keras.utils.set_random_seed(1)
    model = randomized(keras.Sequential([
        keras.Input((5, 5, 2)),
        L.Conv2D(2, 3, strides=2, padding="same", activation="tanh"),
        L.BatchNormalization(),
        L.AveragePooling2D(2, padding="same"),
        L.GlobalAveragePooling2D(),
        L.Dense(3, activation="softmax"),
    ]), seed=1)
    image = images_for(model, 1)
    text = explain_steps(model, image)
    final = reference_forward(model, image)[-1].output[0]

    assert "Output by hand: [" + ", ".join(f"{v:.4f}" for v in final) + "]" in text
    assert "window rows -1..1" in text  # SAME padding with stride 2 starts in the padding
    assert "'same' padding: cells outside the image count as 0" in text
    difference = float(text.rsplit("max difference ", 1)[1].rstrip(")"))
    assert difference < 1e-5


def test_explain_steps_refuses_big_models():
    model = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(32, 3), L.Flatten(), L.Dense(10)])
    with pytest.raises(CnnvizError, match="parameters"):
        explain_steps(model, images_for(model, 1))


# ----------------------------------------------------------------------- TF's padding rules
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_windows_follow_tensorflow_padding(padding):
    rng = np.random.default_rng(0)
    for height in (5, 6, 7, 8):
        x = rng.normal(size=(2, height, 7, 3))
        for window in (1, 2, 3, 4):
            kernel = rng.normal(size=(window, window, 3, 2))
            for stride in (1, 2, 3):
                expected = tf.nn.conv2d(x, kernel, stride, padding).numpy()
                ours = conv2d_linear(x, kernel, None, (stride, stride), padding.lower())
                np.testing.assert_allclose(ours, expected, atol=1e-10)
                for kind, tf_pool in (("max", tf.nn.max_pool2d), ("average", tf.nn.avg_pool2d)):
                    expected = tf_pool(x, window, stride, padding).numpy()
                    ours = pool_windows(x, kind, (window, window), (stride, stride),
                                        padding.lower())
                    np.testing.assert_allclose(ours, expected, atol=1e-10, err_msg=kind)


def test_dilated_conv_follows_tensorflow():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 9, 8, 2))
    kernel = rng.normal(size=(3, 2, 2, 3))
    for padding in ("SAME", "VALID"):
        expected = tf.nn.conv2d(x, kernel, 1, padding, dilations=(2, 3)).numpy()
        ours = conv2d_linear(x, kernel, None, (1, 1), padding.lower(), dilation=(2, 3))
        np.testing.assert_allclose(ours, expected, atol=1e-10)


# ------------------------------------------------------------------------- verify vs Keras
def model_sequential_every_layer():
    return keras.Sequential([
        keras.Input((11, 13, 3)),
        L.Rescaling(0.5, offset=0.1),
        L.Conv2D(4, 3, strides=2, padding="same", activation="relu"),
        L.BatchNormalization(),
        L.LeakyReLU(negative_slope=0.1),
        L.AveragePooling2D(3, strides=2, padding="same"),
        L.Conv2D(5, (2, 3), activation="leaky_relu", use_bias=False),
        L.MaxPooling2D(2, strides=1, padding="same"),
        L.Flatten(),
        L.Dropout(0.5),
        L.Dense(6, activation="elu"),
        L.Dense(3, activation="softmax"),
    ], name="every_layer")


def model_functional_options():
    inputs = keras.Input((9, 10, 2))
    x = L.Conv2D(3, 3, padding="same", activation="tanh")(inputs)
    x = L.ReLU(max_value=0.5, negative_slope=0.1, threshold=0.05)(x)
    x = L.Conv2D(6, 3, dilation_rate=2, padding="same", activation="selu")(x)
    x = L.Conv2D(6, 2, groups=3, activation="swish")(x)
    x = L.MaxPooling2D(3, strides=2, padding="same")(x)
    x = L.BatchNormalization(center=False, scale=False, epsilon=0.01)(x)
    x = L.Conv2D(4, 1, strides=3, padding="same", activation="gelu")(x)
    x = L.GlobalMaxPooling2D()(x)
    x = L.Dense(4, activation="sigmoid")(x)
    x = L.Activation("tanh")(x)
    x = L.Dense(3, activation="linear")(x)
    outputs = L.Softmax()(x)
    return keras.Model(inputs, outputs, name="functional_options")


def model_other_layers():
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        L.ZeroPadding2D(((1, 0), (2, 1))),
        L.Conv2D(3, 3, activation=L.LeakyReLU(negative_slope=0.05)),
        L.PReLU(),
        L.Cropping2D(((0, 1), (1, 0))),
        L.ELU(alpha=0.5),
        L.GaussianNoise(0.3),
        L.AveragePooling2D(2, strides=3),
        L.SpatialDropout2D(0.3),
        L.BatchNormalization(scale=False),
        L.GlobalAveragePooling2D(keepdims=True),
        L.Reshape((3,)),
        L.Dense(2, activation="relu6"),
        L.Dense(1, activation="sigmoid"),
    ], name="other_layers")


@pytest.mark.parametrize(
    "build", [model_sequential_every_layer, model_functional_options, model_other_layers]
)
def test_verify_matches_keras_on_every_layer(build):
    keras.utils.set_random_seed(0)
    model = randomized(build(), seed=2)
    before = [w.copy() for w in model.get_weights()]
    images = images_for(model, count=5)

    report = verify(model, images)

    assert report.ok, format_table(report)
    assert report.max_difference < 1e-4
    assert report.image_count == 5
    names = [layer.name for layer in model.layers if type(layer).__name__ != "InputLayer"]
    assert [row.name for row in report.rows] == names
    # The whole chain, not only per layer: the last numpy output is the model's output.
    final = reference_forward(model, images)[-1].output
    np.testing.assert_allclose(final, model(images, training=False), atol=1e-4)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_batch_norm_uses_its_moving_statistics():
    model = keras.Sequential([keras.Input((4, 4, 2)), L.BatchNormalization(epsilon=0.01)])
    mean, variance = np.float32([0.5, -2.0]), np.float32([4.0, 0.25])
    gamma, beta = np.float32([2.0, -1.0]), np.float32([0.1, 0.3])
    model.layers[0].set_weights([gamma, beta, mean, variance])
    images = images_for(model, 3)

    output = reference_forward(model, images)[0].output

    expected = (images - mean) / np.sqrt(variance + 0.01) * gamma + beta
    np.testing.assert_allclose(output, expected, atol=1e-6)
    assert verify(model, images).ok


def test_leaky_relu_slopes_come_from_the_config():
    # The activation string means keras.activations.leaky_relu (slope 0.2); the layer's own
    # default is 0.3. Both are read, not assumed.
    model = keras.Sequential([
        keras.Input((1, 1, 2)), L.Activation("leaky_relu"), L.LeakyReLU(), L.Flatten()
    ])
    images = np.float32([[[[-1.0, 2.0]]]])

    traces = reference_forward(model, images)

    np.testing.assert_allclose(traces[0].output.ravel(), [-0.2, 2.0])
    np.testing.assert_allclose(traces[1].output.ravel(), [-0.06, 2.0])
    assert verify(model, images).ok


def test_zero_tolerance_flags_float_rounding():
    keras.utils.set_random_seed(0)
    model = randomized(model_sequential_every_layer(), seed=3)
    images = images_for(model)

    strict = verify(model, images, tolerance=0.0)

    assert not strict.ok
    assert not strict.rows[1].ok  # the conv: float32 Keras vs float64 numpy differ a little
    assert 0 < strict.max_difference < 1e-4
    assert "DIFFERS" in format_table(strict) and "FAILED" in format_table(strict)
    assert verify(model, images).ok
    with pytest.raises(CnnvizError, match="tolerance"):
        verify(model, images, tolerance=-1.0)


def test_unsupported_layers_are_reported_and_the_rest_still_checked():
    model = keras.Sequential([
        keras.Input((6, 6, 1)),
        L.Conv2D(2, 3, padding="same", name="conv_a"),
        L.UpSampling2D(2, name="upsample"),
        L.Lambda(lambda t: t * 2.0, name="double"),
        L.Conv2D(1, 3, name="conv_b"),
        L.Flatten(name="flatten"),
        L.Dense(2, name="dense"),
    ])
    randomized(model, seed=4)
    images = images_for(model)

    traces = reference_forward(model, images)
    report = verify(model, images)

    by_name = {trace.name: trace for trace in traces}
    assert not by_name["upsample"].supported and "UpSampling2D" in by_name["upsample"].reason
    assert not by_name["double"].supported and by_name["double"].output is None
    assert report.unsupported == ("upsample", "double")
    assert not report.ok
    rows = {row.name: row for row in report.rows}
    assert math.isnan(rows["upsample"].max_difference)
    for name in ("conv_a", "conv_b", "flatten", "dense"):  # checked, from Keras's output on
        assert rows[name].ok and rows[name].max_difference < 1e-4
    np.testing.assert_allclose(by_name["dense"].output, model(images), atol=1e-4)
    table = format_table(report)
    assert "UNSUPPORTED (no numpy implementation of UpSampling2D)" in table
    assert "FAILED" in table and "upsample, double" in table


def test_format_table_columns_are_aligned():
    keras.utils.set_random_seed(0)
    model = randomized(model_other_layers(), seed=5)

    table = format_table(verify(model, images_for(model)))

    lines = table.splitlines()
    header, rule, rows = lines[0], lines[1], lines[2:2 + len(model.layers)]
    starts = [index for index, char in enumerate(rule) if char == "-" and rule[index - 1] == " "]
    for row in rows:
        for start in starts:
            assert row[start - 2:start] == "  ", (row, start)
    assert header.startswith("layer") and lines[-1].startswith("OK: all 13 layers")


def test_graphs_with_merges_normalization_depthwise_and_nested_models_are_checked():
    """A residual block, a squeeze-and-excitation gate (a broadcast Multiply), a concatenation,
    Normalization, Rescaling, depthwise and separable convolutions, ZeroPadding2D,
    BatchNormalization and a nested model: every layer matches."""
    inner_in = keras.Input((6, 6, 4))
    inner = keras.Model(inner_in, L.SeparableConv2D(3, 3, padding="same", depth_multiplier=2,
                                                    activation="relu", name="sep")(inner_in),
                        name="inner")
    inputs = keras.Input((6, 6, 2))
    x = L.Rescaling(1 / 255.0, offset=-0.5, name="rescale")(inputs)
    x = L.Normalization(mean=[0.1, -0.2], variance=[2.0, 0.5], name="norm")(x)
    branch = L.Conv2D(2, 3, padding="same", name="conv")(x)
    x = L.Add(name="residual")([x, branch])
    x = L.ZeroPadding2D(1, name="pad")(x)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, activation="relu6", name="dw")(x)
    x = L.BatchNormalization(name="bn")(x)
    gate = L.Reshape((1, 1, 4), name="squeeze_gate")(L.GlobalAveragePooling2D(name="se")(x))
    x = L.Concatenate(name="concat")([x, L.Multiply(name="gate")([x, gate])])
    x = inner(L.Conv2D(4, 1, name="squeeze")(x))
    outputs = L.Dense(3, activation="softmax", name="head")(L.GlobalAveragePooling2D(name="gap")(x))
    model = randomized(keras.Model(inputs, outputs), seed=7)
    images = np.random.default_rng(8).uniform(0, 255, (4, 6, 6, 2)).astype("float32")
    report = verify(model, images, tolerance=1e-3)
    names = [row.name for row in report.rows]
    assert names == ["rescale", "norm", "conv", "residual", "pad", "dw", "bn", "se",
                     "squeeze_gate", "gate", "concat", "squeeze", "inner/sep", "gap", "head"]
    assert report.ok, format_table(report)
    traces = {trace.name: trace for trace in reference_forward(model, images)}
    np.testing.assert_allclose(traces["head"].output, model(images), atol=1e-4)


def test_explain_steps_refuses_a_graph_and_points_to_verify():
    inputs = keras.Input((3, 3, 1))
    model = keras.Model(inputs, L.Add()([inputs, L.Conv2D(1, 1)(inputs)]))
    with pytest.raises(CnnvizError, match="chain of layers.*`verify` checks graphs"):
        explain_steps(model, np.zeros((3, 3, 1), "float32"))


def test_explain_steps_still_works_after_the_model_was_explained():
    """Explanations call the model's layers on other inputs; its own graph is unchanged."""
    from _models import images, two_conv_functional

    from cnnviz.explain import saliency

    model = two_conv_functional()  # functional: its chain is read from the layers' nodes
    batch = images(2, (8, 8, 1))
    saliency(model, batch, method="guided")
    assert "Keras output" in explain_steps(model, batch[0])


def test_layers_it_cannot_check_are_named_in_one_line():
    inputs = keras.Input((4, 4, 1))
    x = L.UpSampling2D(2, name="up")(inputs)
    model = keras.Model(inputs, L.Dense(2, name="head")(L.Flatten()(x)))
    table = format_table(verify(model, images_for(model)))
    assert "cannot check 1 layer(s): up (UpSampling2D)" in table.splitlines()[-1]


def test_images_that_do_not_fit_are_refused():
    with pytest.raises(CnnvizError, match=r"\(4, 4, 1\)"):
        reference_forward(toy4x4(), np.zeros((2, 5, 5, 1), "float32"))


def test_explain_steps_summarises_layers_too_big_to_write_out():
    model = keras.Sequential([
        keras.Input((28, 28, 1)), L.Conv2D(1, 3, activation="relu"), L.MaxPooling2D(2),
        L.Flatten(), L.Dense(2, activation="softmax"),
    ])
    randomized(model, seed=6)

    text = explain_steps(model, images_for(model, 1))

    assert "(per-position sums left out: 676 outputs > max_positions=64)" in text
    assert "unit 1: z = sum of 169 products" in text
    assert "feature map, channel 0: 26x26 values, min 0.0000" in text
    assert max(len(line) for line in text.splitlines()) <= 110
    assert "Keras output:" in text


def test_verify_a_saved_and_reloaded_sequential_model(tmp_path):
    """Keras rebuilds a loaded Sequential with extra inbound nodes; it is still a chain."""
    import keras

    from cnnviz.trust.reference.forward import verify

    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
    model.save(tmp_path / "m.keras")
    reloaded = keras.models.load_model(tmp_path / "m.keras")
    images = np.random.default_rng(0).uniform(size=(4, 6, 6, 1)).astype(np.float32)
    report = verify(reloaded, images)
    assert report.ok and report.max_difference < 1e-5
