"""How a model is set up to train: its precision policy, TensorFlow's threads, optimizer and
learning-rate schedule."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import keras

from visionpipe.config import TrainConfig


@contextlib.contextmanager
def dtype_policy(name: str):
    """Layers built inside compute in ``name`` (mixed_bfloat16: bfloat16 maths, float32
    variables); the global policy is float32 again afterwards, for the caller's models."""
    keras.mixed_precision.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


# CPU flags of native bfloat16 maths (oneDNN runs bfloat16 matmuls and convolutions on them):
# AVX-512 BF16 (Cooper Lake, Zen 4 and later) and AMX (Sapphire Rapids and later).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")
# Tensor cores multiply float16 from this CUDA compute capability on (Volta).
FLOAT16_CAPABILITY = (7, 0)


def _cpu_flags(cpuinfo_text: str | None = None) -> list[str] | None:
    """The first CPU's flags in ``cpuinfo_text`` (default: /proc/cpuinfo); None when there is
    no such file (not Linux) or it cannot be read."""
    if cpuinfo_text is None:
        if not sys.platform.startswith("linux"):
            return None
        try:
            cpuinfo_text = CPUINFO.read_text(errors="replace")
        except OSError:
            return None
    for line in cpuinfo_text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == "flags":
            return value.split()
    return None


def cpu_bf16_flags(cpuinfo_text: str | None = None) -> list[str]:
    """The bfloat16 flags (BF16_FLAGS) this CPU has, from ``cpuinfo_text`` or /proc/cpuinfo;
    empty off Linux or when cpuinfo cannot be read."""
    flags = set(_cpu_flags(cpuinfo_text) or ())
    return [flag for flag in BF16_FLAGS if flag in flags]


def gpu_devices() -> list[dict]:
    """Each GPU TensorFlow sees: its name, model and compute capability (None: unknown).
    Listing physical devices does not start TensorFlow's runtime (threads can still be set
    after it)."""
    import tensorflow as tf

    out = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details: dict = {}
        with contextlib.suppress(Exception):
            details = tf.config.experimental.get_device_details(gpu)
        capability = details.get("compute_capability")
        out.append({"name": gpu.name, "device_name": details.get("device_name"),
                    "compute_capability": list(capability) if capability else None})
    return out


def _gpu_precision() -> tuple[str, str] | None:
    """(policy, reason) from the GPUs TensorFlow sees; None without one."""
    found = [(tuple(g["compute_capability"]) if g["compute_capability"] else None,
              g["device_name"] or g["name"]) for g in gpu_devices()]
    if not found:
        return None
    # The slowest GPU decides: mirrored training runs the same policy on every one.
    capability, name = min(found, key=lambda f: f[0] or (0, 0))
    if capability is None:
        return "float32", f"GPU {name}, compute capability unknown: float16 tensor cores unsure"
    shown = ".".join(str(part) for part in capability)
    if tuple(capability) >= FLOAT16_CAPABILITY:
        return "mixed_float16", f"GPU {name}, compute capability {shown}: float16 tensor cores"
    return "float32", (f"GPU {name}, compute capability {shown}: no float16 tensor cores "
                       f"(they need 7.0 or later)")


def resolve_precision(setting: str, family: str | None = None,
                      key: str = "models.<name>.train") -> tuple[str, str]:
    """The Keras dtype policy for params' ``precision`` and why: a policy named in params is
    used as is; ``auto`` picks mixed_float16 on a GPU with tensor cores, mixed_bfloat16 on a
    CPU with native bfloat16 maths unless the ``family`` was measured no faster there, or
    faster at lower quality (its registry entry's ``cpu_float32``), float32 otherwise, and
    float32 for a ``family`` that trains in float32 only (its registry entry's
    ``float32_only``; a mixed policy named for one is a ParamsError at ``key``)."""
    from visionpipe.models.registry import get_family

    entry = get_family(family) if family is not None else None
    why = entry.float32_only if entry is not None else None
    if why is not None:
        if setting.startswith("mixed"):
            from visionpipe.errors import ParamsError

            raise ParamsError(f"params.yaml: {key}.precision = {setting}: family {family} "
                              f"trains in float32 only ({why}); use auto or float32")
        return "float32", ("set in params" if setting == "float32" else
                           f"family {family} trains in float32 only: {why}")
    if setting != "auto":
        return setting, "set in params"
    on_gpu = _gpu_precision()
    if on_gpu is not None:
        return on_gpu
    flags = _cpu_flags()
    if flags is None:
        return "float32", (f"no GPU; CPU flags unknown ({CPUINFO} unreadable), so neither "
                           f"{' nor '.join(BF16_FLAGS)} was found")
    present = [flag for flag in BF16_FLAGS if flag in flags]
    if present and entry is not None and entry.cpu_float32 is not None:
        return "float32", (f"no GPU; CPU with {' and '.join(present)}, but family {family} "
                           f"gains nothing from bfloat16 there: {entry.cpu_float32}")
    if present:
        return "mixed_bfloat16", f"no GPU; CPU with {' and '.join(present)}: native bfloat16"
    vector = [f for f in flags if f.startswith(("avx", "amx")) or f == "fma"]
    return "float32", (f"no GPU; CPU without AVX-512 BF16 or AMX (no "
                       f"{' or '.join(BF16_FLAGS)} in its flags: "
                       f"{' '.join(vector) or 'no avx/amx/fma flags'})")


# threads: auto gives a family registered with one_thread_per_op one thread per op and an op
# on every core at once only on a CPU-only machine of at most this many cores: measured faster
# on 2 (docs/performance.md); on larger machines it was never measured, so TensorFlow decides.
ONE_THREAD_PER_OP_MAX_CORES = 2


