"""Training on several devices or machines: the ``tf.distribute`` strategy that
``models.<name>.train.distribute`` names, and the training loop MultiWorkerMirroredStrategy needs.

- ``none``: the default strategy (one device).
- ``mirrored``: ``tf.distribute.MirroredStrategy`` over this machine's GPUs (its CPU devices
  when it has none).
- ``multi_worker``: ``tf.distribute.MultiWorkerMirroredStrategy`` over the machines listed in
  ``TF_CONFIG`` (or a SLURM allocation).

Under both, :func:`fit_distributed` runs the model's own ``train_step``/``test_step`` with
``strategy.run`` and drives the same callbacks ``fit`` would, instead of Keras' ``model.fit``:
Keras 3's ``fit`` fails under MultiWorkerMirroredStrategy (keras-team/keras issue 20585), and
under MirroredStrategy it trains on other shuffle orders than one device does (see
:func:`fit_distributed`).

Every worker trains the same model in lockstep; only the chief (task 0) writes into the project
and tracks. The others write their outputs to a temporary folder that is deleted afterwards
(TensorFlow's convention), or kept under ``$VISIONPIPE_WORKER_DIR`` when that is set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import keras

from visionpipe.errors import ParamsError

#: Set on a non-chief worker to keep its (normally discarded) outputs in
#: ``$VISIONPIPE_WORKER_DIR/<task type>-<index>`` instead of a deleted temporary folder.
WORKER_DIR_ENV = "VISIONPIPE_WORKER_DIR"

TF_CONFIG_EXAMPLE = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                     '"task": {"type": "worker", "index": 0}}')


@dataclasses.dataclass(frozen=True)
class Distribution:
    """The strategy one training run uses, and this process's place in it."""

    kind: str                    # none | mirrored | multi_worker
    strategy: object             # a tf.distribute.Strategy
    is_chief: bool = True        # writes outputs and tracks
    task: str = "worker-0"       # "<task type>-<index>" of this process
    workers: int = 1

    @property
    def replicas(self) -> int:
        """Devices the global batch is split over (on all workers together)."""
        return int(self.strategy.num_replicas_in_sync)

    @property
    def own_loop(self) -> bool:
        """Whether training runs :func:`fit_distributed` rather than Keras' ``model.fit``: under
        every strategy but the default one."""
        return self.kind != "none"

    def scope(self):
        """Create and compile the model inside this: its variables then live on every
        replica."""
        return self.strategy.scope()

    def describe(self) -> dict:
        """What model.json records."""
        return {"strategy": self.kind, "replicas": self.replicas, "workers": self.workers}

    def all_equal(self, value: int) -> bool:
        """Whether every worker holds the same ``value`` (a collective: all workers call it)."""
        if self.workers == 1:
            return True
        import tensorflow as tf

        @tf.function
        def moments():
            per_replica = self.strategy.run(
                lambda: tf.constant([float(value), float(value) ** 2], tf.float64))
            return self.strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

        mean, mean_square = moments().numpy()
        return bool(mean_square - mean ** 2 == 0.0)


def _config_error(key: str, problem: str) -> ParamsError:
    return ParamsError(
        f"params.yaml: {key} = multi_worker: {problem}; set TF_CONFIG on every machine, e.g. "
        f"TF_CONFIG='{TF_CONFIG_EXAMPLE}' with index 0, 1, ... per machine (or run it under "
        f"SLURM with srun), or set {key} to none or mirrored")


def cluster_resolver(key: str):
    """The cluster of a multi-worker run: from ``TF_CONFIG``, or from SLURM's environment
    when ``SLURM_JOB_ID`` is set and ``TF_CONFIG`` is not. Errors name ``key``."""
    import tensorflow as tf

    resolvers = tf.distribute.cluster_resolver
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw and os.environ.get("SLURM_JOB_ID"):
        try:
            return resolvers.SlurmClusterResolver()
        except Exception as exc:  # noqa: BLE001 - scontrol missing, odd SLURM variables
            raise _config_error(key, f"SLURM job {os.environ['SLURM_JOB_ID']} gives no "
                                     f"cluster ({type(exc).__name__}: {exc})") from None
    if not raw:
        raise _config_error(key, "TF_CONFIG is not set")
    try:
        config = json.loads(raw)
        workers = list(config["cluster"]["worker"])
        task_type, index = config["task"]["type"], config["task"]["index"]
    except (ValueError, KeyError, TypeError) as exc:
        raise _config_error(key, f"TF_CONFIG is not a JSON object with cluster.worker "
                                 f"(a list of host:port) and task.type/task.index "
                                 f"({type(exc).__name__}: {exc})") from None
    jobs = config["cluster"]
    if (task_type not in jobs or not isinstance(index, int) or isinstance(index, bool)
            or not 0 <= index < len(jobs[task_type])):
        raise _config_error(key, f"TF_CONFIG's task {config['task']} is not in its cluster "
                                 f"{jobs}")
    if not workers or not all(isinstance(w, str) and ":" in w for w in workers):
        raise _config_error(key, f"TF_CONFIG's cluster.worker {workers} must list host:port "
                                 f"addresses")
    return resolvers.TFConfigClusterResolver()


