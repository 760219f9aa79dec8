"""The faster paths of prepare and augment write the bytes the plain ones did.

prepare generates ``shapes`` without storing it in TFDS records first, augment writes each kept
original as the record it read, and the image warp gathers pixels with ``np.take`` (and skips
the blend where no pixel is split): each is checked here against what it replaced.
"""

from __future__ import annotations

import numpy as np
import pytest

from visionpipe.config import AugmentConfig, PrepareConfig
from visionpipe.config.schema import SplitSizes
from visionpipe.data import augment, records
from visionpipe.data.example import Example
from visionpipe.data.sources import shapes, tfds_source
from visionpipe.stages import prepare


@pytest.mark.parametrize("size", [(32, 32), (48, 80)])
def test_shapes_are_the_examples_the_tfds_builder_gives_back(tmp_path, size):
    splits = {"train": 6, "val": 3, "test": 2}
    builder = shapes.load_shapes_builder(size, splits, 5, str(tmp_path))
    builder.download_and_prepare()
    cfg = PrepareConfig(image_size=size, splits=SplitSizes(6, 3, 2))
    source, names, direct = prepare._shapes_splits(cfg, 5, "detection")
    assert source == {"kind": "shapes", "name": "shapes",
                      "builder_config": builder.builder_config.name,
                      "version": str(builder.version), "seed": 5}
    assert names == tfds_source.class_names(builder)
    for split, count in splits.items():
        examples, total = direct[split]
        assert total == count
        mine = list(examples)
        theirs = list(tfds_source.iter_split(builder, split))
        assert [ex.id for ex in mine] == [ex.id for ex in theirs]
        for a, b in zip(mine, theirs, strict=True):
            for field in ("image", "mask", "boxes", "box_labels"):
                x, y = getattr(a, field), getattr(b, field)
                assert (x.dtype, x.shape) == (y.dtype, y.shape), field
                assert x.tobytes() == y.tobytes(), (a.id, field)
            assert (a.label, a.difficult) == (b.label, b.difficult)
            assert records.serialize(a) == records.serialize(b)


def _records(tmp_path, examples, shard_size=3):
    count, shards = records.write_split(examples, tmp_path, "train", shard_size)
    records.write_manifest(tmp_path, {"task": "detection", "class_names": ["a", "b"],
                                      "image_size": [32, 32],
                                      "splits": {"train": {"count": count,
                                                           "shards": shards}}})
    return list(records.read_records(tmp_path, "train"))


def test_a_record_read_back_serialises_to_its_own_bytes(tmp_path):
    examples = list(shapes.generate(1, "train", 7, (32, 32)))
    examples[2].difficult = np.array([True] + [False] * (len(examples[2].boxes) - 1))
    examples[3].difficult = np.zeros(len(examples[3].boxes), bool)  # stored as no flags
    examples.append(Example(id="label-only", image=examples[0].image, label=3))
    read = _records(tmp_path, examples)
    assert read == [records.serialize(ex) for ex in examples]  # 3 shards, in order
    for data in read:
        assert records.serialize(records.deserialize(data)) == data


def test_records_given_as_bytes_are_written_unchanged(tmp_path):
    examples = list(shapes.generate(2, "val", 5, (32, 32)))
    first = _records(tmp_path / "a", examples)
    mixed = [first[0], examples[1], first[2], first[3], examples[4]]
    assert _records(tmp_path / "b", mixed, shard_size=2) == first


def test_reads_of_large_images_take_few_records_at_a_time():
    assert records._read_batch({"image_size": [64, 64], "test_image_size": [64, 64]}) == 256
    assert records._read_batch({"image_size": [128, 128], "test_image_size": [1024, 1024]}) == 1
    assert records._read_batch({"image_size": [512, 512]}) == 5


def _plain_warp(image, matrix, fill, out_shape=None):
    """Bilinear warp as first written: one fancy-indexed gather per neighbour, always blended."""
    h, w = image.shape[:2]
    oh, ow = out_shape or (h, w)
    inv = np.linalg.inv(matrix)
    ys, xs = np.mgrid[0:oh, 0:ow].astype(np.float64) + 0.5
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    x, y = sx - 0.5, sy - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    src = image.astype(np.float32)
    padded = np.concatenate([src, np.broadcast_to(fill, (1, w, src.shape[2]))], axis=0)

    def take(yy, xx):
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        return padded[np.where(inside, yy, h), np.clip(xx, 0, w - 1)]

    top = take(y0, x0) * (1 - fx) + take(y0, x0 + 1) * fx
    bottom = take(y0 + 1, x0) * (1 - fx) + take(y0 + 1, x0 + 1) * fx
    out = top * (1 - fy) + bottom * fy
    out[(sx < 0) | (sx > w) | (sy < 0) | (sy > h)] = fill
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def test_the_warp_gives_the_plain_bilinear_bytes():
    rng = np.random.default_rng(4)
    images = [ex.image for ex in shapes.generate(3, "train", 6, (24, 40))]
    matrices = []
    for _ in range(40):  # any affine map: scaled, rotated, sheared, shifted
        matrices.append(np.array([[rng.uniform(-2, 2), rng.uniform(-1, 1), rng.uniform(-30, 30)],
                                  [rng.uniform(-1, 1), rng.uniform(-2, 2), rng.uniform(-30, 30)],
                                  [0.0, 0.0, 1.0]]))
    # Flips and whole-pixel shifts take the unblended path; a half-pixel shift along one axis
    # blends along that axis only.
    for sx, sy, dx, dy in [(-1, 1, 40, 0), (1, -1, 0, 24), (-1, -1, 40, 24), (1, 1, 3, -2),
                           (-1, 1, 37, 5), (1, 1, 2, 0.5), (-1, 1, 39.5, 0), (1, -1, 0, 23.25)]:
        matrices.append(np.array([[sx, 0, dx], [0, sy, dy], [0, 0, 1]], np.float64))
    for k, matrix in enumerate(matrices):
        image = images[k % len(images)]
        fill = rng.uniform(0, 255, 3).astype(np.float32)
        for shape in (None, (17, 50)):
            got = augment.warp_image(image, matrix, fill, shape)
            assert got.tobytes() == _plain_warp(image, matrix, fill, shape).tobytes(), k
    flipped = augment.warp_image(images[0], matrices[40], np.zeros(3, np.float32))
    np.testing.assert_array_equal(flipped, images[0][:, ::-1])


def test_contrast_brightness_and_noise_are_what_they_were():
    cfg = AugmentConfig(brightness=0.2, contrast=0.3, noise=4.0)
    image = shapes.generate_example(0, "train", 1, (32, 32)).image
    got = augment.colour_jitter(np.random.default_rng(9), image, cfg)
    rng = np.random.default_rng(9)
    out = image.astype(np.float32)
    factor = rng.uniform(0.7, 1.3)
    out = (out - out.mean(axis=(0, 1))) * factor + out.mean(axis=(0, 1))
    out = out + rng.uniform(-0.2, 0.2) * 255.0
    out = out + rng.normal(0.0, 4.0, size=out.shape)
    assert got.tobytes() == np.clip(np.rint(out), 0, 255).astype(np.uint8).tobytes()
