"""Tests of the embedded ``shapes`` dataset: generator invariants and the TFDS builder."""

from __future__ import annotations

import collections
import importlib.util
import sys

import numpy as np
import pytest

from visionpipe.data.sources import shapes
from visionpipe.errors import DataError

N_BALANCE = 400


@pytest.fixture(scope="module")
def examples() -> list:
    """Return a few hundred 64x64 training examples."""
    return list(shapes.generate(0, "train", N_BALANCE))


@pytest.fixture(scope="module")
def wide_examples() -> list:
    """Return examples of a non-square size, (height, width) = (48, 80)."""
    return list(shapes.generate(7, "val", 60, image_size=(48, 80)))


def _instance_areas(example: shapes.Example) -> list[int]:
    """Return each box's pixel count of its own class inside the box."""
    areas = []
    for (x0, y0, x1, y1), label in zip(example.boxes.astype(int), example.box_labels, strict=True):
        areas.append(int((example.mask[y0:y1, x0:x1] == label + 1).sum()))
    return areas


def _same(a: shapes.Example, b: shapes.Example) -> bool:
    """Return whether two examples have byte-identical arrays and the same targets."""
    return (
        a.id == b.id
        and a.label == b.label
        and a.image.tobytes() == b.image.tobytes()
        and a.mask.tobytes() == b.mask.tobytes()
        and a.boxes.tobytes() == b.boxes.tobytes()
        and a.box_labels.tobytes() == b.box_labels.tobytes()
    )


def test_class_names() -> None:
    assert shapes.CLASS_NAMES == ("circle", "square", "triangle", "star")


def test_same_seed_gives_identical_examples() -> None:
    for index in range(5):
        assert _same(
            shapes.generate_example(3, "train", index), shapes.generate_example(3, "train", index)
        )


def test_different_seed_or_split_differs() -> None:
    base = shapes.generate_example(0, "train", 0)
    assert not np.array_equal(base.image, shapes.generate_example(1, "train", 0).image)
    assert not np.array_equal(base.image, shapes.generate_example(0, "val", 0).image)
    assert not np.array_equal(base.image, shapes.generate_example(0, "train", 1).image)


def test_example_does_not_depend_on_count() -> None:
    short = list(shapes.generate(5, "test", 3))
    long = list(shapes.generate(5, "test", 12))
    for index, example in enumerate(short):
        assert _same(example, long[index])
        assert _same(example, shapes.generate_example(5, "test", index))


def test_ids() -> None:
    assert [e.id for e in shapes.generate(0, "val", 3)] == [
        "val-000000",
        "val-000001",
        "val-000002",
    ]


def test_unknown_split_is_a_data_error() -> None:
    with pytest.raises(DataError):
        shapes.generate_example(0, "holdout", 0)


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (32, 32), (128, 96)])
def test_dtypes_and_shapes(size: tuple[int, int]) -> None:
    height, width = size
    for example in shapes.generate(1, "train", 20, image_size=size):
        assert example.image.dtype == np.uint8 and example.image.shape == (height, width, 3)
        assert example.mask.dtype == np.uint8 and example.mask.shape == (height, width)
        assert example.boxes.dtype == np.float32 and example.boxes.shape[1:] == (4,)
        assert example.box_labels.dtype == np.int32
        assert len(example.boxes) == len(example.box_labels)
        assert isinstance(example.label, int)
        assert set(np.unique(example.mask)) <= {0, 1, 2, 3, 4}
        x0, y0, x1, y1 = example.boxes.T
        assert (x0 >= 0).all() and (y0 >= 0).all()
        assert (x1 <= width).all() and (y1 <= height).all()


def test_boxes_tightly_enclose_their_shape(examples: list, wide_examples: list) -> None:
    for example in examples + wide_examples:
        total = 0
        for (x0, y0, x1, y1), label in zip(example.boxes.astype(int), example.box_labels,
                                           strict=True):
            assert x1 > x0 and y1 > y0
            inside = example.mask[y0:y1, x0:x1] == label + 1
            rows = np.flatnonzero(inside.any(axis=1))
            cols = np.flatnonzero(inside.any(axis=0))
            # The shape touches all four edges of its box.
            assert rows[0] == 0 and rows[-1] == y1 - y0 - 1
            assert cols[0] == 0 and cols[-1] == x1 - x0 - 1
            total += int(inside.sum())
        # Nothing of any shape lies outside the boxes.
        assert total == int((example.mask > 0).sum())


def test_shapes_do_not_touch(examples: list) -> None:
    for example in examples:
        boxes = example.boxes.astype(int)
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                ax0, ay0, ax1, ay1 = boxes[i]
                bx0, by0, bx1, by1 = boxes[j]
                apart = ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0
                assert apart, (example.id, boxes[i], boxes[j])


def test_label_is_the_clearly_largest_shape(examples: list, wide_examples: list) -> None:
    for example in examples + wide_examples:
        areas = _instance_areas(example)
        largest = int(np.argmax(areas))
        assert example.box_labels[largest] == example.label
        for k, area in enumerate(areas):
            if k != largest:
                assert areas[largest] >= 1.5 * area, (example.id, areas)