def is_chief(task_type: str | None, index: int | None, jobs: dict) -> bool:
    """TensorFlow's rule: the ``chief`` task when the cluster has one, else worker 0."""
    if task_type is None:
        return True
    if "chief" in jobs:
        return task_type == "chief"
    return task_type == "worker" and int(index or 0) == 0


def make_distribution(kind: str, key: str) -> Distribution:
    """The strategy for ``distribute: kind``.

    Call it before any other TensorFlow work in the process: MultiWorkerMirroredStrategy
    configures collective ops, which TensorFlow allows only before its runtime starts.
    """
    import tensorflow as tf

    if kind == "none":
        return Distribution(kind, tf.distribute.get_strategy())
    if kind == "mirrored":
        devices = (tf.config.list_logical_devices("GPU")
                   or tf.config.list_logical_devices("CPU"))
        return Distribution(kind, tf.distribute.MirroredStrategy([d.name for d in devices]))
    if kind != "multi_worker":
        raise ParamsError(f"params.yaml: {key} = {kind!r}: expected none, mirrored or "
                          f"multi_worker")
    resolver = cluster_resolver(key)
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    except RuntimeError as exc:  # "Collective ops must be configured at program startup"
        raise ParamsError(f"params.yaml: {key} = multi_worker needs a fresh process (TensorFlow "
                          f"was already running: {exc}); run `visionpipe train --model ...` "
                          f"on each machine") from None
    jobs = resolver.cluster_spec().as_dict()
    task_type, index = resolver.task_type, resolver.task_id
    return Distribution(kind, strategy, is_chief=is_chief(task_type, index, jobs),
                        task=f"{task_type}-{index}",
                        workers=sum(len(jobs.get(job, [])) for job in ("chief", "worker")))


def check_jit(dist: Distribution, jit_compile: bool, key: str) -> None:
    """XLA cannot compile the cross-worker all-reduce on CPU devices, nor a step whose
    variables live on several CPU devices (``mirrored`` over CPUs: "Trying to access resource
    ... located in device CPU:1 from device CPU:0", under Keras' ``fit`` too): say so before
    training rather than failing in the first step."""
    import tensorflow as tf

    if not jit_compile or tf.config.list_logical_devices("GPU"):
        return
    if dist.kind == "multi_worker":
        raise ParamsError(f"params.yaml: {key} = true: XLA cannot compile the multi_worker "
                          f"all-reduce on CPU devices (no GPU here); set it to auto or false")
    if dist.kind == "mirrored" and dist.replicas > 1:
        raise ParamsError(f"params.yaml: {key} = true: XLA cannot compile a step whose "
                          f"variables are mirrored over {dist.replicas} CPU devices (no GPU "
                          f"here); set it to auto or false")


def uneven_split_note(count: int, batch_size: int, replicas: int, key: str) -> str | None:
    """A one-line note when the batches of an epoch (``count`` examples, ``batch_size`` per
    global batch) do not all split evenly over ``replicas``; None when they do.

    Keras scales each replica's mean loss by 1/replicas, so a batch split 7 + 6 gives the 7
    and the 6 examples half the gradient each instead of 1/13 per example: training then
    departs from one device's (docs/training.md). ``key``: the batch size's params key."""
    if replicas <= 1:
        return None
    last = count % batch_size or batch_size
    uneven = []
    if count > batch_size and batch_size % replicas:
        uneven.append(f"each batch of {batch_size}")
    if last % replicas and (last != batch_size or count <= batch_size):
        uneven.append(f"the last batch of each epoch ({last} of the {count} examples)")
    if not uneven:
        return None
    verb = "does" if len(uneven) == 1 else "do"
    return (f"note: {' and '.join(uneven)} {verb} not split evenly over {replicas} replicas, so "
            f"their examples do not count equally and training will not match one device's; "
            f"to match it, set {key} (now {batch_size}) to a multiple of {replicas} that "
            f"leaves a multiple of {replicas} in the last batch")


def worker_params(params, dist: Distribution):
    """``params`` as this worker uses them: a non-chief worker tracks nothing (no MLflow run,
    no codecarbon), so a cluster run is one run, logged once."""
    if dist.is_chief:
        return params
    tracking = dataclasses.replace(params.tracking, mlflow=False, codecarbon=False,
                                   system_metrics=False)
    return dataclasses.replace(params, tracking=tracking)