def resolve_threads(cfg: TrainConfig, family: str | None = None) -> tuple[dict[str, int], str]:
    """The thread counts params ask for, ``{"intra_op": n, "inter_op": m}`` (0: TensorFlow's
    choice), and why. Counts named in params are used as they are; ``auto`` picks one thread
    per op and ``cores`` ops at once for a ``family`` registered with ``one_thread_per_op``
    on a machine without GPU of at most ONE_THREAD_PER_OP_MAX_CORES cores, and TensorFlow's
    choice (0) otherwise. A key left at a number keeps it when the other one is auto."""
    from visionpipe.models.registry import get_family
    from visionpipe.timing import cores

    wanted = {"intra_op": cfg.intra_op_threads, "inter_op": cfg.inter_op_threads}
    if "auto" not in wanted.values():
        return wanted, "set in params"
    entry = get_family(family) if family is not None else None
    n = cores()
    pick, why = {"intra_op": 0, "inter_op": 0}, None
    if entry is None or entry.one_thread_per_op is None:
        why = (f"auto: TensorFlow's choice (family {family} has no measured gain from other "
               f"counts)" if entry is not None else "auto: TensorFlow's choice")
    elif gpu_devices():
        why = "auto: TensorFlow's choice (a GPU trains; thread counts were measured on CPUs)"
    elif n > ONE_THREAD_PER_OP_MAX_CORES:
        why = (f"auto: TensorFlow's choice ({n} cores; one thread per op was measured faster "
               f"for family {family} on {ONE_THREAD_PER_OP_MAX_CORES} cores, not on more)")
    else:
        pick = {"intra_op": 1, "inter_op": n}
        why = (f"auto: no GPU, {n} cores: one thread per op and {n} ops at once, as family "
               f"{family} trains faster: {entry.one_thread_per_op}")
    return {k: (pick[k] if v == "auto" else v) for k, v in wanted.items()}, why


def apply_threads(cfg: TrainConfig, key: str, family: str | None = None) -> dict:
    """Set TensorFlow's intra-op and inter-op thread counts as :func:`resolve_threads` reads
    ``cfg`` for ``family`` (0: leave TensorFlow's choice) and return those in effect:
    ``{"intra_op": n, "inter_op": m, "reason": why}`` (0: TensorFlow's default), plus a
    ``note`` when TensorFlow was already running with other counts (they can only be set
    before its runtime starts; the ones in effect are kept). ``key``: the params section
    (``models.<name>.train``), named in the note."""
    import tensorflow as tf

    threading = tf.config.threading
    setters = {"intra_op": threading.set_intra_op_parallelism_threads,
               "inter_op": threading.set_inter_op_parallelism_threads}
    wanted, why = resolve_threads(cfg, family)
    refused = []
    for what, count in wanted.items():
        if count:
            try:
                setters[what](count)
            except RuntimeError:  # "... cannot be modified after initialization."
                refused.append(f"{key}.{what}_threads = {count}")
    effect = {"intra_op": threading.get_intra_op_parallelism_threads(),
              "inter_op": threading.get_inter_op_parallelism_threads(), "reason": why}
    if refused:
        effect["note"] = (f"TensorFlow was already running: threads unchanged ("
                          f"{', '.join(refused)} not applied; in effect: intra_op "
                          f"{effect['intra_op']}, inter_op {effect['inter_op']}, 0 being "
                          f"TensorFlow's default)")
    return effect


def learning_rate(cfg: TrainConfig, steps_per_epoch: int):
    """The learning rate or per-step schedule named by ``cfg.lr_schedule``."""
    lr, total = cfg.learning_rate, cfg.epochs * steps_per_epoch
    schedules = keras.optimizers.schedules
    if cfg.lr_schedule == "step":
        return schedules.ExponentialDecay(lr, cfg.step_epochs * steps_per_epoch,
                                          cfg.step_factor, staircase=True)
    if cfg.lr_schedule == "cosine":
        return schedules.CosineDecay(lr, total, alpha=cfg.min_learning_rate / lr)
    if cfg.lr_schedule == "warmup_cosine":
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
        return schedules.CosineDecay(0.0, max(1, total - warmup),
                                     alpha=cfg.min_learning_rate / lr, warmup_target=lr,
                                     warmup_steps=warmup)
    return lr


def build_before_fit(model: keras.Model, batch_spec) -> None:
    """Create the optimizer's, the compiled loss' and the metrics' variables now, from the
    shapes of a batch (``batch_spec``: the training dataset's ``element_spec``), as Keras'
    ``fit`` does itself only under a distribution strategy.

    Without it ``fit`` creates them inside the first trace of its train step, and TensorFlow
    then traces the step a second time without creating them (a ``tf.function`` that makes
    variables is traced twice). For the default YOLOv8 that second trace cost about 15 s of its
    first epoch on a 2-core CPU (docs/performance.md); the weights and losses are the same.
    ``_symbolic_build`` is Keras' own (3.15, ``Trainer._symbolic_build``; requirements.txt pins
    Keras, and tests/unit/test_build_before_fit.py fails if a new one traces twice again)."""
    model._symbolic_build(data_batch=batch_spec)


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The optimizer named in params, with its learning rate (schedule) and weight decay."""
    lr = learning_rate(cfg, steps_per_epoch)
    wd = cfg.weight_decay or None
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=cfg.momentum, weight_decay=wd)
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay)
    return keras.optimizers.Adam(lr, weight_decay=wd)
