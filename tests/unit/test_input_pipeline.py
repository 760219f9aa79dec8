"""The train input pipeline's switches (models.<name>.train.cache, cache_limit_mb,
deterministic_input): every cache mode gives the same batches, in the same seeded order."""

from __future__ import annotations

import numpy as np
import pytest

from visionpipe.config import TrainConfig, parse_dataclass
from visionpipe.data import records
from visionpipe.data.example import Example
from visionpipe.data.pipeline import cache_mode, decoded_bytes, model_dataset
from visionpipe.errors import ParamsError
from visionpipe.tasks.registry import get_task

N, SIZE = 37, 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """37 classification records in 4 shards; image n is filled with the value n."""
    folder = tmp_path_factory.mktemp("records")
    examples = [Example(id=f"e{n:02d}", image=np.full((SIZE, SIZE, 3), n, np.uint8),
                        label=n % 3) for n in range(N)]
    count, names = records.write_split(examples, folder, "train", 10)
    records.write_manifest(folder, {"task": "classification", "class_names": ["a", "b", "c"],
                                    "image_size": [SIZE, SIZE], "counts": {"train": count},
                                    "splits": {"train": {"count": count, "shards": names}}})
    return folder


def _epochs(ds, epochs=2):
    """Each epoch's batches as (image values, label ids): image n holds n everywhere."""
    out = []
    for _ in range(epochs):
        out.append([(x.numpy()[:, 0, 0, 0].astype(int).tolist(),
                     np.argmax(y.numpy(), axis=-1).tolist()) for x, y in ds])
    return out


def _dataset(folder, tmp_path, cache, deterministic=True):
    io = get_task("classification").to_model_io(3)
    return model_dataset(folder, "train", io, 8, shuffle=True, seed=3, cache=cache,
                         cache_file=tmp_path / "cache" / "train", deterministic=deterministic)


def test_cache_modes_give_the_same_batches_in_the_same_order(shards, tmp_path):
    (tmp_path / "cache").mkdir()
    runs = {mode: _epochs(_dataset(shards, tmp_path, mode)) for mode in
            ("memory", "disk", "none")}
    first, second = runs["memory"]
    assert [len(x) for x, _ in first] == [8, 8, 8, 8, 5]
    assert sorted(v for x, _ in first for v in x) == list(range(N))  # every record once
    assert first != second  # reshuffled each epoch (seeded)
    assert all(y == [v % 3 for v in x] for x, y in first)  # labels stay with their images
    assert runs["disk"] == runs["memory"] and runs["none"] == runs["memory"]
    # The disk cache is TensorFlow's files under the given prefix.
    assert any(p.name.startswith("train") for p in (tmp_path / "cache").iterdir())


def test_non_deterministic_input_keeps_every_record(shards, tmp_path):
    (tmp_path / "cache").mkdir()
    epoch, _ = _epochs(_dataset(shards, tmp_path, "memory", deterministic=False))
    values = sorted(v for x, _ in epoch for v in x)
    assert values == list(range(N))


def test_auto_cache_keeps_memory_under_the_limit_and_disk_over_it(shards):
    manifest = records.read_manifest(shards)
    nbytes = decoded_bytes(manifest, "train")
    assert nbytes == N * SIZE * SIZE * 3
    assert cache_mode("auto", nbytes, 1) == "memory"  # 28 KB fit in 1 MB
    assert cache_mode("auto", 2**20 + 1, 1) == "disk"
    assert cache_mode("auto", 2**20, 1) == "memory"
    assert cache_mode("auto", 1, 0) == "disk"
    for mode in ("memory", "disk", "none"):
        assert cache_mode(mode, 10**15, 1) == mode  # explicit modes are kept


def test_disk_cache_needs_a_file(shards):
    io = get_task("classification").to_model_io(3)
    with pytest.raises(ValueError, match="cache_file"):
        model_dataset(shards, "train", io, 8, cache="disk")


@pytest.mark.parametrize("key, value, expected", [
    ("cache", "ram", "one of 'auto', 'memory', 'disk', 'none'"),
    ("cache_limit_mb", -1, ">= 0"),
    ("deterministic_input", "sometimes", "true or false"),
    ("precision", "float16", "'float32', 'mixed_float16', 'mixed_bfloat16'"),
    ("jit_compile", "yes", "true or false or one of 'auto'"),
    ("distribute", "horovod", "'none', 'mirrored', 'multi_worker'"),
])
def test_bad_switches_name_the_key(key, value, expected):
    with pytest.raises(ParamsError) as err:
        parse_dataclass(TrainConfig, {key: value}, "models.m.train")
    assert f"models.m.train.{key} = {value!r}" in str(err.value)
    assert expected in str(err.value)


def test_switch_defaults_keep_the_single_device_float32_pipeline():
    t = TrainConfig()
    assert (t.precision, t.jit_compile, t.distribute) == ("float32", "auto", "none")
    assert (t.cache, t.cache_limit_mb, t.deterministic_input) == ("auto", 4096, True)