@contextlib.contextmanager
def output_root(root: Path, dist: Distribution) -> Iterator[Path]:
    """Where this worker writes its outputs: the project for the chief; for any other worker
    a temporary folder, deleted afterwards (kept under ``$VISIONPIPE_WORKER_DIR``)."""
    if dist.is_chief:
        yield root
        return
    keep = os.environ.get(WORKER_DIR_ENV)
    if keep:
        folder = Path(keep) / dist.task
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        yield folder
        return
    folder = Path(tempfile.mkdtemp(prefix=f"visionpipe-{dist.task}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def distribute_dataset(strategy, dataset):
    """``dataset`` (global batches) split over the replicas of every worker.

    DATA sharding: every worker reads the same files and takes its part of each global batch,
    so all workers run the same number of steps (FILE sharding can leave one waiting forever)
    and the global batches are the ones a single process would see.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def _floats(logs: dict) -> dict[str, float]:
    return {k: float(keras.ops.convert_to_numpy(v)) for k, v in logs.items()}


def fit_distributed(model: keras.Model, strategy, train_ds, *, validation_data, epochs: int,
                    initial_epoch: int = 0, callbacks=(), verbose: int = 2
                    ) -> keras.callbacks.History:
    """``model.fit`` under a MirroredStrategy or MultiWorkerMirroredStrategy: the same steps,
    logs and callbacks, on the shuffle orders ``fit`` on one device trains on.

    Each step runs the compiled model's ``train_step`` on every replica (``strategy.run``): it
    computes the compiled loss (scaled for the replicas), all-reduces the gradients through the
    optimizer and updates the compiled metrics. Metric variables are summed over the replicas
    when read, so every worker sees the global loss and metrics, batch by batch, as ``fit``
    reports them; validation runs ``test_step`` the same way and adds ``val_*`` to the epoch's
    logs. The model must have been created and compiled under ``strategy.scope()``.

    Why not Keras' ``fit`` under MirroredStrategy: before the first epoch it builds the model
    on a batch taken from an iterator over the training set, then drops that iterator (Keras
    3.15, ``TensorFlowTrainer._maybe_symbolic_build``, only when the model has a strategy).
    Opening an iterator moves the seeded reshuffle (``reshuffle_each_iteration``) on, so every
    epoch trained on the order after the one a single device gets: on the tests' tiny MLP the
    weights ended 0.105 apart from one device's, exactly where one-device ``fit`` ends after
    one iterator is opened and dropped before it. Here nothing opens the training set early.
    That build also averages the taken batch over the replicas, which fails when a batch does
    not split evenly ("Inputs to operation AddN ... must have the same size and shape. Input
    0: [7,16,16,3] != input 1: [6,16,16,3]"); here such batches train.
    """
    import tensorflow as tf

    train = distribute_dataset(strategy, train_ds)
    val = distribute_dataset(strategy, validation_data)
    if not model.optimizer.built:
        # Created inside the first step, its variables fail under MirroredStrategy ("You
        # must feed a value for placeholder tensor 'cond/else/_1/cond/Placeholder'").
        with strategy.scope():
            model.optimizer.build(model.trainable_variables)

    def step_function(step):
        # As Keras' fit: XLA compiles each replica's step, not the cross-replica part.
        one_step = tf.function(step, jit_compile=bool(model.jit_compile), reduce_retracing=True)

        @tf.function(reduce_retracing=True)
        def run(batch):
            strategy.run(one_step, args=(batch,))
            return model.get_metrics_result()
        return run

    train_step, test_step = step_function(model.train_step), step_function(model.test_step)
    steps = int(train_ds.cardinality())
    callbacks = keras.callbacks.CallbackList(
        list(callbacks), add_history=True, add_progbar=verbose != 0, verbose=verbose,
        epochs=epochs, steps=steps if steps > 0 else None, model=model)
    model.stop_training = False
    callbacks.on_train_begin()
    epoch_logs = None
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        for index, batch in enumerate(train):
            callbacks.on_train_batch_begin(index)
            callbacks.on_train_batch_end(index, _floats(train_step(batch)))
            if model.stop_training:
                break
        if steps > 0:
            # Keras 3.15's epoch iterator, when it knows the epoch's length, opens the next
            # epoch's iterator as one ends and another as the next begins: each opening moves
            # the seeded shuffle on, so fit skips every other order. Opened and dropped here
            # too, so that these workers see the batches model.fit sees.
            iter(train)
        epoch_logs = _floats(model.get_metrics_result())
        model.reset_metrics()
        for batch in val:
            test_step(batch)
        epoch_logs.update({f"val_{k}": v
                           for k, v in _floats(model.get_metrics_result()).items()})
        callbacks.on_epoch_end(epoch, epoch_logs)
        if model.stop_training:
            break
    if epochs > 0:
        model.optimizer.finalize_variable_values(model.trainable_weights)
    callbacks.on_train_end(logs=epoch_logs)
    return model.history

