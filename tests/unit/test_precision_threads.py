"""precision: auto and TensorFlow's thread counts (models.<name>.train): what auto resolves to
and why, the CPU flags it reads, threads set in a fresh TensorFlow and kept in a running one,
and bad values as one-line errors naming the key."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.helpers import child_env, params_error
from visionpipe import timing, training
from visionpipe.config import TrainConfig, parse_dataclass
from visionpipe.models.registry import get_family
from visionpipe.training import (
    BF16_FLAGS,
    apply_threads,
    cpu_bf16_flags,
    resolve_precision,
    resolve_threads,
)

# Two processors of a Zen 4 EPYC (flags shortened): AVX-512 BF16, no AMX.
ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9454 48-Core Processor
flags\t\t: fpu sse sse2 avx fma avx2 avx512f avx512bw avx512_bf16 avx512_vnni
bogomips\t: 5491.89

processor\t: 1
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse sse2 avx fma avx2 avx512f avx512bw avx512_bf16 avx512_vnni
"""
SAPPHIRE_RAPIDS = "flags\t\t: avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse sse2 avx fma avx2 bmi2\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sha1 sha2 crc32 bf16 i8mm\n"


@pytest.mark.parametrize("text, expected", [
    (ZEN4, ["avx512_bf16"]),
    (SAPPHIRE_RAPIDS, ["avx512_bf16", "amx_bf16"]),
    (AVX2_ONLY, []),
    (ARM, []),  # no x86 flags line
    ("", []),
])
def test_cpu_bf16_flags_reads_the_flags_line(text, expected):
    assert cpu_bf16_flags(text) == expected


def test_cpu_bf16_flags_ignores_flags_that_only_contain_the_name():
    assert cpu_bf16_flags("flags : avx512_bf16x amx_bf16_tile xavx512_bf16\n") == []
    assert cpu_bf16_flags("model name : avx512_bf16 amx_bf16\n") == []


def test_auto_on_this_machine_follows_its_gpu_and_cpu_flags():
    """This machine (no GPU, AVX2 and FMA only) trains in float32; the reason names what was
    looked for and the CPU's vector flags."""
    import tensorflow as tf

    policy, reason = resolve_precision("auto")
    if tf.config.list_physical_devices("GPU"):
        assert reason.startswith("GPU ") and "compute capability" in reason
        assert policy in ("mixed_float16", "float32")
    elif cpu_bf16_flags():
        assert policy == "mixed_bfloat16"
        assert all(flag in reason for flag in cpu_bf16_flags())
    else:
        assert policy == "float32"
        assert reason.startswith("no GPU; CPU without AVX-512 BF16 or AMX")
        assert all(flag in reason for flag in BF16_FLAGS)
        shown = reason.rpartition(": ")[2].rstrip(")").split()
        assert shown and all(f.startswith(("avx", "amx")) or f == "fma" for f in shown)


