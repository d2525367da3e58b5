"""Where training runs: device choice, tf.distribute strategies, per-worker data sharding."""

from __future__ import annotations

from cnnviz._keras import epoch_iterator_class, replace_symbolic_build
from cnnviz.config.root import Config
from cnnviz.errors import CnnvizError


def select_device(choice: str, cpu_replicas: int = 1) -> str:
    """Apply `train.device` (and `train.cpu_replicas`); return the device training will use.

    Must run before TensorFlow touches a device: hiding GPUs and splitting the CPU into logical
    devices are both only possible before that.

    Args:
        choice: "auto", "cpu" or "gpu".
        cpu_replicas: logical CPU devices to make when training runs on the CPU (for
            `distribute: mirrored`); 1 leaves the CPU as it is.

    Returns:
        A description such as 'GPU:0 (2 visible)' or 'CPU'.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if choice == "gpu" and not gpus:
        raise CnnvizError(
            "train.device is 'gpu' but TensorFlow sees no GPU; use device: auto or cpu"
        )
    if choice == "cpu" and gpus:
        tf.config.set_visible_devices([], "GPU")
        gpus = []
    if gpus:
        return f"GPU:0 ({len(gpus)} visible)"
    if cpu_replicas > 1:
        _split_cpu(cpu_replicas)
    return "CPU"


def _split_cpu(replicas: int) -> None:
    """Make `replicas` logical CPU devices (MirroredStrategy then has one replica per device)."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    existing = len(tf.config.get_logical_device_configuration(cpu) or [None])
    if existing >= replicas:  # this process already split the CPU (an earlier run)
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * replicas
        )
    except RuntimeError:  # TensorFlow already initialized its devices in this process
        raise CnnvizError(
            f"train.cpu_replicas={replicas} needs {replicas} logical CPU devices, but TensorFlow "
            f"already started in this process with {existing}; train in a fresh process "
            "(e.g. `cnnviz train`), or use cpu_replicas <= " + str(existing)
        ) from None


def distribution_strategy(config: Config):
    """The tf.distribute strategy for `train.distribute` (the default strategy for 'none').

    mirrored: every visible GPU, or without one the first `train.cpu_replicas` logical CPUs
    (made by `select_device`). multi_worker: the cluster that the TF_CONFIG environment
    variable describes. Keras 3's own `keras.distribution` is not used: with the TensorFlow
    backend it does nothing.
    """
    import keras
    import tensorflow as tf

    if config.train.distribute != "none" and keras.backend.backend() != "tensorflow":
        raise CnnvizError(
            f"train.distribute {config.train.distribute!r} is tf.distribute, which runs on the "
            f"TensorFlow backend only; this run uses {keras.backend.backend()}: set "
            "train.distribute: none or choose --backend tensorflow")
    if config.train.distribute == "mirrored":
        if tf.config.get_visible_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        replicas = config.train.cpu_replicas
        cpus = tf.config.list_logical_devices("CPU")
        if len(cpus) < replicas:
            raise CnnvizError(
                f"train.cpu_replicas={replicas} but TensorFlow has {len(cpus)} CPU device(s) in "
                "this process; train in a fresh process (e.g. `cnnviz train`)"
            )
        return tf.distribute.MirroredStrategy([device.name for device in cpus[:replicas]])
    if config.train.distribute == "multi_worker":
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except (ValueError, RuntimeError) as error:  # a malformed TF_CONFIG, or TF started
            raise CnnvizError(f"train.distribute 'multi_worker': {error}") from None
    return tf.distribute.get_strategy()


