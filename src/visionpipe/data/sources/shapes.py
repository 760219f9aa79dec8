"""``shapes``: an embedded, procedurally generated dataset for offline runs.

Every image holds 1 to 4 non-overlapping shapes (circle, square, triangle, star)
over a noisy, textured background. One "main" shape is clearly the largest; its
class is the image's classification label. The same generator provides the
segmentation mask and tight bounding boxes, so one dataset serves all three tasks.

Each example is drawn from its own RNG seeded by ``(seed, split, index)``, so it is
byte-identical across runs and does not depend on how many examples are generated.
The TFDS builder ``Shapes`` wraps the generator so that ``shapes`` is loaded like the TFDS
catalog. prepare maps each example through the same features (``stored_features``, then
``tfds_source.to_example``) without building it: storing the images as PNG in TFDS records
only to decode them again cost more than generating them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from visionpipe.data.example import Example
from visionpipe.errors import DataError

CLASS_NAMES = ("circle", "square", "triangle", "star")
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}

_MAIN_SIZE = (0.55, 0.80)  # main shape's extent, as a fraction of the shorter image side
_DISTRACTOR_SIZE = (0.12, 0.28)
_MIN_DISTRACTOR_PX = 5.0  # below this a star or triangle is no longer recognisable
_MAX_SHAPES = 4
_GAP = 2  # empty pixels kept between the boxes of two shapes
_AREA_RATIO = 1.5  # main shape's pixel area over any distractor's, at least
_SIZE_TRIES = 12
_PLACE_TRIES = 30
_COLOR_CANDIDATES = 16
# Shapes are brighter than the background in every channel: colours stay random, but the
# contrast has one sign, which keeps the classes learnable for a model without convolutions.
_BACKGROUND_RANGE = (20.0, 120.0)
_SHAPE_RANGE = (140.0, 255.0)
_MIN_CONTRAST = 110.0  # RGB distance between a shape's colour and the background under it
_ROTATION_JITTER = np.deg2rad(15.0)  # radians either way from upright
_STAR_INNER = 0.45  # inner/outer radius of the star; thinner arms vanish at small sizes


def _split_id(split: str) -> int:
    """Return the RNG stream id of a split name."""
    try:
        return SPLIT_IDS[split]
    except KeyError:
        known = sorted(SPLIT_IDS)
        raise DataError(f"shapes: unknown split {split!r}; use one of {known}") from None


def _polygon(class_index: int, radius: float, rng: np.random.Generator) -> np.ndarray | None:
    """Return the (K, 2) x/y vertices of a shape centred on 0, or None for a circle."""
    name = CLASS_NAMES[class_index]
    if name == "circle":
        return None
    # Upright with a little jitter: a model without rotation invariance (an MLP) can still
    # learn the classes; augment.rotate adds rotations when they are wanted.
    jitter = rng.uniform(-_ROTATION_JITTER, _ROTATION_JITTER)
    if name == "square":
        angles = np.pi / 4 + jitter + np.arange(4) * (np.pi / 2)
        radii = np.full(4, radius)
    elif name == "triangle":
        angles = -np.pi / 2 + jitter + np.arange(3) * (2 * np.pi / 3)
        radii = np.full(3, radius)
    else:
        angles = -np.pi / 2 + jitter + np.arange(10) * (np.pi / 5)
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * _STAR_INNER)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _rasterize(class_index: int, size: float, rng: np.random.Generator) -> np.ndarray:
    """Return a tight boolean patch of one shape whose extent is about ``size`` pixels.

    Pixel (r, c) is inside when its centre (c + 0.5, r + 0.5) is: no anti-aliasing,
    so the patch is the exact mask. A random sub-pixel offset varies the outline.
    """
    radius = size / 2.0
    offset = rng.uniform(0.0, 1.0, size=2)
    polygon = _polygon(class_index, radius, rng)
    n = int(np.ceil(size)) + 3  # room for the sub-pixel offset: the outline is never cut
    coords = np.arange(n, dtype=np.float64) + 0.5 - (n / 2.0) - offset[:, None]
    px = coords[0][None, :]
    py = coords[1][:, None]
    if polygon is None:
        inside = px * px + py * py <= radius * radius
    else:
        # Even-odd rule over pixel centres: one test covers convex shapes and the star.
        x1, y1 = polygon[:, 0], polygon[:, 1]
        x2 = np.concatenate((x1[1:], x1[:1]))
        y2 = np.concatenate((y1[1:], y1[:1]))
        pxe, pye = px[..., None], py[..., None]
        straddles = (y1 > pye) != (y2 > pye)
        dy = np.where(y2 == y1, 1.0, y2 - y1)
        x_cross = x1 + (pye - y1) * (x2 - x1) / dy
        inside = np.logical_xor.reduce(straddles & (pxe < x_cross), axis=-1)
    rows = inside.any(axis=1)
    cols = inside.any(axis=0)
    if not rows.any():
        return np.ones((1, 1), dtype=bool)
    r0, r1 = rows.argmax(), n - rows[::-1].argmax()
    c0, c1 = cols.argmax(), n - cols[::-1].argmax()
    return inside[r0:r1, c0:c1]


def _background(rng: np.random.Generator, noise: np.ndarray) -> np.ndarray:
    """Return a float32 (H, W, 3) background: colour gradient, texture and pixel noise."""
    height, width = noise.shape[:2]
    corners = rng.uniform(*_BACKGROUND_RANGE, size=(2, 2, 3)).astype(np.float32)
    ty = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    tx = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    top = corners[0, 0] + (corners[0, 1] - corners[0, 0]) * tx
    bottom = corners[1, 0] + (corners[1, 1] - corners[1, 0]) * tx
    image = top + (bottom - top) * ty

    yy = np.arange(height, dtype=np.float32)[:, None]
    xx = np.arange(width, dtype=np.float32)[None, :]

    def wave(angle: float, period: float, phase: float) -> np.ndarray:
        """Return a plane sine wave over the image grid."""
        k = 2 * np.pi / period
        kx, ky = np.float32(k * np.cos(angle)), np.float32(k * np.sin(angle))
        return np.sin(xx * kx + yy * ky + np.float32(phase))

    angle = rng.uniform(0.0, np.pi)
    texture = wave(angle, rng.uniform(4.0, 16.0), rng.uniform(0.0, 2 * np.pi))
    if rng.random() < 0.5:
        # A second, crossing wave turns stripes into a checker-like texture.
        texture *= wave(angle + rng.uniform(np.pi / 4, 3 * np.pi / 4), rng.uniform(4.0, 16.0), 0.0)
    tint = (rng.uniform(-1.0, 1.0, size=3) * rng.uniform(8.0, 22.0)).astype(np.float32)
    image += texture[..., None] * tint
    image += noise * np.float32(rng.uniform(4.0, 10.0))
    return image


def _contrasting_color(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """Return an RGB colour far enough from ``under``, the background mean below a shape."""
    candidates = rng.uniform(*_SHAPE_RANGE, size=(_COLOR_CANDIDATES, 3))
    distance2 = ((candidates - under) ** 2).sum(axis=1)
    good = distance2 >= _MIN_CONTRAST**2
    return candidates[good.argmax()] if good.any() else candidates[distance2.argmax()]


def _place(
    rng: np.random.Generator,
    patch_shape: tuple[int, int],
    image_size: tuple[int, int],
    taken: list[tuple[int, int, int, int]],
) -> tuple[int, int] | None:
    """Return a (top, left) where the patch fits without touching ``taken`` boxes, or None."""
    h, w = patch_shape
    height, width = image_size
    if h > height or w > width:
        return None
    for _ in range(_PLACE_TRIES):
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        clear = all(
            left >= x1 + _GAP or left + w + _GAP <= x0 or top >= y1 + _GAP or top + h + _GAP <= y0
            for x0, y0, x1, y1 in taken
        )
        if clear:
            return top, left
    return None


def generate_example(
    seed: int, split: str, index: int, image_size: tuple[int, int] = (64, 64)
) -> Example:
    """Generate example ``index`` of ``split``; the same arguments give the same arrays."""
    height, width = int(image_size[0]), int(image_size[1])
    if height < 16 or width < 16:
        raise DataError(f"shapes: image_size {image_size} is too small; use at least 16x16")
    if int(seed) < 0 or int(index) < 0:
        raise DataError(f"shapes: seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng([int(seed), _split_id(split), int(index)])
    side = float(min(height, width))

    main_class = int(rng.integers(len(CLASS_NAMES)))
    n_distractors = int(rng.integers(0, _MAX_SHAPES))
    distractor_classes = rng.integers(len(CLASS_NAMES), size=n_distractors)

    # One noise field serves the background and the shapes, sampled once per image for speed.
    noise = rng.standard_normal(size=(height, width, 3), dtype=np.float32)
    image = _background(rng, noise)
    mask = np.zeros((height, width), dtype=np.uint8)
    taken: list[tuple[int, int, int, int]] = []
    labels: list[int] = []

    def paint(class_index: int, patch: np.ndarray, top: int, left: int) -> None:
        """Draw one shape into image and mask and record its tight box."""
        h, w = patch.shape
        region = image[top : top + h, left : left + w]
        color = _contrasting_color(rng, region.sum(axis=(0, 1)) / (h * w))
        sigma = np.float32(rng.uniform(3.0, 8.0))
        shape_noise = noise[top : top + h, left : left + w][patch]
        region[patch] = color.astype(np.float32) + sigma * shape_noise
        mask[top : top + h, left : left + w][patch] = class_index + 1
        taken.append((left, top, left + w, top + h))
        labels.append(class_index)

    main_patch = _rasterize(main_class, rng.uniform(*_MAIN_SIZE) * side, rng)
    main_pos = _place(rng, main_patch.shape, (height, width), taken)
    if main_pos is None:  # cannot happen at the sizes above; keeps the invariant explicit
        raise DataError(f"shapes: main shape does not fit in image_size {image_size}")
    paint(main_class, main_patch, *main_pos)
    max_area = main_patch.sum() / _AREA_RATIO

    lo = max(_DISTRACTOR_SIZE[0] * side, _MIN_DISTRACTOR_PX)
    hi = max(_DISTRACTOR_SIZE[1] * side, lo)
    for class_index in distractor_classes:
        class_index = int(class_index)
        # Only the geometry is resampled, so distractor classes stay uniform.
        patch = None
        for attempt in range(_SIZE_TRIES):
            size = lo if attempt == _SIZE_TRIES - 1 else rng.uniform(lo, hi)
            candidate = _rasterize(class_index, size, rng)
            if candidate.sum() <= max_area:
                patch = candidate
                break
        if patch is None:
            continue
        pos = _place(rng, patch.shape, (height, width), taken)
        if pos is not None:
            paint(class_index, patch, *pos)

    return Example(
        id=f"{split}-{index:06d}",
        image=np.clip(np.rint(image), 0, 255).astype(np.uint8),
        label=main_class,
        mask=mask,
        boxes=np.asarray(taken, dtype=np.float32).reshape(-1, 4),
        box_labels=np.asarray(labels, dtype=np.int32),
    )


def generate(
    seed: int, split: str, count: int, image_size: tuple[int, int] = (64, 64)
) -> Iterator[Example]:
    """Yield examples 0..count-1 of ``split``."""
    for index in range(count):
        yield generate_example(seed, split, index, image_size)


_DEFAULT_SPLITS = {"train": 4000, "val": 500, "test": 500}


@dataclasses.dataclass(eq=False)  # eq=False like BuilderConfig itself: configs are compared by name
class ShapesConfig(tfds.core.BuilderConfig):
    """Settings of one prepared ``shapes`` dataset; build it with ``shapes_config``."""

    image_size: tuple[int, int] = (64, 64)
    splits: dict[str, int] = dataclasses.field(default_factory=lambda: dict(_DEFAULT_SPLITS))
    seed: int = 0


def shapes_config(
    image_size: tuple[int, int], splits: dict[str, int], seed: int
) -> ShapesConfig:
    """Return a config whose name encodes every setting, so no two settings share a cache."""
    height, width = (int(v) for v in image_size)
    if height < 16 or width < 16:
        raise DataError(f"shapes: image_size {tuple(image_size)} is too small; use at least 16x16")
    if not splits or set(splits) - set(SPLIT_IDS):
        raise DataError(
            f"shapes: splits must map some of {sorted(SPLIT_IDS)} to counts, got {dict(splits)}"
        )
    bad = {name: count for name, count in splits.items() if int(count) < 1}
    if bad:
        raise DataError(f"shapes: every split needs at least 1 example, got {bad}")
    if int(seed) < 0:
        raise DataError(f"shapes: seed must be >= 0, got {seed}")
    # A fixed split order keeps the name independent of the mapping's insertion order.
    ordered = {name: int(splits[name]) for name in SPLIT_IDS if name in splits}
    name = f"{height}x{width}-s{int(seed)}-" + "-".join(f"{k}{v}" for k, v in ordered.items())
    return ShapesConfig(
        name=name,
        description=f"shapes at {height}x{width}, seed {int(seed)}, splits {ordered}",
        image_size=(height, width),
        splits=ordered,
        seed=int(seed),
    )


_DEFAULT_CONFIG = shapes_config((64, 64), _DEFAULT_SPLITS, 0)

# TFDS registers builder classes by name and refuses a second "shapes", which a reload
# or a second import path would define; the first registered class stays in charge.
_SKIP_REGISTRATION = "shapes" in tfds.core.registered.list_imported_builders()


class Shapes(tfds.core.GeneratorBasedBuilder, skip_registration=_SKIP_REGISTRATION):
    """TFDS builder over ``generate``: images, labels, masks and boxes of ``shapes``."""

    # Prepared data is cached per version: bump it whenever generate_example's output changes.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [_DEFAULT_CONFIG]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """Return this file's path.

        TFDS 4.9.10 derives it through the ``importlib_resources`` backport, which it
        does not declare as a dependency; ``download_and_prepare`` then fails when the
        backport is not installed. The answer is the same either way.
        """
        return epath.Path(__file__)

    # Generated here, nothing downloaded: TFDS' "Downloading and preparing dataset" and
    # "downloaded and prepared to <tmp>" lines would say otherwise. prepare reports instead.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _info(self) -> tfds.core.DatasetInfo:
        """Describe the features: image, label, segmentation mask and boxes."""
        height, width = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(height, width, 3)),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                    "segmentation_mask": tfds.features.Image(shape=(height, width, 1)),
                    "objects": tfds.features.Sequence(
                        {
                            "bbox": tfds.features.BBoxFeature(),
                            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                        }
                    ),
                }
            ),
            supervised_keys=("image", "label"),
            # Keep generation order on disk: record i of a split is generate_example(..., i),
            # so ids assigned by read position match. Readers must pass shuffle_files=False.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        """Return one generator per configured split; nothing is downloaded."""
        del dl_manager
        return {
            name: self._generate_examples(split=name, count=count)
            for name, count in self.builder_config.splits.items()
        }

    def _generate_examples(self, split: str, count: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ``(id, features)`` for each example of ``split``."""
        config = self.builder_config
        for example in generate(config.seed, split, count, config.image_size):
            yield example.id, stored_features(example)


