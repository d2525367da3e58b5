"""One test per Keras internal in cnnviz/_keras.py: each fails, naming the internal and the Keras
version, when a Keras release changes it (pyproject pins the releases the suite ran on)."""

from pathlib import Path

import keras
import numpy as np
import pytest

from cnnviz import _keras


def _changed(internal: str) -> str:
    return (
        f"Keras {keras.__version__} changed the internal {internal} that cnnviz/_keras.py "
        f"relies on (tested with Keras {_keras.TESTED_KERAS}.x)"
    )


def _functional():
    inputs = keras.Input((4, 4, 1), name="pixels")
    x = keras.layers.Conv2D(2, 3, name="conv")(inputs)
    x = keras.layers.Flatten(name="flat")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs)


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(x)


def test_functional_models_are_told_from_subclassed_ones():
    assert _keras.is_functional(_functional()), _changed("Functional._nodes_by_depth")
    assert not _keras.is_functional(_Subclassed())
    assert not _keras.is_functional(keras.layers.Dense(2))


def test_the_producer_of_an_output_is_the_layer_that_made_it():
    model = _functional()
    operation, node_index, tensor_index = _keras.producer(model.outputs[0])
    assert operation is model.get_layer("head")
    assert (node_index, tensor_index) == (0, 0)


def test_replaying_the_graph_layer_by_layer_gives_the_model_output():
    model = _functional()
    images = np.random.default_rng(0).random((5, 4, 4, 1), dtype=np.float32)
    called = []

    def call(operation, *args, **kwargs):
        called.append(operation.name)
        return operation(*args, **kwargs)

    replayed = _keras.run_through_graph(model, [keras.ops.convert_to_tensor(images)], call)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(replayed), model.predict(images, verbose=0), rtol=1e-6, atol=1e-6
    )
    assert called == ["conv", "flat", "head"]


def test_all_layers_opens_nested_models():
    inner = _functional()
    inputs = keras.Input((4, 4, 1))
    outer = keras.Model(inputs, keras.layers.Dense(1, name="extra")(inner(inputs)))
    names = [layer.name for layer in _keras.all_layers(outer)]
    assert {"conv", "flat", "head", "extra"} <= set(names)


@pytest.mark.slow  # one tiny fit
def test_a_model_instance_builds_itself_through_the_replacement():
    model = _functional()
    seen = []

    def build(keras_build, iterator, data_batch):
        seen.append(data_batch)
        keras_build(data_batch=data_batch)

    _keras.replace_symbolic_build(model, build)
    batch = (np.zeros((2, 4, 4, 1), np.float32), np.zeros((2, 3), np.float32))
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    model.fit(*batch, epochs=1, verbose=0)
    assert seen, _changed("Trainer._maybe_symbolic_build (no longer called by fit)")


def test_keras_has_its_tensorflow_epoch_iterator():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the TensorFlow trainer's iterator")
    iterator_class = _keras.epoch_iterator_class()
    assert iterator_class is not None, _changed(
        "keras.src.backend.tensorflow.trainer.TFEpochIterator"
    )
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices(np.zeros((4, 1), np.float32)).batch(2)
    assert (
        len(list(iterator_class(x=data, distribute_strategy=tf.distribute.get_strategy()))) >= 1
    ), _changed("TFEpochIterator (no steps)")


def test_the_pipeline_generator_is_the_one_tf_data_augments_with():
    import tensorflow as tf

    layer = keras.layers.RandomContrast(0.5, seed=7)
    images = tf.data.Dataset.from_tensor_slices(np.random.rand(6, 4, 4, 1).astype("float32"))
    pipeline = images.batch(2).map(lambda batch: layer(batch, training=True))
    (generator,) = _keras.pipeline_seed_generators([layer])
    first = [batch.numpy() for batch in pipeline]
    generator.state.assign(np.array([7, 0], dtype=generator.state.dtype))  # back to the start
    again = [batch.numpy() for batch in pipeline]
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    # Not restored, the generator goes on and the same pipeline augments differently.
    assert not np.array_equal(np.stack([batch.numpy() for batch in pipeline]), np.stack(first))


def test_an_optimizer_knows_each_variable_by_its_own_key():
    model = _functional()
    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)
    keys = [_keras.variable_key(optimizer, variable) for variable in model.trainable_variables]
    assert len(set(keys)) == len(model.trainable_variables) == 4


def test_the_cache_folder_is_where_get_file_keeps_a_download(tmp_path, monkeypatch):
    import keras.src.backend.config as keras_config

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(home))  # as $KERAS_HOME would at import
    source = tmp_path / "weights.h5"
    source.write_bytes(b"weights")
    kept = keras.utils.get_file("weights.h5", source.as_uri(), cache_subdir="models")
    assert Path(_keras.keras_cache_dir()) == home, _changed("keras.src.backend.config.keras_home")
    assert Path(kept) == home / "models" / "weights.h5"


def test_a_missing_internal_is_one_line_naming_it_and_the_version():
    with pytest.raises(_keras.KerasInternalChanged) as error:
        _keras.producer(np.zeros(3))
    message = str(error.value)
    assert "KerasTensor._keras_history" in message and keras.__version__ in message
    assert "\n" not in message