@pytest.mark.parametrize("setting", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_a_policy_named_in_params_is_used_as_is(setting):
    assert resolve_precision(setting) == (setting, "set in params")


FRESH = """
import json, tensorflow as tf
from visionpipe.config import TrainConfig
from visionpipe.training import apply_threads
key = "models.m.train"
first = apply_threads(TrainConfig(intra_op_threads=1, inter_op_threads=1), key)
total = float(tf.reduce_sum(tf.ones((64, 64)) @ tf.ones((64, 64))))  # the runtime starts
again = apply_threads(TrainConfig(intra_op_threads=3, inter_op_threads=1), key)
same = apply_threads(TrainConfig(intra_op_threads=1, inter_op_threads=1), key)
default = apply_threads(TrainConfig(), key)
print(json.dumps([first, total, again, same, default]))
"""
COUNTS = ("intra_op", "inter_op")


def counts(effect: dict) -> dict:
    return {k: effect[k] for k in COUNTS}


def test_threads_are_set_in_a_fresh_tensorflow_and_kept_once_it_runs():
    done = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True,
                          timeout=300, env=child_env(), check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    first, total, again, same, default = json.loads(done.stdout)  # nothing else on stdout
    assert first == {"intra_op": 1, "inter_op": 1, "reason": "set in params"}
    assert total == 64.0 ** 3
    # After the runtime started: no crash, the counts in effect are kept and the note says so.
    assert counts(again) == {"intra_op": 1, "inter_op": 1}
    assert again["note"].startswith("TensorFlow was already running: threads unchanged")
    assert "models.m.train.intra_op_threads = 3 not applied" in again["note"]
    assert "inter_op_threads" not in again["note"]  # 1 was already in effect
    assert same == {"intra_op": 1, "inter_op": 1, "reason": "set in params"}
    assert counts(default) == {"intra_op": 1, "inter_op": 1}  # 0: nothing set, what runs shown


AUTO = """
import json
from visionpipe.config import TrainConfig
from visionpipe.training import apply_threads
import tensorflow as tf
effect = apply_threads(TrainConfig(intra_op_threads="auto", inter_op_threads="auto"),
                       "models.yolo.train", "yolo")
tf.ones(2) + 1  # the runtime starts with them
print(json.dumps([effect, tf.config.threading.get_intra_op_parallelism_threads(),
                  tf.config.threading.get_inter_op_parallelism_threads()]))
"""


@pytest.mark.skipif(timing.cores() > training.ONE_THREAD_PER_OP_MAX_CORES
                    or bool(training.gpu_devices()),
                    reason="auto picks TensorFlow's choice on this machine (tested below)")
def test_auto_runs_yolo_one_thread_per_op_on_a_small_cpu():
    done = subprocess.run([sys.executable, "-c", AUTO], capture_output=True, text=True,
                          timeout=300, env=child_env(), check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    effect, intra, inter = json.loads(done.stdout)
    n = timing.cores()
    assert counts(effect) == {"intra_op": 1, "inter_op": n} and (intra, inter) == (1, n)
    assert effect["reason"].startswith(f"auto: no GPU, {n} cores: one thread per op and {n} "
                                       f"ops at once, as family yolo trains faster: ")
    assert effect["reason"].endswith(get_family("yolo").one_thread_per_op)


def test_auto_leaves_tensorflow_its_choice_elsewhere(monkeypatch):
    auto = TrainConfig(intra_op_threads="auto", inter_op_threads="auto")
    monkeypatch.setattr(timing, "cores", lambda: 2)
    monkeypatch.setattr(training, "gpu_devices", lambda: [])
    assert resolve_threads(auto, "yolo")[0] == {"intra_op": 1, "inter_op": 2}
    # A family without a measured gain: TensorFlow's choice, and why.
    assert resolve_threads(auto, "mlp") == (
        {"intra_op": 0, "inter_op": 0},
        "auto: TensorFlow's choice (family mlp has no measured gain from other counts)")
    # A number next to auto is kept; auto fills the other one.
    mixed = TrainConfig(intra_op_threads="auto", inter_op_threads=3)
    assert resolve_threads(mixed, "yolo")[0] == {"intra_op": 1, "inter_op": 3}
    # More cores than were measured: TensorFlow decides.
    monkeypatch.setattr(timing, "cores", lambda: 16)
    counts16, why = resolve_threads(auto, "yolo")
    assert counts16 == {"intra_op": 0, "inter_op": 0}
    assert why == ("auto: TensorFlow's choice (16 cores; one thread per op was measured "
                   "faster for family yolo on 2 cores, not on more)")
    # A GPU trains: TensorFlow decides.
    monkeypatch.setattr(timing, "cores", lambda: 2)
    monkeypatch.setattr(training, "gpu_devices", lambda: [{"name": "/physical_device:GPU:0"}])
    assert resolve_threads(auto, "yolo") == (
        {"intra_op": 0, "inter_op": 0},
        "auto: TensorFlow's choice (a GPU trains; thread counts were measured on CPUs)")
    # Numbers only: as written, whatever the machine.
    assert resolve_threads(TrainConfig(intra_op_threads=2), "yolo") == (
        {"intra_op": 2, "inter_op": 0}, "set in params")


def test_threads_zero_leaves_tensorflow_its_choice_in_this_process():
    import tensorflow as tf

    tf.ones(2) + 1  # the runtime runs (as after any earlier test)
    effect = apply_threads(TrainConfig(), "models.m.train")
    assert counts(effect) == {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                              "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}
    wanted = effect["intra_op"] + 1
    late = apply_threads(TrainConfig(intra_op_threads=wanted), "models.m.train")
    assert late["intra_op"] == effect["intra_op"]
    assert f"models.m.train.intra_op_threads = {wanted} not applied" in late["note"]


@pytest.mark.parametrize("key, value, expected", [
    ("precision", "bfloat16", "'auto', 'float32', 'mixed_float16', 'mixed_bfloat16'"),
    ("precision", "AUTO", "'auto', 'float32'"),
    ("intra_op_threads", -1, "expected a value >= 0"),
    ("inter_op_threads", -2, "expected a value >= 0"),
    ("intra_op_threads", 4096, "<= 1024"),
    ("inter_op_threads", "two", "an integer >= 0 and <= 1024"),
    ("intra_op_threads", 1.5, "an integer"),
    ("inter_op_threads", "Auto", "an integer >= 0 and <= 1024 or one of 'auto'"),
])
def test_bad_precision_and_threads_name_the_key(key, value, expected):
    text = params_error(f"models.m.train.{key} = {value!r}: ", parse_dataclass, TrainConfig,
                        {key: value}, "models.m.train")
    assert expected in text


def test_defaults_keep_float32_and_tensorflows_threads():
    t = TrainConfig()
    assert (t.precision, t.intra_op_threads, t.inter_op_threads) == ("float32", 0, 0)
    assert TrainConfig(precision="auto", intra_op_threads=2).intra_op_threads == 2


def test_cli_names_an_unknown_precision_in_one_line(tmp_path, default_params_dict):
    data = json.loads(json.dumps(default_params_dict))
    data["models"]["mlp"]["train"]["precision"] = "bf16"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "visionpipe.cli", "train", "--model", "mlp",
                           "--params", "params.yaml", "--root", str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=child_env(),
                          check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("visionpipe: error: params.yaml: models.mlp.train.precision = "
                           "'bf16': expected one of 'auto', 'float32', 'mixed_float16', "
                           "'mixed_bfloat16'\n")


def test_mlflow_gets_what_auto_became_from_model_json():
    from visionpipe.tracking.stage_logs import resolved_params

    meta = {"precision": "float32", "precision_setting": "auto",
            "threads": {"intra_op": 2, "inter_op": 1, "reason": "set in params"}}
    assert resolved_params(meta) == {"precision_resolved": "float32",
                                     "threads_resolved": "intra_op=2, inter_op=1"}
    assert resolved_params({}) == {}  # a model.json from before: nothing invented


def test_a_float32_only_family_gets_float32_from_auto_and_refuses_mixed():
    from visionpipe.errors import ParamsError
    from visionpipe.models.registry import get_family
    from visionpipe.training import resolve_precision

    reason = get_family("yolo").float32_only
    assert reason and get_family("mlp").float32_only is None
    policy, why = resolve_precision("auto", "yolo", "models.yolo.train")
    assert policy == "float32" and "float32 only" in why and reason in why
    assert resolve_precision("float32", "yolo") == ("float32", "set in params")
    for mixed in ("mixed_float16", "mixed_bfloat16"):
        with pytest.raises(ParamsError) as err:
            resolve_precision(mixed, "yolo", "models.yolo.train")
        assert str(err.value).startswith(f"params.yaml: models.yolo.train.precision = {mixed}:")
    assert resolve_precision("mixed_bfloat16", "mlp") == ("mixed_bfloat16", "set in params")


BF16_CPU = "processor : 0\nflags : fpu sse2 avx avx2 fma avx512f avx512_bf16\n"
AVX2_CPU = "processor : 0\nflags : fpu sse2 avx avx2 fma\n"


@pytest.mark.parametrize("cpuinfo,family,policy", [
    (BF16_CPU, "resnet", "mixed_bfloat16"),
    (BF16_CPU, "vgg", "mixed_bfloat16"),
    (BF16_CPU, "unet", "float32"),          # slower and lower quality in bfloat16 there
    (BF16_CPU, "mlp", "float32"),           # faster, at lower quality, in bfloat16 there
    (BF16_CPU, "applications", "float32"),  # MobileNetV2 measured slower
    (BF16_CPU, "yolo", "float32"),          # float32 only
    (AVX2_CPU, "resnet", "float32"),
    (AVX2_CPU, "mlp", "float32"),
])
def test_auto_on_a_cpu_follows_its_flags_and_each_familys_measurement(
        tmp_path, monkeypatch, cpuinfo, family, policy):
    """Without a GPU, auto picks mixed_bfloat16 on a CPU with native bfloat16 maths only for
    families that train faster in it there (their registry entry has no cpu_float32); the
    reason says which rule decided."""
    import tensorflow as tf

    from visionpipe import training
    from visionpipe.models.registry import get_family

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU decides auto before the CPU flags")
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    monkeypatch.setattr(training, "CPUINFO", tmp_path / "cpuinfo")
    got, why = resolve_precision("auto", family, f"models.{family}.train")
    assert got == policy
    entry = get_family(family)
    if family == "yolo":
        assert entry.float32_only in why
    elif cpuinfo is AVX2_CPU:
        assert why.startswith("no GPU; CPU without AVX-512 BF16 or AMX")
    elif policy == "float32":
        assert why.startswith("no GPU; CPU with avx512_bf16, but family ")
        assert entry.cpu_float32 in why and "images/s" in entry.cpu_float32
        assert "gains nothing from bfloat16 there" in why
    else:
        assert entry.cpu_float32 is None and why == "no GPU; CPU with avx512_bf16: native bfloat16"
    # A policy named in params is used as is, whatever the CPU and the measurement.
    if family != "yolo":
        assert resolve_precision("mixed_bfloat16", family) == ("mixed_bfloat16", "set in params")