def stored_features(example: Example) -> dict[str, Any]:
    """The features ``Shapes`` stores for one generated example, as the built dataset gives
    them back: image and mask are stored losslessly (PNG) and the boxes as float32, so these
    arrays are what ``as_dataset`` returns for it, without the round trip through TFDS."""
    height, width = example.image.shape[:2]
    scale = np.array([width, height, width, height], dtype=np.float64)
    # Pixel [x_min, y_min, x_max, y_max] -> normalised [ymin, xmin, ymax, xmax].
    bbox = (example.boxes.astype(np.float64) / scale)[:, [1, 0, 3, 2]]
    return {
        "image": example.image,
        "label": example.label,
        "segmentation_mask": example.mask[..., None],
        "objects": {
            "bbox": bbox.astype(np.float32),
            "label": example.box_labels.astype(np.int64),
        },
    }


def load_shapes_builder(
    image_size: tuple[int, int], splits: dict[str, int], seed: int, data_dir: str
) -> Shapes:
    """Return the (not yet prepared) builder of ``shapes`` for these settings."""
    config = shapes_config(image_size, splits, seed)
    # TFDS rejects a new config object named like a predefined one; pass the name instead.
    if config.name in Shapes.builder_configs:
        return Shapes(config=config.name, data_dir=str(data_dir))
    return Shapes(config=config, data_dir=str(data_dir))