def worker_role(strategy) -> tuple[bool, str]:
    """(is this process the chief, its name): only the chief writes the run directory."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task = (f"{resolver.task_type} {resolver.task_id}"
            if resolver is not None and resolver.task_type is not None else "chief")
    # should_checkpoint is TF's own chief test (task "chief", or worker 0 without one).
    return bool(strategy.extended.should_checkpoint), task


def replicas_line(strategy, config: Config) -> str:
    replicas = int(strategy.num_replicas_in_sync)
    batch = config.train.batch_size
    if replicas == 1:
        return f"1 replica, batch {batch}"
    return (f"{config.train.distribute} over {replicas} replicas, global batch {batch} = "
            f"{batch / replicas:g} per replica")


def worker_shard(strategy) -> tuple[int, int] | None:
    """(workers, this worker's index) under MultiWorkerMirroredStrategy, else None."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return None
    spec = resolver.cluster_spec()
    tasks = [(job, index) for job in ("chief", "worker") if job in spec.jobs
             for index in range(spec.num_tasks(job))]
    return len(tasks), tasks.index((resolver.task_type, int(resolver.task_id)))


def build_from_element_spec(model, element_spec) -> None:
    """Make this model instance's `fit` build from the data's `element_spec`, not from a batch.

    Keras (JAX and PyTorch trainers at every fit; TensorFlow's under a tf.distribute strategy)
    pulls one batch to build the model and its metrics, from an iterator it then drops while
    its prefetch thread goes on augmenting batches nobody reads: the augmentation layers'
    generators then advance in a timing-dependent order, and two runs of one seed differ.
    The batch is only read for its shapes."""
    replace_symbolic_build(model, lambda keras_build, iterator, data_batch: keras_build(
        data_batch=element_spec if data_batch is None else data_batch))


def distributed_fixes(model, strategy, element_spec) -> None:
    """Make this model instance's `fit`/`evaluate` under a tf.distribute strategy behave as
    without one.

    Keras 3 (TF backend, still in 3.15) builds a distributed model before fitting from one batch
    that it pulls from the data, which (a) starts an extra pass of the shuffled pipeline, so
    every epoch would see the order meant for the next one and a mirrored run would not repeat
    the same run on one device, and (b) under MultiWorkerMirroredStrategy fails, because it
    first averages that batch with `strategy.reduce` (keras-team/keras#20585). The batch is only
    read for its shapes: this instance takes them from the data's `element_spec` instead.
    Keras also averages each step's scalar logs over workers with `strategy.reduce("MEAN",
    value, axis=0)`, which needs an axis: under MultiWorkerMirroredStrategy the logs are
    returned as 1-element vectors (their mean over axis 0 is the usual mean over replicas).
    """
    import keras
    import tensorflow as tf

    build_from_element_spec(model, element_spec)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return

    def vector_logs(step):
        def run(data):
            return keras.tree.map_structure(
                lambda value: tf.reshape(value, [1]) if value.shape.rank == 0 else value,
                step(data))

        return run

    model.train_step = vector_logs(model.train_step)
    model.test_step = vector_logs(model.test_step)


def replay_data_order(train_data, strategy, epochs: int) -> None:
    """Advance the shuffled pipeline by `epochs` epochs without reading a batch.

    Each iterator made from the pipeline draws the next reshuffle seed. Keras's epoch iterator
    makes its iterators in a pattern of its own (in Keras 3.15 two per epoch: one at the start,
    one at the end), so the replay runs Keras's own class over the epochs without pulling data:
    a resumed run then sees each epoch's batches in the order the uninterrupted run saw them.
    """
    if epochs == 0:
        return
    import keras

    if keras.backend.backend() != "tensorflow":
        # Keras's JAX and PyTorch epoch iterator makes one iterator per epoch (Keras 3.15; the
        # one its symbolic build pulled a batch from at the fit's start is gone, see
        # `build_from_element_spec`), so each skipped epoch is one iterator.
        for _ in range(epochs):
            iter(train_data)
        return
    TFEpochIterator = epoch_iterator_class()
    if TFEpochIterator is None:  # another Keras layout: resume still works, in another order
        return
    epoch_iterator = TFEpochIterator(x=train_data, distribute_strategy=strategy)
    for _ in range(epochs):
        for _step in epoch_iterator:  # yields (step, step, tf iterator): no batch is read
            pass