def test_shape_counts_and_class_balance(examples: list) -> None:
    counts = collections.Counter(len(e.boxes) for e in examples)
    assert set(counts) == {1, 2, 3, 4}
    labels = collections.Counter(e.label for e in examples)
    for class_index in range(len(shapes.CLASS_NAMES)):
        assert labels[class_index] >= 0.15 * len(examples), labels
    distractors = collections.Counter(int(c) for e in examples for c in e.box_labels[1:])
    assert set(distractors) == {0, 1, 2, 3}


def test_background_is_textured_and_images_differ(examples: list) -> None:
    for example in examples[:50]:
        background = example.image[example.mask == 0].astype(np.float64)
        assert background.std(axis=0).max() > 5.0, example.id
    distinct = {e.image.tobytes() for e in examples}
    assert len(distinct) == len(examples)


def test_shapes_contrast_with_their_surroundings(examples: list) -> None:
    for example in examples[:100]:
        height, width = example.mask.shape
        for (x0, y0, x1, y1), label in zip(example.boxes.astype(int), example.box_labels,
                                           strict=True):
            # Background pixels in a ring just outside the box.
            ya, yb = max(y0 - 3, 0), min(y1 + 3, height)
            xa, xb = max(x0 - 3, 0), min(x1 + 3, width)
            window = example.image[ya:yb, xa:xb].astype(np.float64)
            window_mask = example.mask[ya:yb, xa:xb]
            shape_pixels = example.image[y0:y1, x0:x1][example.mask[y0:y1, x0:x1] == label + 1]
            around = window[window_mask == 0]
            if len(around) < 10:
                continue
            distance = np.linalg.norm(shape_pixels.mean(axis=0) - around.mean(axis=0))
            assert distance > 50.0, (example.id, distance)


def test_shapes_config_names_encode_every_setting() -> None:
    names = {
        shapes.shapes_config((64, 64), {"train": 8, "val": 2}, 0).name,
        shapes.shapes_config((64, 64), {"train": 8, "val": 2}, 1).name,
        shapes.shapes_config((32, 32), {"train": 8, "val": 2}, 0).name,
        shapes.shapes_config((64, 64), {"train": 9, "val": 2}, 0).name,
        shapes.shapes_config((64, 64), {"train": 8, "test": 2}, 0).name,
    }
    assert len(names) == 5
    a = shapes.shapes_config((64, 64), {"val": 2, "train": 8}, 0)
    b = shapes.shapes_config((64, 64), {"train": 8, "val": 2}, 0)
    assert a.name == b.name
    assert shapes.ShapesConfig(name="defaults").splits == {"train": 4000, "val": 500, "test": 500}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": (8, 8), "splits": {"train": 4}, "seed": 0},
        {"image_size": (64, 64), "splits": {"holdout": 4}, "seed": 0},
        {"image_size": (64, 64), "splits": {"train": 0}, "seed": 0},
        {"image_size": (64, 64), "splits": {}, "seed": 0},
        {"image_size": (64, 64), "splits": {"train": 4}, "seed": -1},
    ],
)
def test_bad_config_is_a_data_error(kwargs: dict) -> None:
    with pytest.raises(DataError):
        shapes.shapes_config(**kwargs)


def test_module_can_be_imported_twice(monkeypatch) -> None:
    name = "shapes_second_copy"
    spec = importlib.util.spec_from_file_location(name, shapes.__file__)
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve string annotations through sys.modules, as a real import does.
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    assert module.Shapes.name == "shapes"
    assert module.generate_example(0, "train", 0).image.tobytes() == (
        shapes.generate_example(0, "train", 0).image.tobytes()
    )


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_tfds_round_trip(tmp_path, size: tuple[int, int]) -> None:
    import tensorflow_datasets as tfds

    height, width = size
    builder = shapes.load_shapes_builder(size, {"train": 8, "val": 3}, 2, str(tmp_path))
    assert isinstance(builder, shapes.Shapes)
    builder.download_and_prepare()
    assert tuple(builder.info.features["label"].names) == shapes.CLASS_NAMES
    assert builder.info.splits["train"].num_examples == 8
    assert builder.info.splits["val"].num_examples == 3

    # The builder disables TFDS's key-hash shuffling: records come back in generation order.
    expected = list(shapes.generate(2, "train", 8, size))
    records = list(tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False)))
    assert len(records) == len(expected)
    for record, example in zip(records, expected, strict=True):
        assert record["image"].tobytes() == example.image.tobytes()
        assert record["segmentation_mask"].shape == (height, width, 1)
        assert record["segmentation_mask"][..., 0].tobytes() == example.mask.tobytes()
        assert int(record["label"]) == example.label
        bbox = record["objects"]["bbox"] * np.array([height, width, height, width])
        assert np.array_equal(np.rint(bbox)[:, [1, 0, 3, 2]], example.boxes)
        assert np.array_equal(record["objects"]["label"], example.box_labels)


def test_default_config_is_reused_by_name(tmp_path) -> None:
    builder = shapes.load_shapes_builder(
        (64, 64), {"train": 4000, "val": 500, "test": 500}, 0, str(tmp_path)
    )
    assert builder.builder_config.name == "64x64-s0-train4000-val500-test500"
    assert builder.data_dir.startswith(str(tmp_path))
